//! The HTTP surface: parses the wire form, calls one use case, writes the answer.

pub mod admin;
pub mod audit;
pub mod error;
pub mod oauth;
pub mod observe;
pub mod ops;
pub mod tasks;

use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post};

use crate::broker::Broker;

/// Every route (method, path): the router is built from this list's handlers below, and a
/// test checks the OpenAPI description against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/oauth2/token"),
    ("POST", "/oauth2/introspect"),
    ("POST", "/oauth2/revoke"),
    ("GET", "/oauth2/jwks"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/v1/tasks/{task_id}"),
    ("POST", "/v1/tasks/{task_id}/end"),
    ("POST", "/admin/v1/revocations"),
    ("GET", "/admin/v1/revocations"),
    ("DELETE", "/admin/v1/revocations/{id}"),
    ("GET", "/admin/v1/quarantines"),
    ("DELETE", "/admin/v1/quarantines/{id}"),
    ("GET", "/admin/v1/tasks"),
    ("GET", "/admin/v1/audit/head"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/oauth2/token", post(oauth::token))
        .route("/oauth2/introspect", post(oauth::introspect))
        .route("/oauth2/revoke", post(oauth::revoke))
        .route("/oauth2/jwks", get(oauth::jwks))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::metadata),
        )
        .route("/v1/tasks/{task_id}", get(tasks::get_task))
        .route("/v1/tasks/{task_id}/end", post(tasks::end_task))
        .route(
            "/admin/v1/revocations",
            post(admin::create_revocation).get(admin::list_revocations),
        )
        .route("/admin/v1/revocations/{id}", delete(admin::lift_revocation))
        .route("/admin/v1/quarantines", get(admin::list_quarantines))
        .route("/admin/v1/quarantines/{id}", delete(admin::lift_quarantine))
        .route("/admin/v1/tasks", get(admin::list_tasks))
        .route("/admin/v1/audit/head", get(audit::head))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route_layer(axum::middleware::from_fn_with_state(
            broker.clone(),
            observe::observe,
        ))
        .with_state(broker)
}
