//! The trust sources that keep a trust domain's bundle current while the broker runs:
//! a SPIFFE federation bundle endpoint (`https_web` profile) refreshed per its
//! `spiffe_refresh_hint`, and the Workload API (JWT and X.509 bundles streamed from the
//! agent). Bundle files are re-read by the application's reload loop.
//!
//! Failures never touch other trust domains: each source updates only its own
//! [`DomainBundle`]s, which fail closed while the source cannot be read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::bundles::{self, DomainBundle, KeyUse, MAX_BUNDLE_BYTES, TrustBundle};
use crate::config::bundle_refresh;

/// How long one bundle endpoint request may take.
pub const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect/retry waits: doubling from the first, up to the ceiling, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    ceiling: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(first: Duration, ceiling: Duration) -> Self {
        Backoff {
            first,
            ceiling,
            attempt: 0,
        }
    }

    /// The next wait: `first × 2^n`, capped, minus up to a quarter of jitter so that replicas
    /// do not retry in step.
    pub fn next_wait(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(16)).unwrap_or(u32::MAX);
        self.attempt = self.attempt.saturating_add(1);
        let wait = self.first.saturating_mul(factor).min(self.ceiling);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        wait.saturating_sub(wait / 4 * (nanos % 1000) / 1000)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// An error with its causes, `a: b: c` (what went wrong with TLS is in the causes).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A federation bundle endpoint of one trust domain.
#[derive(Clone)]
pub struct EndpointSource {
    pub domain: Arc<DomainBundle>,
    pub url: String,
    pub http: reqwest::Client,
    pub refresh_min: Duration,
    pub refresh_max: Duration,
}

impl EndpointSource {
    /// The HTTPS client of a bundle endpoint: web PKI roots plus the PEM certificates of
    /// `extra_ca`, no redirects (the configured URL is the endpoint), a bounded time.
    pub fn client(extra_ca: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .timeout(ENDPOINT_TIMEOUT)
            .connect_timeout(ENDPOINT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true);
        if let Some(path) = extra_ca {
            let text = std::fs::read(path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&text)
                .map_err(|e| format!("`{}` is not PEM: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("`{}` holds no PEM certificate", path.display()));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        b.build().map_err(|e| e.to_string())
    }

    /// How long to keep a fetched bundle before the next fetch: its refresh hint (or the
    /// default when it has none), within the configured bounds.
    pub fn refresh_after(&self, bundle: &TrustBundle) -> Duration {
        let hint = bundle
            .refresh_hint
            .map_or(bundle_refresh::DEFAULT_HINT, Duration::from_secs);
        hint.clamp(self.refresh_min, self.refresh_max.max(self.refresh_min))
    }

    /// One fetch: GET, status 200, at most [`MAX_BUNDLE_BYTES`], a SPIFFE bundle.
    pub async fn fetch(&self) -> Result<TrustBundle, String> {
        let url = &self.url;
        let mut resp = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", chain(&e)))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("GET {url} answered {}", resp.status()));
        }
        if resp.content_length().is_some_and(|l| l > MAX_BUNDLE_BYTES) {
            return Err(format!("GET {url}: larger than {MAX_BUNDLE_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: {}", chain(&e)))?
        {
            if u64::try_from(body.len() + chunk.len()).unwrap_or(u64::MAX) > MAX_BUNDLE_BYTES {
                return Err(format!("GET {url}: larger than {MAX_BUNDLE_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        bundles::parse_bundle(&body, url, KeyUse::SpiffeBundle).map_err(|e| e.to_string())
    }

    /// Fetches, then refreshes per the hint, forever. A failed fetch is retried with backoff
    /// (never later than the refresh interval) and the bundle held keeps serving until it is
    /// older than `max_bundle_age`; a trust domain never fetched stays not ready.
    pub async fn run(self) {
        let td = self.domain.name().to_string();
        let mut backoff = Backoff::new(Duration::from_secs(1), self.refresh_max);
        loop {
            let wait = match self.fetch().await {
                Ok(bundle) => {
                    let wait = self.refresh_after(&bundle);
                    tracing::info!(
                        trust_domain = %td,
                        jwt_authorities = bundle.authorities.len(),
                        x509_authorities = bundle.x509_authorities.len(),
                        sequence = bundle.sequence,
                        refresh_in_secs = wait.as_secs(),
                        "trust bundle fetched from its bundle endpoint"
                    );
                    self.domain.set(bundle);
                    backoff.reset();
                    wait
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "bundle endpoint fetch failed");
                    self.domain.note_error(e);
                    let wait = backoff.next_wait();
                    // Wake when the bundle goes stale, so the trust domain is marked not
                    // ready (and cached results dropped) on time.
                    match self.domain.stale_in() {
                        Some(left) if left < wait => left + Duration::from_millis(1),
                        _ => wait,
                    }
                }
            };
            tokio::time::sleep(wait).await;
            self.domain.expire_if_stale();
        }
    }
}

/// The trust domains that read their bundles from one Workload API endpoint.
#[derive(Clone)]
pub struct WorkloadApiSource {
    pub endpoint: String,
    pub domains: Vec<Arc<DomainBundle>>,
}

/// First and longest wait between reconnects to the Workload API.
pub const WORKLOAD_API_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(5));

impl WorkloadApiSource {
    /// Streams JWT and X.509 bundles from the agent; reconnects with backoff when the
    /// stream ends or fails. While disconnected, every trust domain of this endpoint is not
    /// ready (fail closed); each message replaces the bundles of the trust domains it names,
    /// and a trust domain it does not name is not ready.
    pub async fn run(self) {
        let mut backoff = Backoff::new(WORKLOAD_API_BACKOFF.0, WORKLOAD_API_BACKOFF.1);
        let mut logged_down = false;
        loop {
            let reason = match self.stream(&mut backoff).await {
                Ok(()) => "the Workload API closed the stream".to_string(),
                Err(e) => e,
            };
            for d in &self.domains {
                d.fail(format!("Workload API {}: {reason}", self.endpoint));
            }
            if !logged_down {
                tracing::error!(endpoint = %self.endpoint, error = %reason, "Workload API unavailable; its trust domains fail closed until it is back");
                logged_down = true;
            } else {
                tracing::debug!(endpoint = %self.endpoint, error = %reason, "Workload API still unavailable");
            }
            tokio::time::sleep(backoff.next_wait()).await;
            if self.domains.iter().any(|d| d.status().is_ok()) {
                logged_down = false;
            }
        }
    }

    async fn stream(&self, backoff: &mut Backoff) -> Result<(), String> {
        let client = spiffe::WorkloadApiClient::connect_to(&self.endpoint)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut jwt = client
            .stream_jwt_bundles()
            .await
            .map_err(|e| format!("FetchJWTBundles: {e}"))?;
        let mut x509 = client
            .stream_x509_bundles()
            .await
            .map_err(|e| format!("FetchX509Bundles: {e}"))?;
        let mut jwt_part: Option<HashMap<String, TrustBundle>> = None;
        let mut x509_part: Option<HashMap<String, Vec<Arc<[u8]>>>> = None;
        loop {
            tokio::select! {
                m = jwt.next() => match m {
                    Some(Ok(set)) => jwt_part = Some(jwt_bundles(&set)?),
                    Some(Err(e)) => return Err(format!("FetchJWTBundles: {e}")),
                    None => return Ok(()),
                },
                m = x509.next() => match m {
                    Some(Ok(set)) => x509_part = Some(x509_bundles(&set)),
                    Some(Err(e)) => return Err(format!("FetchX509Bundles: {e}")),
                    None => return Ok(()),
                },
            }
            // Both streams answer at once when they open; bundles are published once each
            // has given its first message, then on every message.
            if let (Some(j), Some(x)) = (&jwt_part, &x509_part) {
                backoff.reset();
                self.publish(j, x);
            }
        }
    }

    fn publish(&self, jwt: &HashMap<String, TrustBundle>, x509: &HashMap<String, Vec<Arc<[u8]>>>) {
        for d in &self.domains {
            match jwt.get(d.name()) {
                Some(b) => {
                    let mut b = b.clone();
                    b.x509_authorities = x509.get(d.name()).cloned().unwrap_or_default();
                    let first = d.status().is_err();
                    d.set(b);
                    if first {
                        tracing::info!(trust_domain = d.name(), endpoint = %self.endpoint, "trust bundle received from the Workload API");
                    }
                }
                None => d.fail(format!(
                    "the Workload API at {} serves no JWT bundle for this trust domain",
                    self.endpoint
                )),
            }
        }
    }
}

/// The JWT bundles of one Workload API message, in Writ's model. A bundle Writ cannot use
/// (a key it cannot verify with) ends the stream as an error: the agent is then not a
/// source to trust until it sends what Writ can read.
fn jwt_bundles(set: &spiffe::JwtBundleSet) -> Result<HashMap<String, TrustBundle>, String> {
    let mut out = HashMap::new();
    for (td, bundle) in set.iter() {
        let keys: Vec<serde_json::Value> = bundle
            .jwt_authorities()
            .map(|a| serde_json::from_slice(a.jwk_json()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("JWT bundle of {td}: {e}"))?;
        let text =
            serde_json::to_vec(&serde_json::json!({ "keys": keys })).map_err(|e| e.to_string())?;
        let name = format!("Workload API JWT bundle of {td}");
        let parsed =
            bundles::parse_bundle(&text, &name, KeyUse::JwtOnly).map_err(|e| e.to_string())?;
        out.insert(td.to_string(), parsed);
    }
    Ok(out)
}

fn x509_bundles(set: &spiffe::X509BundleSet) -> HashMap<String, Vec<Arc<[u8]>>> {
    set.iter()
        .map(|(td, b)| {
            let certs = b
                .authorities()
                .iter()
                .map(|c| Arc::<[u8]>::from(c.as_bytes()))
                .collect();
            (td.to_string(), certs)
        })
        .collect()
}

/// A background task that keeps some trust domains' bundles current.
#[derive(Clone)]
pub enum SourceTask {
    Endpoint(EndpointSource),
    WorkloadApi(WorkloadApiSource),
}

impl SourceTask {
    pub async fn run(self) {
        match self {
            SourceTask::Endpoint(s) => s.run().await,
            SourceTask::WorkloadApi(s) => s.run().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        for (i, w) in waits.iter().enumerate() {
            let full = Duration::from_millis(200)
                .saturating_mul(1 << i)
                .min(Duration::from_secs(5));
            assert!(*w <= full && *w >= full * 3 / 4, "{i}: {w:?} vs {full:?}");
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(200));
    }

    #[test]
    fn refresh_hint_is_bounded() {
        let changes = Arc::new(tokio::sync::watch::channel(0).0);
        let s = EndpointSource {
            domain: Arc::new(DomainBundle::pending(
                "td",
                bundles::SourceKind::Endpoint("https://x".into()),
                None,
                changes,
            )),
            url: "https://x".into(),
            http: reqwest::Client::new(),
            refresh_min: Duration::from_secs(30),
            refresh_max: Duration::from_secs(3600),
        };
        let with = |hint: Option<u64>| TrustBundle {
            refresh_hint: hint,
            ..TrustBundle::default()
        };
        assert_eq!(s.refresh_after(&with(Some(1))), Duration::from_secs(30));
        assert_eq!(s.refresh_after(&with(Some(600))), Duration::from_secs(600));
        assert_eq!(
            s.refresh_after(&with(Some(u64::MAX))),
            Duration::from_secs(3600)
        );
        assert_eq!(s.refresh_after(&with(None)), bundle_refresh::DEFAULT_HINT);
    }
}
