//! Cedar policy: load a directory, validate it against the Writ schema, version it, decide one
//! scope at a time, and reload it atomically.

mod cases;
mod principal;

pub use cases::{CaseReport, run_cases};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicyId, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::{Map, Value};

/// The Writ schema, embedded so that a broker never runs with a different one.
pub const SCHEMA_SRC: &str = include_str!("../../config/schema.cedarschema");

/// Largest policy file read.
const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;

/// OIDC claims exposed to policy (the `Claims` record of the schema).
const CLAIM_NAMES: [&str; 12] = [
    "repository",
    "repository_owner",
    "ref",
    "ref_type",
    "environment",
    "workflow",
    "job_workflow_ref",
    "event_name",
    "actor",
    "email",
    "azp",
    "namespace",
];

/// One error a line, indented under the headline.
fn list(errors: &[PolicyError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy directory `{dir}`: {reason}")]
    ReadDir { dir: String, reason: String },
    #[error("cannot read policy file `{file}`: {reason}")]
    ReadFile { file: String, reason: String },
    #[error("policy directory `{0}` holds no `*.cedar` file")]
    Empty(String),
    #[error("policy file `{file}` does not parse: {reason}")]
    Parse { file: String, reason: String },
    #[error("policy file `{file}` holds a template; templates are not supported")]
    Template { file: String },
    #[error("policy id `{id}` is used twice (`{first}` and `{second}`)")]
    DuplicateId {
        id: String,
        first: String,
        second: String,
    },
    #[error("policy `{id}` in `{file}`: {reason}")]
    Annotation {
        id: String,
        file: String,
        reason: String,
    },
    #[error("policies do not validate against the Writ schema: {0}")]
    Invalid(String),
    #[error("the policy set has {} errors:{}", .0.len(), list(.0))]
    Several(Vec<PolicyError>),
    #[error("the Writ schema does not load: {0}")]
    Schema(String),
    #[error(
        "the new policy set has {new} policies where {old} are in force: more than policy.max_drop_share = {limit} of them dropped at once (policy.allow_empty = true accepts it)"
    )]
    Shrunk { old: usize, new: usize, limit: f64 },
    #[error("cannot read policy test cases `{file}`: {reason}")]
    Cases { file: String, reason: String },
    #[error("policy test cases `{file}` are not valid:{}", problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    InvalidCases { file: String, problems: Vec<String> },
}

/// Why a request could not be put to Cedar (counted as a deny of every scope).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("principal claims do not form a record")]
    Claims(#[source] Box<cedar_policy::ExpressionConstructionError>),
    #[error("principal entity is not valid")]
    Principal(#[source] Box<cedar_policy::EntityAttrEvaluationError>),
    #[error("principal entities are not valid")]
    Entities(#[source] Box<cedar_policy::entities_errors::EntitiesError>),
    #[error("request context is not valid")]
    Context(#[source] Box<cedar_policy::ContextCreationError>),
}

/// What kind of workload the principal is, with the attributes policies may test.
#[derive(Debug, Clone)]
pub enum PrincipalKind {
    Spiffe {
        trust_domain: String,
        path: String,
        spiffe_id: String,
    },
    Oidc {
        issuer: String,
        sub: String,
        claims: Map<String, Value>,
    },
}

#[derive(Debug, Clone)]
pub struct PolicyPrincipal {
    pub subject: String,
    pub kind: PrincipalKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyAction {
    Exchange,
    Delegate,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyContext {
    pub audience: Vec<String>,
    pub purpose: String,
    pub ttl: u64,
    pub source: String,
    pub depth: u32,
    pub now: i64,
    /// Delegation: the root task's owner the actor acts for ("" otherwise).
    pub on_behalf_of: String,
    /// Delegation: the id of the parent task ("" otherwise).
    pub parent_task: String,
    /// How the token is bound to its holder: `dpop`, `mtls` or `none` (SPEC §4.5).
    pub binding: String,
}

/// The decision for one scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeDecision {
    pub scope: String,
    pub allowed: bool,
    /// The policies that determined the decision (the satisfied permits for an allow, the
    /// satisfied forbids for a deny; empty for a default deny).
    pub policies: Vec<String>,
    /// The smallest `@max_ttl` of the determining permits.
    pub max_ttl: Option<Duration>,
    /// A determining permit carries `@approval("required")`.
    pub approval_required: bool,
    /// Evaluation errors: any makes the decision a deny.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Annotations {
    max_ttl: Option<Duration>,
    approval: bool,
}

/// A loaded, validated, versioned policy set.
pub struct PolicySet {
    set: cedar_policy::PolicySet,
    version: String,
    annotations: HashMap<String, Annotations>,
    authorizer: Authorizer,
    names: Names,
    files: Vec<(String, String)>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("policies", &self.annotations.len())
            .finish_non_exhaustive()
    }
}

/// Entity type names, parsed once.
struct Names {
    workload: EntityTypeName,
    trust_domain: EntityTypeName,
    issuer: EntityTypeName,
    scope: EntityTypeName,
    exchange: EntityUid,
    delegate: EntityUid,
}

impl Names {
    fn new() -> Result<Self, PolicyError> {
        let t =
            |s: &str| EntityTypeName::from_str(s).map_err(|e| PolicyError::Schema(e.to_string()));
        let action = t("Writ::Action")?;
        Ok(Names {
            workload: t("Writ::Workload")?,
            trust_domain: t("Writ::TrustDomain")?,
            issuer: t("Writ::Issuer")?,
            scope: t("Writ::Scope")?,
            exchange: EntityUid::from_type_name_and_id(action.clone(), EntityId::new("exchange")),
            delegate: EntityUid::from_type_name_and_id(action, EntityId::new("delegate")),
        })
    }
}

fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA_SRC)
        .map(|(s, _)| s)
        .map_err(|e| PolicyError::Schema(e.to_string()))
}

/// SHA-256 over the files sorted by name, each as `name\n` + contents + `\n`.
fn version_of(files: &[(String, String)]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, text) in files {
        ctx.update(name.as_bytes());
        ctx.update(b"\n");
        ctx.update(text.as_bytes());
        ctx.update(b"\n");
    }
    hex::encode(ctx.finish())
}

fn stem(name: &str) -> &str {
    name.strip_suffix(".cedar").unwrap_or(name)
}

/// Reads every `*.cedar` file of a directory, sorted by name.
fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, PolicyError> {
    let shown = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::ReadDir {
        dir: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PolicyError::ReadDir {
            dir: shown.clone(),
            reason: e.to_string(),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".cedar") || name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let rerr = |reason: String| PolicyError::ReadFile {
            file: path.display().to_string(),
            reason,
        };
        let md = std::fs::metadata(&path).map_err(|e| rerr(e.to_string()))?;
        if !md.is_file() {
            continue;
        }
        if md.len() > MAX_POLICY_FILE_BYTES {
            return Err(rerr(format!("larger than {MAX_POLICY_FILE_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| rerr(e.to_string()))?;
        files.push((name, text));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if files.is_empty() {
        return Err(PolicyError::Empty(shown));
    }
    Ok(files)
}

impl PolicySet {
    /// Reads `*.cedar` from `dir` and validates the set strictly against the Writ schema.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        Self::from_sources(&read_dir(dir)?)
    }

    /// Builds a set from `(file name, contents)` pairs. Every error of every file is
    /// reported, not just the first: a set that does not load fails with all of them.
    pub fn from_sources(files: &[(String, String)]) -> Result<PolicySet, PolicyError> {
        let mut files = files.to_vec();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let schema = schema()?;
        let mut set = cedar_policy::PolicySet::new();
        let mut annotations = HashMap::new();
        let mut origin: HashMap<String, String> = HashMap::new();
        let mut errors = Vec::new();
        for (name, text) in &files {
            let parsed = match cedar_policy::PolicySet::from_str(text) {
                Ok(parsed) => parsed,
                Err(e) => {
                    errors.push(PolicyError::Parse {
                        file: name.clone(),
                        reason: render_errors(&e, text),
                    });
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                errors.push(PolicyError::Template { file: name.clone() });
                continue;
            }
            for (id, policy) in numbered(&parsed, name) {
                if let Some(first) = origin.insert(id.clone(), name.clone()) {
                    errors.push(PolicyError::DuplicateId {
                        id,
                        first,
                        second: name.clone(),
                    });
                    continue;
                }
                match annotations_of(policy, &id, name) {
                    Ok(ann) => {
                        annotations.insert(id.clone(), ann);
                    }
                    Err(e) => errors.push(e),
                }
                if let Err(e) = set.add(policy.new_id(PolicyId::new(&id))) {
                    errors.push(PolicyError::Parse {
                        file: name.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
        for e in result.validation_errors() {
            let id = e.policy_id().to_string();
            let file = origin.get(&id).cloned().unwrap_or_default();
            let text = files
                .iter()
                .find(|(n, _)| *n == file)
                .map_or("", |(_, t)| t.as_str());
            errors.push(PolicyError::Invalid(format!(
                "`{file}` policy `{id}`: {}",
                describe(e, text)
            )));
        }
        if errors.len() > 1 {
            return Err(PolicyError::Several(errors));
        }
        if let Some(e) = errors.pop() {
            return Err(e);
        }
        Ok(PolicySet {
            set,
            version: version_of(&files),
            annotations,
            authorizer: Authorizer::new(),
            names: Names::new()?,
            files,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn policy_count(&self) -> usize {
        self.annotations.len()
    }

    /// The files the set was built from, sorted by name.
    /// The scopes the permits name (`resource == Writ::Scope::"x"`), sorted, for the
    /// metadata's `scopes_supported`; `None` when a permit constrains its resource any other
    /// way (or not at all), so the scopes cannot be listed.
    pub fn scopes_supported(&self) -> Option<Vec<String>> {
        let mut out = std::collections::BTreeSet::new();
        for p in self.set.policies().filter(|p| p.effect() == Effect::Permit) {
            match p.resource_constraint() {
                cedar_policy::ResourceConstraint::Eq(uid)
                    if uid.type_name().to_string() == "Writ::Scope" =>
                {
                    out.insert(uid.id().unescaped().to_string());
                }
                _ => return None,
            }
        }
        Some(out.into_iter().collect())
    }

    pub fn sources(&self) -> &[(String, String)] {
        &self.files
    }

    /// Decides one scope.
    pub fn decide(
        &self,
        principal: &PolicyPrincipal,
        action: PolicyAction,
        scope: &str,
        ctx: &PolicyContext,
    ) -> ScopeDecision {
        self.decide_all(principal, action, &[scope.to_string()], ctx)
            .pop()
            .unwrap_or_else(|| deny(scope, vec!["no decision".into()]))
    }

    /// Decides every scope of one request, building the entities and context once.
    pub fn decide_all(
        &self,
        principal: &PolicyPrincipal,
        action: PolicyAction,
        scopes: &[String],
        ctx: &PolicyContext,
    ) -> Vec<ScopeDecision> {
        let prepared = match self.prepare(principal, ctx) {
            Ok(p) => p,
            Err(e) => {
                let e = crate::error::chain(&e);
                return scopes.iter().map(|s| deny(s, vec![e.clone()])).collect();
            }
        };
        let (puid, entities, context) = prepared;
        let action_uid = match action {
            PolicyAction::Exchange => &self.names.exchange,
            PolicyAction::Delegate => &self.names.delegate,
        };
        scopes
            .iter()
            .map(|scope| {
                let resource = EntityUid::from_type_name_and_id(
                    self.names.scope.clone(),
                    EntityId::new(scope),
                );
                let request = match cedar_policy::Request::new(
                    puid.clone(),
                    action_uid.clone(),
                    resource,
                    context.clone(),
                    None,
                ) {
                    Ok(r) => r,
                    Err(e) => return deny(scope, vec![e.to_string()]),
                };
                let response = self
                    .authorizer
                    .is_authorized(&request, &self.set, &entities);
                let errors: Vec<String> = response
                    .diagnostics()
                    .errors()
                    .map(|e| e.to_string())
                    .collect();
                let policies: Vec<String> = response
                    .diagnostics()
                    .reason()
                    .map(|p| p.to_string())
                    .collect();
                let allowed = response.decision() == Decision::Allow && errors.is_empty();
                let mut max_ttl: Option<Duration> = None;
                let mut approval_required = false;
                if allowed {
                    for id in &policies {
                        if let Some(a) = self.annotations.get(id) {
                            if let Some(cap) = a.max_ttl {
                                max_ttl = Some(max_ttl.map_or(cap, |m| m.min(cap)));
                            }
                            approval_required |= a.approval;
                        }
                    }
                }
                ScopeDecision {
                    scope: scope.clone(),
                    allowed,
                    policies,
                    max_ttl,
                    approval_required,
                    errors,
                }
            })
            .collect()
    }

    fn prepare(
        &self,
        p: &PolicyPrincipal,
        ctx: &PolicyContext,
    ) -> Result<(EntityUid, Entities, Context), RequestError> {
        let s = |v: &str| RestrictedExpression::new_string(v.to_string());
        let puid = EntityUid::from_type_name_and_id(
            self.names.workload.clone(),
            EntityId::new(&p.subject),
        );
        let mut attrs: HashMap<String, RestrictedExpression> = HashMap::with_capacity(8);
        attrs.insert("subject".into(), s(&p.subject));
        let (parent, claims) = match &p.kind {
            PrincipalKind::Spiffe {
                trust_domain,
                path,
                spiffe_id,
            } => {
                attrs.insert("spiffe_id".into(), s(spiffe_id));
                attrs.insert("trust_domain".into(), s(trust_domain));
                attrs.insert("path".into(), s(path));
                attrs.insert("issuer".into(), s(""));
                attrs.insert("sub".into(), s(""));
                (
                    EntityUid::from_type_name_and_id(
                        self.names.trust_domain.clone(),
                        EntityId::new(trust_domain),
                    ),
                    Vec::new(),
                )
            }
            PrincipalKind::Oidc {
                issuer,
                sub,
                claims,
            } => {
                attrs.insert("spiffe_id".into(), s(""));
                attrs.insert("trust_domain".into(), s(""));
                attrs.insert("path".into(), s(""));
                attrs.insert("issuer".into(), s(issuer));
                attrs.insert("sub".into(), s(sub));
                (
                    EntityUid::from_type_name_and_id(
                        self.names.issuer.clone(),
                        EntityId::new(issuer),
                    ),
                    policy_claims(claims),
                )
            }
        };
        let claims_expr =
            RestrictedExpression::new_record(claims.into_iter().map(|(k, v)| (k, s(&v))))
                .map_err(|e| RequestError::Claims(Box::new(e)))?;
        attrs.insert("claims".into(), claims_expr);
        let workload = Entity::new(puid.clone(), attrs, HashSet::from([parent.clone()]))
            .map_err(|e| RequestError::Principal(Box::new(e)))?;
        let parent_entity = Entity::new_no_attrs(parent, HashSet::new());
        let entities = Entities::from_entities([workload, parent_entity], None)
            .map_err(|e| RequestError::Entities(Box::new(e)))?;
        let context = Context::from_pairs([
            (
                "audience".to_string(),
                RestrictedExpression::new_set(ctx.audience.iter().map(|a| s(a))),
            ),
            ("purpose".to_string(), s(&ctx.purpose)),
            (
                "ttl".to_string(),
                RestrictedExpression::new_long(i64::try_from(ctx.ttl).unwrap_or(i64::MAX)),
            ),
            ("source".to_string(), s(&ctx.source)),
            (
                "depth".to_string(),
                RestrictedExpression::new_long(i64::from(ctx.depth)),
            ),
            ("now".to_string(), RestrictedExpression::new_long(ctx.now)),
            ("on_behalf_of".to_string(), s(&ctx.on_behalf_of)),
            ("parent_task".to_string(), s(&ctx.parent_task)),
            ("binding".to_string(), s(&ctx.binding)),
        ])
        .map_err(|e| RequestError::Context(Box::new(e)))?;
        Ok((puid, entities, context))
    }
}

/// The string claims a policy may test: the schema's `Claims` record, with Kubernetes'
/// nested `kubernetes.io` claim flattened into `namespace`, `service_account` and `pod`.
pub fn policy_claims(claims: &Map<String, Value>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = CLAIM_NAMES
        .iter()
        .filter_map(|name| {
            claims
                .get(*name)
                .and_then(Value::as_str)
                .map(|v| ((*name).to_string(), v.to_string()))
        })
        .collect();
    if let Some(k8s) = claims.get("kubernetes.io").and_then(Value::as_object) {
        if !out.iter().any(|(k, _)| k == "namespace")
            && let Some(ns) = k8s.get("namespace").and_then(Value::as_str)
        {
            out.push(("namespace".into(), ns.into()));
        }
        if let Some(sa) = k8s
            .get("serviceaccount")
            .and_then(|v| v.get("name"))
            .and_then(Value::as_str)
        {
            out.push(("service_account".into(), sa.into()));
        }
        if let Some(pod) = k8s
            .get("pod")
            .and_then(|v| v.get("name"))
            .and_then(Value::as_str)
        {
            out.push(("pod".into(), pod.into()));
        }
    }
    out
}

fn deny(scope: &str, errors: Vec<String>) -> ScopeDecision {
    ScopeDecision {
        scope: scope.to_string(),
        allowed: false,
        policies: Vec::new(),
        max_ttl: None,
        approval_required: false,
        errors,
    }
}

fn annotations_of(
    policy: &cedar_policy::Policy,
    id: &str,
    file: &str,
) -> Result<Annotations, PolicyError> {
    let err = |reason: String| PolicyError::Annotation {
        id: id.to_string(),
        file: file.to_string(),
        reason,
    };
    let mut out = Annotations::default();
    if let Some(raw) = policy.annotation("max_ttl") {
        if policy.effect() != Effect::Permit {
            return Err(err("`@max_ttl` applies to `permit` policies only".into()));
        }
        let d = humantime::parse_duration(raw)
            .map_err(|e| err(format!("`@max_ttl(\"{raw}\")` is not a duration ({e})")))?;
        if d.is_zero() {
            return Err(err("`@max_ttl` must be greater than zero".into()));
        }
        out.max_ttl = Some(d);
    }
    if let Some(raw) = policy.annotation("approval") {
        if raw != "required" {
            return Err(err(format!(
                "`@approval(\"{raw}\")`: the only value is \"required\""
            )));
        }
        out.approval = true;
    }
    Ok(out)
}

/// The policies of one parsed file with their Writ ids: `@id`, else `<file stem>:<index>`.
fn numbered<'a>(
    parsed: &'a cedar_policy::PolicySet,
    file: &str,
) -> Vec<(String, &'a cedar_policy::Policy)> {
    // Cedar numbers the policies of a file policy0, policy1, ... in source order.
    let mut policies: Vec<&cedar_policy::Policy> = parsed.policies().collect();
    policies.sort_by_key(|p| {
        p.id()
            .to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    policies
        .into_iter()
        .enumerate()
        .map(|(i, policy)| {
            let id = policy
                .annotation("id")
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}:{i}", stem(file)));
            (id, policy)
        })
        .collect()
}

/// Every parse error of a file, each with the line and column Cedar points at.
fn render_errors(e: &cedar_policy::ParseErrors, text: &str) -> String {
    let rest = miette::Diagnostic::related(e).into_iter().flatten();
    std::iter::once(describe(e, text))
        .chain(rest.map(|d| describe(d, text)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One diagnostic, with the line and column of its first label in `text` when it has one.
fn describe<D: miette::Diagnostic + ?Sized>(d: &D, text: &str) -> String {
    let mut s = d.to_string();
    if let Some(mut labels) = d.labels()
        && let Some(l) = labels.next()
    {
        let before = text.get(..l.offset().min(text.len())).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |c| c.chars().count()) + 1;
        s.push_str(&format!(" (line {line}, column {col})"));
    }
    s
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub changed: bool,
    pub old_version: String,
    pub new_version: String,
}

/// What a reload may do to the size of the set: an empty or truncated file must not turn
/// into a deny-all set that re-evaluation would use to revoke every open task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShrinkGuard {
    /// Largest share of the policies one reload may drop (`policy.max_drop_share`).
    pub max_drop_share: f64,
    /// Accept any set, even an empty one (`policy.allow_empty`).
    pub allow_empty: bool,
}

impl Default for ShrinkGuard {
    fn default() -> Self {
        ShrinkGuard {
            max_drop_share: 0.5,
            allow_empty: false,
        }
    }
}

impl ShrinkGuard {
    fn check(&self, old: usize, new: usize) -> Result<(), PolicyError> {
        if self.allow_empty || new >= old {
            return Ok(());
        }
        let count = |n: usize| u32::try_from(n).map_or(f64::MAX, f64::from);
        let dropped = count(old.saturating_sub(new)) / count(old);
        if new == 0 || dropped > self.max_drop_share {
            return Err(PolicyError::Shrunk {
                old,
                new,
                limit: self.max_drop_share,
            });
        }
        Ok(())
    }
}

/// The policy set in force, swapped atomically on reload.
pub struct PolicyHandle {
    current: ArcSwap<PolicySet>,
    dir: PathBuf,
    guard: ShrinkGuard,
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHandle")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PolicyHandle {
    pub fn new(set: PolicySet, dir: PathBuf) -> Self {
        PolicyHandle {
            current: ArcSwap::from_pointee(set),
            dir,
            guard: ShrinkGuard::default(),
        }
    }

    /// The same handle with another bound on how far one reload may shrink the set.
    pub fn with_guard(mut self, guard: ShrinkGuard) -> Self {
        self.guard = guard;
        self
    }

    /// The set in force: lock-free.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Re-reads the directory. A set that does not load, or that drops more policies at once
    /// than the guard allows, is refused and the old one stays.
    pub fn reload(&self) -> Result<ReloadOutcome, PolicyError> {
        let new = PolicySet::load_dir(&self.dir)?;
        let old = self.current();
        if old.version() != new.version() {
            self.guard.check(old.policy_count(), new.policy_count())?;
        }
        let outcome = ReloadOutcome {
            changed: old.version() != new.version(),
            old_version: old.version().to_string(),
            new_version: new.version().to_string(),
        };
        if outcome.changed {
            self.current.store(Arc::new(new));
        }
        Ok(outcome)
    }

    /// Replaces the set directly (tests).
    pub fn replace(&self, set: PolicySet) {
        self.current.store(Arc::new(set));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How long a changed directory must hold still before it is read: a file being written
/// (or truncated and refilled) is not loaded half-way.
const SETTLE: Duration = Duration::from_millis(200);

/// One entry of [`dir_stamp`]: name, resolved path, size and modification time.
type StampEntry = (String, Option<PathBuf>, u64, Option<SystemTime>);

/// Names, resolved paths, sizes and modification times of the directory's entries: a cheap
/// change check. Symlinks are followed (metadata of the target, and where it resolves), so
/// a Kubernetes ConfigMap mount (`demo.cedar -> ..data/demo.cedar`, `..data -> ..<stamp>`)
/// is seen to change when `..data` is swapped to a new directory.
fn dir_stamp(dir: &Path) -> Vec<StampEntry> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if let Ok(md) = std::fs::metadata(&path) {
                let resolved = std::fs::canonicalize(&path).ok();
                out.push((name, resolved, md.len(), md.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// What a refused reload tried to load: the version of the files it read, or why it could
/// not read them. The same refusal twice in a row is reported once.
fn attempted(dir: &Path) -> String {
    read_dir(dir).map_or_else(|e| e.to_string(), |files| version_of(&files))
}

/// Reloads once and reports what happened, folding a refusal of the same files as the
/// last refusal.
async fn reload_and_report(
    handle: &Arc<PolicyHandle>,
    last_refused: &mut Option<String>,
    on_event: &(dyn Fn(Result<ReloadOutcome, PolicyError>) + Send + Sync),
) {
    let h = handle.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = h.reload();
        let tried = r.as_ref().err().map(|_| attempted(h.dir()));
        (r, tried)
    })
    .await;
    match result {
        Ok((Ok(outcome), _)) => {
            *last_refused = None;
            if outcome.changed {
                on_event(Ok(outcome));
            }
        }
        Ok((Err(e), tried)) => {
            if tried.is_some() && *last_refused == tried {
                tracing::debug!(error = %e, "the same policy set is refused again");
                return;
            }
            *last_refused = tried;
            on_event(Err(e));
        }
        Err(e) => tracing::error!(error = %e, "policy reload task failed"),
    }
}

/// Reloads when the directory changes (polled every `interval`, read once it has held
/// still for [`SETTLE`]) and on SIGHUP. `on_event` hears every change of version and every
/// refused set (once per refused set of files, however often it is retried).
pub fn spawn_watcher(
    handle: Arc<PolicyHandle>,
    interval: Duration,
    on_event: Arc<dyn Fn(Result<ReloadOutcome, PolicyError>) + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    // The baseline is taken now, not when the task first runs, so a change made in between
    // is not mistaken for the state already loaded.
    let mut last = dir_stamp(handle.dir());
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refused: Option<String> = None;
        loop {
            #[cfg(unix)]
            let forced = match hup.as_mut() {
                Some(h) => tokio::select! {
                    _ = tick.tick() => false,
                    _ = h.recv() => true,
                },
                None => {
                    tick.tick().await;
                    false
                }
            };
            #[cfg(not(unix))]
            let forced = {
                tick.tick().await;
                false
            };
            let stamp = dir_stamp(handle.dir());
            if !forced && stamp == last {
                continue;
            }
            tokio::time::sleep(SETTLE).await;
            if dir_stamp(handle.dir()) != stamp {
                // Still being written: the next tick looks again.
                continue;
            }
            last = stamp;
            reload_and_report(&handle, &mut last_refused, on_event.as_ref()).await;
        }
    })
}

#[cfg(test)]
mod tests;
