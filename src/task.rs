//! The task lifecycle: open a task with its first token, mint more tokens into it within its
//! budget, end it and everything delegated from it, and read its state.

use serde::Serialize;
use serde_json::json;

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::domain::{Subject, TaskId};
use crate::error::BrokerError;
use crate::revocation::Revoked;
use crate::store::{
    DelegateOutcome, FeedEvent, MAX_TREE_NODES, MintOutcome, SubtreeClose, TaskFilter, TaskRecord,
    TaskState, TokenEntry,
};
use crate::token::TaskClaims;

/// Store steps one end takes at most: each publishes the tasks delegated since the last.
const CLOSE_TRIES: usize = 4;

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

    /// Records a task delegated from another, re-checking its parent open, its grant not
    /// revoked and the tree's budget in the same store step.
    pub async fn open_delegated_task(
        &self,
        task: &TaskRecord,
        first: &TokenEntry,
        now: i64,
    ) -> Result<DelegateOutcome, BrokerError> {
        self.store
            .create_delegated_task(task, first, self.limits.max_tokens, now)
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

    /// Closes a task and every task delegated from it, at any depth, in one store step
    /// ([`crate::store::Store::close_subtree`]). The revocation of every task is published
    /// before the step that closes it: the store first answers with the open tasks it would
    /// close, their revocations go on the feed, and the close goes through once no task is
    /// missing. A failure before that step leaves the whole subtree open for a retry to
    /// finish; no task is ever shown closed while its descendants are open.
    pub async fn close_task_tree(
        &self,
        root: &TaskId,
        state: TaskState,
        reason: &str,
    ) -> Result<ClosedTree, BrokerError> {
        let now = self.now();
        let mut known: Vec<TaskId> = Vec::new();
        for attempt in 1..=CLOSE_TRIES {
            // On the last try a task delegated in between is closed too and published right
            // after: the store shows it closed in the same step as the rest.
            let force = attempt == CLOSE_TRIES;
            let step = self
                .store
                .close_subtree(root, state, reason, now, &known, force)
                .await
                .map_err(|e| self.fail(e))?;
            match step {
                SubtreeClose::Unknown(open) => {
                    for (id, until) in open {
                        self.publish_task_end(&id, until, now).await?;
                        known.push(id);
                    }
                }
                SubtreeClose::Closed(tasks) if tasks.is_empty() => {
                    // Nothing was open: a close that failed after its store step is finished
                    // by its retry, which sets the status bits of the subtree's tokens again
                    // (setting a bit twice is harmless).
                    self.mark_subtree_status_revoked(root, now).await?;
                    return Ok(ClosedTree::default());
                }
                SubtreeClose::Closed(tasks) => {
                    let mut live_tokens = 0;
                    for t in &tasks {
                        if !known.contains(&t.id) {
                            self.publish_task_end(&t.id, t.deadline, now).await?;
                        }
                        // Once closed, no token can be minted into the task: this sees all.
                        live_tokens += self.mark_status_revoked(&t.id, now).await?;
                    }
                    return Ok(ClosedTree { tasks, live_tokens });
                }
            }
        }
        Ok(ClosedTree::default())
    }

    /// Puts the end of one task on the revocation feed (publishing again is harmless).
    async fn publish_task_end(&self, id: &TaskId, until: i64, now: i64) -> Result<(), BrokerError> {
        let event = FeedEvent::Task {
            task_id: id.to_string(),
            until,
        };
        self.publish(&event, now).await
    }

    /// Ends the tasks delegated from the grant `jti` (and their subtrees), and refuses any
    /// later delegation from it. `task` is the grant's own task, when known.
    pub async fn end_delegations_of(
        &self,
        jti: &str,
        task: Option<&TaskId>,
        until: i64,
    ) -> Result<ClosedTree, BrokerError> {
        let now = self.now();
        let delegated = self
            .store
            .revoke_grant(jti, task, until, now)
            .await
            .map_err(|e| self.fail(e))?;
        let mut closed = ClosedTree::default();
        for id in delegated {
            closed.absorb(
                self.close_task_tree(&id, TaskState::Revoked, "its delegation grant was revoked")
                    .await?,
            );
        }
        Ok(closed)
    }

    /// Sets the status-list bits of the live tokens of `root` and of every task delegated
    /// from it (at most [`MAX_TREE_NODES`] tasks).
    async fn mark_subtree_status_revoked(
        &self,
        root: &TaskId,
        now: i64,
    ) -> Result<(), BrokerError> {
        let mut queue = vec![root.clone()];
        let mut seen = 0;
        while let Some(id) = queue.pop() {
            seen += 1;
            if seen > MAX_TREE_NODES {
                break;
            }
            self.mark_status_revoked(&id, now).await?;
            queue.extend(
                self.store
                    .task_children(&id)
                    .await
                    .map_err(|e| self.fail(e))?,
            );
        }
        Ok(())
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
