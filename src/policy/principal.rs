//! Policy principals, built from a verified identity or from what a task recorded of its
//! owner.

use serde_json::{Map, Value};

use super::{PolicyPrincipal, PrincipalKind};
use crate::domain::{Subject, parse_spiffe_id};
use crate::identity::{IdentityKind, VerifiedIdentity};
use crate::store::TaskRecord;

impl PolicyPrincipal {
    /// The principal of a caller whose identity token verified.
    pub fn of_identity(id: &VerifiedIdentity) -> PolicyPrincipal {
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

    /// The principal of a task's owner, rebuilt from what the task recorded.
    pub fn of_task_owner(task: &TaskRecord) -> PolicyPrincipal {
        let claims = task
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        Self::of_subject(&task.owner, &task.issuer, claims)
    }

    /// The principal for a subject read back from one of our own tokens or tasks.
    pub fn of_subject(subject: &Subject, issuer: &str, claims: Map<String, Value>) -> Self {
        let s = subject.as_str();
        let kind = match parse_spiffe_id(s) {
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

    /// The OIDC claims policy may test, as a task records them.
    pub fn recorded_claims(&self) -> std::collections::BTreeMap<String, String> {
        match &self.kind {
            PrincipalKind::Oidc { claims, .. } => {
                super::policy_claims(claims).into_iter().collect()
            }
            PrincipalKind::Spiffe { .. } => Default::default(),
        }
    }
}
