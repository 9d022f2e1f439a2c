//! Token status lists for offline verifiers (SPEC §4.6): an index for every token, the bit
//! set when it is revoked, and the list served as a signed `statuslist+jwt`.
//!
//! Lower than the use cases: it knows the store and the token keys, nothing else. Indexes
//! and bits live in the store, so every replica allocates without collision and serves the
//! same bits; a replica re-signs a list at most every [`RESIGN_AFTER`] while its bits are
//! unchanged, and reads the bits from the store on every request, so a revocation taken by
//! any replica is in every replica's next answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::store::{StatusSlot, Store, StoreError};
use crate::token::keys::KeySet;
use crate::token::status::{self as wire, StatusClaim, StatusListClaims, StatusRef};
use crate::token::{TokenError, sign_jws};

/// A signed list is reused while its bits are unchanged for at most this long.
const RESIGN_AFTER: Duration = Duration::from_secs(1);
/// Longest list name accepted in a path.
const MAX_LIST_NAME: usize = 64;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot sign the status list")]
    Sign(#[source] TokenError),
    #[error("cannot encode the status list")]
    Encode(#[source] wire::StatusListError),
    #[error("cannot make a list name")]
    Random(#[source] crate::domain::RngError),
}

/// A served list: the signed JWT and how long verifiers may cache it.
#[derive(Debug, Clone)]
pub struct SignedList {
    pub jwt: String,
    pub ttl_secs: u64,
}

struct Cached {
    bits: Vec<u8>,
    signed_at: Instant,
    /// The `iat` it was signed with: reused only within that second of the broker's clock,
    /// so that a served list's `exp` (`iat` + `ttl`) is always ahead of now.
    iat: i64,
    jwt: String,
}

/// The status lists of one broker.
pub struct StatusLists {
    store: Arc<dyn Store>,
    keys: KeySet,
    base_uri: String,
    size: u32,
    ttl_secs: u64,
    cache: Mutex<HashMap<String, Arc<Cached>>>,
}

impl std::fmt::Debug for StatusLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusLists").finish_non_exhaustive()
    }
}

/// True for a name the broker could have made (`sl_` and base64url), so that nothing else
/// reaches the store.
pub fn valid_list_name(name: &str) -> bool {
    name.len() <= MAX_LIST_NAME
        && name.starts_with("sl_")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl StatusLists {
    /// `issuer` is `server.issuer`: lists are served at `<issuer>/oauth2/status/<list>`.
    pub fn new(
        store: Arc<dyn Store>,
        keys: KeySet,
        issuer: &str,
        size: u32,
        ttl: Duration,
    ) -> Self {
        StatusLists {
            store,
            keys,
            base_uri: format!("{}/oauth2/status/", issuer.trim_end_matches('/')),
            size,
            ttl_secs: ttl.as_secs().max(1),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn uri(&self, list: &str) -> String {
        format!("{}{list}", self.base_uri)
    }

    /// The `status` claim for a new token `jti` expiring at `exp`.
    pub async fn allocate(
        &self,
        jti: &str,
        exp: i64,
        now: i64,
    ) -> Result<StatusClaim, StatusError> {
        let fresh = crate::domain::random_id("sl_").map_err(StatusError::Random)?;
        let StatusSlot { list, idx } = self
            .store
            .status_allocate(jti, exp, self.size, &fresh, now)
            .await?;
        Ok(StatusClaim {
            status_list: StatusRef {
                idx,
                uri: self.uri(&list),
            },
        })
    }

    /// Sets the revoked bit of these tokens.
    pub async fn revoke(&self, jtis: &[String]) -> Result<u64, StatusError> {
        if jtis.is_empty() {
            return Ok(0);
        }
        Ok(self.store.status_revoke(jtis).await?)
    }

    /// The signed list `list` at `now`, or `None` for a list that is unknown or whose last
    /// token has expired.
    pub async fn serve(&self, list: &str, now: i64) -> Result<Option<SignedList>, StatusError> {
        if !valid_list_name(list) {
            return Ok(None);
        }
        let Some(stored) = self.store.status_list(list, now).await? else {
            self.cache.lock().remove(list);
            return Ok(None);
        };
        if let Some(c) = self.cache.lock().get(list)
            && c.bits == stored.bits
            && c.iat == now
            && c.signed_at.elapsed() < RESIGN_AFTER
        {
            return Ok(Some(SignedList {
                jwt: c.jwt.clone(),
                ttl_secs: self.ttl_secs,
            }));
        }
        let len = usize::try_from(stored.size.div_ceil(8)).unwrap_or(usize::MAX);
        let mut bytes = stored.bits.clone();
        bytes.resize(len.max(bytes.len()), 0);
        wire::flip_bit_order(&mut bytes);
        let claims = StatusListClaims {
            sub: self.uri(list),
            iat: now,
            exp: now.saturating_add(i64::try_from(self.ttl_secs).unwrap_or(i64::MAX)),
            ttl: self.ttl_secs,
            status_list: wire::encode(&bytes).map_err(StatusError::Encode)?,
        };
        let jwt = sign_jws(&self.keys, wire::JWT_TYPE, &claims).map_err(StatusError::Sign)?;
        let mut cache = self.cache.lock();
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(
            list.to_string(),
            Arc::new(Cached {
                bits: stored.bits,
                signed_at: Instant::now(),
                iat: now,
                jwt: jwt.clone(),
            }),
        );
        Ok(Some(SignedList {
            jwt,
            ttl_secs: self.ttl_secs,
        }))
    }
}
