//! Per-request observability: a request id on every log line of the request (taken from a
//! well-formed `x-request-id` header or made here, and echoed back), and request counts and
//! latency by route and status.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::broker::Broker;

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

/// A caller-supplied id is kept when it is short and plain; anything else is replaced, so
/// that nothing a caller sends can forge log structure.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{}-{}",
                process_tag(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            )
        })
}

pub async fn observe(State(broker): State<Arc<Broker>>, req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
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
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
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
