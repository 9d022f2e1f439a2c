//! The approver's side of approval gates (SPEC §4.7): list, approve, deny.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::json_no_store;
use super::extract::{Authorization, BoundedBody, SourceIp};
use crate::approvals::Verdict;
use crate::broker::Broker;
use crate::domain::MAX_PURPOSE_LEN;
use crate::error::BrokerError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalQuery {
    state: Option<String>,
}

pub async fn list(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    query: Result<Query<ApprovalQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(q) =
            query.map_err(|_| BrokerError::invalid_request("the query parameter is `state`"))?;
        broker
            .list_approvals(auth.as_deref(), q.state.as_deref(), ip)
            .await
    }
    .await;
    match result {
        Ok(list) => json_no_store(json!({ "approvals": list })),
        Err(e) => e.into_response(),
    }
}

pub async fn approve(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    Path(id): Path<String>,
) -> Response {
    let result = broker
        .decide_approval(auth.as_deref(), &id, Verdict::Approve, ip)
        .await;
    match result {
        Ok(v) => json_no_store(v),
        Err(e) => e.into_response(),
    }
}

pub async fn deny(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    Path(id): Path<String>,
    body: Result<BoundedBody, BrokerError>,
) -> Response {
    let result = async {
        let reason = parse_reason(&body?.0)?;
        broker
            .decide_approval(auth.as_deref(), &id, Verdict::Deny { reason }, ip)
            .await
    }
    .await;
    match result {
        Ok(v) => json_no_store(v),
        Err(e) => e.into_response(),
    }
}

/// `{"reason": R}`: a non-empty reason of at most 1 KiB; an empty body gives no reason.
fn parse_reason(body: &[u8]) -> Result<String, BrokerError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| BrokerError::invalid_request("the body must be a JSON object"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| BrokerError::invalid_request("the body must be a JSON object"))?;
    if obj.keys().any(|k| k != "reason") {
        return Err(BrokerError::invalid_request("the only field is `reason`"));
    }
    let reason = match obj.get("reason") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.trim(),
        Some(_) => return Err(BrokerError::invalid_request("`reason` must be a string")),
    };
    if reason.len() > MAX_PURPOSE_LEN {
        return Err(BrokerError::invalid_request(
            "`reason` is longer than 1024 bytes",
        ));
    }
    Ok(reason.to_string())
}
