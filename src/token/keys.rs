//! Writ's own signing keys: PKCS#8 PEM files, the first of which signs and all of which are
//! published in the JWKS so that tokens keep verifying through a rotation.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::crypto::{self, ParsedKey};

/// Signing algorithms Writ issues tokens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlg {
    #[value(name = "ES256")]
    Es256,
    #[value(name = "Ed25519")]
    Ed25519,
    #[value(name = "RS256")]
    Rs256,
}

impl KeyAlg {
    pub fn jwt_alg(self) -> Algorithm {
        match self {
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::Ed25519 => Algorithm::EdDSA,
            KeyAlg::Rs256 => Algorithm::RS256,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::Es256 => "ES256",
            KeyAlg::Ed25519 => "EdDSA",
            KeyAlg::Rs256 => "RS256",
        }
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file `{path}`")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file `{0}` is not a PEM `PRIVATE KEY` (PKCS#8)")]
    NotPkcs8(String),
    #[error("key file `{0}` holds no ES256 (P-256), Ed25519 or RSA (2048-8192 bit) private key")]
    Unsupported(String),
    #[error("cannot generate key: {0}")]
    Generate(String),
    #[error("cannot write key file `{path}`")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file `{0}` already exists; it is kept (replace it with --force)")]
    Exists(String),
}

/// One loaded signing key.
pub struct SigningKey {
    pub alg: KeyAlg,
    pub kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads a PKCS#8 PEM file; the algorithm is read from the key itself.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_pem(&text, &shown)
    }

    pub fn from_pem(text: &[u8], name: &str) -> Result<Self, KeyError> {
        let block = pem::parse(text).map_err(|_| KeyError::NotPkcs8(name.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(KeyError::NotPkcs8(name.to_string()));
        }
        Self::from_pkcs8_der(block.contents(), name)
    }

    pub fn from_pkcs8_der(der: &[u8], name: &str) -> Result<Self, KeyError> {
        crypto::ensure_installed();
        for alg in [KeyAlg::Es256, KeyAlg::Ed25519, KeyAlg::Rs256] {
            if let Ok(parsed) = crypto::parsed_key(alg.jwt_alg(), der) {
                let encoding = match alg {
                    KeyAlg::Es256 => EncodingKey::from_ec_der(der),
                    KeyAlg::Ed25519 => EncodingKey::from_ed_der(der),
                    KeyAlg::Rs256 => EncodingKey::from_rsa_der(der),
                };
                let public = public_jwk(alg, &parsed)
                    .ok_or_else(|| KeyError::Unsupported(name.to_string()))?;
                let kid = thumbprint(&public);
                let mut jwk = public;
                if let Value::Object(map) = &mut jwk {
                    map.insert("kid".into(), Value::String(kid.clone()));
                    map.insert("use".into(), Value::String("sig".into()));
                    map.insert("alg".into(), Value::String(alg.name().into()));
                }
                return Ok(SigningKey {
                    alg,
                    kid,
                    encoding,
                    jwk,
                });
            }
        }
        Err(KeyError::Unsupported(name.to_string()))
    }

    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public JWK, with `kid`, `use` and `alg`.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }
}

/// The required members of the public JWK, in RFC 7638 order.
fn public_jwk(alg: KeyAlg, key: &ParsedKey) -> Option<Value> {
    match alg {
        KeyAlg::Es256 => {
            let point = key.public_key_bytes();
            let xy = point.strip_prefix(&[4u8])?;
            if xy.len() != 64 {
                return None;
            }
            let (x, y) = xy.split_at(32);
            Some(json!({"crv": "P-256", "kty": "EC", "x": B64.encode(x), "y": B64.encode(y)}))
        }
        KeyAlg::Ed25519 => {
            Some(json!({"crv": "Ed25519", "kty": "OKP", "x": B64.encode(key.public_key_bytes())}))
        }
        KeyAlg::Rs256 => {
            let (n, e) = key.rsa_components()?;
            Some(json!({"e": B64.encode(e), "kty": "RSA", "n": B64.encode(n)}))
        }
    }
}

/// RFC 7638 thumbprint: SHA-256 over the required members, lexicographically ordered, no
/// white space. serde_json's map keeps keys sorted, which is exactly that order.
fn thumbprint(required: &Value) -> String {
    let canonical = required.to_string();
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// The ordered signing key set: the first key signs, every key is published.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: Arc<Vec<SigningKey>>,
    jwks: Arc<Value>,
}

impl KeySet {
    pub fn new(keys: Vec<SigningKey>) -> Option<Self> {
        if keys.is_empty() {
            return None;
        }
        let jwks = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        Some(KeySet {
            keys: Arc::new(keys),
            jwks: Arc::new(jwks),
        })
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "`new` refuses an empty set, so there is always a first key"
    )]
    pub fn active(&self) -> &SigningKey {
        &self.keys[0]
    }

    pub fn all(&self) -> &[SigningKey] {
        &self.keys
    }

    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }
}

/// A new private key as PKCS#8 PEM.
pub fn generate_pem(alg: KeyAlg) -> Result<String, KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let der: Vec<u8> = match alg {
        KeyAlg::Es256 => ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|e| KeyError::Generate(e.to_string()))?
        .as_ref()
        .to_vec(),
        KeyAlg::Ed25519 => ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| KeyError::Generate(e.to_string()))?
            .as_ref()
            .to_vec(),
        KeyAlg::Rs256 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
            key.to_pkcs8_der()
                .map_err(|e| KeyError::Generate(e.to_string()))?
                .as_bytes()
                .to_vec()
        }
    };
    Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der)))
}

/// Writes a new key file readable by its owner only.
pub fn generate_file(alg: KeyAlg, out: &Path) -> Result<(), KeyError> {
    generate_into(alg, out, true)
}

/// Writes a new key to `out`, creating its folder; an existing file is replaced only when
/// `replace` is set, never truncated otherwise.
pub fn generate_into(alg: KeyAlg, out: &Path, replace: bool) -> Result<(), KeyError> {
    let shown = || out.display().to_string();
    let write = |source| KeyError::Write {
        path: shown(),
        source,
    };
    if !replace && out.exists() {
        return Err(KeyError::Exists(shown()));
    }
    let pem = generate_pem(alg)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let written = if replace {
        write_private(out, pem.as_bytes())
    } else {
        write_new_private(out, pem.as_bytes())
    };
    written.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => KeyError::Exists(shown()),
        _ => write(e),
    })
}

/// The permission bits of a private key file that its group or others may read or write
/// (`mode & 0o077 != 0`), or `None` when only its owner may (or on a system without Unix
/// modes, or when the file cannot be examined: reading it reports that).
pub fn loose_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Creates (or truncates) a file with mode 0600 and writes `data`.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_private_with(path, data, false)
}

/// Creates a file that must not exist yet, with mode 0600, and writes `data`.
pub fn write_new_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_private_with(path, data, true)
}

fn write_private_with(path: &Path, data: &[u8], new: bool) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    if new {
        opts.write(true).create_new(true);
    } else {
        opts.write(true).create(true).truncate(true);
    }
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_with_their_algorithm() {
        for alg in [KeyAlg::Es256, KeyAlg::Ed25519, KeyAlg::Rs256] {
            let pem = generate_pem(alg).unwrap();
            let key = SigningKey::from_pem(pem.as_bytes(), "k").unwrap();
            assert_eq!(key.alg, alg);
            assert_eq!(key.jwk()["kid"], key.kid.as_str());
            assert_eq!(key.kid.len(), 43);
        }
    }

    #[test]
    fn rfc7638_thumbprint_example() {
        // RFC 7638 §3.1 example key.
        let jwk = json!({"e": "AQAB", "kty": "RSA", "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn rejects_non_pkcs8_and_unknown_keys() {
        assert!(matches!(
            SigningKey::from_pem(b"garbage", "x"),
            Err(KeyError::NotPkcs8(_))
        ));
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        assert!(matches!(
            SigningKey::from_pem(pem.as_bytes(), "x"),
            Err(KeyError::Unsupported(_))
        ));
    }
}
