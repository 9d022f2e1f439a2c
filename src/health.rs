//! What operators read: readiness and the metrics scrape.

use serde_json::{Value, json};

use crate::broker::Broker;

/// The answer of `/readyz`.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub ready: bool,
    pub body: Value,
}

impl Broker {
    /// Ready when the store answers, the revocation view is confirmed, and keys and
    /// policies are loaded.
    pub async fn readiness(&self) -> Readiness {
        let store_ok = self.store.ping().await.is_ok();
        let policy = self.policy.current();
        let keys = self.tokens.keys().all().len();
        let feed_ok = self.revocations.is_fresh();
        let ready = store_ok && feed_ok && keys > 0;
        Readiness {
            ready,
            body: json!({
                "status": if ready { "ready" } else { "not ready" },
                "checks": {
                    "store": if store_ok { "ok" } else { "unreachable" },
                    "revocation_feed": if feed_ok { "ok" } else { "stale" },
                    "revocation_state": self.revocations.problem().unwrap_or("ok"),
                    "store_eviction_policy": self.revocations.eviction_policy(),
                    "signing_keys": keys,
                    "policy_version": policy.version(),
                }
            }),
        }
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
}
