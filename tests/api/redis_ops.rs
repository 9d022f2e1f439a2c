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

const BLOCKED: &str = "spiffe://example.org/agent/blocked";

/// What the flush tests revoke: a holder-revoked token, a token of an ended task, and a
/// token of a blocked subject.
struct Revoked {
    token: String,
    ended: String,
    blocked: String,
}

async fn revoke_three(app: &TestApp) -> Revoked {
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    revoke(app, &token).await;
    let (ended, task) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .call(
            Method::POST,
            &format!("/v1/tasks/{task}/end"),
            Some(&ended),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (blocked, _) = app.task_token(BLOCKED, "repo:read").await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"subject": BLOCKED}, "reason": "compromised"}))
        .await;
    assert_eq!(s, 200, "{v}");
    Revoked {
        token,
        ended,
        blocked,
    }
}

async fn refuses_all_three(app: &TestApp, r: &Revoked) {
    for t in [&r.token, &r.ended, &r.blocked] {
        assert_eq!(app.introspect(t).await, json!({"active": false}));
    }
    app.expect_error(&app.svid(BLOCKED), "repo:read", &[], 400, "invalid_grant")
        .await;
}

/// Waits until `check` holds, for at most 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flush_running_replicas_keep_refusing_and_publish_again() {
    let redis = RedisServer::start();
    let a = spawn_app_with(Options {
        extra_config: redis_store(&redis.url()),
        ..Options::default()
    })
    .await;
    let b = spawn_replica(&a).await;
    wait_ready(&b).await;
    let r = revoke_three(&a).await;
    refuses_all_three(&b, &r).await;

    assert_eq!(redis.cli(&["FLUSHALL"]).unwrap().trim(), "OK");
    refuses_all_three(&a, &r).await;
    refuses_all_three(&b, &r).await;
    // The replicas notice the lost generation and publish what they remember again.
    eventually("the store holds the revocations again", || {
        let blocks = redis.cli(&["HLEN", "writ:{feed}:blocks"]).unwrap();
        let epoch = redis.cli(&["EXISTS", "writ:{feed}:epoch"]).unwrap();
        stream_len(&redis) >= 3 && blocks.trim() == "1" && epoch.trim() == "1"
    })
    .await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    // A replica started now learns them from the store alone.
    let c = spawn_replica(&a).await;
    refuses_all_three(&c, &r).await;
    refuses_all_three(&a, &r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_a_store_that_lost_its_state_until_an_operator_confirms() {
    let redis = RedisServer::start();
    let a = spawn_app_with(Options {
        extra_config: redis_store(&redis.url()),
        ..Options::default()
    })
    .await;
    let _ = revoke_three(&a).await;
    let (config, pem) = (a.config_text.clone(), a.svid_key_pem.clone());
    let dir = a.stop().await;
    // Nobody runs; the store loses its revocation state (evicted) but still holds tasks.
    redis
        .cli(&[
            "DEL",
            "writ:{feed}:epoch",
            "writ:{feed}:stream",
            "writ:{feed}:blocks",
        ])
        .unwrap();
    let c = spawn_replica_unready(&config, dir.path(), &pem).await;
    let start = Instant::now();
    let body = loop {
        let (s, v) = c.get("/readyz").await;
        assert_eq!(s, 503, "ready on a store that lost its state: {v}");
        if v["checks"]["revocation_state"] != "ok" {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        body["checks"]["revocation_state"]
            .as_str()
            .unwrap()
            .contains("confirm-reset"),
        "{body}"
    );
    // Still refused a second later: it waits for an operator, not for time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.get("/readyz").await.0, 503);

    // Only an admin may confirm.
    let (s, _) = c
        .call(Method::POST, "/admin/v1/store/confirm-reset", None, None)
        .await;
    assert_eq!(s, 401);
    let (s, v) = c
        .call(
            Method::POST,
            "/admin/v1/store/confirm-reset",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v), (200, json!({"confirmed": true})));
    wait_ready(&c).await;
    let (s, v) = c
        .call(
            Method::POST,
            "/admin/v1/store/confirm-reset",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v), (200, json!({"confirmed": false})));
    assert!(c.audit_text().contains("confirm_store_reset"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_shows_the_stores_eviction_policy() {
    for (extra, want) in [
        (&[][..], "noeviction"),
        (&["--maxmemory-policy", "allkeys-lru"][..], "allkeys-lru"),
        // CONFIG not permitted: the broker cannot tell.
        (&["--rename-command", "CONFIG", ""][..], "unknown"),
    ] {
        let redis = RedisServer::start_with(extra);
        let app = spawn_app_with(Options {
            extra_config: redis_store(&redis.url()),
            ..Options::default()
        })
        .await;
        let (s, v) = app.get("/readyz").await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["checks"]["store_eviction_policy"], want, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_task_the_store_does_not_hold_is_inactive() {
    let redis = RedisServer::start();
    let app = spawn_on_redis(&redis.url()).await;
    let (token, task) = app.task_token(AGENT, "repo:read").await;
    let (other, _) = app.task_token(AGENT, "repo:read").await;
    assert_eq!(app.introspect(&token).await["active"], true);
    // The task's keys are gone (deleted by hand, or lost with a store that was not
    // persistent) while nothing on the feed revokes the token.
    for suffix in ["r", "h", "children"] {
        redis
            .cli(&["DEL", &format!("writ:{{{task}}}:{suffix}")])
            .unwrap();
    }
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    assert_eq!(app.introspect(&other).await["active"], true);
}
