//! A ring-backed `jsonwebtoken` [`CryptoProvider`].
//!
//! jsonwebtoken 11 ships RustCrypto and aws-lc-rs backends only; the RustCrypto one signs
//! ES256 about twenty times slower than ring. This provider keeps ring as the one crypto
//! library of the process (rustls uses it too) and caches parsed private keys: the signer
//! factory is called for every signature with the raw PKCS#8 bytes, and parsing a PKCS#8
//! key costs more than the signature itself.

use std::sync::{Arc, OnceLock};

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use parking_lot::RwLock;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};

/// Installs the provider once per process. Cheap after the first call.
pub fn ensure_installed() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Another provider may already be installed by an embedding program; then that one
        // stays, which is its right.
        let _ = PROVIDER.install_default();
    });
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: rsa_components_from_public_key,
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_components_from_private_key,
        compute_digest,
    },
};

fn rng() -> &'static SystemRandom {
    static RNG: OnceLock<SystemRandom> = OnceLock::new();
    RNG.get_or_init(SystemRandom::new)
}

/// A parsed private key, ready to sign.
pub enum ParsedKey {
    Ecdsa(sig::EcdsaKeyPair),
    Ed25519(sig::Ed25519KeyPair),
    Rsa(sig::RsaKeyPair),
}

impl ParsedKey {
    /// Parses PKCS#8 DER for the given algorithm.
    pub fn from_pkcs8(alg: Algorithm, der: &[u8]) -> Result<Self, JwtError> {
        match alg {
            Algorithm::ES256 => {
                sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, der, rng())
                    .map(ParsedKey::Ecdsa)
                    .map_err(|_| ErrorKind::InvalidEcdsaKey.into())
            }
            Algorithm::ES384 => {
                sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, der, rng())
                    .map(ParsedKey::Ecdsa)
                    .map_err(|_| ErrorKind::InvalidEcdsaKey.into())
            }
            Algorithm::EdDSA => sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map(ParsedKey::Ed25519)
                .map_err(|_| ErrorKind::InvalidEddsaKey.into()),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => sig::RsaKeyPair::from_pkcs8(der)
                .map(ParsedKey::Rsa)
                .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()).into()),
            _ => Err(ErrorKind::InvalidAlgorithm.into()),
        }
    }

    /// The raw public key bytes (uncompressed point, Ed25519 x, or RSA public key DER).
    pub fn public_key_bytes(&self) -> &[u8] {
        match self {
            ParsedKey::Ecdsa(k) => k.public_key().as_ref(),
            ParsedKey::Ed25519(k) => k.public_key().as_ref(),
            ParsedKey::Rsa(k) => k.public_key().as_ref(),
        }
    }

    /// RSA modulus and exponent, big-endian without leading zeros.
    pub fn rsa_components(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        match self {
            ParsedKey::Rsa(k) => {
                let c = sig::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                let strip = |v: Vec<u8>| v.into_iter().skip_while(|b| *b == 0).collect::<Vec<u8>>();
                Some((strip(c.n), strip(c.e)))
            }
            _ => None,
        }
    }

    fn sign(&self, alg: Algorithm, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        match self {
            ParsedKey::Ecdsa(k) => k
                .sign(rng(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new()),
            ParsedKey::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
            ParsedKey::Rsa(k) => {
                let padding: &dyn sig::RsaEncoding = match alg {
                    Algorithm::RS256 => &sig::RSA_PKCS1_SHA256,
                    Algorithm::RS384 => &sig::RSA_PKCS1_SHA384,
                    Algorithm::RS512 => &sig::RSA_PKCS1_SHA512,
                    Algorithm::PS256 => &sig::RSA_PSS_SHA256,
                    Algorithm::PS384 => &sig::RSA_PSS_SHA384,
                    Algorithm::PS512 => &sig::RSA_PSS_SHA512,
                    _ => return Err(signature::Error::new()),
                };
                let mut out = vec![0u8; k.public().modulus_len()];
                k.sign(padding, rng(), msg, &mut out)
                    .map_err(|_| signature::Error::new())?;
                Ok(out)
            }
        }
    }
}

type KeyCache = RwLock<Vec<(Algorithm, Vec<u8>, Arc<ParsedKey>)>>;

/// Parsed private keys by (algorithm, PKCS#8 bytes). Bounded by the configured signing keys
/// (and the keys a test or `writ dev` creates): it only grows when a new key signs.
fn key_cache() -> &'static KeyCache {
    static CACHE: OnceLock<KeyCache> = OnceLock::new();
    CACHE.get_or_init(|| RwLock::new(Vec::new()))
}

const KEY_CACHE_LIMIT: usize = 64;

/// The parsed form of a PKCS#8 key, parsed at most once.
pub fn parsed_key(alg: Algorithm, der: &[u8]) -> Result<Arc<ParsedKey>, JwtError> {
    if let Some(found) = key_cache()
        .read()
        .iter()
        .find(|(a, d, _)| *a == alg && d.as_slice() == der)
        .map(|(_, _, k)| k.clone())
    {
        return Ok(found);
    }
    let parsed = Arc::new(ParsedKey::from_pkcs8(alg, der)?);
    let mut cache = key_cache().write();
    if cache.len() >= KEY_CACHE_LIMIT {
        cache.remove(0);
    }
    cache.push((alg, der.to_vec(), parsed.clone()));
    Ok(parsed)
}

struct RingSigner {
    alg: Algorithm,
    key: Arc<ParsedKey>,
}

impl signature::Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        self.key.sign(self.alg, msg)
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, JwtError> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingSigner {
        alg: *alg,
        key: parsed_key(*alg, key.as_bytes())?,
    }))
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

fn verification_alg(alg: Algorithm) -> Option<&'static dyn sig::VerificationAlgorithm> {
    Some(match alg {
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        _ => return rsa_params(alg).map(|p| p as &'static dyn sig::VerificationAlgorithm),
    })
}

fn rsa_params(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let bad = |_| signature::Error::new();
        match self.key.kind() {
            DecodingKeyKind::SecretOrDer(bytes) => {
                let alg = verification_alg(self.alg).ok_or_else(signature::Error::new)?;
                sig::UnparsedPublicKey::new(alg, bytes)
                    .verify(msg, signature)
                    .map_err(bad)
            }
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                let params = rsa_params(self.alg).ok_or_else(signature::Error::new)?;
                sig::RsaPublicKeyComponents { n, e }
                    .verify(params, msg, signature)
                    .map_err(bad)
            }
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, JwtError> {
    // HMAC is never accepted: Writ only verifies asymmetric signatures, so a token that
    // claims HS256 and hopes the public key is used as a secret is refused here too.
    if key.family() != alg.family() || verification_alg(*alg).is_none() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

fn rsa_components_from_private_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), JwtError> {
    ParsedKey::from_pkcs8(Algorithm::RS256, der)?
        .rsa_components()
        .ok_or_else(|| ErrorKind::InvalidKeyFormat.into())
}

fn rsa_components_from_public_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), JwtError> {
    // Parse the PKCS#1 RSAPublicKey: SEQUENCE { INTEGER n, INTEGER e }.
    fn read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&len0, mut rest) = rest.split_first()?;
        let len = if len0 < 0x80 {
            usize::from(len0)
        } else {
            let n = usize::from(len0 & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (lb, r) = rest.split_at(n);
            rest = r;
            lb.iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return None;
        }
        let (value, after) = rest.split_at(len);
        Some((tag, value, after))
    }
    let strip = |v: &[u8]| {
        v.iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    let parsed = read(der).and_then(|(tag, seq, _)| {
        if tag != 0x30 {
            return None;
        }
        let (t1, n, rest) = read(seq)?;
        let (t2, e, _) = read(rest)?;
        (t1 == 0x02 && t2 == 0x02).then(|| (strip(n), strip(e)))
    });
    parsed.ok_or_else(|| ErrorKind::InvalidRsaKey("malformed RSAPublicKey".into()).into())
}

fn ec_components_from_private_key(
    der: &[u8],
    alg: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), JwtError> {
    let (curve, n) = match alg {
        Algorithm::ES256 => (EllipticCurve::P256, 32),
        Algorithm::ES384 => (EllipticCurve::P384, 48),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let key = ParsedKey::from_pkcs8(alg, der)?;
    let point = key.public_key_bytes();
    match point.split_first() {
        Some((4, xy)) if xy.len() == 2 * n => {
            let (x, y) = xy.split_at(n);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn ed_components_from_private_key(der: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>, JwtError> {
    match curve {
        EllipticCurve::Ed25519 => Ok(ParsedKey::from_pkcs8(Algorithm::EdDSA, der)?
            .public_key_bytes()
            .to_vec()),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, JwtError> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}
