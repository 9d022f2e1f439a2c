//! `writ audit verify`: the chain, the signed checkpoints and, given the broker's head, the
//! tail.
//!
//! What each check catches:
//! - an edited record: its `hash` no longer matches its contents;
//! - a deleted, inserted or reordered record: `seq` does not count up by one, or `prev` does
//!   not link;
//! - an edit with every later hash recomputed (a re-chain): the next checkpoint's signed
//!   (`seq`, `hash`) no longer matches the record before it, and forging it takes the
//!   broker's private key (checked with the JWKS);
//! - a cut tail (records removed from the end, with or without their checkpoints): only the
//!   head kept outside the log, in the store, can tell (`--head-from`).
//!
//! Records after the last checkpoint are protected by the chain only: until the next
//! checkpoint, whoever can write the file can rewrite them undetected.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::checkpoint::{CheckpointError, CheckpointKeys, unverified_claims};
use super::{Event, GENESIS, Record};
use crate::store::AuditHead;

/// What to verify the log against, besides its own chain.
#[derive(Debug, Default, Clone, Copy)]
pub struct VerifyOptions<'a> {
    /// The broker's public keys: checkpoint signatures are checked only with them.
    pub keys: Option<&'a CheckpointKeys>,
    /// The broker's latest head (`GET /admin/v1/audit/head`).
    pub head: Option<&'a AuditHead>,
}

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub last_seq: u64,
    pub checkpoints: u64,
    /// The `seq` the last checkpoint covers.
    pub last_checkpointed: Option<u64>,
    pub signatures_checked: bool,
    /// The head's `seq`, when the log was checked against one.
    pub head_seq: Option<u64>,
}

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The first `seq` that does not verify.
    pub seq: u64,
    /// The line it was found on (1-based; one past the end for a cut tail).
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Intact(Report),
    Broken(Break),
}

impl Verification {
    pub fn first_bad_seq(&self) -> Option<u64> {
        match self {
            Verification::Intact(_) => None,
            Verification::Broken(b) => Some(b.seq),
        }
    }
}

/// Verifies a log file against its own chain only.
pub fn verify_file(path: &Path) -> std::io::Result<Verification> {
    verify_reader(File::open(path)?, VerifyOptions::default())
}

/// Verifies a whole log: every line parses; `seq` starts at 1 and counts up by one; `prev`
/// links to the previous `hash`; every `hash` matches its record; every checkpoint covers
/// the record before it and, with keys, carries a valid signature; with a head, the log
/// reaches the head's `seq` and holds its `hash` there.
pub fn verify_reader(reader: impl Read, opts: VerifyOptions<'_>) -> std::io::Result<Verification> {
    let mut prev = GENESIS.to_string();
    let mut expected: u64 = 1;
    let mut lineno: u64 = 0;
    let mut first_hash: Option<String> = None;
    let mut hash_at_head: Option<String> = None;
    let mut checkpoints = 0u64;
    let mut last_checkpointed: Option<u64> = None;
    // The last seq a checkpoint covered before the head's: where a rewrite can start.
    let mut checkpointed_before_head: Option<u64> = None;
    if let Some(b) = opts.head.and_then(|h| check_head(h, opts.keys)) {
        return Ok(Verification::Broken(b));
    }
    for line in BufReader::new(reader).lines() {
        let line = line?;
        lineno += 1;
        let broken = |seq: u64, reason: String| {
            Ok(Verification::Broken(Break {
                seq,
                line: lineno,
                reason,
            }))
        };
        let rec: Record = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                return broken(
                    expected,
                    format!("seq {expected}: record does not parse: {e}"),
                );
            }
        };
        let stated = match check_link(&rec, expected, &prev) {
            Ok(h) => h,
            Err((seq, why)) => return broken(seq, why),
        };
        if rec.event == Event::Checkpoint {
            let unproven = last_checkpointed.map_or(1, |s| s + 1);
            if let Err(why) = check_checkpoint(&rec, opts.keys, unproven) {
                return broken(rec.seq, why);
            }
            checkpoints += 1;
            last_checkpointed = Some(rec.seq - 1);
            if opts.head.is_some_and(|h| rec.seq - 1 < h.seq) {
                checkpointed_before_head = last_checkpointed;
            }
        }
        if rec.seq == 1 {
            first_hash = Some(stated.clone());
        }
        if opts.head.is_some_and(|h| h.seq == rec.seq) {
            hash_at_head = Some(stated.clone());
        }
        prev = stated;
        expected = rec.seq + 1;
    }
    let last_seq = expected - 1;
    if let Some(head) = opts.head {
        let reached = HeadCheck {
            first_hash: first_hash.as_deref(),
            last_seq,
            hash_at_head: hash_at_head.as_deref(),
            checkpointed_before_head,
            past_end: lineno + 1,
        };
        if let Some(b) = reached.against(head) {
            return Ok(Verification::Broken(b));
        }
    }
    Ok(Verification::Intact(Report {
        records: lineno,
        last_seq,
        checkpoints,
        last_checkpointed,
        signatures_checked: opts.keys.is_some(),
        head_seq: opts.head.map(|h| h.seq),
    }))
}

/// A checkpoint record states (`seq`, `hash`) of the record before it, and its JWS signs
/// exactly that. `unproven` is the first seq since the previous checkpoint.
fn check_checkpoint(
    rec: &Record,
    keys: Option<&CheckpointKeys>,
    unproven: u64,
) -> Result<(), String> {
    let covered = rec.seq.saturating_sub(1);
    let rewritten = || {
        format!(
            "seq {}: the checkpoint does not match the log before it: {} and the chain recomputed",
            rec.seq,
            rewritten(unproven, covered)
        )
    };
    let Some(head) = super::checkpoint::head_of(rec, "") else {
        return Err(format!(
            "seq {}: checkpoint record without its signed `seq`, `hash` and `jws`",
            rec.seq
        ));
    };
    if head.seq != covered || head.hash != rec.prev {
        return Err(rewritten());
    }
    let claims = match keys {
        Some(keys) => keys.verify(&head.checkpoint),
        None => unverified_claims(&head.checkpoint),
    };
    let claims = claims.map_err(|e| match e {
        CheckpointError::UnknownKey(_) | CheckpointError::BadSignature(_) => format!(
            "seq {}: {e}: the checkpoint is forged, and {} cannot be trusted",
            rec.seq,
            span(unproven, covered)
        ),
        other => format!("seq {}: {other}", rec.seq),
    })?;
    if claims.seq != head.seq || claims.hash != head.hash {
        return Err(rewritten());
    }
    Ok(())
}

/// The head itself: its JWS signs its (`seq`, `hash`), with a key of the JWKS when given.
fn check_head(head: &AuditHead, keys: Option<&CheckpointKeys>) -> Option<Break> {
    let claims = match keys {
        Some(keys) => keys.verify(&head.checkpoint),
        None => unverified_claims(&head.checkpoint),
    };
    let why = match claims {
        Ok(c) if c.seq == head.seq && c.hash == head.hash => return None,
        Ok(_) => "the broker's head does not match its own signature".to_string(),
        Err(e) => format!("the broker's head does not verify: {e}"),
    };
    Some(Break {
        seq: head.seq,
        line: 0,
        reason: why,
    })
}

/// `seq A`, or `seq A to B` for a range.
pub fn span(from: u64, to: u64) -> String {
    if from >= to {
        format!("seq {to}")
    } else {
        format!("seq {from} to {to}")
    }
}

/// Which records were rewritten: one, or one in a range.
fn rewritten(from: u64, to: u64) -> String {
    if from >= to {
        format!("seq {to} was rewritten")
    } else {
        format!("a record in seq {from} to {to} was rewritten")
    }
}

/// What a read of the whole log found, to hold against the broker's signed head.
struct HeadCheck<'a> {
    first_hash: Option<&'a str>,
    last_seq: u64,
    hash_at_head: Option<&'a str>,
    /// The last seq a checkpoint covered before the head's: where a rewrite can start.
    checkpointed_before_head: Option<u64>,
    past_end: u64,
}

impl HeadCheck<'_> {
    /// The first way the log fails to reach `head`, if any.
    fn against(&self, head: &AuditHead) -> Option<Break> {
        let last_seq = self.last_seq;
        if self.first_hash.is_some_and(|id| id != head.log_id) {
            return Some(Break {
                seq: 1,
                line: 1,
                reason: "the head is for another log (its log id is not this log's first record)"
                    .into(),
            });
        }
        if self.last_seq < head.seq {
            return Some(Break {
                seq: self.last_seq + 1,
                line: self.past_end,
                reason: format!(
                    "the log ends at seq {last_seq} but the broker's signed head is at seq {}: {} {} cut from the tail",
                    head.seq,
                    span(self.last_seq + 1, head.seq),
                    if self.last_seq + 1 >= head.seq {
                        "was"
                    } else {
                        "were"
                    }
                ),
            });
        }
        if self.hash_at_head != Some(head.hash.as_str()) {
            let from = self.checkpointed_before_head.map_or(1, |s| s + 1);
            return Some(Break {
                seq: head.seq,
                line: head.seq,
                reason: format!(
                    "seq {}: hash is not the one the broker's signed head holds: {} and the chain recomputed",
                    head.seq,
                    rewritten(from, head.seq)
                ),
            });
        }
        None
    }
}

/// `seq` follows on, `prev` links to the record before, and `hash` matches the contents;
/// returns the record's hash, or the seq to name and why it is broken.
fn check_link(rec: &Record, expected: u64, prev: &str) -> Result<String, (u64, String)> {
    if rec.seq != expected {
        let why = if rec.seq > expected {
            format!(
                "seq {expected} is missing: found seq {} (a record was deleted or moved)",
                rec.seq
            )
        } else {
            format!(
                "found seq {} where seq {expected} was expected (a record was moved or repeated)",
                rec.seq
            )
        };
        return Err((expected, why));
    }
    if rec.prev != prev {
        return Err((
            rec.seq,
            format!(
                "seq {}: `prev` is not the hash of the record before it (a record before it was removed, inserted or changed)",
                rec.seq
            ),
        ));
    }
    let Some(stated) = rec.hash.clone() else {
        return Err((rec.seq, format!("seq {}: record has no hash", rec.seq)));
    };
    match rec.compute_hash() {
        Ok(h) if h == stated => Ok(stated),
        Ok(_) => Err((
            rec.seq,
            format!(
                "seq {}: hash does not match the record's contents (it was edited)",
                rec.seq
            ),
        )),
        Err(e) => Err((rec.seq, e.to_string())),
    }
}
