//! Task endpoints: state and end, for holders of the task's tokens (and admins for state).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{authorization, json_no_store};
use crate::auth::{Role, bearer};
use crate::broker::Broker;
use crate::domain::TaskId;
use crate::error::{BrokerError, ErrorCode};
use crate::store::TaskRecord;

pub fn task_json(t: &TaskRecord) -> serde_json::Value {
    json!({
        "task_id": t.id,
        "owner": t.owner,
        "state": t.state.as_str(),
        "purpose": t.purpose,
        "created_at": t.created_at,
        "deadline": t.deadline,
        "ended_at": t.ended_at,
        "end_reason": t.end_reason,
        "policy_version": t.policy_version,
        "scopes": t.scopes,
        "audience": t.audience,
        "tokens_issued": t.tokens_issued,
        "parent": t.parent,
        "depth": t.depth,
    })
}

fn parse_task_id(raw: &str) -> Result<TaskId, BrokerError> {
    TaskId::parse(raw).ok_or_else(|| BrokerError::new(ErrorCode::NotFound, "no such task"))
}

pub async fn get_task(
    State(broker): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let id = parse_task_id(&raw)?;
        let token = bearer(authorization(&headers)).ok_or_else(|| {
            BrokerError::new(ErrorCode::InvalidToken, "a bearer credential is required")
        })?;
        // A valid token of this task, or an admin.
        let holder = broker.check_token(token)?.filter(|c| c.txn == id.as_str());
        if holder.is_none() {
            broker
                .authorize(
                    authorization(&headers),
                    Role::Admin,
                    Some(peer.ip().to_string()),
                )
                .await?;
        }
        let task = broker
            .store
            .get_task(&id)
            .await
            .map_err(|_| BrokerError::unavailable())?;
        task.ok_or_else(|| BrokerError::new(ErrorCode::NotFound, "no such task"))
    }
    .await;
    match result {
        Ok(t) => json_no_store(task_json(&t)),
        Err(e) => e.into_response(),
    }
}

pub async fn end_task(
    State(broker): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let id = parse_task_id(&raw)?;
        let token = bearer(authorization(&headers)).ok_or_else(|| {
            BrokerError::new(ErrorCode::InvalidToken, "a bearer credential is required")
        })?;
        broker
            .end_task(&id, token, Some(peer.ip().to_string()))
            .await
    }
    .await;
    match result {
        Ok(r) => json_no_store(json!(r)),
        Err(e) => e.into_response(),
    }
}
