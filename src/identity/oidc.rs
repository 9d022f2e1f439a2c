//! OIDC ID token verification: an issuer allow-list, discovery or a configured `jwks_uri`,
//! and a JWKS cache refreshed on an unknown `kid` (rate-limited) and when it grows old.
//! Every outbound call has a timeout and a response-size cap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::token::jwt::{JwtFormatError, ParsedJwt};

/// Algorithms an OIDC ID token may use. Never `none` or HMAC.
pub const OIDC_ALGS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Largest ID token accepted.
pub const MAX_ID_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct OidcIssuerConfig {
    pub issuer: String,
    pub audience: String,
    pub allowed_extra_audiences: Vec<String>,
    pub jwks_uri: Option<String>,
}

#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// Timeout of each discovery or JWKS request.
    pub http_timeout: Duration,
    /// Largest discovery document or JWKS read.
    pub max_response_bytes: usize,
    /// An unknown `kid` refetches an issuer's JWKS at most this often.
    pub min_refresh_interval: Duration,
    /// A JWKS older than this is refetched on the next verification.
    pub max_age: Duration,
    /// A JWKS older than this is no longer used when a refetch fails.
    pub hard_max_age: Duration,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub max_skew: Duration,
    /// Allow `http://` for loopback hosts in the configured issuer and `jwks_uri` (local
    /// issuers, tests); otherwise https only. A `jwks_uri` found by discovery follows its
    /// own, stricter rule (see `targets`).
    pub allow_http_loopback: bool,
}

impl Default for OidcOptions {
    fn default() -> Self {
        OidcOptions {
            http_timeout: Duration::from_secs(5),
            max_response_bytes: 256 * 1024,
            min_refresh_interval: Duration::from_secs(10),
            max_age: Duration::from_secs(3600),
            hard_max_age: Duration::from_secs(24 * 3600),
            max_skew: Duration::from_secs(60),
            allow_http_loopback: true,
        }
    }
}

/// A verified ID token.
#[derive(Debug, Clone)]
pub struct OidcIdentity {
    pub issuer: String,
    pub sub: String,
    /// `<issuer>#<sub>`.
    pub subject: String,
    pub audience: Vec<String>,
    pub exp: i64,
    /// Every claim, for policy.
    pub claims: Map<String, Value>,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("token is larger than {MAX_ID_TOKEN_BYTES} bytes")]
    TooLargeToken,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token issuer is not configured")]
    UnknownIssuer,
    #[error("token algorithm is not allowed")]
    UnsupportedAlg,
    #[error("token header has no `kid`")]
    MissingKid,
    #[error("token `kid` is not in the issuer's JWKS")]
    UnknownKid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token was issued in the future")]
    IssuedInFuture,
    #[error("token audience does not include the configured audience")]
    WrongAudience,
    #[error("token audience includes an audience that is not trusted")]
    UntrustedAudience,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    #[error("discovery failed: {0}")]
    Discovery(String),
    #[error("JWKS fetch failed: {0}")]
    Jwks(String),
    #[error("response from `{0}` is larger than the limit")]
    TooLarge(String),
    #[error("request to `{0}` timed out")]
    Timeout(String),
    #[error("invalid issuer configuration: {0}")]
    Config(String),
}

impl OidcError {
    /// True when the failure is the issuer's or the broker's infrastructure rather than the
    /// token (the exchange answers 503 and nothing is counted against the caller).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            OidcError::Discovery(_)
                | OidcError::Jwks(_)
                | OidcError::TooLarge(_)
                | OidcError::Timeout(_)
        )
    }
}

impl From<JwtFormatError> for OidcError {
    fn from(e: JwtFormatError) -> Self {
        match e {
            JwtFormatError::TooLarge => OidcError::TooLargeToken,
            JwtFormatError::Malformed | JwtFormatError::Critical => OidcError::Malformed,
        }
    }
}

#[derive(Clone)]
struct CachedKey {
    key: DecodingKey,
    alg: Option<Algorithm>,
}

struct KeyCache {
    keys: HashMap<String, CachedKey>,
    fetched_at: Instant,
}

struct IssuerState {
    cfg: OidcIssuerConfig,
    cache: RwLock<Option<Arc<KeyCache>>>,
    /// Serialises refetches: concurrent callers with the same unknown kid share one.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    jwks_uri: RwLock<Option<String>>,
}

pub struct OidcVerifier {
    issuers: HashMap<String, IssuerState>,
    /// For configured URLs (discovery at the issuer, a configured `jwks_uri`).
    http: reqwest::Client,
    /// For a `jwks_uri` found by discovery: resolves host names to public addresses only.
    discovered_http: reqwest::Client,
    /// The same, for an issuer on loopback, whose keys may be on loopback too.
    discovered_http_loopback: reqwest::Client,
    opts: OidcOptions,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl OidcVerifier {
    pub fn new(issuers: Vec<OidcIssuerConfig>, opts: OidcOptions) -> Result<Self, OidcError> {
        let client = |resolver: Option<targets::PublicOnly>| {
            let mut b = reqwest::Client::builder()
                .timeout(opts.http_timeout)
                .connect_timeout(opts.http_timeout)
                .redirect(reqwest::redirect::Policy::none());
            if let Some(r) = resolver {
                b = b.dns_resolver(Arc::new(r));
            }
            b.build().map_err(|e| OidcError::Config(e.to_string()))
        };
        let http = client(None)?;
        let discovered_http = client(Some(targets::PublicOnly {
            allow_loopback: false,
        }))?;
        let discovered_http_loopback = client(Some(targets::PublicOnly {
            allow_loopback: true,
        }))?;
        let mut map = HashMap::new();
        for cfg in issuers {
            if let Some(u) = &cfg.jwks_uri {
                check_url(u, opts.allow_http_loopback).map_err(OidcError::Config)?;
            }
            check_url(&cfg.issuer, opts.allow_http_loopback).map_err(OidcError::Config)?;
            map.insert(
                cfg.issuer.clone(),
                IssuerState {
                    jwks_uri: RwLock::new(cfg.jwks_uri.clone()),
                    cfg,
                    cache: RwLock::new(None),
                    refresh: tokio::sync::Mutex::new(None),
                },
            );
        }
        Ok(OidcVerifier {
            issuers: map,
            http,
            discovered_http,
            discovered_http_loopback,
            opts,
        })
    }

    pub fn knows_issuer(&self, iss: &str) -> bool {
        self.issuers.contains_key(iss)
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Fetches every issuer's keys once (start-up warm-up; failures are not fatal).
    pub async fn prefetch(&self) -> Vec<(String, Result<(), OidcError>)> {
        let mut out = Vec::new();
        for (iss, state) in &self.issuers {
            let r = self.refresh(state, None).await.map(|_| ());
            out.push((iss.clone(), r));
        }
        out
    }

    /// Verifies an ID token at `now` (unix seconds).
    pub async fn verify(&self, token: &str, now: i64) -> Result<OidcIdentity, OidcError> {
        let jwt = ParsedJwt::parse(token, MAX_ID_TOKEN_BYTES)?;
        self.verify_parsed(&jwt, now).await
    }

    pub async fn verify_parsed(
        &self,
        jwt: &ParsedJwt<'_>,
        now: i64,
    ) -> Result<OidcIdentity, OidcError> {
        let iss = jwt.str_claim("iss").ok_or(OidcError::MissingClaim("iss"))?;
        let state = self.issuers.get(iss).ok_or(OidcError::UnknownIssuer)?;
        let alg = jwt.header.alg;
        if !OIDC_ALGS.contains(&alg) {
            return Err(OidcError::UnsupportedAlg);
        }
        let kid = jwt
            .header
            .kid
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or(OidcError::MissingKid)?;
        let key = self.key_for(state, kid).await?;
        if key.alg.is_some_and(|a| a != alg) || key.key.family() != alg.family() {
            return Err(OidcError::UnsupportedAlg);
        }
        if !jwt.signature_valid(&key.key, alg) {
            return Err(OidcError::BadSignature);
        }
        if !jwt.audience_contains(&state.cfg.audience) {
            return Err(OidcError::WrongAudience);
        }
        if untrusted_audience(jwt, &state.cfg) {
            return Err(OidcError::UntrustedAudience);
        }
        let skew = crate::domain::duration_secs(self.opts.max_skew);
        let exp = jwt.int_claim("exp").ok_or(OidcError::MissingClaim("exp"))?;
        if now > exp.saturating_add(skew) {
            return Err(OidcError::Expired);
        }
        if jwt
            .int_claim("nbf")
            .is_some_and(|nbf| nbf > now.saturating_add(skew))
        {
            return Err(OidcError::NotYetValid);
        }
        // OIDC Core §2: `iat` is required in an ID token.
        let iat = jwt.int_claim("iat").ok_or(OidcError::MissingClaim("iat"))?;
        if iat > now.saturating_add(skew) {
            return Err(OidcError::IssuedInFuture);
        }
        let sub = jwt
            .str_claim("sub")
            .filter(|s| !s.is_empty())
            .ok_or(OidcError::MissingClaim("sub"))?
            .to_string();
        let audience = match jwt.claims.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        Ok(OidcIdentity {
            subject: format!("{iss}#{sub}"),
            issuer: iss.to_string(),
            sub,
            audience,
            exp,
            claims: jwt.claims.clone(),
        })
    }

    async fn key_for(&self, state: &IssuerState, kid: &str) -> Result<CachedKey, OidcError> {
        let cached = state.cache.read().clone();
        if let Some(cache) = &cached {
            let age = cache.fetched_at.elapsed();
            if age < self.opts.max_age
                && let Some(k) = cache.keys.get(kid)
            {
                return Ok(k.clone());
            }
        }
        // Unknown kid, or keys too old: refetch (rate-limited), then look again.
        match self.refresh(state, Some(kid)).await {
            Ok(cache) => cache.keys.get(kid).cloned().ok_or(OidcError::UnknownKid),
            Err(e) => {
                // The issuer is unreachable: keys that are old but not too old still serve.
                if let Some(cache) = cached
                    && cache.fetched_at.elapsed() < self.opts.hard_max_age
                {
                    if let Some(k) = cache.keys.get(kid) {
                        return Ok(k.clone());
                    }
                    if !e.is_unavailable() {
                        return Err(OidcError::UnknownKid);
                    }
                }
                Err(e)
            }
        }
    }

    /// Refetches the issuer's JWKS, at most once per `min_refresh_interval` (a caller that
    /// finds a refetch too recent gets the current cache). `wanted` skips the fetch when a
    /// concurrent caller has already brought that kid in.
    async fn refresh(
        &self,
        state: &IssuerState,
        wanted: Option<&str>,
    ) -> Result<Arc<KeyCache>, OidcError> {
        let mut last = state.refresh.lock().await;
        let current = state.cache.read().clone();
        if let (Some(cache), Some(kid)) = (&current, wanted)
            && cache.keys.contains_key(kid)
            && cache.fetched_at.elapsed() < self.opts.max_age
        {
            return Ok(cache.clone());
        }
        if let Some(at) = *last
            && at.elapsed() < self.opts.min_refresh_interval
        {
            return current.ok_or_else(|| {
                OidcError::Jwks("the issuer's keys could not be fetched; retrying shortly".into())
            });
        }
        *last = Some(Instant::now());
        let uri = self.jwks_uri(state).await?;
        let client = if state.cfg.jwks_uri.is_some() {
            &self.http
        } else if targets::issuer_is_loopback(&state.cfg.issuer) {
            &self.discovered_http_loopback
        } else {
            &self.discovered_http
        };
        let body = self.get_json(client, &uri).await.map_err(|e| match e {
            OidcError::Discovery(m) => OidcError::Jwks(m),
            other => other,
        })?;
        let set: JwkSet = serde_json::from_value(body)
            .map_err(|e| OidcError::Jwks(format!("`{uri}` is not a JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            if let Some((kid, key)) = usable_key(jwk) {
                keys.insert(kid, key);
            }
        }
        let cache = Arc::new(KeyCache {
            keys,
            fetched_at: Instant::now(),
        });
        *state.cache.write() = Some(cache.clone());
        Ok(cache)
    }

    async fn jwks_uri(&self, state: &IssuerState) -> Result<String, OidcError> {
        if let Some(u) = state.jwks_uri.read().clone() {
            return Ok(u);
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            state.cfg.issuer.trim_end_matches('/')
        );
        let doc: Discovery = serde_json::from_value(self.get_json(&self.http, &url).await?)
            .map_err(|e| OidcError::Discovery(format!("`{url}`: {e}")))?;
        // OpenID Connect Discovery §4.3: the document's issuer must be exactly ours.
        if doc.issuer != state.cfg.issuer {
            return Err(OidcError::Discovery(format!(
                "`{url}` names issuer `{}`, not `{}`",
                doc.issuer, state.cfg.issuer
            )));
        }
        // The document is the issuer's word, not the operator's: it may not send the broker
        // to loopback (unless the issuer is there), private or link-local addresses.
        targets::check_discovered_jwks_uri(&doc.jwks_uri, &state.cfg.issuer)
            .map_err(OidcError::Discovery)?;
        *state.jwks_uri.write() = Some(doc.jwks_uri.clone());
        Ok(doc.jwks_uri)
    }

    /// GET with the timeout and the size cap enforced while reading.
    async fn get_json(&self, http: &reqwest::Client, url: &str) -> Result<Value, OidcError> {
        let fail = |e: reqwest::Error| {
            if e.is_timeout() {
                OidcError::Timeout(url.to_string())
            } else {
                OidcError::Discovery(format!("`{url}`: {e}"))
            }
        };
        let mut resp = http.get(url).send().await.map_err(fail)?;
        if !resp.status().is_success() {
            return Err(OidcError::Discovery(format!(
                "`{url}` answered {}",
                resp.status()
            )));
        }
        if resp
            .content_length()
            .is_some_and(|l| usize::try_from(l).map_or(true, |l| l > self.opts.max_response_bytes))
        {
            return Err(OidcError::TooLarge(url.to_string()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(fail)? {
            if body.len() + chunk.len() > self.opts.max_response_bytes {
                return Err(OidcError::TooLarge(url.to_string()));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body)
            .map_err(|e| OidcError::Discovery(format!("`{url}` is not JSON: {e}")))
    }
}

/// A JWK that can verify signatures: has a `kid`, is not for encryption, is not symmetric.
fn usable_key(jwk: &Jwk) -> Option<(String, CachedKey)> {
    use jsonwebtoken::jwk::PublicKeyUse;
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty())?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    if matches!(key.family(), jsonwebtoken::AlgorithmFamily::Hmac) {
        return None;
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => Some(key_alg(ka)?),
    };
    Some((kid, CachedKey { key, alg }))
}

/// The signature algorithm a JWK's `alg` names, among those Writ verifies (none of HS*).
pub(crate) fn key_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// A configured URL: https, or http to a loopback host when allowed.
fn check_url(u: &str, allow_http_loopback: bool) -> Result<(), String> {
    let url = url::Url::parse(u).map_err(|_| format!("`{u}` is not a URL"))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback && allow_http_loopback => Ok(()),
        _ => Err(format!("`{u}` must use https")),
    }
}

mod targets;

#[cfg(test)]
mod tests;

/// OIDC Core §3.1.3.7 item 3: an ID token whose `aud` names an audience other than ours and
/// the configured extras is refused.
fn untrusted_audience(jwt: &ParsedJwt<'_>, cfg: &OidcIssuerConfig) -> bool {
    let trusted = |a: &str| a == cfg.audience || cfg.allowed_extra_audiences.iter().any(|x| x == a);
    match jwt.claims.get("aud") {
        Some(Value::String(s)) => !trusted(s),
        Some(Value::Array(list)) => list.iter().any(|v| v.as_str().is_none_or(|a| !trusted(a))),
        _ => true,
    }
}
