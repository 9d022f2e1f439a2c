//! `GET /admin/v1/audit/head`: the decision log's latest signed head, as kept in the store
//! (SPEC §6), for `writ audit verify --head-from`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::json_no_store;
use super::extract::{Authorization, SourceIp};
use crate::auth::Role;
use crate::broker::Broker;

pub async fn head(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
) -> Response {
    let result = async {
        broker.authorize(auth.as_deref(), Role::Admin, ip).await?;
        broker.audit_head().await
    }
    .await;
    match result {
        Ok(head) => json_no_store(json!(head)),
        Err(e) => e.into_response(),
    }
}
