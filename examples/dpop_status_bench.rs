//! DPoP and status-list measurements for `scripts/bench/dpop_status.sh`, against running
//! brokers:
//! - exchange req/s at `BROKER_A` without and with a DPoP proof, in the same run and with the
//!   same client (proofs are made before the clock starts, so only the broker's cost counts);
//! - status-list serving req/s at `BROKER_B`;
//! - revocation to bit: a token revoked at A (RFC 7009), the time until B serves its bit set,
//!   p50/p99 over `REVOCATIONS` (default 1,000) revocations.
//!
//! `SVID` holds a JWT-SVID the brokers accept for `repo:read` at `https://api.example.org`.
//! `DURATION` (seconds, default 10) and `CONCURRENCY` (default 32) shape the load.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use writ::token::keys::{KeyAlg, SigningKey, generate_pem};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn form(svid: &str) -> String {
    serde_urlencoded::to_string([
        ("grant_type", GRANT),
        ("subject_token", svid),
        ("subject_token_type", JWT),
        ("scope", "repo:read"),
        ("audience", "https://api.example.org"),
    ])
    .unwrap()
}

/// Runs `concurrency` workers for `duration`; each takes the next of `proofs` (when given)
/// for its request. Returns (ok, errors, requests per second).
async fn load(
    http: &reqwest::Client,
    url: String,
    body: Option<String>,
    proofs: Option<Arc<Vec<String>>>,
    duration: Duration,
    concurrency: usize,
) -> (u64, u64, f64) {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, body, proofs) = (http.clone(), url.clone(), body.clone(), proofs.clone());
        let (ok, errors, next) = (ok.clone(), errors.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while start.elapsed() < duration {
                let mut req = match &body {
                    Some(b) => http
                        .post(&url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(b.clone()),
                    None => http.get(&url),
                };
                if let Some(p) = &proofs {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(proof) = p.get(i) else { break };
                    req = req.header("DPoP", proof.as_str());
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    (ok, errors.load(Ordering::Relaxed), ok as f64 / secs)
}

async fn exchange(http: &reqwest::Client, broker: &str, svid: &str) -> String {
    let v: Value = http
        .post(format!("{broker}/oauth2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(svid))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("exchange failed: {v}"))
        .to_string()
}

fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// The bit of `idx` in the list at `uri`, as served by `broker` (same path).
async fn served_bit(http: &reqwest::Client, broker: &str, path: &str, idx: u64) -> u8 {
    let jwt = http
        .get(format!("{broker}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let claims = claims_of(&jwt);
    let list: writ::token::status::EncodedList =
        serde_json::from_value(claims["status_list"].clone()).unwrap();
    let bytes = writ::token::status::decode(&list).unwrap();
    writ::token::status::status_at(&bytes, idx).unwrap()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = std::env::var("BROKER_A")?;
    let b = std::env::var("BROKER_B")?;
    let svid = std::fs::read_to_string(std::env::var("SVID")?)?
        .trim()
        .to_string();
    let duration = Duration::from_secs(env_or("DURATION", 10));
    let concurrency = env_or("CONCURRENCY", 32) as usize;
    let revocations = env_or("REVOCATIONS", 1000) as usize;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let meta: Value = http
        .get(format!("{a}/.well-known/oauth-authorization-server"))
        .send()
        .await?
        .json()
        .await?;
    let htu = meta["token_endpoint"].as_str().unwrap().to_string();
    let token_url = format!("{a}/oauth2/token");

    // Exchange without and with DPoP, same client, same run.
    let (ok, err, bearer_rps) = load(
        &http,
        token_url.clone(),
        Some(form(&svid)),
        None,
        duration,
        concurrency,
    )
    .await;
    println!("exchange_bearer_ok={ok} exchange_bearer_errors={err}");
    println!("exchange_bearer_rps={bearer_rps:.0}");
    let key = SigningKey::from_pem(generate_pem(KeyAlg::Es256)?.as_bytes(), "bench")?;
    // Enough proofs for twice the bearer rate; made now, so `iat` is fresh for the run.
    let n = ((bearer_rps * duration.as_secs_f64() * 2.0) as usize).max(1000);
    let now = unix_now();
    let proofs: Vec<String> = (0..n)
        .map(|_| writ::token::dpop::make_proof(&key, "POST", &htu, now, None, None).unwrap())
        .collect();
    let (ok, err, dpop_rps) = load(
        &http,
        token_url,
        Some(form(&svid)),
        Some(Arc::new(proofs)),
        duration,
        concurrency,
    )
    .await;
    println!("exchange_dpop_ok={ok} exchange_dpop_errors={err}");
    println!("exchange_dpop_rps={dpop_rps:.0}");
    println!(
        "dpop_cost_percent={:.1}",
        (bearer_rps - dpop_rps) / bearer_rps * 100.0
    );

    // Status-list serving at B.
    let token = exchange(&http, &a, &svid).await;
    let c = claims_of(&token);
    let uri = c["status"]["status_list"]["uri"].as_str().unwrap();
    let path = format!("/oauth2/status/{}", uri.rsplit('/').next().unwrap());
    let (ok, err, list_rps) = load(
        &http,
        format!("{b}{path}"),
        None,
        None,
        duration,
        concurrency,
    )
    .await;
    println!("status_list_ok={ok} status_list_errors={err}");
    println!("status_list_rps={list_rps:.0}");

    // Revocation at A -> bit in B's served list.
    let mut tokens = Vec::with_capacity(revocations);
    for _ in 0..revocations {
        tokens.push(exchange(&http, &a, &svid).await);
    }
    let mut lat = Vec::with_capacity(revocations);
    for t in &tokens {
        let c = claims_of(t);
        let sl = &c["status"]["status_list"];
        let idx = sl["idx"].as_u64().unwrap();
        let path = format!(
            "/oauth2/status/{}",
            sl["uri"].as_str().unwrap().rsplit('/').next().unwrap()
        );
        let start = Instant::now();
        let r = http
            .post(format!("{a}/oauth2/revoke"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string([("token", t.as_str())])?)
            .send()
            .await?;
        assert!(r.status().is_success());
        while served_bit(&http, &b, &path, idx).await == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "bit never set");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(start.elapsed());
    }
    lat.sort();
    println!(
        "revocation_to_bit_p50_ms={:.2}",
        percentile(&lat, 0.5).as_secs_f64() * 1000.0
    );
    println!(
        "revocation_to_bit_p99_ms={:.2}",
        percentile(&lat, 0.99).as_secs_f64() * 1000.0
    );
    println!(
        "revocation_to_bit_max_ms={:.2}",
        lat.last().unwrap().as_secs_f64() * 1000.0
    );
    Ok(())
}
