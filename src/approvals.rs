//! Approval gates (SPEC §4.7): a permit annotated `@approval("required")` holds the request
//! for a human. The exchange answers `authorization_pending` with an `approval_id`; the
//! client repeats the same request with it (the polling of RFC 8628 §3.4-3.5) until an
//! approver approves or denies it, or it expires. Approvals live in the store, so any
//! replica answers the poll; every change is a compare-and-set on the record's revision, so
//! two replicas (or two approvers) acting at once never both win.

use serde_json::{Map, Value, json};

use crate::audit::{self, Event};
use crate::auth::{Caller, Role};
use crate::broker::Broker;
use crate::config::ApprovalsConfig;
use crate::domain::{duration_secs, random_id};
use crate::error::{BrokerError, ErrorCode};
use crate::store::{ApprovalRecord, ApprovalState, ApprovalVote, BlockSelector};

/// How often a write that lost a race is tried again before the caller gets a 503.
const RACE_TRIES: u32 = 8;
/// How long an approved request may still be picked up after its decision, even past the
/// request's own expiry.
const PICKUP_GRACE: i64 = 60;
/// Longest approval id accepted on the wire.
pub const MAX_ID_LEN: usize = 64;

/// What a request asks, as an approval binds it: a repeat must ask exactly this.
#[derive(Debug, Clone)]
pub struct Asked {
    pub subject: String,
    /// The current actor of a delegated request (the outermost `act.sub`).
    pub actor: Option<String>,
    /// The actor chain of a delegated request.
    pub act: Option<Value>,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub purpose: String,
    pub ttl: u64,
    pub task_id: Option<String>,
}

impl Asked {
    /// The first way `rec` differs from this request, if any.
    fn differs_from(&self, rec: &ApprovalRecord) -> Option<&'static str> {
        let same_set = |a: &[String], b: &[String]| {
            let mut a = a.to_vec();
            let mut b = b.to_vec();
            a.sort();
            a.dedup();
            b.sort();
            b.dedup();
            a == b
        };
        if self.subject != rec.subject {
            Some("subject")
        } else if self.actor != rec.actor {
            Some("actor")
        } else if !same_set(&self.scopes, &rec.scopes) {
            Some("scope")
        } else if !same_set(&self.audience, &rec.audience) {
            Some("audience")
        } else if self.purpose != rec.purpose {
            Some("task_purpose")
        } else if self.ttl != rec.ttl {
            Some("expires_in")
        } else if self.task_id != rec.task_id {
            Some("task_id")
        } else {
            None
        }
    }
}

/// Why a repeat with `approval_id` does not go on to be issued.
#[derive(Debug)]
pub enum PollStop {
    /// The answer to give as it is (`authorization_pending`, `slow_down`, `access_denied`,
    /// `expired_token`) or a failure (503).
    Answer(BrokerError),
    /// `invalid_grant`, recorded as a refusal: an unknown id, a used approval, or a repeat
    /// that differs from the request held.
    Refused(String),
}

/// An approver's verdict.
#[derive(Debug, Clone)]
pub enum Verdict {
    Approve,
    Deny { reason: String },
}

/// The pending answer: `authorization_pending` with the id, the polling interval and the
/// seconds left.
fn pending(rec: &ApprovalRecord, interval: u64, now: i64) -> BrokerError {
    let mut f = Map::new();
    f.insert("approval_id".into(), json!(rec.id));
    f.insert("interval".into(), json!(interval));
    f.insert(
        "expires_in".into(),
        json!(rec.expires_at.saturating_sub(now).max(0)),
    );
    BrokerError::new(
        ErrorCode::AuthorizationPending,
        "the request is waiting for an approver; repeat it with approval_id",
    )
    .with_fields(f)
}

/// An approval id as the wire may carry it: `apr_` and base64url characters.
pub fn parse_id(raw: &str) -> Option<&str> {
    let rest = raw.strip_prefix("apr_")?;
    (raw.len() <= MAX_ID_LEN
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then_some(raw)
}

/// The JSON an approver sees of an approval.
pub fn approval_json(a: &ApprovalRecord) -> Value {
    json!({
        "approval_id": a.id,
        "state": a.state.as_str(),
        "subject": a.subject,
        "actor": a.actor,
        "act": a.act,
        "scopes": a.scopes,
        "gated_scopes": a.gated_scopes,
        "audience": a.audience,
        "purpose": a.purpose,
        "ttl": a.ttl,
        "task_id": a.task_id,
        "policies": a.policies,
        "policy_version": a.policy_version,
        "created_at": a.created_at,
        "expires_at": a.expires_at,
        "approvals": a.approvals,
        "decided_at": a.decided_at,
        "denied_by": a.denied_by,
        "reason": a.reason,
    })
}

impl Broker {
    /// The `[approvals]` section, when approvals are on.
    pub fn approvals_config(&self) -> Option<&ApprovalsConfig> {
        self.config.approvals.as_ref()
    }

    fn interval_secs(&self) -> u64 {
        self.approvals_config()
            .map_or(5, |a| a.interval.as_secs().max(1))
    }

    /// Holds a request for approval: records it in the store and the decision log, announces
    /// it, and gives the pending answer. Only called with approvals configured.
    pub(crate) async fn hold_for_approval(
        &self,
        asked: Asked,
        gated: Vec<String>,
        policies: Vec<String>,
        policy_version: String,
        source_ip: Option<String>,
        now: i64,
    ) -> BrokerError {
        let Some(cfg) = self.approvals_config() else {
            return BrokerError::invalid_scope("approval is required and nobody may approve");
        };
        let id = match random_id("apr_") {
            Ok(id) => id,
            Err(e) => return self.fail(e),
        };
        let rec = ApprovalRecord {
            id,
            rev: 1,
            state: ApprovalState::Pending,
            subject: asked.subject,
            actor: asked.actor,
            act: asked.act,
            scopes: asked.scopes,
            audience: asked.audience,
            purpose: asked.purpose,
            ttl: asked.ttl,
            task_id: asked.task_id,
            gated_scopes: gated,
            policies,
            policy_version,
            created_at: now,
            expires_at: now.saturating_add(duration_secs(cfg.ttl)),
            last_poll: now,
            approvals: Vec::new(),
            decided_at: None,
            denied_by: None,
            reason: None,
        };
        // Recorded before it exists anywhere else: an approval nobody can account for is
        // never created.
        if let Err(e) =
            self.record_approval(&rec, "requested", None, "held for approval", source_ip)
        {
            return e;
        }
        match self.store.create_approval(&rec).await {
            Ok(true) => {}
            Ok(false) => {
                return self.fail(crate::store::StoreError::invalid(
                    "a fresh approval id is already taken",
                ));
            }
            Err(e) => return self.fail(e),
        }
        if let Some(hook) = &self.webhook {
            hook.notify(self.webhook_body(&rec));
        }
        pending(&rec, self.interval_secs(), now)
    }

    /// The notification of a new request: what it asks, and how to decide it.
    fn webhook_body(&self, a: &ApprovalRecord) -> Vec<u8> {
        let issuer = self.tokens.issuer().trim_end_matches('/');
        let scopes = a.scopes.join(" ");
        let text = format!(
            "{} asks for `{scopes}` at {}{}. Approve: `writ approvals approve {id} --broker {issuer} --admin-token FILE`; deny: `writ approvals deny {id} --broker {issuer} --admin-token FILE --reason R`.",
            a.subject,
            a.audience.join(" "),
            if a.purpose.is_empty() {
                String::new()
            } else {
                format!(" for \"{}\"", a.purpose)
            },
            id = a.id,
        );
        let body = json!({
            "type": "approval.requested",
            "approval": approval_json(a),
            "approve": {"method": "POST", "url": format!("{issuer}/admin/v1/approvals/{}/approve", a.id)},
            "deny": {"method": "POST", "url": format!("{issuer}/admin/v1/approvals/{}/deny", a.id), "body": {"reason": "..."}},
            "text": text,
        });
        body.to_string().into_bytes()
    }

    /// A repeat of a held request (`approval_id`): the approved record, to be issued now,
    /// or why not.
    pub(crate) async fn poll_approval(
        &self,
        id: &str,
        asked: &Asked,
        now: i64,
    ) -> Result<ApprovalRecord, PollStop> {
        let interval = self.interval_secs();
        let fail = |e: crate::store::StoreError| PollStop::Answer(self.fail(e));
        for _ in 0..RACE_TRIES {
            let Some(rec) = self.store.get_approval(id).await.map_err(fail)? else {
                return Err(PollStop::Refused("unknown approval_id".into()));
            };
            if let Some(what) = asked.differs_from(&rec) {
                return Err(PollStop::Refused(format!(
                    "the request differs from the one held for approval ({what})"
                )));
            }
            match rec.state {
                ApprovalState::Pending if now >= rec.expires_at => {
                    if self.expire(&rec, now).await.map_err(PollStop::Answer)? {
                        return Err(PollStop::Answer(expired()));
                    }
                }
                ApprovalState::Pending => {
                    let elapsed = now.saturating_sub(rec.last_poll);
                    if elapsed < i64::try_from(interval).unwrap_or(i64::MAX) {
                        let mut f = Map::new();
                        f.insert("approval_id".into(), json!(rec.id));
                        f.insert("interval".into(), json!(interval));
                        return Err(PollStop::Answer(
                            BrokerError::new(
                                ErrorCode::SlowDown,
                                format!("poll at most every {interval} seconds"),
                            )
                            .with_fields(f),
                        ));
                    }
                    let mut next = rec.next();
                    next.last_poll = now;
                    if self.store.replace_approval(&next).await.map_err(fail)? {
                        return Err(PollStop::Answer(pending(&next, interval, now)));
                    }
                }
                ApprovalState::Approved => {
                    let until = rec
                        .expires_at
                        .max(rec.decided_at.unwrap_or(0).saturating_add(PICKUP_GRACE));
                    if now >= until {
                        return Err(PollStop::Answer(expired()));
                    }
                    return Ok(rec);
                }
                ApprovalState::Denied => {
                    return Err(PollStop::Answer(BrokerError::new(
                        ErrorCode::RequestDenied,
                        "an approver denied the request",
                    )));
                }
                ApprovalState::Cancelled => {
                    return Err(PollStop::Answer(BrokerError::new(
                        ErrorCode::RequestDenied,
                        "the request was cancelled: its subject is blocked",
                    )));
                }
                ApprovalState::Expired => return Err(PollStop::Answer(expired())),
                ApprovalState::Issued => {
                    return Err(PollStop::Refused("this approval has been used".into()));
                }
            }
        }
        Err(PollStop::Answer(BrokerError::unavailable()))
    }

    /// Marks an approved request used, just before its token is issued: one approval issues
    /// once, however many polls race. False when another poll used it first.
    pub(crate) async fn claim_approval(&self, rec: &ApprovalRecord) -> Result<bool, BrokerError> {
        let mut next = rec.next();
        next.state = ApprovalState::Issued;
        self.store
            .replace_approval(&next)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Pending → expired, recorded once by whichever replica gets there first. True when it
    /// is expired now (by this call or another).
    async fn expire(&self, rec: &ApprovalRecord, now: i64) -> Result<bool, BrokerError> {
        let mut next = rec.next();
        next.state = ApprovalState::Expired;
        next.decided_at = Some(now);
        let won = self
            .store
            .replace_approval(&next)
            .await
            .map_err(|e| self.fail(e))?;
        if won {
            self.decided(&next, "expired", None, "nobody decided in time", None)?;
        }
        Ok(won)
    }

    /// Records a decision and counts it.
    fn decided(
        &self,
        rec: &ApprovalRecord,
        outcome: &'static str,
        by: Option<&str>,
        reason: &str,
        ip: Option<String>,
    ) -> Result<(), BrokerError> {
        self.metrics
            .inc("writ_approval_decisions_total", &[("outcome", outcome)]);
        let waited = rec
            .decided_at
            .unwrap_or(rec.created_at)
            .saturating_sub(rec.created_at)
            .max(0);
        #[expect(
            clippy::cast_precision_loss,
            reason = "seconds of waiting are far below 2^52"
        )]
        let waited = waited as f64;
        self.metrics.observe_in(
            "writ_approval_decision_seconds",
            &[("outcome", outcome)],
            waited,
            &crate::metrics::WAIT_BUCKETS,
        );
        self.record_approval(rec, outcome, by, reason, ip)
    }

    /// One `approval` record of the decision log.
    fn record_approval(
        &self,
        rec: &ApprovalRecord,
        decision: &'static str,
        by: Option<&str>,
        reason: &str,
        source_ip: Option<String>,
    ) -> Result<(), BrokerError> {
        let entry = audit::Entry {
            decision: Some(decision),
            subject: Some(rec.subject.clone()),
            task_id: rec.task_id.clone(),
            scopes_requested: rec.scopes.clone(),
            audience: rec.audience.clone(),
            ttl: Some(rec.ttl),
            policy_version: Some(rec.policy_version.clone()),
            policies: rec.policies.clone(),
            reason: reason.to_string(),
            source_ip,
            detail: Some(json!({
                "approval_id": rec.id,
                "by": by,
                "approvals": rec.approvals,
                "actor": rec.actor,
                "gated_scopes": rec.gated_scopes,
                "purpose": rec.purpose,
                "expires_at": rec.expires_at,
            })),
            ..audit::Entry::default()
        };
        self.record(Event::Approval, entry).map(|_| ())
    }

    /// `GET /admin/v1/approvals?state=`: the approvals the store keeps, newest first;
    /// pending ones past their expiry are expired on the way.
    pub async fn list_approvals(
        &self,
        authorization: Option<&str>,
        state: Option<&str>,
        ip: Option<String>,
    ) -> Result<Vec<Value>, BrokerError> {
        self.authorize(authorization, Role::Approver, ip).await?;
        let state = match state.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(ApprovalState::parse(s).ok_or_else(|| {
                BrokerError::invalid_request(
                    "`state` is one of pending, approved, denied, expired, cancelled, issued",
                )
            })?),
        };
        let now = self.now();
        let mut out = Vec::new();
        for mut a in self.sweep(now).await? {
            if a.state == ApprovalState::Pending && now >= a.expires_at {
                a.state = ApprovalState::Expired;
            }
            if state.is_none_or(|s| s == a.state) {
                out.push(approval_json(&a));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Expires what is past its time; returns every approval kept, oldest first.
    pub async fn sweep(&self, now: i64) -> Result<Vec<ApprovalRecord>, BrokerError> {
        let all = self
            .store
            .list_approvals()
            .await
            .map_err(|e| self.fail(e))?;
        let mut pending = 0u64;
        for a in &all {
            if a.state != ApprovalState::Pending {
                continue;
            }
            if now >= a.expires_at {
                self.expire(a, now).await?;
            } else {
                pending += 1;
            }
        }
        self.metrics.set("writ_approvals_pending", &[], pending);
        Ok(all)
    }

    /// The approval gauges and webhook counters, for a scrape.
    pub async fn approval_metrics(&self) {
        if self.approvals_config().is_none() {
            return;
        }
        if let Err(e) = self.sweep(self.now()).await {
            tracing::debug!(error = %e, "cannot count pending approvals");
        }
        if let Some(hook) = &self.webhook {
            use std::sync::atomic::Ordering::Relaxed;
            let s = &hook.stats;
            let m = &self.metrics;
            m.set(
                "writ_approval_webhook_failures_total",
                &[],
                s.failed_attempts.load(Relaxed),
            );
            for (outcome, n) in [
                ("delivered", &s.delivered),
                ("abandoned", &s.abandoned),
                ("dropped", &s.dropped),
            ] {
                m.set(
                    "writ_approval_webhook_deliveries_total",
                    &[("outcome", outcome)],
                    n.load(Relaxed),
                );
            }
        }
    }

    /// `POST /admin/v1/approvals/{id}/approve|deny`.
    pub async fn decide_approval(
        &self,
        authorization: Option<&str>,
        id: &str,
        verdict: Verdict,
        ip: Option<String>,
    ) -> Result<Value, BrokerError> {
        let caller = self
            .authorize(authorization, Role::Approver, ip.clone())
            .await?;
        let by = caller.name();
        let min = self.approvals_config().map_or(1, |c| {
            usize::try_from(c.min_approvers).unwrap_or(usize::MAX)
        });
        let unknown = || BrokerError::not_found("no such approval");
        let id = parse_id(id).ok_or_else(unknown)?;
        for _ in 0..RACE_TRIES {
            let now = self.now();
            let rec = self
                .store
                .get_approval(id)
                .await
                .map_err(|e| self.fail(e))?
                .ok_or_else(unknown)?;
            if let Caller::Workload(s) = &caller
                && (s.as_str() == rec.subject || rec.actor.as_deref() == Some(s.as_str()))
            {
                self.refuse_decision(&rec, &by, "an approver tried to decide its own request", ip);
                return Err(BrokerError::access_denied(
                    "the requester cannot decide its own request",
                ));
            }
            if rec.state == ApprovalState::Pending && now >= rec.expires_at {
                self.expire(&rec, now).await?;
                return Err(BrokerError::new(
                    ErrorCode::Conflict,
                    "the approval has expired",
                ));
            }
            if rec.state != ApprovalState::Pending {
                return Err(BrokerError::new(
                    ErrorCode::Conflict,
                    format!("the approval is {} already", rec.state.as_str()),
                ));
            }
            let mut next = rec.next();
            let outcome = match &verdict {
                Verdict::Approve => {
                    if rec.approvals.iter().any(|v| v.by == by) {
                        return Err(BrokerError::new(
                            ErrorCode::Conflict,
                            "this approver has approved it already; another approver must",
                        ));
                    }
                    next.approvals.push(ApprovalVote {
                        by: by.clone(),
                        at: now,
                    });
                    if next.approvals.len() >= min {
                        next.state = ApprovalState::Approved;
                        next.decided_at = Some(now);
                        Some("approved")
                    } else {
                        None
                    }
                }
                Verdict::Deny { reason } => {
                    next.state = ApprovalState::Denied;
                    next.decided_at = Some(now);
                    next.denied_by = Some(by.clone());
                    next.reason = Some(reason.clone());
                    Some("denied")
                }
            };
            if !self
                .store
                .replace_approval(&next)
                .await
                .map_err(|e| self.fail(e))?
            {
                continue;
            }
            match (outcome, &verdict) {
                (Some(o), Verdict::Deny { reason }) => {
                    self.decided(&next, o, Some(&by), reason, ip)?;
                }
                (Some(o), Verdict::Approve) => {
                    self.decided(&next, o, Some(&by), "approved", ip)?;
                }
                (None, _) => self.record_approval(
                    &next,
                    "approved_partly",
                    Some(&by),
                    &format!("{} of {min} approvals", next.approvals.len()),
                    ip,
                )?,
            }
            return Ok(approval_json(&next));
        }
        Err(BrokerError::unavailable())
    }

    /// Records a refused decision (self-approval).
    fn refuse_decision(&self, rec: &ApprovalRecord, by: &str, reason: &str, ip: Option<String>) {
        if let Err(e) = self.record_approval(rec, "deny", Some(by), reason, ip) {
            tracing::error!(error = %e, "cannot record a refused approval decision");
        }
    }

    /// A block or quarantine of a subject cancels its pending approvals. An approved one is
    /// left as it is: it is refused when it would be issued (the block is checked then).
    pub async fn cancel_approvals(&self, selector: &BlockSelector, why: &str) {
        if self.approvals_config().is_none() {
            return;
        }
        let all = match self.store.list_approvals().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot list approvals to cancel them");
                return;
            }
        };
        for a in all
            .into_iter()
            .filter(|a| a.state == ApprovalState::Pending && selector.matches(&a.subject))
        {
            let mut rec = a;
            for _ in 0..RACE_TRIES {
                let mut next = rec.next();
                next.state = ApprovalState::Cancelled;
                next.decided_at = Some(self.now());
                next.reason = Some(why.to_string());
                match self.store.replace_approval(&next).await {
                    Ok(true) => {
                        if let Err(e) = self.decided(&next, "cancelled", None, why, None) {
                            tracing::error!(error = %e, "cannot record a cancelled approval");
                        }
                        break;
                    }
                    Ok(false) => match self.store.get_approval(&rec.id).await {
                        Ok(Some(fresh)) if fresh.state == ApprovalState::Pending => rec = fresh,
                        _ => break,
                    },
                    Err(e) => {
                        tracing::warn!(error = %crate::error::chain(&e), "cannot cancel an approval");
                        break;
                    }
                }
            }
        }
    }
}

fn expired() -> BrokerError {
    BrokerError::new(
        ErrorCode::ExpiredToken,
        "the approval request expired before it was decided",
    )
}
