//! Shared state behind one trait: the embedded memory store and Redis implement the same
//! contract, and one contract test suite runs against both.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{Subject, TaskId};

/// How long a task record is kept after its deadline (for task state and audits), on every
/// store.
pub const RETAIN_AFTER_DEADLINE: i64 = 15 * 60;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable")]
    Unavailable(#[source] ::redis::RedisError),
    #[error("cannot make a random id")]
    Random(#[source] crate::domain::RngError),
    #[error("store is not configured: {0}")]
    NotConfigured(&'static str),
    #[error("store returned corrupt data: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: Option<serde_json::Error>,
    },
}

impl StoreError {
    /// Data that does not parse, with the parse error as its cause.
    pub fn corrupt(what: impl Into<String>, source: serde_json::Error) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            source: Some(source),
        }
    }

    /// Data that parses but means nothing valid.
    pub fn invalid(what: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            source: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Open,
    Ended,
    Revoked,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Open => "open",
            TaskState::Ended => "ended",
            TaskState::Revoked => "revoked",
        }
    }
}

/// One task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub owner: Subject,
    /// The owner's trust domain (SPIFFE) or issuer (OIDC).
    pub issuer: String,
    pub purpose: String,
    pub created_at: i64,
    pub deadline: i64,
    pub state: TaskState,
    #[serde(default)]
    pub ended_at: Option<i64>,
    #[serde(default)]
    pub end_reason: Option<String>,
    pub policy_version: String,
    /// The scopes first granted: later mints may not exceed them.
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub tokens_issued: u32,
    #[serde(default)]
    pub parent: Option<TaskId>,
    #[serde(default)]
    pub depth: u32,
    /// How the owner authenticated (`jwt-svid`, `oidc`, `task-token`).
    #[serde(default)]
    pub source: String,
    /// The owner's OIDC claims that policy may test, kept to decide the task again when the
    /// policy changes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub claims: std::collections::BTreeMap<String, String>,
    /// Delegated tasks: the `jti` of the grant the task was delegated from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// Delegated tasks: the owner of the tree's root task, the `sub` of the task's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<Subject>,
    /// Delegated tasks: the actor chain of the task's tokens (RFC 8693 §4.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
    /// The approval the task was opened under (SPEC §4.7): its later tokens within the
    /// task's scopes need no new approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// The DPoP key (RFC 7638 thumbprint) the task's tokens are bound to: every token minted
    /// into the task must be bound to it (SPEC §4.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
    /// The TLS client certificate (base64url SHA-256, RFC 8705) the task's tokens are bound
    /// to: every token minted into the task must be requested over mTLS with it (SPEC §4.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5t: Option<String>,
}

impl TaskRecord {
    pub fn is_open_at(&self, now: i64) -> bool {
        self.state == TaskState::Open && now < self.deadline
    }
}

/// A token as indexed under its task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub jti: String,
    pub exp: i64,
}

/// What a standing revocation selects (SPEC §4.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockSelector {
    /// A subject, or a prefix ending in `/*`.
    Subject(String),
    /// A trust domain name or an OIDC issuer.
    Issuer(String),
    /// Every subject; on the wire `{"all": true}`.
    All(Everything),
    /// Exactly one subject, even one that ends in `/*` (a quarantine names the subject that
    /// tripped, never a prefix).
    Exact(String),
}

/// The value of an `all` selector: only `true` is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Everything;

impl Serialize for Everything {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(true)
    }
}

impl<'de> Deserialize<'de> for Everything {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if bool::deserialize(d)? {
            Ok(Everything)
        } else {
            Err(serde::de::Error::custom("`all` selects only when true"))
        }
    }
}

/// A subject, issuer or `all` revocation: it invalidates every token issued at or before
/// `created_at` for its selector until `until` (by then they have all expired), and refuses
/// new exchanges for the selector until it is lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub id: String,
    pub selector: BlockSelector,
    pub reason: String,
    pub actor: String,
    pub created_at: i64,
    pub until: i64,
    #[serde(default)]
    pub lifted_at: Option<i64>,
    /// `revocation` (an admin's, standing until lifted) or `quarantine` (a trip's, ending
    /// at `expires_at` unless lifted sooner).
    #[serde(default)]
    pub kind: BlockKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    #[default]
    Revocation,
    Quarantine,
}

impl BlockKind {
    /// The admin API's name for blocks of this kind (`/admin/v1/<collection>`).
    pub fn collection(self) -> &'static str {
        match self {
            BlockKind::Revocation => "revocations",
            BlockKind::Quarantine => "quarantines",
        }
    }

    /// One block of this kind, in messages.
    pub fn noun(self) -> &'static str {
        match self {
            BlockKind::Revocation => "revocation",
            BlockKind::Quarantine => "quarantine",
        }
    }
}

impl BlockSelector {
    pub fn matches(&self, subject: &str) -> bool {
        match self {
            BlockSelector::Subject(p) => crate::domain::subject_matches(subject, p),
            BlockSelector::Issuer(i) => crate::domain::issuer_of(subject) == i,
            BlockSelector::All(_) => true,
            BlockSelector::Exact(s) => s == subject,
        }
    }
}

impl BlockRecord {
    /// Refusing new exchanges at `now`.
    pub fn active_at(&self, now: i64) -> bool {
        self.lifted_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }

    /// Still worth keeping at `now`: active, or still cutting off tokens issued before it.
    pub fn relevant_at(&self, now: i64) -> bool {
        self.active_at(now) || self.until >= now
    }

    /// Why a subject it covers is refused: `quarantined until T (reason)` or `blocked by
    /// revocation ID`.
    pub fn refusal(&self) -> String {
        match (self.kind, self.expires_at) {
            (BlockKind::Quarantine, Some(until)) => {
                format!("quarantined until {until} ({})", self.reason)
            }
            _ => format!("blocked by revocation {}", self.id),
        }
    }
}

/// One revocation on the feed every replica follows. Each carries `until`: after it, what it
/// revokes has expired anyway and the event can be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeedEvent {
    Token { jti: String, until: i64 },
    Task { task_id: String, until: i64 },
    Block { record: BlockRecord },
    Lift { id: String, at: i64 },
}

impl FeedEvent {
    /// When the event stops mattering on the feed. A standing block is also kept in the
    /// store's list of blocks until it is lifted and its cut-off has passed; a lift matters
    /// as long as the block it lifts.
    pub fn until(&self) -> Option<i64> {
        match self {
            FeedEvent::Token { until, .. } | FeedEvent::Task { until, .. } => Some(*until),
            FeedEvent::Block { record } => Some(record.until.max(record.expires_at.unwrap_or(0))),
            FeedEvent::Lift { .. } => None,
        }
    }
}

/// Where an approval stands (SPEC §4.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for the approvers.
    Pending,
    /// Approved; the token is issued on the next poll.
    Approved,
    Denied,
    /// Nobody decided in time.
    Expired,
    /// Its subject was blocked or quarantined while it waited.
    Cancelled,
    /// Approved and used: an approval issues one task, once.
    Issued,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Cancelled => "cancelled",
            ApprovalState::Issued => "issued",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ApprovalState::Pending,
            ApprovalState::Approved,
            ApprovalState::Denied,
            ApprovalState::Expired,
            ApprovalState::Cancelled,
            ApprovalState::Issued,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One approver's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalVote {
    pub by: String,
    pub at: i64,
}

/// A request held for a human approval: what was asked, by whom, and where it stands. Every
/// change is written with [`Store::replace_approval`], which succeeds only over the revision
/// it was read at, so two replicas deciding at once cannot both win.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// `apr_` and 128 random bits.
    pub id: String,
    /// Bumped by one at every change.
    pub rev: u64,
    pub state: ApprovalState,
    pub subject: String,
    /// The current actor of a delegated request (the outermost `act.sub`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The whole actor chain (RFC 8693 §4.1), as a delegated token would carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub purpose: String,
    /// The TTL asked for, in seconds.
    pub ttl: u64,
    /// The task to mint into, when the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The scopes whose permits required the approval.
    pub gated_scopes: Vec<String>,
    /// The policies that decided the request, and their version.
    pub policies: Vec<String>,
    pub policy_version: String,
    pub created_at: i64,
    /// A decision must come before this; a poll after it answers `expired_token`.
    pub expires_at: i64,
    /// The last poll answered (for `slow_down`).
    pub last_poll: i64,
    #[serde(default)]
    pub approvals: Vec<ApprovalVote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How long an approval is kept once it is decided or expired, so that a late poll gets
/// its answer (`access_denied`, `expired_token`) rather than an unknown id.
pub const RETAIN_APPROVAL: i64 = 15 * 60;

impl ApprovalRecord {
    /// When the store may forget it.
    pub fn forget_at(&self) -> i64 {
        self.expires_at
            .max(self.decided_at.unwrap_or(0))
            .saturating_add(RETAIN_APPROVAL)
    }

    /// The same record one revision on.
    pub fn next(&self) -> ApprovalRecord {
        ApprovalRecord {
            rev: self.rev.saturating_add(1),
            ..self.clone()
        }
    }
}

/// A token's place in a status list (SPEC §4.6), as the store allocated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSlot {
    pub list: String,
    pub idx: u64,
}

/// A status list as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredList {
    /// Indexes the list holds.
    pub size: u32,
    /// The revoked bits, index `i` at bit `7 - i % 8` of byte `i / 8` (most significant
    /// first, as Redis `SETBIT` numbers them); as long as the last byte with a bit set.
    pub bits: Vec<u8>,
    /// When the last token with an index in this list expires.
    pub last_exp: i64,
}

/// Where a reader of the feed is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeedCursor(pub String);

/// Filters for listing tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// A subject, or a prefix ending in `/*`.
    pub subject: Option<String>,
    pub state: Option<TaskState>,
    pub limit: usize,
}

impl TaskFilter {
    /// Every open task, of every subject.
    pub fn all_open() -> Self {
        TaskFilter {
            subject: None,
            state: Some(TaskState::Open),
            limit: usize::MAX,
        }
    }

    pub fn matches(&self, t: &TaskRecord) -> bool {
        self.subject.as_deref().is_none_or(|p| t.owner.matches(p))
            && self.state.is_none_or(|s| t.state == s)
    }

    /// The listing order every store answers in: newest first, ties by id; then the limit.
    pub fn order_and_limit(&self, tasks: &mut Vec<TaskRecord>) {
        tasks.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.as_str().cmp(b.id.as_str()))
        });
        tasks.truncate(self.limit);
    }
}

/// What happened to a request to mint one more token into a task.
#[derive(Debug, Clone, PartialEq)]
pub enum MintOutcome {
    Minted(TaskRecord),
    NotFound,
    NotOwner,
    Closed(TaskRecord),
    OverBudget(TaskRecord),
}

/// What happened to a request to open a task delegated from another (SPEC §4.4).
#[derive(Debug, Clone, PartialEq)]
pub enum DelegateOutcome {
    Created,
    /// The parent task is unknown, ended or past its deadline.
    ParentClosed,
    /// The grant it was asked with has been revoked.
    GrantRevoked,
    /// The tree's root has spent its budget; the root as it is.
    OverBudget(Box<TaskRecord>),
}

/// What a subtree close did: closed every open task of the subtree, or found open tasks the
/// caller did not name (their revocation is not yet published) and closed nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum SubtreeClose {
    /// The tasks this call closed, as they now are.
    Closed(Vec<TaskRecord>),
    /// Open tasks of the subtree missing from `known`, with their deadlines.
    Unknown(Vec<(TaskId, i64)>),
}

/// Most tasks one subtree close visits: a bound on the work of one store step.
pub const MAX_TREE_NODES: usize = 10_000;

/// The policy version the replicas last accepted, as the store records it: each change of
/// version is one transition, numbered by a generation that only goes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTransition {
    /// The version before the change (empty when the store had none).
    pub previous: String,
    pub current: String,
    pub generation: u64,
    /// True when this call made the change; false when the store already had `current`.
    pub changed: bool,
}

impl PolicyTransition {
    /// A name for this transition, the same on every replica, and different for every change
    /// even when versions come back (A -> B -> A -> B).
    pub fn key(&self) -> String {
        format!("{}:{}>{}", self.generation, self.previous, self.current)
    }
}

/// The decision log's latest signed head (SPEC §6): the `seq` and `hash` of the last record
/// a checkpoint covers, and that checkpoint's compact JWS over them. Kept per log: replicas
/// sharing a store each write their own log, named by the hash of its first record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub log_id: String,
    pub seq: u64,
    pub hash: String,
    pub checkpoint: String,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Reachability, for `/readyz` and for failing closed.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records a new task with its first token. The task id is fresh (128 random bits).
    async fn create_task(&self, task: &TaskRecord, first: &TokenEntry) -> Result<(), StoreError>;

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError>;

    /// Atomically: the task exists, `owner` owns it, it is open at `now`, and fewer than
    /// `max_tokens` were minted in its tree (a root task's count covers every token of its
    /// tree); then counts one more token (in the task and its root) and indexes `token`.
    /// Over budget, the outcome carries the root.
    async fn mint_into_task(
        &self,
        id: &TaskId,
        owner: &Subject,
        token: &TokenEntry,
        max_tokens: u32,
        now: i64,
    ) -> Result<MintOutcome, StoreError>;

    /// Ends an open task (state `Ended` or `Revoked`); returns the record as it now is, or
    /// `None` when there is no such task. Ending a closed task changes nothing.
    async fn close_task(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> Result<Option<TaskRecord>, StoreError>;

    /// Atomically, on the shard (Cluster slot) of the task's tree: the grant `task.grant` is
    /// not revoked, the parent `task.parent` exists and is open at `now`, and the tree's root
    /// has minted fewer than `max_tokens` tokens; then records `task` with its first token
    /// under its parent and counts that token against the root. A delegation racing the end
    /// of its parent is thus refused or recorded before the end, which then closes it too.
    async fn create_delegated_task(
        &self,
        task: &TaskRecord,
        first: &TokenEntry,
        max_tokens: u32,
        now: i64,
    ) -> Result<DelegateOutcome, StoreError>;

    /// In one step: closes `id` and every open task below it (state `Ended` or `Revoked`),
    /// unless the subtree holds an open task that is not in `known` and `force` is false;
    /// then nothing is closed and those tasks are returned, so that the caller publishes
    /// their revocation first. A closed task is never reopened and never gets children.
    async fn close_subtree(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
        known: &[TaskId],
        force: bool,
    ) -> Result<SubtreeClose, StoreError>;

    /// Marks the grant `jti` revoked until `until`: no task is delegated from it afterwards
    /// (atomically with [`Store::create_delegated_task`]). `task` is the grant's own task
    /// when known. Returns the open tasks delegated directly from the grant.
    async fn revoke_grant(
        &self,
        jti: &str,
        task: Option<&TaskId>,
        until: i64,
        now: i64,
    ) -> Result<Vec<TaskId>, StoreError>;

    /// The tokens indexed under a task.
    async fn task_tokens(&self, id: &TaskId) -> Result<Vec<TokenEntry>, StoreError>;

    /// Tasks opened by delegation from `id`.
    async fn task_children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError>;

    /// Tasks matching `filter` (open tasks first when no state is given), at most
    /// `filter.limit`.
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>, StoreError>;

    /// Appends an event to the revocation feed; blocks and lifts are also kept in the
    /// standing list, which outlives the feed's retention.
    async fn publish(&self, event: &FeedEvent, now: i64) -> Result<(), StoreError>;

    /// Everything a replica needs to rebuild its revocation cache: the standing blocks and the
    /// retained events, and the cursor to follow the feed from.
    async fn feed_snapshot(&self, now: i64) -> Result<(Vec<FeedEvent>, FeedCursor), StoreError>;

    /// Events after `after`, waiting up to `wait` for one to arrive.
    async fn read_feed(
        &self,
        after: &FeedCursor,
        wait: Duration,
    ) -> Result<(Vec<FeedEvent>, FeedCursor), StoreError>;

    /// Standing and lifted-but-still-cutting-off blocks.
    async fn list_blocks(&self) -> Result<Vec<BlockRecord>, StoreError>;

    /// Counts one event under `key` at `now` and returns how many fall in the sliding window
    /// `(now - window, now]`. At most `cap` events are kept per key (a count above `cap` is
    /// reported as `cap + 1`), so memory stays bounded however fast a caller goes. Counters
    /// expire by themselves once their window has passed.
    async fn hit(&self, key: &str, now: i64, window: Duration, cap: u64)
    -> Result<u64, StoreError>;

    /// Takes a named claim for `ttl` unless someone holds it; true when this caller got it.
    async fn claim(&self, name: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Sets a named flag for `ttl`.
    async fn set_flag(&self, name: &str, ttl: Duration) -> Result<(), StoreError>;

    /// True when the flag is set.
    async fn flag(&self, name: &str) -> Result<bool, StoreError>;

    /// Records `version` as the policy set in force. When it differs from the recorded one,
    /// the generation goes up by one (atomically, whichever replica gets there first);
    /// otherwise the transition that last changed it is returned, unchanged.
    async fn advance_policy(&self, version: &str) -> Result<PolicyTransition, StoreError>;

    /// Forgets what no longer matters at `now`: blocks that neither refuse exchanges nor cut
    /// off live tokens, tasks past [`RETAIN_AFTER_DEADLINE`], and approvals past their
    /// [`ApprovalRecord::forget_at`]. Returns how many records it
    /// removed. Every replica calls it now and then; it is idempotent.
    async fn prune(&self, now: i64) -> Result<u64, StoreError>;
    /// Keeps `head` as the latest head of its log (`head.log_id`), unless the store already
    /// holds one with a higher or equal `seq`: a head only moves forward.
    async fn put_audit_head(&self, head: &AuditHead) -> Result<(), StoreError>;

    /// The latest head kept for the log `log_id`.
    async fn audit_head(&self, log_id: &str) -> Result<Option<AuditHead>, StoreError>;

    /// Records a new approval (SPEC §4.7); false when its id is taken.
    async fn create_approval(&self, approval: &ApprovalRecord) -> Result<bool, StoreError>;

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError>;

    /// Replaces an approval with `approval` only when the stored one is at revision
    /// `approval.rev - 1`; false when another writer got there first (or it is gone).
    async fn replace_approval(&self, approval: &ApprovalRecord) -> Result<bool, StoreError>;

    /// Every approval the store still keeps, oldest first.
    async fn list_approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError>;

    /// Open tasks at `now` (Redis: tasks whose deadline has not passed, ended or not; an
    /// upper bound that costs one command).
    async fn count_open_tasks(&self, now: i64) -> Result<u64, StoreError>;

    /// The store's generation: a random value set once and never expiring, so that a store
    /// that lost its state (flushed, evicted, restarted empty) is noticed even though no
    /// connection dropped. `None` when absent. A store in this process cannot lose it.
    async fn epoch(&self) -> Result<Option<String>, StoreError> {
        Ok(Some("local".to_string()))
    }

    /// Sets the generation to `fresh` if it is absent; returns the one now in place.
    async fn init_epoch(&self, fresh: &str) -> Result<String, StoreError> {
        let _ = fresh;
        Ok("local".to_string())
    }

    /// Whether the store holds any of this broker's state (tasks, blocks, feed).
    async fn holds_state(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// A cheap write where revocations are published (Redis: a key in the feed's slot):
    /// succeeds when a revocation could be published now. A store in this process always can.
    async fn probe_feed(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Allocates the next index of the current status list for the token `jti` expiring at
    /// `exp`, and remembers where it put it until `exp`. When the current list has `size`
    /// indexes already (or has expired), a new list named `fresh_list` becomes current.
    /// Indexes are never handed out twice, whichever replica asks.
    async fn status_allocate(
        &self,
        jti: &str,
        exp: i64,
        size: u32,
        fresh_list: &str,
        now: i64,
    ) -> Result<StatusSlot, StoreError>;

    /// Sets the revoked bit of each of these tokens that has a slot; returns how many it
    /// set (a token without one, or past its expiry, is skipped). Setting a bit twice is
    /// harmless.
    async fn status_revoke(&self, jtis: &[String]) -> Result<u64, StoreError>;

    /// A status list, while it has a token that has not expired at `now`.
    async fn status_list(&self, list: &str, now: i64) -> Result<Option<StoredList>, StoreError>;

    /// The eviction policy of the store, when it has one and lets this broker read it.
    async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarantine_of_a_subject_ending_in_a_wildcard_covers_only_that_subject() {
        let tripped = "https://issuer.example#team/*";
        let exact = BlockSelector::Exact(tripped.into());
        assert!(exact.matches(tripped));
        assert!(!exact.matches("https://issuer.example#team/other"));
        // What a quarantine used to be: a pattern that covers every subject under it.
        assert!(
            BlockSelector::Subject(tripped.into()).matches("https://issuer.example#team/other")
        );
    }
}
