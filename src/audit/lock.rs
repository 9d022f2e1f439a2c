//! One writer per decision log: a broker holds an exclusive `flock(2)` on its log for as long
//! as the log is open, so that a second broker (or a second `writ dev`) on the same file
//! refuses to start instead of forking the chain. Readers (`writ audit verify`) take no lock.

use std::fs::{File, OpenOptions};
use std::path::Path;

use super::AuditError;

/// Held while the log is open; dropping it releases the lock.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

/// Takes the exclusive lock on the log at `path` (which must exist), on a handle of its own
/// so that the lock goes with the log and nothing else.
pub fn acquire(path: &Path) -> Result<WriterLock, AuditError> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| AuditError::io(format!("open of `{shown}`"), e))?;
    match try_lock(&file) {
        Ok(true) => Ok(WriterLock { _file: file }),
        Ok(false) => Err(AuditError::Locked { path: shown }),
        Err(e) => Err(AuditError::io(format!("lock of `{shown}`"), e)),
    }
}

/// Whether a running process holds the writer lock of the log at `path` (`false` when
/// there is no such file).
pub fn in_use(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).open(path) else {
        return false;
    };
    matches!(try_lock(&file), Ok(false))
}

/// `Ok(false)` when another open file holds the lock.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use rustix::fs::{FlockOperation, flock};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Without `flock(2)` there is no lock to take.
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}
