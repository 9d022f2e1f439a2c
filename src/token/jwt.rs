//! A JWT split and decoded once: header, claims and the signed bytes, so that routing,
//! signature verification and claim checks share one parse.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, Header};
use serde_json::{Map, Value};

/// Why a JWT could not be taken apart or did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtFormatError {
    TooLarge,
    Malformed,
    /// The header has `crit`: it names extensions that must be understood, and Writ
    /// understands none (RFC 7515 §4.1.11).
    Critical,
}

pub struct ParsedJwt<'a> {
    pub header: Header,
    pub claims: Map<String, Value>,
    signing_input: &'a str,
    signature: &'a str,
}

impl<'a> ParsedJwt<'a> {
    /// Splits a compact JWS into its three parts and decodes header and claims. The size is
    /// bounded before anything is decoded.
    pub fn parse(token: &'a str, max_len: usize) -> Result<Self, JwtFormatError> {
        if token.len() > max_len {
            return Err(JwtFormatError::TooLarge);
        }
        let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtFormatError::Malformed)?;
        let (header_b64, payload_b64) = signing_input
            .split_once('.')
            .ok_or(JwtFormatError::Malformed)?;
        if payload_b64.contains('.') {
            return Err(JwtFormatError::Malformed);
        }
        let header_json = B64
            .decode(header_b64)
            .map_err(|_| JwtFormatError::Malformed)?;
        let header_map: Map<String, Value> =
            serde_json::from_slice(&header_json).map_err(|_| JwtFormatError::Malformed)?;
        if header_map.contains_key("crit") {
            return Err(JwtFormatError::Critical);
        }
        let header: Header = serde_json::from_value(Value::Object(header_map))
            .map_err(|_| JwtFormatError::Malformed)?;
        let payload = B64
            .decode(payload_b64)
            .map_err(|_| JwtFormatError::Malformed)?;
        let claims: Map<String, Value> =
            serde_json::from_slice(&payload).map_err(|_| JwtFormatError::Malformed)?;
        Ok(ParsedJwt {
            header,
            claims,
            signing_input,
            signature,
        })
    }

    /// Checks the signature with `key` under `alg` (the caller has already decided that
    /// `alg` is acceptable for this key).
    pub fn signature_valid(&self, key: &DecodingKey, alg: Algorithm) -> bool {
        super::crypto::ensure_installed();
        jsonwebtoken::crypto::verify(self.signature, self.signing_input.as_bytes(), key, alg)
            .unwrap_or(false)
    }

    pub fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    pub fn int_claim(&self, name: &str) -> Option<i64> {
        self.claims
            .get(name)
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().and_then(whole_seconds)))
    }

    /// True when `aud` (a string or an array of strings) contains `expected`.
    pub fn audience_contains(&self, expected: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(s)) => s == expected,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(expected)),
            _ => false,
        }
    }
}

/// A JSON number with a fraction, as whole seconds (NumericDate allows fractions); none when
/// it is not finite or out of range.
fn whole_seconds(f: f64) -> Option<i64> {
    let t = f.trunc();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "range-checked just before; the fraction was dropped on purpose"
    )]
    (t.is_finite() && t >= i64::MIN as f64 && t < i64::MAX as f64).then_some(t as i64)
}
