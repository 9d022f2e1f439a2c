//! SPIFFE trust bundles: the in-memory model of one trust domain's authorities (JWT keys by
//! `kid`, X.509 CA certificates), how bundles are parsed (SPIFFE bundle JWKS with `use` =
//! `jwt-svid` / `x509-svid`, plus `spiffe_sequence` and `spiffe_refresh_hint`; the Workload
//! API's JWT bundles), and the per-trust-domain holder that sources update and verifiers read.
//!
//! A trust domain whose source cannot be read (never loaded, down, stale) is *not ready*: its
//! credentials fail closed, and the other trust domains are not affected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::x509::X509Authorities;

/// Largest bundle read (file, endpoint response, Workload API entry).
pub const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("cannot read bundle `{path}`: {reason}")]
    Read { path: String, reason: String },
    #[error("bundle `{path}` is not a SPIFFE bundle: {reason}")]
    Parse { path: String, reason: String },
}

/// One JWT-SVID verification key.
#[derive(Clone)]
pub struct JwtAuthority {
    pub key: DecodingKey,
    /// The JWK's `alg`, when it names one: the token's header must then match it.
    pub alg: Option<Algorithm>,
}

/// The authorities of one trust domain: JWT keys by `kid` and X.509 CA certificates (DER),
/// the roots an X509-SVID of the trust domain must chain to.
#[derive(Clone, Default)]
pub struct TrustBundle {
    pub authorities: HashMap<String, JwtAuthority>,
    pub x509_authorities: Vec<Arc<[u8]>>,
    /// `x509_authorities` as trust anchors for X509-SVID verification (made when the bundle
    /// is installed, [`DomainBundle::set`]).
    pub x509_anchors: Arc<X509Authorities>,
    pub sequence: Option<u64>,
    /// The bundle's `spiffe_refresh_hint`, in seconds.
    pub refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct RawBundle {
    keys: Vec<serde_json::Value>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

/// How the keys of a JWKS are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// A SPIFFE bundle (files, bundle endpoints): `use` says `jwt-svid` or `x509-svid`; keys
    /// for other uses are skipped.
    SpiffeBundle,
    /// A Workload API JWT bundle: every key is a JWT authority (`use`, when present, must be
    /// `jwt-svid` or `sig`).
    JwtOnly,
}

/// Parses a SPIFFE bundle. A `jwt-svid` key without `kid` or with a key type Writ cannot
/// verify, or an `x509-svid` key without exactly one certificate, is an error: a silently
/// dropped authority would be hard to diagnose.
pub fn parse_bundle(text: &[u8], name: &str, uses: KeyUse) -> Result<TrustBundle, BundleError> {
    let perr = |reason: String| BundleError::Parse {
        path: name.to_string(),
        reason,
    };
    let raw: RawBundle = serde_json::from_slice(text).map_err(|e| perr(e.to_string()))?;
    let mut authorities = HashMap::new();
    let mut x509_authorities = Vec::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let use_ = value.get("use").and_then(|u| u.as_str());
        match (uses, use_) {
            (KeyUse::SpiffeBundle, Some("x509-svid")) => {
                x509_authorities
                    .push(x509_authority(&value).map_err(|e| perr(format!("keys[{i}]: {e}")))?);
                continue;
            }
            (KeyUse::SpiffeBundle, Some("jwt-svid"))
            | (KeyUse::JwtOnly, None | Some("jwt-svid" | "sig")) => {}
            (KeyUse::SpiffeBundle, _) => continue,
            (KeyUse::JwtOnly, Some(other)) => {
                return Err(perr(format!(
                    "keys[{i}]: `use` is `{other}` in a JWT bundle"
                )));
            }
        }
        let jwk: Jwk =
            serde_json::from_value(value).map_err(|e| perr(format!("keys[{i}]: {e}")))?;
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| perr(format!("keys[{i}]: a jwt-svid key needs a `kid`")))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| perr(format!("keys[{i}]: {e}")))?;
        if matches!(key.family(), jsonwebtoken::AlgorithmFamily::Hmac) {
            return Err(perr(format!("keys[{i}]: symmetric keys are not allowed")));
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(ka) => {
                Some(key_alg(ka).ok_or_else(|| perr(format!("keys[{i}]: unsupported `alg`")))?)
            }
        };
        authorities.insert(kid, JwtAuthority { key, alg });
    }
    // What X509-SVID verification will trust must be usable as a trust anchor.
    X509Authorities::from_der(x509_authorities.iter().map(|c| &c[..])).map_err(|e| {
        perr(format!(
            "an x509-svid certificate is not a trust anchor: {e}"
        ))
    })?;
    Ok(TrustBundle {
        authorities,
        x509_authorities,
        x509_anchors: Arc::default(),
        sequence: raw.spiffe_sequence,
        refresh_hint: raw.spiffe_refresh_hint,
    })
}

/// The certificate of an `x509-svid` key: `x5c` holds exactly one, a parseable X.509
/// certificate (SPIFFE Trust Domain and Bundle §4.2.2).
fn x509_authority(value: &serde_json::Value) -> Result<Arc<[u8]>, String> {
    let x5c = value
        .get("x5c")
        .and_then(|v| v.as_array())
        .ok_or("an x509-svid key needs `x5c`")?;
    let [cert] = x5c.as_slice() else {
        return Err("an x509-svid key's `x5c` holds exactly one certificate".into());
    };
    let der = cert
        .as_str()
        .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
        .ok_or("`x5c[0]` is not base64")?;
    x509_certificate(der)
}

/// A DER certificate, checked to parse as X.509.
pub fn x509_certificate(der: Vec<u8>) -> Result<Arc<[u8]>, String> {
    spiffe::cert::Certificate::try_from(der.as_slice())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(der.into())
}

/// Parses the JWT part of a SPIFFE bundle (the bundle-file form).
pub fn parse_jwt_bundle(text: &[u8], name: &str) -> Result<TrustBundle, BundleError> {
    parse_bundle(text, name, KeyUse::SpiffeBundle)
}

/// A JWT-SVID key `alg`: the OIDC set without EdDSA, which the JWT-SVID spec does not allow.
fn key_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    super::oidc::key_alg(ka).filter(|a| *a != Algorithm::EdDSA)
}

/// What tells a file changed without reading it: its mtime and length (bundle files here,
/// the listener's certificate and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

pub(crate) fn stamp(path: &Path) -> Option<FileStamp> {
    let md = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: md.modified().ok(),
        len: md.len(),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, BundleError> {
    let rerr = |reason: String| BundleError::Read {
        path: path.display().to_string(),
        reason,
    };
    let md = std::fs::metadata(path).map_err(|e| rerr(e.to_string()))?;
    if md.len() > MAX_BUNDLE_BYTES {
        return Err(rerr(format!("larger than {MAX_BUNDLE_BYTES} bytes")));
    }
    std::fs::read(path).map_err(|e| rerr(e.to_string()))
}

/// Where a trust domain's bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    File(PathBuf),
    Endpoint(String),
    WorkloadApi(String),
}

impl SourceKind {
    pub fn describe(&self) -> String {
        match self {
            SourceKind::File(p) => format!("bundle_file {}", p.display()),
            SourceKind::Endpoint(u) => format!("bundle_endpoint {u}"),
            SourceKind::WorkloadApi(u) => format!("workload_api {u}"),
        }
    }
}

#[derive(Default)]
struct Health {
    /// Why the trust domain cannot be used; `None` while it can.
    problem: Option<String>,
    /// The last time the source gave a bundle.
    last_ok: Option<Instant>,
    /// What went wrong at the last attempt, while a bundle still serves.
    last_error: Option<String>,
    file_stamp: Option<FileStamp>,
}

/// Bumped whenever a trust domain's bundle or readiness changes: cached verification results
/// must then be dropped.
pub type Changes = tokio::sync::watch::Sender<u64>;

/// One trust domain's bundle as its source last gave it, and whether it may be used.
pub struct DomainBundle {
    name: String,
    source: SourceKind,
    current: ArcSwapOption<TrustBundle>,
    health: parking_lot::Mutex<Health>,
    /// A bundle older than this (since its last successful read) is not used.
    max_age: Option<Duration>,
    changes: Arc<Changes>,
}

impl DomainBundle {
    /// A trust domain whose source has not given a bundle yet: not ready until it does.
    pub fn pending(
        name: &str,
        source: SourceKind,
        max_age: Option<Duration>,
        changes: Arc<Changes>,
    ) -> Self {
        DomainBundle {
            name: name.to_string(),
            source,
            current: ArcSwapOption::empty(),
            health: parking_lot::Mutex::new(Health {
                problem: Some("no bundle loaded yet".into()),
                ..Health::default()
            }),
            max_age,
            changes,
        }
    }

    /// A trust domain read from a bundle file, loaded now (an unreadable file is an error).
    pub fn from_file(name: &str, path: &Path, changes: Arc<Changes>) -> Result<Self, BundleError> {
        let st = stamp(path);
        let text = read_bounded(path)?;
        let bundle = parse_bundle(&text, &path.display().to_string(), KeyUse::SpiffeBundle)?;
        let d = DomainBundle::pending(name, SourceKind::File(path.to_path_buf()), None, changes);
        d.health.lock().file_stamp = st;
        d.set(bundle);
        Ok(d)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &SourceKind {
        &self.source
    }

    /// The bundle to verify with, or why there is none to use (the trust domain then fails
    /// closed).
    pub fn current(&self) -> Result<Arc<TrustBundle>, String> {
        self.status()?;
        self.current
            .load_full()
            .ok_or_else(|| "no bundle loaded yet".to_string())
    }

    /// `Ok` while the trust domain may be used; otherwise why not.
    pub fn status(&self) -> Result<(), String> {
        let h = self.health.lock();
        if let Some(p) = &h.problem {
            return Err(p.clone());
        }
        if let (Some(max), Some(at)) = (self.max_age, h.last_ok) {
            let age = at.elapsed();
            if age > max {
                return Err(format!(
                    "stale: the bundle was last refreshed {}s ago (max_bundle_age {})",
                    age.as_secs(),
                    humantime::format_duration(max)
                ));
            }
        }
        Ok(())
    }

    /// The last failed attempt, while a bundle still serves (for `/readyz`).
    pub fn last_error(&self) -> Option<String> {
        self.health.lock().last_error.clone()
    }

    /// When the bundle goes stale, if it can (`None`: never, or already not ready).
    pub fn stale_in(&self) -> Option<Duration> {
        let h = self.health.lock();
        let (max, at) = (self.max_age?, h.last_ok?);
        Some(max.saturating_sub(at.elapsed()))
    }

    /// A fresh bundle from the source: used from now on.
    pub fn set(&self, mut bundle: TrustBundle) {
        bundle.x509_anchors = match X509Authorities::from_der(
            bundle.x509_authorities.iter().map(|c| &c[..]),
        ) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                // Fail closed for X509-SVIDs: none verifies against an unusable authority.
                tracing::error!(trust_domain = %self.name, error = %e, "X.509 authorities are not usable trust anchors");
                Arc::default()
            }
        };
        self.current.store(Some(Arc::new(bundle)));
        {
            let mut h = self.health.lock();
            h.problem = None;
            h.last_error = None;
            h.last_ok = Some(Instant::now());
        }
        self.changed();
    }

    /// The source could not be read, and what it gave before may no longer be used: the
    /// trust domain fails closed until the next [`set`](Self::set).
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let was_ready = {
            let mut h = self.health.lock();
            let was = h.problem.is_none();
            h.problem = Some(reason.clone());
            h.last_error = Some(reason);
            was
        };
        if was_ready {
            self.changed();
        }
    }

    /// A read failed, but the bundle already held may still be used (until it is stale).
    /// A trust domain that never loaded stays not ready, with this reason.
    pub fn note_error(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let mut h = self.health.lock();
        if h.last_ok.is_none() {
            h.problem = Some(format!("no bundle loaded yet: {reason}"));
        }
        h.last_error = Some(reason);
    }

    /// Marks the trust domain not ready once its bundle is past `max_age`, so that cached
    /// results are dropped at that moment, not at the next request.
    pub fn expire_if_stale(&self) {
        if let Err(reason) = self.status() {
            let newly = {
                let mut h = self.health.lock();
                let newly = h.problem.is_none();
                h.problem = Some(reason);
                newly
            };
            if newly {
                self.changed();
            }
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// For a file source: re-reads the file when its size or modification time changed. A
    /// file that no longer parses keeps the previous bundle serving and reports the error
    /// once per change.
    pub fn reload_if_changed(&self) -> Result<bool, BundleError> {
        let SourceKind::File(path) = &self.source else {
            return Ok(false);
        };
        let now = stamp(path);
        {
            let mut h = self.health.lock();
            if h.file_stamp == now {
                return Ok(false);
            }
            h.file_stamp = now;
        }
        let text = read_bounded(path)?;
        let bundle = parse_bundle(&text, &path.display().to_string(), KeyUse::SpiffeBundle)?;
        self.set(bundle);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::token::keys::{self, KeyAlg, SigningKey};

    fn ec_jwk() -> Value {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        keys::generate_file(KeyAlg::Es256, &path).unwrap();
        SigningKey::load(&path).unwrap().jwk().clone()
    }

    fn bundle_with(key: Value) -> Result<TrustBundle, BundleError> {
        parse_jwt_bundle(
            &serde_json::to_vec(&json!({"keys": [key]})).unwrap(),
            "b.json",
        )
    }

    fn with(mut jwk: Value, extra: Value) -> Value {
        for (k, v) in extra.as_object().unwrap() {
            jwk[k] = v.clone();
        }
        jwk
    }

    #[test]
    fn key_algorithms_of_a_jwt_svid_bundle() {
        let jwk = ec_jwk();
        let ok = bundle_with(with(
            jwk.clone(),
            json!({"use": "jwt-svid", "alg": "ES256"}),
        ))
        .unwrap();
        assert_eq!(ok.authorities.len(), 1);
        assert!(
            ok.authorities
                .values()
                .all(|a| a.alg == Some(Algorithm::ES256))
        );
        // EdDSA is an OIDC algorithm but not a JWT-SVID one.
        let err = bundle_with(with(
            jwk.clone(),
            json!({"use": "jwt-svid", "alg": "EdDSA"}),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("keys[0]: unsupported `alg`"), "{err}");
        // A symmetric key is refused whatever it claims.
        let oct = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "s", "use": "jwt-svid"});
        let err = bundle_with(oct).err().unwrap().to_string();
        assert!(err.contains("symmetric keys are not allowed"), "{err}");
        // An x509-svid key is an X.509 authority, never trusted for JWT-SVIDs.
        let x509 =
            bundle_with(with(jwk.clone(), json!({"use": "x509-svid", "x5c": [CA]}))).unwrap();
        assert!(x509.authorities.is_empty());
        assert_eq!(x509.x509_authorities.len(), 1);
        // Keys for other uses are skipped.
        let other = bundle_with(with(jwk, json!({"use": "sig"}))).unwrap();
        assert!(other.authorities.is_empty() && other.x509_authorities.is_empty());
    }

    /// A CA certificate (DER, base64) for `spiffe://example.org`.
    const CA: &str = "MIIBoTCCAUegAwIBAgIUEM7K/Io1L1zgrPZDwQul0IePuRUwCgYIKoZIzj0EAwIwHjEcMBoGA1UEAwwTZXhhbXBsZS5vcmcgdGVzdCBDQTAeFw0yNjEyMDIxNjQxNDZaFw0yNzAxMDExNjQ2NDZaMB4xHDAaBgNVBAMME2V4YW1wbGUub3JnIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASsmOj2ep1MmSi8yDjjBW4AQPmphTzk+wFjcmInRB+tghl8H5IAQrFvPf2JXWW+0qTKCZd59fjd5QUbBoSA7v04o2MwYTAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAfBgNVHREEGDAWhhRzcGlmZmU6Ly9leGFtcGxlLm9yZzAdBgNVHQ4EFgQURavKtJ8blMhH756pH9MPu8460+4wCgYIKoZIzj0EAwIDSAAwRQIhAKungvnZq44tr8Hh203QNxZ33GlpqDUHD/eiVVC5GM/6AiAQ+mrsfmYiOW6VgyY2/9Loy804/5BCY293ycMPa4ejUg==";

    #[test]
    fn x509_svid_keys_carry_exactly_one_certificate() {
        let jwk = with(ec_jwk(), json!({"use": "x509-svid"}));
        for (x5c, why) in [
            (None, "an x509-svid key needs `x5c`"),
            (Some(json!([])), "exactly one certificate"),
            (Some(json!([CA, CA])), "exactly one certificate"),
            (Some(json!(["%%"])), "`x5c[0]` is not base64"),
            (Some(json!(["AAAA"])), "not an X.509 certificate"),
        ] {
            let mut key = jwk.clone();
            if let Some(x) = x5c {
                key["x5c"] = x;
            }
            let err = bundle_with(key).err().unwrap().to_string();
            assert!(err.contains("keys[0]") && err.contains(why), "{err}");
        }
    }

    #[test]
    fn a_workload_api_jwt_bundle_trusts_keys_without_use() {
        let mut jwk = ec_jwk();
        jwk.as_object_mut().unwrap().remove("use");
        let text = serde_json::to_vec(&json!({"keys": [jwk.clone()]})).unwrap();
        // In a SPIFFE bundle a key without `use` is not an authority ...
        let b = parse_bundle(&text, "b", KeyUse::SpiffeBundle).unwrap();
        assert!(b.authorities.is_empty());
        // ... in a Workload API JWT bundle every key is a JWT authority.
        let b = parse_bundle(&text, "b", KeyUse::JwtOnly).unwrap();
        assert_eq!(b.authorities.len(), 1);
        let x509 = with(jwk, json!({"use": "x509-svid"}));
        let text = serde_json::to_vec(&json!({"keys": [x509]})).unwrap();
        let err = parse_bundle(&text, "b", KeyUse::JwtOnly)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`use` is `x509-svid` in a JWT bundle"),
            "{err}"
        );
    }

    #[test]
    fn a_domain_fails_closed_until_loaded_and_when_its_source_fails() {
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        let d = DomainBundle::pending(
            "td",
            SourceKind::WorkloadApi("unix:///x".into()),
            None,
            Arc::new(tx),
        );
        assert_eq!(d.current().err().unwrap(), "no bundle loaded yet");
        d.note_error("connection refused");
        assert!(d.current().err().unwrap().contains("connection refused"));
        assert!(!rx.has_changed().unwrap());
        d.set(TrustBundle::default());
        assert!(d.current().is_ok());
        assert!(rx.has_changed().unwrap(), "a new bundle is a change");
        rx.mark_unchanged();
        d.fail("agent gone");
        assert_eq!(d.current().err().unwrap(), "agent gone");
        assert!(rx.has_changed().unwrap(), "failing closed is a change");
        rx.mark_unchanged();
        d.fail("still gone");
        assert!(!rx.has_changed().unwrap(), "once per transition");
        d.set(TrustBundle::default());
        assert!(d.current().is_ok());
    }

    #[test]
    fn a_bundle_past_its_max_age_is_not_used() {
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        let d = DomainBundle::pending(
            "td",
            SourceKind::Endpoint("https://x".into()),
            Some(Duration::from_millis(50)),
            Arc::new(tx),
        );
        d.set(TrustBundle::default());
        rx.mark_unchanged();
        // A failed refresh keeps the bundle serving while it is young enough.
        d.note_error("timeout");
        assert!(d.current().is_ok());
        assert_eq!(d.last_error().as_deref(), Some("timeout"));
        std::thread::sleep(Duration::from_millis(80));
        let err = d.current().err().unwrap();
        assert!(err.starts_with("stale: "), "{err}");
        d.expire_if_stale();
        assert!(rx.has_changed().unwrap(), "going stale is a change");
        d.set(TrustBundle::default());
        assert!(d.current().is_ok());
    }
}
