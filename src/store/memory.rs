//! The embedded store: single node, for `writ dev` and single-replica use.
//!
//! Tasks live in shards, each behind its own lock, so that a resize of one shard's table
//! never stalls every request; tasks are forgotten once nothing they issued can still be
//! valid (their deadline has passed by more than the grace period).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    ApprovalRecord, AuditHead, BlockRecord, DelegateOutcome, FeedCursor, FeedEvent, MAX_TREE_NODES,
    MintOutcome, PolicyTransition, StatusSlot, Store, StoreError, StoredList, SubtreeClose,
    TaskFilter, TaskRecord, TaskState, TokenEntry,
};
use crate::domain::{Subject, TaskId};

const SHARDS: usize = 32;
/// How long a task is kept after its deadline (its tokens expire by then).
use super::RETAIN_AFTER_DEADLINE;
/// A shard is swept for expired tasks every this many inserts.
const SWEEP_EVERY: u32 = 4096;

#[derive(Debug)]
struct Entry {
    task: TaskRecord,
    tokens: Vec<TokenEntry>,
    children: Vec<TaskId>,
}

/// The local revocation feed: sequence-numbered events, trimmed once they stop mattering.
#[derive(Debug, Default)]
struct Feed {
    events: VecDeque<(u64, FeedEvent)>,
    next: u64,
    blocks: Vec<BlockRecord>,
}

/// A delegation grant that has been used or revoked: the task it belongs to, and whether it
/// is revoked, kept until `until`.
#[derive(Debug)]
struct Grant {
    task: Option<TaskId>,
    revoked: bool,
    until: i64,
}

#[derive(Debug, Default)]
struct Shard {
    tasks: HashMap<TaskId, Entry>,
    inserts: u32,
}

/// The status lists of this process (SPEC §4.6).
#[derive(Debug, Default)]
struct StatusLists {
    current: Option<String>,
    lists: HashMap<String, MemList>,
    /// Token id -> (list, index, expiry).
    slots: HashMap<String, (String, u64, i64)>,
}

#[derive(Debug)]
struct MemList {
    size: u32,
    next: u64,
    last_exp: i64,
    bits: Vec<u8>,
}

#[derive(Debug)]
pub struct MemoryStore {
    status: Mutex<StatusLists>,
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    feed: Mutex<Feed>,
    notify: tokio::sync::Notify,
    counters: Mutex<HashMap<String, VecDeque<i64>>>,
    flags: Mutex<HashMap<String, std::time::Instant>>,
    policy: Mutex<Option<PolicyTransition>>,
    audit_heads: Mutex<HashMap<String, AuditHead>>,
    grants: Mutex<HashMap<String, Grant>>,
    approvals: Mutex<HashMap<String, ApprovalRecord>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            status: Mutex::new(StatusLists::default()),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            feed: Mutex::new(Feed::default()),
            notify: tokio::sync::Notify::new(),
            counters: Mutex::new(HashMap::new()),
            flags: Mutex::new(HashMap::new()),
            policy: Mutex::new(None),
            audit_heads: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            approvals: Mutex::new(HashMap::new()),
        }
    }
}

fn parse_cursor(c: &FeedCursor) -> u64 {
    c.0.parse().unwrap_or(0)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "the index is taken modulo the fixed shard count"
    )]
    fn shard(&self, id: &TaskId) -> &Mutex<Shard> {
        // By the tree's root: a task tree lives in one shard, under one lock.
        let n = self.hasher.hash_one(id.root_str()) % (SHARDS as u64);
        &self.shards[usize::try_from(n).unwrap_or(0)]
    }

    /// Number of tasks held (tests).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().tasks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn prune(&self, now: i64) -> Result<u64, StoreError> {
        let horizon = now.saturating_sub(RETAIN_AFTER_DEADLINE);
        let mut removed = 0;
        for shard in &self.shards {
            let mut shard = shard.lock();
            let before = shard.tasks.len();
            shard.tasks.retain(|_, e| e.task.deadline > horizon);
            removed += before - shard.tasks.len();
        }
        self.grants.lock().retain(|_, g| g.until >= now);
        let mut feed = self.feed.lock();
        let before = feed.blocks.len();
        feed.blocks.retain(|b| b.relevant_at(now));
        removed += before - feed.blocks.len();
        feed.events
            .retain(|(_, e)| e.until().is_none_or(|u| u >= now));
        drop(feed);
        let mut approvals = self.approvals.lock();
        let before = approvals.len();
        approvals.retain(|_, a| a.forget_at() > now);
        removed += before - approvals.len();
        let mut status = self.status.lock();
        status.slots.retain(|_, (_, _, exp)| *exp >= now);
        status.lists.retain(|_, l| l.last_exp >= now);
        Ok(u64::try_from(removed).unwrap_or(u64::MAX))
    }

    async fn status_allocate(
        &self,
        jti: &str,
        exp: i64,
        size: u32,
        fresh_list: &str,
        now: i64,
    ) -> Result<StatusSlot, StoreError> {
        let mut st = self.status.lock();
        let st = &mut *st;
        let usable = st.current.as_ref().and_then(|c| {
            st.lists
                .get(c)
                .filter(|l| l.last_exp >= now && l.next < u64::from(l.size))
                .map(|_| c.clone())
        });
        let list = match usable {
            Some(c) => c,
            None => {
                st.lists.insert(
                    fresh_list.to_string(),
                    MemList {
                        size,
                        next: 0,
                        last_exp: exp,
                        bits: Vec::new(),
                    },
                );
                st.current = Some(fresh_list.to_string());
                fresh_list.to_string()
            }
        };
        let l = st
            .lists
            .get_mut(&list)
            .ok_or_else(|| StoreError::invalid("status list vanished"))?;
        let idx = l.next;
        l.next += 1;
        l.last_exp = l.last_exp.max(exp);
        st.slots.insert(jti.to_string(), (list.clone(), idx, exp));
        Ok(StatusSlot { list, idx })
    }

    async fn status_revoke(&self, jtis: &[String]) -> Result<u64, StoreError> {
        let mut st = self.status.lock();
        let st = &mut *st;
        let mut set = 0;
        for jti in jtis {
            let Some((list, idx, _)) = st.slots.get(jti) else {
                continue;
            };
            let Some(l) = st.lists.get_mut(list) else {
                continue;
            };
            let byte = usize::try_from(idx / 8).unwrap_or(usize::MAX);
            if byte >= l.bits.len() {
                l.bits.resize(byte.saturating_add(1), 0);
            }
            if let Some(b) = l.bits.get_mut(byte) {
                *b |= 0x80 >> (idx % 8);
                set += 1;
            }
        }
        Ok(set)
    }

    async fn status_list(&self, list: &str, now: i64) -> Result<Option<StoredList>, StoreError> {
        let st = self.status.lock();
        Ok(st
            .lists
            .get(list)
            .filter(|l| l.last_exp >= now)
            .map(|l| StoredList {
                size: l.size,
                bits: l.bits.clone(),
                last_exp: l.last_exp,
            }))
    }

    async fn create_task(&self, task: &TaskRecord, first: &TokenEntry) -> Result<(), StoreError> {
        let mut shard = self.shard(&task.id).lock();
        shard.inserts = shard.inserts.wrapping_add(1);
        if shard.inserts.is_multiple_of(SWEEP_EVERY) {
            let horizon = task.created_at - RETAIN_AFTER_DEADLINE;
            shard.tasks.retain(|_, e| e.task.deadline > horizon);
        }
        let mut task = task.clone();
        task.tokens_issued = 1;
        let parent = task.parent.clone();
        let id = task.id.clone();
        shard.tasks.insert(
            task.id.clone(),
            Entry {
                task,
                tokens: vec![first.clone()],
                children: Vec::new(),
            },
        );
        drop(shard);
        if let Some(p) = parent
            && let Some(e) = self.shard(&p).lock().tasks.get_mut(&p)
        {
            e.children.push(id);
        }
        Ok(())
    }

    async fn create_delegated_task(
        &self,
        task: &TaskRecord,
        first: &TokenEntry,
        max_tokens: u32,
        now: i64,
    ) -> Result<DelegateOutcome, StoreError> {
        let Some(parent) = task.parent.clone() else {
            return Err(StoreError::invalid("a delegated task without a parent"));
        };
        // Lock order: grants, then the tree's shard (as in `revoke_grant`).
        let mut grants = self.grants.lock();
        if let Some(jti) = &task.grant {
            if grants.get(jti).is_some_and(|g| g.revoked) {
                return Ok(DelegateOutcome::GrantRevoked);
            }
            grants.entry(jti.clone()).or_insert(Grant {
                task: Some(parent.clone()),
                revoked: false,
                until: task.deadline,
            });
        }
        let mut shard = self.shard(&task.id).lock();
        if !shard
            .tasks
            .get(&parent)
            .is_some_and(|e| e.task.is_open_at(now))
        {
            return Ok(DelegateOutcome::ParentClosed);
        }
        let Some(root) = TaskId::parse(task.id.root_str()) else {
            return Err(StoreError::invalid("a delegated task id without a root"));
        };
        let Some(root) = shard.tasks.get_mut(&root) else {
            return Ok(DelegateOutcome::ParentClosed);
        };
        if root.task.tokens_issued >= max_tokens {
            return Ok(DelegateOutcome::OverBudget(Box::new(root.task.clone())));
        }
        root.task.tokens_issued += 1;
        let mut task = task.clone();
        task.tokens_issued = 1;
        let id = task.id.clone();
        shard.tasks.insert(
            id.clone(),
            Entry {
                task,
                tokens: vec![first.clone()],
                children: Vec::new(),
            },
        );
        if let Some(e) = shard.tasks.get_mut(&parent) {
            e.children.push(id);
        }
        drop(grants);
        Ok(DelegateOutcome::Created)
    }

    async fn close_subtree(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
        known: &[TaskId],
        force: bool,
    ) -> Result<SubtreeClose, StoreError> {
        let known: std::collections::HashSet<&TaskId> = known.iter().collect();
        let mut shard = self.shard(id).lock();
        let mut open = Vec::new();
        let mut unknown = Vec::new();
        let mut queue = vec![id.clone()];
        let mut seen = 0;
        while let Some(next) = queue.pop() {
            seen += 1;
            if seen > MAX_TREE_NODES {
                break;
            }
            let Some(e) = shard.tasks.get(&next) else {
                continue;
            };
            if e.task.state == TaskState::Open {
                if !known.contains(&next) {
                    unknown.push((next.clone(), e.task.deadline));
                }
                open.push(next);
            }
            queue.extend(e.children.iter().cloned());
        }
        if !unknown.is_empty() && !force {
            return Ok(SubtreeClose::Unknown(unknown));
        }
        let mut closed = Vec::new();
        for t in open {
            if let Some(e) = shard.tasks.get_mut(&t) {
                e.task.state = state;
                e.task.ended_at = Some(now);
                e.task.end_reason = Some(reason.to_string());
                closed.push(e.task.clone());
            }
        }
        Ok(SubtreeClose::Closed(closed))
    }

    async fn revoke_grant(
        &self,
        jti: &str,
        task: Option<&TaskId>,
        until: i64,
        now: i64,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut grants = self.grants.lock();
        if grants.len() > 10_000 {
            grants.retain(|_, g| g.until >= now);
        }
        let g = grants.entry(jti.to_string()).or_insert(Grant {
            task: task.cloned(),
            revoked: true,
            until,
        });
        g.revoked = true;
        g.until = g.until.max(until);
        let Some(parent) = g.task.clone().or_else(|| task.cloned()) else {
            return Ok(Vec::new());
        };
        let shard = self.shard(&parent).lock();
        let children = shard
            .tasks
            .get(&parent)
            .map(|e| e.children.clone())
            .unwrap_or_default();
        let delegated = children
            .into_iter()
            .filter(|c| {
                shard.tasks.get(c).is_some_and(|e| {
                    e.task.state == TaskState::Open && e.task.grant.as_deref() == Some(jti)
                })
            })
            .collect();
        drop(shard);
        drop(grants);
        Ok(delegated)
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.shard(id).lock().tasks.get(id).map(|e| e.task.clone()))
    }

    async fn mint_into_task(
        &self,
        id: &TaskId,
        owner: &Subject,
        token: &TokenEntry,
        max_tokens: u32,
        now: i64,
    ) -> Result<MintOutcome, StoreError> {
        let mut shard = self.shard(id).lock();
        let Some(entry) = shard.tasks.get(id) else {
            return Ok(MintOutcome::NotFound);
        };
        if &entry.task.owner != owner {
            return Ok(MintOutcome::NotOwner);
        }
        if !entry.task.is_open_at(now) {
            return Ok(MintOutcome::Closed(entry.task.clone()));
        }
        // The budget is the tree's: counted at the root.
        let root = TaskId::parse(id.root_str()).unwrap_or_else(|| id.clone());
        let closed = entry.task.clone();
        let Some(root_entry) = shard.tasks.get_mut(&root) else {
            return Ok(MintOutcome::Closed(closed));
        };
        if root_entry.task.tokens_issued >= max_tokens {
            return Ok(MintOutcome::OverBudget(root_entry.task.clone()));
        }
        root_entry.task.tokens_issued += 1;
        let Some(entry) = shard.tasks.get_mut(id) else {
            return Ok(MintOutcome::NotFound);
        };
        if &root != id {
            entry.task.tokens_issued += 1;
        }
        entry.tokens.push(token.clone());
        Ok(MintOutcome::Minted(entry.task.clone()))
    }

    async fn close_task(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let mut shard = self.shard(id).lock();
        let Some(entry) = shard.tasks.get_mut(id) else {
            return Ok(None);
        };
        if entry.task.state == TaskState::Open {
            entry.task.state = state;
            entry.task.ended_at = Some(now);
            entry.task.end_reason = Some(reason.to_string());
        }
        Ok(Some(entry.task.clone()))
    }

    async fn task_tokens(&self, id: &TaskId) -> Result<Vec<TokenEntry>, StoreError> {
        Ok(self
            .shard(id)
            .lock()
            .tasks
            .get(id)
            .map(|e| e.tokens.clone())
            .unwrap_or_default())
    }

    async fn task_children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError> {
        Ok(self
            .shard(id)
            .lock()
            .tasks
            .get(id)
            .map(|e| e.children.clone())
            .unwrap_or_default())
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>, StoreError> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock();
            out.extend(
                shard
                    .tasks
                    .values()
                    .filter(|e| filter.matches(&e.task))
                    .map(|e| e.task.clone()),
            );
        }
        filter.order_and_limit(&mut out);
        Ok(out)
    }

    async fn publish(&self, event: &FeedEvent, now: i64) -> Result<(), StoreError> {
        {
            let mut feed = self.feed.lock();
            match event {
                FeedEvent::Block { record } => {
                    feed.blocks.retain(|b| b.id != record.id);
                    feed.blocks.push(record.clone());
                }
                FeedEvent::Lift { id, at } => {
                    for b in feed.blocks.iter_mut().filter(|b| &b.id == id) {
                        b.lifted_at.get_or_insert(*at);
                    }
                }
                _ => {}
            }
            feed.blocks.retain(|b| b.relevant_at(now));
            feed.events
                .retain(|(_, e)| e.until().is_none_or(|u| u >= now));
            feed.next += 1;
            let seq = feed.next;
            feed.events.push_back((seq, event.clone()));
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn feed_snapshot(&self, now: i64) -> Result<(Vec<FeedEvent>, FeedCursor), StoreError> {
        let feed = self.feed.lock();
        let mut events: Vec<FeedEvent> = feed
            .blocks
            .iter()
            .filter(|b| b.relevant_at(now))
            .map(|b| FeedEvent::Block { record: b.clone() })
            .collect();
        events.extend(
            feed.events
                .iter()
                .filter(|(_, e)| e.until().is_none_or(|u| u >= now))
                .map(|(_, e)| e.clone()),
        );
        Ok((events, FeedCursor(feed.next.to_string())))
    }

    async fn read_feed(
        &self,
        after: &FeedCursor,
        wait: Duration,
    ) -> Result<(Vec<FeedEvent>, FeedCursor), StoreError> {
        let after = parse_cursor(after);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            {
                let feed = self.feed.lock();
                let events: Vec<FeedEvent> = feed
                    .events
                    .iter()
                    .filter(|(s, _)| *s > after)
                    .map(|(_, e)| e.clone())
                    .collect();
                if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                    return Ok((events, FeedCursor(feed.next.max(after).to_string())));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let feed = self.feed.lock();
                return Ok((Vec::new(), FeedCursor(feed.next.max(after).to_string())));
            }
        }
    }

    async fn list_blocks(&self) -> Result<Vec<BlockRecord>, StoreError> {
        Ok(self.feed.lock().blocks.clone())
    }

    async fn hit(
        &self,
        key: &str,
        now: i64,
        window: Duration,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let horizon = now.saturating_sub(crate::domain::duration_secs(window));
        let mut counters = self.counters.lock();
        if counters.len() > 10_000 {
            counters.retain(|_, q| q.back().is_some_and(|t| *t > horizon));
        }
        let q = counters.entry(key.to_string()).or_default();
        while q.front().is_some_and(|t| *t <= horizon) {
            q.pop_front();
        }
        if (q.len() as u64) < cap {
            q.push_back(now);
            Ok(q.len() as u64)
        } else {
            Ok(cap + 1)
        }
    }

    async fn claim(&self, name: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut flags = self.flags.lock();
        let now = std::time::Instant::now();
        if flags.get(name).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        flags.insert(name.to_string(), now + ttl);
        Ok(true)
    }

    async fn set_flag(&self, name: &str, ttl: Duration) -> Result<(), StoreError> {
        self.flags
            .lock()
            .insert(name.to_string(), std::time::Instant::now() + ttl);
        Ok(())
    }

    async fn count_open_tasks(&self, now: i64) -> Result<u64, StoreError> {
        Ok(self
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .tasks
                    .values()
                    .filter(|e| e.task.is_open_at(now))
                    .count() as u64
            })
            .sum())
    }

    async fn advance_policy(&self, version: &str) -> Result<PolicyTransition, StoreError> {
        let mut slot = self.policy.lock();
        if let Some(t) = slot.as_ref().filter(|t| t.current == version) {
            return Ok(PolicyTransition {
                changed: false,
                ..t.clone()
            });
        }
        let t = PolicyTransition {
            previous: slot.as_ref().map(|t| t.current.clone()).unwrap_or_default(),
            current: version.to_string(),
            generation: slot.as_ref().map_or(0, |t| t.generation).saturating_add(1),
            changed: true,
        };
        *slot = Some(t.clone());
        Ok(t)
    }

    async fn put_audit_head(&self, head: &AuditHead) -> Result<(), StoreError> {
        let mut heads = self.audit_heads.lock();
        match heads.get(&head.log_id) {
            Some(kept) if kept.seq >= head.seq => {}
            _ => {
                heads.insert(head.log_id.clone(), head.clone());
            }
        }
        Ok(())
    }

    async fn audit_head(&self, log_id: &str) -> Result<Option<AuditHead>, StoreError> {
        Ok(self.audit_heads.lock().get(log_id).cloned())
    }

    async fn create_approval(&self, approval: &ApprovalRecord) -> Result<bool, StoreError> {
        let mut all = self.approvals.lock();
        if all.contains_key(&approval.id) {
            return Ok(false);
        }
        all.insert(approval.id.clone(), approval.clone());
        Ok(true)
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        Ok(self.approvals.lock().get(id).cloned())
    }

    async fn replace_approval(&self, approval: &ApprovalRecord) -> Result<bool, StoreError> {
        let mut all = self.approvals.lock();
        match all.get_mut(&approval.id) {
            Some(cur) if cur.rev.saturating_add(1) == approval.rev => {
                *cur = approval.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list_approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        let mut out: Vec<ApprovalRecord> = self.approvals.lock().values().cloned().collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    async fn flag(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .flags
            .lock()
            .get(name)
            .is_some_and(|until| *until > std::time::Instant::now()))
    }
}
