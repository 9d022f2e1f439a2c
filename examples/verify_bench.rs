//! Resource-server verifier throughput (`scripts/bench/dpop_status.sh`): checks per second on
//! one core (a current-thread runtime) of a DPoP-bound token with a warm cache. The JWKS and
//! the status list are served once by a loopback stand-in for the broker and then come from
//! the verifier's caches: the loop does no I/O. Every check has a fresh proof (made before
//! the clock starts), so each one verifies two signatures (token and proof), the claims, the
//! proof's `htm`/`htu`/`ath`/`iat`, records its `jti`, and reads the token's status bit.
//!
//! `CHECKS` (default 20,000) checks; prints `verify_checks_per_sec=N`.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::routing::get;
use serde_json::json;
use writ::token::dpop::{make_proof, thumbprint};
use writ::token::keys::{KeyAlg, KeySet, SigningKey, generate_pem};
use writ::token::status::{StatusClaim, StatusListClaims, StatusRef, encode};
use writ::token::{Aud, TaskClaims, TokenIssuer, sign_jws};
use writ::verify::{Config, Presented, Verifier};

const API: &str = "https://api.example.org";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn main() {
    let checks: usize = std::env::var("CHECKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(checks));
}

async fn run(checks: usize) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let broker_key =
        SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "broker").unwrap();
    let keys = KeySet::new(vec![broker_key]).unwrap();
    let now = unix_now();
    let list_uri = format!("{issuer}/oauth2/status/sl_bench");
    let list = sign_jws(
        &keys,
        "statuslist+jwt",
        &StatusListClaims {
            sub: list_uri.clone(),
            iat: now,
            exp: now + 3600,
            ttl: 3600,
            status_list: encode(&[0u8; 128]).unwrap(),
        },
    )
    .unwrap();
    let fetches = Arc::new(AtomicU64::new(0));
    let (jwks, f1, f2) = (keys.jwks().clone(), fetches.clone(), fetches.clone());
    let app = Router::new()
        .route(
            "/oauth2/jwks",
            get(move || {
                f1.fetch_add(1, Ordering::Relaxed);
                let jwks = jwks.clone();
                async move { axum::Json(jwks) }
            }),
        )
        .route(
            "/oauth2/status/sl_bench",
            get(move || {
                f2.fetch_add(1, Ordering::Relaxed);
                let list = list.clone();
                async move { ([("content-type", "application/statuslist+jwt")], list) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client_key =
        SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "client").unwrap();
    let mut public = client_key.jwk().clone();
    public
        .as_object_mut()
        .unwrap()
        .retain(|k, _| matches!(k.as_str(), "kty" | "crv" | "x" | "y"));
    let jkt = thumbprint(&public).unwrap();
    let token = TokenIssuer::new(issuer.clone(), keys)
        .unwrap()
        .sign(&TaskClaims {
            iss: issuer.clone(),
            sub: "spiffe://example.org/agent/bench".into(),
            client_id: "spiffe://example.org/agent/bench".into(),
            aud: Aud::One(API.into()),
            scope: "repo:read".into(),
            txn: "tsk_bench".into(),
            jti: "bench".into(),
            iat: now,
            nbf: now,
            exp: now + 600,
            cnf: Some(json!({ "jkt": jkt })),
            act: None,
            status: Some(StatusClaim {
                status_list: StatusRef {
                    idx: 7,
                    uri: list_uri,
                },
            }),
        })
        .unwrap();

    let mut config = Config::new(&issuer, API);
    config.resource_url = Some(API.into());
    config.replay_capacity = checks + 16;
    config.max_status_age = std::time::Duration::from_secs(3600);
    let verifier = Verifier::new(config).unwrap();
    let url = format!("{API}/repo");
    let auth = format!("DPoP {token}");
    let authorization = [auth.as_str()];
    // Proofs for every check and one to warm the caches, made before the clock starts.
    let proofs: Vec<String> = (0..=checks)
        .map(|_| make_proof(&client_key, "GET", &url, unix_now(), None, Some(&token)).unwrap())
        .collect();
    check(&verifier, &url, &authorization, &proofs[0])
        .await
        .expect("the warm-up check passes");
    let warm_fetches = fetches.load(Ordering::Relaxed);
    let start = Instant::now();
    for proof in &proofs[1..] {
        check(&verifier, &url, &authorization, proof)
            .await
            .expect("every check passes");
    }
    let elapsed = start.elapsed();
    assert_eq!(
        fetches.load(Ordering::Relaxed),
        warm_fetches,
        "the loop fetched from the broker"
    );
    println!(
        "verify_checks={checks} verify_seconds={:.3}",
        elapsed.as_secs_f64()
    );
    println!(
        "verify_checks_per_sec={:.0}",
        checks as f64 / elapsed.as_secs_f64()
    );
}

/// One check of the bound token with `proof`.
async fn check(
    verifier: &Verifier,
    url: &str,
    authorization: &[&str],
    proof: &str,
) -> Result<writ::verify::Verified, writ::verify::Rejection> {
    verifier
        .verify(&Presented {
            method: "GET",
            url,
            authorization,
            dpop: &[proof],
            peer_certificate: None,
        })
        .await
}
