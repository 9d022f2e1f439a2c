//! `GET /admin/v1/audit/head`: the decision log's latest signed head, as kept in the store
//! (SPEC §6), for `writ audit verify --head-from`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{authorization, json_no_store};
use crate::auth::Role;
use crate::broker::Broker;
use crate::error::{BrokerError, ErrorCode};

pub async fn head(
    State(broker): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        broker
            .authorize(
                authorization(&headers),
                Role::Admin,
                Some(peer.ip().to_string()),
            )
            .await?;
        let none = || {
            BrokerError::new(
                ErrorCode::NotFound,
                "the decision log has no checkpoint yet",
            )
        };
        let log_id = broker.audit.log_id().ok_or_else(none)?;
        broker
            .store
            .audit_head(&log_id)
            .await
            .map_err(|e| broker.store_failed(e))?
            .ok_or_else(none)
    }
    .await;
    match result {
        Ok(head) => json_no_store(json!(head)),
        Err(e) => e.into_response(),
    }
}
