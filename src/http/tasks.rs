//! Task endpoints: state and end, for holders of the task's tokens (and admins for state).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::json_no_store;
use super::extract::{Authorization, SourceIp};
use crate::auth::bearer;
use crate::broker::Broker;
use crate::domain::TaskId;
use crate::error::BrokerError;
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
    TaskId::parse(raw).ok_or_else(|| BrokerError::not_found("no such task"))
}

pub async fn get_task(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    Path(raw): Path<String>,
) -> Response {
    let result = async {
        let id = parse_task_id(&raw)?;
        broker.task_state(&id, auth.as_deref(), ip).await
    }
    .await;
    match result {
        Ok(t) => json_no_store(task_json(&t)),
        Err(e) => e.into_response(),
    }
}

pub async fn end_task(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    Path(raw): Path<String>,
) -> Response {
    let result = async {
        let id = parse_task_id(&raw)?;
        let token = bearer(auth.as_deref()).ok_or_else(BrokerError::credentials_required)?;
        broker.end_task(&id, token, ip).await
    }
    .await;
    match result {
        Ok(r) => json_no_store(json!(r)),
        Err(e) => e.into_response(),
    }
}
