//! Redis operations: what one holder can make the store keep, and what a replica does when
//! the store loses its state.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;
use crate::redis_support::RedisServer;

async fn wait_ready(app: &TestApp) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if app.get("/readyz").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("broker did not become ready");
}

fn used_memory(redis: &RedisServer) -> i64 {
    let info = redis.cli(&["INFO", "memory"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn stream_len(redis: &RedisServer) -> i64 {
    redis
        .cli(&["XLEN", "writ:{feed}:stream"])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn revoke(app: &TestApp, token: &str) {
    let form = Some((
        "application/x-www-form-urlencoded",
        serde_urlencoded::to_string([("token", token)]).unwrap(),
    ));
    let (s, _) = app.call(Method::POST, "/oauth2/revoke", None, form).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_one_token_ten_thousand_times_stores_and_logs_it_once() {
    let redis = RedisServer::start();
    let app = spawn_app_with(Options {
        extra_config: redis_store(&redis.url()),
        ..Options::default()
    })
    .await;
    wait_ready(&app).await;
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let before = used_memory(&redis);
    let len_before = stream_len(&redis);

    revoke(&app, &token).await;
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    // The other 9,999, eight at a time.
    let mut left = 9_999_usize;
    while left > 0 {
        let n = left.min(8);
        futures_util::future::join_all((0..n).map(|_| revoke(&app, &token))).await;
        left -= n;
    }

    let entries = stream_len(&redis) - len_before;
    assert_eq!(
        entries, 1,
        "feed entries for one token revoked 10,000 times"
    );
    let logged = app
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "revoke")
        .count();
    assert_eq!(
        logged, 1,
        "decision-log records for the holder's revocation"
    );
    let grown = used_memory(&redis) - before;
    // Client buffers and the script cache account for about 120 KiB; 10,000 stream
    // entries would be well over a megabyte.
    assert!(grown < 512 * 1024, "Redis grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_the_same_revocation_twice_appends_it_once() {
    let redis = RedisServer::start();
    let app = spawn_app_with(Options {
        extra_config: redis_store(&redis.url()),
        ..Options::default()
    })
    .await;
    wait_ready(&app).await;
    let (token, task) = app.task_token(AGENT, "repo:read").await;
    let jti = claims_of(&token)["jti"].clone();
    let len_before = stream_len(&redis);
    // An admin revokes the same jti and the same task twice (two replicas could race).
    for _ in 0..2 {
        let (s, v) = app
            .admin_revoke(json!({"selector": {"jti": jti}, "reason": "leaked"}))
            .await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = app
            .admin_revoke(json!({"selector": {"task_id": task}, "reason": "runaway"}))
            .await;
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(
        stream_len(&redis) - len_before,
        2,
        "one token and one task entry"
    );
}
