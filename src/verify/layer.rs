//! The verifier as a tower layer: every request is verified before the inner service sees
//! it, the route's scopes are checked, and the [`Verified`] claims go to the handler as a
//! request extension. A refused request is answered here with its status and
//! `WWW-Authenticate` challenge and an empty body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::{HeaderValue, Request, Response, header};

use super::{ErrorCode, Presented, Rejection, Scheme, Verified, Verifier};

/// Gives the DER of the TLS peer's certificate of a request (for mTLS-bound tokens), from
/// whatever the server put in the request (an extension, a header set by a proxy that
/// terminates TLS, ...).
pub trait PeerCertificate: Send + Sync {
    fn peer_certificate(&self, request: &::http::request::Parts) -> Option<Vec<u8>>;
}

impl<F> PeerCertificate for F
where
    F: Fn(&::http::request::Parts) -> Option<Vec<u8>> + Send + Sync,
{
    fn peer_certificate(&self, request: &::http::request::Parts) -> Option<Vec<u8>> {
        self(request)
    }
}

/// Verifies every request of the service it wraps (see [`Verifier::layer`]).
#[derive(Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
    scopes: Arc<[String]>,
    peer: Option<Arc<dyn PeerCertificate>>,
}

impl std::fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyLayer")
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl VerifyLayer {
    pub fn new(verifier: Verifier) -> Self {
        VerifyLayer {
            verifier,
            scopes: Arc::from(Vec::new()),
            peer: None,
        }
    }

    /// Every one of these scopes must be in the token (else 403 `insufficient_scope`).
    #[must_use]
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Where the peer certificate of a request is found. Without it, an mTLS-bound token is
    /// always refused.
    #[must_use]
    pub fn peer_certificate(mut self, hook: impl PeerCertificate + 'static) -> Self {
        self.peer = Some(Arc::new(hook));
        self
    }

    /// Verifies the request's parts and checks the scopes.
    pub async fn check(&self, parts: &::http::request::Parts) -> Result<Verified, Rejection> {
        let authorization = header_values(&parts.headers, header::AUTHORIZATION);
        let dpop = header_values(&parts.headers, header::HeaderName::from_static("dpop"));
        let url = self.request_url(parts);
        let cert = self.peer.as_ref().and_then(|p| p.peer_certificate(parts));
        let presented = Presented {
            method: parts.method.as_str(),
            url: &url,
            authorization: &authorization,
            dpop: &dpop,
            peer_certificate: cert.as_deref(),
        };
        let verified = self.verifier.verify(&presented).await?;
        let missing: Vec<&str> = self
            .scopes
            .iter()
            .filter(|s| !verified.has_scope(s))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            tracing::info!(missing = %missing.join(" "), "access token lacks a scope");
            let scheme = match verified.binding {
                super::Binding::Dpop { .. } => Scheme::Dpop,
                _ => Scheme::Bearer,
            };
            return Err(Rejection {
                code: ErrorCode::InsufficientScope,
                scheme,
                description: "the access token lacks a scope this resource needs",
                scope: Some(self.scopes.join(" ")),
            });
        }
        Ok(verified)
    }

    /// The URL the client addressed, without query: the configured resource URL and the
    /// path, or else the request's own absolute URI, or `http://<Host><path>`.
    fn request_url(&self, parts: &::http::request::Parts) -> String {
        let path = parts.uri.path();
        if let Some(u) = self.verifier.resource_url(path) {
            return u;
        }
        if let (Some(scheme), Some(authority)) = (parts.uri.scheme_str(), parts.uri.authority()) {
            return format!("{scheme}://{authority}{path}");
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        format!("http://{host}{path}")
    }
}

/// Every value of a header; a value that is not visible ASCII becomes one that no check
/// accepts.
fn header_values(headers: &::http::HeaderMap, name: header::HeaderName) -> Vec<&str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .collect()
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`VerifyLayer`] makes.
#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    layer: VerifyLayer,
}

impl<S> std::fmt::Debug for VerifyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyService")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

/// The answer to a refused request: status, challenge, `Cache-Control: no-store`, no body.
pub fn rejection_response<B: Default>(rejection: &Rejection) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = ::http::StatusCode::from_u16(rejection.status())
        .unwrap_or(::http::StatusCode::UNAUTHORIZED);
    let headers = resp.headers_mut();
    if let Some(challenge) = rejection
        .www_authenticate()
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        headers.insert(header::WWW_AUTHENTICATE, challenge);
    }
    if rejection.code == ErrorCode::Unavailable {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl<S, B, RB> tower::Service<Request<B>> for VerifyService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service that was polled ready serves this request; the clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            match layer.check(&parts).await {
                Ok(verified) => {
                    parts.extensions.insert(verified);
                    inner.call(Request::from_parts(parts, body)).await
                }
                Err(rejection) => Ok(rejection_response(&rejection)),
            }
        })
    }
}
