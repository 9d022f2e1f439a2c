//! Group commit: a record is durable once an fdatasync that started after it was written
//! has returned. Callers waiting at the same time share one sync.
//!
//! One waiter at a time is the leader: it syncs everything written so far (on a blocking
//! thread) while the others wait on a watch channel; when the sync returns, every waiter is
//! woken at once, those it covered return, and one of the rest leads the next sync. No
//! waiter queues behind another (a lock handed from waiter to waiter would make each sync
//! wait for every earlier waiter to be scheduled in turn).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::AuditError;

pub(super) struct Durability {
    /// The file to fdatasync (`None` for stdout and discard: nothing to sync).
    file: Option<Arc<File>>,
    written: AtomicU64,
    synced: AtomicU64,
    /// True while a leader syncs.
    syncing: AtomicBool,
    /// Bumped whenever a sync ends (or its leader goes away), to wake the waiters.
    ended: tokio::sync::watch::Sender<()>,
    /// Set once a sync failed: the kernel may have dropped what it could not write, so
    /// nothing is known to be durable any more and nothing is issued until a restart.
    failed: AtomicBool,
    /// Test hook: the next sync fails.
    fail_next: AtomicBool,
    fsyncs: AtomicU64,
}

/// Clears `syncing` and wakes the waiters when the leader is done, or dropped.
struct Leading<'a>(&'a Durability);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.syncing.store(false, Ordering::Release);
        self.0.ended.send_replace(());
    }
}

impl Durability {
    pub(super) fn new(file: Option<Arc<File>>, seq: u64) -> Self {
        Durability {
            file,
            written: AtomicU64::new(seq),
            synced: AtomicU64::new(seq),
            syncing: AtomicBool::new(false),
            ended: tokio::sync::watch::Sender::new(()),
            failed: AtomicBool::new(false),
            fail_next: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
        }
    }

    /// Called under the append lock once `seq` is handed to the operating system.
    pub(super) fn mark_written(&self, seq: u64) {
        self.written.store(seq, Ordering::Release);
    }

    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub(super) fn synced(&self) -> u64 {
        if self.file.is_none() {
            return self.written();
        }
        self.synced.load(Ordering::Acquire)
    }

    pub(super) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    pub(super) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(super) fn fail_next(&self) {
        self.fail_next.store(true, Ordering::Release);
    }

    /// Waits until every record up to `seq` is on disk.
    pub(super) async fn commit(&self, seq: u64) -> Result<(), AuditError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut ended = self.ended.subscribe();
        loop {
            // Seen before looking, so that a sync ending after the look wakes us.
            ended.borrow_and_update();
            if self.is_failed() {
                return Err(AuditError::NotDurable("an earlier sync failed".into()));
            }
            if self.synced.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            if self
                .syncing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Someone leads: wait for the end of that sync. A closed channel cannot
                // happen (we hold the sender); then look again anyway.
                let _ = ended.changed().await;
                continue;
            }
            let leading = Leading(self);
            // Another leader may have covered us between the look and the claim.
            if self.synced.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            // Everything written before the sync starts is covered by it.
            let target = self.written();
            let f = file.clone();
            let inject = self.fail_next.swap(false, Ordering::AcqRel);
            let result = tokio::task::spawn_blocking(move || {
                if inject {
                    return Err(std::io::Error::other("injected sync failure"));
                }
                f.sync_data()
            })
            .await;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            let outcome = match result {
                Ok(Ok(())) => {
                    self.synced.fetch_max(target, Ordering::AcqRel);
                    Ok(())
                }
                Ok(Err(e)) => {
                    self.failed.store(true, Ordering::Release);
                    tracing::error!(error = %e, "decision log sync failed: refusing to issue until restarted");
                    Err(AuditError::NotDurable(e.to_string()))
                }
                // The sync may or may not have happened; the next leader syncs again.
                Err(e) => Err(AuditError::NotDurable(e.to_string())),
            };
            drop(leading);
            return outcome;
        }
    }

    /// Syncs everything written so far, now, on this thread (shutdown).
    pub(super) fn sync_now(&self) -> Result<(), AuditError> {
        if let Some(f) = &self.file {
            let target = self.written();
            f.sync_data().map_err(|e| AuditError::Io(e.to_string()))?;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.synced.fetch_max(target, Ordering::AcqRel);
        }
        Ok(())
    }
}
