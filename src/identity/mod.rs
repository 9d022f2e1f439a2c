//! Verifies what a caller presents and turns it into a [`Subject`] with attributes.

pub mod bundles;
pub mod oidc;
pub mod sources;
pub mod spiffe;
pub mod workload_api;
pub mod x509;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::Config;
use crate::config::ConfigError;
use crate::domain::Subject;

/// Largest subject token accepted, checked before any parsing or crypto.
pub const MAX_SUBJECT_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const MAX_SKEW_SECS: i64 = 60;

/// How the caller proved who it is (the policy context's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    JwtSvid,
    X509Svid,
    Oidc,
    TaskToken,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::JwtSvid => "jwt-svid",
            Source::X509Svid => "x509-svid",
            Source::Oidc => "oidc",
            Source::TaskToken => "task-token",
        }
    }
}

/// What kind of identity, with the attributes policies may test.
#[derive(Debug, Clone)]
pub enum IdentityKind {
    Spiffe {
        spiffe_id: ::spiffe::SpiffeId,
    },
    Oidc {
        issuer: String,
        sub: String,
        claims: Map<String, Value>,
    },
}

/// A verified workload identity.
#[derive(Debug, Clone)]
pub struct VerifiedIdentity {
    pub subject: Subject,
    pub source: Source,
    pub kind: IdentityKind,
    /// When the presented credential expires (unix seconds).
    pub expires_at: i64,
}

impl VerifiedIdentity {
    /// The trust domain (SPIFFE) or issuer (OIDC) the subject belongs to.
    pub fn issuer(&self) -> String {
        match &self.kind {
            IdentityKind::Spiffe { spiffe_id } => spiffe_id.trust_domain_name().to_string(),
            IdentityKind::Oidc { issuer, .. } => issuer.clone(),
        }
    }
}

/// Why a presented token was refused. The caller only learns that it was refused; the
/// detail goes to the log.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("token is larger than {MAX_SUBJECT_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("token header has `crit`: extensions Writ does not understand (RFC 7515 §4.1.11)")]
    CriticalHeader,
    #[error("JWT-SVID `typ` is neither `JWT` nor `JOSE`")]
    WrongSvidType,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token is an access token (`typ` at+jwt), not an ID token")]
    AccessTokenAsIdToken,
    #[error("token algorithm is not allowed")]
    UnsupportedAlg,
    #[error("token header has no `kid`")]
    MissingKid,
    #[error("token `kid` is not a key of its issuer")]
    UnknownKey,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token audience does not include the configured audience")]
    WrongAudience,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    #[error("token `sub` is not a valid SPIFFE ID")]
    InvalidSpiffeId,
    #[error("token trust domain is not configured")]
    UntrustedDomain,
    #[error("trust domain `{trust_domain}` is not ready: {reason}")]
    TrustDomainNotReady {
        trust_domain: String,
        reason: String,
    },
    #[error("token issuer is not trusted")]
    UntrustedIssuer,
    #[error("oidc: {0}")]
    Oidc(#[from] oidc::OidcError),
}

impl IdentityError {
    /// True when the failure is the broker's (or an issuer's) infrastructure, not the token:
    /// the exchange then answers 503 instead of refusing the caller.
    pub fn is_unavailable(&self) -> bool {
        match self {
            IdentityError::Oidc(e) => e.is_unavailable(),
            IdentityError::TrustDomainNotReady { .. } => true,
            _ => false,
        }
    }
}

impl From<crate::token::jwt::JwtFormatError> for IdentityError {
    fn from(e: crate::token::jwt::JwtFormatError) -> Self {
        match e {
            crate::token::jwt::JwtFormatError::TooLarge => IdentityError::TooLarge,
            crate::token::jwt::JwtFormatError::Malformed => IdentityError::Malformed,
            crate::token::jwt::JwtFormatError::Critical => IdentityError::CriticalHeader,
        }
    }
}

/// Which kinds of identity token a caller may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// A JWT-SVID or an OIDC ID token (`subject_token_type` `jwt`, bearer credentials).
    AnyIdentity,
    /// An OIDC ID token only (`subject_token_type` `id_token`).
    IdTokenOnly,
}

/// All configured workload identity verifiers.
pub struct IdentityVerifier {
    pub svid: spiffe::JwtSvidVerifier,
    pub oidc: oidc::OidcVerifier,
    /// What keeps the trust domains' bundles current (endpoints, Workload API), started by
    /// the application.
    sources: Vec<sources::SourceTask>,
    /// Bumped when a trust domain's bundle or readiness changes.
    changes: Arc<bundles::Changes>,
}

impl IdentityVerifier {
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let changes = Arc::new(tokio::sync::watch::channel(0u64).0);
        let mut domains = HashMap::new();
        let mut tasks = Vec::new();
        let mut by_socket: Vec<sources::WorkloadApiSource> = Vec::new();
        for (i, td) in config.spiffe.trust_domains.iter().enumerate() {
            let key = |k: &str| format!("spiffe.trust_domains[{i}].{k}");
            let bundle = if let Some(path) = &td.bundle_file {
                Arc::new(
                    bundles::DomainBundle::from_file(&td.name, path, changes.clone())
                        .map_err(|e| ConfigError::new(key("bundle_file"), e.to_string()))?,
                )
            } else if let Some(url) = &td.bundle_endpoint {
                let (min, max, max_age) = td.refresh_bounds();
                let http = sources::EndpointSource::client(td.bundle_endpoint_ca.as_deref())
                    .map_err(|e| ConfigError::new(key("bundle_endpoint_ca"), e))?;
                let d = Arc::new(bundles::DomainBundle::pending(
                    &td.name,
                    bundles::SourceKind::Endpoint(url.clone()),
                    Some(max_age),
                    changes.clone(),
                ));
                tasks.push(sources::SourceTask::Endpoint(sources::EndpointSource {
                    domain: d.clone(),
                    url: url.clone(),
                    http,
                    refresh_min: min,
                    refresh_max: max,
                }));
                d
            } else if let Some(endpoint) = &td.workload_api {
                let d = Arc::new(bundles::DomainBundle::pending(
                    &td.name,
                    bundles::SourceKind::WorkloadApi(endpoint.clone()),
                    None,
                    changes.clone(),
                ));
                // One stream per agent socket serves every trust domain read from it.
                match by_socket.iter_mut().find(|s| &s.endpoint == endpoint) {
                    Some(s) => s.domains.push(d.clone()),
                    None => by_socket.push(sources::WorkloadApiSource {
                        endpoint: endpoint.clone(),
                        domains: vec![d.clone()],
                    }),
                }
                d
            } else {
                return Err(ConfigError::new(
                    key("bundle_file"),
                    "a trust domain needs one bundle source: bundle_file, bundle_endpoint or \
                     workload_api",
                ));
            };
            domains.insert(
                td.name.clone(),
                spiffe::TrustDomain {
                    audience: td.audience.clone(),
                    bundle,
                },
            );
        }
        tasks.extend(by_socket.into_iter().map(sources::SourceTask::WorkloadApi));
        let issuers = config
            .oidc
            .issuers
            .iter()
            .map(|i| oidc::OidcIssuerConfig {
                issuer: i.issuer.clone(),
                audience: i.audience.clone(),
                allowed_extra_audiences: i.allowed_extra_audiences.clone(),
                jwks_uri: i.jwks_uri.clone(),
            })
            .collect();
        let oidc = oidc::OidcVerifier::new(issuers, oidc::OidcOptions::default())
            .map_err(|e| ConfigError::new("oidc.issuers", e.to_string()))?;
        Ok(IdentityVerifier {
            svid: spiffe::JwtSvidVerifier::new(domains),
            oidc,
            sources: tasks,
            changes,
        })
    }

    /// The tasks that keep bundle endpoints and Workload API trust domains current; the
    /// application runs them (each call gives a fresh set over the same trust domains).
    pub fn source_tasks(&self) -> Vec<sources::SourceTask> {
        self.sources.clone()
    }

    /// Changes when a trust domain's bundle or readiness changes.
    pub fn bundle_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Each trust domain and why it is not ready (`None` when it is), sorted by name.
    pub fn trust_domain_status(&self) -> Vec<(String, Option<String>)> {
        let mut v: Vec<(String, Option<String>)> = self
            .svid
            .bundles()
            .map(|(name, b)| (name.to_string(), b.status().err()))
            .collect();
        v.sort();
        v
    }

    /// Verifies a TLS client's certificate chain (leaf first) as an X509-SVID at `now`.
    pub fn verify_x509(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'_>],
        now: i64,
    ) -> Result<(VerifiedIdentity, x509::X509Svid), x509::X509SvidError> {
        let svid = x509::verify(chain, now, |td| self.svid.x509_authorities(td))?;
        let id = VerifiedIdentity {
            subject: Subject::spiffe(&svid.spiffe_id),
            source: Source::X509Svid,
            expires_at: svid.not_after,
            kind: IdentityKind::Spiffe {
                spiffe_id: svid.spiffe_id.clone(),
            },
        };
        Ok((id, svid))
    }

    /// Verifies a JWT-SVID presented as a client assertion (RFC 7523 §2.2): its audience is
    /// its trust domain's `audience` or `token_endpoint`. OIDC ID tokens are not client
    /// assertions here.
    pub fn verify_client_assertion(
        &self,
        token: &str,
        token_endpoint: &str,
        now: i64,
    ) -> Result<VerifiedIdentity, IdentityError> {
        let jwt = crate::token::jwt::ParsedJwt::parse(token, MAX_SUBJECT_TOKEN_BYTES)?;
        let sub = jwt.str_claim("sub").unwrap_or("");
        if !sub.starts_with("spiffe://") {
            return Err(IdentityError::InvalidSpiffeId);
        }
        let id = self
            .svid
            .verify_parsed_for(&jwt, now, Some(token_endpoint))?;
        Ok(VerifiedIdentity {
            subject: Subject::spiffe(&id.spiffe_id),
            source: Source::JwtSvid,
            expires_at: id.exp,
            kind: IdentityKind::Spiffe {
                spiffe_id: id.spiffe_id,
            },
        })
    }

    /// Verifies a workload identity token (`jwt` or `id_token` type).
    pub async fn verify(
        &self,
        token: &str,
        accept: Accept,
        now: i64,
    ) -> Result<VerifiedIdentity, IdentityError> {
        let jwt = crate::token::jwt::ParsedJwt::parse(token, MAX_SUBJECT_TOKEN_BYTES)?;
        // RFC 8725 §3.11 / RFC 9068 §2.1: a JWT typed as an access token is not an ID token.
        let typ = jwt.header.typ.as_deref().unwrap_or("");
        if accept == Accept::IdTokenOnly
            && (typ.eq_ignore_ascii_case("at+jwt")
                || typ.eq_ignore_ascii_case("application/at+jwt"))
        {
            return Err(IdentityError::AccessTokenAsIdToken);
        }
        if jwt
            .str_claim("iss")
            .is_some_and(|i| self.oidc.knows_issuer(i))
        {
            let id = self.oidc.verify_parsed(&jwt, now).await?;
            return Ok(VerifiedIdentity {
                subject: Subject::oidc(&id.issuer, &id.sub),
                source: Source::Oidc,
                expires_at: id.exp,
                kind: IdentityKind::Oidc {
                    issuer: id.issuer,
                    sub: id.sub,
                    claims: id.claims,
                },
            });
        }
        let sub = jwt.str_claim("sub").unwrap_or("");
        if accept == Accept::AnyIdentity && sub.starts_with("spiffe://") {
            let id = self.svid.verify_parsed(&jwt, now)?;
            return Ok(VerifiedIdentity {
                subject: Subject::spiffe(&id.spiffe_id),
                source: Source::JwtSvid,
                expires_at: id.exp,
                kind: IdentityKind::Spiffe {
                    spiffe_id: id.spiffe_id,
                },
            });
        }
        if sub.to_ascii_lowercase().starts_with("spiffe:") {
            // Mixed-case or otherwise malformed SPIFFE IDs are refused as such.
            return Err(IdentityError::InvalidSpiffeId);
        }
        Err(IdentityError::UntrustedIssuer)
    }
}
