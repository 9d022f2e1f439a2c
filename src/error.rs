//! The outcome codes of the use cases, in OAuth's words (RFC 6749 §5.2, RFC 8693 §2.2.2),
//! and the one error a use case returns. The HTTP layer turns it into a response; the use
//! cases know nothing of HTTP.
//!
//! Two kinds of failure reach a caller: a refusal (the request is wrong or not allowed: a code
//! and a short description) and a failure of the broker's own parts (store, decision log,
//! signing, an identity source). A failure is logged with its whole cause chain and counted
//! once, where it is turned into a [`BrokerError`] ([`Failure::logged`]); the caller is told
//! only that the broker cannot decide safely.

use std::fmt;

use crate::audit::AuditError;
use crate::identity::IdentityError;
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::token::TokenError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnsupportedGrantType,
    InvalidScope,
    InvalidTarget,
    InvalidToken,
    AccessDenied,
    NotFound,
    TemporarilyUnavailable,
    PayloadTooLarge,
    /// No credential was sent where a bearer is required: `invalid_token` in the body, but
    /// no error attribute in `WWW-Authenticate` (RFC 6750 §3.1).
    CredentialsRequired,
    /// A request held for approval (SPEC §4.7, the words of RFC 8628 §3.5).
    AuthorizationPending,
    SlowDown,
    ExpiredToken,
    /// `access_denied` at the token endpoint: 400, as RFC 8628 §3.5 answers a denied
    /// request (not the 403 of a refused bearer).
    RequestDenied,
    /// The state of the thing acted on does not allow the action (an approval decided).
    Conflict,
    /// A DPoP proof that fails any check (RFC 9449 §4.3).
    InvalidDpopProof,
    /// A DPoP proof without the nonce the broker requires (RFC 9449 §8).
    UseDpopNonce,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::PayloadTooLarge => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::InvalidTarget => "invalid_target",
            ErrorCode::InvalidToken | ErrorCode::CredentialsRequired => "invalid_token",
            ErrorCode::AccessDenied | ErrorCode::RequestDenied => "access_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            ErrorCode::AuthorizationPending => "authorization_pending",
            ErrorCode::SlowDown => "slow_down",
            ErrorCode::ExpiredToken => "expired_token",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InvalidDpopProof => "invalid_dpop_proof",
            ErrorCode::UseDpopNonce => "use_dpop_nonce",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidClient | ErrorCode::InvalidToken | ErrorCode::CredentialsRequired => {
                401
            }
            ErrorCode::AccessDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::TemporarilyUnavailable => 503,
            _ => 400,
        }
    }
}

/// An error for the caller: a code and a short description without secrets or
/// verification details (those go to the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    pub code: ErrorCode,
    pub description: String,
    /// Members added to the error object beside `error` and `error_description` (a held
    /// request's `approval_id`, `interval`, `expires_in`).
    pub fields: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl BrokerError {
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        BrokerError {
            code,
            description: description.into(),
            fields: None,
        }
    }

    /// The same error with `fields` added to its JSON object.
    pub fn with_fields(mut self, fields: serde_json::Map<String, serde_json::Value>) -> Self {
        self.fields = Some(Box::new(fields));
        self
    }
    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, d)
    }
    pub fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidGrant, d)
    }
    pub fn invalid_scope(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidScope, d)
    }
    pub fn invalid_target(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidTarget, d)
    }
    pub fn invalid_token(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidToken, d)
    }
    /// No bearer credential was sent.
    pub fn credentials_required() -> Self {
        Self::new(
            ErrorCode::CredentialsRequired,
            "a bearer credential is required",
        )
    }
    /// A client credential (`Authorization: Basic`) the broker cannot verify: Writ has no
    /// OAuth clients with secrets.
    pub fn invalid_client() -> Self {
        Self::new(
            ErrorCode::InvalidClient,
            "client authentication is not supported here; present a workload identity",
        )
    }
    /// `invalid_client` (401): client authentication was required and failed (RFC 6749 §5.2).
    pub fn client_auth_failed(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidClient, d)
    }
    pub fn invalid_dpop_proof(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidDpopProof, d)
    }
    pub fn access_denied(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::AccessDenied, d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, d)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {limit} bytes"),
        )
    }
    /// The answer for any failure of the broker's own parts. Build it through
    /// [`Failure::logged`], which logs and counts the cause; this constructor is for the
    /// places that have no cause to report (a revocation view not yet confirmed).
    pub fn unavailable() -> Self {
        Self::new(
            ErrorCode::TemporarilyUnavailable,
            "the broker cannot decide safely right now; retry later",
        )
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.description)
    }
}

impl std::error::Error for BrokerError {}

/// A failure of one of the broker's own parts, with its cause.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("store operation failed")]
    Store(#[from] StoreError),
    #[error("decision log append failed")]
    Audit(#[from] AuditError),
    #[error("token signing failed")]
    Token(#[from] TokenError),
    #[error("identity source unavailable")]
    Identity(#[from] IdentityError),
    #[error("trust domain X.509 authorities unavailable")]
    X509(#[from] crate::identity::x509::X509SvidError),
    #[error("cannot make a random id")]
    Random(#[from] crate::domain::RngError),
    #[error("status list operation failed")]
    Status(#[from] crate::status::StatusError),
}

impl Failure {
    /// The metric label of the part that failed.
    pub fn part(&self) -> &'static str {
        match self {
            Failure::Store(_) => "store",
            Failure::Audit(_) => "audit",
            Failure::Token(_) => "signing",
            Failure::Identity(_) | Failure::X509(_) => "identity",
            Failure::Random(_) => "random",
            Failure::Status(_) => "status",
        }
    }

    /// Logs the failure once with its cause chain, counts it, and gives the caller's answer.
    pub fn logged(self, metrics: &Metrics) -> BrokerError {
        if matches!(self, Failure::Identity(_) | Failure::X509(_)) {
            // An issuer's discovery or JWKS out of reach: the broker answers 503 and keeps
            // serving every other identity, so a warning, not an error of its own parts.
            tracing::warn!(part = self.part(), error = %chain(&self), "{self}");
        } else {
            tracing::error!(part = self.part(), error = %chain(&self), "{self}");
        }
        metrics.inc("writ_failures_total", &[("part", self.part())]);
        if matches!(
            self,
            Failure::Store(_) | Failure::Status(crate::status::StatusError::Store(_))
        ) {
            metrics.inc("writ_store_errors_total", &[]);
        }
        BrokerError::unavailable()
    }
}

/// An error and its causes, joined: `outer: inner: innermost`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_counted_once_and_answered_with_503() {
        let metrics = Metrics::default();
        let e = Failure::from(crate::domain::RngError).logged(&metrics);
        assert_eq!(e.code, ErrorCode::TemporarilyUnavailable);
        assert_eq!(e.code.status(), 503);
        let text = metrics.render();
        assert!(
            text.contains("writ_failures_total{part=\"random\"} 1"),
            "{text}"
        );
    }
}
