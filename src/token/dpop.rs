//! DPoP proofs (RFC 9449): one proof JWT checked against the request it came with.
//!
//! Nothing here knows the broker or HTTP: the token endpoint and a resource server's
//! verifier share these checks. What needs shared state stays with the caller: whether the
//! proof's `jti` was seen before (a replay) and which nonces are current ([`NonceKey`] makes
//! and checks nonces without state, so replicas that share the key agree).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

/// Largest proof accepted: a proof with an RSA-4096 `jwk` is about 1.5 KiB.
pub const MAX_PROOF_BYTES: usize = 8 * 1024;
/// `iat` must be within this many seconds of now, either way.
pub const MAX_AGE_SECS: i64 = 60;
/// The signing algorithms a proof may use (metadata `dpop_signing_alg_values_supported`).
/// `Ed25519` is the fully-specified name of EdDSA over Ed25519 (RFC 9864) that newer
/// clients send.
pub const SIGNING_ALGS: [&str; 5] = ["ES256", "EdDSA", "Ed25519", "RS256", "PS256"];
/// Longest `jti` accepted.
const MAX_JTI_BYTES: usize = 256;
/// JWK members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why a proof was refused. Every one is `invalid_dpop_proof` for the caller except
/// [`ProofError::Nonce`], which is `use_dpop_nonce`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error(
        "the proof is not a compact JWS of at most 8 KiB with a JSON header and claims, without `crit`"
    )]
    Malformed,
    #[error("`typ` is not `dpop+jwt`")]
    Type,
    #[error("`alg` `{0}` is not one of ES256, EdDSA (Ed25519), RS256, PS256")]
    Algorithm(String),
    #[error("`jwk` is missing or is not a public key for `alg`")]
    Key,
    #[error("`jwk` holds private or symmetric key material")]
    PrivateKey,
    #[error("the signature does not verify with `jwk`")]
    Signature,
    #[error("`htm` is not `{0}`")]
    Method(String),
    #[error("`htu` is not `{0}`")]
    Uri(String),
    #[error("`iat` is missing or not within {MAX_AGE_SECS} s of now")]
    Time,
    #[error("`jti` is missing, empty or longer than {MAX_JTI_BYTES} bytes")]
    Jti,
    #[error("`ath` is missing or is not the hash of the access token")]
    AccessTokenHash,
    #[error("`nonce` is missing or is not a current nonce")]
    Nonce,
}

/// What the request was, for the proof to match.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The request's method (`POST` at the token endpoint).
    pub htm: &'a str,
    /// The request's URI without query and fragment (the token endpoint).
    pub htu: &'a str,
    /// Unix seconds.
    pub now: i64,
    /// At a resource server: the access token presented, whose hash `ath` must be.
    pub access_token: Option<&'a str>,
    /// When nonces are required: the key that made them.
    pub nonce: Option<&'a NonceKey>,
}

/// A proof that passed every check but replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// RFC 7638 SHA-256 thumbprint of the proof's key (`cnf.jkt`).
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

impl Proof {
    /// A name for this proof in a replay cache: one per key and `jti`, of fixed length
    /// whatever the `jti`.
    pub fn replay_key(&self) -> String {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{}\n{}", self.jkt, self.jti).as_bytes(),
        );
        B64.encode(digest.as_ref())
    }
}

/// Checks one proof: form, `typ`, `alg`, a public `jwk`, the signature, `htm`, `htu`, `iat`,
/// `jti`, and `ath` and `nonce` when expected. Replay is left to the caller.
pub fn check(proof: &str, expect: &Expect<'_>) -> Result<Proof, ProofError> {
    let header = raw_header(proof)?;
    // RFC 7515 §4.1.11: no extension is understood here.
    if header.contains_key("crit") {
        return Err(ProofError::Malformed);
    }
    if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
        return Err(ProofError::Type);
    }
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| ProofError::Algorithm(String::new()))?;
    let alg = match alg_name {
        "ES256" => Algorithm::ES256,
        "EdDSA" | "Ed25519" => Algorithm::EdDSA,
        "RS256" => Algorithm::RS256,
        "PS256" => Algorithm::PS256,
        other => return Err(ProofError::Algorithm(other.chars().take(16).collect())),
    };
    let jwk_value = header.get("jwk").ok_or(ProofError::Key)?;
    let jwk_members = jwk_value.as_object().ok_or(ProofError::Key)?;
    if PRIVATE_MEMBERS.iter().any(|m| jwk_members.contains_key(*m)) {
        return Err(ProofError::PrivateKey);
    }
    let jwk: Jwk = serde_json::from_value(jwk_value.clone()).map_err(|_| ProofError::Key)?;
    if !key_fits(&jwk, alg) {
        return Err(ProofError::Key);
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| ProofError::Key)?;
    let jwt = Parts::split(proof)?;
    if !jwt.signature_valid(&key, alg) {
        return Err(ProofError::Signature);
    }
    if jwt.str_claim("htm") != Some(expect.htm) {
        return Err(ProofError::Method(expect.htm.to_string()));
    }
    if !same_uri(jwt.str_claim("htu"), expect.htu) {
        return Err(ProofError::Uri(expect.htu.to_string()));
    }
    let iat = jwt.int_claim("iat").ok_or(ProofError::Time)?;
    if iat.abs_diff(expect.now) > MAX_AGE_SECS.unsigned_abs() {
        return Err(ProofError::Time);
    }
    let jti = jwt
        .str_claim("jti")
        .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_BYTES)
        .ok_or(ProofError::Jti)?
        .to_string();
    if let Some(token) = expect.access_token
        && jwt.str_claim("ath") != Some(access_token_hash(token).as_str())
    {
        return Err(ProofError::AccessTokenHash);
    }
    if let Some(nonces) = expect.nonce
        && !jwt
            .str_claim("nonce")
            .is_some_and(|n| nonces.accepts(n, expect.now))
    {
        return Err(ProofError::Nonce);
    }
    let jkt = jwk
        .thumbprint(ThumbprintHash::SHA256)
        .map_err(|_| ProofError::Key)?;
    Ok(Proof { jkt, jti, iat })
}

/// The client side: a proof for `htm` `htu` at `now`, signed with `key` (a key `writ keys
/// generate` wrote), with the server's `nonce` and the access token's hash when given.
#[cfg(feature = "server")]
pub fn make_proof(
    key: &super::keys::SigningKey,
    htm: &str,
    htu: &str,
    now: i64,
    nonce: Option<&str>,
    access_token: Option<&str>,
) -> Result<String, super::TokenError> {
    super::crypto::ensure_installed();
    let mut public = key.jwk().clone();
    if let Value::Object(m) = &mut public {
        m.retain(|k, _| matches!(k.as_str(), "kty" | "crv" | "x" | "y" | "n" | "e"));
    }
    let jwk: Jwk = serde_json::from_value(public).map_err(super::TokenError::Key)?;
    let mut header = jsonwebtoken::Header::new(key.alg.jwt_alg());
    header.typ = Some("dpop+jwt".into());
    header.jwk = Some(jwk);
    let mut raw = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| super::TokenError::Invalid)?;
    let jti = B64.encode(raw);
    let mut claims = serde_json::json!({"jti": jti, "htm": htm, "htu": htu, "iat": now});
    if let Some(obj) = claims.as_object_mut() {
        if let Some(n) = nonce {
            obj.insert("nonce".into(), Value::String(n.to_string()));
        }
        if let Some(t) = access_token {
            obj.insert("ath".into(), Value::String(access_token_hash(t)));
        }
    }
    jsonwebtoken::encode(&header, &claims, key.encoding_key()).map_err(super::TokenError::Sign)
}

/// A proof taken apart: its claims and the signed bytes. Not `jwt::ParsedJwt`, whose header
/// type knows no `alg: Ed25519` (RFC 9864).
struct Parts<'a> {
    claims: Map<String, Value>,
    signing_input: &'a str,
    signature: &'a str,
}

impl<'a> Parts<'a> {
    fn split(proof: &'a str) -> Result<Self, ProofError> {
        let (signing_input, signature) = proof.rsplit_once('.').ok_or(ProofError::Malformed)?;
        let (header, payload) = signing_input.split_once('.').ok_or(ProofError::Malformed)?;
        if header.contains('.') || payload.contains('.') {
            return Err(ProofError::Malformed);
        }
        let bytes = B64.decode(payload).map_err(|_| ProofError::Malformed)?;
        let claims = serde_json::from_slice(&bytes).map_err(|_| ProofError::Malformed)?;
        Ok(Parts {
            claims,
            signing_input,
            signature,
        })
    }

    fn signature_valid(&self, key: &DecodingKey, alg: Algorithm) -> bool {
        super::crypto::ensure_installed();
        jsonwebtoken::crypto::verify(self.signature, self.signing_input.as_bytes(), key, alg)
            .unwrap_or(false)
    }

    fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A NumericDate; a fraction is dropped.
    fn int_claim(&self, name: &str) -> Option<i64> {
        let v = self.claims.get(name)?;
        v.as_i64().or_else(|| {
            let f = v.as_f64()?.trunc();
            #[expect(
                clippy::cast_possible_truncation,
                reason = "range-checked just before; the fraction was dropped on purpose"
            )]
            (f.is_finite() && (-1e15..=1e15).contains(&f)).then_some(f as i64)
        })
    }
}

/// `ath`: base64url of the SHA-256 of the access token (RFC 9449 §4.2).
pub fn access_token_hash(token: &str) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// The RFC 7638 SHA-256 thumbprint of a public JWK, as `cnf.jkt` carries it.
pub fn thumbprint(jwk: &Value) -> Option<String> {
    let jwk: Jwk = serde_json::from_value(jwk.clone()).ok()?;
    jwk.thumbprint(ThumbprintHash::SHA256).ok()
}

/// The header as JSON members, bounded first.
fn raw_header(proof: &str) -> Result<Map<String, Value>, ProofError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(ProofError::Malformed);
    }
    let (header_b64, _) = proof.split_once('.').ok_or(ProofError::Malformed)?;
    let bytes = B64.decode(header_b64).map_err(|_| ProofError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| ProofError::Malformed)
}

/// The key's type and curve are the ones `alg` signs with.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::PS256) => true,
        _ => false,
    }
}

/// `htu` names the expected URI, ignoring its query and fragment (RFC 9449 §4.3) and the
/// spelling differences that URL parsing removes (case of scheme and host, a default port).
fn same_uri(htu: Option<&str>, expected: &str) -> bool {
    let parse = |s: &str| {
        let mut u = url::Url::parse(s).ok()?;
        u.set_query(None);
        u.set_fragment(None);
        Some(u)
    };
    match (htu.and_then(parse), parse(expected)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Server nonces (RFC 9449 §8) without shared state: a nonce is a time window and its HMAC,
/// so every replica with the same key makes and accepts the same nonces. A nonce is current
/// for its window and the next one.
pub struct NonceKey {
    key: ring::hmac::Key,
    window_secs: i64,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey").finish_non_exhaustive()
    }
}

impl NonceKey {
    /// A key derived from `secret` (the broker's signing key material), separated from every
    /// other use of it.
    pub fn derive(secret: &[u8], window_secs: i64) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"writ dpop nonce v1\0");
        ctx.update(secret);
        let derived = ctx.finish();
        NonceKey {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            window_secs: window_secs.max(1),
        }
    }

    fn window(&self, now: i64) -> i64 {
        now.div_euclid(self.window_secs)
    }

    fn make(&self, window: i64) -> String {
        let w = window.to_be_bytes();
        let tag = ring::hmac::sign(&self.key, &w);
        let mut raw = w.to_vec();
        raw.extend_from_slice(tag.as_ref().get(..16).unwrap_or_default());
        B64.encode(raw)
    }

    /// The nonce to hand out at `now`.
    pub fn current(&self, now: i64) -> String {
        self.make(self.window(now))
    }

    /// True for a nonce of this window or the one before.
    pub fn accepts(&self, nonce: &str, now: i64) -> bool {
        let w = self.window(now);
        [w, w.saturating_sub(1)]
            .iter()
            .any(|cand| constant_eq(self.make(*cand).as_bytes(), nonce.as_bytes()))
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_last_two_windows_and_need_the_key() {
        let k = NonceKey::derive(b"secret", 60);
        let n = k.current(1_000);
        assert!(k.accepts(&n, 1_000));
        assert!(k.accepts(&n, 1_079));
        assert!(!k.accepts(&n, 1_200));
        assert!(!NonceKey::derive(b"other", 60).accepts(&n, 1_000));
        assert!(!k.accepts("", 1_000));
    }

    #[test]
    fn htu_ignores_query_fragment_and_spelling() {
        let e = "https://writ.example/oauth2/token";
        assert!(same_uri(
            Some("https://WRIT.example:443/oauth2/token?x=1#f"),
            e
        ));
        assert!(!same_uri(Some("https://writ.example/oauth2/token/"), e));
        assert!(!same_uri(Some("http://writ.example/oauth2/token"), e));
        assert!(!same_uri(None, e));
    }
}
