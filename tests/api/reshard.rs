//! Redis Cluster operations under load: the feed's slot moves to another node, and the node
//! owning it refuses writes. Each test starts its own cluster: moving slots of the shared one
//! would disturb the other tests.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;
use crate::redis_support::RedisCluster;

/// The hash slot of `{feed}`, where the revocation feed's keys live.
const FEED_SLOT: u16 = 5677;

fn cluster_store(cluster: &RedisCluster) -> String {
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[store]\nbackend = \"redis-cluster\"\nnodes = [{}]\nmax_staleness = \"2s\"\n",
        nodes.join(", ")
    )
}

async fn on_cluster(cluster: &RedisCluster) -> TestApp {
    spawn_app_with(Options {
        extra_config: cluster_store(cluster),
        ..Options::default()
    })
    .await
}

/// `POST /oauth2/revoke` of `token`; its status and how long it took.
async fn revoke(app: &TestApp, token: &str) -> (u16, Duration) {
    let form = Some((
        "application/x-www-form-urlencoded",
        serde_urlencoded::to_string([("token", token)]).unwrap(),
    ));
    let start = Instant::now();
    let (s, _) = app.call(Method::POST, "/oauth2/revoke", None, form).await;
    (s, start.elapsed())
}

/// An admin revocation of `token`'s jti; its status, body and how long it took.
async fn admin_revoke_jti(app: &TestApp, token: &str) -> (u16, serde_json::Value, Duration) {
    let jti = claims_of(token)["jti"].clone();
    let start = Instant::now();
    let (s, v) = app
        .admin_revoke(json!({"selector": {"jti": jti}, "reason": "leaked"}))
        .await;
    (s, v, start.elapsed())
}

async fn until_inactive(app: &TestApp, token: &str) {
    let start = Instant::now();
    loop {
        if app.introspect(token).await == json!({"active": false}) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still active after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_go_on_when_the_feeds_slot_moves_to_another_node() {
    let cluster = RedisCluster::start();
    let a = on_cluster(&cluster).await;
    let b = spawn_replica(&a).await;
    // Both replicas have published before the move: their slot maps and script caches
    // point at the old owner.
    for app in [&a, &b] {
        let (token, _) = app.task_token(AGENT, "repo:read").await;
        assert_eq!(revoke(app, &token).await.0, 200);
    }
    let mut tokens = Vec::new();
    for app in [&a, &b] {
        for _ in 0..2 {
            tokens.push(app.task_token(AGENT, "repo:read").await.0);
        }
    }

    let from = cluster.owner_of(FEED_SLOT);
    let to = (from + 1) % 3;
    // Revocations while the feed's keys are half-way (MIGRATING/IMPORTING); the move
    // finishes meanwhile.
    let (mid_a, _) = a.task_token(AGENT, "repo:read").await;
    let (mid_b, _) = b.task_token(AGENT, "repo:read").await;
    cluster.begin_move(&[FEED_SLOT], to);
    let finish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| cluster.finish_move(&[FEED_SLOT], from, to));
    };
    let ((sa, _), (sb, _), ()) = tokio::join!(revoke(&a, &mid_a), revoke(&b, &mid_b), finish);
    assert_eq!((sa, sb), (200, 200), "revocations during the move");
    until_inactive(&b, &mid_a).await;
    until_inactive(&a, &mid_b).await;

    for (i, (app, other)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
        let (held, leaked) = (&tokens[2 * i], &tokens[2 * i + 1]);
        let (s, took) = revoke(app, held).await;
        assert_eq!(s, 200, "holder revocation after the move");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let (s, v, took) = admin_revoke_jti(app, leaked).await;
        assert_eq!(s, 200, "admin revocation after the move: {v}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        until_inactive(other, held).await;
        until_inactive(other, leaked).await;
    }
    for app in [&a, &b] {
        let (s, v) = app.get("/readyz").await;
        assert_eq!(s, 200, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_publish_revocations_is_not_ready_until_it_can() {
    let cluster = RedisCluster::start();
    let a = on_cluster(&cluster).await;
    let (token, _) = a.task_token(AGENT, "repo:read").await;
    let owner = &cluster.nodes[cluster.owner_of(FEED_SLOT)];
    // The feed's node still answers reads (the feed stays fresh) but refuses every write.
    let refuse = |n: &str| {
        let out = owner.cli(&["CONFIG", "SET", "min-replicas-to-write", n]);
        assert_eq!(out.unwrap().trim(), "OK");
    };
    refuse("1");

    let (s, _) = revoke(&a, &token).await;
    assert_eq!(s, 503, "a revocation that could not be published");
    let (s, v) = a.get("/readyz").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["checks"]["revocation_feed"], "ok", "{v}");
    assert!(
        v["checks"]["revocation_publish"]
            .as_str()
            .unwrap()
            .contains("revocation feed"),
        "{v}"
    );
    // Still not ready a while later: nothing could be written since.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.get("/readyz").await.0, 503);

    refuse("0");
    a.wait_status("/readyz", 200).await;
    let (s, v) = a.get("/readyz").await;
    assert_eq!((s, &v["checks"]["revocation_publish"]), (200, &json!("ok")));
    assert_eq!(revoke(&a, &token).await.0, 200);
    assert_eq!(a.introspect(&token).await, json!({"active": false}));
}

/// The cluster hash slot of `key` (CRC16/XMODEM of its hash tag, mod 16384).
fn slot_of(key: &str) -> u16 {
    let tag = match key.split_once('{').and_then(|(_, r)| r.split_once('}')) {
        Some((t, _)) if !t.is_empty() => t,
        _ => key,
    };
    let mut crc: u16 = 0;
    for b in tag.bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_go_on_when_task_slots_move_to_another_node() {
    assert_eq!(slot_of("writ:{feed}:stream"), FEED_SLOT);
    let cluster = RedisCluster::start();
    let a = on_cluster(&cluster).await;
    let b = spawn_replica(&a).await;
    for app in [&a, &b] {
        app.task_token(AGENT, "repo:read").await;
    }
    // An eighth of the key space moves: the replicas' slot maps are stale for those slots,
    // and a new task lands in one of them about once in eight exchanges.
    let from = cluster.owner_of(0);
    let to = (from + 1) % 3;
    assert_ne!(cluster.owner_of(FEED_SLOT), from);
    let moved = cluster.slots_of(from, 2048);
    cluster.move_slots(&moved, to);

    let mut landed = 0;
    for i in 0..200 {
        let app = if i % 2 == 0 { &a } else { &b };
        let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
        assert_eq!(s, 200, "exchange {i} after the move: {v}");
        let task = v["task_id"].as_str().unwrap();
        if moved.binary_search(&slot_of(task)).is_ok() {
            landed += 1;
            let token = v["access_token"].as_str().unwrap();
            let (s, v) = app.end_task(task, token).await;
            assert_eq!(s, 200, "ending a task on a moved slot: {v}");
            let other = if i % 2 == 0 { &b } else { &a };
            until_inactive(other, token).await;
            if landed == 4 {
                break;
            }
        }
    }
    assert_eq!(landed, 4, "tasks created on moved slots");
}
