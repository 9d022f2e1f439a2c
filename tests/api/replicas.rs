//! Two brokers on one real Redis: what one takes, the other honours; and what happens when
//! Redis goes away and comes back.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;
use crate::redis_support::RedisServer;

async fn pair(redis: &RedisServer) -> (TestApp, TestApp) {
    let a = spawn_app_with(Options {
        extra_config: redis_store(&redis.url()),
        ..Options::default()
    })
    .await;
    let b = spawn_replica(&a).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    (a, b)
}

async fn wait_ready(app: &TestApp) {
    app.wait_status("/readyz", 200).await;
}

/// Polls introspection on `app` until `token` is inactive; returns how long it took.
async fn until_inactive(app: &TestApp, token: &str) -> Duration {
    let start = Instant::now();
    loop {
        // As the admin token: the kill switch refuses every workload caller, resource servers
        // included.
        let (s, v) = app.introspect_as(ADMIN_TOKEN, token).await;
        assert_eq!(s, 200, "{v}");
        if v == json!({"active": false}) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still active after 5 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_does_the_other_honours() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;

    // Exchange on A, introspect on B.
    let (t1, task1) = a.task_token(AGENT, "repo:read").await;
    assert_eq!(b.introspect(&t1).await["active"], true);
    // Mint into A's task on B: the task lives in Redis.
    let (s, v) = b
        .exchange(&b.svid(AGENT), "repo:read", &[("task_id", &task1)])
        .await;
    assert_eq!(s, 200, "{v}");

    // Revoke on A: inactive on B.
    let form = Some((
        "application/x-www-form-urlencoded",
        serde_urlencoded::to_string([("token", t1.as_str())]).unwrap(),
    ));
    let (s, _) = a.call(Method::POST, "/oauth2/revoke", None, form).await;
    assert_eq!(s, 200);
    assert_eq!(
        a.introspect(&t1).await,
        json!({"active": false}),
        "effective on A before the reply"
    );
    until_inactive(&b, &t1).await;

    // Task end on B: inactive on A.
    let (t2, task2) = a.task_token(AGENT, "repo:read").await;
    let (s, v) = b
        .call(
            Method::POST,
            &format!("/v1/tasks/{task2}/end"),
            Some(&t2),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    until_inactive(&a, &t2).await;
    let (s, v) = a
        .call(
            Method::GET,
            &format!("/v1/tasks/{task2}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v["state"].as_str().unwrap()), (200, "ended"));

    // A subject-prefix revocation on A: B refuses the subjects' tokens and new exchanges.
    let (t3, _) = b
        .task_token("spiffe://example.org/agent/x", "repo:read")
        .await;
    let (s, v) = a
        .admin_revoke(
            json!({"selector": {"subject": "spiffe://example.org/agent/*"}, "reason": "r"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["revoked_tasks"].as_u64().unwrap() >= 1);
    let rid = v["revocation_id"].as_str().unwrap().to_string();
    until_inactive(&b, &t3).await;
    let start = Instant::now();
    loop {
        let (s, v) = b.exchange(&b.svid(AGENT), "repo:read", &[]).await;
        if s == 400 && v["error"] == "invalid_grant" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "B still exchanges: {v}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Lifted on B: A exchanges again.
    let (s, _) = b
        .call(
            Method::DELETE,
            &format!("/admin/v1/revocations/{rid}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let start = Instant::now();
    loop {
        let (s, _) = a.exchange(&a.svid(AGENT), "repo:read", &[]).await;
        if s == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The kill switch on B: everything on A stops.
    let (t4, _) = a
        .task_token("spiffe://example.org/ci/job", "tickets:read")
        .await;
    let (s, _) = b
        .admin_revoke(json!({"selector": {"all": true}, "reason": "incident"}))
        .await;
    assert_eq!(s, 200);
    until_inactive(&a, &t4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_and_recovery_keeps_every_revocation() {
    let mut redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    let (revoked, _) = a.task_token(AGENT, "repo:read").await;
    let (live, _) = a.task_token(AGENT, "repo:read").await;
    let form = Some((
        "application/x-www-form-urlencoded",
        serde_urlencoded::to_string([("token", revoked.as_str())]).unwrap(),
    ));
    a.call(Method::POST, "/oauth2/revoke", None, form).await;
    until_inactive(&b, &revoked).await;

    redis.kill();
    // Within a moment both replicas stop answering for what they cannot confirm.
    let start = Instant::now();
    loop {
        let (s, _) = b.introspect_as(ADMIN_TOKEN, &live).await;
        if s == 503 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "B still answers without Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = a
        .audit_records()
        .iter()
        .filter(|r| r["decision"] == "allow" && r["event"] == "exchange")
        .count();
    for app in [&a, &b] {
        for t in [&live, &revoked] {
            let (s, v) = app.introspect_as(ADMIN_TOKEN, t).await;
            assert_eq!(
                (s, v["error"].as_str().unwrap_or("")),
                (503, "temporarily_unavailable"),
                "{v}"
            );
            assert_ne!(v["active"], true);
        }
        app.expect_error(
            &app.svid(AGENT),
            "repo:read",
            &[],
            503,
            "temporarily_unavailable",
        )
        .await;
        let (s, r) = app.get("/readyz").await;
        assert_eq!(s, 503, "{r}");
    }
    let after = a
        .audit_records()
        .iter()
        .filter(|r| r["decision"] == "allow" && r["event"] == "exchange")
        .count();
    assert_eq!(before, after, "nothing was issued while Redis was down");

    // Redis comes back empty (no persistence): the brokers recover by themselves, and the
    // revocation taken before the fault still holds on both.
    redis.restart();
    wait_ready(&a).await;
    wait_ready(&b).await;
    assert_eq!(a.introspect(&revoked).await, json!({"active": false}));
    assert_eq!(b.introspect(&revoked).await, json!({"active": false}));
    // The live token's task was lost with the store: no replica can vouch for it now.
    assert_eq!(a.introspect(&live).await, json!({"active": false}));
    // A fresh replica that only knows what Redis knows sees it too.
    let c = spawn_replica(&a).await;
    wait_ready(&c).await;
    assert_eq!(c.introspect(&revoked).await, json!({"active": false}));
    let (s, v) = a.exchange(&a.svid(AGENT), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
}
