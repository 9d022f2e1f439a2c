//! The broker: every component a use case needs, built from a validated [`Config`].

use std::sync::Arc;

use crate::audit::{self, AuditLog};
use crate::cache::VerifiedCache;
use crate::config::{Config, ConfigError, StoreBackend};
use crate::domain::{Audience, Clock, SystemClock};
use crate::identity::IdentityVerifier;
use crate::metrics::Metrics;
use crate::policy::{PolicyHandle, PolicySet};
use crate::revoke::RevocationCache;
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::token::keys::{KeySet, SigningKey};
use crate::token::{TaskClaims, TokenIssuer};

/// Settings the use cases read on every request, resolved once.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_ttl: u64,
    pub max_ttl: u64,
    pub default_audience: Option<Audience>,
    pub max_task_duration: u64,
    pub max_tokens: u32,
}

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
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// Loads the signing keys named by `tokens.signing_keys`.
pub fn load_keys(config: &Config) -> Result<KeySet, ConfigError> {
    let mut keys = Vec::new();
    for (i, path) in config.tokens.signing_keys.iter().enumerate() {
        let key = SigningKey::load(path)
            .map_err(|e| ConfigError::new(format!("tokens.signing_keys[{i}]"), e.to_string()))?;
        keys.push(key);
    }
    KeySet::new(keys).ok_or_else(|| {
        ConfigError::new(
            "tokens.signing_keys",
            "at least one signing key is required",
        )
    })
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
            .map_err(|e| ConfigError::new("audit.path", e.to_string()))?;
        let limits = Limits {
            default_ttl: config.tokens.default_ttl.as_secs(),
            max_ttl: config.tokens.max_ttl.as_secs(),
            default_audience: config
                .tokens
                .default_audience
                .as_deref()
                .and_then(Audience::parse),
            max_task_duration: config.tasks.max_duration.as_secs(),
            max_tokens: config.tasks.max_tokens,
        };
        let admin_hashes = config
            .admin
            .token_sha256
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let policy = Arc::new(PolicyHandle::new(policies, config.policy.dir.clone()));
        let revocations = Arc::new(RevocationCache::new(
            config.store.max_staleness,
            local_store,
        ));
        let broker = Broker {
            revocations,
            token_cache: VerifiedCache::new(100_000),
            auth_cache: VerifiedCache::new(10_000),
            metrics: {
                let m = Metrics::default();
                m.describe("writ_trips_total", "Trips fired, by rule.");
                m.describe(
                    "writ_exchanges_total",
                    "Token exchanges, by outcome (issued or the OAuth error code).",
                );
                m.describe(
                    "writ_introspections_total",
                    "Introspections, by outcome (active, inactive or the error code).",
                );
                m.describe(
                    "writ_revocations_total",
                    "Revocations published, by kind (token, task, selector, quarantine, lift).",
                );
                m.describe("writ_store_errors_total", "Store operations that failed.");
                m.describe(
                    "writ_http_requests_total",
                    "HTTP requests, by route and status.",
                );
                m.describe(
                    "writ_http_request_duration_seconds",
                    "HTTP request latency, by route.",
                );
                m.describe(
                    "writ_open_tasks",
                    "Open tasks (on Redis: tasks before their deadline).",
                );
                m.describe(
                    "writ_revocation_feed_lag_milliseconds",
                    "Time since this replica last read the revocation feed.",
                );
                m.describe(
                    "writ_revocation_feed_fresh",
                    "1 when this replica's revocation view is confirmed.",
                );
                m.describe(
                    "writ_revocation_cache_entries",
                    "Entries of this replica's revocation cache, by kind.",
                );
                m.describe("writ_policy_version_info", "The policy version in force.");
                m.describe(
                    "writ_signing_key_info",
                    "Signing keys published, and which one signs.",
                );
                m
            },
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
}
