//! The admin API for security teams: revocations and task listings.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::json_no_store;
use super::extract::{Authorization, BoundedBody, SourceIp};
use super::tasks::task_json;
use crate::auth::Role;
use crate::broker::Broker;
use crate::domain::{MAX_PURPOSE_LEN, TaskId};
use crate::error::BrokerError;
use crate::revoke::Selector;
use crate::store::{BlockKind, BlockSelector, TaskFilter, TaskState};

/// Parses `{"selector": {...}, "reason": R}` strictly.
pub fn parse_revocation(body: &[u8]) -> Result<(Selector, String), BrokerError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| BrokerError::invalid_request("the body must be a JSON object"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| BrokerError::invalid_request("the body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| *k != "selector" && *k != "reason") {
        return Err(BrokerError::invalid_request(format!(
            "unknown field `{}`",
            k.chars().take(64).collect::<String>()
        )));
    }
    let reason = obj
        .get("reason")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            BrokerError::invalid_request("`reason` is required and must not be empty")
        })?;
    if reason.len() > MAX_PURPOSE_LEN {
        return Err(BrokerError::invalid_request(
            "`reason` is longer than 1024 bytes",
        ));
    }
    let sel = obj
        .get("selector")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            BrokerError::invalid_request("`selector` is required and must be an object")
        })?;
    if sel.len() != 1 {
        return Err(BrokerError::invalid_request(
            "`selector` must have exactly one of `jti`, `task_id`, `subject`, `issuer`, `all`",
        ));
    }
    let (kind, value) = sel
        .iter()
        .next()
        .ok_or_else(|| BrokerError::invalid_request("empty selector"))?;
    Ok((parse_selector(kind, value)?, reason.to_string()))
}

/// One selector of a revocation: `jti`, `task_id`, `subject`, `issuer` or `all`.
fn parse_selector(kind: &str, value: &Value) -> Result<Selector, BrokerError> {
    let text = |what: &str| {
        value
            .as_str()
            .filter(|s| !s.is_empty() && s.len() <= 2048)
            .map(str::to_string)
            .ok_or_else(|| {
                BrokerError::invalid_request(format!(
                    "`selector.{what}` must be a non-empty string"
                ))
            })
    };
    let selector =
        match kind {
            "jti" => Selector::Jti(text("jti")?),
            "task_id" => Selector::Task(TaskId::parse(&text("task_id")?).ok_or_else(|| {
                BrokerError::invalid_request("`selector.task_id` is not a task id")
            })?),
            "subject" => {
                let p = text("subject")?;
                let base = p.strip_suffix("/*").unwrap_or(&p);
                let ok = crate::domain::parse_spiffe_id(base).is_some()
                    || (base.contains('#') && !base.ends_with('#'));
                if !ok {
                    return Err(BrokerError::invalid_request(
                        "`selector.subject` must be a subject or a subject prefix ending in `/*`",
                    ));
                }
                Selector::Block(BlockSelector::Subject(p))
            }
            "issuer" => Selector::Block(BlockSelector::Issuer(text("issuer")?)),
            "all" => {
                if value.as_bool() != Some(true) {
                    return Err(BrokerError::invalid_request("`selector.all` must be true"));
                }
                Selector::Block(BlockSelector::All(crate::store::Everything))
            }
            other => {
                return Err(BrokerError::invalid_request(format!(
                    "unknown selector `{}`",
                    other.chars().take(64).collect::<String>()
                )));
            }
        };
    Ok(selector)
}

pub async fn create_revocation(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    body: Result<BoundedBody, BrokerError>,
) -> Response {
    let result = async {
        let caller = broker
            .authorize(auth.as_deref(), Role::Admin, ip.clone())
            .await?;
        let (selector, reason) = parse_revocation(&body?.0)?;
        broker
            .admin_revoke(selector, &reason, &caller.name(), ip)
            .await
    }
    .await;
    match result {
        Ok(r) => json_no_store(json!(r)),
        Err(e) => e.into_response(),
    }
}

/// Answers an admin listing of the blocks of one kind: `{"<collection>": [...]}`.
async fn list_blocks(
    broker: &Broker,
    ip: Option<String>,
    auth: &Authorization,
    kind: BlockKind,
) -> Response {
    let result = async {
        broker.authorize(auth.as_deref(), Role::Admin, ip).await?;
        broker.list_blocks(kind).await
    }
    .await;
    match result {
        Ok(listed) => json_no_store(json!({ kind.collection(): listed })),
        Err(e) => e.into_response(),
    }
}

pub async fn list_revocations(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
) -> Response {
    list_blocks(&broker, ip, &auth, BlockKind::Revocation).await
}

pub async fn list_quarantines(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
) -> Response {
    list_blocks(&broker, ip, &auth, BlockKind::Quarantine).await
}

async fn lift_block(
    broker: &Broker,
    ip: Option<String>,
    auth: &Authorization,
    kind: BlockKind,
    id: &str,
) -> Response {
    let result = async {
        let caller = broker
            .authorize(auth.as_deref(), Role::Admin, ip.clone())
            .await?;
        broker.lift_block(kind, id, &caller.name(), ip).await
    }
    .await;
    match result {
        Ok(r) => json_no_store(json!(r)),
        Err(e) => e.into_response(),
    }
}

pub async fn lift_revocation(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    Path(id): Path<String>,
) -> Response {
    lift_block(&broker, ip, &auth, BlockKind::Revocation, &id).await
}

pub async fn lift_quarantine(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    Path(id): Path<String>,
) -> Response {
    lift_block(&broker, ip, &auth, BlockKind::Quarantine, &id).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskQuery {
    subject: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

impl TaskQuery {
    fn filter(self) -> Result<TaskFilter, BrokerError> {
        let state = match self.state.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some("open") => Some(TaskState::Open),
            Some("ended") => Some(TaskState::Ended),
            Some("revoked") => Some(TaskState::Revoked),
            Some(_) => {
                return Err(BrokerError::invalid_request(
                    "`state` is one of open, ended, revoked",
                ));
            }
        };
        Ok(TaskFilter {
            subject: self.subject.filter(|s| !s.is_empty()),
            state,
            limit: self.limit.unwrap_or(100).clamp(1, 1000),
        })
    }
}

pub async fn list_tasks(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    query: Result<Query<TaskQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        broker.authorize(auth.as_deref(), Role::Admin, ip).await?;
        let Query(q) = query.map_err(|_| {
            BrokerError::invalid_request("query parameters are `subject`, `state` and `limit`")
        })?;
        broker.list_tasks(&q.filter()?).await
    }
    .await;
    match result {
        Ok(tasks) => {
            json_no_store(json!({"tasks": tasks.iter().map(task_json).collect::<Vec<_>>()}))
        }
        Err(e) => e.into_response(),
    }
}

/// An operator confirms that the store lost its revocation state (README, Redis operations).
pub async fn confirm_store_reset(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
) -> Response {
    let result = async {
        let caller = broker
            .authorize(auth.as_deref(), Role::Admin, ip.clone())
            .await?;
        broker.confirm_store_reset(&caller.name(), ip).await
    }
    .await;
    match result {
        Ok(confirmed) => json_no_store(json!({"confirmed": confirmed})),
        Err(e) => e.into_response(),
    }
}
