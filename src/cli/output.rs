//! How the client commands print what the broker answered: its JSON as is, or a table for a
//! person, with unix times written as RFC 3339 UTC and how far they are from now.

use serde_json::Value;

/// `--output`: a table for a person (the default) or the broker's JSON as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// `(year, month, day)` of the civil (proleptic Gregorian) date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm: eras of 400 years, March-based years inside them.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// A unix time in seconds as RFC 3339 UTC, e.g. `2026-11-27T17:30:00Z`.
pub fn rfc3339(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// How far `secs` is from `now`, coarsely: `in 9m`, `3h ago`, `now`.
pub fn relative(secs: i64, now: i64) -> String {
    let delta = secs.saturating_sub(now);
    let span = delta.unsigned_abs();
    let amount = match span {
        0 => return "now".to_string(),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if delta > 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// `2026-11-27T17:30:00Z (in 9m)`.
pub fn when(secs: i64, now: i64) -> String {
    format!("{} ({})", rfc3339(secs), relative(secs, now))
}

/// The current unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A field as table text: a time field readable, a list joined, a missing one `-`.
fn cell(v: Option<&Value>, is_time: bool, now: i64) -> String {
    match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::Number(n)) if is_time => {
            n.as_i64().map_or_else(|| n.to_string(), |t| when(t, now))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| match x {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// Rows of `items` under `columns` (`(header, field, is_time)`), aligned with spaces.
pub fn table(items: &[Value], columns: &[(&str, &str, bool)], now: i64) -> String {
    let mut rows: Vec<Vec<String>> = vec![columns.iter().map(|c| c.0.to_string()).collect()];
    for item in items {
        rows.push(
            columns
                .iter()
                .map(|&(_, field, is_time)| cell(item.get(field), is_time, now))
                .collect(),
        );
    }
    let mut widths = vec![0usize; columns.len()];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One record as `field: value` lines, times readable.
pub fn record(item: &Value, time_fields: &[&str], now: i64) -> String {
    let mut out = String::new();
    if let Some(map) = item.as_object() {
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in map {
            let is_time = time_fields.contains(&k.as_str());
            out.push_str(&format!("{k:<width$}  {}\n", cell(Some(v), is_time, now)));
        }
    }
    out
}

/// The columns of `writ task list`.
pub const TASK_COLUMNS: &[(&str, &str, bool)] = &[
    ("TASK_ID", "task_id", false),
    ("STATE", "state", false),
    ("OWNER", "owner", false),
    ("CREATED", "created_at", true),
    ("DEADLINE", "deadline", true),
];

/// The times of a task record.
pub const TASK_TIMES: &[&str] = &["created_at", "deadline", "ended_at"];

/// The columns of `writ revocations list`.
pub const REVOCATION_COLUMNS: &[(&str, &str, bool)] = &[
    ("ID", "id", false),
    ("SELECTOR", "selector", false),
    ("REASON", "reason", false),
    ("CREATED", "created_at", true),
    ("LIFTED", "lifted_at", true),
];

/// The columns of `writ quarantines list`.
pub const QUARANTINE_COLUMNS: &[(&str, &str, bool)] = &[
    ("ID", "id", false),
    ("SELECTOR", "selector", false),
    ("REASON", "reason", false),
    ("CREATED", "created_at", true),
    ("UNTIL", "expires_at", true),
];

/// The columns of `writ approvals list`.
pub const APPROVAL_COLUMNS: &[(&str, &str, bool)] = &[
    ("ID", "approval_id", false),
    ("STATE", "state", false),
    ("SUBJECT", "subject", false),
    ("SCOPES", "scopes", false),
    ("PURPOSE", "purpose", false),
    ("CREATED", "created_at", true),
    ("EXPIRES", "expires_at", true),
];

/// The times of an approval.
pub const APPROVAL_TIMES: &[&str] = &["created_at", "expires_at", "decided_at"];

/// The times of a block record.
pub const BLOCK_TIMES: &[&str] = &["created_at", "until", "lifted_at", "expires_at"];

#[cfg(test)]
mod tests {
    #![allow(clippy::restriction, reason = "tests fail loudly")]
    use super::*;

    #[test]
    fn unix_times_are_written_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_392_600), "2026-12-27T17:30:00Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn relative_hints_round_down_to_one_unit() {
        assert_eq!(relative(100, 100), "now");
        assert_eq!(relative(100 + 540, 100), "in 9m");
        assert_eq!(relative(100, 100 + 59), "59s ago");
        assert_eq!(relative(100 + 7200, 100), "in 2h");
        assert_eq!(relative(100, 100 + 3 * 86_400 + 5), "3d ago");
        assert_eq!(
            when(1_798_392_600, 1_798_392_060),
            "2026-12-27T17:30:00Z (in 9m)"
        );
    }

    #[test]
    fn tables_align_and_write_times_readably() {
        let items = vec![
            serde_json::json!({"id": "rev_1", "created_at": 0, "lifted_at": null}),
            serde_json::json!({"id": "rev_22", "created_at": 60}),
        ];
        let cols = &[
            ("ID", "id", false),
            ("CREATED", "created_at", true),
            ("LIFTED", "lifted_at", true),
        ];
        assert_eq!(
            table(&items, cols, 60),
            "ID      CREATED                        LIFTED\n\
             rev_1   1970-01-01T00:00:00Z (1m ago)  -\n\
             rev_22  1970-01-01T00:01:00Z (now)     -\n"
        );
    }
}
