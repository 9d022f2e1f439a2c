//! Who is calling the admin and introspection endpoints: a bearer admin token (compared by
//! SHA-256) or a workload identity token (JWT-SVID or OIDC) whose subject a configured
//! principal pattern covers and that no standing block or quarantine refuses.

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::cache::VerifiedCache;
use crate::domain::{Subject, sha256_hex};
use crate::error::{BrokerError, ErrorCode};

/// An authenticated caller, named for the decision log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An admin token, named by the first 12 hex digits of its SHA-256.
    AdminToken(String),
    /// An approver token (`[approvals] token_sha256`), named the same way.
    ApproverToken(String),
    Workload(Subject),
}

impl Caller {
    pub fn name(&self) -> String {
        match self {
            Caller::AdminToken(h) => format!("admin-token:{h}"),
            Caller::ApproverToken(h) => format!("approver-token:{h}"),
            Caller::Workload(s) => s.to_string(),
        }
    }
}

/// What the endpoint needs the caller to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Introspector,
    /// Decides approval requests (`[approvals]`); admins are not approvers unless listed.
    Approver,
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Broker {
    /// Authenticates and authorizes a caller for `role`: 401 without a valid credential, 403
    /// when the credential is valid but not allowed, or names a subject that a standing block
    /// or quarantine covers (admin tokens are not subjects). Refusals are recorded.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        role: Role,
        source_ip: Option<String>,
    ) -> Result<Caller, BrokerError> {
        let refuse = |code: ErrorCode, reason: &str, who: Option<String>| {
            self.refuse_caller(role, code, reason, who, source_ip.clone())
        };
        let Some(token) = bearer(authorization) else {
            return Err(refuse(
                ErrorCode::CredentialsRequired,
                "a bearer credential is required",
                None,
            ));
        };
        let hash = sha256_hex(token.as_bytes());
        if role == Role::Approver {
            let approvers = self.config.approvals.as_ref().map(|a| &a.token_sha256);
            if approvers
                .into_iter()
                .flatten()
                .any(|h| constant_time_eq(h.to_ascii_lowercase().as_bytes(), hash.as_bytes()))
            {
                return Ok(Caller::ApproverToken(hash.chars().take(12).collect()));
            }
        } else if self
            .admin_hashes
            .iter()
            .any(|h| constant_time_eq(h.as_bytes(), hash.as_bytes()))
        {
            return Ok(Caller::AdminToken(hash.chars().take(12).collect()));
        }
        let Some(subject) = self.workload_subject(token).await? else {
            return Err(refuse(
                ErrorCode::InvalidToken,
                "the bearer credential is not valid",
                None,
            ));
        };
        if !self.may_act_as(&subject, role) {
            return Err(refuse(
                ErrorCode::AccessDenied,
                "the caller is not allowed here",
                Some(subject.to_string()),
            ));
        }
        // A standing block or quarantine of the subject covers every way in, these
        // endpoints too: a blocked admin workload cannot lift its own block.
        if let Some(block) = self.revocations.blocking(subject.as_str(), self.now()) {
            return Err(refuse(
                ErrorCode::AccessDenied,
                &format!("the caller is {}", block.refusal()),
                Some(subject.to_string()),
            ));
        }
        Ok(Caller::Workload(subject))
    }

    /// The subject of a workload identity token (cached by the token's hash); `None` when it
    /// does not verify, 503 when the identity sources cannot say.
    async fn workload_subject(&self, token: &str) -> Result<Option<Subject>, BrokerError> {
        let now = self.now();
        let key = VerifiedCache::<String>::key(token.as_bytes());
        if let Some(s) = self.auth_cache.get(&key, now) {
            return Ok(Some(Subject::from_trusted(s)));
        }
        match self
            .identity
            .verify(token, crate::identity::Accept::AnyIdentity, now)
            .await
        {
            Ok(id) => {
                self.auth_cache
                    .insert(key, id.subject.to_string(), id.expires_at, now);
                Ok(Some(id.subject))
            }
            Err(e) if e.is_unavailable() => Err(self.fail(e)),
            Err(e) => {
                tracing::info!(reason = %e, "bearer credential refused");
                Ok(None)
            }
        }
    }

    /// Admin principals may act in every role; introspection principals may introspect.
    fn may_act_as(&self, subject: &Subject, role: Role) -> bool {
        let covered = |patterns: &[String]| patterns.iter().any(|p| subject.matches(p));
        if role == Role::Approver {
            let approvers = self
                .config
                .approvals
                .as_ref()
                .map(|a| a.principals.as_slice());
            return covered(approvers.unwrap_or_default());
        }
        covered(&self.config.admin.principals)
            || (role == Role::Introspector && covered(&self.config.introspection.principals))
    }

    /// Records a refused caller and gives its answer. Refusals that name no one are
    /// flood-limited; a known caller's is always written. A failed append is counted by the
    /// log (`writ_audit_append_failures_total`); the refusal stands either way.
    fn refuse_caller(
        &self,
        role: Role,
        code: ErrorCode,
        reason: &str,
        who: Option<String>,
        source_ip: Option<String>,
    ) -> BrokerError {
        let event = if role == Role::Introspector {
            Event::IntrospectDenied
        } else {
            Event::Admin
        };
        let entry = audit::Entry {
            decision: Some("deny"),
            subject: who,
            reason: reason.to_string(),
            source_ip,
            ..audit::Entry::default()
        };
        let appended = if entry.subject.is_none() {
            self.audit.append_unauthenticated(event, entry).map(|_| ())
        } else {
            self.audit.append(event, entry).map(|_| ())
        };
        if let Err(e) = appended {
            tracing::error!(error = %e, "cannot record a refused caller in the decision log");
        }
        BrokerError::new(code, reason)
    }

    /// Called when trust bundles change: cached workload credentials are verified again.
    pub fn forget_verified_credentials(&self) {
        self.auth_cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
