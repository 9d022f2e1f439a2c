//! The decision log: one JSON object per line, each record chained to the one before by
//! SHA-256, so that a removed, reordered or edited record is found by `writ audit verify`.
//!
//! `hash` = hex SHA-256 of the record serialised without its `hash` field (compact JSON,
//! fields in the order of [`Record`]), and `hash` is written last, so a line is exactly the
//! hashed bytes with `,"hash":"…"` before the closing brace. `prev` = the previous record's
//! `hash` (64 zeros for the first).
//!
//! A chain alone can be cut or recomputed by whoever can write the file, so (SPEC §6):
//! - every `checkpoint_every` records or `checkpoint_interval` the log appends a `checkpoint`
//!   record carrying a JWS, signed with the broker's token signing key, over the `seq` and
//!   `hash` of the record before it ([`checkpoint`]); the latest one is the log's head, kept
//!   in the store and served at `GET /admin/v1/audit/head` ([`maintain`]);
//! - [`AuditLog::commit`] makes a record durable (fdatasync) before the caller acts on it,
//!   with one fsync shared by every caller waiting at the time (group commit);
//! - `seq` and `ts` never go backwards: both are taken under the append lock;
//! - refusals of unauthenticated callers go through [`AuditLog::append_unauthenticated`],
//!   which summarises a flood from one source ([`flood`]).

pub mod checkpoint;
mod durable;
pub mod flood;
pub mod lock;
pub mod maintain;
pub mod verify;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::AuditConfig;
use crate::domain::{Clock, SystemClock, sha256_hex};
use crate::store::AuditHead;
use crate::token::keys::KeySet;

pub use durable::{Coming, Pending, worker_parked, worker_unparked};
pub use verify::{Break, Report, Verification, VerifyOptions, verify_file, verify_reader};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest first line read to name a log (its first record).
const MAX_FIRST_LINE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Exchange,
    IntrospectDenied,
    Revoke,
    TaskEnd,
    Trip,
    PolicyLoad,
    Admin,
    /// An approval gate: requested, approved, denied, expired or cancelled (SPEC §4.7).
    Approval,
    Checkpoint,
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
    /// The hash this record should carry: SHA-256 of its compact JSON without `hash`.
    pub fn compute_hash(&self) -> Result<String, AuditError> {
        let mut unhashed = self.clone();
        unhashed.hash = None;
        let bytes = serde_json::to_vec(&unhashed).map_err(AuditError::Encode)?;
        Ok(sha256_hex(&bytes))
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("decision log {what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a decision log record does not serialise")]
    Encode(#[source] serde_json::Error),
    #[error("decision log `{path}` ends in a record that does not parse; run `writ audit verify`")]
    CorruptTail { path: String },
    #[error(
        "decision log `{path}` starts with a record that does not parse; run `writ audit verify`"
    )]
    CorruptHead { path: String },
    #[error(
        "decision log could not be made durable ({0}); nothing more is issued until the broker is restarted"
    )]
    NotDurable(String),
    #[error(
        "decision log `{path}` is locked: another broker is running and writes it (one process \
         appends to a log; stop that broker, or give this one its own audit.path)"
    )]
    Locked { path: String },
    #[error("cannot sign a decision log checkpoint: {0}")]
    Sign(String),
    #[error("cannot keep the decision log head in the store: {0}")]
    Store(String),
}

impl AuditError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AuditError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Checkpoint and flood settings (`[audit]`).
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    pub unauthenticated_per_minute: u32,
    pub unauthenticated_max_sources: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self::from_config(&AuditConfig::default())
    }
}

impl AuditOptions {
    pub fn from_config(c: &AuditConfig) -> Self {
        AuditOptions {
            checkpoint_every: c.checkpoint_every.max(1),
            checkpoint_interval: c.checkpoint_interval,
            unauthenticated_per_minute: c.unauthenticated_per_minute,
            unauthenticated_max_sources: usize::try_from(c.unauthenticated_max_sources)
                .unwrap_or(usize::MAX)
                .max(1),
        }
    }
}

/// Counters of the log's life, read by `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Appends that failed (the record is not in the log).
    pub append_failures: u64,
    /// fdatasync calls made.
    pub fsyncs: u64,
    /// The highest `seq` written to the operating system.
    pub written_seq: u64,
    /// The highest `seq` known to be on disk.
    pub synced_seq: u64,
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    /// Refusals of unauthenticated callers counted into summaries instead of written.
    pub summarised: u64,
}

#[derive(Debug, Default)]
struct Counters {
    append_failures: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_failures: AtomicU64,
    summarised: AtomicU64,
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
    /// `ts` of the last record, in milliseconds since the epoch: the next is never earlier.
    last_ts_ms: u64,
    /// `seq` of the latest checkpoint record (0: none since the log was opened).
    checkpoint_seq: u64,
    /// When (clock seconds) the latest checkpoint was written; `None`: not since opening.
    checkpoint_at: Option<i64>,
}

/// Where a log continues from when it is opened.
struct Tail {
    seq: u64,
    prev: String,
    last_ts_ms: u64,
    log_id: Option<String>,
    /// The latest checkpoint, when the log ends with one.
    checkpoint: Option<(u64, AuditHead)>,
}

impl Tail {
    fn empty() -> Self {
        Tail {
            seq: 0,
            prev: GENESIS.to_string(),
            last_ts_ms: 0,
            log_id: None,
            checkpoint: None,
        }
    }
}

/// The append-only, hash-chained decision log.
pub struct AuditLog {
    inner: Mutex<Chain>,
    durability: durable::Durability,
    options: AuditOptions,
    /// Signs checkpoints; without it (offline tools) none are written.
    keys: Option<KeySet>,
    clock: Arc<dyn Clock>,
    /// The hash of the log's first record.
    log_id: OnceLock<String>,
    /// The latest checkpoint written, and the highest one kept in the store.
    head: Mutex<Option<AuditHead>>,
    published_seq: AtomicU64,
    /// Woken when a checkpoint is written, so that its head reaches the store promptly.
    pub(crate) head_written: tokio::sync::Notify,
    flood: Mutex<flood::Limiter>,
    counters: Counters,
    /// The exclusive lock on the log's file, held while it is open.
    _writer: Option<lock::WriterLock>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens `path` for appending (creating it and its directory), continuing the chain from
    /// its last record; `-` writes to standard output. Default options, no checkpoints (no
    /// signing key), the system clock.
    pub fn open(path: &str) -> Result<Self, AuditError> {
        Self::open_with(path, AuditOptions::default(), None, Arc::new(SystemClock))
    }

    /// A log as the broker runs it: checkpoints signed with `keys`, flood windows and the
    /// checkpoint interval on `clock`.
    pub fn from_config(
        config: &AuditConfig,
        keys: KeySet,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuditError> {
        Self::open_with(
            &config.path,
            AuditOptions::from_config(config),
            Some(keys),
            clock,
        )
    }

    pub fn open_with(
        path: &str,
        options: AuditOptions,
        keys: Option<KeySet>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuditError> {
        if path == "-" {
            return Ok(Self::with_sink(
                Sink::Stdout,
                durable::Durability::without_file(0),
                Tail::empty(),
                options,
                keys,
                clock,
            ));
        }
        let p = Path::new(path);
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| AuditError::io("directory creation", e))?;
        }
        let mut opts = OpenOptions::new();
        opts.read(true).append(true).create(true);
        // A new log is readable by its owner only (it names every subject and decision); an
        // existing one keeps the mode it has.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut file = opts
            .open(p)
            .map_err(|e| AuditError::io(format!("open of `{path}`"), e))?;
        let writer = lock::acquire(p)?;
        let tail = read_tail(&mut file, path)?;
        let sync_handle = file.try_clone().map_err(|e| AuditError::io("write", e))?;
        let durability = durable::Durability::with_file(sync_handle, tail.seq)?;
        let mut log = Self::with_sink(Sink::File(file), durability, tail, options, keys, clock);
        log._writer = Some(writer);
        Ok(log)
    }

    /// A log that keeps the chain but writes nowhere (benchmarks of the crypto floor only).
    pub fn discard() -> Self {
        Self::with_sink(
            Sink::Discard,
            durable::Durability::without_file(0),
            Tail::empty(),
            AuditOptions::default(),
            None,
            Arc::new(SystemClock),
        )
    }

    fn with_sink(
        sink: Sink,
        durability: durable::Durability,
        tail: Tail,
        options: AuditOptions,
        keys: Option<KeySet>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let log_id = OnceLock::new();
        if let Some(id) = tail.log_id {
            let _ = log_id.set(id);
        }
        let (checkpoint_seq, head) = match tail.checkpoint {
            Some((seq, head)) => (seq, Some(head)),
            None => (0, None),
        };
        let flood = flood::Limiter::new(
            options.unauthenticated_per_minute,
            options.unauthenticated_max_sources,
        );
        AuditLog {
            inner: Mutex::new(Chain {
                sink,
                seq: tail.seq,
                prev: tail.prev,
                buf: Vec::with_capacity(1024),
                last_ts_ms: tail.last_ts_ms,
                checkpoint_seq,
                checkpoint_at: None,
            }),
            durability,
            options,
            keys,
            clock,
            log_id,
            head: Mutex::new(head),
            published_seq: AtomicU64::new(0),
            head_written: tokio::sync::Notify::new(),
            flood: Mutex::new(flood),
            counters: Counters::default(),
            _writer: None,
        }
    }

    /// Appends one record and returns its `seq`. Returns once the line is handed to the
    /// operating system; a failed write leaves the chain where it was, and the caller must
    /// not act on the decision. To act on it only once it is on disk, [`AuditLog::commit`]
    /// the returned `seq`.
    pub fn append(&self, event: Event, entry: Entry) -> Result<u64, AuditError> {
        let mut chain = self.inner.lock();
        let seq = match self.write_record(&mut chain, event, entry) {
            Ok(seq) => seq,
            Err(e) => {
                self.counters
                    .append_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if self.keys.is_some()
            && chain.seq.saturating_sub(chain.checkpoint_seq) >= self.options.checkpoint_every
        {
            self.checkpoint_locked(&mut chain);
        }
        Ok(seq)
    }

    /// Appends the refusal of a caller that could not be authenticated. Up to
    /// `unauthenticated_per_minute` of them per source (`entry.source_ip`) and minute are
    /// written in full; past that they are counted, and one summary record per source and
    /// minute carries the count and the first and last time. Returns the `seq` when the
    /// record was written in full, `None` when it was counted into a summary.
    pub fn append_unauthenticated(
        &self,
        event: Event,
        entry: Entry,
    ) -> Result<Option<u64>, AuditError> {
        let now = self.clock.now();
        let (admit, summaries) = self
            .flood
            .lock()
            .admit(entry.source_ip.as_deref(), event, now);
        self.write_summaries(summaries);
        match admit {
            flood::Admit::Write => self.append(event, entry).map(Some),
            flood::Admit::Summarised => {
                self.counters.summarised.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Writes the summaries of flood windows that have ended (all of them when `all`, at
    /// shutdown).
    pub fn flush_summaries(&self, all: bool) {
        let summaries = self.flood.lock().flush(self.clock.now(), all);
        self.write_summaries(summaries);
    }

    fn write_summaries(&self, summaries: Vec<flood::Summary>) {
        for s in summaries {
            let (event, entry) = s.record();
            if let Err(e) = self.append(event, entry) {
                // The count is not lost to the operator: it goes to the process log.
                tracing::error!(error = %e, source = s.source.as_deref().unwrap_or("other sources"), count = s.count, "cannot record a summary of unauthenticated failures");
            }
        }
    }

    /// Writes one record under the lock. `ts` is taken here, so that it never runs
    /// backwards against `seq`, and clamped to the previous record's.
    fn write_record(
        &self,
        chain: &mut Chain,
        event: Event,
        entry: Entry,
    ) -> Result<u64, AuditError> {
        let ts_ms = next_ts_ms(chain.last_ts_ms, SystemTime::now());
        let rec = Record {
            seq: chain.seq + 1,
            ts: format_ts(ts_ms),
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
        // One serialisation: hash the record without `hash`, then append the field.
        chain.buf.clear();
        serde_json::to_writer(&mut chain.buf, &rec).map_err(AuditError::Encode)?;
        let hash = sha256_hex(&chain.buf);
        chain.buf.pop();
        chain.buf.extend_from_slice(b",\"hash\":\"");
        chain.buf.extend_from_slice(hash.as_bytes());
        chain.buf.extend_from_slice(b"\"}\n");
        match &mut chain.sink {
            Sink::File(f) => f
                .write_all(&chain.buf)
                .map_err(|e| AuditError::io("write", e))?,
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&chain.buf)
                    .and_then(|_| out.flush())
                    .map_err(|e| AuditError::io("write", e))?;
            }
            Sink::Discard => {}
        }
        if rec.seq == 1 {
            let _ = self.log_id.set(hash.clone());
        }
        chain.seq = rec.seq;
        chain.prev = hash;
        chain.last_ts_ms = ts_ms;
        self.durability.mark_written(rec.seq);
        Ok(rec.seq)
    }

    /// Writes a checkpoint over the last record, unless there is no record since the last
    /// checkpoint or no signing key. A failure is logged and counted; the chain goes on.
    fn checkpoint_locked(&self, chain: &mut Chain) -> Option<AuditHead> {
        let keys = self.keys.as_ref()?;
        if chain.seq == 0 || chain.seq == chain.checkpoint_seq {
            return None;
        }
        let covered = chain.seq;
        let hash = chain.prev.clone();
        let result = checkpoint::sign(keys, covered, &hash).and_then(|jws| {
            let entry = Entry {
                reason: format!("checkpoint: seq {covered} signed"),
                detail: Some(json!({"seq": covered, "hash": hash, "jws": jws})),
                ..Entry::default()
            };
            self.write_record(chain, Event::Checkpoint, entry)
                .map(|seq| (seq, jws))
        });
        match result {
            Ok((seq, jws)) => {
                chain.checkpoint_seq = seq;
                chain.checkpoint_at = Some(self.clock.now());
                let head = AuditHead {
                    log_id: self.log_id.get().cloned().unwrap_or_default(),
                    seq: covered,
                    hash,
                    checkpoint: jws,
                };
                *self.head.lock() = Some(head.clone());
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                self.head_written.notify_one();
                Some(head)
            }
            Err(e) => {
                self.counters
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "decision log checkpoint failed");
                None
            }
        }
    }

    /// Writes a checkpoint now if any record came after the last one; returns its head.
    pub fn checkpoint_now(&self) -> Option<AuditHead> {
        let mut chain = self.inner.lock();
        self.checkpoint_locked(&mut chain)
    }

    /// The periodic work: summaries of flood windows that have ended, and a checkpoint once
    /// `checkpoint_interval` has passed since the last one (or none was written since the
    /// log was opened) and records came after it.
    pub fn tick(&self) {
        self.flush_summaries(false);
        let now = self.clock.now();
        let interval =
            i64::try_from(self.options.checkpoint_interval.as_secs()).unwrap_or(i64::MAX);
        let mut chain = self.inner.lock();
        if chain
            .checkpoint_at
            .is_none_or(|at| now.saturating_sub(at) >= interval)
        {
            self.checkpoint_locked(&mut chain);
        }
    }

    /// Waits until every record up to `seq` is on disk. Callers waiting at the same time
    /// share one fdatasync (group commit, off the async threads). After a failed sync every
    /// commit fails: the broker issues nothing more until it is restarted. Stdout and
    /// discard logs have nothing to sync.
    pub async fn commit(&self, seq: u64) -> Result<(), AuditError> {
        self.durability.commit(seq).await
    }

    /// Announces a request that will write a record and wait for it to be durable, so that
    /// the sync under way covers it too (group commit).
    pub fn coming(&self) -> durable::Coming<'_> {
        self.durability.coming()
    }

    /// Starts the commit of `seq` now; the record is durable once the returned
    /// [`Pending::wait`] has returned `Ok`. Lets the caller work while the sync runs.
    pub fn start_commit(&self, seq: u64) -> Pending {
        self.durability.start_commit(seq)
    }

    /// Flushes everything appended so far to stable storage (shutdown).
    pub fn sync(&self) -> Result<(), AuditError> {
        self.durability.sync_now()
    }

    /// The highest `seq` handed to the operating system.
    pub fn written_seq(&self) -> u64 {
        self.durability.written()
    }

    /// The highest `seq` known to be on disk (every `seq` for stdout and discard logs).
    pub fn synced_seq(&self) -> u64 {
        self.durability.synced()
    }

    /// True once a sync failed: the broker must not issue until it is restarted.
    pub fn is_failed(&self) -> bool {
        self.durability.is_failed()
    }

    /// Makes the next sync fail, as a full or failing disk would (tests).
    #[doc(hidden)]
    pub fn fail_next_sync(&self) {
        self.durability.fail_next();
    }

    /// The hash of the log's first record: names this log among the replicas' logs.
    pub fn log_id(&self) -> Option<String> {
        self.log_id.get().cloned()
    }

    /// The latest checkpoint written (not necessarily in the store yet).
    pub fn latest_head(&self) -> Option<AuditHead> {
        self.head.lock().clone()
    }

    /// The latest checkpoint, when it is newer than what was put in the store.
    pub fn unpublished_head(&self) -> Option<AuditHead> {
        let head = self.head.lock().clone()?;
        let published = self.published_seq.load(Ordering::Acquire);
        (published == 0 || head.seq > published).then_some(head)
    }

    pub(crate) fn mark_published(&self, seq: u64) {
        self.published_seq.fetch_max(seq, Ordering::AcqRel);
    }

    pub fn stats(&self) -> AuditStats {
        let c = &self.counters;
        AuditStats {
            append_failures: c.append_failures.load(Ordering::Relaxed),
            fsyncs: self.durability.fsyncs(),
            written_seq: self.written_seq(),
            synced_seq: self.synced_seq(),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            checkpoint_failures: c.checkpoint_failures.load(Ordering::Relaxed),
            summarised: c.summarised.load(Ordering::Relaxed),
        }
    }
}

/// The next record's `ts`: now, but never before the previous record's (a wall clock that
/// steps back must not make the log run backwards).
fn next_ts_ms(last_ms: u64, now: SystemTime) -> u64 {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0);
    now_ms.max(last_ms)
}

fn format_ts(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn parse_ts_ms(ts: &str) -> u64 {
    humantime::parse_rfc3339(ts)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

/// Reads where an existing log continues from: its last record (seq, hash, ts, and the
/// checkpoint when it is one) and its first record's hash (the log's id).
fn read_tail(file: &mut File, path: &str) -> Result<Tail, AuditError> {
    let io = |e: std::io::Error| AuditError::io("read", e);
    let Some(line) = last_line(file).map_err(io)? else {
        return Ok(Tail::empty());
    };
    let corrupt = || AuditError::CorruptTail {
        path: path.to_string(),
    };
    let rec: Record = serde_json::from_str(&line).map_err(|_| corrupt())?;
    let hash = rec.hash.clone().ok_or_else(corrupt)?;
    let first = first_line(file).map_err(io)?;
    let first: Record = first
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| AuditError::CorruptHead {
            path: path.to_string(),
        })?;
    let log_id = first.hash.ok_or_else(|| AuditError::CorruptHead {
        path: path.to_string(),
    })?;
    let checkpoint = (rec.event == Event::Checkpoint)
        .then(|| checkpoint::head_of(&rec, &log_id))
        .flatten();
    Ok(Tail {
        seq: rec.seq,
        prev: hash,
        last_ts_ms: parse_ts_ms(&rec.ts),
        log_id: Some(log_id),
        checkpoint: checkpoint.map(|h| (rec.seq, h)),
    })
}

fn first_line(file: &mut File) -> std::io::Result<Option<String>> {
    file.seek(SeekFrom::Start(0))?;
    let mut line = String::new();
    BufReader::new(Read::by_ref(file).take(MAX_FIRST_LINE)).read_line(&mut line)?;
    file.seek(SeekFrom::End(0))?;
    let line = line.trim_end_matches('\n');
    Ok((!line.is_empty()).then(|| line.to_string()))
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
            let last = trimmed.get(pos + 1..).unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(last).into_owned()));
        }
        if start == 0 {
            return Ok(Some(String::from_utf8_lossy(trimmed).into_owned()));
        }
        window = window.saturating_mul(4);
    }
}

#[cfg(test)]
mod tests;
