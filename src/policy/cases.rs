//! Policy test cases for `writ policy test DIR CASES`: a JSON file of requests and the
//! decision each must get.
//!
//! ```json
//! {"cases": [
//!   {"name": "agent reads the repo",
//!    "principal": "spiffe://dev.writ.local/agent/demo",
//!    "action": "exchange",                       // or "delegate"; default "exchange"
//!    "scope": "repo:read",
//!    "context": {"audience": ["https://api.example.org"], "purpose": "", "ttl": 300,
//!                "source": "jwt-svid", "depth": 0, "now": 0,
//!                "on_behalf_of": "", "parent_task": ""},    // every field optional
//!    "expect": "allow",                          // or "deny"; nothing else
//!    "max_ttl": "5m",                            // optional: the cap the allow must carry
//!    "approval": false},                         // optional: whether it needs an approval
//!   {"principal": {"issuer": "https://token.actions.githubusercontent.com",
//!                  "sub": "repo:org/app:ref:refs/heads/main",
//!                  "claims": {"repository": "org/app"}},
//!    "scope": "deploy", "expect": "deny"}
//! ]}
//! ```

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{PolicyAction, PolicyContext, PolicyError, PolicyPrincipal, PolicySet, PrincipalKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CasePrincipal {
    Spiffe(String),
    Oidc {
        issuer: String,
        sub: String,
        #[serde(default)]
        claims: Map<String, Value>,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CaseContext {
    #[serde(default)]
    audience: Vec<String>,
    #[serde(default)]
    purpose: String,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    depth: u32,
    #[serde(default)]
    now: i64,
    #[serde(default)]
    on_behalf_of: String,
    #[serde(default)]
    parent_task: String,
    /// `dpop`, `mtls` or `none` (the default).
    #[serde(default)]
    binding: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    name: Option<String>,
    principal: CasePrincipal,
    #[serde(default)]
    action: Option<String>,
    scope: String,
    #[serde(default)]
    context: CaseContext,
    expect: String,
    #[serde(default)]
    max_ttl: Option<String>,
    /// Whether the allow holds the request for an approval (`@approval("required")`).
    #[serde(default)]
    approval: Option<bool>,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    pub total: usize,
    pub passed: usize,
    pub failures: Vec<String>,
}

/// Runs every case of `cases_file` against `set`.
pub fn run_cases(set: &PolicySet, cases_file: &Path) -> Result<CaseReport, PolicyError> {
    let file = cases_file.display().to_string();
    let err = |reason: String| PolicyError::Cases {
        file: file.clone(),
        reason,
    };
    let text = std::fs::read_to_string(cases_file).map_err(|e| err(e.to_string()))?;
    let parsed: CaseFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let problems: Vec<String> = parsed
        .cases
        .iter()
        .enumerate()
        .flat_map(|(i, case)| problems_of(i, case))
        .collect();
    if !problems.is_empty() {
        return Err(PolicyError::InvalidCases { file, problems });
    }
    let mut report = CaseReport {
        total: parsed.cases.len(),
        passed: 0,
        failures: Vec::new(),
    };
    for (i, case) in parsed.cases.into_iter().enumerate() {
        let label = case
            .name
            .clone()
            .unwrap_or_else(|| format!("case {}", i + 1));
        match check(set, case) {
            Ok(()) => report.passed += 1,
            Err(why) => report.failures.push(format!("{label}: {why}")),
        }
    }
    Ok(report)
}

/// How a case is named in reports: its `name`, else its place in the file.
fn label(i: usize, case: &Case) -> String {
    case.name.as_ref().map_or_else(
        || format!("case {}", i + 1),
        |n| format!("case {} (`{n}`)", i + 1),
    )
}

/// What makes a case unable ever to pass or fail honestly: a value outside its field's set.
fn problems_of(i: usize, case: &Case) -> Vec<String> {
    let mut out = Vec::new();
    if !matches!(case.expect.as_str(), "allow" | "deny") {
        out.push(format!(
            "{}: `expect` is `{}`; allowed values: `allow`, `deny`",
            label(i, case),
            case.expect
        ));
    }
    if let Some(action) = case.action.as_deref()
        && !matches!(action, "exchange" | "delegate")
    {
        out.push(format!(
            "{}: `action` is `{action}`; allowed values: `exchange`, `delegate`",
            label(i, case)
        ));
    }
    out
}

fn check(set: &PolicySet, case: Case) -> Result<(), String> {
    let principal = match case.principal {
        CasePrincipal::Spiffe(id) => {
            let parsed = crate::domain::parse_spiffe_id(&id)
                .ok_or_else(|| format!("`{id}` is not a SPIFFE ID"))?;
            PolicyPrincipal {
                subject: id.clone(),
                kind: PrincipalKind::Spiffe {
                    trust_domain: parsed.trust_domain_name().to_string(),
                    path: parsed.path().to_string(),
                    spiffe_id: id,
                },
            }
        }
        CasePrincipal::Oidc {
            issuer,
            sub,
            claims,
        } => PolicyPrincipal {
            subject: format!("{issuer}#{sub}"),
            kind: PrincipalKind::Oidc {
                issuer,
                sub,
                claims,
            },
        },
    };
    let action = match case.action.as_deref().unwrap_or("exchange") {
        "exchange" => PolicyAction::Exchange,
        "delegate" => PolicyAction::Delegate,
        other => return Err(format!("unknown action `{other}`")),
    };
    let source = case.context.source.unwrap_or_else(|| {
        match (&principal.kind, action) {
            (_, PolicyAction::Delegate) => "task-token",
            (PrincipalKind::Spiffe { .. }, _) => "jwt-svid",
            (PrincipalKind::Oidc { .. }, _) => "oidc",
        }
        .to_string()
    });
    let ctx = PolicyContext {
        audience: case.context.audience,
        purpose: case.context.purpose,
        ttl: case.context.ttl.unwrap_or(300),
        source,
        depth: case.context.depth,
        now: case.context.now,
        on_behalf_of: case.context.on_behalf_of,
        parent_task: case.context.parent_task,
        binding: case.context.binding.unwrap_or_else(|| "none".to_string()),
    };
    let d = set.decide(&principal, action, &case.scope, &ctx);
    let got = if d.allowed { "allow" } else { "deny" };
    if got != case.expect {
        return Err(format!(
            "expected {} but got {got} (policies: [{}]{})",
            case.expect,
            d.policies.join(", "),
            if d.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {}", d.errors.join("; "))
            }
        ));
    }
    if let Some(want) = case.approval
        && d.approval_required != want
    {
        return Err(format!(
            "expected approval {} but got {}",
            if want { "required" } else { "not required" },
            if d.approval_required {
                "required"
            } else {
                "not required"
            }
        ));
    }
    if let Some(want) = case.max_ttl {
        let want_d =
            humantime::parse_duration(&want).map_err(|e| format!("max_ttl `{want}`: {e}"))?;
        if d.max_ttl != Some(want_d) {
            return Err(format!(
                "expected max_ttl {want} but got {}",
                d.max_ttl
                    .map_or("none".to_string(), |m| humantime::format_duration(m)
                        .to_string())
            ));
        }
    }
    Ok(())
}
