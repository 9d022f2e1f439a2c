//! Task tokens (RFC 9068 JWT access tokens): claims, signing, local verification.

pub mod crypto;
pub mod dpop;
#[cfg(feature = "server")]
mod issuer;
pub mod jwt;
#[cfg(feature = "server")]
pub mod keys;
pub mod status;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(feature = "server")]
pub use issuer::{TokenIssuer, sign_jws};

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
