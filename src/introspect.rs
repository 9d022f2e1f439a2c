//! Token state for resource servers and task holders (RFC 7662): a token of ours that
//! verifies, has not expired, is not revoked and whose task the store holds open is active;
//! anything else is inactive, and a revocation state that cannot be confirmed is a 503, never
//! an `active: true`.

use crate::broker::Broker;
use crate::cache::VerifiedCache;
use crate::config::StoreBackend;
use crate::domain::TaskId;
use crate::error::BrokerError;
use crate::token::TaskClaims;

/// The answer of introspection.
#[derive(Debug, Clone)]
pub enum Introspection {
    Active(Box<TaskClaims>),
    Inactive,
}

impl Broker {
    /// A token of ours that verifies, has not expired, is not revoked and whose task is open
    /// in the store. `Err` only when the revocation state cannot be confirmed.
    pub async fn check_token(&self, token: &str) -> Result<Option<TaskClaims>, BrokerError> {
        if !self.revocations.is_fresh() {
            return Err(BrokerError::unavailable());
        }
        let now = self.now();
        let Some(claims) = self.verified_token(token, now) else {
            return Ok(None);
        };
        if self.revocations.revoked_reason(&claims, now).is_some() || !self.vouches_for(&claims) {
            return Ok(None);
        }
        // The store holds every task whose tokens may still be valid: a task it does not know
        // (a store that lost it, or a memory store that restarted) has no revocation state to
        // confirm.
        let Some(id) = TaskId::parse(&claims.txn) else {
            return Ok(None);
        };
        let open = self.get_task(&id).await?.is_some_and(|t| t.is_open_at(now));
        Ok(open.then_some(claims))
    }

    /// A memory store forgets its tasks and revocations when the broker stops: such a broker
    /// cannot tell whether a token issued before it started was revoked since.
    fn vouches_for(&self, claims: &TaskClaims) -> bool {
        self.config.store.backend != StoreBackend::Memory || claims.iat >= self.started_at
    }

    /// Signature and expiry of one of our tokens, with verification results cached by the
    /// token's hash (revocation is checked on every use, outside the cache).
    pub(crate) fn verified_token(&self, token: &str, now: i64) -> Option<TaskClaims> {
        let key = VerifiedCache::<TaskClaims>::key(token.as_bytes());
        if let Some(c) = self.token_cache.get(&key, now) {
            return Some(c);
        }
        let c = self.tokens.verify(token, now).ok()?;
        self.token_cache.insert(key, c.clone(), c.exp, now);
        Some(c)
    }

    pub async fn introspect(&self, token: &str) -> Result<Introspection, BrokerError> {
        Ok(match self.check_token(token).await? {
            Some(c) => Introspection::Active(Box::new(c)),
            None => Introspection::Inactive,
        })
    }

    /// Introspection for a caller (RFC 7662 §4): a workload mapped in
    /// `introspection.resources` sees a token as active only when the token's `aud` names one
    /// of the audiences it serves. `workload` is `None` for an admin token; admin principals
    /// and unmapped introspection principals see every token.
    pub async fn introspect_for(
        &self,
        token: &str,
        workload: Option<&str>,
    ) -> Result<Introspection, BrokerError> {
        let answer = self.introspect(token).await?;
        let Introspection::Active(claims) = &answer else {
            return Ok(answer);
        };
        let Some(subject) = workload else {
            return Ok(answer);
        };
        let who = crate::domain::Subject::from_trusted(subject.to_string());
        if self.config.admin.principals.iter().any(|p| who.matches(p)) {
            return Ok(answer);
        }
        let Some(mapped) = self
            .config
            .introspection
            .resources
            .iter()
            .find(|r| r.principal == subject)
        else {
            return Ok(answer);
        };
        let serves = claims
            .aud
            .to_vec()
            .iter()
            .any(|a| mapped.audiences.iter().any(|m| m.as_str() == a));
        Ok(if serves {
            answer
        } else {
            Introspection::Inactive
        })
    }
}
