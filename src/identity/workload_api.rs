//! The broker's own X509-SVID, streamed from the Workload API and followed through its
//! rotations: what `[server.tls] workload_api` serves with (SPEC §4.8).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretSlice};
use tokio::sync::watch;

use super::sources::{Backoff, WORKLOAD_API_BACKOFF};

/// One X509-SVID of the broker: the certificate chain (leaf first, DER) and its PKCS#8 key.
pub struct X509SvidMaterial {
    pub spiffe_id: String,
    pub cert_chain: Vec<Vec<u8>>,
    key_pkcs8: SecretSlice<u8>,
}

impl X509SvidMaterial {
    /// The private key, PKCS#8 DER.
    pub fn key_pkcs8_der(&self) -> &[u8] {
        self.key_pkcs8.expose_secret()
    }
}

impl std::fmt::Debug for X509SvidMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509SvidMaterial")
            .field("spiffe_id", &self.spiffe_id)
            .field("certificates", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl From<&spiffe::X509Svid> for X509SvidMaterial {
    fn from(svid: &spiffe::X509Svid) -> Self {
        X509SvidMaterial {
            spiffe_id: svid.spiffe_id().to_string(),
            cert_chain: svid
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
            key_pkcs8: SecretSlice::from(svid.private_key().as_bytes().to_vec()),
        }
    }
}

/// The latest X509-SVID the Workload API gave (`None` until the first one), updated on every
/// rotation. When the agent is unreachable the last SVID stays (it is valid until it
/// expires) and the stream is reopened with backoff.
#[derive(Clone)]
pub struct X509SvidWatch {
    rx: watch::Receiver<Option<Arc<X509SvidMaterial>>>,
}

impl X509SvidWatch {
    /// Starts following the default X509-SVID of the Workload API at `endpoint`
    /// (`unix:///path` or `tcp://IP:port`). The task ends when every watch is dropped.
    pub fn spawn(endpoint: String) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(follow(endpoint, tx));
        (X509SvidWatch { rx }, task)
    }

    /// The current SVID, if one has arrived.
    pub fn current(&self) -> Option<Arc<X509SvidMaterial>> {
        self.rx.borrow().clone()
    }

    /// Waits for the next SVID (the first, or a rotation); `None` when the task has ended.
    pub async fn changed(&mut self) -> Option<Arc<X509SvidMaterial>> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().clone()
    }

    /// Waits up to `bound` for a first SVID.
    pub async fn first(&mut self, bound: Duration) -> Result<Arc<X509SvidMaterial>, String> {
        let wait = self.rx.wait_for(Option::is_some);
        match tokio::time::timeout(bound, wait).await {
            Ok(Ok(v)) => v.clone().ok_or_else(|| "no X509-SVID".to_string()),
            Ok(Err(_)) => Err("the Workload API watch has ended".into()),
            Err(_) => Err(format!(
                "no X509-SVID from the Workload API within {}",
                humantime::format_duration(bound)
            )),
        }
    }
}

impl X509SvidWatch {
    /// Hands every SVID to `apply` (the current one first, then each rotation) until the
    /// Workload API task ends: the hook for a hot-swappable TLS identity. An SVID that
    /// `apply` refuses is logged and skipped; what it installed before keeps serving.
    pub async fn apply_each<E: std::fmt::Display>(
        mut self,
        apply: impl Fn(&X509SvidMaterial) -> Result<(), E>,
    ) {
        let mut next = self.rx.borrow_and_update().clone();
        loop {
            if let Some(svid) = &next
                && let Err(e) = apply(svid)
            {
                tracing::error!(spiffe_id = %svid.spiffe_id, error = %e, "X509-SVID from the Workload API not installed; the previous one keeps serving");
            }
            if self.rx.changed().await.is_err() {
                return;
            }
            next = self.rx.borrow_and_update().clone();
        }
    }
}

async fn follow(endpoint: String, tx: watch::Sender<Option<Arc<X509SvidMaterial>>>) {
    let mut backoff = Backoff::new(WORKLOAD_API_BACKOFF.0, WORKLOAD_API_BACKOFF.1);
    while !tx.is_closed() {
        let reason = match stream(&endpoint, &tx, &mut backoff).await {
            Ok(()) => "the Workload API closed the stream".to_string(),
            Err(e) => e,
        };
        tracing::warn!(%endpoint, error = %reason, "X509-SVID stream from the Workload API interrupted; reconnecting");
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

async fn stream(
    endpoint: &str,
    tx: &watch::Sender<Option<Arc<X509SvidMaterial>>>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut svids = client
        .stream_x509_svids()
        .await
        .map_err(|e| format!("FetchX509SVID: {e}"))?;
    while let Some(item) = svids.next().await {
        let svid = item.map_err(|e| format!("FetchX509SVID: {e}"))?;
        backoff.reset();
        tracing::info!(spiffe_id = %svid.spiffe_id(), "X509-SVID received from the Workload API");
        if tx
            .send(Some(Arc::new(X509SvidMaterial::from(&svid))))
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}
