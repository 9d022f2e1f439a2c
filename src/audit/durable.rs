//! Group commit: a record is durable once an fdatasync that started after it was written
//! has returned. Callers waiting at the same time share one sync.
//!
//! A thread of its own (`writ-audit-sync`) does the syncing: while anyone waits for a
//! record that is not on disk yet, it syncs everything written so far, then wakes exactly
//! the waiters that sync covered (each waits on a oneshot channel filed under its `seq`);
//! the rest are covered by the next sync, which starts at once. Sync progress never waits
//! for an async task to be scheduled (under load, a sync led by one of the waiters would
//! start only when that waiter got a worker thread again, behind every request in the run
//! queue), and no waiter is woken for a sync that did not cover it.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::AuditError;

struct Shared {
    file: File,
    written: AtomicU64,
    synced: AtomicU64,
    waiting: Mutex<Waiting>,
    want: Condvar,
    /// Set once a sync failed: the kernel may have dropped what it could not write, so
    /// nothing is known to be durable any more and nothing is issued until a restart.
    failed: AtomicBool,
    /// Test hook: the next sync fails.
    fail_next: AtomicBool,
    fsyncs: AtomicU64,
    stop: AtomicBool,
    /// Requests on their way to a record that will be waited for (see [`Coming`]).
    coming: AtomicUsize,
}

/// Who waits for which `seq`: woken with `Ok` once it is on disk, `Err` if a sync failed.
#[derive(Default)]
struct Waiting {
    waiters: BTreeMap<u64, Vec<oneshot::Sender<Result<(), ()>>>>,
}

impl Waiting {
    /// The highest `seq` someone waits for.
    fn wanted(&self) -> u64 {
        self.waiters.last_key_value().map_or(0, |(seq, _)| *seq)
    }

    /// Takes the waiters whose `seq` is covered by `synced` (every waiter when `all`).
    fn take_covered(&mut self, synced: u64, all: bool) -> Vec<oneshot::Sender<Result<(), ()>>> {
        let rest = if all {
            BTreeMap::new()
        } else {
            self.waiters.split_off(&synced.saturating_add(1))
        };
        std::mem::replace(&mut self.waiters, rest)
            .into_values()
            .flatten()
            .collect()
    }
}

pub(super) struct Durability {
    /// `None` for stdout and discard logs: nothing to sync.
    shared: Option<Arc<Shared>>,
    /// What was written, when there is no file.
    written: AtomicU64,
}

impl Drop for Durability {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            s.stop.store(true, Ordering::Release);
            let _guard = s.waiting.lock();
            s.want.notify_all();
        }
    }
}

impl Durability {
    /// For stdout and discard logs: nothing to sync.
    pub(super) fn without_file(seq: u64) -> Self {
        Durability {
            shared: None,
            written: AtomicU64::new(seq),
        }
    }

    /// `file` is the log's file (a handle of its own), `seq` the last record it holds.
    pub(super) fn with_file(file: File, seq: u64) -> Result<Self, AuditError> {
        let shared = Arc::new(Shared {
            file,
            written: AtomicU64::new(seq),
            synced: AtomicU64::new(seq),
            waiting: Mutex::new(Waiting::default()),
            want: Condvar::new(),
            failed: AtomicBool::new(false),
            fail_next: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            coming: AtomicUsize::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("writ-audit-sync".into())
            .spawn(move || syncer(&s))
            .map_err(|e| AuditError::io("sync thread start", e))?;
        Ok(Durability {
            shared: Some(shared),
            written: AtomicU64::new(seq),
        })
    }

    /// Called under the append lock once `seq` is handed to the operating system.
    pub(super) fn mark_written(&self, seq: u64) {
        match &self.shared {
            Some(s) => s.written.store(seq, Ordering::Release),
            None => self.written.store(seq, Ordering::Release),
        }
    }

    pub(super) fn written(&self) -> u64 {
        match &self.shared {
            Some(s) => s.written.load(Ordering::Acquire),
            None => self.written.load(Ordering::Acquire),
        }
    }

    pub(super) fn synced(&self) -> u64 {
        match &self.shared {
            Some(s) => s.synced.load(Ordering::Acquire),
            None => self.written(),
        }
    }

    pub(super) fn fsyncs(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.fsyncs.load(Ordering::Relaxed))
    }

    pub(super) fn is_failed(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.failed.load(Ordering::Acquire))
    }

    pub(super) fn fail_next(&self) {
        if let Some(s) = &self.shared {
            s.fail_next.store(true, Ordering::Release);
        }
    }

    /// Announces a request that is about to write a record and wait for it: a sync under
    /// way is held back for it (at most [`MAX_GATHER`]) until the guard is written or dropped.
    pub(super) fn coming(&self) -> Coming<'_> {
        if let Some(s) = &self.shared {
            s.coming.fetch_add(1, Ordering::AcqRel);
        }
        Coming {
            shared: self.shared.as_deref(),
            done: AtomicBool::new(false),
        }
    }

    #[cfg(test)]
    pub(super) fn coming_count(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |s| s.coming.load(Ordering::Acquire))
    }

    /// Waits until every record up to `seq` is on disk.
    pub(super) async fn commit(&self, seq: u64) -> Result<(), AuditError> {
        self.start_commit(seq).wait().await
    }

    /// Asks for `seq` to be synced now and returns what to wait on, so that the caller can
    /// do its own work (sign a token) while the sync runs.
    pub(super) fn start_commit(&self, seq: u64) -> Pending {
        let Some(s) = &self.shared else {
            return Pending(Wait::Done(Ok(())));
        };
        let mut waiting = s.waiting.lock();
        // Looked at under the lock the sync thread wakes waiters under: either the sync that
        // covers `seq` is already counted here, or it will find this waiter.
        if s.failed.load(Ordering::Acquire) {
            return Pending(Wait::Done(Err(sync_failed())));
        }
        if s.synced.load(Ordering::Acquire) >= seq {
            return Pending(Wait::Done(Ok(())));
        }
        let (tx, rx) = oneshot::channel();
        waiting.waiters.entry(seq).or_default().push(tx);
        s.want.notify_one();
        Pending(Wait::Sync(rx))
    }

    /// Syncs everything written so far, now, on this thread (shutdown).
    pub(super) fn sync_now(&self) -> Result<(), AuditError> {
        if let Some(s) = &self.shared {
            let target = s.written.load(Ordering::Acquire);
            s.file.sync_data().map_err(|e| AuditError::io("sync", e))?;
            s.fsyncs.fetch_add(1, Ordering::Relaxed);
            s.synced.fetch_max(target, Ordering::AcqRel);
            let _ = wake(s, false);
        }
        Ok(())
    }
}

fn sync_failed() -> AuditError {
    AuditError::NotDurable("a sync failed".into())
}

/// A request on its way to a record: counted until [`Coming::written`] or drop.
pub struct Coming<'a> {
    shared: Option<&'a Shared>,
    done: AtomicBool,
}

impl Coming<'_> {
    /// The record is written (or will not be): a sync no longer waits for it.
    pub fn written(&self) {
        if let Some(s) = self.shared
            && !self.done.swap(true, Ordering::AcqRel)
        {
            s.coming.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Coming<'_> {
    fn drop(&mut self) {
        self.written();
    }
}

/// A commit under way: [`Pending::wait`] returns once the record is on disk.
#[must_use = "a record is durable only once `wait` has returned Ok"]
pub struct Pending(Wait);

enum Wait {
    Done(Result<(), AuditError>),
    Sync(oneshot::Receiver<Result<(), ()>>),
}

impl Pending {
    pub async fn wait(self) -> Result<(), AuditError> {
        match self.0 {
            Wait::Done(result) => result,
            Wait::Sync(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(())) => Err(sync_failed()),
                Err(_) => Err(AuditError::NotDurable("the log was closed".into())),
            },
        }
    }
}

/// Wakes the waiters the last sync covered (all of them, with an error, after a failure);
/// returns how many it woke.
fn wake(s: &Shared, failed: bool) -> usize {
    let covered = {
        let mut waiting = s.waiting.lock();
        waiting.take_covered(s.synced.load(Ordering::Acquire), failed)
    };
    let n = covered.len();
    for tx in covered {
        let _ = tx.send(if failed { Err(()) } else { Ok(()) });
    }
    n
}

/// The longest a sync is held back for requests on their way to a record.
const MAX_GATHER: Duration = Duration::from_millis(3);
/// How often a held-back sync looks whether they have written it.
const GATHER_STEP: Duration = Duration::from_micros(100);
/// Under load, how long a held-back sync waits for one more record before it starts.
const ARRIVAL_STEP: Duration = Duration::from_micros(500);
/// The group size from which a sync counts as under load. Requests queued behind busy
/// workers have not announced themselves yet, so under load the records that keep
/// arriving are the better sign that more are on their way.
const BUSY_GROUP: usize = 4;

/// The sync thread: syncs while someone waits, until the log is dropped.
///
/// A sync is held back while requests that will wait for their record are still on their
/// way to writing it ([`Durability::coming`]), for at most [`MAX_GATHER`], so that one
/// sync covers them too: each fdatasync costs CPU (the device round trip, the journal
/// commit, the wake-ups), and a few large groups keep that cost per token low. When every
/// such request is already waiting, or there is only one, the sync starts at once. Under
/// load (the last group was large) it is held back further while records keep arriving,
/// [`ARRIVAL_STEP`] at a time.
fn syncer(s: &Shared) {
    let mut last_group = 0;
    loop {
        {
            let mut waiting = s.waiting.lock();
            loop {
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                let pending = waiting.wanted() > s.synced.load(Ordering::Acquire);
                if pending && !s.failed.load(Ordering::Acquire) {
                    break;
                }
                s.want.wait(&mut waiting);
            }
        }
        gather(s, last_group);
        // Everything written before the sync starts is covered by it.
        let target = s.written.load(Ordering::Acquire);
        let result = if s.fail_next.swap(false, Ordering::AcqRel) {
            Err(std::io::Error::other("injected sync failure"))
        } else {
            s.file.sync_data()
        };
        s.fsyncs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                s.synced.fetch_max(target, Ordering::AcqRel);
                last_group = wake(s, false);
            }
            Err(e) => {
                s.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "decision log sync failed: refusing to issue until restarted");
                last_group = wake(s, true);
            }
        }
    }
}

/// Holds a sync back while requests are on their way to a record, and, under load (the
/// last sync covered more than [`BUSY_GROUP`] waiters), while records keep arriving (see
/// [`syncer`]).
fn gather(s: &Shared, last_group: usize) {
    let deadline = Instant::now() + MAX_GATHER;
    while s.coming.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(GATHER_STEP);
    }
    if last_group <= BUSY_GROUP {
        return;
    }
    let mut seen = s.written.load(Ordering::Acquire);
    while Instant::now() < deadline {
        std::thread::sleep(ARRIVAL_STEP);
        let now = s.written.load(Ordering::Acquire);
        if now == seen {
            return;
        }
        seen = now;
    }
}
