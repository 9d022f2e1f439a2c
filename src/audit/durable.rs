//! Group commit: a record is durable once an fdatasync that started after it was written
//! has returned. Callers waiting at the same time share one sync.
//!
//! A thread of its own (`writ-audit-sync`) does the syncing: while anyone waits for a
//! record that is not on disk yet, it syncs everything written so far, then has exactly
//! the waiters that sync covered woken (each waits on a oneshot channel filed under its
//! `seq`); the rest are covered by the next sync, which starts at once. Sync progress never
//! waits for an async task to be scheduled (under load, a sync led by one of the waiters
//! would start only when that waiter got a worker thread again, behind every request in
//! the run queue), and no waiter is woken for a sync that did not cover it.
//!
//! The waking itself is done by a task on the runtime (the dispatcher) when the log was
//! opened on a multi-thread runtime (the broker's): the sync thread wakes that one task,
//! which wakes the waiters from a worker thread, into that worker's own queue. Woken one
//! by one from the sync thread, every waiter went through the runtime's shared queue and
//! often had a parked worker woken for it (about 3% of exchange throughput at 32
//! connections, measured with `scripts/bench.sh`).

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
    /// The sync thread waits on it for someone to wait for a record.
    want: Condvar,
    /// Wakes the dispatcher, while it runs (see the module's documentation).
    dispatch: tokio::sync::Notify,
    dispatcher: AtomicBool,
    /// Set once a sync failed: the kernel may have dropped what it could not write, so
    /// nothing is known to be durable any more and nothing is issued until a restart.
    failed: AtomicBool,
    /// Test hook: the next sync fails.
    fail_next: AtomicBool,
    fsyncs: AtomicU64,
    stop: AtomicBool,
    /// Requests on their way to a record that will be waited for (see [`Coming`]).
    coming: AtomicUsize,
    /// The runtime's report of idle workers, and the longest a sync is held back (see
    /// [`gather`]).
    workers: &'static Workers,
    max_gather: Duration,
    /// Set while a sync is held back.
    held: AtomicBool,
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
            s.dispatch.notify_one();
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
        Self::with_file_held(file, seq, &WORKERS, MAX_GATHER)
    }

    /// [`Durability::with_file`], its syncs held back by `workers`' report for at most
    /// `max_gather`.
    pub(super) fn with_file_held(
        file: File,
        seq: u64,
        workers: &'static Workers,
        max_gather: Duration,
    ) -> Result<Self, AuditError> {
        let shared = Arc::new(Shared {
            file,
            written: AtomicU64::new(seq),
            synced: AtomicU64::new(seq),
            waiting: Mutex::new(Waiting::default()),
            want: Condvar::new(),
            dispatch: tokio::sync::Notify::new(),
            dispatcher: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            fail_next: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            coming: AtomicUsize::new(0),
            workers,
            max_gather,
            held: AtomicBool::new(false),
        });
        // Only on a runtime whose workers run it by themselves: a current-thread runtime
        // runs tasks only while something blocks on it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            shared.dispatcher.store(true, Ordering::SeqCst);
            runtime.spawn(dispatcher(Dispatcher(shared.clone())));
        }
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
        if cfg!(feature = "bench-unsynced") {
            return Pending(Wait::Done(Ok(())));
        }
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
            s.synced.fetch_max(target, Ordering::SeqCst);
            synced(s);
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
            && s.coming.fetch_sub(1, Ordering::SeqCst) == 1
        {
            // The last one: a sync held back for it may start now.
            release_held_syncs();
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

/// The dispatcher's hold on the log: when the task is dropped (the runtime shut down), the
/// sync thread wakes waiters itself again.
struct Dispatcher(Arc<Shared>);

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.0.dispatcher.store(false, Ordering::SeqCst);
        // A sync that ended before the sync thread saw this may have left its waiters to
        // the dispatcher.
        wake(&self.0, false);
    }
}

/// Wakes, from a worker thread, the waiters each sync covered, until the log is dropped.
async fn dispatcher(d: Dispatcher) {
    loop {
        d.0.dispatch.notified().await;
        if d.0.stop.load(Ordering::Acquire) {
            return;
        }
        wake(&d.0, false);
    }
}

/// After a sync succeeded: has the waiters it covered woken, by the dispatcher while it
/// runs. (Sequentially consistent with [`Dispatcher`]'s drop: either the dispatcher is seen
/// running and is woken, or its drop sees `synced` and wakes them.)
fn synced(s: &Shared) {
    if s.dispatcher.load(Ordering::SeqCst) {
        s.dispatch.notify_one();
    } else {
        wake(s, false);
    }
}

/// Wakes the waiters the last sync covered (all of them, with an error, after a failure).
fn wake(s: &Shared, failed: bool) {
    let covered = {
        let mut waiting = s.waiting.lock();
        waiting.take_covered(s.synced.load(Ordering::SeqCst), failed)
    };
    for tx in covered {
        let _ = tx.send(if failed { Err(()) } else { Ok(()) });
    }
}

/// The sync thread: syncs while someone waits, until the log is dropped. Each sync is held
/// back a little first (see [`gather`]).
fn syncer(s: &Shared) {
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
        gather(s);
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
                s.synced.fetch_max(target, Ordering::SeqCst);
                synced(s);
            }
            Err(e) => {
                s.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "decision log sync failed: refusing to issue until restarted");
                wake(s, true);
            }
        }
    }
}

/// The longest a sync is held back.
const MAX_GATHER: Duration = Duration::from_millis(3);

/// What the runtime reports of its worker threads: how many have run out of work.
pub(super) struct Workers {
    /// Whether the runtime reports it at all (the broker's does; a test's may not).
    reported: AtomicBool,
    idle: AtomicUsize,
}

impl Workers {
    pub(super) const fn new() -> Self {
        Workers {
            reported: AtomicBool::new(false),
            idle: AtomicUsize::new(0),
        }
    }

    pub(super) fn parked(&self) {
        // Written once: every park would otherwise write the same shared cache line.
        if !self.reported.load(Ordering::Relaxed) {
            self.reported.store(true, Ordering::SeqCst);
        }
        self.idle.fetch_add(1, Ordering::SeqCst);
        release_held_syncs();
    }

    pub(super) fn unparked(&self) {
        self.idle.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a sync should be held back for now: `None` when the runtime reports nothing.
    fn all_busy(&self) -> Option<bool> {
        self.reported
            .load(Ordering::SeqCst)
            .then(|| self.idle.load(Ordering::SeqCst) == 0)
    }
}

/// The process's runtime (see `main`).
static WORKERS: Workers = Workers::new();

/// Syncs held back now, and what they wait on.
static HELD: AtomicUsize = AtomicUsize::new(0);
static HELD_LOCK: Mutex<()> = Mutex::new(());
static HELD_WAKE: Condvar = Condvar::new();

/// Runtime hook (`on_thread_park`): a worker thread has run out of work.
pub fn worker_parked() {
    WORKERS.parked();
}

/// Runtime hook (`on_thread_unpark`): a worker thread has work again.
pub fn worker_unparked() {
    WORKERS.unparked();
}

/// Wakes held-back syncs to look again whether they may start.
fn release_held_syncs() {
    // Sequentially consistent with `gather`, which counts itself held before it looks at
    // what holds it: one of the two sees the other.
    if HELD.load(Ordering::SeqCst) > 0 {
        // Under the lock `gather` looks under, so the wake is not lost.
        let _guard = HELD_LOCK.lock();
        HELD_WAKE.notify_all();
    }
}

/// Holds a sync back while it costs no throughput to wait, so that one sync covers more
/// records (each fdatasync costs CPU: the device round trip, the journal commit, the
/// wake-ups), for at most [`MAX_GATHER`]:
///
/// - where the runtime reports idle workers (the broker's does), while every worker is
///   busy: the requests they run are on their way to records that this sync then covers
///   too, and nothing waits for a CPU the sync could free. Once a worker runs out of work
///   (everyone left is waiting, or waiting on something else), the sync starts;
/// - elsewhere, while a request that will wait for its record has not written it yet
///   ([`Durability::coming`]).
fn gather(s: &Shared) {
    let deadline = Instant::now() + s.max_gather;
    let mut guard = HELD_LOCK.lock();
    HELD.fetch_add(1, Ordering::SeqCst);
    loop {
        let held = s
            .workers
            .all_busy()
            .unwrap_or_else(|| s.coming.load(Ordering::SeqCst) > 0);
        if !held {
            break;
        }
        s.held.store(true, Ordering::SeqCst);
        if HELD_WAKE.wait_until(&mut guard, deadline).timed_out() {
            break;
        }
    }
    s.held.store(false, Ordering::SeqCst);
    HELD.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A log file and its durability, syncs held back for at most `max_gather`.
    fn log(workers: &'static Workers, max_gather: Duration) -> (File, Durability) {
        let file = tempfile::tempfile().unwrap();
        let durability =
            Durability::with_file_held(file.try_clone().unwrap(), 0, workers, max_gather).unwrap();
        (file, durability)
    }

    fn write(file: &mut File, d: &Durability, seq: u64) {
        writeln!(file, "record {seq}").unwrap();
        d.mark_written(seq);
    }

    fn shared(d: &Durability) -> &Shared {
        d.shared.as_deref().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_is_held_while_every_worker_is_busy_and_starts_once_one_runs_out_of_work() {
        static BUSY: Workers = Workers::new();
        BUSY.reported.store(true, Ordering::SeqCst);
        // Held for as long as the workers stay busy (the deadline is out of reach here).
        let (mut file, d) = log(&BUSY, Duration::from_secs(60));
        write(&mut file, &d, 1);
        let first = d.start_commit(1);
        let start = Instant::now();
        while !shared(&d).held.load(Ordering::SeqCst) && d.synced() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the sync thread never ran"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.synced(), 0, "synced while every worker was busy");
        assert_eq!(d.fsyncs(), 0);
        // A record written meanwhile is covered by the same sync.
        write(&mut file, &d, 2);
        let second = d.start_commit(2);
        BUSY.parked();
        let wait = Duration::from_secs(10);
        tokio::time::timeout(wait, first.wait())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(wait, second.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.fsyncs(), 1, "one sync covers both records");
        assert_eq!(d.synced(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_that_never_run_out_of_work_hold_a_sync_back_no_longer_than_its_limit() {
        static ALWAYS_BUSY: Workers = Workers::new();
        ALWAYS_BUSY.reported.store(true, Ordering::SeqCst);
        let limit = Duration::from_millis(50);
        let (mut file, d) = log(&ALWAYS_BUSY, limit);
        for seq in 1..=3 {
            write(&mut file, &d, seq);
            let start = Instant::now();
            tokio::time::timeout(Duration::from_secs(10), d.commit(seq))
                .await
                .expect("a sync held back past its limit")
                .unwrap();
            assert!(
                start.elapsed() >= limit,
                "the sync was not held back at all"
            );
        }
        assert_eq!(d.fsyncs(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_starts_at_once_while_a_worker_has_no_work() {
        static ONE_IDLE: Workers = Workers::new();
        ONE_IDLE.parked();
        let (mut file, d) = log(&ONE_IDLE, Duration::from_secs(60));
        for seq in 1..=3 {
            write(&mut file, &d, seq);
            tokio::time::timeout(Duration::from_secs(10), d.commit(seq))
                .await
                .expect("the sync was held back although a worker had no work")
                .unwrap();
        }
        assert_eq!(d.fsyncs(), 3);
        // A worker that has work again holds the next sync back.
        ONE_IDLE.unparked();
        assert_eq!(ONE_IDLE.all_busy(), Some(true));
    }

    #[test]
    fn waiters_are_woken_without_the_dispatcher_once_its_runtime_is_gone() {
        let first = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        static NONE: Workers = Workers::new();
        let (mut file, d) = first.block_on(async { log(&NONE, Duration::from_millis(3)) });
        assert!(
            shared(&d).dispatcher.load(Ordering::SeqCst),
            "no dispatcher was started"
        );
        drop(first);
        assert!(
            !shared(&d).dispatcher.load(Ordering::SeqCst),
            "the dispatcher outlived its runtime"
        );
        let second = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            for seq in 1..=3 {
                write(&mut file, &d, seq);
                tokio::time::timeout(Duration::from_secs(10), d.commit(seq))
                    .await
                    .expect("a waiter was left to a dispatcher that is gone")
                    .unwrap();
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_waiters_are_each_woken_by_the_dispatcher() {
        static NONE: Workers = Workers::new();
        let (file, d) = log(&NONE, Duration::from_millis(3));
        let d = Arc::new(d);
        let file = Arc::new(Mutex::new(file));
        let mut tasks = Vec::new();
        let next = Arc::new(Mutex::new(0u64));
        for _ in 0..64 {
            let (d, file, next) = (d.clone(), file.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let seq = {
                        // Under one lock, as the log's append lock does.
                        let mut next = next.lock();
                        *next += 1;
                        write(&mut file.lock(), &d, *next);
                        *next
                    };
                    d.commit(seq).await.unwrap();
                    assert!(d.synced() >= seq, "woken before its record was synced");
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a waiter was never woken")
                .unwrap();
        }
        assert_eq!(d.synced(), 64 * 20);
        assert!(d.fsyncs() < 64 * 20, "no two waiters shared a sync");
    }
}
