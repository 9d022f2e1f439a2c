//! The broker's side of task tokens: signing with the active key, verifying its own tokens
//! against every published key, and signing other JWS with the same keys.

use jsonwebtoken::{DecodingKey, Header};
use serde::Serialize;
use serde_json::Value;

use super::keys::KeySet;
use super::{MAX_TASK_TOKEN_BYTES, TaskClaims, TokenError, crypto, jwt};

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
    use crate::token::keys::{KeyAlg, KeySet, SigningKey, generate_pem};
    use crate::token::{Aud, TaskClaims, TokenError};

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
