//! Extractors: the wire parts every handler needs, with rejections in the OAuth error
//! format (never axum's default text).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;

use crate::error::BrokerError;

/// Largest request body (SPEC: > 64 KiB is refused).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The caller's IP address, as the decision log records it.
#[derive(Debug, Clone)]
pub struct SourceIp(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for SourceIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(SourceIp(peer.map(|ConnectInfo(p)| p.ip().to_string())))
    }
}

/// The certificate chain of the request's TLS client, when it presented one (not yet
/// verified: [`crate::identity::x509`] decides whether it is an X509-SVID).
#[derive(Debug, Clone)]
pub struct PeerCert(pub Option<crate::tls::PeerChain>);

impl<S: Send + Sync> FromRequestParts<S> for PeerCert {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerCert(
            parts.extensions.get::<crate::tls::PeerChain>().cloned(),
        ))
    }
}

/// The `Authorization` header, when present and readable text.
#[derive(Debug, Clone)]
pub struct Authorization(pub Option<String>);

impl Authorization {
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// At the token and revocation endpoints, which take no client authentication: a
    /// `Basic` client credential cannot be verified, so it is refused rather than ignored.
    pub fn refuse_client_credentials(&self) -> Result<(), BrokerError> {
        let basic = self.0.as_deref().is_some_and(|h| {
            h.trim_start()
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case("basic "))
        });
        if basic {
            return Err(BrokerError::invalid_client());
        }
        Ok(())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authorization {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Authorization(value))
    }
}

/// The `DPoP` request header (RFC 9449 §4.1): none, exactly one proof, or a refusal (more
/// than one header, or one that is not text), answered `invalid_dpop_proof` by the handler.
#[derive(Debug, Clone)]
pub struct DpopHeader(pub Result<Option<String>, BrokerError>);

impl<S: Send + Sync> FromRequestParts<S> for DpopHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut all = parts.headers.get_all("dpop").iter();
        let value = match (all.next(), all.next()) {
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(BrokerError::invalid_dpop_proof(
                "exactly one DPoP header is allowed",
            )),
            (Some(v), None) => v.to_str().map(|s| Some(s.to_string())).map_err(|_| {
                BrokerError::invalid_dpop_proof("the DPoP header is not a compact JWS")
            }),
        };
        Ok(DpopHeader(value))
    }
}

/// A form-encoded body: content type checked, size bounded, split into name/value pairs.
#[derive(Debug, Clone)]
pub struct FormPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequest<S> for FormPairs {
    type Rejection = BrokerError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(BrokerError::invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let bytes = body_bytes(req).await?;
        Ok(FormPairs(
            url::form_urlencoded::parse(&bytes).into_owned().collect(),
        ))
    }
}

/// A body of at most [`MAX_BODY_BYTES`].
#[derive(Debug, Clone)]
pub struct BoundedBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for BoundedBody {
    type Rejection = BrokerError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        Ok(BoundedBody(body_bytes(req).await?))
    }
}

async fn body_bytes(req: Request) -> Result<axum::body::Bytes, BrokerError> {
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| BrokerError::too_large(MAX_BODY_BYTES))
}
