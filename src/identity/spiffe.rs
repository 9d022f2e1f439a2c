//! JWT-SVID verification per the SPIFFE JWT-SVID specification.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::Algorithm;
use spiffe::SpiffeId;

use super::bundles::DomainBundle;
use super::{IdentityError, MAX_SKEW_SECS, MAX_SUBJECT_TOKEN_BYTES};
use crate::token::jwt::ParsedJwt;

/// Algorithms a JWT-SVID may use (JWT-SVID §3): RSA, ECDSA and RSA-PSS. Never `none`, never
/// HMAC, never EdDSA.
pub const JWT_SVID_ALGS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// One configured trust domain.
pub struct TrustDomain {
    pub audience: String,
    pub bundle: Arc<DomainBundle>,
}

/// A verified JWT-SVID.
#[derive(Debug, Clone)]
pub struct SvidIdentity {
    pub spiffe_id: SpiffeId,
    pub exp: i64,
}

pub struct JwtSvidVerifier {
    domains: HashMap<String, TrustDomain>,
}

impl JwtSvidVerifier {
    pub fn new(domains: HashMap<String, TrustDomain>) -> Self {
        JwtSvidVerifier { domains }
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The trust domain's bundle holder (its JWT and X.509 authorities), by name.
    pub fn domain(&self, name: &str) -> Option<&Arc<DomainBundle>> {
        self.domains.get(name).map(|d| &d.bundle)
    }

    pub fn bundles(&self) -> impl Iterator<Item = (&str, &Arc<DomainBundle>)> {
        self.domains.iter().map(|(k, v)| (k.as_str(), &v.bundle))
    }

    /// The X.509 authorities of trust domain `td`, if it is configured.
    pub fn x509_authorities(&self, td: &str) -> super::x509::AuthoritiesLookup {
        self.domains
            .get(td)
            .map(|d| d.bundle.current().map(|b| b.x509_anchors.clone()))
    }

    /// True when some trust domain has X.509 authorities now, or reads them from a source
    /// that streams or fetches them (X509-SVIDs can be verified).
    pub fn has_x509_authorities(&self) -> bool {
        self.domains.values().any(|d| {
            !matches!(d.bundle.source(), super::bundles::SourceKind::File(_))
                || d.bundle.current().is_ok_and(|b| !b.x509_anchors.is_empty())
        })
    }

    /// Verifies a JWT-SVID at time `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<SvidIdentity, IdentityError> {
        let jwt = ParsedJwt::parse(token, MAX_SUBJECT_TOKEN_BYTES)?;
        self.verify_parsed(&jwt, now)
    }

    /// Verifies an already split JWT-SVID.
    pub fn verify_parsed(
        &self,
        jwt: &ParsedJwt<'_>,
        now: i64,
    ) -> Result<SvidIdentity, IdentityError> {
        self.verify_parsed_for(jwt, now, None)
    }

    /// Verifies a JWT-SVID whose audience may also be `also_audience` instead of its trust
    /// domain's `audience` (a client assertion may name the token endpoint, RFC 7523 §3).
    pub fn verify_parsed_for(
        &self,
        jwt: &ParsedJwt<'_>,
        now: i64,
        also_audience: Option<&str>,
    ) -> Result<SvidIdentity, IdentityError> {
        let alg = jwt.header.alg;
        if !JWT_SVID_ALGS.contains(&alg) {
            return Err(IdentityError::UnsupportedAlg);
        }
        // JWT-SVID §3.2: `typ`, when present, is `JWT` or `JOSE`.
        if let Some(typ) = jwt.header.typ.as_deref()
            && !typ.eq_ignore_ascii_case("JWT")
            && !typ.eq_ignore_ascii_case("JOSE")
        {
            return Err(IdentityError::WrongSvidType);
        }
        let kid = jwt
            .header
            .kid
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or(IdentityError::MissingKid)?;
        // The subject decides which trust domain's keys may be used, so it is read before the
        // signature is checked; nothing from the payload is trusted until the signature is.
        let sub = jwt
            .str_claim("sub")
            .ok_or(IdentityError::MissingClaim("sub"))?;
        let spiffe_id =
            crate::domain::parse_spiffe_id(sub).ok_or(IdentityError::InvalidSpiffeId)?;
        let td = self
            .domains
            .get(spiffe_id.trust_domain_name())
            .ok_or(IdentityError::UntrustedDomain)?;
        // A trust domain whose source cannot be read fails closed (503: the broker cannot
        // decide), whatever the token.
        let bundle = td
            .bundle
            .current()
            .map_err(|reason| IdentityError::TrustDomainNotReady {
                trust_domain: spiffe_id.trust_domain_name().to_string(),
                reason,
            })?;
        let authority = bundle
            .authorities
            .get(kid)
            .ok_or(IdentityError::UnknownKey)?;
        if authority.alg.is_some_and(|a| a != alg) || authority.key.family() != alg.family() {
            return Err(IdentityError::UnsupportedAlg);
        }
        if !jwt.signature_valid(&authority.key, alg) {
            return Err(IdentityError::BadSignature);
        }
        if !jwt.audience_contains(&td.audience)
            && !also_audience.is_some_and(|a| jwt.audience_contains(a))
        {
            return Err(IdentityError::WrongAudience);
        }
        let exp = jwt
            .int_claim("exp")
            .ok_or(IdentityError::MissingClaim("exp"))?;
        if now > exp.saturating_add(MAX_SKEW_SECS) {
            return Err(IdentityError::Expired);
        }
        if jwt
            .int_claim("nbf")
            .is_some_and(|nbf| nbf > now.saturating_add(MAX_SKEW_SECS))
        {
            return Err(IdentityError::NotYetValid);
        }
        Ok(SvidIdentity { spiffe_id, exp })
    }
}
