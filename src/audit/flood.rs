//! Keeps a flood of unauthenticated failures from filling the disk (SPEC §6).
//!
//! Per source (the caller's IP) and clock minute, the first `per_minute` refusals are
//! written in full; the rest are counted, and when the minute is over one summary record per
//! source and event carries the count and the first and last time: nothing is lost, the
//! detail is. At most `max_sources` sources are tracked per minute; failures of further
//! sources are counted into one "other sources" summary, so memory is bounded and so is the
//! log: at most `per_minute × max_sources` full records a minute, plus the summaries.

use std::collections::HashMap;

use serde_json::json;

use super::{Entry, Event};

/// The source of a refusal without an IP.
const UNKNOWN_SOURCE: &str = "unknown";

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it in full.
    Write,
    /// Counted into its source's summary.
    Summarised,
}

/// Refusals of one source in one minute that were counted, not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub event: Event,
    /// `None`: the "other sources" bucket.
    pub source: Option<String>,
    pub count: u64,
    /// Clock seconds of the first and last refusal counted.
    pub first: i64,
    pub last: i64,
    /// Full records allowed per source and minute.
    pub per_minute: u32,
}

impl Summary {
    /// The summary record.
    pub fn record(&self) -> (Event, Entry) {
        let who = self.source.as_deref().unwrap_or("other sources");
        let first = format_secs(self.first);
        let last = format_secs(self.last);
        let entry = Entry {
            decision: Some("deny"),
            reason: format!(
                "{} more unauthenticated failures from {who} between {first} and {last} (over {} a minute per source): summarised",
                self.count, self.per_minute
            ),
            source_ip: self.source.clone(),
            detail: Some(json!({"summary": {
                "count": self.count,
                "first": first,
                "last": last,
                "source": who,
            }})),
            ..Entry::default()
        };
        (self.event, entry)
    }
}

fn format_secs(secs: i64) -> String {
    let t = u64::try_from(secs).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

#[derive(Debug, Clone, Copy)]
struct Counted {
    count: u64,
    first: i64,
    last: i64,
}

/// One source's current minute.
#[derive(Debug)]
struct Window {
    minute: i64,
    written: u32,
    /// By event; a handful at most.
    counted: Vec<(Event, Counted)>,
}

impl Window {
    fn new(minute: i64) -> Self {
        Window {
            minute,
            written: 0,
            counted: Vec::new(),
        }
    }

    fn count(&mut self, event: Event, now: i64) {
        match self.counted.iter_mut().find(|(e, _)| *e == event) {
            Some((_, c)) => {
                c.count += 1;
                c.first = c.first.min(now);
                c.last = c.last.max(now);
            }
            None => self.counted.push((
                event,
                Counted {
                    count: 1,
                    first: now,
                    last: now,
                },
            )),
        }
    }

    /// Moves what was counted into summaries.
    fn drain(&mut self, source: Option<&str>, per_minute: u32, out: &mut Vec<Summary>) {
        for (event, c) in self.counted.drain(..) {
            out.push(Summary {
                event,
                source: source.map(str::to_string),
                count: c.count,
                first: c.first,
                last: c.last,
                per_minute,
            });
        }
    }

    /// Starts `minute` if this window belongs to another one, summarising the old one.
    fn roll(&mut self, minute: i64, source: Option<&str>, per_minute: u32, out: &mut Vec<Summary>) {
        if self.minute != minute {
            self.drain(source, per_minute, out);
            *self = Window::new(minute);
        }
    }
}

/// The per-source limiter.
#[derive(Debug)]
pub struct Limiter {
    per_minute: u32,
    max_sources: usize,
    sources: HashMap<String, Window>,
    other: Window,
}

impl Limiter {
    pub fn new(per_minute: u32, max_sources: usize) -> Self {
        Limiter {
            per_minute,
            max_sources: max_sources.max(1),
            sources: HashMap::new(),
            other: Window::new(i64::MIN),
        }
    }

    /// Number of sources tracked (bounded by `max_sources`).
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// Decides on one refusal from `source` at `now` (clock seconds). Also returns the
    /// summaries of windows that ended, to be written before it.
    pub fn admit(&mut self, source: Option<&str>, event: Event, now: i64) -> (Admit, Vec<Summary>) {
        let minute = now.div_euclid(60);
        let key = source.unwrap_or(UNKNOWN_SOURCE);
        let mut out = Vec::new();
        if !self.sources.contains_key(key) && self.sources.len() >= self.max_sources {
            // Make room: windows that have ended are summarised and forgotten.
            self.flush_into(minute, false, &mut out);
        }
        let per_minute = self.per_minute;
        let admit = if let Some(w) = self.sources.get_mut(key) {
            w.roll(minute, Some(key), per_minute, &mut out);
            Self::decide(w, per_minute, event, now)
        } else if self.sources.len() < self.max_sources {
            let w = self
                .sources
                .entry(key.to_string())
                .or_insert_with(|| Window::new(minute));
            Self::decide(w, per_minute, event, now)
        } else {
            // Past the cap: only counted, into the "other sources" summary.
            self.other.roll(minute, None, per_minute, &mut out);
            self.other.count(event, now);
            Admit::Summarised
        };
        out.sort_by(|a, b| (a.first, &a.source).cmp(&(b.first, &b.source)));
        (admit, out)
    }

    fn decide(w: &mut Window, per_minute: u32, event: Event, now: i64) -> Admit {
        if w.written < per_minute {
            w.written += 1;
            Admit::Write
        } else {
            w.count(event, now);
            Admit::Summarised
        }
    }

    /// Summaries of the windows that ended before `now`'s minute (all windows when `all`),
    /// which are then forgotten.
    pub fn flush(&mut self, now: i64, all: bool) -> Vec<Summary> {
        let mut out = Vec::new();
        self.flush_into(now.div_euclid(60), all, &mut out);
        out.sort_by(|a, b| (a.first, &a.source).cmp(&(b.first, &b.source)));
        out
    }

    fn flush_into(&mut self, minute: i64, all: bool, out: &mut Vec<Summary>) {
        let per_minute = self.per_minute;
        self.sources.retain(|source, w| {
            if all || w.minute < minute {
                w.drain(Some(source), per_minute, out);
                false
            } else {
                true
            }
        });
        if all || self.other.minute < minute {
            self.other.drain(None, per_minute, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000 / 60 * 60;

    #[test]
    fn past_the_rate_failures_are_counted_and_summarised_when_the_minute_ends() {
        let mut l = Limiter::new(3, 10);
        let mut written = 0;
        for i in 0..100 {
            let (a, s) = l.admit(Some("10.0.0.1"), Event::Exchange, T0 + i % 50);
            assert!(s.is_empty());
            if a == Admit::Write {
                written += 1;
            }
        }
        assert_eq!(written, 3);
        // Another source has its own allowance.
        assert_eq!(l.admit(Some("10.0.0.2"), Event::Admin, T0).0, Admit::Write);
        assert!(l.flush(T0 + 59, false).is_empty(), "the minute is not over");
        let s = l.flush(T0 + 60, false);
        assert_eq!(
            s,
            vec![Summary {
                event: Event::Exchange,
                source: Some("10.0.0.1".into()),
                count: 97,
                first: T0,
                last: T0 + 49,
                per_minute: 3,
            }]
        );
        assert_eq!(l.tracked(), 0, "ended windows are forgotten");
    }

    #[test]
    fn a_new_minute_summarises_the_old_one_before_writing() {
        let mut l = Limiter::new(1, 10);
        assert_eq!(l.admit(None, Event::Admin, T0).0, Admit::Write);
        assert_eq!(l.admit(None, Event::Admin, T0 + 1).0, Admit::Summarised);
        assert_eq!(
            l.admit(None, Event::IntrospectDenied, T0 + 2).0,
            Admit::Summarised
        );
        let (a, s) = l.admit(None, Event::Admin, T0 + 61);
        assert_eq!(a, Admit::Write);
        assert_eq!(s.len(), 2);
        assert!(
            s.iter()
                .all(|s| s.count == 1 && s.source.as_deref() == Some("unknown"))
        );
    }

    #[test]
    fn tracked_sources_are_capped_and_the_rest_fold_into_other_sources() {
        let mut l = Limiter::new(2, 100);
        for i in 0..1000 {
            l.admit(
                Some(&format!("10.1.{}.{}", i / 256, i % 256)),
                Event::Exchange,
                T0,
            );
        }
        assert_eq!(l.tracked(), 100);
        let s = l.flush(T0 + 60, false);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].source, None);
        assert_eq!(s[0].count, 900);
        assert_eq!(l.tracked(), 0);
        // Zero per minute: everything is summarised.
        let mut l = Limiter::new(0, 10);
        assert_eq!(l.admit(Some("a"), Event::Admin, T0).0, Admit::Summarised);
        assert_eq!(l.flush(T0, true)[0].count, 1);
    }

    #[test]
    fn a_full_table_makes_room_from_ended_windows() {
        let mut l = Limiter::new(1, 2);
        l.admit(Some("a"), Event::Admin, T0);
        l.admit(Some("a"), Event::Admin, T0);
        l.admit(Some("b"), Event::Admin, T0);
        // A minute later a third source is tracked: the ended windows go, with a summary.
        let (a, s) = l.admit(Some("c"), Event::Admin, T0 + 60);
        assert_eq!(a, Admit::Write);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].source.as_deref(), Some("a"));
        assert_eq!(l.tracked(), 1);
    }
}
