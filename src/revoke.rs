//! The use cases that revoke: a holder's own token (RFC 7009) and a security team's
//! selectors (SPEC §4.3), with the standing blocks they leave.

use serde::Serialize;
use serde_json::json;

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::domain::TaskId;
use crate::error::BrokerError;
use crate::store::{BlockKind, BlockRecord, BlockSelector, FeedEvent, TaskFilter, TaskState};
use crate::task::ClosedTree;

/// An admin revocation request.
#[derive(Debug, Clone)]
pub enum Selector {
    Jti(String),
    Task(TaskId),
    Block(BlockSelector),
}

#[derive(Debug, Clone, Serialize)]
pub struct RevocationReply {
    pub revocation_id: String,
    pub revoked_tasks: usize,
    pub revoked_tokens: usize,
}

/// Why `id` cannot be lifted: unknown, already pruned, or a revocation that leaves nothing
/// standing (a `jti` or `task_id` one is final).
fn not_liftable(kind: BlockKind, id: &str) -> String {
    let noun = kind.noun();
    match kind {
        BlockKind::Revocation => format!(
            "no standing {noun} `{id}`: only subject, issuer and all revocations stand until \
             lifted; a jti or task_id revocation is final and leaves nothing to lift"
        ),
        BlockKind::Quarantine => format!("no standing {noun} `{id}` (it may have ended)"),
    }
}

/// A fresh block id with the given prefix (`rev`, `qtn`).
pub fn new_block_id(prefix: &str) -> Result<String, crate::domain::RngError> {
    crate::domain::random_id(&format!("{prefix}_"))
}

impl Broker {
    /// RFC 7009: the holder revokes its own token. Unknown or invalid tokens are not an
    /// error (the answer is the same 200).
    pub async fn revoke_own_token(
        &self,
        token: &str,
        source_ip: Option<String>,
    ) -> Result<(), BrokerError> {
        let now = self.now();
        let Some(claims) = self.verified_token(token, now) else {
            return Ok(());
        };
        // Already revoked (by itself, its task or a selector): nothing to publish or log, so
        // one holder cannot grow the feed or the decision log by repeating the call.
        if self.revocations.revoked_reason(&claims, now).is_some() {
            // A retry after a failure still ends what was delegated from it.
            return self.end_delegations(&claims).await;
        }
        let event = FeedEvent::Token {
            jti: claims.jti.clone(),
            until: claims.exp,
        };
        self.record(
            Event::Revoke,
            audit::Entry {
                decision: Some("allow"),
                subject: Some(claims.sub.clone()),
                task_id: Some(claims.txn.clone()),
                jti: Some(claims.jti.clone()),
                reason: "holder revoked its token".into(),
                source_ip,
                ..audit::Entry::default()
            },
        )?;
        self.publish(&event, now).await?;
        self.end_delegations(&claims).await
    }

    /// A revoked token may be a delegation grant: the tasks delegated from it end with it
    /// (SPEC §4.4), and no exchange of it is recorded afterwards.
    async fn end_delegations(&self, claims: &crate::token::TaskClaims) -> Result<(), BrokerError> {
        self.end_delegations_of(&claims.jti, TaskId::parse(&claims.txn).as_ref(), claims.exp)
            .await
            .map(|_| ())
    }

    /// A security team's revocation (SPEC §4.3).
    pub async fn admin_revoke(
        &self,
        selector: Selector,
        reason: &str,
        actor: &str,
        source_ip: Option<String>,
    ) -> Result<RevocationReply, BrokerError> {
        let now = self.now();
        let id = new_block_id("rev").map_err(|e| self.fail(e))?;
        let (closed, detail) = match &selector {
            Selector::Jti(jti) => {
                let event = FeedEvent::Token {
                    jti: jti.clone(),
                    until: self.limits.token_horizon(now),
                };
                self.publish(&event, now).await?;
                // The tasks delegated from it, if it is a delegation grant, end with it.
                let mut closed = self
                    .end_delegations_of(jti, None, self.limits.token_horizon(now))
                    .await?;
                closed.live_tokens += 1;
                (closed, json!({"jti": jti}))
            }
            Selector::Task(task) => {
                if self.get_task(task).await?.is_none() {
                    return Err(BrokerError::not_found(format!("no task `{task}`")));
                }
                let closed = self
                    .close_task_tree(task, TaskState::Revoked, reason)
                    .await?;
                (closed, json!({"task_id": task.to_string()}))
            }
            Selector::Block(sel) => {
                let closed = self.block(&id, sel, reason, actor, now).await?;
                (closed, serde_json::to_value(sel).unwrap_or_default())
            }
        };
        self.record(
            Event::Admin,
            audit::Entry {
                decision: Some("allow"),
                subject: Some(actor.to_string()),
                reason: format!("revocation {id}: {reason}"),
                source_ip,
                detail: Some(json!({
                    "action": "revoke",
                    "revocation_id": id,
                    "selector": detail,
                    "revoked_tasks": closed.tasks.len(),
                    "revoked_tokens": closed.live_tokens,
                })),
                ..audit::Entry::default()
            },
        )?;
        Ok(RevocationReply {
            revocation_id: id,
            revoked_tasks: closed.tasks.len(),
            revoked_tokens: closed.live_tokens,
        })
    }

    /// A standing block: every token issued before it for the selector is revoked, new
    /// exchanges are refused until it is lifted, and the open tasks it covers are revoked.
    async fn block(
        &self,
        id: &str,
        sel: &BlockSelector,
        reason: &str,
        actor: &str,
        now: i64,
    ) -> Result<ClosedTree, BrokerError> {
        let record = BlockRecord {
            id: id.to_string(),
            selector: sel.clone(),
            reason: reason.to_string(),
            actor: actor.to_string(),
            created_at: now,
            until: self.limits.token_horizon(now),
            lifted_at: None,
            kind: BlockKind::Revocation,
            expires_at: None,
        };
        self.publish(&FeedEvent::Block { record }, now).await?;
        self.cancel_approvals(sel, &format!("subject blocked by revocation {id}"))
            .await;
        let open = self.list_tasks(&TaskFilter::all_open()).await?;
        let mut closed = ClosedTree::default();
        for task in open.iter().filter(|t| sel.matches(t.owner.as_str())) {
            let tree = self
                .close_task_tree(&task.id, TaskState::Revoked, reason)
                .await?;
            closed.absorb(tree);
        }
        Ok(closed)
    }

    /// The blocks of one kind an admin lists: revocations until lifted, quarantines only
    /// while they last.
    pub async fn list_blocks(&self, kind: BlockKind) -> Result<Vec<BlockRecord>, BrokerError> {
        let now = self.now();
        let blocks = self.store.list_blocks().await.map_err(|e| self.fail(e))?;
        Ok(blocks
            .into_iter()
            .filter(|b| b.kind == kind && (kind == BlockKind::Revocation || b.active_at(now)))
            .collect())
    }

    /// Lifts a standing block: new exchanges are allowed again; tokens issued before it stay
    /// revoked. A block is lifted only through its own collection: a quarantine id under
    /// /revocations (or the reverse) is not found.
    pub async fn lift_block(
        &self,
        kind: BlockKind,
        id: &str,
        actor: &str,
        source_ip: Option<String>,
    ) -> Result<BlockRecord, BrokerError> {
        let now = self.now();
        let blocks = self.store.list_blocks().await.map_err(|e| self.fail(e))?;
        let noun = kind.noun();
        let Some(mut record) = blocks.iter().find(|b| b.id == id).cloned() else {
            return Err(BrokerError::not_found(not_liftable(kind, id)));
        };
        if record.kind != kind {
            return Err(BrokerError::not_found(format!(
                "`{id}` is a {}, not a {noun}: lift it under /admin/v1/{}/{id}",
                record.kind.noun(),
                record.kind.collection()
            )));
        }
        if record.lifted_at.is_some() {
            return Ok(record);
        }
        let lift = FeedEvent::Lift {
            id: id.to_string(),
            at: now,
        };
        self.publish(&lift, now).await?;
        record.lifted_at = Some(now);
        self.record(
            Event::Admin,
            audit::Entry {
                decision: Some("allow"),
                subject: Some(actor.to_string()),
                reason: format!("{noun} {id} lifted"),
                source_ip,
                detail: Some(json!({"action": "lift", format!("{noun}_id"): id})),
                ..audit::Entry::default()
            },
        )?;
        Ok(record)
    }
}
