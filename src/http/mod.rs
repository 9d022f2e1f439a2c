//! The HTTP surface: parses the wire form, calls one use case, writes the answer.

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod error;
pub mod extract;
pub mod oauth;
pub mod observe;
pub mod ops;
pub mod serve;
pub mod tasks;

use std::sync::Arc;

use axum::Router;
use axum::middleware::{from_fn_with_state, map_request, map_response};
use axum::routing::{delete, get, post};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::broker::Broker;

/// Every route (method, path): the router is built from this list's handlers below, and a
/// test checks the OpenAPI description against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/oauth2/token"),
    ("POST", "/oauth2/introspect"),
    ("POST", "/oauth2/revoke"),
    ("GET", "/oauth2/jwks"),
    ("GET", "/oauth2/status/{list}"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/v1/tasks/{task_id}"),
    ("POST", "/v1/tasks/{task_id}/end"),
    ("POST", "/admin/v1/revocations"),
    ("GET", "/admin/v1/revocations"),
    ("DELETE", "/admin/v1/revocations/{id}"),
    ("GET", "/admin/v1/quarantines"),
    ("DELETE", "/admin/v1/quarantines/{id}"),
    ("GET", "/admin/v1/tasks"),
    ("POST", "/admin/v1/store/confirm-reset"),
    ("GET", "/admin/v1/audit/head"),
    ("GET", "/admin/v1/approvals"),
    ("POST", "/admin/v1/approvals/{id}/approve"),
    ("POST", "/admin/v1/approvals/{id}/deny"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// The routes at the root and, for an issuer with a path (`https://h/writ`), under that path
/// too, so that the endpoints the metadata advertises are served; the metadata is also at
/// `/.well-known/oauth-authorization-server/writ` (RFC 8414 §3.1).
pub fn router(broker: Arc<Broker>) -> Router {
    let mut routes = routes(&broker);
    if let Some(prefix) = crate::config::issuer_path(broker.tokens.issuer()) {
        routes = routes.nest(&prefix, self::routes(&broker)).route(
            &format!("/.well-known/oauth-authorization-server{prefix}"),
            get(oauth::metadata),
        );
    }
    layered(routes, broker)
}

/// The router of the `[admin] listen` address: `/admin/v1/*` (at the root and under the
/// issuer's path, as on the main listener) and nothing else.
pub fn admin_router(broker: Arc<Broker>) -> Router {
    let mut routes = admin_routes();
    if let Some(prefix) = crate::config::issuer_path(broker.tokens.issuer()) {
        routes = routes.nest(&prefix, admin_routes());
    }
    layered(routes, broker)
}

fn routes(broker: &Arc<Broker>) -> Router<Arc<Broker>> {
    Router::new()
        .route("/oauth2/token", post(oauth::token))
        .route("/oauth2/introspect", post(oauth::introspect))
        .route("/oauth2/revoke", post(oauth::revoke))
        .route("/oauth2/jwks", get(oauth::jwks))
        .route("/oauth2/status/{list}", get(oauth::status_list))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::metadata),
        )
        .route("/v1/tasks/{task_id}", get(tasks::get_task))
        .route("/v1/tasks/{task_id}/end", post(tasks::end_task))
        .merge(admin_on_main_listener(broker))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .merge(metrics_on_main_listener(broker))
        .route("/openapi.json", get(ops::openapi))
}

fn admin_routes() -> Router<Arc<Broker>> {
    Router::new()
        .route(
            "/admin/v1/revocations",
            post(admin::create_revocation).get(admin::list_revocations),
        )
        .route("/admin/v1/revocations/{id}", delete(admin::lift_revocation))
        .route("/admin/v1/quarantines", get(admin::list_quarantines))
        .route("/admin/v1/quarantines/{id}", delete(admin::lift_quarantine))
        .route("/admin/v1/tasks", get(admin::list_tasks))
        .route(
            "/admin/v1/store/confirm-reset",
            post(admin::confirm_store_reset),
        )
        .route("/admin/v1/audit/head", get(audit::head))
        .route("/admin/v1/approvals", get(approvals::list))
        .route("/admin/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/admin/v1/approvals/{id}/deny", post(approvals::deny))
}

/// `/admin/v1/*` stays on the main listener unless `[admin] listen` moves it.
fn admin_on_main_listener(broker: &Arc<Broker>) -> Router<Arc<Broker>> {
    match broker.config.admin.listen {
        None => admin_routes(),
        Some(_) => Router::new(),
    }
}

fn layered(routes: Router<Arc<Broker>>, broker: Arc<Broker>) -> Router {
    routes
        // Layers run outermost last in this list: the request id is settled first, so every
        // response (a refused body too) carries it and is counted by `observe`.
        .route_layer(RequestBodyLimitLayer::new(extract::MAX_BODY_BYTES))
        .route_layer(map_response(error::payload_too_large_as_oauth_error))
        .route_layer(from_fn_with_state(broker.clone(), observe::observe))
        .route_layer(PropagateRequestIdLayer::new(observe::REQUEST_ID))
        .route_layer(SetRequestIdLayer::new(
            observe::REQUEST_ID,
            observe::MakeWritRequestId,
        ))
        .route_layer(map_request(observe::take_client_request_id))
        .with_state(broker)
}

/// `/metrics` stays on the main listener unless `[metrics] listen` moves it.
fn metrics_on_main_listener(broker: &Arc<Broker>) -> Router<Arc<Broker>> {
    match broker.config.metrics.listen {
        None => Router::new().route("/metrics", get(ops::metrics)),
        Some(_) => Router::new(),
    }
}

/// The router of the `[metrics] listen` address: `/metrics` and nothing else.
pub fn metrics_router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .with_state(broker)
}
