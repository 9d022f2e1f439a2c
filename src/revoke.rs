//! Revocation: the local cache every replica keeps, fed by the store's feed, and the use
//! cases that revoke (a holder's own token, a task's end, a security team's selectors).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::Serialize;
use serde_json::json;

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::domain::{Subject, TaskId};
use crate::error::{BrokerError, ErrorCode};
use crate::store::{
    BlockRecord, BlockSelector, FeedEvent, Store, TaskFilter, TaskRecord, TaskState,
};
use crate::token::TaskClaims;

/// The trust domain (SPIFFE) or issuer (OIDC) of a subject.
pub fn issuer_of(subject: &str) -> &str {
    if let Some(rest) = subject.strip_prefix("spiffe://") {
        rest.split('/').next().unwrap_or(rest)
    } else {
        subject.split_once('#').map_or(subject, |(iss, _)| iss)
    }
}

impl BlockSelector {
    pub fn matches(&self, subject: &str) -> bool {
        match self {
            BlockSelector::Subject(p) => Subject::from_trusted(subject.to_string()).matches(p),
            BlockSelector::Issuer(i) => issuer_of(subject) == i,
            BlockSelector::All(all) => *all,
        }
    }
}

/// What this replica knows is revoked. Entries leave once what they revoke has expired.
pub struct RevocationCache {
    jtis: RwLock<HashMap<String, i64>>,
    tasks: RwLock<HashMap<String, i64>>,
    blocks: RwLock<Vec<BlockRecord>>,
    healthy: AtomicBool,
    /// Milliseconds since `epoch` of the last successful read of the feed.
    last_ok: AtomicU64,
    epoch: Instant,
    max_staleness: Duration,
    applied: AtomicU64,
    /// The store is in this process (memory): every revocation is applied here as it is
    /// taken, so the view cannot be stale.
    local: bool,
}

impl std::fmt::Debug for RevocationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationCache").finish_non_exhaustive()
    }
}

impl RevocationCache {
    /// `local` says whether the store lives in this process (memory): its cache is confirmed
    /// from the start and cannot go stale; a shared store's cache must first be loaded.
    pub fn new(max_staleness: Duration, local: bool) -> Self {
        let fresh = local;
        let c = RevocationCache {
            jtis: RwLock::default(),
            tasks: RwLock::default(),
            blocks: RwLock::default(),
            healthy: AtomicBool::new(fresh),
            last_ok: AtomicU64::new(0),
            epoch: Instant::now(),
            max_staleness,
            applied: AtomicU64::new(0),
            local,
        };
        if fresh {
            c.mark_ok();
        }
        c
    }

    fn mark_ok(&self) {
        self.last_ok
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        self.healthy.store(true, Ordering::SeqCst);
    }

    pub fn mark_stale(&self) {
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// True when the cache reflects the feed within the staleness bound.
    pub fn is_fresh(&self) -> bool {
        if self.local {
            return true;
        }
        if !self.healthy.load(Ordering::SeqCst) {
            return false;
        }
        let age = (self.epoch.elapsed().as_millis() as u64)
            .saturating_sub(self.last_ok.load(Ordering::SeqCst));
        age <= self.max_staleness.as_millis() as u64
    }

    /// Milliseconds since the feed was last read successfully.
    pub fn lag_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64)
            .saturating_sub(self.last_ok.load(Ordering::SeqCst))
    }

    /// Events applied so far (tests and metrics).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    pub fn apply(&self, event: &FeedEvent) {
        self.applied.fetch_add(1, Ordering::SeqCst);
        match event {
            FeedEvent::Token { jti, until } => {
                self.jtis.write().insert(jti.clone(), *until);
            }
            FeedEvent::Task { task_id, until } => {
                self.tasks.write().insert(task_id.clone(), *until);
            }
            FeedEvent::Block { record } => {
                let mut blocks = self.blocks.write();
                blocks.retain(|b| b.id != record.id);
                blocks.push(record.clone());
            }
            FeedEvent::Lift { id, at } => {
                for b in self.blocks.write().iter_mut().filter(|b| &b.id == id) {
                    b.lifted_at.get_or_insert(*at);
                }
            }
        }
    }

    /// Replaces everything with a snapshot.
    pub fn reset(&self, events: &[FeedEvent]) {
        self.jtis.write().clear();
        self.tasks.write().clear();
        self.blocks.write().clear();
        for e in events {
            self.apply(e);
        }
        self.mark_ok();
    }

    /// Forgets what has expired.
    pub fn prune(&self, now: i64) {
        self.jtis.write().retain(|_, u| *u >= now);
        self.tasks.write().retain(|_, u| *u >= now);
        self.blocks.write().retain(|b| b.relevant_at(now));
    }

    /// Why a token (already verified) is no longer valid, if it is not.
    pub fn revoked_reason(&self, c: &TaskClaims, now: i64) -> Option<&'static str> {
        if self.jtis.read().contains_key(&c.jti) {
            return Some("token revoked");
        }
        if self.tasks.read().contains_key(&c.txn) {
            return Some("task ended");
        }
        let blocks = self.blocks.read();
        blocks
            .iter()
            .any(|b| c.iat <= b.created_at && now <= b.until && b.selector.matches(&c.sub))
            .then_some("revoked by selector")
    }

    /// The standing block or quarantine that refuses new exchanges for `subject` at `now`.
    pub fn blocking(&self, subject: &str, now: i64) -> Option<BlockRecord> {
        self.blocks
            .read()
            .iter()
            .find(|b| b.active_at(now) && b.selector.matches(subject))
            .cloned()
    }

    /// Everything the cache holds, as events (to restore a store that lost them).
    pub fn export(&self) -> Vec<FeedEvent> {
        let mut out: Vec<FeedEvent> = self
            .jtis
            .read()
            .iter()
            .map(|(jti, until)| FeedEvent::Token {
                jti: jti.clone(),
                until: *until,
            })
            .collect();
        out.extend(
            self.tasks
                .read()
                .iter()
                .map(|(task_id, until)| FeedEvent::Task {
                    task_id: task_id.clone(),
                    until: *until,
                }),
        );
        out.extend(
            self.blocks
                .read()
                .iter()
                .map(|b| FeedEvent::Block { record: b.clone() }),
        );
        out
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.jtis.read().len(),
            self.tasks.read().len(),
            self.blocks.read().len(),
        )
    }
}

/// What this replica knows that the snapshot lacks: revocations a store lost (a Redis that
/// restarted empty) are published again, so a revocation is never lost while one replica
/// still remembers it.
fn missing_from(snapshot: &[FeedEvent], local: Vec<FeedEvent>, now: i64) -> Vec<FeedEvent> {
    fn key(e: &FeedEvent) -> Option<String> {
        match e {
            FeedEvent::Token { jti, .. } => Some(format!("j:{jti}")),
            FeedEvent::Task { task_id, .. } => Some(format!("t:{task_id}")),
            FeedEvent::Block { record } => Some(format!("b:{}", record.id)),
            FeedEvent::Lift { .. } => None,
        }
    }
    let known: std::collections::HashSet<String> = snapshot.iter().filter_map(key).collect();
    local
        .into_iter()
        .filter(|e| e.until().is_none_or(|u| u >= now))
        .filter(|e| key(e).is_some_and(|k| !known.contains(&k)))
        .collect()
}

/// Follows the store's feed into the cache: a snapshot, then events as they come; on any
/// error the cache is marked stale at once and rebuilt from a fresh snapshot.
pub async fn follow(
    store: Arc<dyn Store>,
    cache: Arc<RevocationCache>,
    clock: Arc<dyn crate::domain::Clock>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match resync(&*store, &cache, clock.now()).await {
            Ok(mut cursor) => {
                backoff = Duration::from_millis(50);
                let mut last_prune = Instant::now();
                loop {
                    match store.read_feed(&cursor, Duration::from_millis(500)).await {
                        Ok((events, next)) => {
                            for e in &events {
                                cache.apply(e);
                            }
                            cursor = next;
                            cache.mark_ok();
                            if last_prune.elapsed() > Duration::from_secs(10) {
                                cache.prune(clock.now());
                                last_prune = Instant::now();
                            }
                        }
                        Err(e) => {
                            cache.mark_stale();
                            tracing::error!(error = %e, "revocation feed lost; resynchronising");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                cache.mark_stale();
                tracing::error!(error = %e, "cannot load revocation state");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Loads a snapshot, restores what the store lost, and resets the cache from both.
async fn resync(
    store: &dyn Store,
    cache: &RevocationCache,
    now: i64,
) -> Result<crate::store::FeedCursor, crate::store::StoreError> {
    let (mut events, cursor) = store.feed_snapshot(now).await?;
    let missing = missing_from(&events, cache.export(), now);
    if !missing.is_empty() {
        tracing::warn!(
            count = missing.len(),
            "the store lost revocations; publishing them again"
        );
        for e in &missing {
            store.publish(e, now).await?;
        }
        events.extend(missing);
    }
    cache.reset(&events);
    Ok(cursor)
}

/// The answer of introspection.
#[derive(Debug, Clone)]
pub enum Introspection {
    Active(Box<TaskClaims>),
    Inactive,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct EndReply {
    pub task_id: String,
    pub state: &'static str,
    pub revoked_tasks: usize,
    pub revoked_tokens: usize,
}

fn new_revocation_id() -> Result<String, crate::domain::RngError> {
    crate::domain::random_id("rev_")
}

impl Broker {
    /// A token of ours that verifies, has not expired and is not revoked. `Err` only when the
    /// revocation state cannot be confirmed.
    pub fn check_token(&self, token: &str) -> Result<Option<TaskClaims>, BrokerError> {
        if !self.revocations.is_fresh() {
            return Err(BrokerError::unavailable());
        }
        let now = self.now();
        let claims = match self.verified_token(token, now) {
            Some(c) => c,
            None => return Ok(None),
        };
        if self.revocations.revoked_reason(&claims, now).is_some() {
            return Ok(None);
        }
        Ok(Some(claims))
    }

    /// Signature and expiry of one of our tokens, with verification results cached by the
    /// token's hash (revocation is checked on every use, outside the cache).
    fn verified_token(&self, token: &str, now: i64) -> Option<TaskClaims> {
        let key = crate::cache::VerifiedCache::<TaskClaims>::key(token.as_bytes());
        if let Some(c) = self.token_cache.get(&key, now) {
            return Some(c);
        }
        let c = self.tokens.verify(token, now).ok()?;
        self.token_cache.insert(key, c.clone(), c.exp, now);
        Some(c)
    }

    pub fn introspect(&self, token: &str) -> Result<Introspection, BrokerError> {
        Ok(match self.check_token(token)? {
            Some(c) => Introspection::Active(Box::new(c)),
            None => Introspection::Inactive,
        })
    }

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
        let event = FeedEvent::Token {
            jti: claims.jti.clone(),
            until: claims.exp,
        };
        self.append(
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
        self.publish(&event, now).await
    }

    pub(crate) async fn publish(&self, event: &FeedEvent, now: i64) -> Result<(), BrokerError> {
        self.store
            .publish(event, now)
            .await
            .map_err(|e| self.store_failed(e))?;
        let kind = match event {
            FeedEvent::Token { .. } => "token",
            FeedEvent::Task { .. } => "task",
            FeedEvent::Block { record } if record.kind == crate::store::BlockKind::Quarantine => {
                "quarantine"
            }
            FeedEvent::Block { .. } => "selector",
            FeedEvent::Lift { .. } => "lift",
        };
        self.metrics
            .inc("writ_revocations_total", &[("kind", kind)]);
        // Effective here before the reply; the other replicas follow the feed.
        self.revocations.apply(event);
        Ok(())
    }

    /// Closes a task and every task delegated from it; returns the tasks that this call
    /// closed and the number of their tokens that had not yet expired.
    pub async fn close_task_tree(
        &self,
        root: &TaskId,
        state: TaskState,
        reason: &str,
    ) -> Result<(Vec<TaskRecord>, usize), BrokerError> {
        let now = self.now();
        let unavailable = |e: crate::store::StoreError| self.store_failed(e);
        let mut closed = Vec::new();
        let mut tokens = 0;
        let mut queue = vec![root.clone()];
        let mut seen = 0;
        while let Some(id) = queue.pop() {
            seen += 1;
            if seen > 10_000 {
                break;
            }
            let before = self.store.get_task(&id).await.map_err(unavailable)?;
            let Some(before) = before else { continue };
            if before.state == TaskState::Open
                && let Some(after) = self
                    .store
                    .close_task(&id, state, reason, now)
                    .await
                    .map_err(unavailable)?
            {
                self.publish(
                    &FeedEvent::Task {
                        task_id: id.to_string(),
                        until: after.deadline,
                    },
                    now,
                )
                .await?;
                tokens += self
                    .store
                    .task_tokens(&id)
                    .await
                    .map_err(unavailable)?
                    .iter()
                    .filter(|t| t.exp > now)
                    .count();
                closed.push(after);
            }
            queue.extend(self.store.task_children(&id).await.map_err(unavailable)?);
        }
        Ok((closed, tokens))
    }

    /// A holder of one of the task's tokens ends the task.
    pub async fn end_task(
        &self,
        id: &TaskId,
        bearer: &str,
        source_ip: Option<String>,
    ) -> Result<EndReply, BrokerError> {
        let claims = self.check_token(bearer)?.ok_or_else(|| {
            BrokerError::new(ErrorCode::InvalidToken, "the bearer token is not valid")
        })?;
        if claims.txn != id.as_str() {
            return Err(BrokerError::new(
                ErrorCode::AccessDenied,
                "the bearer token belongs to another task",
            ));
        }
        let (closed, tokens) = self
            .close_task_tree(id, TaskState::Ended, "ended by its holder")
            .await?;
        self.append(
            Event::TaskEnd,
            audit::Entry {
                decision: Some("allow"),
                subject: Some(claims.sub.clone()),
                task_id: Some(id.to_string()),
                jti: Some(claims.jti.clone()),
                reason: "ended by its holder".into(),
                source_ip,
                detail: Some(json!({
                    "closed_tasks": closed.iter().map(|t| t.id.to_string()).collect::<Vec<_>>(),
                    "revoked_tokens": tokens,
                })),
                ..audit::Entry::default()
            },
        )?;
        Ok(EndReply {
            task_id: id.to_string(),
            state: "ended",
            revoked_tasks: closed.len(),
            revoked_tokens: tokens,
        })
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
        let id = new_revocation_id()?;
        let (tasks, tokens, detail) = match &selector {
            Selector::Jti(jti) => {
                self.publish(
                    &FeedEvent::Token {
                        jti: jti.clone(),
                        until: now + self.limits.max_ttl as i64,
                    },
                    now,
                )
                .await?;
                (0, 1, json!({"jti": jti}))
            }
            Selector::Task(task) => {
                let exists = self
                    .store
                    .get_task(task)
                    .await
                    .map_err(|_| BrokerError::unavailable())?;
                if exists.is_none() {
                    return Err(BrokerError::new(
                        ErrorCode::NotFound,
                        format!("no task `{task}`"),
                    ));
                }
                let (closed, tokens) = self
                    .close_task_tree(task, TaskState::Revoked, reason)
                    .await?;
                (closed.len(), tokens, json!({"task_id": task.to_string()}))
            }
            Selector::Block(sel) => {
                let record = BlockRecord {
                    id: id.clone(),
                    selector: sel.clone(),
                    reason: reason.to_string(),
                    actor: actor.to_string(),
                    created_at: now,
                    until: now + self.limits.max_ttl as i64,
                    lifted_at: None,
                    kind: crate::store::BlockKind::Revocation,
                    expires_at: None,
                };
                self.publish(&FeedEvent::Block { record }, now).await?;
                let open = self
                    .store
                    .list_tasks(&TaskFilter::all_open())
                    .await
                    .map_err(|_| BrokerError::unavailable())?;
                let (mut n, mut t) = (0, 0);
                for task in open.iter().filter(|t| sel.matches(t.owner.as_str())) {
                    let (closed, tokens) = self
                        .close_task_tree(&task.id, TaskState::Revoked, reason)
                        .await?;
                    n += closed.len();
                    t += tokens;
                }
                (n, t, serde_json::to_value(sel).unwrap_or_default())
            }
        };
        self.append(
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
                    "revoked_tasks": tasks,
                    "revoked_tokens": tokens,
                })),
                ..audit::Entry::default()
            },
        )?;
        Ok(RevocationReply {
            revocation_id: id,
            revoked_tasks: tasks,
            revoked_tokens: tokens,
        })
    }

    /// Lifts a standing block: new exchanges are allowed again; tokens issued before it stay
    /// revoked.
    pub async fn lift_block(
        &self,
        kind: crate::store::BlockKind,
        id: &str,
        actor: &str,
        source_ip: Option<String>,
    ) -> Result<BlockRecord, BrokerError> {
        let now = self.now();
        let blocks = self
            .store
            .list_blocks()
            .await
            .map_err(|_| BrokerError::unavailable())?;
        let noun = match kind {
            crate::store::BlockKind::Revocation => "revocation",
            crate::store::BlockKind::Quarantine => "quarantine",
        };
        // A block is lifted only through its own collection: a quarantine id under
        // /revocations (or the reverse) is not found.
        let Some(mut record) = blocks.into_iter().find(|b| b.id == id && b.kind == kind) else {
            return Err(BrokerError::new(
                ErrorCode::NotFound,
                format!("no {noun} `{id}`"),
            ));
        };
        if record.lifted_at.is_none() {
            self.publish(
                &FeedEvent::Lift {
                    id: id.to_string(),
                    at: now,
                },
                now,
            )
            .await?;
            record.lifted_at = Some(now);
            self.append(
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
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_of_subjects() {
        assert_eq!(issuer_of("spiffe://example.org/agent/a"), "example.org");
        assert_eq!(
            issuer_of("https://issuer.example#repo:x#y"),
            "https://issuer.example"
        );
    }

    #[test]
    fn staleness_is_bounded() {
        let local = RevocationCache::new(Duration::from_millis(1), true);
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            local.is_fresh(),
            "an in-process store's view is never stale"
        );
        let c = RevocationCache::new(Duration::from_millis(50), false);
        c.reset(&[]);
        assert!(c.is_fresh());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!c.is_fresh());
        c.reset(&[]);
        assert!(c.is_fresh());
        c.mark_stale();
        assert!(!c.is_fresh());
        assert!(!RevocationCache::new(Duration::from_secs(5), false).is_fresh());
    }
}
