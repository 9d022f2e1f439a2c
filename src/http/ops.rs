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
    let r = broker.readiness().await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r.body)).into_response()
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
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        broker.scrape_metrics().await,
    )
        .into_response()
}
