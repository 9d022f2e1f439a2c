//! The token exchange use case (RFC 8693, SPEC §4.1), in five steps: authenticate the
//! caller, apply the guards that come before policy, decide every scope, record the task and
//! the decision, then sign. Every refusal takes one path ([`Refusal`]): it is recorded, it
//! reports the trip rule it carries, and it counts as a denial where it should.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Value, json};

use crate::audit::{self, Event};
use crate::binding::Binding;
use crate::broker::Broker;
use crate::domain::{Audience, Scope, Subject, TaskId, TokenId, secs_i64};
use crate::error::{BrokerError, ErrorCode};
use crate::identity::x509::X509Svid;
use crate::identity::{Accept, Source};
use crate::policy::{PolicyAction, PolicyContext, PolicyPrincipal};
use crate::store::{DelegateOutcome, MintOutcome, TaskRecord, TaskState, TokenEntry};
use crate::token::status::StatusClaim;
use crate::token::{Aud, TaskClaims};
use crate::trips::{self, Consequence};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `grant_type` of an OAuth client asking for a task token in its own name (RFC 6749 §4.4).
pub const CLIENT_CREDENTIALS: &str = "client_credentials";
/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Which grant the request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Token exchange (RFC 8693).
    Exchange,
    /// Client credentials (RFC 6749 §4.4) with a client authenticated by `tls_client_auth`
    /// (RFC 8705 §2) or a JWT-SVID client assertion (RFC 7523 §2.2).
    ClientCredentials,
}

/// How the requester proves who it is: the kind of `subject_token`, or for a request with
/// none, what stands in for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectTokenType {
    Jwt,
    IdToken,
    AccessToken,
    /// No token: the X509-SVID the TLS client presented (an exchange without
    /// `subject_token`, or `tls_client_auth`).
    PeerCertificate,
    /// A JWT-SVID `client_assertion` (client credentials).
    ClientAssertion,
}

/// A parsed, well-formed exchange request.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    pub subject_token: secrecy::SecretString,
    pub subject_token_type: SubjectTokenType,
    pub scopes: Vec<Scope>,
    pub audiences: Vec<Audience>,
    pub purpose: String,
    pub task_id: Option<TaskId>,
    pub expires_in: Option<u64>,
    pub source_ip: Option<String>,
    /// Delegation (SPEC §4.4): the sub-agent's own identity token and its type; required
    /// when `subject_token` is a task token (a delegation grant).
    pub actor_token: Option<(secrecy::SecretString, SubjectTokenType)>,
    /// The repeat of a request held for approval (SPEC §4.7).
    pub approval_id: Option<String>,
    /// The request's `DPoP` header, when it had exactly one (SPEC §4.5).
    pub dpop: Option<String>,
    pub flow: Flow,
    /// `client_id` of a client credentials request: when given, the authenticated client.
    pub client_id: Option<String>,
    /// The TLS client's certificate chain, when the request came over mTLS (not yet
    /// verified).
    pub peer: Option<crate::tls::PeerChain>,
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
struct Requester {
    subject: Subject,
    issuer: String,
    source: Source,
    principal: PolicyPrincipal,
    action: PolicyAction,
    depth: u32,
    parent: Option<TaskRecord>,
    act: Option<Value>,
    /// When the request is a delegation: the grant it presents.
    grant: Option<Grant>,
}

impl Requester {
    /// A workload that asks in its own name.
    fn of(id: &crate::identity::VerifiedIdentity) -> Self {
        Requester {
            subject: id.subject.clone(),
            issuer: id.issuer(),
            source: id.source,
            principal: PolicyPrincipal::of_identity(id),
            action: PolicyAction::Exchange,
            depth: 0,
            parent: None,
            act: None,
            grant: None,
        }
    }
}

/// A delegation grant (SPEC §4.4): a task token whose audience names the sub-agent.
struct Grant {
    jti: String,
    scopes: Vec<String>,
    audience: Vec<String>,
    /// The root task's owner: the grant's `sub`.
    on_behalf_of: Subject,
    /// The grant's `exp`: what is delegated from it never outlives it.
    exp: i64,
}

/// What is asked, resolved: the audiences (or the default), the scopes and the TTL wanted,
/// and the key the token is to be bound to.
struct Ask {
    audience: Vec<String>,
    scopes: Vec<String>,
    ttl_secs: u64,
    binding: Binding,
}

/// What policy decided for a request it allows.
struct Decision {
    version: String,
    policies: Vec<String>,
    /// The smallest `@max_ttl` of the permits, in seconds.
    cap_secs: u64,
    /// Permitted scopes whose permits require an approval (SPEC §4.7).
    gated: Vec<String>,
}

/// A request refused: its answer, what the decision log records, and the trip rule it
/// reports or the denial it counts. Built by the constructors below, answered by
/// [`Broker::refuse`].
#[derive(Debug)]
pub(crate) struct Refusal {
    code: ErrorCode,
    description: String,
    reason: String,
    policy_version: Option<String>,
    policies: Vec<String>,
    detail: Option<Value>,
    trip: Option<&'static str>,
    evidence: Value,
    counts_as_denial: bool,
}

impl Refusal {
    /// `invalid_grant`: the task or subject cannot be granted anything now.
    fn grant(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Refusal {
            code: ErrorCode::InvalidGrant,
            description: reason.clone(),
            reason,
            policy_version: None,
            policies: Vec::new(),
            detail: None,
            trip: None,
            evidence: Value::Null,
            counts_as_denial: false,
        }
    }

    /// `invalid_target`: no audience could be resolved.
    fn target(reason: &str) -> Self {
        Refusal {
            code: ErrorCode::InvalidTarget,
            ..Refusal::grant(reason)
        }
    }

    /// A delegation refused by a rule of SPEC §4.4 checked before policy: counted as a
    /// denial of the actor.
    fn delegation(code: ErrorCode, reason: String, evidence: Value) -> Self {
        Refusal {
            code,
            detail: Some(evidence.clone()),
            evidence,
            counts_as_denial: true,
            ..Refusal::grant(reason)
        }
    }

    /// The refusal of a delegated task the store would not record.
    fn delegated(outcome: &DelegateOutcome, limit: u32) -> Option<Self> {
        match outcome {
            DelegateOutcome::Created => None,
            DelegateOutcome::ParentClosed => {
                Some(Refusal::grant("the parent task is no longer open"))
            }
            DelegateOutcome::GrantRevoked => {
                Some(Refusal::grant("the delegation grant has been revoked"))
            }
            DelegateOutcome::OverBudget(root) => Some(Refusal::budget(root, limit)),
        }
    }

    /// `invalid_scope` by a rule on scopes: reported to its trip rule and counted as a
    /// denial.
    fn scope_rule(
        rule: &'static str,
        policy_version: Option<String>,
        reason: String,
        evidence: Value,
        description: &str,
    ) -> Self {
        Refusal {
            code: ErrorCode::InvalidScope,
            description: description.to_string(),
            reason,
            policy_version,
            trip: Some(rule),
            evidence,
            counts_as_denial: true,
            ..Refusal::grant("")
        }
    }

    /// `invalid_scope` by policy: counted as a denial.
    fn policy(
        denied: Vec<String>,
        notes: &[String],
        version: String,
        policies: Vec<String>,
    ) -> Self {
        let list = denied.join(" ");
        let reason = if notes.is_empty() {
            format!("policy denies {list}")
        } else {
            format!("policy denies {list} ({})", notes.join("; "))
        };
        let evidence = json!({"denied_scopes": denied});
        Refusal {
            code: ErrorCode::InvalidScope,
            description: format!("policy does not allow: {list}"),
            reason,
            policy_version: Some(version),
            policies,
            detail: Some(evidence.clone()),
            evidence,
            counts_as_denial: true,
            ..Refusal::grant("")
        }
    }

    /// `invalid_grant` because the task's token budget is spent: reported to its trip rule.
    fn budget(task: &TaskRecord, limit: u32) -> Self {
        let evidence =
            json!({"task_id": task.id, "tokens_issued": task.tokens_issued, "limit": limit});
        Refusal {
            trip: Some(trips::TASK_BUDGET),
            evidence,
            ..Refusal::grant(format!(
                "task token budget of {} is spent",
                limit.min(task.tokens_issued)
            ))
        }
    }

    /// The refusal of a mint the store would not count.
    fn mint(outcome: &MintOutcome, limit: u32) -> Option<Self> {
        match outcome {
            MintOutcome::Minted(_) => None,
            MintOutcome::NotFound => Some(Refusal::grant("unknown task")),
            MintOutcome::NotOwner => Some(Refusal::grant("task is owned by another subject")),
            MintOutcome::Closed(_) => Some(Refusal::grant("task is no longer open")),
            MintOutcome::OverBudget(t) => Some(Refusal::budget(t, limit)),
        }
    }
}

/// Why an exchange stopped: refused (answered through [`Broker::refuse`]) or failed (a
/// broker part failed, already logged and counted).
enum Stop {
    Refused(Box<Refusal>),
    Failed(BrokerError),
    /// Held for approval, or a poll of a held request: answered as it is, not a refusal.
    Answered(BrokerError),
}

impl From<crate::approvals::PollStop> for Stop {
    fn from(p: crate::approvals::PollStop) -> Self {
        match p {
            crate::approvals::PollStop::Answer(e) => Stop::Answered(e),
            crate::approvals::PollStop::Refused(reason) => Refusal::grant(reason).into(),
        }
    }
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refused(Box::new(r))
    }
}

impl From<Box<Refusal>> for Stop {
    fn from(r: Box<Refusal>) -> Self {
        Stop::Refused(r)
    }
}

impl From<BrokerError> for Stop {
    fn from(e: BrokerError) -> Self {
        Stop::Failed(e)
    }
}

impl Broker {
    pub async fn exchange(&self, req: ExchangeRequest) -> Result<TokenResponse, BrokerError> {
        // Standing revocations must be known before anything is decided.
        if !self.revocations.is_fresh() {
            return Err(BrokerError::unavailable());
        }
        let now = self.now();
        let peer = self.peer_svid(&req, now)?;
        let binding = match (&req.dpop, &peer) {
            (Some(_), Some(_)) => {
                return Err(BrokerError::invalid_request(
                    "a token is bound either to a DPoP key or to the TLS client certificate: \
                     send no DPoP header over mTLS",
                ));
            }
            (None, Some((_, svid))) => Binding::Mtls {
                x5t: svid.x5t_s256.clone(),
            },
            _ => self.dpop_binding(req.dpop.as_deref(), now).await?,
        };
        let who = self.authenticate(&req, peer.map(|(id, _)| id), now).await?;
        let ask = Ask {
            binding,
            audience: self.audiences(&req),
            scopes: req.scopes.iter().map(|s| s.as_str().to_string()).collect(),
            ttl_secs: req
                .expires_in
                .unwrap_or(self.limits.default_ttl_secs)
                .max(1),
        };
        let entry = audit::Entry {
            subject: Some(who.subject.to_string()),
            task_id: req.task_id.as_ref().map(|t| t.to_string()),
            scopes_requested: ask.scopes.clone(),
            audience: ask.audience.clone(),
            source_ip: req.source_ip.clone(),
            detail: delegation_detail(&who).or_else(|| client_detail(&req, &who, &ask.binding)),
            ..audit::Entry::default()
        };
        match self.grant(&req, &who, &ask, now, entry.clone()).await {
            Ok(response) => Ok(response),
            Err(Stop::Failed(e) | Stop::Answered(e)) => Err(e),
            Err(Stop::Refused(r)) => Err(self
                .refuse(entry, &who.subject, req.source_ip.as_deref(), r)
                .await),
        }
    }

    /// The requested audiences, or the configured default.
    fn audiences(&self, req: &ExchangeRequest) -> Vec<String> {
        let list = if req.audiences.is_empty() {
            self.limits.default_audience.iter().collect::<Vec<_>>()
        } else {
            req.audiences.iter().collect()
        };
        list.into_iter().map(|a| a.as_str().to_string()).collect()
    }

    /// Guards, policy, record, sign: the steps after authentication.
    async fn grant(
        &self,
        req: &ExchangeRequest,
        who: &Requester,
        ask: &Ask,
        now: i64,
        entry: audit::Entry,
    ) -> Result<TokenResponse, Stop> {
        if ask.audience.is_empty() {
            return Err(Refusal::target(
                "no audience or resource was requested and no default audience is configured",
            )
            .into());
        }
        // An OIDC subject as audience names a sub-agent of a delegation grant: only in a
        // token minted into a task, and only of a configured issuer (SPEC §4.4).
        if req.audiences.iter().any(|a| {
            a.oidc_issuer().is_some_and(|i| {
                req.task_id.is_none() || !self.config.oidc.issuers.iter().any(|c| c.issuer == i)
            })
        }) {
            return Err(Refusal::target(
                "an OIDC subject is an audience only of a delegation grant (with task_id) and \
                 only of a configured issuer",
            )
            .into());
        }
        // What an approval binds is built only for a request that has to do with one.
        let approved = match &req.approval_id {
            Some(id) => Some(self.poll_approval(id, &asked(req, who, ask), now).await?),
            None => None,
        };
        let existing = self.guards(req, who, ask, now).await?;
        let mut decision = self.decide(who, ask, existing.as_ref(), &req.purpose, now)?;
        let approved_task = existing.as_ref().is_some_and(|t| t.approval.is_some());
        if !decision.gated.is_empty() && approved.is_none() && !approved_task {
            let gated = std::mem::take(&mut decision.gated);
            return Err(Stop::Answered(
                self.hold_for_approval(
                    asked(req, who, ask),
                    gated,
                    decision.policies,
                    decision.version,
                    req.source_ip.clone(),
                    now,
                )
                .await,
            ));
        }
        if let Some(a) = &approved
            && !self.claim_approval(a).await?
        {
            return Err(Refusal::grant("this approval has been used").into());
        }
        let deadline = match (&existing, &who.parent) {
            (Some(t), _) => t.deadline,
            (None, parent) => {
                let max = now.saturating_add(secs_i64(self.limits.max_task_duration_secs));
                parent.as_ref().map_or(max, |p| p.deadline.min(max))
            }
        };
        // A delegated task never outlives the grant it was delegated from, nor its parent:
        // a grant for 30 s is not traded for a token of 300 s (SPEC §4.4).
        let deadline = match &who.grant {
            Some(g) if existing.is_none() => deadline.min(g.exp),
            _ => deadline,
        };
        // TTL = min(request, policy cap, tokens.max_ttl, task deadline).
        let ttl = ask
            .ttl_secs
            .min(decision.cap_secs)
            .min(self.limits.max_ttl_secs)
            .min(u64::try_from(deadline.saturating_sub(now)).unwrap_or(0));
        if ttl == 0 {
            return Err(Refusal::grant("task deadline has passed").into());
        }
        let token = TokenEntry {
            jti: TokenId::generate().map_err(|e| self.fail(e))?.to_string(),
            exp: now.saturating_add(secs_i64(ttl)),
        };
        // Before the token is counted into its task: a task ended from now on finds the
        // token's status slot and sets its bit.
        let status = self
            .status
            .allocate(&token.jti, token.exp, now)
            .await
            .map_err(|e| self.fail(e))?;
        let task = match existing {
            Some(task) => {
                let outcome = self
                    .mint_into_task(&task.id, &who.subject, &token, now)
                    .await?;
                if let Some(refusal) = Refusal::mint(&outcome, self.limits.max_tokens) {
                    return Err(refusal.into());
                }
                task
            }
            None => match &who.parent {
                Some(parent) => {
                    let id = TaskId::generate_child(&parent.id).map_err(|e| self.fail(e))?;
                    let mut task =
                        self.new_task(id, req, who, ask, &decision.version, deadline, now);
                    task.approval = approved.map(|a| a.id);
                    let outcome = self.open_delegated_task(&task, &token, now).await?;
                    if let Some(refusal) = Refusal::delegated(&outcome, self.limits.max_tokens) {
                        return Err(refusal.into());
                    }
                    task
                }
                None => {
                    let id = TaskId::generate().map_err(|e| self.fail(e))?;
                    let mut task =
                        self.new_task(id, req, who, ask, &decision.version, deadline, now);
                    task.approval = approved.map(|a| a.id);
                    self.open_task(&task, &token).await?;
                    task
                }
            },
        };
        let seq = self.record_grant(entry, who, ask, &task, &token, ttl, decision)?;
        // Signed while the record is on its way to disk, but durable before issued (SPEC §6):
        // the token leaves only once its record is synced; concurrent exchanges share one
        // fsync. A token whose record never became durable is dropped unsent.
        let durable = self.audit.start_commit(seq);
        let response = self.issue(who, ask, &task, &token, ttl, now, status)?;
        durable.wait().await.map_err(|e| self.fail(e))?;
        Ok(response)
    }

    /// The TLS client's certificate verified as an X509-SVID, when the request came over
    /// mTLS. A certificate that is not one refuses the request: it is never ignored, since
    /// the token would otherwise be bound to nothing the client meant.
    fn peer_svid(
        &self,
        req: &ExchangeRequest,
        now: i64,
    ) -> Result<Option<(crate::identity::VerifiedIdentity, X509Svid)>, BrokerError> {
        let Some(chain) = &req.peer else {
            return Ok(None);
        };
        match self.identity.verify_x509(chain.certs(), now) {
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(self.certificate_refused(chain, &e, req)),
        }
    }

    /// A client certificate that is not an X509-SVID of a configured trust domain: recorded
    /// with its thumbprint and reason, answered `invalid_client` (401) where it
    /// authenticates a client, `invalid_request` where it stands for the subject.
    fn certificate_refused(
        &self,
        chain: &crate::tls::PeerChain,
        e: &crate::identity::x509::X509SvidError,
        req: &ExchangeRequest,
    ) -> BrokerError {
        if e.is_unavailable() {
            return self.fail(e.clone());
        }
        tracing::info!(reason = %e, "client certificate refused");
        let x5t = chain
            .certs()
            .first()
            .map(|c| crate::identity::x509::x5t_s256(c));
        let entry = audit::Entry {
            decision: Some("deny"),
            reason: format!("client certificate refused: {e}"),
            source_ip: req.source_ip.clone(),
            detail: Some(json!({"client_certificate_x5t#S256": x5t})),
            ..audit::Entry::default()
        };
        if let Err(err) = self.audit.append_unauthenticated(Event::Exchange, entry) {
            return self.fail(err);
        }
        let description = "the TLS client certificate is not a valid X509-SVID of a trusted \
                           trust domain";
        match req.flow {
            Flow::ClientCredentials => BrokerError::client_auth_failed(description),
            Flow::Exchange => BrokerError::invalid_request(description),
        }
    }

    /// Who is asking: a workload identity, or the holder of one of our task tokens.
    async fn authenticate(
        &self,
        req: &ExchangeRequest,
        peer: Option<crate::identity::VerifiedIdentity>,
        now: i64,
    ) -> Result<Requester, BrokerError> {
        use secrecy::ExposeSecret;
        let token = req.subject_token.expose_secret();
        let accept = match req.subject_token_type {
            SubjectTokenType::Jwt => Accept::AnyIdentity,
            SubjectTokenType::IdToken => Accept::IdTokenOnly,
            SubjectTokenType::AccessToken => return self.delegator(req, token, now).await,
            SubjectTokenType::PeerCertificate => {
                let id = peer.ok_or_else(|| match req.flow {
                    Flow::Exchange => BrokerError::invalid_request(
                        "`subject_token` is required (or an X509-SVID as TLS client certificate)",
                    ),
                    Flow::ClientCredentials => BrokerError::client_auth_failed(
                        "client authentication is required: an X509-SVID as TLS client \
                         certificate (tls_client_auth) or a JWT-SVID client_assertion",
                    ),
                })?;
                self.check_client_id(req, &id)?;
                return Ok(Requester::of(&id));
            }
            SubjectTokenType::ClientAssertion => {
                let id = self
                    .identity
                    .verify_client_assertion(token, &self.token_endpoint(), now)
                    .map_err(|e| self.client_assertion_refused(token, e, req))?;
                self.check_client_id(req, &id)?;
                return Ok(Requester::of(&id));
            }
        };
        let id = self
            .identity
            .verify(token, accept, now)
            .await
            .map_err(|e| self.subject_token_refused(token, e, req.source_ip.as_deref()))?;
        Ok(Requester::of(&id))
    }

    /// A client credentials request's `client_id`, when given, names the authenticated
    /// client (RFC 8705 §2, RFC 7523 §3).
    fn check_client_id(
        &self,
        req: &ExchangeRequest,
        id: &crate::identity::VerifiedIdentity,
    ) -> Result<(), BrokerError> {
        match &req.client_id {
            Some(c) if c != id.subject.as_str() => {
                tracing::info!(client_id = %c, subject = %id.subject, "client_id is not the authenticated client");
                let entry = audit::Entry {
                    decision: Some("deny"),
                    subject: Some(id.subject.to_string()),
                    reason: "client_id is not the authenticated client".into(),
                    source_ip: req.source_ip.clone(),
                    detail: Some(json!({"client_id": c, "source": id.source.as_str()})),
                    ..audit::Entry::default()
                };
                if let Err(err) = self.audit.append_unauthenticated(Event::Exchange, entry) {
                    return Err(self.fail(err));
                }
                Err(BrokerError::client_auth_failed(
                    "client_id is not the client that authenticated",
                ))
            }
            _ => Ok(()),
        }
    }

    /// A client assertion that did not verify: recorded by its hash and answered
    /// `invalid_client` (401).
    fn client_assertion_refused(
        &self,
        token: &str,
        e: crate::identity::IdentityError,
        req: &ExchangeRequest,
    ) -> BrokerError {
        tracing::info!(reason = %e, "client assertion refused");
        let entry = audit::Entry {
            decision: Some("deny"),
            reason: format!("client assertion refused: {e}"),
            source_ip: req.source_ip.clone(),
            detail: Some(
                json!({"client_assertion_sha256": crate::domain::sha256_hex(token.as_bytes())}),
            ),
            ..audit::Entry::default()
        };
        if let Err(err) = self.audit.append_unauthenticated(Event::Exchange, entry) {
            return self.fail(err);
        }
        BrokerError::client_auth_failed("client_assertion is not a valid JWT-SVID for this broker")
    }

    /// A sub-agent exchanging a delegation grant (SPEC §4.4): the grant is a task token,
    /// the sub-agent proves who it is with its own identity token as `actor_token`. The
    /// actor is the requester: it owns the child task, policy decides for it, and its refusals
    /// count against it.
    async fn delegator(
        &self,
        req: &ExchangeRequest,
        token: &str,
        now: i64,
    ) -> Result<Requester, BrokerError> {
        use secrecy::ExposeSecret;
        let claims = self
            .tokens
            .verify(token, now)
            .map_err(|e| self.subject_token_refused(token, e, req.source_ip.as_deref()))?;
        if self.revocations.revoked_reason(&claims, now).is_some() {
            // RFC 8693 §2.2.2: an unacceptable subject_token is `invalid_request`.
            return Err(BrokerError::invalid_request(
                "the subject token has been revoked",
            ));
        }
        let parent_id = TaskId::parse(&claims.txn)
            .ok_or_else(|| BrokerError::invalid_request("subject_token is not valid"))?;
        if req.task_id.is_some() {
            return Err(BrokerError::invalid_request(
                "task_id cannot be combined with a task token as subject_token",
            ));
        }
        let Some((actor_token, actor_type)) = &req.actor_token else {
            return Err(BrokerError::invalid_request(
                "a task token as subject_token is a delegation grant: actor_token is required",
            ));
        };
        let accept = match actor_type {
            SubjectTokenType::Jwt => Accept::AnyIdentity,
            SubjectTokenType::IdToken => Accept::IdTokenOnly,
            SubjectTokenType::AccessToken
            | SubjectTokenType::PeerCertificate
            | SubjectTokenType::ClientAssertion => {
                return Err(BrokerError::invalid_request(
                    "actor_token_type must be the jwt or id_token type",
                ));
            }
        };
        let actor_token = actor_token.expose_secret();
        let actor = self
            .identity
            .verify(actor_token, accept, now)
            .await
            .map_err(|e| self.actor_token_refused(actor_token, e, req.source_ip.as_deref()))?;
        let parent = self
            .get_task(&parent_id)
            .await?
            .filter(|t| t.is_open_at(now))
            .ok_or_else(|| {
                BrokerError::invalid_request("the subject token's task is no longer open")
            })?;
        // RFC 8693 §4.1: the current actor outermost, the earlier chain nested inside.
        let mut act = serde_json::Map::new();
        act.insert("sub".into(), Value::String(actor.subject.to_string()));
        if let Some(prev) = claims.act {
            act.insert("act".into(), prev);
        }
        Ok(Requester {
            principal: PolicyPrincipal::of_identity(&actor),
            issuer: actor.issuer(),
            subject: actor.subject.clone(),
            source: Source::TaskToken,
            action: PolicyAction::Delegate,
            depth: parent.depth.saturating_add(1),
            parent: Some(parent),
            act: Some(Value::Object(act)),
            grant: Some(Grant {
                jti: claims.jti,
                scopes: claims
                    .scope
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                audience: claims.aud.to_vec(),
                on_behalf_of: Subject::from_trusted(claims.sub),
                exp: claims.exp,
            }),
        })
    }

    /// The rules of SPEC §4.4, before policy: the actor is an audience of the grant, the
    /// chain is not too deep, the scopes are within the grant's and the audiences within the
    /// parent task's.
    fn attenuation(&self, who: &Requester, ask: &Ask) -> Result<(), Box<Refusal>> {
        let (Some(parent), Some(grant)) = (&who.parent, &who.grant) else {
            return Ok(());
        };
        let base = json!({"parent_task": parent.id, "grant_jti": grant.jti});
        let with = |extra: Value| {
            let mut v = base.clone();
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            v
        };
        if !grant.audience.iter().any(|a| a == who.subject.as_str()) {
            return Err(Box::new(Refusal::delegation(
                ErrorCode::InvalidGrant,
                "the actor is not an audience of the delegation grant".into(),
                with(json!({"grant_audience": grant.audience})),
            )));
        }
        let max = self.limits.max_delegation_depth;
        if who.depth > max {
            return Err(Box::new(Refusal::delegation(
                ErrorCode::InvalidGrant,
                format!(
                    "delegation depth {} exceeds the maximum of {max}",
                    who.depth
                ),
                with(json!({"depth": who.depth, "max_delegation_depth": max})),
            )));
        }
        let outside = outside_of(&ask.scopes, &grant.scopes);
        if !outside.is_empty() {
            return Err(Box::new(Refusal::scope_rule(
                trips::ESCALATION,
                Some(parent.policy_version.clone()),
                format!(
                    "delegation escalation: {} not in the grant's scope",
                    outside.join(" ")
                ),
                with(json!({"grant_scope": grant.scopes, "outside": outside})),
                "a delegated task may not exceed the scope of its grant",
            )));
        }
        let outside = outside_of(&ask.audience, &parent.audience);
        if !outside.is_empty() {
            return Err(Box::new(Refusal::delegation(
                ErrorCode::InvalidTarget,
                format!(
                    "delegation to {} outside the parent task's audiences",
                    outside.join(" ")
                ),
                with(json!({"parent_audience": parent.audience, "outside": outside})),
            )));
        }
        Ok(())
    }

    /// The checks before policy: standing blocks, the exchange rate, the scope count, and
    /// that a delegated or minted-into task never exceeds what it was first granted. Returns
    /// the task to mint into, when the request names one.
    async fn guards(
        &self,
        req: &ExchangeRequest,
        who: &Requester,
        ask: &Ask,
        now: i64,
    ) -> Result<Option<TaskRecord>, Stop> {
        if let Some(block) = self.revocations.blocking(who.subject.as_str(), now) {
            return Err(Refusal::grant(format!("subject is {}", block.refusal())).into());
        }
        self.count_exchange(&who.subject, req.source_ip.as_deref())
            .await?;
        if req.task_id.is_none()
            && let Some(max) = self
                .config
                .trips
                .as_ref()
                .and_then(|t| t.max_scopes_per_task)
            && ask.scopes.len() > usize::try_from(max).unwrap_or(usize::MAX)
        {
            return Err(Refusal::scope_rule(
                trips::MAX_SCOPES,
                None,
                format!(
                    "{} scopes requested; a task may hold at most {max}",
                    ask.scopes.len()
                ),
                json!({"scopes": ask.scopes, "limit": max}),
                &format!("a task may hold at most {max} distinct scopes"),
            )
            .into());
        }
        self.attenuation(who, ask)?;
        if let Some(parent) = &who.parent {
            let outside = outside_of(&ask.scopes, &parent.scopes);
            if !outside.is_empty() {
                return Err(Refusal::scope_rule(
                    trips::ESCALATION,
                    Some(parent.policy_version.clone()),
                    format!(
                        "delegation escalation: {} not granted to the parent task",
                        outside.join(" ")
                    ),
                    json!({"parent_task": parent.id, "outside": outside}),
                    "a delegated task may not exceed its parent's scopes",
                )
                .into());
            }
        }
        match &req.task_id {
            Some(id) => Ok(Some(self.task_to_mint_into(id, who, ask, now).await?)),
            None => Ok(None),
        }
    }

    /// An existing task: ownership, state and budget are checked again atomically when the
    /// token is counted; this early look refuses escalation before policy runs.
    async fn task_to_mint_into(
        &self,
        id: &TaskId,
        who: &Requester,
        ask: &Ask,
        now: i64,
    ) -> Result<TaskRecord, Stop> {
        let Some(task) = self.get_task(id).await? else {
            return Err(Refusal::grant("unknown task").into());
        };
        if task.owner != who.subject {
            return Err(Refusal::grant("task is owned by another subject").into());
        }
        if !task.is_open_at(now) {
            return Err(Refusal::grant("task is no longer open").into());
        }
        if let Some(jkt) = &task.jkt
            && ask.binding.jkt() != Some(jkt.as_str())
        {
            return Err(Refusal::grant(
                "the task's tokens are bound to a DPoP key: a token minted into it needs a \
                 proof of that key",
            )
            .into());
        }
        if let Some(x5t) = &task.x5t
            && ask.binding.x5t() != Some(x5t.as_str())
        {
            return Err(Refusal::grant(
                "the task's tokens are bound to a TLS client certificate: a token minted into \
                 it must be asked for over mTLS with that certificate",
            )
            .into());
        }
        let outside = outside_of(&ask.scopes, &task.scopes);
        if !outside.is_empty() {
            return Err(Refusal::scope_rule(
                trips::ESCALATION,
                Some(self.policy.current().version().to_string()),
                format!(
                    "escalation: {} outside the task's first grant",
                    outside.join(" ")
                ),
                json!({"task_id": task.id, "granted": task.scopes, "outside": outside}),
                "requested scope is outside what the task was granted",
            )
            .into());
        }
        Ok(task)
    }

    /// Policy: one decision per scope; any denial refuses the whole request.
    fn decide(
        &self,
        who: &Requester,
        ask: &Ask,
        existing: Option<&TaskRecord>,
        purpose: &str,
        now: i64,
    ) -> Result<Decision, Box<Refusal>> {
        let policies = self.policy.current();
        // A token minted into a delegated task is decided as the delegation it continues.
        let (action, depth, on_behalf_of, parent_task) = match existing {
            Some(t) if t.depth > 0 => (
                PolicyAction::Delegate,
                t.depth,
                t.on_behalf_of.as_ref().map(ToString::to_string),
                t.parent.as_ref().map(ToString::to_string),
            ),
            _ => (
                who.action,
                who.depth,
                who.grant.as_ref().map(|g| g.on_behalf_of.to_string()),
                who.parent.as_ref().map(|p| p.id.to_string()),
            ),
        };
        let ctx = PolicyContext {
            audience: ask.audience.clone(),
            purpose: existing.map_or_else(|| purpose.to_string(), |t| t.purpose.clone()),
            ttl: ask.ttl_secs,
            source: who.source.as_str().to_string(),
            depth,
            now,
            on_behalf_of: on_behalf_of.unwrap_or_default(),
            parent_task: parent_task.unwrap_or_default(),
            binding: ask.binding.name().to_string(),
        };
        let mut determining = BTreeSet::new();
        let mut gated = Vec::new();
        let approvals_on = self.config.approvals.is_some();
        let mut cap_secs = u64::MAX;
        let mut denied = Vec::new();
        let mut notes = Vec::new();
        for d in policies.decide_all(&who.principal, action, &ask.scopes, &ctx) {
            if !d.errors.is_empty() {
                notes.push(format!("{}: evaluation error", d.scope));
                tracing::warn!(scope = %d.scope, errors = ?d.errors, "policy evaluation error counted as deny");
            }
            if d.allowed && d.approval_required && !approvals_on {
                notes.push(format!("{}: approval required", d.scope));
                denied.push(d.scope);
            } else if d.allowed {
                if d.approval_required {
                    gated.push(d.scope.clone());
                }
                if let Some(c) = d.max_ttl {
                    cap_secs = cap_secs.min(c.as_secs());
                }
            } else {
                denied.push(d.scope);
            }
            determining.extend(d.policies);
        }
        let version = policies.version().to_string();
        let policies = determining.into_iter().collect();
        if !denied.is_empty() {
            return Err(Box::new(Refusal::policy(denied, &notes, version, policies)));
        }
        Ok(Decision {
            version,
            policies,
            cap_secs,
            gated,
        })
    }

    /// The record of a task opened by this exchange.
    #[expect(
        clippy::too_many_arguments,
        reason = "a task record is made of each part of the request and decision"
    )]
    fn new_task(
        &self,
        id: TaskId,
        req: &ExchangeRequest,
        who: &Requester,
        ask: &Ask,
        version: &str,
        deadline: i64,
        now: i64,
    ) -> TaskRecord {
        TaskRecord {
            id,
            owner: who.subject.clone(),
            issuer: who.issuer.clone(),
            purpose: req.purpose.clone(),
            created_at: now,
            deadline,
            state: TaskState::Open,
            ended_at: None,
            end_reason: None,
            policy_version: version.to_string(),
            scopes: ask.scopes.clone(),
            audience: ask.audience.clone(),
            tokens_issued: 1,
            parent: who.parent.as_ref().map(|p| p.id.clone()),
            depth: who.depth,
            source: who.source.as_str().to_string(),
            claims: who.principal.recorded_claims(),
            grant: who.grant.as_ref().map(|g| g.jti.clone()),
            on_behalf_of: who.grant.as_ref().map(|g| g.on_behalf_of.clone()),
            act: who.act.clone(),
            approval: None,
            jkt: ask.binding.jkt().map(str::to_string),
            x5t: ask.binding.x5t().map(str::to_string),
        }
    }

    /// The allow record, appended before anything is signed.
    #[expect(
        clippy::too_many_arguments,
        reason = "the record names each part of the grant"
    )]
    fn record_grant(
        &self,
        mut e: audit::Entry,
        who: &Requester,
        ask: &Ask,
        task: &TaskRecord,
        token: &TokenEntry,
        ttl: u64,
        decision: Decision,
    ) -> Result<u64, BrokerError> {
        e.decision = Some("allow");
        e.task_id = Some(task.id.to_string());
        e.jti = Some(token.jti.clone());
        e.scopes_granted = ask.scopes.clone();
        e.ttl = Some(ttl);
        e.policy_version = Some(decision.version);
        e.policies = decision.policies;
        e.reason = if who.parent.is_some() {
            "delegation permitted".into()
        } else {
            "permitted".into()
        };
        self.record(Event::Exchange, e)
    }

    /// Signs the token and builds the answer.
    #[expect(
        clippy::too_many_arguments,
        reason = "a token is made of each part of the grant"
    )]
    fn issue(
        &self,
        who: &Requester,
        ask: &Ask,
        task: &TaskRecord,
        token: &TokenEntry,
        ttl: u64,
        now: i64,
        status: StatusClaim,
    ) -> Result<TokenResponse, BrokerError> {
        let scope = ask.scopes.join(" ");
        // A delegated task's tokens speak for the root's owner, by the actor (SPEC §4.4).
        let sub = task.on_behalf_of.as_ref().unwrap_or(&who.subject);
        let claims = TaskClaims {
            iss: self.tokens.issuer().to_string(),
            sub: sub.to_string(),
            client_id: who.subject.to_string(),
            aud: Aud::from_list(ask.audience.clone()),
            scope: scope.clone(),
            txn: task.id.to_string(),
            jti: token.jti.clone(),
            iat: now,
            nbf: now,
            exp: token.exp,
            cnf: ask.binding.cnf(),
            act: task.act.clone(),
            status: Some(status),
        };
        let access_token = self.tokens.sign(&claims).map_err(|e| self.fail(e))?;
        Ok(TokenResponse {
            access_token,
            issued_token_type: TYPE_ACCESS_TOKEN,
            token_type: ask.binding.token_type(),
            expires_in: ttl,
            scope,
            task_id: task.id.to_string(),
        })
    }

    /// A subject token that did not verify: recorded (by its hash, never the token) and
    /// answered with `invalid_request`, or 503 when the broker's own sources failed.
    fn subject_token_refused(
        &self,
        token: &str,
        e: impl Into<SubjectTokenError>,
        ip: Option<&str>,
    ) -> BrokerError {
        let e = e.into();
        // An issuer that could not be reached is the broker's problem, not the caller's: it
        // is logged once, as a failure (below), not as a refusal.
        if !matches!(&e, SubjectTokenError::Identity(i) if i.is_unavailable()) {
            tracing::info!(reason = %e, "subject token refused");
        }
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
            return self.fail(err);
        }
        match e {
            SubjectTokenError::Identity(e) if e.is_unavailable() => self.fail(e),
            _ => BrokerError::invalid_request("subject_token is not valid"),
        }
    }

    /// An actor token that did not verify: recorded like a subject token that did not.
    fn actor_token_refused(
        &self,
        token: &str,
        e: crate::identity::IdentityError,
        ip: Option<&str>,
    ) -> BrokerError {
        if e.is_unavailable() {
            return self.subject_token_refused(token, e, ip);
        }
        tracing::info!(reason = %e, "actor token refused");
        let entry = audit::Entry {
            decision: Some("deny"),
            reason: format!("actor token refused: {e}"),
            source_ip: ip.map(str::to_string),
            detail: Some(
                json!({"actor_token_sha256": crate::domain::sha256_hex(token.as_bytes())}),
            ),
            ..audit::Entry::default()
        };
        if let Err(err) = self.audit.append_unauthenticated(Event::Exchange, entry) {
            return self.fail(err);
        }
        BrokerError::invalid_request("actor_token is not valid")
    }

    /// The one path of every refusal: recorded as a deny, reported to its trip rule, counted
    /// as a denial where it counts, and answered with its code (or with whatever failed
    /// first on the way).
    pub(crate) async fn refuse(
        &self,
        mut e: audit::Entry,
        subject: &Subject,
        ip: Option<&str>,
        r: Box<Refusal>,
    ) -> BrokerError {
        let r = *r;
        e.decision = Some("deny");
        e.reason = r.reason;
        e.policy_version = r.policy_version;
        e.policies = r.policies;
        e.detail = match (e.detail.take(), r.detail) {
            (Some(Value::Object(mut base)), Some(Value::Object(more))) => {
                base.extend(more);
                Some(Value::Object(base))
            }
            (base, more) => more.or(base),
        };
        let steps = async {
            self.record(Event::Exchange, e)?;
            if let Some(rule) = r.trip {
                self.trip(
                    rule,
                    Some(subject),
                    r.evidence.clone(),
                    Consequence::Record,
                    ip,
                )
                .await?;
            }
            if r.counts_as_denial {
                self.count_denial(subject, r.evidence, ip).await?;
            }
            Ok::<(), BrokerError>(())
        };
        match steps.await {
            Ok(()) => BrokerError::new(r.code, r.description),
            Err(err) => err,
        }
    }
}

/// Why a subject token did not verify.
#[derive(Debug, thiserror::Error)]
enum SubjectTokenError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
}

/// What the decision log records of how a client credentials or mTLS requester
/// authenticated: the grant, the client authentication method, the identity's source and
/// the certificate the token is bound to.
fn client_detail(req: &ExchangeRequest, who: &Requester, binding: &Binding) -> Option<Value> {
    if req.flow == Flow::Exchange && req.peer.is_none() {
        return None;
    }
    let client_auth = match (req.flow, req.subject_token_type) {
        (Flow::ClientCredentials, SubjectTokenType::PeerCertificate) => Some("tls_client_auth"),
        (Flow::ClientCredentials, _) => Some("private_key_jwt"),
        (Flow::Exchange, _) => None,
    };
    let grant_type = match req.flow {
        Flow::Exchange => GRANT_TYPE,
        Flow::ClientCredentials => CLIENT_CREDENTIALS,
    };
    Some(json!({
        "grant_type": grant_type,
        "client_auth": client_auth,
        "source": who.source.as_str(),
        "x5t#S256": binding.x5t(),
    }))
}

/// What the decision log records of a delegation: the actor, for whom it acts, the whole
/// actor chain, the parent task and the grant.
fn delegation_detail(who: &Requester) -> Option<Value> {
    let grant = who.grant.as_ref()?;
    Some(json!({
        "actor": who.subject.as_str(),
        "on_behalf_of": grant.on_behalf_of.as_str(),
        "act": who.act,
        "parent_task": who.parent.as_ref().map(|p| p.id.as_str()),
        "grant_jti": grant.jti,
        "depth": who.depth,
    }))
}

/// What the request asks, as an approval binds it. The actor is the current actor of the
/// chain a delegated request carries (`act.sub`).
fn asked(req: &ExchangeRequest, who: &Requester, ask: &Ask) -> crate::approvals::Asked {
    crate::approvals::Asked {
        subject: who.subject.to_string(),
        actor: who
            .act
            .as_ref()
            .and_then(|a| a.get("sub"))
            .and_then(Value::as_str)
            .map(str::to_string),
        act: who.act.clone(),
        scopes: ask.scopes.clone(),
        audience: ask.audience.clone(),
        purpose: req.purpose.clone(),
        ttl: ask.ttl_secs,
        task_id: req.task_id.as_ref().map(|t| t.to_string()),
    }
}

/// The scopes of `asked` that `granted` lacks.
fn outside_of(asked: &[String], granted: &[String]) -> Vec<String> {
    asked
        .iter()
        .filter(|s| !granted.contains(s))
        .cloned()
        .collect()
}
