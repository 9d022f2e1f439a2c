//! Signed checkpoints: a compact JWS, signed with the broker's token signing key, over the
//! `seq` and `hash` of the record a checkpoint follows.
//!
//! Header: `alg`, `kid`, `typ: writ-checkpoint+jwt` (never `at+jwt`, so a checkpoint can
//! never pass for a task token). Payload: `{"seq": N, "hash": "<hex>"}`. The checkpoint
//! record (`event: checkpoint`) carries `detail: {"seq", "hash", "jws"}`; whoever rewrites
//! the records before it must forge that signature, which takes the broker's private key.

use std::collections::HashMap;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AuditError, Record};
use crate::store::AuditHead;
use crate::token::jwt::ParsedJwt;
use crate::token::keys::KeySet;

pub const CHECKPOINT_TYP: &str = "writ-checkpoint+jwt";

/// The longest checkpoint JWS accepted (RS256 with an 8192-bit key fits easily).
const MAX_JWS_BYTES: usize = 8 * 1024;

/// What a checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointClaims {
    pub seq: u64,
    pub hash: String,
}

/// Signs a checkpoint over (`seq`, `hash`) with the active signing key.
pub fn sign(keys: &KeySet, seq: u64, hash: &str) -> Result<String, AuditError> {
    let claims = CheckpointClaims {
        seq,
        hash: hash.to_string(),
    };
    crate::token::sign_jws(keys, CHECKPOINT_TYP, &claims)
        .map_err(|e| AuditError::Sign(e.to_string()))
}

/// The head a checkpoint record states (`detail.seq`, `detail.hash`, `detail.jws`), or
/// `None` when it does not state one.
pub fn head_of(rec: &Record, log_id: &str) -> Option<AuditHead> {
    let d = rec.detail.as_ref()?;
    Some(AuditHead {
        log_id: log_id.to_string(),
        seq: d.get("seq").and_then(Value::as_u64)?,
        hash: d.get("hash").and_then(Value::as_str)?.to_string(),
        checkpoint: d.get("jws").and_then(Value::as_str)?.to_string(),
    })
}

/// Why a checkpoint JWS was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint is not a well-formed JWS over `seq` and `hash`")]
    Malformed,
    #[error("the checkpoint's `typ` is not `{CHECKPOINT_TYP}`")]
    WrongType,
    #[error("the checkpoint is signed with key `{0}`, which the JWKS does not hold")]
    UnknownKey(String),
    #[error("the checkpoint's signature does not verify with key `{0}`")]
    BadSignature(String),
}

/// Public keys that checkpoints may be signed with: a JWKS (the broker's `/oauth2/jwks`).
pub struct CheckpointKeys {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
}

impl std::fmt::Debug for CheckpointKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKeys")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl CheckpointKeys {
    /// Reads a JWKS. Every key needs a `kid` and an `alg` Writ signs with; symmetric keys
    /// are refused.
    pub fn from_jwks(bytes: &[u8]) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk
                .common
                .key_id
                .clone()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| format!("keys[{i}] has no `kid`"))?;
            let alg = jwk
                .common
                .key_algorithm
                .and_then(crate::identity::oidc::key_alg)
                .ok_or_else(|| format!("keys[{i}] (`{kid}`) has no signature `alg` Writ uses"))?;
            let key =
                DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}] (`{kid}`): {e}"))?;
            if matches!(key.family(), jsonwebtoken::AlgorithmFamily::Hmac) {
                return Err(format!("keys[{i}] (`{kid}`) is symmetric"));
            }
            keys.insert(kid, (key, alg));
        }
        if keys.is_empty() {
            return Err("the JWKS holds no key".into());
        }
        Ok(CheckpointKeys { keys })
    }

    /// The public half of a signing key set.
    pub fn from_key_set(keys: &KeySet) -> Result<Self, String> {
        Self::from_jwks(keys.jwks().to_string().as_bytes())
    }

    /// Verifies a checkpoint JWS and returns what it signs.
    pub fn verify(&self, jws: &str) -> Result<CheckpointClaims, CheckpointError> {
        let (jwt, claims) = parse(jws)?;
        let kid = jwt.header.kid.clone().unwrap_or_default();
        let (key, alg) = self
            .keys
            .get(&kid)
            .ok_or_else(|| CheckpointError::UnknownKey(kid.clone()))?;
        if jwt.header.alg != *alg || !jwt.signature_valid(key, *alg) {
            return Err(CheckpointError::BadSignature(kid));
        }
        Ok(claims)
    }
}

/// What a checkpoint JWS says, without checking its signature.
pub fn unverified_claims(jws: &str) -> Result<CheckpointClaims, CheckpointError> {
    parse(jws).map(|(_, claims)| claims)
}

fn parse(jws: &str) -> Result<(ParsedJwt<'_>, CheckpointClaims), CheckpointError> {
    let jwt = ParsedJwt::parse(jws, MAX_JWS_BYTES).map_err(|_| CheckpointError::Malformed)?;
    if jwt.header.typ.as_deref() != Some(CHECKPOINT_TYP) {
        return Err(CheckpointError::WrongType);
    }
    let claims: CheckpointClaims = serde_json::from_value(Value::Object(jwt.claims.clone()))
        .map_err(|_| CheckpointError::Malformed)?;
    Ok((jwt, claims))
}
