//! The broker: every component a use case needs, built from a validated [`Config`].

use std::sync::Arc;

use crate::audit::{self, AuditLog};
use crate::cache::VerifiedCache;
use crate::config::{Config, ConfigError, StoreBackend};
use crate::domain::{Audience, Clock, SystemClock};
use crate::error::{BrokerError, Failure};
use crate::identity::IdentityVerifier;
use crate::metrics::Metrics;
use crate::policy::{PolicyHandle, PolicySet};
use crate::revocation::RevocationCache;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{BlockKind, FeedEvent, Store};
use crate::token::keys::{KeySet, SigningKey};
use crate::token::{TaskClaims, TokenIssuer};

/// Settings the use cases read on every request, resolved once.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
    pub default_audience: Option<Audience>,
    pub default_scope: Vec<crate::domain::Scope>,
    pub max_task_duration_secs: u64,
    pub max_tokens: u32,
    pub max_delegation_depth: u32,
}

impl Limits {
    /// `until` for a revocation that covers any token issued up to `now`.
    pub fn token_horizon(&self, now: i64) -> i64 {
        now.saturating_add(i64::try_from(self.max_ttl_secs).unwrap_or(i64::MAX))
    }
}

/// A DPoP nonce is current for this window and the next one.
const DPOP_NONCE_WINDOW_SECS: i64 = 60;

pub struct Broker {
    pub config: Arc<Config>,
    pub limits: Limits,
    pub clock: Arc<dyn Clock>,
    pub store: Arc<dyn Store>,
    pub identity: Arc<IdentityVerifier>,
    pub policy: Arc<PolicyHandle>,
    pub tokens: TokenIssuer,
    pub audit: Arc<AuditLog>,
    pub admin_hashes: Vec<String>,
    pub revocations: Arc<RevocationCache>,
    /// Verified task tokens by hash (introspection, task end).
    pub token_cache: VerifiedCache<TaskClaims>,
    /// Verified workload bearer credentials by hash (introspection and admin callers).
    pub auth_cache: VerifiedCache<String>,
    pub metrics: Metrics,
    /// When this broker started (clock seconds): a memory store knows nothing from before.
    pub started_at: i64,
    /// Where approval requests are announced (`[approvals.webhook]`).
    pub webhook: Option<crate::webhook::Webhook>,
    /// Token status lists (SPEC §4.6).
    pub status: crate::status::StatusLists,
    /// Server nonces for DPoP proofs (RFC 9449 §8), the same on every replica with the same
    /// signing key.
    pub dpop_nonces: crate::token::dpop::NonceKey,
    /// TLS on the main listener (`[server.tls]`, SPEC §4.8).
    pub tls: Option<Arc<crate::tls::TlsServer>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// Loads the signing keys named by `tokens.signing_keys`. A key listed twice (the same file,
/// or two files with the same key) is refused: it would be published twice under one `kid`.
/// A key file its group or others may read loads with a warning.
pub fn load_keys(config: &Config) -> Result<KeySet, ConfigError> {
    let mut keys: Vec<SigningKey> = Vec::new();
    for (i, path) in config.tokens.signing_keys.iter().enumerate() {
        let at = format!("tokens.signing_keys[{i}]");
        let key = SigningKey::load(path)
            .map_err(|e| ConfigError::new(at.clone(), crate::error::chain(&e)))?;
        if let Some(first) = keys.iter().position(|k| k.kid == key.kid) {
            return Err(ConfigError::new(
                at,
                format!(
                    "duplicates tokens.signing_keys[{first}] (same key, kid {})",
                    key.kid
                ),
            ));
        }
        if let Some(mode) = crate::token::keys::loose_mode(path) {
            tracing::warn!(
                path = %path.display(),
                mode = %format!("{mode:04o}"),
                "signing key file is readable or writable by its group or others; chmod 600 it"
            );
        }
        keys.push(key);
    }
    KeySet::new(keys).ok_or_else(|| {
        ConfigError::new(
            "tokens.signing_keys",
            "at least one signing key is required",
        )
    })
}

/// The main listener's TLS, when `[server.tls]` is set: its certificate and key loaded.
pub fn load_tls(
    config: &Config,
    identity: &IdentityVerifier,
) -> Result<Option<Arc<crate::tls::TlsServer>>, ConfigError> {
    let Some(tls) = &config.server.tls else {
        return Ok(None);
    };
    let server = crate::tls::TlsServer::from_config(tls)?;
    if server.requests_client_certs() && !identity.svid.has_x509_authorities() {
        tracing::warn!(
            "server.tls.client_auth is optional but no trust domain bundle has X.509 \
             authorities (x509-svid keys): every client certificate will be refused"
        );
    }
    Ok(Some(Arc::new(server)))
}

/// Loads and validates the policy directory.
pub fn load_policies(config: &Config) -> Result<PolicySet, ConfigError> {
    PolicySet::load_dir(&config.policy.dir)
        .map_err(|e| ConfigError::new("policy.dir", e.to_string()))
}

/// Connects the configured shared store (`None` for the embedded memory store). A Redis that
/// is down does not stop the start: the broker serves 503 and reports not ready until it can
/// reach it.
pub async fn connect_store(config: &Config) -> Result<Option<Arc<dyn Store>>, ConfigError> {
    let horizon = config.tokens.max_ttl.max(config.tasks.max_duration);
    let prefix = config.store.key_prefix.as_deref();
    match config.store.backend {
        StoreBackend::Memory => Ok(None),
        StoreBackend::Redis => {
            let s = RedisStore::connect(config.store.url.as_deref(), &[], prefix, horizon)
                .await
                .map_err(|e| ConfigError::new("store.url", e.to_string()))?;
            Ok(Some(Arc::new(s)))
        }
        StoreBackend::RedisCluster => {
            let s = RedisStore::connect(None, &config.store.nodes, prefix, horizon)
                .await
                .map_err(|e| ConfigError::new("store.nodes", e.to_string()))?;
            Ok(Some(Arc::new(s)))
        }
    }
}

/// What `writ config check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub signing_keys: usize,
    pub policy_version: String,
}

/// Loads what a broker would load (keys, policies, trust bundles) and connects the store,
/// without building a broker: nothing is written and the decision log is not opened, so a
/// check beside a running broker leaves its log alone.
pub async fn check_config(config: &Config) -> Result<CheckReport, ConfigError> {
    let keys = load_keys(config)?;
    let signing_keys = keys.all().len();
    TokenIssuer::new(config.server.issuer.clone(), keys)
        .map_err(|e| ConfigError::new("tokens.signing_keys", e.to_string()))?;
    let policies = load_policies(config)?;
    let identity = IdentityVerifier::from_config(config)?;
    load_tls(config, &identity)?;
    connect_store(config).await?;
    Ok(CheckReport {
        signing_keys,
        policy_version: policies.version().to_string(),
    })
}

impl Broker {
    /// Builds every component, checking files (keys, bundles, policies) with the key named,
    /// and connects the configured store.
    pub async fn build(config: Config) -> Result<Broker, ConfigError> {
        let store = connect_store(&config).await?;
        Self::build_with(config, Arc::new(SystemClock), store)
    }

    /// As [`Broker::build`], with an injected clock and, optionally, a store.
    pub fn build_with(
        config: Config,
        clock: Arc<dyn Clock>,
        store: Option<Arc<dyn Store>>,
    ) -> Result<Broker, ConfigError> {
        let keys = load_keys(&config)?;
        let tokens = TokenIssuer::new(config.server.issuer.clone(), keys)
            .map_err(|e| ConfigError::new("tokens.signing_keys", e.to_string()))?;
        let policies = load_policies(&config)?;
        let identity = IdentityVerifier::from_config(&config)?;
        let tls = load_tls(&config, &identity)?;
        let local_store = store.is_none() && config.store.backend == StoreBackend::Memory;
        let store: Arc<dyn Store> = match store {
            Some(s) => s,
            None if config.store.backend == StoreBackend::Memory => Arc::new(MemoryStore::new()),
            None => {
                return Err(ConfigError::new(
                    "store.backend",
                    "a Redis backend needs its store connected first (connect_store)",
                ));
            }
        };
        let audit = AuditLog::from_config(&config.audit, tokens.keys().clone(), clock.clone())
            .map_err(|e| ConfigError::new("audit.path", crate::error::chain(&e)))?;
        let limits = Limits {
            default_ttl_secs: config.tokens.default_ttl.as_secs(),
            max_ttl_secs: config.tokens.max_ttl.as_secs(),
            default_audience: config.tokens.default_audience.clone(),
            default_scope: config.tokens.default_scopes(),
            max_task_duration_secs: config.tasks.max_duration.as_secs(),
            max_tokens: config.tasks.max_tokens,
            max_delegation_depth: config.tasks.max_delegation_depth,
        };
        let admin_hashes = config
            .admin
            .token_sha256
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let policy = Arc::new(
            PolicyHandle::new(policies, config.policy.dir.clone()).with_guard(
                crate::policy::ShrinkGuard {
                    max_drop_share: config.policy.max_drop_share,
                    allow_empty: config.policy.allow_empty,
                },
            ),
        );
        let revocations = Arc::new(RevocationCache::new(
            config.store.max_staleness,
            local_store,
        ));
        let webhook = config
            .approvals
            .as_ref()
            .and_then(|a| a.webhook.as_ref())
            .map(crate::webhook::Webhook::new)
            .transpose()
            .map_err(|e| ConfigError::new("approvals.webhook", e.to_string()))?;
        let status = crate::status::StatusLists::new(
            store.clone(),
            tokens.keys().clone(),
            &config.server.issuer,
            config.status.list_size,
            config.status.ttl,
        );
        let dpop_nonces = crate::token::dpop::NonceKey::derive(
            tokens.keys().active().encoding_key().as_bytes(),
            DPOP_NONCE_WINDOW_SECS,
        );
        let broker = Broker {
            tls,
            status,
            dpop_nonces,
            webhook,
            started_at: clock.now(),
            revocations,
            token_cache: VerifiedCache::new(100_000),
            auth_cache: VerifiedCache::new(10_000),
            metrics: Metrics::described(),
            limits,
            clock,
            store,
            identity: Arc::new(identity),
            policy,
            tokens,
            audit: Arc::new(audit),
            admin_hashes,
            config: Arc::new(config),
        };
        broker.record_policy_load(None, "loaded at start");
        Ok(broker)
    }

    /// Records the policy version in force in the decision log.
    pub fn record_policy_load(&self, previous: Option<&str>, reason: &str) {
        let set = self.policy.current();
        let entry = audit::Entry {
            decision: None,
            policy_version: Some(set.version().to_string()),
            reason: reason.to_string(),
            detail: Some(serde_json::json!({
                "previous_version": previous,
                "policies": set.policy_count(),
            })),
            ..audit::Entry::default()
        };
        if let Err(e) = self.audit.append(audit::Event::PolicyLoad, entry) {
            tracing::error!(error = %e, "cannot record policy load");
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// A failure of one of the broker's parts: logged with its cause and counted once, and
    /// answered with a 503.
    pub fn fail(&self, e: impl Into<Failure>) -> BrokerError {
        e.into().logged(&self.metrics)
    }

    /// Appends to the decision log; a failed append means nothing may be issued.
    pub fn record(&self, event: audit::Event, e: audit::Entry) -> Result<u64, BrokerError> {
        self.audit.append(event, e).map_err(|err| self.fail(err))
    }

    /// Publishes a revocation on the feed, then applies it here: effective on this replica
    /// before the reply, on the others as they read the feed.
    /// A token revocation sets its status bit first: a failure before the feed leaves
    /// nothing published, and the retry does both.
    pub async fn publish(&self, event: &FeedEvent, now: i64) -> Result<(), BrokerError> {
        if let FeedEvent::Token { jti, .. } = event {
            self.status
                .revoke(std::slice::from_ref(jti))
                .await
                .map_err(|e| self.fail(e))?;
        }
        let published = self.store.publish(event, now).await;
        self.revocations.wrote_feed(published.is_ok());
        published.map_err(|e| self.fail(e))?;
        let kind = match event {
            FeedEvent::Token { .. } => "token",
            FeedEvent::Task { .. } => "task",
            FeedEvent::Block { record } if record.kind == BlockKind::Quarantine => "quarantine",
            FeedEvent::Block { .. } => "selector",
            FeedEvent::Lift { .. } => "lift",
        };
        self.metrics
            .inc("writ_revocations_total", &[("kind", kind)]);
        self.revocations.apply(event);
        Ok(())
    }
}
