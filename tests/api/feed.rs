//! The revocation feed under entries a replica cannot read: the replica fails closed (503,
//! not ready), logs and counts it, and recovers once the entry is gone.

use crate::helpers::*;
use crate::redis_support::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_feed_entry_makes_the_view_stale_until_it_is_removed() {
    let redis = RedisServer::start();
    let a = spawn_on_redis(&redis.url()).await;
    let (token, _) = a.task_token(AGENT, "repo:read").await;
    assert_eq!(a.introspect(&token).await["active"], true);

    let id = redis
        .cli(&[
            "XADD",
            "writ:{feed}:stream",
            "*",
            "e",
            "{\"kind\":\"from_the_future\"}",
        ])
        .unwrap();
    let id = id.trim().to_string();
    a.wait_status("/readyz", 503).await;
    // Fail closed: no introspection answer and no exchange while the view is unconfirmed.
    let resp = a
        .http
        .post(format!("{}/oauth2/introspect", a.base))
        .bearer_auth(ADMIN_TOKEN)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "a 503 says when to retry"
    );
    let (s, v) = a.introspect_as(ADMIN_TOKEN, &token).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{v}"
    );
    let (s, v) = a.exchange(&a.svid(AGENT), "repo:read", &[]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{v}"
    );
    let (_, metrics) = a.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    let corrupt = metrics
        .lines()
        .find_map(|l| l.strip_prefix("writ_revocation_feed_corrupt_reads_total "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(corrupt >= 1, "corrupt reads not counted:\n{metrics}");

    // An operator removes the entry: the replica recovers without a restart.
    redis.cli(&["XDEL", "writ:{feed}:stream", &id]).unwrap();
    a.wait_status("/readyz", 200).await;
    assert_eq!(a.introspect(&token).await["active"], true);
}
