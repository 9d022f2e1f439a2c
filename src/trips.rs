//! Trips: rules that watch behaviour at runtime and revoke (SPEC §5.1). Counters are kept in
//! the store, so every replica counts the same requests; quarantines travel on the
//! revocation feed, so every replica refuses a quarantined subject at once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::domain::Subject;
use crate::error::BrokerError;
use crate::policy::{PolicyAction, PolicyContext, PolicyPrincipal};
use crate::store::{
    BlockKind, BlockRecord, BlockSelector, FeedEvent, PolicyTransition, TaskFilter, TaskRecord,
    TaskState,
};
use crate::task::ClosedTree;

/// Rule names, as they appear in trip records and `writ_trips_total{rule}`.
pub const DENIALS: &str = "denials";
pub const EXCHANGE_RATE: &str = "exchange_rate";
pub const MAX_SCOPES: &str = "max_scopes_per_task";
pub const ESCALATION: &str = "escalation";
pub const TASK_BUDGET: &str = "task_budget";
pub const POLICY_CHANGED: &str = "policy_changed";

impl Broker {
    /// `trips.reevaluate_on_policy_change`: open tasks are decided again when the policy
    /// changes (by reload or across a restart).
    pub fn reevaluates_on_policy_change(&self) -> bool {
        self.config
            .trips
            .as_ref()
            .is_some_and(|t| t.reevaluate_on_policy_change)
    }

    /// A policy reload happened (or was refused): recorded, and with
    /// `trips.reevaluate_on_policy_change` the open tasks are decided again.
    pub fn policy_event(
        self: std::sync::Arc<Self>,
        event: Result<crate::policy::ReloadOutcome, crate::policy::PolicyError>,
    ) {
        match event {
            Ok(outcome) if outcome.changed => {
                tracing::info!(old = %outcome.old_version, new = %outcome.new_version, "policy set reloaded");
                self.record_policy_load(Some(&outcome.old_version), "reloaded");
                let reevaluate = self.reevaluates_on_policy_change();
                tokio::spawn(async move {
                    let r = if reevaluate {
                        self.reevaluate_open_tasks(&outcome.old_version).await
                    } else {
                        self.advance_policy().await.map(|_| Reevaluation::default())
                    };
                    if let Err(e) = r {
                        tracing::error!(error = %e, "re-evaluation of open tasks failed");
                    }
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "new policy set refused; the previous one keeps serving");
                let entry = audit::Entry {
                    decision: Some("deny"),
                    policy_version: Some(self.policy.current().version().to_string()),
                    reason: format!("policy reload refused: {e}"),
                    ..audit::Entry::default()
                };
                // A failed append is logged and counted by `record`.
                let _ = self.record(Event::PolicyLoad, entry);
            }
        }
    }
}

/// What a trip does besides being recorded and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consequence {
    /// Recorded and counted only (the refusal that reported it stands on its own).
    Record,
    /// The subject's open tasks are revoked and, with `trips.quarantine`, it is quarantined.
    RevokeAndQuarantine,
}

/// What a re-evaluation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reevaluation {
    pub evaluated: usize,
    pub revoked: usize,
    /// False when another replica did (or is doing) the work for this version.
    pub ran_here: bool,
}

impl Broker {
    /// Counts one exchange attempt of `subject`. Beyond `trips.exchange_rate` the request is
    /// refused, and the first request beyond it trips the rule.
    pub(crate) async fn count_exchange(
        &self,
        subject: &Subject,
        source_ip: Option<&str>,
    ) -> Result<(), BrokerError> {
        let Some(rate) = self.config.trips.as_ref().and_then(|t| t.exchange_rate) else {
            return Ok(());
        };
        let n = self
            .store
            .hit(
                &format!("rate:{subject}"),
                self.now(),
                rate.window,
                u64::from(rate.count) + 1,
            )
            .await
            .map_err(|e| self.fail(e))?;
        if n <= u64::from(rate.count) {
            return Ok(());
        }
        if n == u64::from(rate.count) + 1 {
            let evidence =
                json!({"exchanges": n, "limit": rate.count, "window_secs": rate.window.as_secs()});
            self.trip(
                EXCHANGE_RATE,
                Some(subject),
                evidence,
                Consequence::RevokeAndQuarantine,
                source_ip,
            )
            .await?;
        }
        Err(BrokerError::invalid_grant(format!(
            "more than {} exchanges within {}",
            rate.count,
            humantime::format_duration(rate.window)
        )))
    }

    /// Counts one policy denial of an authenticated subject; the `count`-th within the window
    /// trips the rule: the subject's open tasks are revoked and it is quarantined.
    pub(crate) async fn count_denial(
        &self,
        subject: &Subject,
        evidence: Value,
        source_ip: Option<&str>,
    ) -> Result<(), BrokerError> {
        let Some(d) = self.config.trips.as_ref().and_then(|t| t.denials) else {
            return Ok(());
        };
        let n = self
            .store
            .hit(
                &format!("denials:{subject}"),
                self.now(),
                d.window,
                u64::from(d.count) + 1,
            )
            .await
            .map_err(|e| self.fail(e))?;
        if n == u64::from(d.count) {
            let evidence = json!({"denials": n, "limit": d.count, "window_secs": d.window.as_secs(), "last": evidence});
            self.trip(
                DENIALS,
                Some(subject),
                evidence,
                Consequence::RevokeAndQuarantine,
                source_ip,
            )
            .await?;
        }
        Ok(())
    }

    /// Fires a rule: writes the `trip` record and counts it, after revoking the subject's
    /// open tasks and quarantining it when the consequence says so.
    pub(crate) async fn trip(
        &self,
        rule: &'static str,
        subject: Option<&Subject>,
        evidence: Value,
        consequence: Consequence,
        source_ip: Option<&str>,
    ) -> Result<(), BrokerError> {
        let mut revoked = ClosedTree::default();
        let mut quarantine = Value::Null;
        if let (Some(subject), Consequence::RevokeAndQuarantine) = (subject, consequence) {
            for task in self.open_tasks_of(subject).await? {
                let tree = self
                    .close_task_tree(&task.id, TaskState::Revoked, &format!("trip:{rule}"))
                    .await?;
                revoked.absorb(tree);
            }
            quarantine = self.quarantine(subject, rule).await?;
        }
        self.metrics.inc("writ_trips_total", &[("rule", rule)]);
        tracing::warn!(rule, subject = subject.map(|s| s.as_str()), "trip");
        self.record(
            Event::Trip,
            audit::Entry {
                decision: Some("deny"),
                subject: subject.map(|s| s.to_string()),
                reason: format!("trip: {rule}"),
                source_ip: source_ip.map(str::to_string),
                detail: Some(json!({
                    "rule": rule,
                    "evidence": evidence,
                    "revoked_tasks": revoked.task_ids(),
                    "revoked_tokens": revoked.live_tokens,
                    "quarantine": quarantine,
                })),
                ..audit::Entry::default()
            },
        )?;
        Ok(())
    }

    /// Quarantines `subject` for `trips.quarantine`, when configured; returns what the trip
    /// record says of it.
    async fn quarantine(&self, subject: &Subject, rule: &str) -> Result<Value, BrokerError> {
        let Some(q) = self.config.trips.as_ref().and_then(|t| t.quarantine) else {
            return Ok(Value::Null);
        };
        let now = self.now();
        let expires_at = now.saturating_add(i64::try_from(q.as_secs()).unwrap_or(i64::MAX));
        let record = BlockRecord {
            id: crate::revoke::new_block_id("qtn").map_err(|e| self.fail(e))?,
            selector: BlockSelector::Exact(subject.to_string()),
            reason: format!("trip:{rule}"),
            actor: "writ".into(),
            created_at: now,
            until: self.limits.token_horizon(now),
            lifted_at: None,
            kind: BlockKind::Quarantine,
            expires_at: Some(expires_at),
        };
        let described = json!({"id": record.id, "until": expires_at});
        let selector = record.selector.clone();
        self.publish(&FeedEvent::Block { record }, now).await?;
        self.cancel_approvals(&selector, &format!("subject quarantined (trip:{rule})"))
            .await;
        Ok(described)
    }

    /// Records the version in force as the store's current policy (`policy:current`): a
    /// change of version there is one numbered transition, whichever replica saw it first.
    pub async fn advance_policy(&self) -> Result<PolicyTransition, BrokerError> {
        let version = self.policy.current().version().to_string();
        self.store
            .advance_policy(&version)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Decides every open task again under the policy set in force; tasks whose granted
    /// scopes are no longer all permitted are revoked with reason `policy_changed`. With a
    /// shared store one replica does the work per transition (generation, from, to): the
    /// others wait for it, and take over if it dies before finishing (its claim expires).
    pub async fn reevaluate_open_tasks(
        &self,
        old_version: &str,
    ) -> Result<Reevaluation, BrokerError> {
        let transition = self.advance_policy().await?;
        let new_version = transition.current.clone();
        let done = format!("reeval-done:{}", transition.key());
        for _ in 0..120 {
            if self.store.flag(&done).await.map_err(|e| self.fail(e))? {
                return Ok(Reevaluation::default());
            }
            if self
                .store
                .claim(
                    &format!("reeval:{}", transition.key()),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| self.fail(e))?
            {
                let report = self.reevaluate_here(old_version, &new_version).await?;
                self.store
                    .set_flag(&done, Duration::from_secs(24 * 3600))
                    .await
                    .map_err(|e| self.fail(e))?;
                return Ok(report);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::error!(
            version = %new_version,
            "re-evaluation: no replica finished the work within 60 s"
        );
        self.metrics
            .inc("writ_failures_total", &[("part", "reevaluation")]);
        Err(BrokerError::unavailable())
    }

    async fn reevaluate_here(
        &self,
        old_version: &str,
        new_version: &str,
    ) -> Result<Reevaluation, BrokerError> {
        let open = self.list_tasks(&TaskFilter::all_open()).await?;
        let mut report = Reevaluation {
            ran_here: true,
            ..Reevaluation::default()
        };
        // Decide every task first (CPU only), then revoke the losers concurrently: each
        // revocation is a few store round trips.
        let (evaluated, losers) = self.no_longer_permitted(&open, new_version);
        report.evaluated = evaluated;
        use futures_util::StreamExt;
        let mut pending = losers.into_iter();
        let mut results = futures_util::stream::FuturesUnordered::new();
        let revoke = |task: TaskRecord, denied: Vec<String>| {
            Box::pin(async move {
                let r = self
                    .close_task_tree(&task.id, TaskState::Revoked, POLICY_CHANGED)
                    .await;
                (task, denied, r)
            })
        };
        for (task, denied) in pending.by_ref().take(32) {
            results.push(revoke(task, denied));
        }
        while let Some((task, denied, r)) = results.next().await {
            if let Some((t, d)) = pending.next() {
                results.push(revoke(t, d));
            }
            let closed = r?;
            if closed.tasks.is_empty() {
                continue;
            }
            report.revoked += 1;
            self.metrics
                .inc("writ_trips_total", &[("rule", POLICY_CHANGED)]);
            let evidence = json!({
                "granted_under": task.policy_version,
                "previous_version": old_version,
                "new_version": new_version,
                "denied_scopes": denied,
            });
            self.record(
                Event::Trip,
                audit::Entry {
                    decision: Some("deny"),
                    subject: Some(task.owner.to_string()),
                    task_id: Some(task.id.to_string()),
                    scopes_requested: task.scopes.clone(),
                    policy_version: Some(new_version.to_string()),
                    reason: format!("trip: {POLICY_CHANGED}"),
                    detail: Some(json!({
                        "rule": POLICY_CHANGED,
                        "evidence": evidence,
                        "revoked_tasks": closed.task_ids(),
                        "revoked_tokens": closed.live_tokens,
                    })),
                    ..audit::Entry::default()
                },
            )?;
        }
        tracing::info!(
            evaluated = report.evaluated,
            revoked = report.revoked,
            "open tasks re-evaluated"
        );
        Ok(report)
    }

    /// The open tasks granted under another version whose scopes the policy in force no
    /// longer all permits, with the scopes it denies; and how many were evaluated.
    fn no_longer_permitted(
        &self,
        open: &[TaskRecord],
        new_version: &str,
    ) -> (usize, Vec<(TaskRecord, Vec<String>)>) {
        let set = self.policy.current();
        let now = self.now();
        let mut evaluated = 0;
        let mut losers = Vec::new();
        for task in open
            .iter()
            .filter(|t| t.is_open_at(now) && t.policy_version != new_version)
        {
            evaluated += 1;
            let action = if task.depth > 0 {
                PolicyAction::Delegate
            } else {
                PolicyAction::Exchange
            };
            let source = if task.source.is_empty() {
                "jwt-svid".to_string()
            } else {
                task.source.clone()
            };
            let ctx = PolicyContext {
                audience: task.audience.clone(),
                purpose: task.purpose.clone(),
                ttl: self.limits.default_ttl_secs,
                source,
                depth: task.depth,
                now,
                on_behalf_of: task
                    .on_behalf_of
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                parent_task: task
                    .parent
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                binding: if task.jkt.is_some() {
                    "dpop"
                } else if task.x5t.is_some() {
                    "mtls"
                } else {
                    "none"
                }
                .to_string(),
            };
            let principal = PolicyPrincipal::of_task_owner(task);
            let denied: Vec<String> = set
                .decide_all(&principal, action, &task.scopes, &ctx)
                .into_iter()
                .filter(|d| !d.allowed || (d.approval_required && task.approval.is_none()))
                .map(|d| d.scope)
                .collect();
            if !denied.is_empty() {
                losers.push((task.clone(), denied));
            }
        }
        (evaluated, losers)
    }
}
