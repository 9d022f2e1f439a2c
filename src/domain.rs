//! Newtypes that parse: wire strings become these at the edge, and the rest of Writ only
//! handles values that are already known to be well formed.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

/// Most scopes one request may name.
pub const MAX_SCOPES: usize = 32;
/// Longest scope token.
pub const MAX_SCOPE_LEN: usize = 128;
/// Most audiences one request may name.
pub const MAX_AUDIENCES: usize = 8;
/// Longest audience (SPEC §4.1).
pub const MAX_AUDIENCE_LEN: usize = 255;
/// Longest SPIFFE ID accepted (SPIFFE ID §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest task purpose (SPEC §4.1: 1 KiB).
pub const MAX_PURPOSE_LEN: usize = 1024;

/// Parses a SPIFFE ID strictly: the spiffe crate checks characters, segments and lengths,
/// and the input must already be in canonical form (lowercase scheme and trust domain), so
/// that `spiffe://Example.org/x` is refused rather than silently rewritten.
pub fn parse_spiffe_id(s: &str) -> Option<spiffe::SpiffeId> {
    // SPIFFE ID §2.3: implementations must support 2048 bytes; Writ accepts no more.
    if s.len() > MAX_SPIFFE_ID_LEN {
        return None;
    }
    let id = spiffe::SpiffeId::new(s).ok()?;
    (id.to_string() == s).then_some(id)
}

/// The normalised identity of a caller: a SPIFFE ID or `<issuer>#<sub>` for OIDC.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Subject(String);

impl Subject {
    pub fn spiffe(id: &spiffe::SpiffeId) -> Self {
        Subject(id.to_string())
    }
    pub fn oidc(issuer: &str, sub: &str) -> Self {
        Subject(format!("{issuer}#{sub}"))
    }
    /// A subject read back from our own store or our own token.
    pub fn from_trusted(s: String) -> Self {
        Subject(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// True when `pattern` is this subject, or a prefix ending in `/*` that covers it.
    pub fn matches(&self, pattern: &str) -> bool {
        subject_matches(&self.0, pattern)
    }

    /// The trust domain (SPIFFE) or issuer (OIDC) of this subject.
    pub fn issuer(&self) -> &str {
        issuer_of(&self.0)
    }
}

/// True when `pattern` is `subject`, or a prefix ending in `/*` that covers it.
pub fn subject_matches(subject: &str, pattern: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(prefix) => subject
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/')),
        None => subject == pattern,
    }
}

/// The trust domain (SPIFFE) or issuer (OIDC) of a subject.
pub fn issuer_of(subject: &str) -> &str {
    if let Some(rest) = subject.strip_prefix("spiffe://") {
        rest.split('/').next().unwrap_or(rest)
    } else {
        subject.split_once('#').map_or(subject, |(iss, _)| iss)
    }
}

#[cfg(test)]
mod subject_tests {
    use super::*;

    #[test]
    fn issuer_of_subjects() {
        assert_eq!(issuer_of("spiffe://example.org/agent/a"), "example.org");
        assert_eq!(
            issuer_of("https://issuer.example#repo:x#y"),
            "https://issuer.example"
        );
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The system random number generator failed. Nothing that needs an unguessable id can be
/// made; callers answer 503 rather than fall back to a weaker id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RngError;

/// `bytes` random bytes, base64url: an error, never an empty or partial value, when the
/// system RNG fails.
fn random_b64(bytes: usize) -> Result<String, RngError> {
    encode_random(bytes, |buf| {
        ring::rand::SystemRandom::new()
            .fill(buf)
            .map_err(|_| RngError)
    })
}

fn encode_random(
    bytes: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), RngError>,
) -> Result<String, RngError> {
    let mut buf = vec![0u8; bytes];
    fill(&mut buf)?;
    Ok(B64.encode(buf))
}

/// `prefix` and 128 random bits (22 base64url characters).
pub fn random_id(prefix: &str) -> Result<String, RngError> {
    Ok(format!("{prefix}{}", random_b64(16)?))
}

/// A task id (`txn`): `tsk_` and 128 random bits. A task delegated from another carries its
/// tree's root id before its own random part (`tsk_<root>.<own>`), so that every task of a
/// tree is found on one store shard (one Redis Cluster slot) from its id alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

/// Length of a root task id: `tsk_` and 22 base64url characters.
const ROOT_ID_LEN: usize = 26;

impl TaskId {
    pub fn generate() -> Result<Self, RngError> {
        random_id("tsk_").map(TaskId)
    }
    /// A fresh id for a task delegated within the tree of `parent`.
    pub fn generate_child(parent: &TaskId) -> Result<Self, RngError> {
        Ok(TaskId(format!("{}.{}", parent.root_str(), random_b64(16)?)))
    }
    /// Parses a caller-supplied task id; `None` when it cannot be one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("tsk_")?;
        let ok = |part: &str| part.len() == 22 && part.bytes().all(is_b64url);
        let valid = match rest.split_once('.') {
            None => ok(rest),
            Some((root, own)) => ok(root) && ok(own),
        };
        valid.then(|| TaskId(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The id of the root of this task's tree (itself for a root task).
    pub fn root_str(&self) -> &str {
        self.0.get(..ROOT_ID_LEN).unwrap_or(&self.0)
    }
    /// What follows the root id: empty for a root task, `.<own>` for a delegated one.
    pub fn within_root(&self) -> &str {
        self.0.get(ROOT_ID_LEN..).unwrap_or("")
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A token id (`jti`): 128 random bits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenId(String);

impl TokenId {
    pub fn generate() -> Result<Self, RngError> {
        random_b64(16).map(TokenId)
    }
    pub fn from_trusted(s: String) -> Self {
        TokenId(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One OAuth scope token (RFC 6749 §3.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scope(String);

impl Scope {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SCOPE_LEN
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        ok.then(|| Scope(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parses a space-separated scope parameter: every token valid, duplicates folded, order of
/// first appearance kept. `None` for an empty or malformed parameter.
pub fn parse_scopes(param: &str) -> Option<Vec<Scope>> {
    let mut out: Vec<Scope> = Vec::new();
    for part in param.split(' ') {
        let scope = Scope::parse(part)?;
        if !out.contains(&scope) {
            // Stop at the cap: the duplicate check is a scan, and a 64 KiB parameter would
            // otherwise make it quadratic in attacker-chosen input.
            if out.len() == MAX_SCOPES {
                return None;
            }
            out.push(scope);
        }
    }
    (!out.is_empty() && out.len() <= MAX_SCOPES).then_some(out)
}

/// Joins scopes into the space-separated wire form.
pub fn join_scopes(scopes: &[Scope]) -> String {
    let mut s = String::new();
    for (i, sc) in scopes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(sc.as_str());
    }
    s
}

/// A resource server a token is for: an absolute URI without fragment (RFC 8707) or a SPIFFE
/// ID, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Audience(String);

impl TryFrom<String> for Audience {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Audience::parse(&s).ok_or_else(|| {
            format!(
                "`{s}` is not an absolute URI without fragment or a SPIFFE ID of at most {MAX_AUDIENCE_LEN} bytes"
            )
        })
    }
}

impl From<Audience> for String {
    fn from(a: Audience) -> String {
        a.0
    }
}

impl Audience {
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty()
            || s.len() > MAX_AUDIENCE_LEN
            || s.contains('#')
            || s.bytes().any(|b| b <= 0x20 || b >= 0x7f)
        {
            return None;
        }
        if parse_spiffe_id(s).is_some() {
            return Some(Audience(s.to_string()));
        }
        if s.to_ascii_lowercase().starts_with("spiffe:") {
            return None;
        }
        // RFC 3986 first, on the text as given: a URL parser forgives (`\` for `/`, bad
        // percent-encoding, `<`, `{`), and the audience is compared as this exact string.
        if !is_rfc3986_absolute_uri(s) {
            return None;
        }
        let url = url::Url::parse(s).ok()?;
        if url.cannot_be_a_base() && !matches!(url.scheme(), "urn") {
            return None;
        }
        if matches!(url.scheme(), "http" | "https") && url.host_str().is_none_or(str::is_empty) {
            return None;
        }
        Some(Audience(s.to_string()))
    }
    /// An OIDC subject `<issuer>#<sub>` as an audience: accepted only where a delegation
    /// grant names its sub-agent (SPEC §4.4). The issuer must be an audience itself, the
    /// `sub` non-empty, the whole within the usual bounds.
    pub fn parse_oidc_subject(s: &str) -> Option<Self> {
        let (issuer, sub) = s.split_once('#')?;
        if sub.is_empty() || s.len() > MAX_AUDIENCE_LEN || s.bytes().any(|b| b <= 0x20 || b >= 0x7f)
        {
            return None;
        }
        Audience::parse(issuer).map(|_| Audience(s.to_string()))
    }
    /// The issuer of an OIDC subject audience (`<issuer>#<sub>`), `None` for any other.
    pub fn oidc_issuer(&self) -> Option<&str> {
        self.0.split_once('#').map(|(issuer, _)| issuer)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An absolute URI by RFC 3986's grammar, checked on the characters: a scheme (`ALPHA
/// *( ALPHA / DIGIT / "+" / "-" / "." )`) and `:`, then only unreserved, reserved and
/// well-formed percent-encoded characters (a fragment is refused by the caller).
fn is_rfc3986_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut scheme_chars = scheme.bytes();
    if !scheme_chars.next().is_some_and(|b| b.is_ascii_alphabetic())
        || !scheme_chars.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        || rest.is_empty()
    {
        return false;
    }
    let bytes = rest.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        let allowed = b.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=".contains(&b);
        if !allowed {
            return false;
        }
        i += 1;
    }
    true
}

/// Why a list of requested audiences was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudienceListError<'a> {
    /// A value that is not an audience (the raw value, for the error description).
    Invalid(&'a str),
    /// More than [`MAX_AUDIENCES`] distinct values.
    TooMany,
}

/// Parses the repeated `audience` / `resource` parameters: every value valid, duplicates
/// folded, order of first appearance kept, at most [`MAX_AUDIENCES`] distinct values.
///
/// The bound is applied as the values are read, before any value past it is parsed or
/// compared: a 64 KiB body holds thousands of values, and parsing and de-duplicating all of
/// them before counting would let an unauthenticated caller buy quadratic work.
pub fn parse_audiences<'a>(
    raws: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Audience>, AudienceListError<'a>> {
    parse_audiences_with(raws, false)
}

/// As [`parse_audiences`]; with `oidc_subjects`, an OIDC subject (`<issuer>#<sub>`) is also
/// an audience (a delegation grant naming an OIDC sub-agent).
pub fn parse_audiences_with<'a>(
    raws: impl IntoIterator<Item = &'a str>,
    oidc_subjects: bool,
) -> Result<Vec<Audience>, AudienceListError<'a>> {
    let mut audiences: Vec<Audience> = Vec::with_capacity(MAX_AUDIENCES);
    for raw in raws {
        // An audience is its raw value, so equal values are equal audiences; the scan is
        // over at most MAX_AUDIENCES entries.
        if audiences.iter().any(|a| a.as_str() == raw) {
            continue;
        }
        if audiences.len() == MAX_AUDIENCES {
            return Err(AudienceListError::TooMany);
        }
        let parsed = Audience::parse(raw).or_else(|| {
            oidc_subjects
                .then(|| Audience::parse_oidc_subject(raw))
                .flatten()
        });
        audiences.push(parsed.ok_or(AudienceListError::Invalid(raw))?);
    }
    Ok(audiences)
}

/// Unix time in seconds.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> i64;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| secs_i64(d.as_secs()))
            .unwrap_or(0)
    }
}

/// Seconds as a signed offset, saturating (no duration Writ handles comes near the bound).
pub fn secs_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// A duration in whole seconds as a signed offset, saturating.
pub fn duration_secs(d: std::time::Duration) -> i64 {
    secs_i64(d.as_secs())
}

/// A duration in whole milliseconds, saturating.
pub fn duration_millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A clock that only moves when told: tests cross TTLs by advancing it.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: i64) -> Self {
        ManualClock(AtomicI64::new(start))
    }
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    pub fn set(&self, t: i64) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Hex SHA-256, used wherever a secret must be named without being kept (admin tokens,
/// tokens in the decision log).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_strictly() {
        let s = parse_scopes("repo:read repo:write repo:read").unwrap();
        assert_eq!(join_scopes(&s), "repo:read repo:write");
        assert!(parse_scopes("").is_none());
        assert!(parse_scopes(" repo:read").is_none());
        assert!(parse_scopes("repo:read  x").is_none());
        assert!(parse_scopes("a\"b").is_none());
        assert!(parse_scopes("a\\b").is_none());
        assert!(parse_scopes("x ".repeat(33).trim_end()).is_some_and(|v| v.len() == 1));
        let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
        assert!(parse_scopes(&many.join(" ")).is_none());
    }

    #[test]
    fn audiences_are_absolute_uris_or_spiffe_ids() {
        assert!(Audience::parse("https://api.example.org").is_some());
        assert!(Audience::parse("https://api.example.org/v1?x=1").is_some());
        assert!(Audience::parse("spiffe://example.org/svc/api").is_some());
        assert!(Audience::parse("urn:example:api").is_some());
        assert!(Audience::parse("api").is_none());
        assert!(Audience::parse("/relative").is_none());
        assert!(Audience::parse("https://api.example.org/#frag").is_none());
        assert!(Audience::parse("spiffe://Example.org/x").is_none());
        assert!(Audience::parse("https://a b").is_none());
        assert!(Audience::parse(&format!("https://a.org/{}", "x".repeat(250))).is_none());
        assert!(Audience::parse("").is_none());
    }

    #[test]
    fn audience_lists_fold_duplicates_and_are_bounded() {
        let a = parse_audiences(["https://a.org", "urn:x", "https://a.org"]).unwrap();
        let got: Vec<&str> = a.iter().map(Audience::as_str).collect();
        assert_eq!(got, ["https://a.org", "urn:x"]);
        assert_eq!(
            parse_audiences(["https://a.org", "api"]),
            Err(AudienceListError::Invalid("api"))
        );
        let eight: Vec<String> = (0..8).map(|i| format!("urn:a:{i}")).collect();
        assert_eq!(
            parse_audiences(eight.iter().map(String::as_str))
                .unwrap()
                .len(),
            8
        );
        // The same value many times is one audience.
        let same = vec!["urn:a:0"; 5000];
        assert_eq!(parse_audiences(same).unwrap().len(), 1);
    }

    #[test]
    fn audience_lists_stop_at_the_first_value_past_the_bound() {
        // 3,400 distinct values: the refusal must come from the 9th, without reading (let
        // alone parsing and comparing) the rest, so the work does not grow with the input.
        let values: Vec<String> = (0..3400).map(|i| format!("urn:a:{i}")).collect();
        let pulled = std::cell::Cell::new(0usize);
        let result = parse_audiences(values.iter().map(|v| {
            pulled.set(pulled.get() + 1);
            v.as_str()
        }));
        assert_eq!(result, Err(AudienceListError::TooMany));
        assert_eq!(pulled.get(), MAX_AUDIENCES + 1);
        // A malformed value after the bound is never looked at: the answer is the bound.
        let mut values: Vec<&str> = values.iter().take(9).map(String::as_str).collect();
        values.push("not an audience");
        assert_eq!(parse_audiences(values), Err(AudienceListError::TooMany));
    }

    #[test]
    fn spiffe_ids_parse_strictly() {
        assert!(parse_spiffe_id("spiffe://example.org/agent/demo").is_some());
        assert!(parse_spiffe_id("spiffe://example.org").is_some());
        for bad in [
            "spiffe://Example.org/a",
            "SPIFFE://example.org/a",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/./a",
            "spiffe://example.org//a",
            "spiffe://example.org/a/",
            "spiffe://example.org/a%20b",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org:8443/a",
            "spiffe://user@example.org/a",
            "https://example.org/a",
            "spiffe:///a",
        ] {
            assert!(parse_spiffe_id(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn subject_patterns() {
        let s = Subject::from_trusted("spiffe://example.org/agent/demo".into());
        assert!(s.matches("spiffe://example.org/agent/demo"));
        assert!(s.matches("spiffe://example.org/agent/*"));
        assert!(s.matches("spiffe://example.org/*"));
        assert!(!s.matches("spiffe://example.org/age/*"));
        assert!(!s.matches("spiffe://example.org/agent/demo/*"));
    }

    #[test]
    fn ids_are_random_and_parse_back() {
        let a = TaskId::generate().unwrap();
        assert_ne!(a, TaskId::generate().unwrap());
        assert_eq!(TaskId::parse(a.as_str()), Some(a.clone()));
        assert!(TaskId::parse("tsk_short").is_none());
        let child = TaskId::generate_child(&a).unwrap();
        assert_eq!(TaskId::parse(child.as_str()), Some(child.clone()));
        assert_eq!(child.root_str(), a.as_str());
        assert_eq!(a.root_str(), a.as_str());
        assert_eq!(a.within_root(), "");
        // A grandchild keeps the root, not its parent, in front.
        let grandchild = TaskId::generate_child(&child).unwrap();
        assert_eq!(grandchild.root_str(), a.as_str());
        assert_eq!(grandchild.as_str().len(), child.as_str().len());
        assert!(TaskId::parse(&format!("{}.x", a.as_str())).is_none());
        assert!(TaskId::parse(&format!("{}.{}", child.as_str(), &child.as_str()[4..26])).is_none());
        assert_eq!(TokenId::generate().unwrap().as_str().len(), 22);
        assert_eq!(random_id("rev_").unwrap().len(), 26);
    }

    #[test]
    fn a_failing_rng_is_an_error_not_an_empty_id() {
        assert_eq!(encode_random(16, |_| Err(RngError)), Err(RngError));
        assert_eq!(
            encode_random(3, |b| {
                b.fill(0xff);
                Ok(())
            }),
            Ok("____".to_string())
        );
    }
}
