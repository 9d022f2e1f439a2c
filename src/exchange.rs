//! The token exchange use case (RFC 8693, SPEC §4.1): verify the caller, decide every scope,
//! record the task and the decision, then sign.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::json;

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::domain::{Audience, Scope, Subject, TaskId, TokenId, join_scopes};
use crate::error::{BrokerError, ErrorCode};
use crate::identity::{IdentityKind, Source, VerifiedIdentity};
use crate::policy::{PolicyAction, PolicyContext, PolicyPrincipal, PrincipalKind};
use crate::store::{MintOutcome, TaskRecord, TaskState, TokenEntry};
use crate::token::{Aud, TaskClaims};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The kind of token presented as `subject_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectTokenType {
    Jwt,
    IdToken,
    AccessToken,
}

/// A parsed, well-formed exchange request.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    pub subject_token: String,
    pub subject_token_type: SubjectTokenType,
    pub scopes: Vec<Scope>,
    pub audiences: Vec<Audience>,
    pub purpose: String,
    pub task_id: Option<TaskId>,
    pub expires_in: Option<u64>,
    pub source_ip: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub issued_token_type: &'static str,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
    pub task_id: String,
}

/// Who asked: a verified workload, or the holder of one of our task tokens (delegation).
struct Caller {
    subject: Subject,
    issuer: String,
    source: Source,
    principal: PolicyPrincipal,
    action: PolicyAction,
    depth: u32,
    parent: Option<TaskRecord>,
    act: Option<serde_json::Value>,
}

pub fn policy_principal(id: &VerifiedIdentity) -> PolicyPrincipal {
    let kind = match &id.kind {
        IdentityKind::Spiffe { spiffe_id } => PrincipalKind::Spiffe {
            trust_domain: spiffe_id.trust_domain_name().to_string(),
            path: spiffe_id.path().to_string(),
            spiffe_id: spiffe_id.to_string(),
        },
        IdentityKind::Oidc {
            issuer,
            sub,
            claims,
        } => PrincipalKind::Oidc {
            issuer: issuer.clone(),
            sub: sub.clone(),
            claims: claims.clone(),
        },
    };
    PolicyPrincipal {
        subject: id.subject.to_string(),
        kind,
    }
}

/// The policy principal of a task's owner, rebuilt from what the task recorded.
pub fn principal_of_task(task: &TaskRecord) -> PolicyPrincipal {
    let claims = task
        .claims
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    principal_from_subject(&task.owner, &task.issuer, claims)
}

/// The policy principal for a subject read back from one of our own tokens or tasks.
fn principal_from_subject(
    subject: &Subject,
    issuer: &str,
    claims: serde_json::Map<String, serde_json::Value>,
) -> PolicyPrincipal {
    let s = subject.as_str();
    let kind = match crate::domain::parse_spiffe_id(s) {
        Some(id) => PrincipalKind::Spiffe {
            trust_domain: id.trust_domain_name().to_string(),
            path: id.path().to_string(),
            spiffe_id: s.to_string(),
        },
        None => PrincipalKind::Oidc {
            issuer: issuer.to_string(),
            sub: s
                .split_once('#')
                .map(|(_, sub)| sub.to_string())
                .unwrap_or_default(),
            claims,
        },
    };
    PolicyPrincipal {
        subject: s.to_string(),
        kind,
    }
}

impl Broker {
    pub async fn exchange(&self, req: ExchangeRequest) -> Result<TokenResponse, BrokerError> {
        // Standing revocations must be known before anything is decided.
        if !self.revocations.is_fresh() {
            return Err(BrokerError::unavailable());
        }
        let now = self.now();
        let caller = self.authenticate(&req, now).await?;

        let audiences: Vec<Audience> = if req.audiences.is_empty() {
            match &self.limits.default_audience {
                Some(a) => vec![a.clone()],
                None => {
                    return Err(BrokerError::new(
                        ErrorCode::InvalidTarget,
                        "no audience or resource was requested and no default audience is configured",
                    ));
                }
            }
        } else {
            req.audiences.clone()
        };
        let audience: Vec<String> = audiences.iter().map(|a| a.as_str().to_string()).collect();
        let requested: Vec<String> = req.scopes.iter().map(|s| s.as_str().to_string()).collect();
        let requested_ttl = req.expires_in.unwrap_or(self.limits.default_ttl).max(1);

        let base_entry = || audit::Entry {
            subject: Some(caller.subject.to_string()),
            task_id: req.task_id.as_ref().map(|t| t.to_string()),
            scopes_requested: requested.clone(),
            audience: audience.clone(),
            source_ip: req.source_ip.clone(),
            ..audit::Entry::default()
        };

        if let Some(block) = self.revocations.blocking(caller.subject.as_str(), now) {
            let why = match (block.kind, block.expires_at) {
                (crate::store::BlockKind::Quarantine, Some(until)) => {
                    format!("subject is quarantined until {until} ({})", block.reason)
                }
                _ => format!("subject is blocked by revocation {}", block.id),
            };
            return Err(self.grant_refused(base_entry(), &why));
        }
        self.count_exchange(&caller.subject, req.source_ip.as_deref())
            .await?;
        if req.task_id.is_none()
            && let Some(max) = self
                .config
                .trips
                .as_ref()
                .and_then(|t| t.max_scopes_per_task)
            && requested.len() > max as usize
        {
            let refusal = ScopeTrip {
                rule: crate::trips::MAX_SCOPES,
                policy_version: None,
                reason: format!(
                    "{} scopes requested; a task may hold at most {max}",
                    requested.len()
                ),
                evidence: json!({"scopes": requested, "limit": max}),
                description: format!("a task may hold at most {max} distinct scopes"),
            };
            return Err(self
                .refuse_scopes(
                    base_entry(),
                    &caller.subject,
                    req.source_ip.as_deref(),
                    refusal,
                )
                .await);
        }

        // A delegated token can never carry more than its parent task was granted.
        if let Some(parent) = &caller.parent {
            let outside: Vec<&String> = requested
                .iter()
                .filter(|s| !parent.scopes.contains(s))
                .collect();
            if !outside.is_empty() {
                let refusal = ScopeTrip {
                    rule: crate::trips::ESCALATION,
                    policy_version: Some(parent.policy_version.clone()),
                    reason: format!(
                        "delegation escalation: {} not granted to the parent task",
                        join_list(&outside)
                    ),
                    evidence: json!({"parent_task": parent.id, "outside": outside}),
                    description: "a delegated task may not exceed its parent's scopes".into(),
                };
                return Err(self
                    .refuse_scopes(
                        base_entry(),
                        &caller.subject,
                        req.source_ip.as_deref(),
                        refusal,
                    )
                    .await);
            }
        }

        // An existing task: ownership, state and budget are checked again atomically when
        // the token is counted; this early look refuses escalation before policy runs.
        let existing = match &req.task_id {
            Some(id) => {
                let task = self
                    .store
                    .get_task(id)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                let Some(task) = task else {
                    return Err(self.grant_refused(base_entry(), "unknown task"));
                };
                if task.owner != caller.subject {
                    return Err(
                        self.grant_refused(base_entry(), "task is owned by another subject")
                    );
                }
                if !task.is_open_at(now) {
                    return Err(self.grant_refused(base_entry(), "task is no longer open"));
                }
                let outside: Vec<&String> = requested
                    .iter()
                    .filter(|s| !task.scopes.contains(s))
                    .collect();
                if !outside.is_empty() {
                    let refusal = ScopeTrip {
                        rule: crate::trips::ESCALATION,
                        policy_version: Some(self.policy.current().version().to_string()),
                        reason: format!(
                            "escalation: {} outside the task's first grant",
                            join_list(&outside)
                        ),
                        evidence: json!({"task_id": task.id, "granted": task.scopes, "outside": outside}),
                        description: "requested scope is outside what the task was granted".into(),
                    };
                    return Err(self
                        .refuse_scopes(
                            base_entry(),
                            &caller.subject,
                            req.source_ip.as_deref(),
                            refusal,
                        )
                        .await);
                }
                Some(task)
            }
            None => None,
        };

        // Policy: one decision per scope; any denial refuses the whole request.
        let policies = self.policy.current();
        let ctx = PolicyContext {
            audience: audience.clone(),
            purpose: existing
                .as_ref()
                .map(|t| t.purpose.clone())
                .unwrap_or_else(|| req.purpose.clone()),
            ttl: requested_ttl,
            source: caller.source.as_str().to_string(),
            depth: caller.depth,
            now,
        };
        let mut determining = BTreeSet::new();
        let mut cap = u64::MAX;
        let mut denied = Vec::new();
        let mut notes = Vec::new();
        for d in policies.decide_all(&caller.principal, caller.action, &requested, &ctx) {
            let scope = &d.scope;
            if !d.errors.is_empty() {
                notes.push(format!("{scope}: evaluation error"));
                tracing::warn!(scope = %scope, errors = ?d.errors, "policy evaluation error counted as deny");
            }
            if d.allowed && d.approval_required {
                notes.push(format!("{scope}: approval required"));
                denied.push(scope.clone());
            } else if d.allowed {
                if let Some(c) = d.max_ttl {
                    cap = cap.min(c.as_secs());
                }
            } else {
                denied.push(scope.clone());
            }
            determining.extend(d.policies);
        }
        let version = policies.version().to_string();
        if !denied.is_empty() {
            let mut e = base_entry();
            e.decision = Some("deny");
            e.policy_version = Some(version);
            e.policies = determining.into_iter().collect();
            e.reason = if notes.is_empty() {
                format!("policy denies {}", denied.join(" "))
            } else {
                format!("policy denies {} ({})", denied.join(" "), notes.join("; "))
            };
            e.detail = Some(json!({"denied_scopes": denied}));
            self.append(Event::Exchange, e)?;
            self.count_denial(
                &caller.subject,
                json!({"denied_scopes": denied}),
                req.source_ip.as_deref(),
            )
            .await?;
            return Err(BrokerError::new(
                ErrorCode::InvalidScope,
                format!("policy does not allow: {}", denied.join(" ")),
            ));
        }

        // TTL = min(request, policy cap, tokens.max_ttl, task deadline).
        let deadline = match (&existing, &caller.parent) {
            (Some(t), _) => t.deadline,
            (None, Some(p)) => p.deadline.min(now + self.limits.max_task_duration as i64),
            (None, None) => now + self.limits.max_task_duration as i64,
        };
        let ttl = requested_ttl
            .min(cap)
            .min(self.limits.max_ttl)
            .min(deadline.saturating_sub(now).max(0) as u64);
        if ttl == 0 {
            return Err(self.grant_refused(base_entry(), "task deadline has passed"));
        }
        let exp = now + ttl as i64;
        let jti = TokenId::generate();
        let token_entry = TokenEntry {
            jti: jti.to_string(),
            exp,
        };

        // Record the task (or count the token into it) before anything is issued.
        let task = match existing {
            Some(task) => {
                let outcome = self
                    .store
                    .mint_into_task(
                        &task.id,
                        &caller.subject,
                        &token_entry,
                        self.limits.max_tokens,
                        now,
                    )
                    .await
                    .map_err(|e| self.unavailable(e))?;
                match outcome {
                    MintOutcome::Minted(t) => t,
                    MintOutcome::NotFound => {
                        return Err(self.grant_refused(base_entry(), "unknown task"));
                    }
                    MintOutcome::NotOwner => {
                        return Err(
                            self.grant_refused(base_entry(), "task is owned by another subject")
                        );
                    }
                    MintOutcome::Closed(_) => {
                        return Err(self.grant_refused(base_entry(), "task is no longer open"));
                    }
                    MintOutcome::OverBudget(t) => {
                        let evidence = json!({"task_id": t.id, "tokens_issued": t.tokens_issued, "limit": self.limits.max_tokens});
                        self.trip(
                            crate::trips::TASK_BUDGET,
                            Some(&caller.subject),
                            evidence,
                            false,
                            req.source_ip.as_deref(),
                        )
                        .await?;
                        return Err(self.grant_refused(
                            base_entry(),
                            &format!(
                                "task token budget of {} is spent",
                                self.limits.max_tokens.min(t.tokens_issued)
                            ),
                        ));
                    }
                }
            }
            None => {
                let task = TaskRecord {
                    id: TaskId::generate(),
                    owner: caller.subject.clone(),
                    issuer: caller.issuer.clone(),
                    purpose: req.purpose.clone(),
                    created_at: now,
                    deadline,
                    state: TaskState::Open,
                    ended_at: None,
                    end_reason: None,
                    policy_version: version.clone(),
                    scopes: requested.clone(),
                    audience: audience.clone(),
                    tokens_issued: 1,
                    parent: caller.parent.as_ref().map(|p| p.id.clone()),
                    depth: caller.depth,
                    source: caller.source.as_str().to_string(),
                    claims: match &caller.principal.kind {
                        PrincipalKind::Oidc { claims, .. } => {
                            crate::policy::policy_claims(claims).into_iter().collect()
                        }
                        PrincipalKind::Spiffe { .. } => Default::default(),
                    },
                };
                self.store
                    .create_task(&task, &token_entry)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                task
            }
        };

        let scope = join_scopes(&req.scopes);
        let mut e = base_entry();
        e.decision = Some("allow");
        e.task_id = Some(task.id.to_string());
        e.jti = Some(jti.to_string());
        e.scopes_granted = requested.clone();
        e.ttl = Some(ttl);
        e.policy_version = Some(version);
        e.policies = determining.into_iter().collect();
        e.reason = if caller.parent.is_some() {
            "delegation permitted".into()
        } else {
            "permitted".into()
        };
        let seq = self.append(Event::Exchange, e)?;
        // Durable before issued (SPEC §6): the token leaves only once its record is on disk.
        self.audit.commit(seq).await.map_err(|err| {
            tracing::error!(error = %err, "decision log commit failed");
            BrokerError::unavailable()
        })?;

        let claims = TaskClaims {
            iss: self.tokens.issuer().to_string(),
            sub: caller.subject.to_string(),
            client_id: caller.subject.to_string(),
            aud: Aud::from_list(audience),
            scope: scope.clone(),
            txn: task.id.to_string(),
            jti: jti.to_string(),
            iat: now,
            nbf: now,
            exp,
            cnf: None,
            act: caller.act,
        };
        let access_token = self.tokens.sign(&claims).map_err(|e| {
            tracing::error!(error = %e, "signing failed");
            BrokerError::unavailable()
        })?;
        Ok(TokenResponse {
            access_token,
            issued_token_type: TYPE_ACCESS_TOKEN,
            token_type: "Bearer",
            expires_in: ttl,
            scope,
            task_id: task.id.to_string(),
        })
    }

    async fn authenticate(&self, req: &ExchangeRequest, now: i64) -> Result<Caller, BrokerError> {
        match req.subject_token_type {
            SubjectTokenType::Jwt | SubjectTokenType::IdToken => {
                let id_only = req.subject_token_type == SubjectTokenType::IdToken;
                let id = self
                    .identity
                    .verify(&req.subject_token, id_only, now)
                    .await
                    .map_err(|e| {
                        self.subject_token_refused(&req.subject_token, e, req.source_ip.as_deref())
                    })?;
                Ok(Caller {
                    subject: id.subject.clone(),
                    issuer: id.issuer(),
                    source: id.source,
                    principal: policy_principal(&id),
                    action: PolicyAction::Exchange,
                    depth: 0,
                    parent: None,
                    act: None,
                })
            }
            SubjectTokenType::AccessToken => {
                let claims = self.tokens.verify(&req.subject_token, now).map_err(|e| {
                    self.subject_token_refused(&req.subject_token, e, req.source_ip.as_deref())
                })?;
                if self.revocations.revoked_reason(&claims, now).is_some() {
                    return Err(BrokerError::new(
                        ErrorCode::InvalidGrant,
                        "the subject token has been revoked",
                    ));
                }
                let parent_id = TaskId::parse(&claims.txn)
                    .ok_or_else(|| BrokerError::invalid_request("subject_token is not valid"))?;
                let parent = self
                    .store
                    .get_task(&parent_id)
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .filter(|t| t.is_open_at(now))
                    .ok_or_else(|| {
                        BrokerError::new(
                            ErrorCode::InvalidGrant,
                            "the subject token's task is no longer open",
                        )
                    })?;
                if req.task_id.is_some() {
                    return Err(BrokerError::invalid_request(
                        "task_id cannot be combined with a task token as subject_token",
                    ));
                }
                let subject = Subject::from_trusted(claims.sub.clone());
                let mut act = json!({"sub": claims.sub});
                if let Some(prev) = claims.act {
                    act["act"] = prev;
                }
                Ok(Caller {
                    principal: principal_of_task(&parent),
                    issuer: parent.issuer.clone(),
                    subject,
                    source: Source::TaskToken,
                    action: PolicyAction::Delegate,
                    depth: parent.depth + 1,
                    parent: Some(parent),
                    act: Some(act),
                })
            }
        }
    }

    fn subject_token_refused(
        &self,
        token: &str,
        e: impl std::fmt::Display + IsUnavailable,
        ip: Option<&str>,
    ) -> BrokerError {
        let unavailable = e.is_unavailable();
        tracing::info!(reason = %e, "subject token refused");
        let entry = audit::Entry {
            decision: Some("deny"),
            reason: format!("subject token refused: {e}"),
            source_ip: ip.map(str::to_string),
            detail: Some(
                json!({"subject_token_sha256": crate::domain::sha256_hex(token.as_bytes())}),
            ),
            ..audit::Entry::default()
        };
        if let Err(err) = self.audit.append_unauthenticated(Event::Exchange, entry) {
            tracing::error!(error = %err, "decision log append failed");
            return BrokerError::unavailable();
        }
        if unavailable {
            BrokerError::unavailable()
        } else {
            BrokerError::invalid_request("subject_token is not valid")
        }
    }

    /// A scope refusal that is also a trip: logged as a deny, reported to its trip rule,
    /// counted as a denial, and answered with `invalid_scope` (or with whatever failed first).
    async fn refuse_scopes(
        &self,
        mut e: audit::Entry,
        subject: &Subject,
        ip: Option<&str>,
        refusal: ScopeTrip,
    ) -> BrokerError {
        e.decision = Some("deny");
        e.policy_version = refusal.policy_version;
        e.reason = refusal.reason;
        let steps = async {
            self.append(Event::Exchange, e)?;
            self.trip(
                refusal.rule,
                Some(subject),
                refusal.evidence.clone(),
                false,
                ip,
            )
            .await?;
            self.count_denial(subject, refusal.evidence, ip).await
        };
        match steps.await {
            Ok(()) => BrokerError::new(ErrorCode::InvalidScope, refusal.description),
            Err(err) => err,
        }
    }

    fn grant_refused(&self, mut e: audit::Entry, reason: &str) -> BrokerError {
        e.decision = Some("deny");
        e.reason = reason.to_string();
        if let Err(err) = self.append(Event::Exchange, e) {
            return err;
        }
        BrokerError::new(ErrorCode::InvalidGrant, reason)
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> BrokerError {
        self.store_failed(e)
    }

    /// A store operation failed: logged, counted, and answered with a 503.
    pub(crate) fn store_failed(&self, e: impl std::fmt::Display) -> BrokerError {
        tracing::error!(error = %e, "store unavailable");
        self.metrics.inc("writ_store_errors_total", &[]);
        BrokerError::unavailable()
    }

    /// Appends to the decision log; a failed append means nothing may be issued.
    pub(crate) fn append(&self, event: Event, e: audit::Entry) -> Result<u64, BrokerError> {
        self.audit.append(event, e).map_err(|err| {
            tracing::error!(error = %err, "decision log append failed");
            BrokerError::unavailable()
        })
    }
}

/// What `refuse_scopes` records and answers.
struct ScopeTrip {
    rule: &'static str,
    policy_version: Option<String>,
    reason: String,
    evidence: serde_json::Value,
    description: String,
}

fn join_list(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
}

/// Whether a verification failure is the broker's infrastructure rather than the token.
pub trait IsUnavailable {
    fn is_unavailable(&self) -> bool;
}

impl IsUnavailable for crate::identity::IdentityError {
    fn is_unavailable(&self) -> bool {
        crate::identity::IdentityError::is_unavailable(self)
    }
}

impl IsUnavailable for crate::token::TokenError {
    fn is_unavailable(&self) -> bool {
        false
    }
}
