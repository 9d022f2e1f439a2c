//! The revocation view every replica keeps: a local cache of what is revoked, fed by the
//! store's feed. Lower than the use cases: it knows the store and token claims, nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::domain::duration_millis;
use crate::store::{BlockRecord, FeedEvent, Store};
use crate::token::TaskClaims;

/// Why a token is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The token itself (RFC 7009, admin `jti`).
    Token,
    /// Its task was ended or revoked.
    Task,
    /// A subject, issuer or `all` revocation covers it.
    Selector,
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
    corrupt: AtomicU64,
    /// The store is in this process (memory): every revocation is applied here as it is
    /// taken, so the view cannot be stale.
    local: bool,
    /// Why the view cannot be trusted beyond staleness (shown by /readyz), if it cannot.
    problem: RwLock<Option<&'static str>>,
    /// The store's `maxmemory-policy`, once read (shown by /readyz).
    eviction: RwLock<Option<String>>,
    /// The last attempt to write to the feed (a publish or a probe) failed: this replica
    /// cannot revoke (shown by /readyz).
    publish_failed: AtomicBool,
    /// When the feed was last probed after a failed publish.
    last_probe: parking_lot::Mutex<Option<Instant>>,
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
            corrupt: AtomicU64::new(0),
            local,
            problem: RwLock::new(None),
            eviction: RwLock::new(None),
            publish_failed: AtomicBool::new(false),
            last_probe: parking_lot::Mutex::new(None),
        };
        if fresh {
            c.mark_ok();
        }
        c
    }

    fn mark_ok(&self) {
        self.last_ok
            .store(duration_millis(self.epoch.elapsed()), Ordering::SeqCst);
        self.healthy.store(true, Ordering::SeqCst);
    }

    pub fn mark_stale(&self) {
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// Reading the feed failed: the view is stale at once; an entry that cannot be read is
    /// also counted (it keeps the view stale until an operator resolves it).
    pub fn failed(&self, e: &crate::store::StoreError) {
        self.mark_stale();
        if matches!(e, crate::store::StoreError::Corrupt { .. }) {
            self.corrupt.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Why the view cannot be trusted, if an operator must act.
    pub fn problem(&self) -> Option<&'static str> {
        *self.problem.read()
    }

    /// The store's eviction policy, if it was read.
    pub fn eviction_policy(&self) -> Option<String> {
        self.eviction.read().clone()
    }

    fn set_problem(&self, problem: Option<&'static str>) {
        *self.problem.write() = problem;
    }

    /// Records whether a write to the feed (a publish or a probe) succeeded.
    pub fn wrote_feed(&self, ok: bool) {
        self.publish_failed.store(!ok, Ordering::SeqCst);
    }

    /// True when the last write to the feed failed: this replica cannot revoke.
    pub fn publish_failing(&self) -> bool {
        self.publish_failed.load(Ordering::SeqCst)
    }

    /// Whether the feed should be probed now: its last write failed and it was not probed in
    /// the last second. Counts as the probe's start.
    pub fn probe_due(&self) -> bool {
        if !self.publish_failing() {
            return false;
        }
        let mut last = self.last_probe.lock();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Feed reads that met an entry this replica cannot read.
    pub fn corrupt_reads(&self) -> u64 {
        self.corrupt.load(Ordering::SeqCst)
    }

    /// True when the cache reflects the feed within the staleness bound.
    pub fn is_fresh(&self) -> bool {
        if self.local {
            return true;
        }
        if !self.healthy.load(Ordering::SeqCst) {
            return false;
        }
        let age = duration_millis(self.epoch.elapsed())
            .saturating_sub(self.last_ok.load(Ordering::SeqCst));
        age <= duration_millis(self.max_staleness)
    }

    /// Milliseconds since the feed was last read successfully.
    pub fn lag_ms(&self) -> u64 {
        duration_millis(self.epoch.elapsed()).saturating_sub(self.last_ok.load(Ordering::SeqCst))
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
    pub fn revoked_reason(&self, c: &TaskClaims, now: i64) -> Option<Revoked> {
        if self.jtis.read().contains_key(&c.jti) {
            return Some(Revoked::Token);
        }
        if self.tasks.read().contains_key(&c.txn) {
            return Some(Revoked::Task);
        }
        let blocks = self.blocks.read();
        blocks
            .iter()
            .any(|b| c.iat <= b.created_at && now <= b.until && b.selector.matches(&c.sub))
            .then_some(Revoked::Selector)
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

/// Shown by /readyz while a replica waits for an operator to confirm a store reset.
pub const UNCONFIRMED_RESET: &str = "the store holds Writ state but no generation key: it \
lost its revocation state (flushed or evicted) and no running replica remembers it; confirm \
with `writ store confirm-reset` (POST /admin/v1/store/confirm-reset)";

/// Follows the store's feed into the cache: a snapshot, then events as they come; on any
/// error the cache is marked stale at once and rebuilt from a fresh snapshot. After every
/// read the store's generation is checked: if it vanished or changed, the store lost its
/// state and this replica publishes again what it remembers.
pub async fn follow(
    store: Arc<dyn Store>,
    cache: Arc<RevocationCache>,
    clock: Arc<dyn crate::domain::Clock>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut known: Option<String> = None;
    let mut policy_read = false;
    loop {
        if !policy_read {
            policy_read = check_eviction(&*store, &cache).await;
        }
        match resync(&*store, &cache, clock.now(), &mut known).await {
            Ok(Some(cursor)) => {
                backoff = Duration::from_millis(50);
                tail(&*store, &cache, &*clock, cursor, known.as_deref()).await;
            }
            Ok(None) => {
                cache.mark_stale();
                tracing::error!("{UNCONFIRMED_RESET}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                cache.failed(&e);
                tracing::error!(error = %crate::error::chain(&e), "cannot load revocation state");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Reads the store's eviction policy and warns if it may evict keys: an evicted feed loses
/// revocations. Returns whether the question was answered (or cannot be).
async fn check_eviction(store: &dyn Store, cache: &RevocationCache) -> bool {
    match store.eviction_policy().await {
        Ok(Some(policy)) => {
            if policy != "noeviction" {
                tracing::warn!(%policy, "the store may evict keys under memory pressure, and revocations with them: set maxmemory-policy noeviction");
            }
            *cache.eviction.write() = Some(policy);
            true
        }
        Ok(None) => true,
        Err(crate::store::StoreError::Unavailable(e))
            if !(e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()) =>
        {
            tracing::warn!(error = %e, "cannot read the store's maxmemory-policy (CONFIG GET not permitted); make sure it is noeviction");
            *cache.eviction.write() = Some("unknown".to_string());
            true
        }
        Err(_) => false,
    }
}

/// Reads the feed from `cursor` into the cache until a read fails or the store's
/// generation is no longer `known`.
async fn tail(
    store: &dyn Store,
    cache: &RevocationCache,
    clock: &dyn crate::domain::Clock,
    mut cursor: crate::store::FeedCursor,
    known: Option<&str>,
) {
    let mut last_prune = Instant::now();
    loop {
        let read = store.read_feed(&cursor, Duration::from_millis(500)).await;
        let epoch = match &read {
            Ok(_) => store.epoch().await,
            Err(_) => Ok(None),
        };
        let (events, next) = match (read, epoch) {
            (Ok(r), Ok(epoch)) if epoch.as_deref() == known => r,
            (Ok(_), Ok(_)) => {
                cache.mark_stale();
                tracing::error!(
                    "the store lost its state (its generation key changed or vanished); publishing again what this replica remembers"
                );
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                cache.failed(&e);
                tracing::error!(error = %crate::error::chain(&e), "revocation feed lost; resynchronising");
                return;
            }
        };
        for e in &events {
            cache.apply(e);
        }
        cursor = next;
        cache.mark_ok();
        if last_prune.elapsed() > Duration::from_secs(10) {
            cache.prune(clock.now());
            if let Err(e) = store.prune(clock.now()).await {
                tracing::warn!(error = %crate::error::chain(&e), "cannot prune the store");
            }
            last_prune = Instant::now();
        }
    }
}

/// Loads a snapshot, restores what the store lost, resets the cache from both, and sets the
/// store's generation if it is absent. `None` when the store lost its state and nothing
/// here remembers it: an operator must confirm before this replica trusts it.
async fn resync(
    store: &dyn Store,
    cache: &RevocationCache,
    now: i64,
    known: &mut Option<String>,
) -> Result<Option<crate::store::FeedCursor>, crate::store::StoreError> {
    let current = store.epoch().await?;
    if current.is_none() && known.is_none() && store.holds_state().await? {
        cache.set_problem(Some(UNCONFIRMED_RESET));
        return Ok(None);
    }
    cache.set_problem(None);
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
    // Only once what this replica remembers is back: a replica that then starts trusts it.
    let epoch = match current {
        Some(e) => e,
        None => {
            let fresh =
                crate::domain::random_id("gen_").map_err(crate::store::StoreError::Random)?;
            store.init_epoch(&fresh).await?
        }
    };
    *known = Some(epoch);
    cache.reset(&events);
    Ok(Some(cursor))
}

#[cfg(test)]
mod tests {
    use super::*;

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
