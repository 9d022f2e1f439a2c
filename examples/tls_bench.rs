//! TLS and mTLS measurements for `scripts/bench/tls.sh`.
//!
//! `tls_bench setup DIR BUNDLE SPIFFE_ID` mints, with rcgen, a server CA and a certificate for
//! 127.0.0.1 (`DIR/server.pem`, `DIR/server.key`, `DIR/server-ca.pem`), a trust domain CA
//! added to the SPIFFE bundle file `BUNDLE` as an `x509-svid` authority, and an X509-SVID for
//! `SPIFFE_ID` (`DIR/agent.pem`, `DIR/agent.key`).
//!
//! `tls_bench load` measures token exchanges/s, p50 and p99 against running brokers, each
//! mode with a keep-alive pool and with a new connection (a full handshake) per request:
//! - `plain`: `PLAIN` (http://), a JWT-SVID subject token (`SVID`, a file);
//! - `tls`: `TLS` (https://), the same JWT-SVID, no client certificate;
//! - `mtls`: `TLS`, the X509-SVID as client certificate and subject (no subject_token), the
//!   token bound to it.
//!
//! `DIR` holds the files of `setup`; `DURATION` (seconds, default 10) and `CONCURRENCY`
//! (default 32) shape the load.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const API: &str = "https://api.example.org";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ca(uri: Option<&str>) -> (Issuer<'static, KeyPair>, String, Vec<u8>) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "bench CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (Issuer::new(p, key), cert.pem(), cert.der().to_vec())
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    san: SanType,
    eku: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "bench");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.subject_alt_names = vec![san];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn setup(dir: &Path, bundle: &Path, spiffe_id: &str) {
    let (server_ca, server_ca_pem, _) = ca(None);
    let (cert, key) = leaf(
        &server_ca,
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    std::fs::write(dir.join("server-ca.pem"), server_ca_pem).unwrap();
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();

    let td = spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let (td_ca, _, td_der) = ca(Some(&format!("spiffe://{td}")));
    let (cert, key) = leaf(
        &td_ca,
        SanType::URI(spiffe_id.try_into().unwrap()),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    std::fs::write(dir.join("agent.pem"), cert).unwrap();
    std::fs::write(dir.join("agent.key"), key).unwrap();

    let mut b: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle).unwrap()).unwrap();
    b["keys"].as_array_mut().unwrap().push(serde_json::json!({
        "kty": "EC",
        "use": "x509-svid",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(td_der)],
    }));
    std::fs::write(bundle, serde_json::to_vec(&b).unwrap()).unwrap();
}

/// A measured mode: its name, how its client is made (fresh or pooled), URL and body.
type Mode<'a> = (
    &'a str,
    &'a dyn Fn(bool) -> reqwest::Client,
    String,
    &'a str,
);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `concurrency` workers post `body` to `url` for `duration`. With `fresh`, each request
/// goes on a new connection (the pool keeps none).
async fn load(
    make: &dyn Fn(bool) -> reqwest::Client,
    fresh: bool,
    url: &str,
    body: &str,
    duration: Duration,
    concurrency: usize,
) -> (u64, u64, f64, Duration, Duration) {
    let http = make(fresh);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, body) = (http.clone(), url.to_string(), body.to_string());
        let (ok, errors, latencies) = (ok.clone(), errors.clone(), latencies.clone());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while start.elapsed() < duration {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        mine.push(t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!(
                                "first error: {} {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            );
                        }
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first error: {e}");
                        }
                    }
                }
            }
            latencies.lock().extend(mine);
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *latencies.lock());
    l.sort();
    let ok = ok.load(Ordering::Relaxed);
    (
        ok,
        errors.load(Ordering::Relaxed),
        ok as f64 / secs,
        percentile(&l, 0.5),
        percentile(&l, 0.99),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("setup") {
        setup(Path::new(&args[2]), Path::new(&args[3]), &args[4]);
        return Ok(());
    }
    let dir = std::path::PathBuf::from(std::env::var("DIR")?);
    let plain = std::env::var("PLAIN")?;
    let tls = std::env::var("TLS")?;
    let svid = std::fs::read_to_string(std::env::var("SVID")?)?
        .trim()
        .to_string();
    let duration = Duration::from_secs(env_or("DURATION", 10));
    let concurrency = env_or("CONCURRENCY", 32) as usize;
    let server_ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("server-ca.pem"))?)?;
    let mut identity_pem = std::fs::read(dir.join("agent.pem"))?;
    identity_pem.extend(std::fs::read(dir.join("agent.key"))?);
    let identity = reqwest::Identity::from_pem(&identity_pem)?;

    let jwt_body = serde_urlencoded::to_string([
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT),
        ("scope", "repo:read"),
        ("audience", API),
    ])?;
    let cert_body = serde_urlencoded::to_string([
        ("grant_type", GRANT),
        ("scope", "repo:read"),
        ("audience", API),
    ])?;
    let builder = |fresh: bool| {
        let b = reqwest::Client::builder().use_rustls_tls();
        if fresh {
            b.pool_max_idle_per_host(0)
        } else {
            b.pool_max_idle_per_host(concurrency)
        }
    };
    let plain_client = |fresh: bool| builder(fresh).build().unwrap();
    let tls_client = |fresh: bool| {
        builder(fresh)
            .tls_built_in_root_certs(false)
            .add_root_certificate(server_ca.clone())
            .build()
            .unwrap()
    };
    let mtls_client = |fresh: bool| {
        builder(fresh)
            .tls_built_in_root_certs(false)
            .add_root_certificate(server_ca.clone())
            .identity(identity.clone())
            .build()
            .unwrap()
    };
    let modes: [Mode<'_>; 3] = [
        (
            "plain",
            &plain_client,
            format!("{plain}/oauth2/token"),
            &jwt_body,
        ),
        ("tls", &tls_client, format!("{tls}/oauth2/token"), &jwt_body),
        (
            "mtls",
            &mtls_client,
            format!("{tls}/oauth2/token"),
            &cert_body,
        ),
    ];
    for fresh in [false, true] {
        let conn = if fresh { "new_conn" } else { "keepalive" };
        for (name, make, url, body) in &modes {
            let (ok, err, rps, p50, p99) =
                load(*make, fresh, url, body, duration, concurrency).await;
            println!(
                "exchange_{name}_{conn}_rps={rps:.0} p50_ms={:.2} p99_ms={:.2} ok={ok} errors={err}",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
