//! The resource server's side of Writ (SPEC §9): a task token checked where it is used,
//! without asking the broker about every request.
//!
//! [`Verifier`] checks what a request presents: the token's signature against the broker's
//! JWKS (fetched and cached, fetched again for an unknown `kid` at most every
//! [`Config::jwks_min_refresh`]), `typ`, `iss`, `aud`, `exp`/`nbf`, the binding (a DPoP proof
//! of the `cnf.jkt` key for the request, or the peer certificate of `cnf["x5t#S256"]`), and
//! the token's bit in its status list (fetched and cached for the list's `ttl`). What passes
//! becomes [`Verified`]; what does not becomes a [`Rejection`] that answers with the RFC 6750
//! / RFC 9449 `WWW-Authenticate` challenge. [`VerifyLayer`] does this for every request of a
//! tower (axum) service, checks the route's scopes, and hands [`Verified`] to the handler as a
//! request extension.
//!
//! It fails closed: a status list that cannot be fetched, a JWKS that cannot be fetched while
//! the token's key is unknown, a replay cache that is full, all refuse the request (503); a
//! list the broker does not know (404) or an index past its end is an invalid token.

mod jwks;
mod layer;
mod lists;
mod replay;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::token::dpop::{self, Expect};
use crate::token::jwt::ParsedJwt;
use crate::token::{MAX_TASK_TOKEN_BYTES, TaskClaims};

pub use layer::{PeerCertificate, VerifyLayer, VerifyService, rejection_response};

/// Where the verifier gets the time (unix seconds); the system clock unless a test sets one.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// How a resource server verifies Writ's tokens. Make one with [`Config::new`], then change
/// what differs from the defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// The broker's `server.issuer`: a token's `iss` must be exactly this.
    pub issuer: String,
    /// This resource server's audience: a token's `aud` must contain it.
    pub audience: String,
    /// Where the broker is reached, when not at `issuer` (an address inside the cluster).
    /// The JWKS is fetched from `<broker_url>/oauth2/jwks`, and a status list whose `uri` is
    /// `<issuer>/oauth2/status/<list>` from `<broker_url>/oauth2/status/<list>`.
    pub broker_url: Option<String>,
    /// This resource server's public base URL (`https://api.example.org`): a DPoP proof's
    /// `htu` must be it followed by the request's path. Without it, the URL is derived from
    /// the request (its absolute URI, or `http://` and its `Host` header), which is right
    /// only when nothing (TLS, a proxy) stands in front of the service.
    pub resource_url: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 5 s, at most 60 s).
    pub leeway: Duration,
    /// Least time between two JWKS fetches for an unknown `kid` (default 30 s).
    pub jwks_min_refresh: Duration,
    /// Timeout of every fetch from the broker (default 5 s).
    pub http_timeout: Duration,
    /// Longest a status list is cached, whatever its `ttl` says (default 5 min).
    pub max_status_age: Duration,
    /// DPoP proof `jti`s remembered (default 100,000): past it, proofs are refused (503)
    /// until the oldest have left the replay window.
    pub replay_capacity: usize,
    /// The time, for tests; the system clock when `None`.
    pub clock: Option<Clock>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("broker_url", &self.broker_url)
            .field("resource_url", &self.resource_url)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Config {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Config {
            issuer: issuer.into(),
            audience: audience.into(),
            broker_url: None,
            resource_url: None,
            leeway: Duration::from_secs(5),
            jwks_min_refresh: Duration::from_secs(30),
            http_timeout: Duration::from_secs(5),
            max_status_age: Duration::from_secs(300),
            replay_capacity: 100_000,
            clock: None,
        }
    }
}

/// A config value that cannot work, named by its field.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("`{field}`: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

fn invalid(field: &'static str, reason: &'static str) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

/// An absolute `http(s)` URL without query or fragment, with its trailing `/` removed.
fn base_url(value: &str, field: &'static str) -> Result<String, ConfigError> {
    let url = url::Url::parse(value).map_err(|_| invalid(field, "is not an absolute URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(field, "is not an http or https URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(field, "has a query or a fragment"));
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// How the token was presented (`Authorization: <scheme> <token>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Bearer,
    Dpop,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Bearer => "Bearer",
            Scheme::Dpop => "DPoP",
        }
    }
}

/// What a request presents, as the verifier needs it.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    /// The request's method.
    pub method: &'a str,
    /// The request's absolute URL without query, as the client addressed it (a DPoP proof's
    /// `htu`).
    pub url: &'a str,
    /// Every `Authorization` header value.
    pub authorization: &'a [&'a str],
    /// Every `DPoP` header value.
    pub dpop: &'a [&'a str],
    /// The DER of the TLS peer's certificate, when the connection has one.
    pub peer_certificate: Option<&'a [u8]>,
}

/// How a verified token is bound to its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// A bearer token.
    None,
    /// DPoP: the proof of this request was signed by the key with this thumbprint.
    Dpop { jkt: String },
    /// mTLS: the peer certificate has this SHA-256 thumbprint.
    Mtls { x5t_s256: String },
}

/// The claims of a token that passed every check, for the handler (a request extension).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Verified {
    /// `sub`: the subject the task acts for (the root owner of a delegated task).
    pub subject: String,
    /// `client_id`: the workload that holds the token (the actor of a delegated task).
    pub client_id: String,
    /// `scope`, split.
    pub scopes: Vec<String>,
    /// `txn`: the task.
    pub task_id: String,
    /// `jti`.
    pub token_id: String,
    /// `aud`.
    pub audience: Vec<String>,
    /// `exp`.
    pub expires_at: i64,
    /// `act`: the actor chain of a delegated token, current actor outermost.
    pub act: Option<Value>,
    /// `cnf`.
    pub cnf: Option<Value>,
    pub binding: Binding,
}

impl Verified {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The actor chain's subjects, current actor first (empty for a token that is not
    /// delegated).
    pub fn actors(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut next = self.act.as_ref();
        while let Some(act) = next {
            match act.get("sub").and_then(Value::as_str) {
                Some(sub) if out.len() < 16 => out.push(sub.to_string()),
                _ => break,
            }
            next = act.get("act");
        }
        out
    }
}

/// The error codes of a refusal (RFC 6750 §3.1, RFC 9449 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No credentials: a challenge without an error code (RFC 6750 §3.1).
    Missing,
    /// 400: more than one `Authorization` header, or one that is not `Bearer`/`DPoP <token>`.
    InvalidRequest,
    /// 401: the token is not valid here.
    InvalidToken,
    /// 401: the DPoP proof is missing, invalid, replayed, or not for this token.
    InvalidDpopProof,
    /// 403: the token lacks a scope the route needs.
    InsufficientScope,
    /// 503: the verifier cannot decide safely now (broker unreachable, replay cache full).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            ErrorCode::Missing | ErrorCode::Unavailable => None,
            ErrorCode::InvalidRequest => Some("invalid_request"),
            ErrorCode::InvalidToken => Some("invalid_token"),
            ErrorCode::InvalidDpopProof => Some("invalid_dpop_proof"),
            ErrorCode::InsufficientScope => Some("insufficient_scope"),
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Missing | ErrorCode::InvalidToken | ErrorCode::InvalidDpopProof => 401,
            ErrorCode::InsufficientScope => 403,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// A refused request: the status and challenge to answer with. The description is short and
/// fixed; the detail goes to the log.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub code: ErrorCode,
    /// The scheme of the challenge: the one the token was presented with, or `DPoP` where
    /// the token demands it.
    pub scheme: Scheme,
    pub description: &'static str,
    /// For `insufficient_scope`: the scopes the route needs.
    pub scope: Option<String>,
}

impl Rejection {
    fn new(code: ErrorCode, scheme: Scheme, description: &'static str) -> Self {
        Rejection {
            code,
            scheme,
            description,
            scope: None,
        }
    }

    fn token(scheme: Scheme, description: &'static str) -> Self {
        Self::new(ErrorCode::InvalidToken, scheme, description)
    }

    fn proof(description: &'static str) -> Self {
        Self::new(ErrorCode::InvalidDpopProof, Scheme::Dpop, description)
    }

    fn unavailable(scheme: Scheme, description: &'static str) -> Self {
        Self::new(ErrorCode::Unavailable, scheme, description)
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The `WWW-Authenticate` value; none for a 503.
    pub fn www_authenticate(&self) -> Option<String> {
        let algs = format!("algs=\"{}\"", dpop::SIGNING_ALGS.join(" "));
        let Some(error) = self.code.as_str() else {
            return match self.code {
                // RFC 9449 §7.2: both schemes are offered.
                ErrorCode::Missing => Some(format!("Bearer, DPoP {algs}")),
                _ => None,
            };
        };
        let mut params = vec![
            format!("error=\"{error}\""),
            format!("error_description=\"{}\"", self.description),
        ];
        if let Some(scope) = &self.scope {
            params.push(format!("scope=\"{scope}\""));
        }
        if self.scheme == Scheme::Dpop {
            params.push(algs);
        }
        Some(format!("{} {}", self.scheme.name(), params.join(", ")))
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.code.as_str().unwrap_or("unavailable"),
            self.description
        )
    }
}

/// Checks task tokens for one resource server. Cheap to clone; clones share the caches.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// `iss`, exactly as configured.
    issuer: String,
    /// The issuer without a trailing `/`, under which its status lists are.
    issuer_base: String,
    audience: String,
    broker_url: String,
    resource_url: Option<String>,
    leeway: i64,
    clock: Clock,
    jwks: jwks::Jwks,
    lists: lists::Lists,
    replay: replay::ReplayCache,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .finish_non_exhaustive()
    }
}

/// Longest `leeway` accepted.
const MAX_LEEWAY: Duration = Duration::from_secs(60);

fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Verifier {
    /// Checks the config; fetches nothing yet (the first request, or [`Verifier::warm`],
    /// does).
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        crate::token::crypto::ensure_installed();
        let issuer_base = base_url(&config.issuer, "issuer")?;
        if config.audience.is_empty() {
            return Err(invalid("audience", "is empty"));
        }
        let broker_url = match &config.broker_url {
            Some(u) => base_url(u, "broker_url")?,
            None => issuer_base.clone(),
        };
        let resource_url = config
            .resource_url
            .as_deref()
            .map(|u| base_url(u, "resource_url"))
            .transpose()?;
        if config.leeway > MAX_LEEWAY {
            return Err(invalid("leeway", "is more than 60 s"));
        }
        if config.http_timeout.is_zero() {
            return Err(invalid("http_timeout", "is zero"));
        }
        if config.max_status_age.is_zero() {
            return Err(invalid("max_status_age", "is zero"));
        }
        if config.replay_capacity == 0 {
            return Err(invalid("replay_capacity", "is zero"));
        }
        let http = reqwest::Client::builder()
            .timeout(config.http_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ConfigError::Client)?;
        let max_status_age = i64::try_from(config.max_status_age.as_secs()).unwrap_or(i64::MAX);
        Ok(Verifier {
            inner: Arc::new(Inner {
                jwks: jwks::Jwks::new(
                    http.clone(),
                    format!("{broker_url}/oauth2/jwks"),
                    config.jwks_min_refresh,
                ),
                lists: lists::Lists::new(http, max_status_age.max(1)),
                replay: replay::ReplayCache::new(config.replay_capacity),
                issuer: config.issuer,
                issuer_base,
                audience: config.audience,
                broker_url,
                resource_url,
                leeway: i64::try_from(config.leeway.as_secs()).unwrap_or(0),
                clock: config
                    .clock
                    .unwrap_or_else(|| Arc::new(system_now) as Clock),
            }),
        })
    }

    /// A tower layer that verifies every request with this verifier.
    pub fn layer(&self) -> VerifyLayer {
        VerifyLayer::new(self.clone())
    }

    /// Fetches the JWKS now, so that the first request does not wait for it.
    pub async fn warm(&self) -> Result<(), Rejection> {
        self.inner.jwks.refresh().await.map_err(|_| {
            Rejection::unavailable(Scheme::Bearer, "the broker's keys cannot be fetched")
        })
    }

    pub fn now(&self) -> i64 {
        (self.inner.clock)()
    }

    /// The URL a DPoP proof's `htu` must name for a request to `path`, when
    /// [`Config::resource_url`] is set.
    pub fn resource_url(&self, path: &str) -> Option<String> {
        self.inner
            .resource_url
            .as_ref()
            .map(|base| format!("{base}{path}"))
    }

    /// Checks everything a request presents; scopes are the caller's (or the layer's).
    pub async fn verify(&self, req: &Presented<'_>) -> Result<Verified, Rejection> {
        let (scheme, token) = authorization(req.authorization)?;
        let now = self.now();
        let claims = self.token_claims(scheme, token, now).await?;
        let binding = self.binding(scheme, token, &claims, req, now)?;
        self.status(scheme, &claims, now).await?;
        Ok(Verified {
            subject: claims.sub,
            client_id: claims.client_id,
            scopes: claims
                .scope
                .split_ascii_whitespace()
                .map(str::to_string)
                .collect(),
            task_id: claims.txn,
            token_id: claims.jti,
            audience: claims.aud.to_vec(),
            expires_at: claims.exp,
            act: claims.act,
            cnf: claims.cnf,
            binding,
        })
    }

    /// The token's signature, `typ`, `iss`, `aud`, `exp` and `nbf`.
    async fn token_claims(
        &self,
        scheme: Scheme,
        token: &str,
        now: i64,
    ) -> Result<TaskClaims, Rejection> {
        let refuse = |why: &'static str| {
            tracing::info!(reason = why, "access token refused");
            Rejection::token(scheme, "the access token is not valid here")
        };
        let jwt = ParsedJwt::parse(token, MAX_TASK_TOKEN_BYTES)
            .map_err(|_| refuse("not a compact JWS of at most 8 KiB"))?;
        let typ = jwt.header.typ.as_deref().unwrap_or_default();
        if !typ.eq_ignore_ascii_case("at+jwt") && !typ.eq_ignore_ascii_case("application/at+jwt") {
            return Err(refuse("`typ` is not `at+jwt`"));
        }
        let kid = jwt
            .header
            .kid
            .as_deref()
            .ok_or_else(|| refuse("no `kid`"))?;
        let key = match self.inner.jwks.key(kid).await {
            Ok(Some(k)) => k,
            Ok(None) => return Err(refuse("`kid` is not in the broker's JWKS")),
            Err(e) => {
                tracing::warn!(error = %e, "the broker's JWKS cannot be fetched");
                return Err(Rejection::unavailable(
                    scheme,
                    "the broker's keys cannot be fetched",
                ));
            }
        };
        if key.alg != jwt.header.alg || !jwt.signature_valid(&key.key, key.alg) {
            return Err(refuse("the signature does not verify"));
        }
        let claims: TaskClaims = serde_json::from_value(Value::Object(jwt.claims))
            .map_err(|_| refuse("the claims are not a task token's"))?;
        if claims.iss != self.inner.issuer {
            return Err(refuse("`iss` is not the broker"));
        }
        if !claims
            .aud
            .to_vec()
            .iter()
            .any(|a| *a == self.inner.audience)
        {
            return Err(refuse("`aud` does not name this resource server"));
        }
        let leeway = self.inner.leeway;
        if claims.exp.saturating_add(leeway) <= now {
            return Err(Rejection::token(scheme, "the access token has expired"));
        }
        if claims.nbf.saturating_sub(leeway) > now {
            return Err(refuse("`nbf` is in the future"));
        }
        Ok(claims)
    }

    /// The token's `cnf` against what the request shows: the DPoP proof for `cnf.jkt`, the
    /// peer certificate for `cnf["x5t#S256"]`.
    fn binding(
        &self,
        scheme: Scheme,
        token: &str,
        claims: &TaskClaims,
        req: &Presented<'_>,
        now: i64,
    ) -> Result<Binding, Rejection> {
        let cnf = claims.cnf.as_ref();
        let jkt = cnf.and_then(|c| c.get("jkt"));
        let x5t = cnf.and_then(|c| c.get("x5t#S256"));
        if cnf.is_some() && jkt.is_none() && x5t.is_none() {
            tracing::info!("access token refused: `cnf` names no key this verifier knows");
            return Err(Rejection::token(
                scheme,
                "the access token is not valid here",
            ));
        }
        let mut binding = Binding::None;
        match (scheme, jkt) {
            (Scheme::Bearer, Some(_)) => {
                tracing::info!("access token refused: a DPoP-bound token presented as Bearer");
                return Err(Rejection::token(
                    Scheme::Dpop,
                    "the access token is DPoP-bound: present it with the DPoP scheme and a proof",
                ));
            }
            (Scheme::Dpop, None) => {
                tracing::info!("access token refused: the DPoP scheme with an unbound token");
                return Err(Rejection::token(
                    Scheme::Dpop,
                    "the access token is not DPoP-bound",
                ));
            }
            (Scheme::Dpop, Some(jkt)) => {
                let jkt = jkt.as_str().ok_or_else(|| {
                    Rejection::token(Scheme::Dpop, "the access token is not valid here")
                })?;
                binding = self.dpop(token, jkt, req, now)?;
            }
            (Scheme::Bearer, None) => {}
        }
        if let Some(x5t) = x5t {
            let want = x5t.as_str().unwrap_or_default();
            let got = req.peer_certificate.map(cert_thumbprint);
            if got.as_deref() != Some(want) || want.is_empty() {
                tracing::info!(
                    peer_certificate = req.peer_certificate.is_some(),
                    "access token refused: the mTLS-bound token's certificate is not the peer's"
                );
                return Err(Rejection::token(
                    scheme,
                    "the access token is bound to another client certificate",
                ));
            }
            if binding == Binding::None {
                binding = Binding::Mtls {
                    x5t_s256: want.to_string(),
                };
            }
        }
        Ok(binding)
    }

    /// The request's DPoP proof: exactly one, valid for this request and this token, signed
    /// by the `jkt` key, and not seen before.
    fn dpop(
        &self,
        token: &str,
        jkt: &str,
        req: &Presented<'_>,
        now: i64,
    ) -> Result<Binding, Rejection> {
        let proof = match req.dpop {
            [one] => *one,
            [] => {
                tracing::info!("DPoP proof refused: none with a DPoP-bound token");
                return Err(Rejection::proof("a DPoP proof is required"));
            }
            _ => {
                tracing::info!("DPoP proof refused: more than one DPoP header");
                return Err(Rejection::proof("exactly one DPoP proof is required"));
            }
        };
        let expect = Expect {
            htm: req.method,
            htu: req.url,
            now,
            access_token: Some(token),
            nonce: None,
        };
        let checked = dpop::check(proof, &expect).map_err(|e| {
            tracing::info!(reason = %e, "DPoP proof refused");
            Rejection::proof("the DPoP proof is not valid for this request")
        })?;
        if checked.jkt != jkt {
            tracing::info!("DPoP proof refused: signed by another key than the token's `cnf.jkt`");
            return Err(Rejection::proof(
                "the DPoP proof is not signed by the token's key",
            ));
        }
        match self.inner.replay.insert(checked.replay_key(), now) {
            replay::Outcome::Fresh => Ok(Binding::Dpop { jkt: checked.jkt }),
            replay::Outcome::Seen => {
                tracing::info!("DPoP proof refused: its `jti` was used before");
                Err(Rejection::proof("the DPoP proof was used before"))
            }
            replay::Outcome::Full => {
                tracing::warn!("DPoP replay cache is full: proofs are refused");
                Err(Rejection::unavailable(
                    Scheme::Dpop,
                    "too many DPoP proofs to remember now",
                ))
            }
        }
    }

    /// The token's bit in its status list: 0, or the token is refused.
    async fn status(&self, scheme: Scheme, claims: &TaskClaims, now: i64) -> Result<(), Rejection> {
        let refuse = |why: &'static str| {
            tracing::info!(reason = why, "access token refused");
            Rejection::token(scheme, "the access token is not valid here")
        };
        let Some(status) = &claims.status else {
            return Err(refuse(
                "no `status` claim: its revocation cannot be checked",
            ));
        };
        let uri = &status.status_list.uri;
        let Some(fetch_url) = self.list_url(uri) else {
            return Err(refuse("the status list is not the broker's"));
        };
        let list = match self
            .inner
            .lists
            .get(uri, &fetch_url, now, &self.inner.jwks, self.inner.leeway)
            .await
        {
            Ok(l) => l,
            Err(lists::ListError::Unknown) => {
                return Err(refuse("the broker does not know the status list"));
            }
            Err(lists::ListError::Invalid(why)) => {
                tracing::warn!(reason = why, uri = %uri, "status list refused");
                return Err(Rejection::unavailable(
                    scheme,
                    "the token's status cannot be checked now",
                ));
            }
            Err(lists::ListError::Unreachable(e)) => {
                tracing::warn!(error = %e, uri = %uri, "status list cannot be fetched");
                return Err(Rejection::unavailable(
                    scheme,
                    "the token's status cannot be checked now",
                ));
            }
        };
        match crate::token::status::status_at(&list.bytes, status.status_list.idx) {
            Some(0) => Ok(()),
            Some(_) => Err(Rejection::token(
                scheme,
                "the access token has been revoked",
            )),
            None => Err(refuse("the status index is past the end of its list")),
        }
    }

    /// Where to fetch the list `uri` names: under the broker's issuer only, mapped to
    /// [`Config::broker_url`].
    fn list_url(&self, uri: &str) -> Option<String> {
        let rest = uri.strip_prefix(&self.inner.issuer_base)?;
        let name = rest.strip_prefix("/oauth2/status/")?;
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        plain.then(|| format!("{}/oauth2/status/{name}", self.inner.broker_url))
    }
}

/// The one `Authorization` header: `Bearer <token>` or `DPoP <token>`.
fn authorization<'a>(values: &[&'a str]) -> Result<(Scheme, &'a str), Rejection> {
    let value = match values {
        [] => {
            return Err(Rejection::new(
                ErrorCode::Missing,
                Scheme::Bearer,
                "an access token is required",
            ));
        }
        [one] => *one,
        _ => {
            return Err(Rejection::new(
                ErrorCode::InvalidRequest,
                Scheme::Bearer,
                "more than one Authorization header",
            ));
        }
    };
    let malformed = || {
        Rejection::new(
            ErrorCode::InvalidRequest,
            Scheme::Bearer,
            "the Authorization header is not Bearer or DPoP with a token",
        )
    };
    let (name, token) = value.split_once(' ').ok_or_else(malformed)?;
    let scheme = if name.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if name.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return Err(malformed());
    };
    let token = token.trim_matches(' ');
    // RFC 6750 §2.1: b64token.
    let b64token = !token.is_empty()
        && token.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
        });
    if !b64token {
        return Err(Rejection::new(
            ErrorCode::InvalidRequest,
            scheme,
            "the Authorization header is not Bearer or DPoP with a token",
        ));
    }
    Ok((scheme, token))
}

/// `x5t#S256` of a DER certificate (RFC 8705 §3.1).
pub fn cert_thumbprint(der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

#[cfg(test)]
mod tests;
