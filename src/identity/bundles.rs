//! SPIFFE trust bundles (JWKS with `use` = `jwt-svid` / `x509-svid`, plus `spiffe_sequence`
//! and `spiffe_refresh_hint`), read from files and re-read when the files change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::x509::X509Authorities;

/// Largest bundle file read.
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

/// The JWT authorities of one trust domain, by `kid`.
#[derive(Clone, Default)]
pub struct JwtBundle {
    pub authorities: HashMap<String, JwtAuthority>,
    pub sequence: Option<u64>,
}

#[derive(Deserialize)]
struct RawBundle {
    keys: Vec<serde_json::Value>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
}

/// Parses the JWT part of a SPIFFE bundle. Keys for other uses (x509-svid) are skipped;
/// a `jwt-svid` key without `kid` or with a key type Writ cannot verify is an error, since a
/// silently dropped authority would be hard to diagnose.
pub fn parse_jwt_bundle(text: &[u8], name: &str) -> Result<JwtBundle, BundleError> {
    let perr = |reason: String| BundleError::Parse {
        path: name.to_string(),
        reason,
    };
    let raw: RawBundle = serde_json::from_slice(text).map_err(|e| perr(e.to_string()))?;
    let mut authorities = HashMap::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let use_ = value.get("use").and_then(|u| u.as_str()).unwrap_or("");
        if use_ != "jwt-svid" {
            continue;
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
    Ok(JwtBundle {
        authorities,
        sequence: raw.spiffe_sequence,
    })
}

/// A JWK `alg` a JWT-SVID key may carry: the OIDC set without EdDSA, which the JWT-SVID
/// spec does not allow.
fn key_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    super::oidc::key_alg(ka).filter(|a| *a != Algorithm::EdDSA)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
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

/// Both parts of a SPIFFE bundle: its JWT authorities and its X.509 authorities.
fn parse_bundle(text: &[u8], name: &str) -> Result<(JwtBundle, X509Authorities), BundleError> {
    let jwt = parse_jwt_bundle(text, name)?;
    let x509 = super::x509::parse_x509_authorities(text).map_err(|reason| BundleError::Parse {
        path: name.to_string(),
        reason,
    })?;
    Ok((jwt, x509))
}

/// A bundle backed by a file, swapped atomically when the file changes and still parses.
pub struct FileBundle {
    path: PathBuf,
    current: ArcSwap<JwtBundle>,
    x509: ArcSwap<X509Authorities>,
    stamp: parking_lot::Mutex<Option<FileStamp>>,
}

impl FileBundle {
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let st = stamp(path);
        let text = read_bounded(path)?;
        let (bundle, x509) = parse_bundle(&text, &path.display().to_string())?;
        Ok(FileBundle {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(bundle),
            x509: ArcSwap::from_pointee(x509),
            stamp: parking_lot::Mutex::new(st),
        })
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<JwtBundle>> {
        self.current.load()
    }

    /// The X.509 authorities (`x509-svid` keys) of the bundle.
    pub fn x509(&self) -> Arc<X509Authorities> {
        self.x509.load_full()
    }

    /// Re-reads the file when its size or modification time changed. A file that no longer
    /// parses keeps the previous bundle serving and reports the error once per change.
    pub fn reload_if_changed(&self) -> Result<bool, BundleError> {
        let now = stamp(&self.path);
        let mut last = self.stamp.lock();
        if *last == now {
            return Ok(false);
        }
        *last = now;
        drop(last);
        let text = read_bounded(&self.path)?;
        let (bundle, x509) = parse_bundle(&text, &self.path.display().to_string())?;
        self.current.store(Arc::new(bundle));
        self.x509.store(Arc::new(x509));
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    fn bundle_with(key: Value) -> Result<JwtBundle, BundleError> {
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
        // Keys for other uses (x509-svid) are skipped, not trusted for JWT-SVIDs.
        let x509 = bundle_with(with(jwk, json!({"use": "x509-svid"}))).unwrap();
        assert!(x509.authorities.is_empty());
    }
}
