//! The running application: a broker, its listener and its background tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::config::Config;
use crate::policy::{ReloadOutcome, spawn_watcher};

/// How long in-flight requests may take to finish after SIGTERM (Kubernetes' default grace
/// period is 30 s).
pub const DRAIN_BOUND: Duration = Duration::from_secs(20);

pub struct Application {
    listener: TcpListener,
    broker: Arc<Broker>,
    addr: SocketAddr,
}

impl Application {
    /// Builds the broker and binds the listener (`:0` picks a free port).
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let broker = Broker::build(config).await?;
        Self::from_broker(Arc::new(broker)).await
    }

    pub async fn from_broker(broker: Arc<Broker>) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(&broker.config.server.listen).await?;
        let addr = listener.local_addr()?;
        Ok(Application {
            listener,
            broker,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and finishes in-flight
    /// requests.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let background = spawn_background(self.broker.clone());
        let app = crate::http::router(self.broker.clone());
        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        let graceful = async move {
            shutdown.await;
            tracing::info!("stopping: no new connections, finishing requests in flight");
            let _ = stopping_tx.send(true);
        };
        let serve = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(graceful);
        // In-flight requests get DRAIN_BOUND to finish once the signal came.
        let bound = async move {
            let _ = stopping_rx.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_BOUND).await;
        };
        let result = tokio::select! {
            r = serve.into_future() => r.map_err(anyhow::Error::from),
            _ = bound => {
                tracing::warn!(bound_secs = DRAIN_BOUND.as_secs(), "requests still in flight at the bound; stopping anyway");
                Ok(())
            }
        };
        for h in background {
            h.abort();
        }
        if let Err(e) =
            crate::audit::maintain::finish(&self.broker.audit, self.broker.store.as_ref()).await
        {
            tracing::error!(error = %e, "cannot flush the decision log");
        }
        tracing::info!("stopped; decision log flushed");
        result
    }
}

/// Policy hot reload (file changes and SIGHUP) and trust bundle re-reads.
pub fn spawn_background(broker: Arc<Broker>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    let b = broker.clone();
    let on_event = Arc::new(
        move |event: Result<ReloadOutcome, crate::policy::PolicyError>| match event {
            Ok(outcome) if outcome.changed => {
                tracing::info!(old = %outcome.old_version, new = %outcome.new_version, "policy set reloaded");
                b.record_policy_load(Some(&outcome.old_version), "reloaded");
                if b.config
                    .trips
                    .as_ref()
                    .is_some_and(|t| t.reevaluate_on_policy_change)
                {
                    let b = b.clone();
                    tokio::spawn(async move {
                        if let Err(e) = b.reevaluate_open_tasks(&outcome.old_version).await {
                            tracing::error!(error = %e, "re-evaluation of open tasks failed");
                        }
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "new policy set refused; the previous one keeps serving");
                let entry = crate::audit::Entry {
                    decision: Some("deny"),
                    policy_version: Some(b.policy.current().version().to_string()),
                    reason: format!("policy reload refused: {e}"),
                    ..crate::audit::Entry::default()
                };
                if let Err(err) = b.audit.append(crate::audit::Event::PolicyLoad, entry) {
                    tracing::error!(error = %err, "cannot record refused policy reload");
                }
            }
        },
    );
    handles.push(spawn_watcher(
        broker.policy.clone(),
        Duration::from_secs(1),
        on_event,
    ));

    let b = broker.clone();
    handles.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for (td, bundle) in b.identity.svid.bundles() {
                match bundle.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(trust_domain = td, "trust bundle reloaded");
                        b.forget_verified_credentials();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(trust_domain = td, error = %e, "trust bundle refused; the previous one keeps serving"),
                }
            }
        }
    }));

    handles.push(tokio::spawn(crate::revoke::follow(
        broker.store.clone(),
        broker.revocations.clone(),
        broker.clock.clone(),
    )));

    // Checkpoints, flood summaries, the head in the store, and a sync a second of what no
    // request waited for (exchanges wait for their own record: `AuditLog::commit`).
    handles.push(tokio::spawn(crate::audit::maintain::run(
        broker.audit.clone(),
        broker.store.clone(),
    )));
    handles
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
