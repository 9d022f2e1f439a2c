//! Per-request observability: a request id made by the broker on every log line of the
//! request (and on the response), the caller's own `x-request-id` beside it when it sent a
//! well-formed one, and request counts and latency by route and status.
//!
//! The id travels with tower-http's request-id layers (see `super::router`): a caller's header
//! is taken off the request first ([`take_client_request_id`]; kept as [`ClientRequestId`]
//! when it is short and plain), then `SetRequestIdLayer` makes the broker's
//! ([`MakeWritRequestId`]) and `PropagateRequestIdLayer` puts it on the response. A caller
//! cannot choose the id the broker logs its requests under.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Instrument;

use crate::broker::Broker;

/// The request id header, read from the caller and written on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn process_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| tag_of(crate::domain::random_id("")))
}

/// Eight characters of a random id; when the RNG failed, the process id, which is unique
/// enough for correlating log lines (request ids are not secrets).
fn tag_of(random: Result<String, crate::domain::RngError>) -> String {
    random
        .ok()
        .and_then(|id| id.get(..8).map(str::to_string))
        .unwrap_or_else(|| format!("pid{}", std::process::id()))
}

/// A caller-supplied id is logged when it is short and plain; anything else is dropped, so
/// that nothing a caller sends can forge log structure.
fn is_plain(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// The `x-request-id` a caller sent, when short and plain: logged as `client_request_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequestId(pub String);

/// Takes the caller's `x-request-id` off the request, so that the broker makes its own; a
/// short and plain one is kept as a [`ClientRequestId`], anything else is dropped.
pub async fn take_client_request_id(mut req: Request) -> Request {
    let theirs = req
        .headers_mut()
        .remove(&REQUEST_ID)
        .filter(is_plain)
        .and_then(|v| v.to_str().ok().map(str::to_string));
    if let Some(id) = theirs {
        req.extensions_mut().insert(ClientRequestId(id));
    }
    req
}

/// Request ids made here: a tag of this process and a counter.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeWritRequestId;

impl MakeRequestId for MakeWritRequestId {
    fn make_request_id<B>(&mut self, _req: &axum::http::Request<B>) -> Option<RequestId> {
        let id = format!(
            "{}-{}",
            process_tag(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

pub async fn observe(State(broker): State<Arc<Broker>>, req: Request, next: Next) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or("-")
        .to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client_request_id = tracing::field::Empty,
        method = %method,
        route = %route
    );
    if let Some(ClientRequestId(theirs)) = req.extensions().get::<ClientRequestId>() {
        span.record("client_request_id", theirs.as_str());
    }
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed().as_secs_f64();
    let status = resp.status().as_u16().to_string();
    broker.metrics.inc(
        "writ_http_requests_total",
        &[("route", &route), ("status", &status)],
    );
    broker.metrics.observe(
        "writ_http_request_duration_seconds",
        &[("route", &route)],
        elapsed,
    );
    span.in_scope(
        || tracing::debug!(status = %status, elapsed_ms = elapsed * 1000.0, "request done"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::tag_of;
    use crate::domain::RngError;

    #[test]
    fn request_ids_survive_a_failing_rng() {
        assert_eq!(tag_of(Err(RngError)), format!("pid{}", std::process::id()));
        assert_eq!(tag_of(Ok("abcdefghijk".into())), "abcdefgh");
        assert_eq!(
            tag_of(Ok("short".into())),
            format!("pid{}", std::process::id())
        );
    }
}
