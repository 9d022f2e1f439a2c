//! Redis measurements for `scripts/bench.sh`, against the server at `REDIS_URL`:
//! - revocation propagation: replica A publishes 1,000 revocations one after another;
//!   replica B follows the feed into its local cache; the time from A's publish to B's
//!   cache holding it, p50 and p99;
//! - Redis memory per open task at 100,000 open tasks (used_memory before and after);
//! - the time a fresh replica takes to load a feed of 100,000 live revocations (paged);
//! - Redis memory and feed length after one token is revoked 10,000 times.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use writ::domain::{Clock, Subject, SystemClock, TaskId};
use writ::revocation::RevocationCache;
use writ::store::redis::RedisStore;
use writ::store::{FeedEvent, Store, TaskRecord, TaskState, TokenEntry};
use writ::token::{Aud, TaskClaims};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn used_memory(url: &str) -> anyhow::Result<i64> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL")?;
    let horizon = Duration::from_secs(3600);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    // Propagation A -> B.
    let a = RedisStore::connect(Some(&url), &[], Some("bench:"), horizon).await?;
    let b: Arc<dyn Store> =
        Arc::new(RedisStore::connect(Some(&url), &[], Some("bench:"), horizon).await?);
    let cache = Arc::new(RevocationCache::new(Duration::from_secs(5), false));
    tokio::spawn(writ::revocation::follow(
        b.clone(),
        cache.clone(),
        clock.clone(),
    ));
    while !cache.is_fresh() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let now = clock.now();
    let probe = |jti: &str| TaskClaims {
        iss: "i".into(),
        sub: "spiffe://example.org/a".into(),
        client_id: "c".into(),
        aud: Aud::One("a".into()),
        scope: "s".into(),
        txn: "tsk_none".into(),
        jti: jti.into(),
        iat: now,
        nbf: now,
        exp: now + 300,
        cnf: None,
        act: None,
        status: None,
    };
    let mut lat = Vec::with_capacity(1000);
    for i in 0..1000 {
        let jti = format!("bench-{i}-{}", TaskId::generate()?);
        let claims = probe(&jti);
        let start = Instant::now();
        a.publish(
            &FeedEvent::Token {
                jti: jti.clone(),
                until: now + 300,
            },
            now,
        )
        .await?;
        while cache.revoked_reason(&claims, now).is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                anyhow::bail!("revocation {i} did not propagate within 5 s");
            }
            tokio::task::yield_now().await;
        }
        lat.push(start.elapsed());
    }
    lat.sort();
    println!(
        "propagation_p50_ms={:.3}",
        percentile(&lat, 0.50).as_secs_f64() * 1000.0
    );
    println!(
        "propagation_p99_ms={:.3}",
        percentile(&lat, 0.99).as_secs_f64() * 1000.0
    );
    println!(
        "propagation_max_ms={:.3}",
        lat[lat.len() - 1].as_secs_f64() * 1000.0
    );

    // Memory per open task.
    let store = Arc::new(RedisStore::connect(Some(&url), &[], Some("mem:"), horizon).await?);
    let before = used_memory(&url).await?;
    const N: usize = 100_000;
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..32 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in (w..N).step_by(32) {
                let t = TaskRecord {
                    id: TaskId::generate()?,
                    owner: Subject::from_trusted(format!(
                        "spiffe://example.org/agent/worker-{}",
                        i % 1000
                    )),
                    issuer: "example.org".into(),
                    purpose: "triage the nightly build failure".into(),
                    created_at: now,
                    deadline: now + 3600,
                    state: TaskState::Open,
                    ended_at: None,
                    end_reason: None,
                    policy_version:
                        "3f1c9e0b8a7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e".into(),
                    scopes: vec!["repo:read".into(), "tickets:read".into()],
                    audience: vec!["https://api.example.org".into()],
                    tokens_issued: 1,
                    parent: None,
                    depth: 0,
                    source: "jwt-svid".into(),
                    claims: Default::default(),
                    grant: None,
                    on_behalf_of: None,
                    act: None,
                    approval: None,
                    jkt: None,
                    x5t: None,
                };
                let jti = writ::domain::random_id("")?;
                store
                    .create_task(
                        &t,
                        &TokenEntry {
                            jti,
                            exp: now + 300,
                        },
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let after = used_memory(&url).await?;
    println!("tasks_created={N} in {secs:.1}s ({:.0}/s)", N as f64 / secs);
    println!("redis_bytes_per_open_task={}", (after - before) / N as i64);

    feed_load(&url, horizon, now).await?;
    repeated_revocation(&url, horizon, now).await
}

/// A feed of 100,000 live token revocations, loaded by a fresh replica.
async fn feed_load(url: &str, horizon: Duration, now: i64) -> anyhow::Result<()> {
    const N: usize = 100_000;
    let store = Arc::new(RedisStore::connect(Some(url), &[], Some("feed:"), horizon).await?);
    // A running replica first: it gives the empty store its generation key, as a broker
    // does, so that a fresh replica later trusts the feed it finds.
    let running = Arc::new(RevocationCache::new(Duration::from_secs(5), false));
    let follower = tokio::spawn(writ::revocation::follow(
        store.clone() as Arc<dyn Store>,
        running.clone(),
        Arc::new(SystemClock),
    ));
    while !running.is_fresh() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    follower.abort();
    let mut handles = Vec::new();
    for w in 0..32 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in (w..N).step_by(32) {
                let event = FeedEvent::Token {
                    jti: format!("feed-{i}"),
                    until: now + 3000,
                };
                store.publish(&event, now).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let fresh: Arc<dyn Store> =
        Arc::new(RedisStore::connect(Some(url), &[], Some("feed:"), horizon).await?);
    let started = Instant::now();
    let (events, _) = fresh.feed_snapshot(now).await?;
    let snapshot = started.elapsed();
    let cache = Arc::new(RevocationCache::new(Duration::from_secs(5), false));
    let started = Instant::now();
    tokio::spawn(writ::revocation::follow(
        fresh,
        cache.clone(),
        Arc::new(SystemClock),
    ));
    while !cache.is_fresh() {
        if started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("a fresh replica did not load the feed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("feed_load_events={}", events.len());
    println!(
        "feed_snapshot_100k_ms={:.0}",
        snapshot.as_secs_f64() * 1000.0
    );
    println!(
        "feed_ready_100k_ms={:.0}",
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// What the keys under `prefix` take in Redis (MEMORY USAGE summed over a SCAN): unlike
/// `used_memory`, not moved by client buffers or memory freed from earlier runs.
async fn keys_memory(url: &str, prefix: &str) -> anyhow::Result<i64> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await?;
    let mut total = 0i64;
    for k in keys {
        let n: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&k)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut c)
            .await?;
        total += n.unwrap_or(0);
    }
    Ok(total)
}

/// One token revoked 10,000 times: the feed keeps it once.
async fn repeated_revocation(url: &str, horizon: Duration, now: i64) -> anyhow::Result<()> {
    let store = RedisStore::connect(Some(url), &[], Some("repeat:"), horizon).await?;
    let before = keys_memory(url, "repeat:").await?;
    let event = FeedEvent::Token {
        jti: "the-same-token".into(),
        until: now + 300,
    };
    store.publish(&event, now).await?;
    let one = keys_memory(url, "repeat:").await?;
    for _ in 1..10_000 {
        store.publish(&event, now).await?;
    }
    let after = keys_memory(url, "repeat:").await?;
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let len: i64 = redis::cmd("XLEN")
        .arg("repeat:{feed}:stream")
        .query_async(&mut c)
        .await?;
    println!("repeat_revokes=10000 feed_entries={len}");
    println!(
        "redis_key_bytes_after_1_revoke={} after_10k_repeat_revokes={}",
        one - before,
        after - before
    );
    Ok(())
}
