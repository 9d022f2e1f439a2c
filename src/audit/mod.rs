//! The decision log: one JSON object per line, each record chained to the one before by
//! SHA-256, so that a removed, reordered or edited record is found by `writ audit verify`.
//!
//! `hash` = hex SHA-256 of the record serialised without its `hash` field (compact JSON,
//! fields in the order of [`Record`]), and `hash` is written last, so a line is exactly the
//! hashed bytes with `,"hash":"…"` before the closing brace. `prev` = the previous record's
//! `hash` (64 zeros for the first).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::sha256_hex;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Exchange,
    IntrospectDenied,
    Revoke,
    TaskEnd,
    Trip,
    PolicyLoad,
    Admin,
}

/// What the caller fills in; `seq`, `ts`, `prev` and `hash` are the log's.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub decision: Option<&'static str>,
    pub subject: Option<String>,
    pub task_id: Option<String>,
    pub jti: Option<String>,
    pub scopes_requested: Vec<String>,
    pub scopes_granted: Vec<String>,
    pub audience: Vec<String>,
    pub ttl: Option<u64>,
    pub policy_version: Option<String>,
    pub policies: Vec<String>,
    pub reason: String,
    pub source_ip: Option<String>,
    pub detail: Option<Value>,
}

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub event: Event,
    pub decision: Option<String>,
    pub subject: Option<String>,
    pub task_id: Option<String>,
    pub jti: Option<String>,
    pub scopes_requested: Vec<String>,
    pub scopes_granted: Vec<String>,
    pub audience: Vec<String>,
    pub ttl: Option<u64>,
    pub policy_version: Option<String>,
    pub policies: Vec<String>,
    pub reason: String,
    pub source_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl Record {
    fn compute_hash(&self) -> Result<String, AuditError> {
        let mut unhashed = self.clone();
        unhashed.hash = None;
        let bytes = serde_json::to_vec(&unhashed).map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(sha256_hex(&bytes))
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("decision log write failed: {0}")]
    Io(String),
    #[error("decision log `{path}` ends in a record that does not parse; run `writ audit verify`")]
    CorruptTail { path: String },
}

enum Sink {
    File(File),
    Stdout,
    Discard,
}

struct Chain {
    sink: Sink,
    seq: u64,
    prev: String,
    buf: Vec<u8>,
}

/// The append-only, hash-chained decision log.
pub struct AuditLog {
    inner: Mutex<Chain>,
    /// A second handle on the same file, so that flushing to disk never holds the lock that
    /// appends take.
    sync_handle: Option<File>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens `path` for appending (creating it and its directory), continuing the chain from
    /// its last record; `-` writes to standard output.
    pub fn open(path: &str) -> Result<Self, AuditError> {
        if path == "-" {
            return Ok(Self::with_sink(Sink::Stdout, 0, GENESIS.to_string()));
        }
        let p = Path::new(path);
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| AuditError::Io(e.to_string()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(p)
            .map_err(|e| AuditError::Io(format!("`{path}`: {e}")))?;
        let (seq, prev) = match last_line(&mut file).map_err(|e| AuditError::Io(e.to_string()))? {
            None => (0, GENESIS.to_string()),
            Some(line) => {
                let rec: Record =
                    serde_json::from_str(&line).map_err(|_| AuditError::CorruptTail {
                        path: path.to_string(),
                    })?;
                let hash = rec.hash.ok_or_else(|| AuditError::CorruptTail {
                    path: path.to_string(),
                })?;
                (rec.seq, hash)
            }
        };
        let sync_handle = file
            .try_clone()
            .map_err(|e| AuditError::Io(e.to_string()))?;
        let mut log = Self::with_sink(Sink::File(file), seq, prev);
        log.sync_handle = Some(sync_handle);
        Ok(log)
    }

    /// A log that keeps the chain but writes nowhere (benchmarks of the crypto floor only).
    pub fn discard() -> Self {
        Self::with_sink(Sink::Discard, 0, GENESIS.to_string())
    }

    fn with_sink(sink: Sink, seq: u64, prev: String) -> Self {
        AuditLog {
            inner: Mutex::new(Chain {
                sink,
                seq,
                prev,
                buf: Vec::with_capacity(1024),
            }),
            sync_handle: None,
        }
    }

    /// Appends one record. Returns once the line is handed to the operating system; a failed
    /// write leaves the chain where it was, and the caller must not act on the decision.
    pub fn append(&self, event: Event, entry: Entry) -> Result<u64, AuditError> {
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut chain = self.inner.lock();
        let rec = Record {
            seq: chain.seq + 1,
            ts,
            prev: chain.prev.clone(),
            hash: None,
            event,
            decision: entry.decision.map(str::to_string),
            subject: entry.subject,
            task_id: entry.task_id,
            jti: entry.jti,
            scopes_requested: entry.scopes_requested,
            scopes_granted: entry.scopes_granted,
            audience: entry.audience,
            ttl: entry.ttl,
            policy_version: entry.policy_version,
            policies: entry.policies,
            reason: entry.reason,
            source_ip: entry.source_ip,
            detail: entry.detail,
        };
        let chain = &mut *chain;
        // One serialisation: hash the record without `hash`, then append the field.
        chain.buf.clear();
        serde_json::to_writer(&mut chain.buf, &rec).map_err(|e| AuditError::Io(e.to_string()))?;
        let hash = sha256_hex(&chain.buf);
        chain.buf.pop();
        chain.buf.extend_from_slice(b",\"hash\":\"");
        chain.buf.extend_from_slice(hash.as_bytes());
        chain.buf.extend_from_slice(b"\"}\n");
        match &mut chain.sink {
            Sink::File(f) => f
                .write_all(&chain.buf)
                .map_err(|e| AuditError::Io(e.to_string()))?,
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&chain.buf)
                    .and_then(|_| out.flush())
                    .map_err(|e| AuditError::Io(e.to_string()))?;
            }
            Sink::Discard => {}
        }
        chain.seq = rec.seq;
        chain.prev = hash;
        Ok(rec.seq)
    }

    /// Flushes what was appended to stable storage, without blocking appends.
    pub fn sync(&self) -> Result<(), AuditError> {
        if let Some(f) = &self.sync_handle {
            f.sync_data().map_err(|e| AuditError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

fn last_line(file: &mut File) -> std::io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut window = 4096u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        let trimmed = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if let Some(pos) = trimmed.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(
                String::from_utf8_lossy(&trimmed[pos + 1..]).into_owned(),
            ));
        }
        if start == 0 {
            return Ok(Some(String::from_utf8_lossy(trimmed).into_owned()));
        }
        window *= 4;
    }
}

/// The outcome of verifying a log.
#[derive(Debug, PartialEq, Eq)]
pub enum Verification {
    Intact { records: u64 },
    Broken { line: u64, reason: String },
}

/// Verifies a whole log: every line parses, `seq` counts up by one, `prev` links to the
/// previous `hash`, and every `hash` matches its record.
pub fn verify_reader(reader: impl Read) -> std::io::Result<Verification> {
    let mut prev = GENESIS.to_string();
    let mut expected_seq: Option<u64> = None;
    let mut n = 0u64;
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line?;
        let lineno = i as u64 + 1;
        let broken = |reason: String| {
            Ok(Verification::Broken {
                line: lineno,
                reason,
            })
        };
        let rec: Record = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return broken(format!("record does not parse: {e}")),
        };
        if let Some(exp) = expected_seq
            && rec.seq != exp
        {
            return broken(format!("seq {} where {} was expected", rec.seq, exp));
        }
        if rec.prev != prev {
            return broken(format!(
                "seq {}: prev does not match the hash of the record before",
                rec.seq
            ));
        }
        let Some(stated) = rec.hash.clone() else {
            return broken(format!("seq {}: record has no hash", rec.seq));
        };
        let actual = match rec.compute_hash() {
            Ok(h) => h,
            Err(e) => return broken(e.to_string()),
        };
        if actual != stated {
            return broken(format!(
                "seq {}: hash does not match the record's contents",
                rec.seq
            ));
        }
        prev = stated;
        expected_seq = Some(rec.seq + 1);
        n += 1;
    }
    Ok(Verification::Intact { records: n })
}

pub fn verify_file(path: &Path) -> std::io::Result<Verification> {
    verify_reader(File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(reason: &str) -> Entry {
        Entry {
            decision: Some("allow"),
            subject: Some("spiffe://td/a".into()),
            reason: reason.into(),
            scopes_requested: vec!["a".into()],
            ..Entry::default()
        }
    }

    #[test]
    fn chain_verifies_and_continues_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/log.jsonl");
        let p = path.to_str().unwrap();
        {
            let log = AuditLog::open(p).unwrap();
            log.append(Event::Exchange, entry("one")).unwrap();
            log.append(Event::Exchange, entry("two")).unwrap();
        }
        let log = AuditLog::open(p).unwrap();
        assert_eq!(log.append(Event::TaskEnd, entry("three")).unwrap(), 3);
        assert_eq!(
            verify_file(&path).unwrap(),
            Verification::Intact { records: 3 }
        );
    }

    #[test]
    fn finds_the_first_broken_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let log = AuditLog::open(path.to_str().unwrap()).unwrap();
        for r in ["a", "b", "c", "d"] {
            log.append(Event::Exchange, entry(r)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Edit record 2's reason: its own hash no longer matches.
        let edited = text.replacen("\"reason\":\"b\"", "\"reason\":\"B\"", 1);
        let v = verify_reader(edited.as_bytes()).unwrap();
        assert!(matches!(v, Verification::Broken { line: 2, .. }), "{v:?}");
        // Drop record 3: record 4's prev no longer links.
        let lines: Vec<&str> = text.lines().collect();
        let dropped = [lines[0], lines[1], lines[3]].join("\n");
        let v = verify_reader(dropped.as_bytes()).unwrap();
        assert!(matches!(v, Verification::Broken { line: 3, .. }), "{v:?}");
        // Garbage line.
        let garbage = format!("{}\nnot json\n", lines[0]);
        assert!(matches!(
            verify_reader(garbage.as_bytes()).unwrap(),
            Verification::Broken { line: 2, .. }
        ));
    }

    #[test]
    fn corrupt_tail_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "{not json\n").unwrap();
        assert!(matches!(
            AuditLog::open(path.to_str().unwrap()),
            Err(AuditError::CorruptTail { .. })
        ));
    }
}
