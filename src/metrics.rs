//! Prometheus metrics: labelled counters, gauges and latency histograms, rendered in the
//! text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

type Key = (&'static str, Vec<(&'static str, String)>);

/// Buckets for human waits (an approval's time to decision), seconds.
pub const WAIT_BUCKETS: [f64; 10] = [
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 86400.0,
];

struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    counters: RwLock<BTreeMap<Key, AtomicU64>>,
    histograms: RwLock<BTreeMap<Key, Histogram>>,
    help: RwLock<BTreeMap<&'static str, &'static str>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn labels(l: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    l.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

fn render_labels(l: &[(&'static str, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl Metrics {
    pub fn describe(&self, name: &'static str, help: &'static str) {
        self.help.write().insert(name, help);
    }

    pub fn inc(&self, name: &'static str, l: &[(&'static str, &str)]) {
        self.add(name, l, 1);
    }

    pub fn add(&self, name: &'static str, l: &[(&'static str, &str)], n: u64) {
        let key = (name, labels(l));
        if let Some(c) = self.counters.read().get(&key) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.counters
            .write()
            .entry(key)
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge (a counter that is set, not added).
    pub fn set(&self, name: &'static str, l: &[(&'static str, &str)], v: u64) {
        let key = (name, labels(l));
        if let Some(c) = self.counters.read().get(&key) {
            c.store(v, Ordering::Relaxed);
            return;
        }
        self.counters
            .write()
            .entry(key)
            .or_insert_with(|| AtomicU64::new(0))
            .store(v, Ordering::Relaxed);
    }

    /// Sets a gauge and drops the other label sets of the same name (an info metric whose
    /// label changes, like the policy version in force).
    pub fn set_only(&self, name: &'static str, l: &[(&'static str, &str)], v: u64) {
        let key = (name, labels(l));
        let mut w = self.counters.write();
        w.retain(|(n, ls), _| *n != name || *ls == key.1);
        w.entry(key)
            .or_insert_with(|| AtomicU64::new(0))
            .store(v, Ordering::Relaxed);
    }

    pub fn get(&self, name: &'static str, l: &[(&'static str, &str)]) -> u64 {
        self.counters
            .read()
            .get(&(name, labels(l)))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn observe(&self, name: &'static str, l: &[(&'static str, &str)], seconds: f64) {
        self.observe_in(name, l, seconds, &BUCKETS);
    }

    /// Observes into a histogram with buckets of its own (fixed when it is first observed).
    pub fn observe_in(
        &self,
        name: &'static str,
        l: &[(&'static str, &str)],
        seconds: f64,
        bounds: &'static [f64],
    ) {
        let key = (name, labels(l));
        let record = |h: &Histogram| {
            for (bucket, b) in h.buckets.iter().zip(h.bounds.iter()) {
                if seconds <= *b {
                    bucket.fetch_add(1, Ordering::Relaxed);
                }
            }
            h.count.fetch_add(1, Ordering::Relaxed);
            let micros = std::time::Duration::try_from_secs_f64(seconds)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            h.sum_micros.fetch_add(micros, Ordering::Relaxed);
        };
        if let Some(h) = self.histograms.read().get(&key) {
            record(h);
            return;
        }
        let mut w = self.histograms.write();
        record(w.entry(key).or_insert_with(|| Histogram::new(bounds)));
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let help = self.help.read();
        let mut last = "";
        for ((name, l), v) in self.counters.read().iter() {
            if *name != last {
                if let Some(h) = help.get(name) {
                    let _ = writeln!(out, "# HELP {name} {h}");
                }
                let kind = if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                };
                let _ = writeln!(out, "# TYPE {name} {kind}");
                last = name;
            }
            let _ = writeln!(
                out,
                "{name}{} {}",
                render_labels(l, None),
                v.load(Ordering::Relaxed)
            );
        }
        last = "";
        for ((name, l), h) in self.histograms.read().iter() {
            if *name != last {
                if let Some(hp) = help.get(name) {
                    let _ = writeln!(out, "# HELP {name} {hp}");
                }
                let _ = writeln!(out, "# TYPE {name} histogram");
                last = name;
            }
            for (bucket, b) in h.buckets.iter().zip(h.bounds.iter()) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    render_labels(l, Some(("le", b.to_string()))),
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{} {count}",
                render_labels(l, Some(("le", "+Inf".into())))
            );
            let _ = writeln!(
                out,
                "{name}_sum{} {}",
                render_labels(l, None),
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{} {count}", render_labels(l, None));
        }
        out
    }
}

impl Metrics {
    /// The broker's metrics, each with its help text.
    pub fn described() -> Metrics {
        let m = Metrics::default();
        m.describe("writ_trips_total", "Trips fired, by rule.");
        m.describe(
            "writ_exchanges_total",
            "Token exchanges, by outcome (issued or the OAuth error code).",
        );
        m.describe(
            "writ_introspections_total",
            "Introspections, by outcome (active, inactive or the error code).",
        );
        m.describe(
            "writ_revocations_total",
            "Revocations published, by kind (token, task, selector, quarantine, lift).",
        );
        m.describe("writ_store_errors_total", "Store operations that failed.");
        m.describe(
            "writ_failures_total",
            "Failures of the broker's own parts answered with 503, by part.",
        );
        m.describe(
            "writ_http_requests_total",
            "HTTP requests, by route and status.",
        );
        m.describe(
            "writ_http_request_duration_seconds",
            "HTTP request latency, by route.",
        );
        m.describe(
            "writ_open_tasks",
            "Open tasks (on Redis: tasks before their deadline).",
        );
        m.describe(
            "writ_revocation_feed_lag_milliseconds",
            "Time since this replica last read the revocation feed.",
        );
        m.describe(
            "writ_revocation_feed_fresh",
            "1 when this replica's revocation view is confirmed.",
        );
        m.describe(
            "writ_revocation_feed_corrupt_reads_total",
            "Feed reads that met an entry this replica cannot read (the view stays stale).",
        );
        m.describe(
            "writ_revocation_cache_entries",
            "Entries of this replica's revocation cache, by kind.",
        );
        m.describe("writ_policy_version_info", "The policy version in force.");
        m.describe(
            "writ_approvals_pending",
            "Approval requests waiting for a decision.",
        );
        m.describe(
            "writ_approval_decisions_total",
            "Approval outcomes, by outcome (approved, denied, expired, cancelled).",
        );
        m.describe(
            "writ_approval_decision_seconds",
            "Time from an approval request to its decision, by outcome.",
        );
        m.describe(
            "writ_approval_webhook_failures_total",
            "Failed webhook delivery attempts of approval requests.",
        );
        m.describe(
            "writ_approval_webhook_deliveries_total",
            "Approval request notifications, by outcome (delivered, abandoned, dropped).",
        );
        m.describe(
            "writ_signing_key_info",
            "Signing keys published, and which one signs.",
        );
        m.describe(
            "writ_trust_domain_ready",
            "1 while a trust domain's bundle source can be read; 0 while its credentials fail closed.",
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.describe("writ_trips_total", "Trips fired, by rule.");
        m.inc("writ_trips_total", &[("rule", "denials")]);
        m.inc("writ_trips_total", &[("rule", "denials")]);
        m.observe("writ_exchange_seconds", &[], 0.003);
        let text = m.render();
        assert!(text.contains("# TYPE writ_trips_total counter"));
        assert!(text.contains("writ_trips_total{rule=\"denials\"} 2"));
        assert!(text.contains("writ_exchange_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("writ_exchange_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("writ_exchange_seconds_count 1"));
        assert_eq!(m.get("writ_trips_total", &[("rule", "denials")]), 2);
    }
}
