//! Liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::broker::Broker;

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready when the store answers and keys and policies are loaded.
pub async fn readyz(State(broker): State<Arc<Broker>>) -> Response {
    let store_ok = broker.store.ping().await.is_ok();
    let policy = broker.policy.current();
    let keys = broker.tokens.keys().all().len();
    let feed_ok = broker.revocations.is_fresh();
    let log_ok = !broker.audit.is_failed();
    let ready = store_ok && feed_ok && log_ok && keys > 0;
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "store": if store_ok { "ok" } else { "unreachable" },
            "revocation_feed": if feed_ok { "ok" } else { "stale" },
            "decision_log": if log_ok { "ok" } else { "failed" },
            "signing_keys": keys,
            "policy_version": policy.version(),
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The OpenAPI 3.1 description of this API (kept true by a test that compares it with the
/// router's routes, and by a schemathesis run against it).
pub const OPENAPI: &str = include_str!("../../config/openapi.json");

pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

/// Prometheus metrics; gauges are read at scrape time.
pub async fn metrics(State(broker): State<Arc<Broker>>) -> Response {
    let m = &broker.metrics;
    match broker.store.count_open_tasks(broker.now()).await {
        Ok(n) => m.set("writ_open_tasks", &[], n),
        Err(_) => m.inc("writ_store_errors_total", &[]),
    }
    m.set(
        "writ_revocation_feed_lag_milliseconds",
        &[],
        broker.revocations.lag_ms(),
    );
    m.set(
        "writ_revocation_feed_fresh",
        &[],
        u64::from(broker.revocations.is_fresh()),
    );
    let (jtis, tasks, blocks) = broker.revocations.counts();
    m.set(
        "writ_revocation_cache_entries",
        &[("kind", "token")],
        jtis as u64,
    );
    m.set(
        "writ_revocation_cache_entries",
        &[("kind", "task")],
        tasks as u64,
    );
    m.set(
        "writ_revocation_cache_entries",
        &[("kind", "block")],
        blocks as u64,
    );
    let a = broker.audit.stats();
    for (name, help, v) in [
        (
            "writ_audit_append_failures_total",
            "Decision log appends that failed (the record is missing).",
            a.append_failures,
        ),
        (
            "writ_audit_fsyncs_total",
            "Decision log fdatasync calls (one covers every record waiting).",
            a.fsyncs,
        ),
        (
            "writ_audit_written_seq",
            "The highest decision log seq handed to the operating system.",
            a.written_seq,
        ),
        (
            "writ_audit_synced_seq",
            "The highest decision log seq known to be on disk.",
            a.synced_seq,
        ),
        (
            "writ_audit_checkpoints_total",
            "Signed checkpoints written to the decision log.",
            a.checkpoints,
        ),
        (
            "writ_audit_checkpoint_failures_total",
            "Checkpoints that could not be signed or written.",
            a.checkpoint_failures,
        ),
        (
            "writ_audit_summarised_total",
            "Refusals of unauthenticated callers counted into summary records instead of written.",
            a.summarised,
        ),
    ] {
        m.describe(name, help);
        m.set(name, &[], v);
    }
    m.set_only(
        "writ_policy_version_info",
        &[("version", broker.policy.current().version())],
        1,
    );
    for (i, k) in broker.tokens.keys().all().iter().enumerate() {
        let active = if i == 0 { "true" } else { "false" };
        m.set(
            "writ_signing_key_info",
            &[("kid", &k.kid), ("alg", k.alg.name()), ("active", active)],
            1,
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        broker.metrics.render(),
    )
        .into_response()
}
