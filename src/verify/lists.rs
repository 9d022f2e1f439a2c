//! Status lists (SPEC §4.6) fetched from the broker, their signature checked against its
//! JWKS, and cached for their `ttl`, never past their `exp` nor past `max_age`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::token::jwt::ParsedJwt;
use crate::token::status::{self as wire, StatusListClaims};

use super::jwks::Jwks;

/// Largest list JWT read: a list of 16 Mi indexes compresses to far less.
const MAX_LIST_JWT_BYTES: usize = 4 * 1024 * 1024;
/// Most lists cached at once (a broker serves a few live lists at a time).
const MAX_LISTS: usize = 256;

/// A list's bits, and until when they may be used.
pub(super) struct List {
    pub bytes: Vec<u8>,
    fresh_until: i64,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ListError {
    /// 404 from the broker: no such list (or its last token has expired).
    #[error("unknown status list")]
    Unknown,
    #[error("cannot fetch the status list")]
    Unreachable(#[source] FetchFailure),
    #[error("the status list is refused: {0}")]
    Invalid(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub(super) enum FetchFailure {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("the broker answered {0}")]
    Status(u16),
    #[error("the broker's keys cannot be fetched")]
    Keys,
}

pub(super) enum ReadError {
    Http(reqwest::Error),
    TooLarge,
}

/// A response body, refused once it grows past `max` bytes.
pub(super) async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Http)? {
        if body.len().saturating_add(chunk.len()) > max {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(super) struct Lists {
    http: reqwest::Client,
    max_age: i64,
    cache: Mutex<HashMap<String, Arc<List>>>,
    /// One fetch at a time; the others wait for it and use what it got.
    fetching: tokio::sync::Mutex<()>,
}

impl Lists {
    pub fn new(http: reqwest::Client, max_age: i64) -> Self {
        Lists {
            http,
            max_age,
            cache: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, uri: &str, now: i64) -> Option<Arc<List>> {
        self.cache
            .lock()
            .get(uri)
            .filter(|l| now < l.fresh_until)
            .cloned()
    }

    /// The list `uri` (fetched from `fetch_url`) as it is at `now`, at most its `ttl` old.
    pub async fn get(
        &self,
        uri: &str,
        fetch_url: &str,
        now: i64,
        jwks: &Jwks,
        leeway: i64,
    ) -> Result<Arc<List>, ListError> {
        if let Some(l) = self.cached(uri, now) {
            return Ok(l);
        }
        let _one = self.fetching.lock().await;
        if let Some(l) = self.cached(uri, now) {
            return Ok(l);
        }
        let list = Arc::new(self.fetch(uri, fetch_url, now, jwks, leeway).await?);
        let mut cache = self.cache.lock();
        cache.retain(|_, l| now < l.fresh_until);
        if cache.len() >= MAX_LISTS {
            cache.clear();
        }
        if now < list.fresh_until {
            cache.insert(uri.to_string(), list.clone());
        }
        Ok(list)
    }

    async fn fetch(
        &self,
        uri: &str,
        fetch_url: &str,
        now: i64,
        jwks: &Jwks,
        leeway: i64,
    ) -> Result<List, ListError> {
        let unreachable = |e: FetchFailure| ListError::Unreachable(e);
        let resp = self
            .http
            .get(fetch_url)
            .header("accept", wire::MEDIA_TYPE)
            .send()
            .await
            .map_err(|e| unreachable(e.into()))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(ListError::Unknown),
            other => return Err(unreachable(FetchFailure::Status(other))),
        }
        let media_type_ok = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case(wire::MEDIA_TYPE))
            });
        if !media_type_ok {
            return Err(ListError::Invalid("not application/statuslist+jwt"));
        }
        let body = read_bounded(resp, MAX_LIST_JWT_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::Http(e) => unreachable(e.into()),
                ReadError::TooLarge => ListError::Invalid("larger than 4 MiB"),
            })?;
        let text = std::str::from_utf8(&body).map_err(|_| ListError::Invalid("not UTF-8"))?;
        let jwt = ParsedJwt::parse(text.trim(), MAX_LIST_JWT_BYTES)
            .map_err(|_| ListError::Invalid("not a compact JWS"))?;
        if jwt.header.typ.as_deref() != Some(wire::JWT_TYPE) {
            return Err(ListError::Invalid("`typ` is not `statuslist+jwt`"));
        }
        let kid = jwt
            .header
            .kid
            .as_deref()
            .ok_or(ListError::Invalid("no `kid`"))?;
        let key = jwks
            .key(kid)
            .await
            .map_err(|_| unreachable(FetchFailure::Keys))?
            .ok_or(ListError::Invalid("`kid` is not in the broker's JWKS"))?;
        if key.alg != jwt.header.alg || !jwt.signature_valid(&key.key, key.alg) {
            return Err(ListError::Invalid("the signature does not verify"));
        }
        let claims: StatusListClaims =
            serde_json::from_value(serde_json::Value::Object(jwt.claims))
                .map_err(|_| ListError::Invalid("the claims are not a status list's"))?;
        if claims.sub != uri {
            return Err(ListError::Invalid("`sub` is not the token's list"));
        }
        if claims.exp.saturating_add(leeway) <= now {
            return Err(ListError::Invalid("the list has expired"));
        }
        if claims.iat.saturating_sub(leeway) > now {
            return Err(ListError::Invalid("`iat` is in the future"));
        }
        let bytes = wire::decode(&claims.status_list)
            .map_err(|_| ListError::Invalid("`lst` cannot be decoded"))?;
        let ttl = i64::try_from(claims.ttl)
            .unwrap_or(i64::MAX)
            .min(self.max_age);
        Ok(List {
            bytes,
            fresh_until: now.saturating_add(ttl).min(claims.exp),
        })
    }
}
