//! The decision log's background work while the broker serves: once a second (and whenever
//! a checkpoint is written) it writes the summaries of ended flood windows, a checkpoint when
//! `checkpoint_interval` has passed, syncs what is still only in the page cache, and puts the
//! latest head in the store once its checkpoint is on disk.

use std::sync::Arc;
use std::time::Duration;

use super::{AuditError, AuditLog};
use crate::store::{AuditHead, Store};

/// Runs until aborted.
pub async fn run(log: Arc<AuditLog>, store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = log.head_written.notified() => {}
        }
        log.tick();
        // Records that no caller waited for (denials, revocations) reach the disk within a
        // second as well.
        if let Err(e) = log.commit(log.written_seq()).await {
            tracing::error!(error = %e, "decision log sync failed");
        }
        if let Err(e) = publish_head(&log, store.as_ref()).await {
            tracing::error!(error = %e, "decision log head not kept in the store; retrying");
        }
    }
}

/// Puts the latest checkpoint in the store once it is on disk (a head the file does not
/// hold yet would make an intact log look cut). Returns the head put, if any.
pub async fn publish_head(
    log: &AuditLog,
    store: &dyn Store,
) -> Result<Option<AuditHead>, AuditError> {
    let Some(head) = log.unpublished_head() else {
        return Ok(None);
    };
    // The checkpoint record follows the record it covers.
    log.commit(head.seq + 1).await?;
    store
        .put_audit_head(&head)
        .await
        .map_err(|e| AuditError::Store(e.to_string()))?;
    log.mark_published(head.seq);
    Ok(Some(head))
}

/// At shutdown: every pending summary, a last checkpoint, everything synced, the head kept.
pub async fn finish(log: &AuditLog, store: &dyn Store) -> Result<(), AuditError> {
    log.flush_summaries(true);
    log.checkpoint_now();
    log.sync()?;
    publish_head(log, store).await.map(|_| ())
}
