//! Trips: each rule fires exactly at its threshold, on memory and on Redis; replicas share
//! counters; a policy change revokes exactly the tasks that lost permission.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;

const TRIPS: &str = r#"
[trips]
denials = { count = 3, window = "1m" }
quarantine = "10m"
exchange_rate = { count = 100, window = "1m" }
max_scopes_per_task = 2
reevaluate_on_policy_change = true
"#;

async fn app_with(store: Option<&RedisServer>, trips: &str) -> TestApp {
    let mut extra = trips.to_string();
    if let Some(r) = store {
        extra.push_str(&redis_store(&r.url()));
    }
    spawn_app_with(Options {
        extra_config: extra,
        ..Options::default()
    })
    .await
}

fn trip_records(app: &TestApp, rule: &str) -> Vec<Value> {
    app.audit_records()
        .into_iter()
        .filter(|r| r["event"] == "trip" && r["detail"]["rule"] == rule)
        .collect()
}

async fn metrics(app: &TestApp) -> String {
    let resp = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap()
}

async fn denials_trip_at_the_threshold(app: &TestApp) {
    let other = "spiffe://example.org/agent/other";
    let (held, _) = app.task_token(AGENT, "repo:read").await;
    let (other_token, _) = app.task_token(other, "repo:read").await;
    for _ in 0..2 {
        app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
            .await;
    }
    // Two denials: not yet.
    assert!(trip_records(app, "denials").is_empty());
    let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
    assert_eq!(s, 200, "one request before the threshold still works: {v}");
    // The third denial trips.
    app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
        .await;
    let trips = trip_records(app, "denials");
    assert_eq!(trips.len(), 1);
    assert_eq!(trips[0]["subject"], AGENT);
    assert_eq!(trips[0]["detail"]["evidence"]["denials"], 3);
    assert_eq!(
        trips[0]["detail"]["revoked_tasks"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(app.introspect(&held).await, json!({"active": false}));
    assert_eq!(
        app.introspect(&other_token).await["active"],
        true,
        "another subject is untouched"
    );
    // Quarantined: refused with invalid_grant, visible to admins.
    let e = app
        .expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("quarantined"),
        "{e}"
    );
    let (s, q) = app
        .call(
            Method::GET,
            "/admin/v1/quarantines",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        q["quarantines"][0]["selector"]["exact"], AGENT,
        "a quarantine names exactly the subject that tripped"
    );
    assert!(
        metrics(app)
            .await
            .contains("writ_trips_total{rule=\"denials\"} 1")
    );
    // Until the quarantine ends (advance the clock, do not sleep).
    app.clock.advance(599);
    app.expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
    app.clock.advance(2);
    let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn denials_trip_exactly_at_the_threshold_on_memory() {
    let app = app_with(None, TRIPS).await;
    denials_trip_at_the_threshold(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_trip_exactly_at_the_threshold_on_redis() {
    let redis = RedisServer::start();
    let app = app_with(Some(&redis), TRIPS).await;
    denials_trip_at_the_threshold(&app).await;
}

#[tokio::test]
async fn denials_outside_the_window_do_not_add_up() {
    let app = app_with(None, TRIPS).await;
    for _ in 0..2 {
        app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
            .await;
    }
    app.clock.advance(61);
    for _ in 0..2 {
        app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
            .await;
    }
    assert!(trip_records(&app, "denials").is_empty());
    app.assert_still_serving().await;
}

#[tokio::test]
async fn a_quarantine_can_be_lifted_by_an_admin() {
    let app = app_with(None, TRIPS).await;
    for _ in 0..3 {
        app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
            .await;
    }
    let (_, q) = app
        .call(
            Method::GET,
            "/admin/v1/quarantines",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    let id = q["quarantines"][0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("qtn_"));
    // Not through the revocations collection: each kind is lifted only under its own path.
    let (s, v) = app
        .call(
            Method::DELETE,
            &format!("/admin/v1/revocations/{id}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"], "not_found");
    assert_eq!(
        v["error_description"],
        format!(
            "`{id}` is a quarantine, not a revocation: lift it under /admin/v1/quarantines/{id}"
        ),
        "{v}"
    );
    app.expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
    let (s, v) = app
        .call(
            Method::DELETE,
            &format!("/admin/v1/quarantines/{id}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let (_, q) = app
        .call(
            Method::GET,
            "/admin/v1/quarantines",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(q["quarantines"], json!([]));
}

async fn rate_trips_at_the_threshold(app: &TestApp) {
    for i in 0..5 {
        let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
        assert_eq!(s, 200, "exchange {i}: {v}");
    }
    assert!(trip_records(app, "exchange_rate").is_empty());
    let e = app
        .expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("more than 5 exchanges"),
        "{e}"
    );
    let trips = trip_records(app, "exchange_rate");
    assert_eq!(trips.len(), 1);
    assert_eq!(
        trips[0]["detail"]["revoked_tasks"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let e = app
        .expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("quarantined"),
        "{e}"
    );
}

const RATE: &str = "[trips]\nexchange_rate = { count = 5, window = \"1m\" }\nquarantine = \"5m\"\n";

#[tokio::test]
async fn exchange_rate_trips_exactly_past_its_count_on_memory() {
    let app = app_with(None, RATE).await;
    rate_trips_at_the_threshold(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_rate_trips_exactly_past_its_count_on_redis() {
    let redis = RedisServer::start();
    let app = app_with(Some(&redis), RATE).await;
    rate_trips_at_the_threshold(&app).await;
}

#[tokio::test]
async fn scopes_per_task_escalation_and_budget_write_trip_records() {
    let app = spawn_app_with(Options {
        extra_config: TRIPS.into(),
        max_tokens: 2,
        ..Options::default()
    })
    .await;
    app.expect_error(
        &app.svid(AGENT),
        "repo:read repo:write tickets:read",
        &[],
        400,
        "invalid_scope",
    )
    .await;
    assert_eq!(trip_records(&app, "max_scopes_per_task").len(), 1);
    let (s, v) = app
        .exchange(&app.svid(AGENT), "repo:read tickets:read", &[])
        .await;
    assert_eq!(s, 200, "two scopes are within the limit: {v}");
    let task = v["task_id"].as_str().unwrap().to_string();
    app.expect_error(
        &app.svid(AGENT),
        "repo:write",
        &[("task_id", &task)],
        400,
        "invalid_scope",
    )
    .await;
    let esc = trip_records(&app, "escalation");
    assert_eq!(esc.len(), 1);
    assert_eq!(
        esc[0]["detail"]["evidence"]["outside"],
        json!(["repo:write"])
    );
    let (s, _) = app
        .exchange(&app.svid(AGENT), "repo:read", &[("task_id", &task)])
        .await;
    assert_eq!(s, 200);
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("task_id", &task)],
        400,
        "invalid_grant",
    )
    .await;
    assert_eq!(trip_records(&app, "task_budget").len(), 1);
    // max_scopes and escalation were denials: two so far; a third trips the denial rule.
    assert!(trip_records(&app, "denials").is_empty());
    app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
        .await;
    assert_eq!(trip_records(&app, "denials").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_counters_and_trips_survive_a_restart() {
    let redis = RedisServer::start();
    let a = app_with(Some(&redis), TRIPS).await;
    let b = spawn_replica(&a).await;
    a.expect_error(&a.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
        .await;
    b.expect_error(&b.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
        .await;
    assert!(trip_records(&a, "denials").is_empty() && trip_records(&b, "denials").is_empty());
    // A third broker on the same Redis (a restart) continues the count.
    drop(b);
    let c = spawn_replica(&a).await;
    c.expect_error(&c.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
        .await;
    assert_eq!(trip_records(&c, "denials").len(), 1);
    // The quarantine reaches A, and a broker started after it sees it too.
    let start = Instant::now();
    loop {
        let (s, v) = a.exchange(&a.svid(AGENT), "repo:read", &[]).await;
        if s == 400 && v["error"] == "invalid_grant" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "A still exchanges: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(c);
    let d = spawn_replica(&a).await;
    let start = Instant::now();
    while d.get("/readyz").await.0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.expect_error(&d.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_revokes_exactly_the_tasks_that_lost_permission() {
    let redis = RedisServer::start();
    let a = app_with(Some(&redis), TRIPS).await;
    let b = spawn_replica(&a).await;
    let old_version = a.broker.policy.current().version().to_string();
    let (w1, t1) = a.task_token(AGENT, "repo:write").await;
    let (w2, t2) = b
        .task_token("spiffe://example.org/agent/b", "repo:read repo:write")
        .await;
    let (r1, t3) = a.task_token(AGENT, "repo:read").await;
    // Remove the repo:write permit.
    let without_write = POLICY.replace(
        "@id(\"agent-write\")\n@max_ttl(\"2m\")\npermit (\n  principal in Writ::TrustDomain::\"example.org\",\n  action == Writ::Action::\"exchange\",\n  resource == Writ::Scope::\"repo:write\"\n) when { principal.path like \"/agent/*\" };",
        "",
    );
    assert_ne!(without_write, POLICY);
    std::fs::write(a.path("policies/test.cedar"), without_write).unwrap();
    let start = Instant::now();
    loop {
        let v1 = a.introspect(&w1).await;
        let v2 = b.introspect(&w2).await;
        if v1 == json!({"active": false}) && v2 == json!({"active": false}) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not revoked: {v1} {v2}\n{}",
            a.audit_text()
                .lines()
                .filter(|l| l.contains("policy_load") || l.contains("trip"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        a.introspect(&r1).await["active"],
        true,
        "a task that keeps its permission stays"
    );
    // Both replicas load the new policy, and each load starts a re-evaluation; one of them
    // did the work above. A replica that re-evaluates now (a straggler) must find the work
    // done for this version and do nothing: it waits for the one in progress to finish and
    // then reports that it did not run. Without that coordination it would evaluate the open
    // task again (`ran_here`, `evaluated: 1`).
    let new_version = a.broker.policy.current().version().to_string();
    let start = Instant::now();
    while b.broker.policy.current().version() != new_version {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "replica B did not load the new policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for replica in [&a, &b] {
        assert_eq!(
            replica
                .broker
                .reevaluate_open_tasks(&old_version)
                .await
                .unwrap(),
            writ::trips::Reevaluation::default(),
            "a straggler re-evaluation must not run again"
        );
    }
    let mut records = trip_records(&a, "policy_changed");
    records.extend(trip_records(&b, "policy_changed"));
    let mut tasks: Vec<String> = records
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_string())
        .collect();
    tasks.sort();
    let mut want = vec![t1.clone(), t2.clone()];
    want.sort();
    assert_eq!(tasks, want, "exactly the two tasks, once each");
    for r in &records {
        assert_eq!(
            r["detail"]["evidence"]["granted_under"],
            old_version.as_str()
        );
        assert_eq!(r["detail"]["evidence"]["new_version"], new_version.as_str());
        assert_eq!(
            r["detail"]["evidence"]["denied_scopes"],
            json!(["repo:write"])
        );
    }
    let (_, v) = a
        .call(
            Method::GET,
            &format!("/v1/tasks/{t3}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(v["state"], "open");
    let (_, v) = a
        .call(
            Method::GET,
            &format!("/v1/tasks/{t1}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(
        (v["state"].as_str(), v["end_reason"].as_str()),
        (Some("revoked"), Some("policy_changed"))
    );
}

/// The test policy without its `repo:write` permit.
fn policy_without_write() -> String {
    let text = POLICY.replace(
        "@id(\"agent-write\")\n@max_ttl(\"2m\")\npermit (\n  principal in Writ::TrustDomain::\"example.org\",\n  action == Writ::Action::\"exchange\",\n  resource == Writ::Scope::\"repo:write\"\n) when { principal.path like \"/agent/*\" };",
        "",
    );
    assert_ne!(text, POLICY);
    text
}

/// Writes the policy file of `apps[0]` (shared by all) and waits until every replica serves it.
async fn switch_policy(apps: &[&TestApp], text: &str) {
    let version = writ::policy::PolicySet::from_sources(&[("test.cedar".into(), text.into())])
        .unwrap()
        .version()
        .to_string();
    std::fs::write(apps[0].path("policies/test.cedar"), text).unwrap();
    let start = Instant::now();
    while !apps
        .iter()
        .all(|a| a.broker.policy.current().version() == version)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a replica did not load the policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_revoked(app: &TestApp, token: &str, what: &str) {
    let start = Instant::now();
    while app.introspect(token).await != json!({"active": false}) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}\n{}",
            app.audit_text()
                .lines()
                .filter(|l| l.contains("policy_load") || l.contains("trip"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_version_that_comes_back_is_evaluated_again() {
    let redis = RedisServer::start();
    let a = app_with(Some(&redis), TRIPS).await;
    let b = spawn_replica(&a).await;
    let without_write = policy_without_write();
    // A -> B -> A: a task granted under the second A ...
    switch_policy(&[&a, &b], &without_write).await;
    switch_policy(&[&a, &b], POLICY).await;
    let (w, task) = b.task_token(AGENT, "repo:write").await;
    // ... is revoked when B comes back, though B was evaluated once already.
    switch_policy(&[&a, &b], &without_write).await;
    until_revoked(
        &a,
        &w,
        "the task granted under the second A is still active under B",
    )
    .await;
    let records: Vec<Value> = trip_records(&a, "policy_changed")
        .into_iter()
        .chain(trip_records(&b, "policy_changed"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["task_id"], task.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_across_a_restart_revokes_what_it_forbids() {
    let redis = RedisServer::start();
    let a = app_with(Some(&redis), TRIPS).await;
    let b = spawn_replica(&a).await;
    let (w, task) = a.task_token(AGENT, "repo:write").await;
    let (r, _) = b.task_token(AGENT, "repo:read").await;
    // Both replicas stop; the policy changes while none runs (a Deployment rolled on it).
    drop(b);
    let stopped = stop(a);
    std::fs::write(
        stopped.1.path().join("policies/test.cedar"),
        policy_without_write(),
    )
    .unwrap();
    let a = restart(stopped).await;
    let b = spawn_replica(&a).await;
    until_revoked(
        &b,
        &w,
        "a token the new policy forbids survived the restart",
    )
    .await;
    assert_eq!(b.introspect(&r).await["active"], true);
    let records: Vec<Value> = trip_records(&a, "policy_changed")
        .into_iter()
        .chain(trip_records(&b, "policy_changed"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["task_id"], task.as_str());
    assert!(
        a.audit_records()
            .iter()
            .any(|r| r["event"] == "policy_load" && r["reason"] == "changed across a restart")
    );
}
