//! Typed configuration: TOML, then `WRIT_` environment overrides (`__` nests), unknown keys
//! refused, every value validated with the offending key named.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::domain::Audience;

/// A configuration error that names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("config error at `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration ({e})")))
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub tokens: TokensConfig,
    #[serde(default)]
    pub tasks: TasksConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub spiffe: SpiffeConfig,
    #[serde(default)]
    pub oidc: OidcConfig,
    pub policy: PolicyConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub introspection: IntrospectionConfig,
    #[serde(default)]
    pub trips: Option<TripsConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Approval gates (SPEC §4.7); without this section an `@approval("required")` permit
    /// refuses, as nobody could approve.
    #[serde(default)]
    pub approvals: Option<ApprovalsConfig>,
    #[serde(default)]
    pub dpop: DpopConfig,
    #[serde(default)]
    pub status: StatusConfig,
}

/// `[dpop]`: sender-constrained tokens (RFC 9449, SPEC §4.5).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DpopConfig {
    /// Proofs must carry a nonce the broker issued (RFC 9449 §8): a proof without the current
    /// one is answered `use_dpop_nonce` with a `DPoP-Nonce` header.
    #[serde(default)]
    pub require_nonce: bool,
}

/// `[status]`: the token status lists (draft-ietf-oauth-status-list, SPEC §4.6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// The list's `ttl` claim and `Cache-Control: max-age`: how stale a verifier may be.
    #[serde(default = "default_status_ttl", deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Indexes per list; a full list rolls over to a new one.
    #[serde(default = "default_status_list_size")]
    pub list_size: u32,
}

fn default_status_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_status_list_size() -> u32 {
    1 << 20
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            ttl: default_status_ttl(),
            list_size: default_status_list_size(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Workload identities that may approve (subjects or prefixes ending in `/*`).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Bearer approver tokens, by the hex SHA-256 of the token.
    #[serde(default)]
    pub token_sha256: Vec<String>,
    /// How long a request waits for its decision.
    #[serde(default = "default_approval_ttl", deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// How often a client may poll (the `interval` of the pending answer).
    #[serde(
        default = "default_approval_interval",
        deserialize_with = "de_duration"
    )]
    pub interval: Duration,
    /// Different approvers needed to approve (2 for a two-person rule).
    #[serde(default = "default_min_approvers")]
    pub min_approvers: u32,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
}

fn default_approval_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_approval_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_min_approvers() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where each new approval request is POSTed.
    pub url: String,
    /// The HMAC-SHA256 key of the `Writ-Signature` header.
    pub secret: WebhookSecret,
}

/// A webhook's signing secret: never printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub issuer: String,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A request's headers must arrive within this (for a new connection: from accept; on
    /// a kept-alive one: from the request's first byte).
    #[serde(default = "default_header_timeout", deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// A request's body must arrive within this, counted from the end of its headers.
    #[serde(default = "default_body_timeout", deserialize_with = "de_duration")]
    pub body_timeout: Duration,
    /// A kept-alive connection with no request in progress is closed after this.
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Connections served at once; past it new connections wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest request line and headers together; a larger head is answered 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u32,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> u32 {
    10_000
}
fn default_max_header_bytes() -> u32 {
    16 * 1024
}

/// Most connections one listener may be told to serve at once.
pub const MAX_MAX_CONNECTIONS: u32 = 1_000_000;

/// `[metrics]`: where `/metrics` is served.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address only (and not on `server.listen`).
    #[serde(default)]
    pub listen: Option<String>,
}

/// `[server.tls]`: TLS on the main listener (SPEC §4.8).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of the leaf.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Serve with the broker's own X509-SVID from the SPIFFE Workload API.
    #[serde(default)]
    pub workload_api: Option<String>,
    /// Ask TLS clients for an X509-SVID (`"optional"`) or not (`"none"`, the default).
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Whether the main listener asks TLS clients for a certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    None,
    /// A client certificate is asked for, not required; one presented is verified as an
    /// X509-SVID where a request relies on it.
    Optional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    #[serde(default = "default_ttl", deserialize_with = "de_duration")]
    pub default_ttl: Duration,
    #[serde(default = "default_max_ttl", deserialize_with = "de_duration")]
    pub max_ttl: Duration,
    /// Parsed as it loads: a bad value is refused with this key named.
    #[serde(default)]
    pub default_audience: Option<Audience>,
    /// Space-separated scopes granted-if-allowed when a request names none (RFC 6749 §3.3).
    #[serde(default)]
    pub default_scope: Option<String>,
    #[serde(default)]
    pub signing_keys: Vec<PathBuf>,
}

impl TokensConfig {
    /// The parsed `default_scope` (empty when unset; `validate` refuses a malformed one).
    pub fn default_scopes(&self) -> Vec<crate::domain::Scope> {
        self.default_scope
            .as_deref()
            .and_then(crate::domain::parse_scopes)
            .unwrap_or_default()
    }
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(900)
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            default_ttl: default_ttl(),
            max_ttl: default_max_ttl(),
            default_audience: None,
            default_scope: None,
            signing_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksConfig {
    #[serde(default = "default_max_duration", deserialize_with = "de_duration")]
    pub max_duration: Duration,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// How deep a chain of delegations may go: a root task is depth 0 (SPEC §4.4).
    #[serde(default = "default_max_delegation_depth")]
    pub max_delegation_depth: u32,
}

fn default_max_duration() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_tokens() -> u32 {
    50
}
fn default_max_delegation_depth() -> u32 {
    3
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            max_duration: default_max_duration(),
            max_tokens: default_max_tokens(),
            max_delegation_depth: default_max_delegation_depth(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StoreBackend {
    #[default]
    Memory,
    Redis,
    RedisCluster,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: StoreBackend,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// How old the replica's view of the revocation feed may be before introspection and
    /// exchanges answer 503.
    #[serde(default = "default_max_staleness", deserialize_with = "de_duration")]
    pub max_staleness: Duration,
}

fn default_max_staleness() -> Duration {
    Duration::from_secs(5)
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::default(),
            url: None,
            nodes: Vec::new(),
            key_prefix: None,
            max_staleness: default_max_staleness(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SpiffeConfig {
    #[serde(default)]
    pub trust_domains: Vec<TrustDomainConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDomainConfig {
    pub name: String,
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    #[serde(default)]
    pub bundle_endpoint: Option<String>,
    #[serde(default)]
    pub workload_api: Option<String>,
    /// Extra trust anchors (PEM) for the TLS of `bundle_endpoint`, next to the web PKI roots.
    #[serde(default)]
    pub bundle_endpoint_ca: Option<PathBuf>,
    /// The shortest wait between two fetches of `bundle_endpoint`, whatever its
    /// `spiffe_refresh_hint` says.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub refresh_hint_min: Option<Duration>,
    /// The longest wait between two fetches of `bundle_endpoint`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub refresh_hint_max: Option<Duration>,
    /// How long a `bundle_endpoint` bundle is used after its last successful fetch before
    /// the trust domain fails closed.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_bundle_age: Option<Duration>,
    pub audience: String,
}

/// Defaults and bounds of a bundle endpoint's refresh (SPIFFE federation, `https_web`).
pub mod bundle_refresh {
    use std::time::Duration;
    /// `refresh_hint_min` when unset.
    pub const DEFAULT_MIN: Duration = Duration::from_secs(30);
    /// `refresh_hint_max` when unset.
    pub const DEFAULT_MAX: Duration = Duration::from_secs(3600);
    /// The refresh interval when a bundle carries no `spiffe_refresh_hint` (as SPIRE).
    pub const DEFAULT_HINT: Duration = Duration::from_secs(300);
    /// `max_bundle_age` when unset.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
    /// The smallest `refresh_hint_min` accepted.
    pub const FLOOR: Duration = Duration::from_secs(1);
}

impl TrustDomainConfig {
    /// The configured bounds of a bundle endpoint's refresh: (min, max, max bundle age).
    pub fn refresh_bounds(&self) -> (Duration, Duration, Duration) {
        (
            self.refresh_hint_min.unwrap_or(bundle_refresh::DEFAULT_MIN),
            self.refresh_hint_max.unwrap_or(bundle_refresh::DEFAULT_MAX),
            self.max_bundle_age
                .unwrap_or(bundle_refresh::DEFAULT_MAX_AGE),
        )
    }
}

/// A Workload API endpoint as `SPIFFE_ENDPOINT_SOCKET` spells it: `unix:///absolute/path`
/// (or `unix:/absolute/path`), or `tcp://IP:port`.
pub fn check_workload_api_socket(url: &str) -> Result<(), String> {
    match spiffe::transport::Endpoint::parse(url) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "`{url}` is not a Workload API endpoint (unix:///path/to/agent.sock or \
             tcp://IP:port): {e}"
        )),
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    #[serde(default)]
    pub issuers: Vec<OidcIssuerEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerEntry {
    pub issuer: String,
    pub audience: String,
    /// Audiences an ID token may carry besides `audience` (OIDC Core §3.1.3.7 item 3: a
    /// token with any other audience is refused).
    #[serde(default)]
    pub allowed_extra_audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub dir: PathBuf,
    /// A reload that loses more than this share of the policies at once is refused.
    #[serde(default = "default_max_drop_share")]
    pub max_drop_share: f64,
    /// Accept reloads that empty the set or shrink it past `max_drop_share`.
    #[serde(default)]
    pub allow_empty: bool,
}

fn default_max_drop_share() -> f64 {
    0.5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default = "default_audit_path")]
    pub path: String,
    /// A signed checkpoint after at most this many records...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ...or after this long, whichever comes first.
    #[serde(
        default = "default_checkpoint_interval",
        deserialize_with = "de_duration"
    )]
    pub checkpoint_interval: Duration,
    /// Refused unauthenticated callers: full records per source IP and minute; past it they
    /// are counted into one summary record per source and minute.
    #[serde(default = "default_unauthenticated_per_minute")]
    pub unauthenticated_per_minute: u32,
    /// How many sources are tracked per minute; failures of further sources are counted into
    /// one "other sources" summary.
    #[serde(default = "default_unauthenticated_max_sources")]
    pub unauthenticated_max_sources: u32,
}

fn default_audit_path() -> String {
    "audit/decisions.jsonl".into()
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_unauthenticated_per_minute() -> u32 {
    20
}
fn default_unauthenticated_max_sources() -> u32 {
    1000
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: default_audit_path(),
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval: default_checkpoint_interval(),
            unauthenticated_per_minute: default_unauthenticated_per_minute(),
            unauthenticated_max_sources: default_unauthenticated_max_sources(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub token_sha256: Vec<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    /// Serve `/admin/v1/*` on this address only (and not on `server.listen`).
    #[serde(default)]
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    #[serde(default)]
    pub principals: Vec<String>,
    /// RFC 7662 §4: introspection principals mapped to the audiences they serve.
    #[serde(default)]
    pub resources: Vec<IntrospectionResource>,
}

/// A resource server that sees only tokens meant for it: a token whose `aud` does not
/// intersect `audiences` introspects as inactive for `principal`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionResource {
    /// An exact subject (no `/*` prefix).
    pub principal: String,
    /// Parsed as it loads: a bad value is refused with this key named.
    pub audiences: Vec<Audience>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountWindow {
    pub count: u32,
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripsConfig {
    #[serde(default)]
    pub denials: Option<CountWindow>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub quarantine: Option<Duration>,
    #[serde(default)]
    pub exchange_rate: Option<CountWindow>,
    #[serde(default)]
    pub max_scopes_per_task: Option<u32>,
    #[serde(default)]
    pub reevaluate_on_policy_change: bool,
}

impl Config {
    /// Reads a file, applies `WRIT_` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("<file>", format!("cannot read `{}`: {e}", path.display()))
        })?;
        Self::from_toml_with_env(&text, std::env::vars())
    }

    /// Parses TOML text, overlays the given `WRIT_*` variables, validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let before = text.get(..span.start).unwrap_or("");
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |c| c.chars().count()) + 1;
                format!(" at line {line}, column {col}")
            });
            ConfigError::new(
                "<file>",
                format!("not valid TOML{at}: {}", e.message().trim()),
            )
        })?;
        apply_env(&mut root, env)?;
        let value = toml::Value::Table(root);
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                "<root>".to_string()
            } else {
                path
            };
            ConfigError::new(key, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field and value checks, one section at a time. File contents (keys, bundles,
    /// policies) are checked when the application is built, with the same key naming.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_tokens()?;
        self.validate_tasks()?;
        self.validate_store()?;
        self.validate_spiffe()?;
        self.validate_oidc()?;
        self.validate_access()?;
        self.validate_policy()?;
        self.validate_approvals()?;
        self.validate_status()?;
        self.validate_trips()
    }

    fn validate_status(&self) -> Result<(), ConfigError> {
        if self.status.ttl.as_secs() == 0 || self.status.ttl > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "status.ttl",
                "must be between 1s and 1h: verifiers may be this stale",
            ));
        }
        if !(8..=(1 << 24)).contains(&self.status.list_size) {
            return Err(ConfigError::new(
                "status.list_size",
                "must be between 8 and 16777216 indexes",
            ));
        }
        Ok(())
    }

    fn validate_approvals(&self) -> Result<(), ConfigError> {
        let Some(a) = &self.approvals else {
            return Ok(());
        };
        check_patterns("approvals.principals", &a.principals)?;
        for (i, h) in a.token_sha256.iter().enumerate() {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::new(
                    format!("approvals.token_sha256[{i}]"),
                    "must be 64 hex digits (the SHA-256 of an approver token)",
                ));
            }
        }
        if a.principals.is_empty() && a.token_sha256.is_empty() {
            return Err(ConfigError::new(
                "approvals.principals",
                "approvals need at least one approver (principals or token_sha256)",
            ));
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(24 * 3600)).contains(&a.ttl) {
            return Err(ConfigError::new(
                "approvals.ttl",
                "must be between 10s and 24h",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&a.interval) {
            return Err(ConfigError::new(
                "approvals.interval",
                "must be between 1s and 60s",
            ));
        }
        let tokens_only = a.principals.is_empty();
        if a.min_approvers == 0
            || a.min_approvers > 10
            || (tokens_only && a.min_approvers as usize > a.token_sha256.len())
        {
            return Err(ConfigError::new(
                "approvals.min_approvers",
                "must be between 1 and 10, and no more than the approvers configured",
            ));
        }
        if let Some(w) = &a.webhook {
            let url = url::Url::parse(&w.url)
                .map_err(|_| ConfigError::new("approvals.webhook.url", "is not an absolute URL"))?;
            if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
                return Err(ConfigError::new(
                    "approvals.webhook.url",
                    "must be an http or https URL",
                ));
            }
            if w.secret.expose().len() < 16 {
                return Err(ConfigError::new(
                    "approvals.webhook.secret",
                    "must be at least 16 bytes",
                ));
            }
        }
        Ok(())
    }

    fn validate_policy(&self) -> Result<(), ConfigError> {
        let share = self.policy.max_drop_share;
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(ConfigError::new(
                "policy.max_drop_share",
                "must be a share greater than 0 and at most 1 (0.5 = half the policies)",
            ));
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        s.listen.parse::<SocketAddr>().map_err(|_| {
            ConfigError::new(
                "server.listen",
                format!("`{}` is not a host:port socket address", s.listen),
            )
        })?;
        check_server_issuer(&s.issuer)?;
        check_duration_range(
            "server.header_timeout",
            s.header_timeout,
            Duration::from_millis(100),
            Duration::from_secs(300),
            "100ms and 5m",
        )?;
        check_duration_range(
            "server.body_timeout",
            s.body_timeout,
            Duration::from_millis(100),
            Duration::from_secs(300),
            "100ms and 5m",
        )?;
        check_duration_range(
            "server.idle_timeout",
            s.idle_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
            "100ms and 1h",
        )?;
        if s.max_connections == 0 || s.max_connections > MAX_MAX_CONNECTIONS {
            return Err(ConfigError::new(
                "server.max_connections",
                format!("must be between 1 and {MAX_MAX_CONNECTIONS}"),
            ));
        }
        if !(8 * 1024..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        self.validate_listeners()?;
        if let Some(tls) = &s.tls {
            validate_tls(tls)?;
        }

        Ok(())
    }

    /// `metrics.listen` and `admin.listen` are socket addresses, each its own (a `:0` port
    /// is a fresh one every time, so it never clashes).
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let main = self.server.listen.parse::<SocketAddr>().ok();
        let metrics = parse_listen("metrics.listen", self.metrics.listen.as_deref())?;
        if metrics.is_some_and(|m| m.port() != 0 && Some(m) == main) {
            return Err(ConfigError::new(
                "metrics.listen",
                "must differ from server.listen (leave it unset to serve /metrics there)",
            ));
        }
        let admin = parse_listen("admin.listen", self.admin.listen.as_deref())?;
        if admin.is_some_and(|a| a.port() != 0 && Some(a) == main) {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from server.listen (leave it unset to serve /admin/v1 there)",
            ));
        }
        if admin.is_some_and(|a| a.port() != 0 && Some(a) == metrics) {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from metrics.listen",
            ));
        }
        Ok(())
    }

    fn validate_tokens(&self) -> Result<(), ConfigError> {
        let t = &self.tokens;
        if t.default_ttl.is_zero() {
            return Err(ConfigError::new(
                "tokens.default_ttl",
                "must be greater than zero",
            ));
        }
        if t.max_ttl.is_zero() || t.max_ttl > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::new(
                "tokens.max_ttl",
                "must be between 1s and 24h",
            ));
        }
        if t.default_ttl > t.max_ttl {
            return Err(ConfigError::new(
                "tokens.default_ttl",
                "must not exceed tokens.max_ttl",
            ));
        }
        if t.signing_keys.is_empty() {
            return Err(ConfigError::new(
                "tokens.signing_keys",
                "at least one signing key is required",
            ));
        }
        if let Some(scope) = &t.default_scope
            && crate::domain::parse_scopes(scope).is_none()
        {
            return Err(ConfigError::new(
                "tokens.default_scope",
                "must be up to 32 scope tokens separated by single spaces",
            ));
        }

        Ok(())
    }

    fn validate_tasks(&self) -> Result<(), ConfigError> {
        if self.tasks.max_duration.is_zero() {
            return Err(ConfigError::new(
                "tasks.max_duration",
                "must be greater than zero",
            ));
        }
        if self.tasks.max_tokens == 0 {
            return Err(ConfigError::new("tasks.max_tokens", "must be at least 1"));
        }
        if self.tasks.max_delegation_depth > 16 {
            return Err(ConfigError::new(
                "tasks.max_delegation_depth",
                "must be at most 16",
            ));
        }

        Ok(())
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        match self.store.backend {
            StoreBackend::Memory => {}
            StoreBackend::Redis => {
                let url = self.store.url.as_deref().unwrap_or("");
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("redis+unix://"))
                {
                    return Err(ConfigError::new(
                        "store.url",
                        "backend \"redis\" needs a redis:// or rediss:// URL",
                    ));
                }
            }
            StoreBackend::RedisCluster => {
                if self.store.nodes.is_empty() {
                    return Err(ConfigError::new(
                        "store.nodes",
                        "backend \"redis-cluster\" needs at least one node URL",
                    ));
                }
                for (i, n) in self.store.nodes.iter().enumerate() {
                    if !(n.starts_with("redis://") || n.starts_with("rediss://")) {
                        return Err(ConfigError::new(
                            format!("store.nodes[{i}]"),
                            format!("`{n}` is not a redis:// URL"),
                        ));
                    }
                }
            }
        }
        if self.store.max_staleness < Duration::from_millis(500)
            || self.store.max_staleness > Duration::from_secs(300)
        {
            return Err(ConfigError::new(
                "store.max_staleness",
                "must be between 500ms and 5m",
            ));
        }
        if let Some(p) = &self.store.key_prefix
            && (p.is_empty() || p.len() > 64 || p.contains(['{', '}']))
        {
            return Err(ConfigError::new(
                "store.key_prefix",
                "must be 1-64 characters without `{` or `}`",
            ));
        }

        Ok(())
    }

    fn validate_spiffe(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, td) in self.spiffe.trust_domains.iter().enumerate() {
            let key = |k: &str| format!("spiffe.trust_domains[{i}].{k}");
            if spiffe::TrustDomain::new(&td.name).is_err() || td.name.contains("://") {
                return Err(ConfigError::new(
                    key("name"),
                    format!("`{}` is not a valid trust domain name", td.name),
                ));
            }
            if !names.insert(td.name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("trust domain `{}` is configured twice", td.name),
                ));
            }
            if td.audience.is_empty() {
                return Err(ConfigError::new(key("audience"), "must not be empty"));
            }
            self.validate_trust_source(td, &key)?;
        }

        Ok(())
    }

    /// Exactly one bundle source per trust domain, each well-formed; the endpoint's refresh
    /// keys only with an endpoint.
    fn validate_trust_source(
        &self,
        td: &TrustDomainConfig,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let set: Vec<&str> = [
            ("bundle_file", td.bundle_file.is_some()),
            ("bundle_endpoint", td.bundle_endpoint.is_some()),
            ("workload_api", td.workload_api.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
        match set.as_slice() {
            [] => {
                return Err(ConfigError::new(
                    key("bundle_file"),
                    "a trust domain needs one bundle source: bundle_file, bundle_endpoint or \
                     workload_api",
                ));
            }
            [_] => {}
            [first, second, ..] => {
                return Err(ConfigError::new(
                    key(second),
                    format!(
                        "a trust domain has exactly one bundle source; `{first}` is already set"
                    ),
                ));
            }
        }
        if let Some(url) = &td.workload_api {
            check_workload_api_socket(url).map_err(|m| ConfigError::new(key("workload_api"), m))?;
        }
        let endpoint_only = [
            ("bundle_endpoint_ca", td.bundle_endpoint_ca.is_some()),
            ("refresh_hint_min", td.refresh_hint_min.is_some()),
            ("refresh_hint_max", td.refresh_hint_max.is_some()),
            ("max_bundle_age", td.max_bundle_age.is_some()),
        ];
        let Some(url) = &td.bundle_endpoint else {
            if let Some((k, _)) = endpoint_only.iter().find(|(_, on)| *on) {
                return Err(ConfigError::new(
                    key(k),
                    "applies to a bundle_endpoint source only",
                ));
            }
            return Ok(());
        };
        match url::Url::parse(url) {
            Ok(u) if u.scheme() == "https" && u.host_str().is_some() => {}
            Ok(_) => {
                return Err(ConfigError::new(
                    key("bundle_endpoint"),
                    format!("`{url}` is not an https URL (SPIFFE federation, https_web profile)"),
                ));
            }
            Err(e) => {
                return Err(ConfigError::new(
                    key("bundle_endpoint"),
                    format!("`{url}` is not a URL: {e}"),
                ));
            }
        }
        let (min, max, max_age) = td.refresh_bounds();
        if min < bundle_refresh::FLOOR {
            return Err(ConfigError::new(
                key("refresh_hint_min"),
                "must be at least 1s",
            ));
        }
        if max < min {
            return Err(ConfigError::new(
                key("refresh_hint_max"),
                format!(
                    "must not be shorter than refresh_hint_min ({})",
                    humantime::format_duration(min)
                ),
            ));
        }
        if max_age <= max {
            return Err(ConfigError::new(
                key("max_bundle_age"),
                format!(
                    "must be longer than refresh_hint_max ({}): a bundle would go stale \
                     between two refreshes",
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(())
    }

    fn validate_oidc(&self) -> Result<(), ConfigError> {
        let mut issuers = HashSet::new();
        for (i, iss) in self.oidc.issuers.iter().enumerate() {
            let key = |k: &str| format!("oidc.issuers[{i}].{k}");
            check_issuer_url(&key("issuer"), &iss.issuer)?;
            if !issuers.insert(iss.issuer.clone()) {
                return Err(ConfigError::new(
                    key("issuer"),
                    format!("issuer `{}` is configured twice", iss.issuer),
                ));
            }
            if iss.audience.is_empty() {
                return Err(ConfigError::new(key("audience"), "must not be empty"));
            }
            if let Some(u) = &iss.jwks_uri {
                check_issuer_url(&key("jwks_uri"), u)?;
            }
        }

        Ok(())
    }

    fn validate_access(&self) -> Result<(), ConfigError> {
        if self.audit.path.is_empty() {
            return Err(ConfigError::new(
                "audit.path",
                "must be a file path or \"-\"",
            ));
        }
        let a = &self.audit;
        if !(1..=1_000_000).contains(&a.checkpoint_every) {
            return Err(ConfigError::new(
                "audit.checkpoint_every",
                "must be between 1 and 1000000 records",
            ));
        }
        if a.checkpoint_interval < Duration::from_secs(1)
            || a.checkpoint_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError::new(
                "audit.checkpoint_interval",
                "must be between 1s and 1h",
            ));
        }
        if a.unauthenticated_per_minute > 100_000 {
            return Err(ConfigError::new(
                "audit.unauthenticated_per_minute",
                "must be at most 100000 (0 summarises every failure)",
            ));
        }
        if !(1..=1_000_000).contains(&a.unauthenticated_max_sources) {
            return Err(ConfigError::new(
                "audit.unauthenticated_max_sources",
                "must be between 1 and 1000000",
            ));
        }
        for (i, h) in self.admin.token_sha256.iter().enumerate() {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::new(
                    format!("admin.token_sha256[{i}]"),
                    "must be 64 hex digits (the SHA-256 of an admin token)",
                ));
            }
        }
        check_patterns("admin.principals", &self.admin.principals)?;
        check_patterns("introspection.principals", &self.introspection.principals)?;
        self.validate_introspection_resources()
    }

    fn validate_introspection_resources(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (i, r) in self.introspection.resources.iter().enumerate() {
            let key = |k: &str| format!("introspection.resources[{i}].{k}");
            let exact = if r.principal.starts_with("spiffe://") {
                crate::domain::parse_spiffe_id(&r.principal).is_some()
            } else {
                r.principal.contains('#') && !r.principal.ends_with("/*")
            };
            if !exact {
                return Err(ConfigError::new(
                    key("principal"),
                    "must be an exact subject (a SPIFFE ID or issuer#sub), not a prefix",
                ));
            }
            if !seen.insert(r.principal.as_str()) {
                return Err(ConfigError::new(
                    key("principal"),
                    "this principal is mapped twice",
                ));
            }
            if r.audiences.is_empty() {
                return Err(ConfigError::new(key("audiences"), "must not be empty"));
            }
        }

        Ok(())
    }

    fn validate_trips(&self) -> Result<(), ConfigError> {
        let Some(tr) = &self.trips else {
            return Ok(());
        };
        if let Some(d) = tr.denials {
            check_count_window("trips.denials", d)?;
            if tr.quarantine.is_none_or(|q| q.is_zero()) {
                return Err(ConfigError::new(
                    "trips.quarantine",
                    "trips.denials needs a quarantine duration greater than zero",
                ));
            }
        }
        if let Some(r) = tr.exchange_rate {
            check_count_window("trips.exchange_rate", r)?;
        }
        if tr.max_scopes_per_task == Some(0) {
            return Err(ConfigError::new(
                "trips.max_scopes_per_task",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// `[server.tls]`: a certificate and key pair, or the Workload API, never both.
fn validate_tls(tls: &TlsConfig) -> Result<(), ConfigError> {
    if let Some(socket) = &tls.workload_api {
        if tls.cert.is_some() || tls.key.is_some() {
            return Err(ConfigError::new(
                "server.tls.workload_api",
                "give either workload_api or cert and key, not both",
            ));
        }
        return check_workload_api_socket(socket)
            .map_err(|m| ConfigError::new("server.tls.workload_api", m));
    }
    match (&tls.cert, &tls.key) {
        (Some(_), Some(_)) => Ok(()),
        (None, _) => Err(ConfigError::new(
            "server.tls.cert",
            "a PEM certificate chain is required (or workload_api)",
        )),
        (Some(_), None) => Err(ConfigError::new(
            "server.tls.key",
            "the PEM private key of server.tls.cert is required",
        )),
    }
}

/// An optional listen address, parsed; a bad one is refused with `key` named.
fn parse_listen(key: &str, value: Option<&str>) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(v) = value else {
        return Ok(None);
    };
    v.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| ConfigError::new(key, format!("`{v}` is not a host:port socket address")))
}

fn check_duration_range(
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
    range: &str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(key, format!("must be between {range}")));
    }
    Ok(())
}

fn check_count_window(key: &str, cw: CountWindow) -> Result<(), ConfigError> {
    if cw.count == 0 {
        return Err(ConfigError::new(
            format!("{key}.count"),
            "must be at least 1",
        ));
    }
    if cw.window.is_zero() {
        return Err(ConfigError::new(
            format!("{key}.window"),
            "must be greater than zero",
        ));
    }
    Ok(())
}

/// Principal patterns: a SPIFFE ID or OIDC subject, or a prefix ending in `/*`.
fn check_patterns(key: &str, patterns: &[String]) -> Result<(), ConfigError> {
    for (i, p) in patterns.iter().enumerate() {
        let base = p.strip_suffix("/*").unwrap_or(p);
        let ok = if base.starts_with("spiffe://") {
            crate::domain::parse_spiffe_id(base).is_some()
        } else {
            base.contains('#') || p.ends_with("/*")
        };
        if !ok || base.is_empty() {
            return Err(ConfigError::new(
                format!("{key}[{i}]"),
                format!("`{p}` is not a subject or a subject prefix ending in `/*`"),
            ));
        }
    }
    Ok(())
}

/// An issuer URL: https, or http on a loopback host (for local use and tests), without query
/// or fragment (RFC 8414 §2).
fn check_issuer_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| ConfigError::new(key, format!("`{value}` {why}"));
    let url = url::Url::parse(value).map_err(|_| bad("is not an absolute URL"))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(bad(
                "must use https (http is allowed for loopback hosts only)",
            ));
        }
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(())
}

/// The path of an issuer URL (`/writ` of `https://h/writ`), `None` for a root issuer. Set
/// only for paths that `check_server_issuer` admits.
pub fn issuer_path(issuer: &str) -> Option<String> {
    let url = url::Url::parse(issuer).ok()?;
    let path = url.path();
    (path != "/" && !path.is_empty()).then(|| path.to_string())
}

/// The broker's own issuer: besides the rules of any issuer URL, a path is served as a route
/// prefix, so it must be plain segments of unreserved characters (RFC 3986 §2.3) without a
/// trailing `/`, and it must not shadow a root route.
fn check_server_issuer(value: &str) -> Result<(), ConfigError> {
    const KEY: &str = "server.issuer";
    check_issuer_url(KEY, value)?;
    let Some(path) = issuer_path(value) else {
        return Ok(());
    };
    let bad = |why: &str| ConfigError::new(KEY, format!("`{value}` {why}"));
    if url::Url::parse(value)
        .map(|u| u.as_str() != value)
        .unwrap_or(true)
    {
        return Err(bad("is not in its normal form (as a URL parser writes it)"));
    }
    let plain = path.split('/').skip(1).all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    });
    if !plain {
        return Err(bad(
            "has a path that is not plain segments of letters, digits, `-`, `.`, `_`, `~` \
             (and no trailing `/`)",
        ));
    }
    let first = path.split('/').nth(1).unwrap_or("");
    if matches!(
        first,
        "oauth2"
            | "v1"
            | "admin"
            | ".well-known"
            | "healthz"
            | "readyz"
            | "metrics"
            | "openapi.json"
    ) {
        return Err(bad("has a path that starts like one of Writ's own routes"));
    }
    Ok(())
}

/// Applies `WRIT_SECTION__KEY=value` overrides. The value is read as a TOML value when it
/// parses as one (numbers, booleans, arrays), otherwise as a string.
fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("WRIT_") else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let key = path.join(".");
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                key,
                format!("environment variable `{name}` has an empty key segment"),
            ));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let mut table = &mut *root;
        let (last, parents) = match path.split_last() {
            Some(x) => x,
            None => continue,
        };
        for p in parents {
            let entry = table
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "environment variable `{name}` nests under a value that is not a table"
                        ),
                    ));
                }
            };
        }
        table.insert(last.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
issuer = "https://writ.example.org"
[tokens]
signing_keys = ["k.pem"]
[policy]
dir = "p"
"#;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(&format!("{BASE}{extra}"), Vec::new())
    }

    #[test]
    fn policy_drop_share_is_a_share() {
        let c = load("").unwrap();
        assert_eq!(
            (c.policy.max_drop_share, c.policy.allow_empty),
            (0.5, false)
        );
        for bad in ["0", "1.5", "-0.1", "nan"] {
            let text = BASE.replace(
                "dir = \"p\"",
                &format!("dir = \"p\"\nmax_drop_share = {bad}"),
            );
            let e = Config::from_toml_with_env(&text, Vec::new()).unwrap_err();
            assert_eq!(e.key, "policy.max_drop_share", "{bad} -> {e}");
        }
        let text = BASE.replace(
            "dir = \"p\"",
            "dir = \"p\"\nmax_drop_share = 1.0\nallow_empty = true",
        );
        let c = Config::from_toml_with_env(&text, Vec::new()).unwrap();
        assert_eq!((c.policy.max_drop_share, c.policy.allow_empty), (1.0, true));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.tokens.default_ttl, Duration::from_secs(300));
        assert_eq!(c.tasks.max_tokens, 50);
        assert_eq!(c.tasks.max_delegation_depth, 3);
        assert_eq!(c.store.backend, StoreBackend::Memory);
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.max_header_bytes, 16 * 1024);
        assert_eq!(c.metrics.listen, None);
        assert_eq!(c.audit.checkpoint_every, 1000);
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(10));
        assert_eq!(c.audit.unauthenticated_per_minute, 20);
        assert_eq!(c.audit.unauthenticated_max_sources, 1000);
    }

    #[test]
    fn serving_limits_are_read_and_checked() {
        let with = |server: &str, rest: &str| {
            Config::from_toml_with_env(
                &format!(
                    "{}{rest}",
                    BASE.replace("[server]\n", &format!("[server]\n{server}\n"))
                ),
                Vec::new(),
            )
        };
        let c = with(
            "header_timeout = \"2s\"\nbody_timeout = \"3s\"\nidle_timeout = \"90s\"\nmax_connections = 7\nmax_header_bytes = 32768",
            "[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        )
        .unwrap();
        assert_eq!(c.server.header_timeout, Duration::from_secs(2));
        assert_eq!(c.server.body_timeout, Duration::from_secs(3));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.server.max_header_bytes, 32768);
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9464"));
        let cases = [
            ("header_timeout = \"0s\"", "", "server.header_timeout"),
            ("header_timeout = \"1h\"", "", "server.header_timeout"),
            ("header_timeout = \"soon\"", "", "server.header_timeout"),
            ("body_timeout = \"50ms\"", "", "server.body_timeout"),
            ("body_timeout = \"6m\"", "", "server.body_timeout"),
            ("idle_timeout = \"0s\"", "", "server.idle_timeout"),
            ("idle_timeout = \"2h\"", "", "server.idle_timeout"),
            ("max_connections = 0", "", "server.max_connections"),
            ("max_connections = 1000001", "", "server.max_connections"),
            ("max_connections = -1", "", "server.max_connections"),
            ("max_connections = \"many\"", "", "server.max_connections"),
            ("max_header_bytes = 8191", "", "server.max_header_bytes"),
            ("max_header_bytes = 1048577", "", "server.max_header_bytes"),
            ("", "[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
            ("", "[metrics]\nlisten = 9464\n", "metrics.listen"),
            (
                "",
                "[metrics]\nlisten = \"127.0.0.1:8080\"\n",
                "metrics.listen",
            ),
            ("", "[metrics]\npath = \"/m\"\n", "metrics.path"),
        ];
        for (server, rest, key) in cases {
            let e = with(server, rest).unwrap_err();
            assert_eq!(e.key, key, "{server} {rest} -> {e}");
        }
        let c = Config::from_toml_with_env(
            BASE,
            vec![
                ("WRIT_SERVER__IDLE_TIMEOUT".into(), "5s".into()),
                ("WRIT_METRICS__LISTEN".into(), "127.0.0.1:0".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.server.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn admin_listen_is_its_own_address() {
        assert_eq!(load("").unwrap().admin.listen, None);
        let c = load("[admin]\nlisten = \"127.0.0.1:8081\"\n").unwrap();
        assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:8081"));
        let cases = [
            (
                "[admin]\nlisten = \"nowhere\"\n",
                "`nowhere` is not a host:port socket address",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:8080\"\n",
                "must differ from server.listen (leave it unset to serve /admin/v1 there)",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:9464\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
                "must differ from metrics.listen",
            ),
        ];
        for (text, message) in cases {
            let e = load(text).unwrap_err();
            assert_eq!(
                (e.key.as_str(), e.message.as_str()),
                ("admin.listen", message)
            );
        }
        let e = load("[admin]\nlisten = 8081\n").unwrap_err();
        assert_eq!(e.key, "admin.listen");
        // Port 0 is a fresh port each time: never the same address as another listener.
        let c = load("[admin]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
            .unwrap();
        assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load("[store]\nbackend = \"memory\"\nurll = \"x\"\n").unwrap_err();
        assert_eq!(e.key, "store.urll");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = load("[bogus]\nx = 1\n").unwrap_err();
        assert!(e.message.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[tasks]\nmax_duration = \"soon\"\n", "tasks.max_duration"),
            ("[tasks]\nmax_tokens = 0\n", "tasks.max_tokens"),
            (
                "[tasks]\nmax_delegation_depth = 17\n",
                "tasks.max_delegation_depth",
            ),
            ("[store]\nbackend = \"redis\"\n", "store.url"),
            ("[store]\nbackend = \"etcd\"\n", "store.backend"),
            (
                "[admin]\ntoken_sha256 = [\"abc\"]\n",
                "admin.token_sha256[0]",
            ),
            (
                "[[spiffe.trust_domains]]\nname = \"Bad Domain\"\nbundle_file = \"b\"\naudience = \"writ\"\n",
                "spiffe.trust_domains[0].name",
            ),
            (
                "[[oidc.issuers]]\nissuer = \"http://evil.example\"\naudience = \"writ\"\n",
                "oidc.issuers[0].issuer",
            ),
            (
                "[introspection]\nprincipals = [\"nobody\"]\n",
                "introspection.principals[0]",
            ),
            (
                "[trips]\ndenials = { count = 5, window = \"1m\" }\n",
                "trips.quarantine",
            ),
            ("[audit]\ncheckpoint_every = 0\n", "audit.checkpoint_every"),
            (
                "[audit]\ncheckpoint_every = 2000000\n",
                "audit.checkpoint_every",
            ),
            (
                "[audit]\ncheckpoint_interval = \"500ms\"\n",
                "audit.checkpoint_interval",
            ),
            (
                "[audit]\ncheckpoint_interval = \"2h\"\n",
                "audit.checkpoint_interval",
            ),
            (
                "[audit]\ncheckpoint_interval = \"often\"\n",
                "audit.checkpoint_interval",
            ),
            (
                "[audit]\nunauthenticated_per_minute = 100001\n",
                "audit.unauthenticated_per_minute",
            ),
            (
                "[audit]\nunauthenticated_per_minute = -1\n",
                "audit.unauthenticated_per_minute",
            ),
            (
                "[audit]\nunauthenticated_max_sources = 0\n",
                "audit.unauthenticated_max_sources",
            ),
        ];
        for (extra, key) in cases {
            let e = load(extra).unwrap_err();
            assert_eq!(e.key, key, "{extra} -> {e}");
        }
        let e = Config::from_toml_with_env(
            &BASE.replace("https://writ.example.org", "ftp://x"),
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.key, "server.issuer");
        let e = Config::from_toml_with_env(&format!("{BASE}[tokens]\n"), Vec::new()).unwrap_err();
        assert_eq!(e.key, "<file>");
    }

    #[test]
    fn trust_sources_are_one_per_domain_and_name_their_key() {
        let td = |body: &str| {
            format!("[[spiffe.trust_domains]]\nname = \"td.test\"\naudience = \"writ\"\n{body}")
        };
        let cases = [
            ("", "bundle_file", "needs one bundle source"),
            (
                "bundle_file = \"b.json\"\nworkload_api = \"unix:///run/spire/agent.sock\"\n",
                "workload_api",
                "exactly one bundle source; `bundle_file` is already set",
            ),
            (
                "bundle_endpoint = \"https://td.test/bundle\"\nworkload_api = \"unix:///a.sock\"\n",
                "workload_api",
                "`bundle_endpoint` is already set",
            ),
            (
                "bundle_file = \"b.json\"\nbundle_endpoint = \"https://td.test/bundle\"\n",
                "bundle_endpoint",
                "`bundle_file` is already set",
            ),
            (
                "workload_api = \"/run/spire/agent.sock\"\n",
                "workload_api",
                "not a Workload API endpoint",
            ),
            (
                "workload_api = \"http://127.0.0.1:8081\"\n",
                "workload_api",
                "not a Workload API endpoint",
            ),
            (
                "workload_api = \"unix://\"\n",
                "workload_api",
                "not a Workload API endpoint",
            ),
            (
                "bundle_endpoint = \"http://td.test/bundle\"\n",
                "bundle_endpoint",
                "not an https URL",
            ),
            (
                "bundle_endpoint = \"td.test/bundle\"\n",
                "bundle_endpoint",
                "not a URL",
            ),
            (
                "bundle_file = \"b.json\"\nbundle_endpoint_ca = \"ca.pem\"\n",
                "bundle_endpoint_ca",
                "applies to a bundle_endpoint source only",
            ),
            (
                "workload_api = \"unix:///a.sock\"\nrefresh_hint_min = \"5s\"\n",
                "refresh_hint_min",
                "applies to a bundle_endpoint source only",
            ),
            (
                "bundle_file = \"b.json\"\nrefresh_hint_max = \"5s\"\n",
                "refresh_hint_max",
                "applies to a bundle_endpoint source only",
            ),
            (
                "bundle_file = \"b.json\"\nmax_bundle_age = \"5m\"\n",
                "max_bundle_age",
                "applies to a bundle_endpoint source only",
            ),
            (
                "bundle_endpoint = \"https://td.test/b\"\nrefresh_hint_min = \"500ms\"\n",
                "refresh_hint_min",
                "at least 1s",
            ),
            (
                "bundle_endpoint = \"https://td.test/b\"\nrefresh_hint_min = \"10m\"\nrefresh_hint_max = \"5m\"\n",
                "refresh_hint_max",
                "must not be shorter than refresh_hint_min",
            ),
            (
                "bundle_endpoint = \"https://td.test/b\"\nrefresh_hint_max = \"2h\"\nmax_bundle_age = \"1h\"\n",
                "max_bundle_age",
                "must be longer than refresh_hint_max",
            ),
            (
                "bundle_endpoint = \"https://td.test/b\"\nmax_bundle_age = \"30m\"\n",
                "max_bundle_age",
                "must be longer than refresh_hint_max (1h)",
            ),
            (
                "bundle_endpoint = \"https://td.test/b\"\nrefresh_hint_min = \"soon\"\n",
                "refresh_hint_min",
                "not a duration",
            ),
        ];
        for (body, key, message) in cases {
            let e = load(&td(body)).unwrap_err();
            assert_eq!(
                e.key,
                format!("spiffe.trust_domains[0].{key}"),
                "{body} -> {e}"
            );
            assert!(e.message.contains(message), "{body} -> {e}");
        }
        for ok in [
            "bundle_file = \"b.json\"\n",
            "workload_api = \"unix:///run/spire/agent.sock\"\n",
            "workload_api = \"unix:/run/spire/agent.sock\"\n",
            "workload_api = \"tcp://127.0.0.1:8081\"\n",
            "bundle_endpoint = \"https://td.test/bundle\"\nbundle_endpoint_ca = \"ca.pem\"\n",
            "bundle_endpoint = \"https://td.test/b\"\nrefresh_hint_min = \"1s\"\nrefresh_hint_max = \"2s\"\nmax_bundle_age = \"3s\"\n",
        ] {
            load(&td(ok)).unwrap_or_else(|e| panic!("{ok} -> {e}"));
        }
    }

    #[test]
    fn ttl_ordering_is_checked() {
        let text = BASE.replace(
            "[tokens]\n",
            "[tokens]\ndefault_ttl = \"20m\"\nmax_ttl = \"15m\"\n",
        );
        let e = Config::from_toml_with_env(&text, Vec::new()).unwrap_err();
        assert_eq!(e.key, "tokens.default_ttl");
    }

    #[test]
    fn env_overrides_nest_and_type() {
        let env = vec![
            ("WRIT_STORE__BACKEND".to_string(), "redis".to_string()),
            (
                "WRIT_STORE__URL".to_string(),
                "redis://127.0.0.1:7000/0".to_string(),
            ),
            ("WRIT_TASKS__MAX_TOKENS".to_string(), "7".to_string()),
            ("WRIT_UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml_with_env(BASE, env).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Redis);
        assert_eq!(c.store.url.as_deref(), Some("redis://127.0.0.1:7000/0"));
        assert_eq!(c.tasks.max_tokens, 7);
        let e = Config::from_toml_with_env(BASE, vec![("WRIT_STORE__NOPE".into(), "1".into())])
            .unwrap_err();
        assert_eq!(e.key, "store.nope");
    }
}
