//! The running application: a broker, its listener and its background tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::config::Config;
use crate::http::serve::{Limits, serve};
use crate::policy::{ReloadOutcome, spawn_watcher};

/// How long in-flight requests may take to finish after SIGTERM (Kubernetes' default grace
/// period is 30 s).
pub const DRAIN_BOUND: Duration = Duration::from_secs(20);

/// The main listener and, when `[metrics] listen` or `[admin] listen` is set, theirs.
struct Listeners {
    main: TcpListener,
    metrics: Option<TcpListener>,
    admin: Option<TcpListener>,
}

async fn bind(config: &Config) -> anyhow::Result<Listeners> {
    Ok(Listeners {
        main: bind_one("server.listen", &config.server.listen).await?,
        metrics: bind_optional("metrics.listen", config.metrics.listen.as_deref()).await?,
        admin: bind_optional("admin.listen", config.admin.listen.as_deref()).await?,
    })
}

async fn bind_one(key: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {key} `{addr}`: {e}"))
}

async fn bind_optional(key: &str, addr: Option<&str>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => Ok(Some(bind_one(key, a).await?)),
        None => Ok(None),
    }
}

fn local_addr(listener: Option<&TcpListener>) -> anyhow::Result<Option<SocketAddr>> {
    Ok(match listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    })
}

/// Serves `router` on `listener`, if there is one.
async fn serve_optional(
    listener: Option<TcpListener>,
    router: axum::Router,
    limits: Limits,
    broker: Arc<Broker>,
    name: &'static str,
    stopping: tokio::sync::watch::Receiver<bool>,
) {
    if let Some(l) = listener {
        serve(l, router, limits, broker, name, None, stopping).await;
    }
}

/// Logged at the start of a broker on the memory store.
pub const MEMORY_STORE_FORGETS: &str = "store.backend is memory: tasks, revocations, blocks \
and quarantines live in this process only and are forgotten when it stops; tokens issued \
before this start are reported inactive. Use a Redis store for anything that must survive a \
restart";

pub struct Application {
    listeners: Listeners,
    broker: Arc<Broker>,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl Application {
    /// Binds the listeners (`:0` picks a free port), then builds the broker: a port in use
    /// stops the start before the broker touches its decision log.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let listeners = bind(&config).await?;
        let broker = Broker::build(config).await?;
        Self::assemble(Arc::new(broker), listeners)
    }

    pub async fn from_broker(broker: Arc<Broker>) -> anyhow::Result<Application> {
        let listeners = bind(&broker.config).await?;
        Self::assemble(broker, listeners)
    }

    fn assemble(broker: Arc<Broker>, listeners: Listeners) -> anyhow::Result<Application> {
        Ok(Application {
            addr: listeners.main.local_addr()?,
            metrics_addr: local_addr(listeners.metrics.as_ref())?,
            admin_addr: local_addr(listeners.admin.as_ref())?,
            listeners,
            broker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where `/admin/v1/*` is served when `[admin] listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and finishes in-flight
    /// requests (for at most DRAIN_BOUND).
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        if self.broker.config.store.backend == crate::config::StoreBackend::Memory {
            tracing::warn!("{MEMORY_STORE_FORGETS}");
        }
        let background = spawn_background(self.broker.clone());
        let limits = Limits::from_config(&self.broker.config.server);
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        let Listeners {
            main,
            metrics,
            admin,
        } = self.listeners;
        let b = &self.broker;
        let main = serve(
            main,
            crate::http::router(b.clone()),
            limits,
            b.clone(),
            "main",
            b.tls.clone(),
            stopping_rx.clone(),
        );
        let metrics = serve_optional(
            metrics,
            crate::http::metrics_router(b.clone()),
            limits,
            b.clone(),
            "metrics",
            stopping_rx.clone(),
        );
        let admin = serve_optional(
            admin,
            crate::http::admin_router(b.clone()),
            limits,
            b.clone(),
            "admin",
            stopping_rx,
        );
        let serving = async move {
            tokio::join!(main, metrics, admin);
        };
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => {}
            _ = shutdown => {
                tracing::info!("stopping: no new connections, finishing requests in flight");
                let _ = stopping_tx.send(true);
                if tokio::time::timeout(DRAIN_BOUND, &mut serving).await.is_err() {
                    tracing::warn!(bound_secs = DRAIN_BOUND.as_secs(), "requests still in flight at the bound; stopping anyway");
                }
            }
        }
        for h in background {
            h.abort();
        }
        if let Err(e) =
            crate::audit::maintain::finish(&self.broker.audit, self.broker.store.as_ref()).await
        {
            tracing::error!(error = %e, "cannot flush the decision log");
        }
        tracing::info!("stopped; decision log flushed");
        Ok(())
    }
}

/// Policy hot reload (file changes and SIGHUP), trust bundle re-reads and trust sources.
pub fn spawn_background(broker: Arc<Broker>) -> Vec<tokio::task::JoinHandle<()>> {
    let broker_for_tls = broker.clone();
    let sources = broker
        .identity
        .source_tasks()
        .into_iter()
        .map(|t| tokio::spawn(t.run()));
    let mut tasks = vec![
        spawn_policy_watcher(broker.clone()),
        spawn_policy_start_check(broker.clone()),
        spawn_bundle_reloader(broker.clone()),
        spawn_bundle_change_follower(broker.clone()),
        spawn_approval_sweeper(broker.clone()),
        tokio::spawn(crate::revocation::follow(
            broker.store.clone(),
            broker.revocations.clone(),
            broker.clock.clone(),
        )),
        spawn_log_maintenance(broker),
    ];
    tasks.extend(sources);
    tasks.extend(spawn_tls_from_workload_api(&broker_for_tls));
    tasks
}

/// `[server.tls] workload_api`: the listener serves the broker's own X509-SVID, installed
/// as the Workload API streams it (first, then each rotation). Handshakes fail until the
/// first one arrives.
fn spawn_tls_from_workload_api(broker: &Arc<Broker>) -> Vec<tokio::task::JoinHandle<()>> {
    let endpoint = broker
        .config
        .server
        .tls
        .as_ref()
        .and_then(|t| t.workload_api.clone());
    let (Some(endpoint), Some(tls)) = (endpoint, broker.tls.clone()) else {
        return Vec::new();
    };
    let (watch, follow) = crate::identity::workload_api::X509SvidWatch::spawn(endpoint);
    let install = tokio::spawn(watch.apply_each(move |svid| {
        tls.identity()
            .set(svid.cert_chain.clone(), svid.key_pkcs8_der().to_vec())
    }));
    vec![follow, install]
}

/// Expires approval requests nobody decided in time (recorded once, by whichever replica
/// gets there first), every few seconds.
fn spawn_approval_sweeper(broker: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if broker.approvals_config().is_none() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = broker.sweep(broker.now()).await {
                tracing::debug!(error = %e, "approval sweep failed; trying again later");
            }
        }
    })
}

/// Reloads the policy set on file changes and SIGHUP; a change is recorded and, with
/// `trips.reevaluate_on_policy_change`, re-evaluates the open tasks.
fn spawn_policy_watcher(broker: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    let b = broker.clone();
    let on_event = Arc::new(
        move |event: Result<ReloadOutcome, crate::policy::PolicyError>| {
            b.clone().policy_event(event);
        },
    );
    spawn_watcher(broker.policy.clone(), Duration::from_secs(1), on_event)
}

/// A policy change that arrives by a restart (a Deployment rolled on a new policy) is a
/// change too: the store's `policy:current` says what the replicas ran before. The replica
/// that records the new version re-evaluates, once per transition like a hot reload.
fn spawn_policy_start_check(broker: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let t = match broker.advance_policy().await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot compare the policy with the store's");
                return;
            }
        };
        if !t.changed || t.previous.is_empty() {
            return;
        }
        tracing::info!(old = %t.previous, new = %t.current, "policy changed across a restart");
        broker.record_policy_load(Some(&t.previous), "changed across a restart");
        if broker.reevaluates_on_policy_change()
            && let Err(e) = broker.reevaluate_open_tasks(&t.previous).await
        {
            tracing::error!(error = %e, "re-evaluation of open tasks failed");
        }
    })
}

/// Re-reads trust bundle files once a second, and the main listener's certificate files:
/// new handshakes use the new pair.
fn spawn_bundle_reloader(b: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Some(tls) = &b.tls {
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!("server.tls certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "server.tls certificate refused; the previous one keeps serving")
                    }
                }
            }
            for (td, bundle) in b.identity.svid.bundles() {
                match bundle.reload_if_changed() {
                    Ok(true) => tracing::info!(trust_domain = td, "trust bundle reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(trust_domain = td, error = %e, "trust bundle refused; the previous one keeps serving")
                    }
                }
            }
        }
    })
}

/// Cached credentials are verified again whenever a trust domain's bundle or readiness
/// changes: a trust domain that fails closed refuses what was cached for it too.
fn spawn_bundle_change_follower(b: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = b.identity.bundle_changes();
        while changes.changed().await.is_ok() {
            b.forget_verified_credentials();
        }
    })
}

/// The decision log's upkeep: checkpoints, flood summaries, the head in the store, and a
/// sync a second of what no request waited for (exchanges wait for their own record:
/// `AuditLog::commit`).
fn spawn_log_maintenance(b: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(crate::audit::maintain::run(
        b.audit.clone(),
        b.store.clone(),
    ))
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled, so a signal sent as soon as the broker says it is listening
/// stops it cleanly instead of killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down");
    }
}
