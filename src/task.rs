//! The task lifecycle: open a task with its first token, mint more tokens into it within its
//! budget, end it and everything delegated from it, and read its state.

use serde::Serialize;
use serde_json::json;

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::domain::{Subject, TaskId};
use crate::error::BrokerError;
use crate::revocation::Revoked;
use crate::store::{FeedEvent, MintOutcome, TaskFilter, TaskRecord, TaskState, TokenEntry};
use crate::token::TaskClaims;

/// Most tasks one tree walk visits: a bound on the work of one end, whatever the store holds.
const MAX_TREE_NODES: usize = 10_000;

/// What ending a task tree did.
#[derive(Debug, Clone, Default)]
pub struct ClosedTree {
    /// The tasks this call closed (ones already closed are not repeated).
    pub tasks: Vec<TaskRecord>,
    /// Their tokens that had not yet expired.
    pub live_tokens: usize,
}

impl ClosedTree {
    pub fn task_ids(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.id.to_string()).collect()
    }

    pub fn absorb(&mut self, other: ClosedTree) {
        self.tasks.extend(other.tasks);
        self.live_tokens += other.live_tokens;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EndReply {
    pub task_id: String,
    pub state: &'static str,
    pub revoked_tasks: usize,
    pub revoked_tokens: usize,
}

impl Broker {
    /// Records a new task with its first token. Nothing may be issued unless this succeeded.
    pub async fn open_task(
        &self,
        task: &TaskRecord,
        first: &TokenEntry,
    ) -> Result<(), BrokerError> {
        self.store
            .create_task(task, first)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Counts one more token into an open task of `owner`, within the task budget.
    pub async fn mint_into_task(
        &self,
        id: &TaskId,
        owner: &Subject,
        token: &TokenEntry,
        now: i64,
    ) -> Result<MintOutcome, BrokerError> {
        self.store
            .mint_into_task(id, owner, token, self.limits.max_tokens, now)
            .await
            .map_err(|e| self.fail(e))
    }

    pub async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, BrokerError> {
        self.store.get_task(id).await.map_err(|e| self.fail(e))
    }

    /// Open tasks of exactly `subject`.
    pub async fn open_tasks_of(&self, subject: &Subject) -> Result<Vec<TaskRecord>, BrokerError> {
        let open = self
            .list_tasks(&TaskFilter {
                subject: Some(subject.to_string()),
                state: Some(TaskState::Open),
                limit: usize::MAX,
            })
            .await?;
        Ok(open.into_iter().filter(|t| &t.owner == subject).collect())
    }

    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>, BrokerError> {
        self.store
            .list_tasks(filter)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Closes a task and every task delegated from it.
    pub async fn close_task_tree(
        &self,
        root: &TaskId,
        state: TaskState,
        reason: &str,
    ) -> Result<ClosedTree, BrokerError> {
        let now = self.now();
        let mut closed = ClosedTree::default();
        let mut queue = vec![root.clone()];
        let mut seen = 0;
        while let Some(id) = queue.pop() {
            seen += 1;
            if seen > MAX_TREE_NODES {
                break;
            }
            closed.absorb(self.close_one(&id, state, reason, now).await?);
            let children = self
                .store
                .task_children(&id)
                .await
                .map_err(|e| self.fail(e))?;
            queue.extend(children);
        }
        Ok(closed)
    }

    /// Closes one task if it is open. The revocation is published first and the task closed
    /// only once the feed holds it: a task the store shows closed always has its revocation
    /// on the feed, whatever failed in between, and a failure before the close leaves the
    /// task open for a retry to finish (publishing again is harmless).
    async fn close_one(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> Result<ClosedTree, BrokerError> {
        let Some(before) = self.get_task(id).await? else {
            return Ok(ClosedTree::default());
        };
        if before.state != TaskState::Open {
            // A close that failed after the task was closed is finished by its retry.
            self.mark_status_revoked(id, now).await?;
            return Ok(ClosedTree::default());
        }
        let event = FeedEvent::Task {
            task_id: id.to_string(),
            until: before.deadline,
        };
        self.publish(&event, now).await?;
        let after = self
            .store
            .close_task(id, state, reason, now)
            .await
            .map_err(|e| self.fail(e))?;
        let Some(after) = after else {
            return Ok(ClosedTree::default());
        };
        // Once closed, no token can be minted into the task: this sees all of them.
        let live_tokens = self.mark_status_revoked(id, now).await?;
        Ok(ClosedTree {
            tasks: vec![after],
            live_tokens,
        })
    }

    /// Sets the status-list bit of every live token of the task (SPEC §4.6); returns how
    /// many live tokens it has.
    async fn mark_status_revoked(&self, id: &TaskId, now: i64) -> Result<usize, BrokerError> {
        let live: Vec<String> = self
            .store
            .task_tokens(id)
            .await
            .map_err(|e| self.fail(e))?
            .into_iter()
            .filter(|t| t.exp > now)
            .map(|t| t.jti)
            .collect();
        self.status.revoke(&live).await.map_err(|e| self.fail(e))?;
        Ok(live.len())
    }

    /// A holder of one of the task's tokens ends the task.
    pub async fn end_task(
        &self,
        id: &TaskId,
        bearer: &str,
        source_ip: Option<String>,
    ) -> Result<EndReply, BrokerError> {
        let claims = self.end_credential(id, bearer)?;
        let reason = "ended by its holder";
        let closed = self.close_task_tree(id, TaskState::Ended, reason).await?;
        self.record(
            Event::TaskEnd,
            audit::Entry {
                decision: Some("allow"),
                subject: Some(claims.sub.clone()),
                task_id: Some(id.to_string()),
                jti: Some(claims.jti.clone()),
                reason: reason.into(),
                source_ip,
                detail: Some(json!({
                    "closed_tasks": closed.task_ids(),
                    "revoked_tokens": closed.live_tokens,
                })),
                ..audit::Entry::default()
            },
        )?;
        Ok(EndReply {
            task_id: id.to_string(),
            state: "ended",
            revoked_tasks: closed.tasks.len(),
            revoked_tokens: closed.live_tokens,
        })
    }

    /// The claims of a token that may end task `id`: a valid token of the task, or one whose
    /// only revocation is this task's own end, so that an end that failed half-way (503) is
    /// finished by a retry with the same token.
    fn end_credential(&self, id: &TaskId, bearer: &str) -> Result<TaskClaims, BrokerError> {
        if !self.revocations.is_fresh() {
            return Err(BrokerError::unavailable());
        }
        let now = self.now();
        let invalid = || BrokerError::invalid_token("the bearer token is not valid");
        let claims = self.verified_token(bearer, now).ok_or_else(invalid)?;
        match self.revocations.revoked_reason(&claims, now) {
            None => {}
            Some(Revoked::Task) if claims.txn == id.as_str() => {}
            Some(_) => return Err(invalid()),
        }
        if claims.txn != id.as_str() {
            return Err(BrokerError::access_denied(
                "the bearer token belongs to another task",
            ));
        }
        Ok(claims)
    }

    /// A task's state, for a holder of one of its tokens or an admin.
    pub async fn task_state(
        &self,
        id: &TaskId,
        authorization: Option<&str>,
        source_ip: Option<String>,
    ) -> Result<TaskRecord, BrokerError> {
        let token =
            crate::auth::bearer(authorization).ok_or_else(BrokerError::credentials_required)?;
        let holder = self
            .check_token(token)
            .await?
            .filter(|c| c.txn == id.as_str());
        if holder.is_none() {
            self.authorize(authorization, crate::auth::Role::Admin, source_ip)
                .await?;
        }
        self.get_task(id)
            .await?
            .ok_or_else(|| BrokerError::not_found("no such task"))
    }
}
