//! Who is calling the admin and introspection endpoints: a bearer admin token (compared by
//! SHA-256) or a workload identity token (JWT-SVID or OIDC) whose subject a configured
//! principal pattern covers.

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
    Workload(Subject),
}

impl Caller {
    pub fn name(&self) -> String {
        match self {
            Caller::AdminToken(h) => format!("admin-token:{h}"),
            Caller::Workload(s) => s.to_string(),
        }
    }
}

/// What the endpoint needs the caller to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Introspector,
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
    /// when the credential is valid but not allowed. Refusals are recorded.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        role: Role,
        source_ip: Option<String>,
    ) -> Result<Caller, BrokerError> {
        let refuse = |code: ErrorCode, reason: &str, who: Option<String>| {
            let event = if role == Role::Introspector {
                Event::IntrospectDenied
            } else {
                Event::Admin
            };
            let entry = audit::Entry {
                decision: Some("deny"),
                subject: who,
                reason: reason.to_string(),
                source_ip: source_ip.clone(),
                ..audit::Entry::default()
            };
            // Refusals that name no one are flood-limited; a known caller's is always written.
            // A failed append is counted by the log (`writ_audit_append_failures_total`).
            let appended = if entry.subject.is_none() {
                self.audit.append_unauthenticated(event, entry).map(|_| ())
            } else {
                self.audit.append(event, entry).map(|_| ())
            };
            if let Err(e) = appended {
                tracing::error!(error = %e, "cannot record a refused caller in the decision log");
            }
            BrokerError::new(code, reason)
        };
        let Some(token) = bearer(authorization) else {
            return Err(refuse(
                ErrorCode::InvalidToken,
                "a bearer credential is required",
                None,
            ));
        };
        let hash = sha256_hex(token.as_bytes());
        if self
            .admin_hashes
            .iter()
            .any(|h| constant_time_eq(h.as_bytes(), hash.as_bytes()))
        {
            return Ok(Caller::AdminToken(hash[..12].to_string()));
        }
        let now = self.now();
        let key = VerifiedCache::<String>::key(token.as_bytes());
        let subject = match self.auth_cache.get(&key, now) {
            Some(s) => s,
            None => match self
                .identity
                .verify(token, crate::identity::Accept::AnyIdentity, now)
                .await
            {
                Ok(id) => {
                    let s = id.subject.to_string();
                    self.auth_cache.insert(key, s.clone(), id.expires_at, now);
                    s
                }
                Err(e) if e.is_unavailable() => return Err(self.fail(e)),
                Err(e) => {
                    tracing::info!(reason = %e, "bearer credential refused");
                    return Err(refuse(
                        ErrorCode::InvalidToken,
                        "the bearer credential is not valid",
                        None,
                    ));
                }
            },
        };
        let subject = Subject::from_trusted(subject);
        let admin = self
            .config
            .admin
            .principals
            .iter()
            .any(|p| subject.matches(p));
        let allowed = admin
            || (role == Role::Introspector
                && self
                    .config
                    .introspection
                    .principals
                    .iter()
                    .any(|p| subject.matches(p)));
        if !allowed {
            return Err(refuse(
                ErrorCode::AccessDenied,
                "the caller is not allowed here",
                Some(subject.to_string()),
            ));
        }
        Ok(Caller::Workload(subject))
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
