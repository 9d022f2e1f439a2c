//! The decision log at the HTTP boundary: durable before issued, flood summaries, and the
//! signed head served to admins (SPEC §6).

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::Method;
use serde_json::Value;
use writ::audit::checkpoint::CheckpointKeys;
use writ::audit::{Verification, VerifyOptions};
use writ::broker::Broker;
use writ::config::Config;
use writ::domain::Clock;

use crate::helpers::*;

#[tokio::test]
async fn every_issued_token_is_on_disk_when_its_response_arrives() {
    let app = spawn_app().await;
    for _ in 0..20 {
        let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
        // Read as the response arrives: the background sync (once a second) cannot have
        // caught up with twenty exchanges in a row; only the exchange waiting for it can.
        let synced = app.broker.audit.synced_seq();
        let jti = claims_of(v["access_token"].as_str().unwrap())["jti"].clone();
        let allow = app
            .audit_records()
            .into_iter()
            .find(|r| r["jti"] == jti && r["decision"] == "allow")
            .unwrap();
        let seq = allow["seq"].as_u64().unwrap();
        assert!(
            seq <= synced,
            "the record of an issued token (seq {seq}) was not on disk (synced up to {synced})"
        );
    }
    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("writ_audit_synced_seq "), "{metrics}");
    assert!(metrics.contains("writ_audit_fsyncs_total "), "{metrics}");
}

#[tokio::test]
async fn an_exchange_whose_record_cannot_be_made_durable_issues_nothing() {
    let app = spawn_app().await;
    app.broker.audit.fail_next_sync();
    let v = app
        .expect_error(
            &app.svid(AGENT),
            "repo:read",
            &[],
            503,
            "temporarily_unavailable",
        )
        .await;
    assert!(v.get("access_token").is_none(), "{v}");
    // A failed sync may have lost what the kernel held: nothing is issued until a restart,
    // and the broker says it is not ready.
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[],
        503,
        "temporarily_unavailable",
    )
    .await;
    let (s, v) = app.get("/readyz").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["checks"]["decision_log"], "failed");
}

fn is_full_unauthenticated_refusal(r: &Value) -> bool {
    r["decision"] == "deny"
        && r["subject"].is_null()
        && r["event"] != "checkpoint"
        && r["detail"]["summary"].is_null()
}

#[tokio::test]
async fn a_flood_of_junk_from_one_source_is_summarised() {
    let app = spawn_app().await;
    let before = app.audit_records().len();
    // 1,000 junk subject tokens (exchange) from 127.0.0.1...
    for batch in 0..20 {
        let calls = (0..50).map(|i| {
            let junk = format!("junk.{batch}.{i}");
            let app = &app;
            async move { app.exchange(&junk, "repo:read", &[]).await }
        });
        for (s, v) in futures_util::future::join_all(calls).await {
            assert_eq!(
                (s, v["error"].as_str()),
                (400, Some("invalid_request")),
                "{v}"
            );
        }
    }
    // ...and 10 junk admin bearers (auth) from the same source.
    for _ in 0..10 {
        let (s, _) = app
            .call(Method::GET, "/admin/v1/tasks", Some("junk"), None)
            .await;
        assert_eq!(s, 401);
    }
    let added: Vec<Value> = app.audit_records().split_off(before);
    let full = added
        .iter()
        .filter(|r| is_full_unauthenticated_refusal(r))
        .count();
    assert_eq!(full, 20, "the per-source allowance of a minute");
    assert!(added.len() <= 25, "{} records added", added.len());
    assert_eq!(app.broker.audit.stats().summarised, 990);

    // When the minute is over, one summary per event carries the count.
    app.clock.advance(60);
    app.broker.audit.flush_summaries(false);
    let summaries: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| !r["detail"]["summary"].is_null())
        .collect();
    let count = |event: &str| {
        summaries
            .iter()
            .filter(|r| r["event"] == event)
            .map(|r| {
                assert_eq!(r["source_ip"], "127.0.0.1");
                assert!(r["detail"]["summary"]["first"].is_string());
                r["detail"]["summary"]["count"].as_u64().unwrap()
            })
            .sum::<u64>()
    };
    assert_eq!(count("exchange"), 980);
    assert_eq!(count("admin"), 10);
    assert!(matches!(
        writ::audit::verify_file(&app.path("audit.jsonl")).unwrap(),
        Verification::Intact(_)
    ));
}

#[tokio::test]
async fn the_audit_head_is_served_to_admins_and_verifies_the_log() {
    let app = spawn_app().await;
    app.task_token(AGENT, "repo:read").await;
    app.task_token(AGENT, "repo:read").await;
    let written = app.broker.audit.checkpoint_now();
    writ::audit::maintain::publish_head(&app.broker.audit, app.broker.store.as_ref())
        .await
        .unwrap();
    let latest = app.broker.audit.latest_head().unwrap();
    if let Some(w) = written {
        assert_eq!(w, latest);
    }

    let (s, v) = app
        .call(Method::GET, "/admin/v1/audit/head", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let head: writ::store::AuditHead = serde_json::from_value(v).unwrap();
    assert_eq!(head, latest);
    assert_eq!(head.log_id, app.broker.audit.log_id().unwrap());
    // An admin workload identity too.
    let (s, _) = app
        .call(
            Method::GET,
            "/admin/v1/audit/head",
            Some(&app.svid(SECURITY)),
            None,
        )
        .await;
    assert_eq!(s, 200);
    // Anyone else is refused.
    let (s, v) = app
        .call(Method::GET, "/admin/v1/audit/head", None, None)
        .await;
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_token")));
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/audit/head",
            Some(&app.svid(AGENT)),
            None,
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("access_denied")));

    // The log on disk reaches the head, and its checkpoints verify with the broker's JWKS.
    let (_, jwks) = app.get("/oauth2/jwks").await;
    let keys = CheckpointKeys::from_jwks(jwks.to_string().as_bytes()).unwrap();
    let file = std::fs::File::open(app.path("audit.jsonl")).unwrap();
    let v = writ::audit::verify_reader(
        file,
        VerifyOptions {
            keys: Some(&keys),
            head: Some(&head),
        },
    )
    .unwrap();
    assert!(
        matches!(&v, Verification::Intact(r) if r.checkpoints >= 1 && r.head_seq == Some(head.seq)),
        "{v:?}"
    );
}

#[tokio::test]
async fn a_log_without_a_checkpoint_has_no_head_yet() {
    // A broker that is built but not run has written no checkpoint (the first comes with
    // the first background tick).
    let app = spawn_app().await;
    let text = app.config_text.replace(
        &app.path("audit.jsonl").display().to_string(),
        &app.path("other.jsonl").display().to_string(),
    );
    let config = Config::from_toml_with_env(&text, Vec::new()).unwrap();
    let broker =
        Arc::new(Broker::build_with(config, app.clock.clone() as Arc<dyn Clock>, None).unwrap());
    let mut req = axum::http::Request::get("/admin/v1/audit/head")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(axum::body::Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [127, 0, 0, 1],
            1,
        ))));
    let resp = tower::ServiceExt::oneshot(writ::http::router(broker), req)
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "not_found");
}

#[tokio::test]
async fn a_refusal_that_cannot_be_recorded_is_logged_and_counted() {
    // A decision log on a full disk.
    let first = spawn_app().await;
    let text = first.config_text.replace(
        &first.path("audit.jsonl").display().to_string(),
        "/dev/full",
    );
    let app = spawn_with_text(&text).await;
    let before = app.broker.audit.stats().append_failures;
    let (s, v) = app
        .call(Method::GET, "/admin/v1/tasks", Some("junk"), None)
        .await;
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_token")));
    assert_eq!(app.broker.audit.stats().append_failures, before + 1);
    let (_, metrics) = app.get("/metrics").await;
    let line = format!("writ_audit_append_failures_total {}", before + 1);
    assert!(metrics.as_str().unwrap().contains(&line), "{metrics}");
    // Nothing is issued without its record.
    app.expect_error(
        &first.svid(AGENT),
        "repo:read",
        &[],
        503,
        "temporarily_unavailable",
    )
    .await;
}
