//! Errors as OAuth JSON (RFC 6749 §5.2), with `Cache-Control: no-store`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{BrokerError, ErrorCode};

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let mut body = json!({
            "error": self.code.as_str(),
            "error_description": clean_description(&self.description),
        });
        if let (Some(fields), Some(obj)) = (self.fields, body.as_object_mut()) {
            for (k, v) in *fields {
                obj.entry(k).or_insert(v);
            }
        }
        let mut resp = (status, Json(body)).into_response();
        no_store(&mut resp);
        // RFC 6750 §3 for bearer endpoints, RFC 6749 §5.2 for client credentials.
        let challenge = match self.code {
            ErrorCode::InvalidToken => Some("Bearer error=\"invalid_token\""),
            ErrorCode::CredentialsRequired => Some("Bearer realm=\"writ\""),
            ErrorCode::InvalidClient => Some("Basic realm=\"writ\""),
            ErrorCode::AccessDenied => Some("Bearer error=\"insufficient_scope\""),
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// RFC 6749 §5.2 allows only %x20-21 / %x23-5B / %x5D-7E in `error_description`. Every
/// description passes through here on its way out, so no caller input that slipped into one
/// (a quote, a backslash, a control or non-ASCII character) reaches a client: each disallowed
/// character becomes `?`.
pub fn clean_description(d: &str) -> String {
    d.chars()
        .map(|c| match c {
            '\x20'..='\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e' => c,
            _ => '?',
        })
        .collect()
}

/// A JSON body marked not cacheable.
pub fn json_no_store(value: serde_json::Value) -> Response {
    let mut resp = Json(value).into_response();
    no_store(&mut resp);
    resp
}

/// Marks a response as not cacheable (every response that carries or concerns a token).
pub fn no_store(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The body-limit layer refuses a body whose `Content-Length` is over the limit with a plain
/// text 413 before any handler runs; this gives that refusal the same OAuth error body as a
/// handler that finds the body too large while reading it.
pub async fn payload_too_large_as_oauth_error(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        BrokerError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the body is larger than {} bytes",
                super::extract::MAX_BODY_BYTES
            ),
        )
        .into_response()
    } else {
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::clean_description;

    #[test]
    fn the_sanitizer_keeps_allowed_and_replaces_the_rest() {
        assert_eq!(clean_description("a \"b\\ \u{e9}\n~!#[]"), "a ?b? ??~!#[]");
    }
}
