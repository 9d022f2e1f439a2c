//! Task tokens (RFC 9068 JWT access tokens): claims, signing, local verification.

pub mod crypto;
pub mod dpop;
pub mod jwt;
pub mod keys;
pub mod status;

use jsonwebtoken::{DecodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use keys::KeySet;

/// Largest task token accepted for verification.
pub const MAX_TASK_TOKEN_BYTES: usize = 8 * 1024;

/// `aud` as a string when there is one audience, an array otherwise (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Aud {
    One(String),
    Many(Vec<String>),
}

impl Aud {
    pub fn from_list(mut list: Vec<String>) -> Self {
        if list.len() == 1 {
            Aud::One(list.remove(0))
        } else {
            Aud::Many(list)
        }
    }
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Aud::One(s) => vec![s.clone()],
            Aud::Many(v) => v.clone(),
        }
    }
}

/// The claims of a task token (SPEC §4.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskClaims {
    pub iss: String,
    pub sub: String,
    pub client_id: String,
    pub aud: Aud,
    pub scope: String,
    pub txn: String,
    pub jti: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Value>,
    /// Where the token's revocation bit is (SPEC §4.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<status::StatusClaim>,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("signing key is not usable for verification")]
    Key(#[source] serde_json::Error),
    #[error("a JWS that is not a task token must not say `typ: at+jwt`")]
    ReservedType,
    #[error("cannot sign or load a token key")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("token is not one of ours or does not verify")]
    Invalid,
    #[error("token has expired")]
    Expired,
}

/// Signs task tokens with the active key and verifies tokens signed by any published key.
#[derive(Clone)]
pub struct TokenIssuer {
    issuer: String,
    keys: KeySet,
    verify_keys: std::sync::Arc<Vec<(String, jsonwebtoken::Algorithm, DecodingKey)>>,
}

impl TokenIssuer {
    pub fn new(issuer: String, keys: KeySet) -> Result<Self, TokenError> {
        crypto::ensure_installed();
        let mut verify_keys = Vec::new();
        for k in keys.all() {
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(k.jwk().clone()).map_err(TokenError::Key)?;
            let dk = DecodingKey::from_jwk(&jwk).map_err(TokenError::Sign)?;
            verify_keys.push((k.kid.clone(), k.alg.jwt_alg(), dk));
        }
        Ok(TokenIssuer {
            issuer,
            keys,
            verify_keys: std::sync::Arc::new(verify_keys),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    pub fn sign(&self, claims: &TaskClaims) -> Result<String, TokenError> {
        let key = self.keys.active();
        let mut header = Header::new(key.alg.jwt_alg());
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, key.encoding_key()).map_err(TokenError::Sign)
    }

    /// Verifies a token this broker (or a replica with the same keys) issued, at `now`.
    /// Revocation is not checked here.
    pub fn verify(&self, token: &str, now: i64) -> Result<TaskClaims, TokenError> {
        let jwt =
            jwt::ParsedJwt::parse(token, MAX_TASK_TOKEN_BYTES).map_err(|_| TokenError::Invalid)?;
        if jwt.header.typ.as_deref() != Some("at+jwt") {
            return Err(TokenError::Invalid);
        }
        let kid = jwt.header.kid.as_deref().ok_or(TokenError::Invalid)?;
        let (_, alg, key) = self
            .verify_keys
            .iter()
            .find(|(k, a, _)| k == kid && *a == jwt.header.alg)
            .ok_or(TokenError::Invalid)?;
        if !jwt.signature_valid(key, *alg) {
            return Err(TokenError::Invalid);
        }
        let claims: TaskClaims =
            serde_json::from_value(Value::Object(jwt.claims)).map_err(|_| TokenError::Invalid)?;
        if claims.iss != self.issuer {
            return Err(TokenError::Invalid);
        }
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Signs `payload` as a compact JWS with the active signing key (header `alg`, `kid` and
/// `typ`). `typ` names what is signed and is never `at+jwt`, so that nothing signed here can
/// pass for a task token (the decision log's checkpoints use it).
pub fn sign_jws(keys: &KeySet, typ: &str, payload: &impl Serialize) -> Result<String, TokenError> {
    if typ.eq_ignore_ascii_case("at+jwt") {
        return Err(TokenError::ReservedType);
    }
    crypto::ensure_installed();
    let key = keys.active();
    let mut header = Header::new(key.alg.jwt_alg());
    header.typ = Some(typ.to_string());
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, payload, key.encoding_key()).map_err(TokenError::Sign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keys::{KeyAlg, SigningKey, generate_pem};

    fn issuer(alg: KeyAlg) -> TokenIssuer {
        let k = SigningKey::from_pem(generate_pem(alg).unwrap().as_bytes(), "k").unwrap();
        TokenIssuer::new("https://writ.test".into(), KeySet::new(vec![k]).unwrap()).unwrap()
    }

    fn claims(exp: i64) -> TaskClaims {
        TaskClaims {
            iss: "https://writ.test".into(),
            sub: "spiffe://td/a".into(),
            client_id: "spiffe://td/a".into(),
            aud: Aud::One("https://api".into()),
            scope: "repo:read".into(),
            txn: "tsk_x".into(),
            jti: "j".into(),
            iat: 100,
            nbf: 100,
            exp,
            cnf: None,
            act: None,
            status: None,
        }
    }

    #[test]
    fn sign_and_verify_each_algorithm() {
        for alg in [KeyAlg::Es256, KeyAlg::Ed25519, KeyAlg::Rs256] {
            let iss = issuer(alg);
            let t = iss.sign(&claims(1000)).unwrap();
            let header = jsonwebtoken::decode_header(&t).unwrap();
            assert_eq!(header.typ.as_deref(), Some("at+jwt"));
            assert_eq!(header.alg, alg.jwt_alg());
            let c = iss.verify(&t, 500).unwrap();
            assert_eq!(c.txn, "tsk_x");
            assert!(matches!(iss.verify(&t, 1000), Err(TokenError::Expired)));
            // Another broker's key does not verify.
            assert!(matches!(
                issuer(alg).verify(&t, 500),
                Err(TokenError::Invalid)
            ));
        }
    }

    #[test]
    fn tampered_tokens_fail() {
        let iss = issuer(KeyAlg::Es256);
        let t = iss.sign(&claims(1000)).unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = iss.sign(&claims(2000)).unwrap();
        let other_payload = other.split('.').nth(1).unwrap().to_string();
        parts[1] = &other_payload;
        assert!(matches!(
            iss.verify(&parts.join("."), 500),
            Err(TokenError::Invalid)
        ));
    }
}
