//! Group commit: a record is durable once an fdatasync that started after it was written
//! has returned. Callers waiting at the same time share one sync.
//!
//! A thread of its own (`writ-audit-sync`) does the syncing: while anyone waits for a
//! record that is not on disk yet, it syncs everything written so far, then wakes every
//! waiter at once (a watch channel); those covered return, the rest are covered by the next
//! sync, which starts at once. Sync progress never waits for an async task to be scheduled:
//! under load, a sync led by one of the waiters would start only when that waiter got a
//! worker thread again, behind every request in the run queue.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::AuditError;

struct Shared {
    file: File,
    written: AtomicU64,
    synced: AtomicU64,
    /// The highest `seq` someone waits for.
    wanted: Mutex<u64>,
    want: Condvar,
    /// Bumped whenever a sync ends, to wake the waiters.
    ended: tokio::sync::watch::Sender<()>,
    /// Set once a sync failed: the kernel may have dropped what it could not write, so
    /// nothing is known to be durable any more and nothing is issued until a restart.
    failed: AtomicBool,
    /// Test hook: the next sync fails.
    fail_next: AtomicBool,
    fsyncs: AtomicU64,
    stop: AtomicBool,
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
            let _guard = s.wanted.lock();
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
            wanted: Mutex::new(seq),
            want: Condvar::new(),
            ended: tokio::sync::watch::Sender::new(()),
            failed: AtomicBool::new(false),
            fail_next: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("writ-audit-sync".into())
            .spawn(move || syncer(&s))
            .map_err(|e| AuditError::Io(format!("cannot start the sync thread: {e}")))?;
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

    /// Waits until every record up to `seq` is on disk.
    pub(super) async fn commit(&self, seq: u64) -> Result<(), AuditError> {
        let Some(s) = &self.shared else {
            return Ok(());
        };
        let mut ended = s.ended.subscribe();
        loop {
            // Marked seen before looking, so that a sync ending after the look wakes us.
            ended.borrow_and_update();
            if s.failed.load(Ordering::Acquire) {
                return Err(AuditError::NotDurable("an earlier sync failed".into()));
            }
            if s.synced.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            {
                let mut wanted = s.wanted.lock();
                if *wanted < seq {
                    *wanted = seq;
                    s.want.notify_one();
                }
            }
            // The sender lives as long as `s`: `changed` cannot fail; look again anyway.
            let _ = ended.changed().await;
        }
    }

    /// Syncs everything written so far, now, on this thread (shutdown).
    pub(super) fn sync_now(&self) -> Result<(), AuditError> {
        if let Some(s) = &self.shared {
            let target = s.written.load(Ordering::Acquire);
            s.file
                .sync_data()
                .map_err(|e| AuditError::Io(e.to_string()))?;
            s.fsyncs.fetch_add(1, Ordering::Relaxed);
            s.synced.fetch_max(target, Ordering::AcqRel);
            s.ended.send_replace(());
        }
        Ok(())
    }
}

/// The sync thread: syncs while someone waits, until the log is dropped.
fn syncer(s: &Shared) {
    loop {
        {
            let mut wanted = s.wanted.lock();
            loop {
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                let pending = *wanted > s.synced.load(Ordering::Acquire);
                if pending && !s.failed.load(Ordering::Acquire) {
                    break;
                }
                s.want.wait(&mut wanted);
            }
        }
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
            }
            Err(e) => {
                s.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "decision log sync failed: refusing to issue until restarted");
            }
        }
        s.ended.send_replace(());
    }
}
