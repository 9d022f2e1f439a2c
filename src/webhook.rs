//! Notification of approval requests (`[approvals.webhook]`, SPEC §4.7): each request is
//! POSTed as JSON with `Writ-Signature: sha256=<hex HMAC-SHA256 of the body>`, in a task of
//! its own, retried with backoff. Nothing here decides anything: a delivery that never
//! arrives leaves the request pending until it expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::WebhookConfig;

/// Delivery attempts per request, and the pause before the second (doubled each time).
const ATTEMPTS: u32 = 6;
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// One attempt's time limit.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries in flight at once; past it a notification is dropped (and counted).
const MAX_IN_FLIGHT: usize = 256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Writ-Signature";

/// What deliveries did, read into the metrics at scrape time.
#[derive(Debug, Default)]
pub struct Stats {
    pub failed_attempts: AtomicU64,
    pub delivered: AtomicU64,
    pub abandoned: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    url: String,
    key: ring::hmac::Key,
    client: reqwest::Client,
    slots: Arc<tokio::sync::Semaphore>,
    pub stats: Arc<Stats>,
}

impl Webhook {
    pub fn new(config: &WebhookConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Webhook {
            url: config.url.clone(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, config.secret.expose()),
            client,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Sends `body` in the background; returns at once.
    pub fn notify(&self, body: Vec<u8>) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("approval webhook: too many deliveries in flight; one dropped");
            return;
        };
        let hook = self.clone();
        tokio::spawn(async move {
            hook.deliver(&body).await;
            drop(permit);
        });
    }

    async fn deliver(&self, body: &[u8]) {
        let sig = format!(
            "sha256={}",
            hex::encode(ring::hmac::sign(&self.key, body).as_ref())
        );
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            let sent = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &sig)
                .body(body.to_vec())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), attempt, "approval webhook refused the notification");
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), attempt, "approval webhook unreachable");
                }
            }
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            if attempt < ATTEMPTS {
                tokio::time::sleep(pause).await;
                pause = pause.saturating_mul(2);
            }
        }
        self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            attempts = ATTEMPTS,
            "approval webhook: notification abandoned; the request stays pending"
        );
    }
}
