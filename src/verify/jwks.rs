//! The broker's JWKS, fetched once and again for a `kid` it does not hold, at most every
//! `min_refresh` (so that tokens with made-up `kid`s cannot make the verifier hammer the
//! broker).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;
use serde_json::Value;

/// Largest JWKS read.
const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys kept from one JWKS.
const MAX_KEYS: usize = 32;

/// A verification key of the broker.
pub(super) struct Key {
    pub alg: Algorithm,
    pub key: DecodingKey,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    #[error("cannot fetch the JWKS")]
    Http(#[source] reqwest::Error),
    #[error("the JWKS answer is {0}")]
    Status(u16),
    #[error("the JWKS is larger than 64 KiB")]
    TooLarge,
    #[error("the JWKS is not a JSON object with `keys`")]
    Malformed,
    #[error("the last JWKS fetch failed, less than the refresh interval ago")]
    Recent,
}

struct State {
    keys: Arc<HashMap<String, Arc<Key>>>,
    fetched_at: Option<Instant>,
    /// The last fetch failed: a key the cache does not hold may be one the broker has.
    failed: bool,
}

pub(super) struct Jwks {
    http: reqwest::Client,
    url: String,
    min_refresh: Duration,
    state: RwLock<State>,
    /// One fetch at a time; the others wait for it and use what it got.
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    pub fn new(http: reqwest::Client, url: String, min_refresh: Duration) -> Self {
        Jwks {
            http,
            url,
            min_refresh,
            state: RwLock::new(State {
                keys: Arc::new(HashMap::new()),
                fetched_at: None,
                failed: false,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key `kid`: from the cache, or from a new fetch when the cache does not hold it
    /// and the last fetch is older than `min_refresh`. `Ok(None)`: the broker has no such key.
    pub async fn key(&self, kid: &str) -> Result<Option<Arc<Key>>, FetchError> {
        if let Some(k) = self.cached(kid) {
            return Ok(Some(k));
        }
        let _one = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(k) = self.cached(kid) {
            return Ok(Some(k));
        }
        let (recent, failed) = {
            let state = self.state.read();
            let recent = state
                .fetched_at
                .is_some_and(|t| t.elapsed() < self.min_refresh);
            (recent, state.failed)
        };
        if recent {
            // Not asked again so soon; without a good answer, the key cannot be called
            // unknown (503, not 401).
            return if failed {
                Err(FetchError::Recent)
            } else {
                Ok(None)
            };
        }
        self.fetch().await?;
        Ok(self.cached(kid))
    }

    /// Fetches the JWKS now.
    pub async fn refresh(&self) -> Result<(), FetchError> {
        let _one = self.fetching.lock().await;
        self.fetch().await
    }

    fn cached(&self, kid: &str) -> Option<Arc<Key>> {
        self.state.read().keys.get(kid).cloned()
    }

    async fn fetch(&self) -> Result<(), FetchError> {
        let result = self.download().await;
        let mut state = self.state.write();
        // A failed fetch counts too: the broker is not asked again before `min_refresh`,
        // and the keys already held stay.
        state.fetched_at = Some(Instant::now());
        state.failed = result.is_err();
        state.keys = Arc::new(result?);
        Ok(())
    }

    async fn download(&self) -> Result<HashMap<String, Arc<Key>>, FetchError> {
        let resp = self
            .http
            .get(&self.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(FetchError::Http)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let body = super::lists::read_bounded(resp, MAX_JWKS_BYTES)
            .await
            .map_err(|e| match e {
                super::lists::ReadError::Http(e) => FetchError::Http(e),
                super::lists::ReadError::TooLarge => FetchError::TooLarge,
            })?;
        let set: Value = serde_json::from_slice(&body).map_err(|_| FetchError::Malformed)?;
        let keys = set
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(FetchError::Malformed)?;
        let mut out = HashMap::new();
        for jwk in keys.iter().take(MAX_KEYS) {
            if let Some((kid, key)) = parse_key(jwk) {
                out.insert(kid, Arc::new(key));
            }
        }
        Ok(out)
    }
}

/// A signing key of the JWKS: its `kid` and the algorithm it signs with (the `alg` it names,
/// which must fit its type, or the one its type implies). Keys for other uses, symmetric keys
/// and keys this verifier cannot use are skipped.
fn parse_key(jwk: &Value) -> Option<(String, Key)> {
    let kid = jwk.get("kid")?.as_str()?.to_string();
    if jwk.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
        return None;
    }
    let kty = jwk.get("kty")?.as_str()?;
    let crv = jwk.get("crv").and_then(Value::as_str);
    let implied = match (kty, crv) {
        ("EC", Some("P-256")) => Algorithm::ES256,
        ("OKP", Some("Ed25519")) => Algorithm::EdDSA,
        ("RSA", _) => Algorithm::RS256,
        _ => return None,
    };
    let alg = match jwk.get("alg").and_then(Value::as_str) {
        None => implied,
        Some("ES256") if implied == Algorithm::ES256 => Algorithm::ES256,
        Some("EdDSA" | "Ed25519") if implied == Algorithm::EdDSA => Algorithm::EdDSA,
        Some("RS256") if implied == Algorithm::RS256 => Algorithm::RS256,
        Some("PS256") if implied == Algorithm::RS256 => Algorithm::PS256,
        Some(_) => return None,
    };
    let parsed: Jwk = serde_json::from_value(jwk.clone()).ok()?;
    let key = DecodingKey::from_jwk(&parsed).ok()?;
    Some((kid, Key { alg, key }))
}
