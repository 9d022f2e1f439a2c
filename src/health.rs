//! What operators read: readiness and the metrics scrape.

use serde_json::{Value, json};

use crate::broker::Broker;
use crate::error::BrokerError;

/// The answer of `/readyz`.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub ready: bool,
    pub body: Value,
}

impl Broker {
    /// Ready when the store answers, the revocation view is confirmed, revocations can be
    /// published, and keys and policies are loaded.
    pub async fn readiness(&self) -> Readiness {
        let store_ok = self.store.ping().await.is_ok();
        let publish_ok = self.can_publish().await;
        let policy = self.policy.current();
        let keys = self.tokens.keys().all().len();
        let feed_ok = self.revocations.is_fresh();
        let log_ok = !self.audit.is_failed();
        let ready = store_ok && feed_ok && publish_ok && log_ok && keys > 0;
        // A trust domain whose source cannot be read fails closed on its own; the broker
        // stays ready for the others, and names it here.
        let domains = self.identity.trust_domain_status();
        let not_ready: Vec<&str> = domains
            .iter()
            .filter(|(_, p)| p.is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        let trust_domains: serde_json::Map<String, Value> = domains
            .iter()
            .map(|(n, p)| {
                let v = match p {
                    None => "ok".to_string(),
                    Some(reason) => format!("not ready: {reason}"),
                };
                (n.clone(), Value::from(v))
            })
            .collect();
        Readiness {
            ready,
            body: json!({
                "status": if ready { "ready" } else { "not ready" },
                "checks": {
                    "store": if store_ok { "ok" } else { "unreachable" },
                    "revocation_feed": if feed_ok { "ok" } else { "stale" },
                    "revocation_publish": if publish_ok {
                        "ok"
                    } else {
                        "failing: revocations cannot be written to the revocation feed"
                    },
                    "decision_log": if log_ok { "ok" } else { "failed" },
                    "revocation_state": self.revocations.problem().unwrap_or("ok"),
                    "store_eviction_policy": self.revocations.eviction_policy(),
                    "signing_keys": keys,
                    "policy_version": policy.version(),
                    "trust_domains": trust_domains,
                },
                "trust_domains_not_ready": not_ready,
            }),
        }
    }

    /// False while this replica cannot write to the revocation feed: its last publish failed
    /// and no write since succeeded. After a failure the feed is probed (a cheap write to
    /// its slot) at most once a second, so readiness returns as soon as writes do.
    async fn can_publish(&self) -> bool {
        if self.revocations.probe_due() {
            match self.store.probe_feed().await {
                Ok(()) => self.revocations.wrote_feed(true),
                Err(e) => {
                    let error = crate::error::chain(&e);
                    tracing::warn!(%error, "the revocation feed still cannot be written");
                }
            }
        }
        !self.revocations.publish_failing()
    }

    /// Prometheus text; gauges are read at scrape time.
    pub async fn scrape_metrics(&self) -> String {
        let m = &self.metrics;
        match self.store.count_open_tasks(self.now()).await {
            Ok(n) => m.set("writ_open_tasks", &[], n),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot count open tasks");
                m.inc("writ_store_errors_total", &[]);
            }
        }
        m.set(
            "writ_revocation_feed_lag_milliseconds",
            &[],
            self.revocations.lag_ms(),
        );
        m.set(
            "writ_revocation_feed_fresh",
            &[],
            u64::from(self.revocations.is_fresh()),
        );
        m.set(
            "writ_revocation_feed_corrupt_reads_total",
            &[],
            self.revocations.corrupt_reads(),
        );
        let (jtis, tasks, blocks) = self.revocations.counts();
        for (kind, n) in [("token", jtis), ("task", tasks), ("block", blocks)] {
            m.set(
                "writ_revocation_cache_entries",
                &[("kind", kind)],
                u64::try_from(n).unwrap_or(u64::MAX),
            );
        }
        for (td, problem) in self.identity.trust_domain_status() {
            m.set(
                "writ_trust_domain_ready",
                &[("trust_domain", &td)],
                u64::from(problem.is_none()),
            );
        }
        self.audit_metrics();
        self.approval_metrics().await;
        m.set_only(
            "writ_policy_version_info",
            &[("version", self.policy.current().version())],
            1,
        );
        for (i, k) in self.tokens.keys().all().iter().enumerate() {
            let active = if i == 0 { "true" } else { "false" };
            m.set(
                "writ_signing_key_info",
                &[("kid", &k.kid), ("alg", k.alg.name()), ("active", active)],
                1,
            );
        }
        m.render()
    }

    /// The decision log's latest signed head, as kept in the store (SPEC §6).
    pub async fn audit_head(&self) -> Result<crate::store::AuditHead, BrokerError> {
        let none = || BrokerError::not_found("the decision log has no checkpoint yet");
        let log_id = self.audit.log_id().ok_or_else(none)?;
        self.store
            .audit_head(&log_id)
            .await
            .map_err(|e| self.fail(e))?
            .ok_or_else(none)
    }

    /// The decision log's counters, as gauges read at scrape time.
    fn audit_metrics(&self) {
        let m = &self.metrics;
        let a = self.audit.stats();
        for (name, help, v) in [
            (
                "writ_audit_append_failures_total",
                "Decision log appends that failed (the record is missing).",
                a.append_failures,
            ),
            (
                "writ_audit_fsyncs_total",
                "Decision log fdatasync calls (one covers every record waiting).",
                a.fsyncs,
            ),
            (
                "writ_audit_written_seq",
                "The highest decision log seq handed to the operating system.",
                a.written_seq,
            ),
            (
                "writ_audit_synced_seq",
                "The highest decision log seq known to be on disk.",
                a.synced_seq,
            ),
            (
                "writ_audit_checkpoints_total",
                "Signed checkpoints written to the decision log.",
                a.checkpoints,
            ),
            (
                "writ_audit_checkpoint_failures_total",
                "Checkpoints that could not be signed or written.",
                a.checkpoint_failures,
            ),
            (
                "writ_audit_summarised_total",
                "Refusals of unauthenticated callers counted into summary records instead of written.",
                a.summarised,
            ),
        ] {
            m.describe(name, help);
            m.set(name, &[], v);
        }
    }
}
