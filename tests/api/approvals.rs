//! Approval gates (SPEC §4.7): a permit with `@approval("required")` holds the request until
//! an approver decides; the client polls with `approval_id`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;

pub const APPROVER: &str = "spiffe://example.org/approver/alice";
pub const APPROVER_2: &str = "spiffe://example.org/approver/bob";
pub const APPROVER_TOKEN: &str = "test-approver-token-0123456789";
pub const DEPLOY: &str = "deploy:prod";

pub const APPROVAL_POLICY: &str = r#"
@id("deploy-prod")
@approval("required")
@max_ttl("10m")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"deploy:prod"
) when { principal.path like "/agent/*" };
"#;

/// The `[approvals]` section: approver workloads under `/approver/*` and the agent itself
/// (to show that a requester cannot approve its own request), and one approver token.
pub fn approvals_config(extra: &str) -> String {
    format!(
        "[approvals]\nprincipals = [\"spiffe://example.org/approver/*\", \"{AGENT}\"]\ntoken_sha256 = [\"{}\"]\nttl = \"15m\"\n{extra}",
        writ::domain::sha256_hex(APPROVER_TOKEN.as_bytes())
    )
}

/// Adds the approval policy to a running broker's policy directory and loads it.
pub fn add_policy(app: &TestApp) {
    std::fs::write(app.path("policies/approval.cedar"), APPROVAL_POLICY).unwrap();
    app.broker.policy.reload().unwrap();
}

pub async fn spawn_gated(extra_config: &str) -> TestApp {
    let app = spawn_app_with(Options {
        extra_config: extra_config.to_string(),
        ..Options::default()
    })
    .await;
    add_policy(&app);
    app
}

/// Asks for `deploy:prod` (plus `extra`); asserts it is held and returns the approval id.
pub async fn request(app: &TestApp, extra: &[(&str, &str)]) -> String {
    let (s, v) = app.exchange(&app.svid(AGENT), DEPLOY, extra).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("authorization_pending")),
        "{v}"
    );
    assert_eq!(v["interval"], 5, "{v}");
    assert_eq!(v["expires_in"], 900, "{v}");
    let id = v["approval_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("apr_") && id.len() >= 20, "{id}");
    id
}

/// The repeat of the request with its approval id.
pub async fn poll(app: &TestApp, id: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut form = vec![("approval_id", id)];
    form.extend_from_slice(extra);
    app.exchange(&app.svid(AGENT), DEPLOY, &form).await
}

pub async fn decide(
    app: &TestApp,
    bearer: &str,
    id: &str,
    verb: &str,
    body: Option<Value>,
) -> (u16, Value) {
    app.call(
        Method::POST,
        &format!("/admin/v1/approvals/{id}/{verb}"),
        Some(bearer),
        body.map(|b| ("application/json", b.to_string())),
    )
    .await
}

fn code(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_held_request_is_pending_until_approved_then_issued_once() {
    let app = spawn_gated(&approvals_config("")).await;
    let id = request(&app, &[]).await;

    // Polled at once: too fast.
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "slow_down"), "{v}");
    // After the interval: still pending, with the time left.
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
    assert_eq!(v["approval_id"], id.as_str());
    assert_eq!(v["expires_in"], 895);
    // Four seconds later: too fast again, counted from the last answered poll.
    app.clock.advance(4);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "slow_down"), "{v}");

    // The approver sees it, approves it.
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/approvals?state=pending",
            Some(&app.svid(APPROVER)),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let listed = v["approvals"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["approval_id"], id.as_str());
    assert_eq!(listed[0]["subject"], AGENT);
    assert_eq!(listed[0]["scopes"], json!([DEPLOY]));
    assert_eq!(listed[0]["policies"], json!(["deploy-prod"]));
    let (s, v) = decide(&app, &app.svid(APPROVER), &id, "approve", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "approved");
    assert_eq!(v["approvals"][0]["by"], APPROVER);

    // The next poll gets the token, whatever the interval.
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["scope"], DEPLOY);
    let claims = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], AGENT);
    // The policy's @max_ttl still caps it.
    assert_eq!(v["expires_in"], 300);
    let task = v["task_id"].as_str().unwrap().to_string();

    // An approval issues once.
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "invalid_grant"), "{v}");

    // The approved task's later tokens need no new approval.
    let (s, v) = app
        .exchange(&app.svid(AGENT), DEPLOY, &[("task_id", &task)])
        .await;
    assert_eq!(s, 200, "{v}");

    // Decision log: requested, approved (by whom).
    let approvals: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "approval")
        .collect();
    let decisions: Vec<&str> = approvals
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, vec!["requested", "approved"]);
    assert_eq!(approvals[1]["detail"]["by"], APPROVER);
    assert_eq!(approvals[1]["detail"]["approval_id"], id.as_str());
}

#[tokio::test]
async fn a_new_task_for_the_gated_scope_is_held_again() {
    let app = spawn_gated(&approvals_config("")).await;
    let id = request(&app, &[]).await;
    decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    let (s, _) = poll(&app, &id, &[]).await;
    assert_eq!(s, 200);
    // Without task_id it is a new task: a new approval.
    request(&app, &[]).await;
    // A scope that needs no approval is not held, approvals on.
    app.assert_still_serving().await;
}

#[tokio::test]
async fn a_denied_request_answers_access_denied_with_the_reason_logged() {
    let app = spawn_gated(&approvals_config("")).await;
    let id = request(&app, &[]).await;
    let (s, v) = decide(
        &app,
        &app.svid(APPROVER),
        &id,
        "deny",
        Some(json!({"reason": "not during the freeze"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "denied");
    assert_eq!(v["denied_by"], APPROVER);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "access_denied"), "{v}");
    // A decided approval cannot be decided again.
    let (s, v) = decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    let denied = app
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "approval" && r["decision"] == "denied")
        .unwrap();
    assert_eq!(denied["reason"], "not during the freeze");
    assert_eq!(denied["detail"]["by"], APPROVER);
}

#[tokio::test]
async fn an_expired_request_answers_expired_token_and_cannot_be_approved() {
    let app = spawn_gated(&approvals_config("")).await;
    let id = request(&app, &[]).await;
    app.clock.advance(900);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "expired_token"), "{v}");
    let (s, v) = decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "expired_token"), "{v}");
    let expired: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "approval" && r["decision"] == "expired")
        .collect();
    assert_eq!(expired.len(), 1, "recorded once");
}

/// What differs, the scope asked, the other parameters.
type Case = (&'static str, String, Vec<(&'static str, &'static str)>);

#[tokio::test]
async fn a_repeat_that_differs_from_the_approved_request_is_invalid_grant() {
    let app = spawn_gated(&approvals_config("")).await;
    let id = request(
        &app,
        &[("task_purpose", "release 1.2"), ("expires_in", "120")],
    )
    .await;
    decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    let same = [("task_purpose", "release 1.2"), ("expires_in", "120")];
    let cases: Vec<Case> = vec![
        ("scope", format!("{DEPLOY} repo:read"), same.to_vec()),
        (
            "audience",
            DEPLOY.into(),
            vec![
                ("task_purpose", "release 1.2"),
                ("expires_in", "120"),
                ("audience", "https://other.example.org"),
            ],
        ),
        (
            "purpose",
            DEPLOY.into(),
            vec![("task_purpose", "release 9.9"), ("expires_in", "120")],
        ),
        (
            "ttl",
            DEPLOY.into(),
            vec![("task_purpose", "release 1.2"), ("expires_in", "600")],
        ),
    ];
    for (what, scope, extra) in cases {
        let mut form = vec![("approval_id", id.as_str())];
        form.extend(extra);
        let (s, v) = app.exchange(&app.svid(AGENT), &scope, &form).await;
        assert_eq!((s, code(&v)), (400, "invalid_grant"), "{what}: {v}");
    }
    // Another subject presenting the id.
    let other = "spiffe://example.org/agent/other";
    let mut form = vec![("approval_id", id.as_str())];
    form.extend(same);
    let (s, v) = app.exchange(&app.svid(other), DEPLOY, &form).await;
    assert_eq!((s, code(&v)), (400, "invalid_grant"), "subject: {v}");
    // The approved request itself still goes through: the mismatches did not use it.
    let (s, v) = poll(&app, &id, &same).await;
    assert_eq!(s, 200, "{v}");
    // An unknown or malformed id.
    let (s, v) = poll(&app, "apr_doesnotexist0000000", &[]).await;
    assert_eq!((s, code(&v)), (400, "invalid_grant"), "{v}");
    let (s, v) = poll(&app, "not-an-id", &[]).await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
}

#[tokio::test]
async fn only_approvers_decide_and_never_their_own_request() {
    let app = spawn_gated(&approvals_config("")).await;
    let id = request(&app, &[]).await;
    // The requester is an approver principal too, and still cannot approve its own request.
    let (s, v) = decide(&app, &app.svid(AGENT), &id, "approve", None).await;
    assert_eq!((s, code(&v)), (403, "access_denied"), "{v}");
    // An admin workload is not an approver.
    let (s, v) = decide(&app, &app.svid(SECURITY), &id, "approve", None).await;
    assert_eq!((s, code(&v)), (403, "access_denied"), "{v}");
    // The admin token is not an approver token.
    let (s, v) = decide(&app, ADMIN_TOKEN, &id, "approve", None).await;
    assert_eq!((s, code(&v)), (401, "invalid_token"), "{v}");
    let (s, v) = app
        .call(Method::GET, "/admin/v1/approvals", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!((s, code(&v)), (401, "invalid_token"), "{v}");
    // No credential.
    let (s, v) = app
        .call(Method::GET, "/admin/v1/approvals", None, None)
        .await;
    assert_eq!((s, code(&v)), (401, "invalid_token"), "{v}");
    // Unknown id, bad state filter.
    let (s, v) = decide(
        &app,
        APPROVER_TOKEN,
        "apr_nope000000000000",
        "approve",
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/approvals?state=maybe",
            Some(APPROVER_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    // Still pending after all that.
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
    // The approver token can.
    let (s, v) = decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["approvals"][0]["by"]
            .as_str()
            .unwrap()
            .starts_with("approver-token:")
    );
}

#[tokio::test]
async fn two_person_rule_needs_two_different_approvers() {
    let app = spawn_gated(&approvals_config("min_approvers = 2\n")).await;
    let id = request(&app, &[]).await;
    let (s, v) = decide(&app, &app.svid(APPROVER), &id, "approve", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "pending");
    // The same approver twice does not make two.
    let (s, v) = decide(&app, &app.svid(APPROVER), &id, "approve", None).await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
    let (s, v) = decide(&app, &app.svid(APPROVER_2), &id, "approve", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "approved");
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn approvers_racing_on_a_two_person_rule_count_once_each() {
    let app = spawn_gated(&approvals_config("min_approvers = 2\n")).await;
    let id = request(&app, &[]).await;
    let app = Arc::new(app);
    let mut handles = Vec::new();
    for who in [APPROVER, APPROVER, APPROVER, APPROVER] {
        let app = app.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move {
            decide(&app, &app.svid(who), &id, "approve", None).await.0
        }));
    }
    let mut ok = 0;
    for h in handles {
        if h.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 1, "one approver counts once, however it races");
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
}

#[tokio::test]
async fn racing_polls_of_an_approved_request_issue_one_token() {
    let app = Arc::new(spawn_gated(&approvals_config("")).await);
    let id = request(&app, &[]).await;
    decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    let mut handles = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move { poll(&app, &id, &[]).await }));
    }
    let mut issued = 0;
    for h in handles {
        let (s, v) = h.await.unwrap();
        if s == 200 {
            issued += 1;
        } else {
            assert_eq!((s, code(&v)), (400, "invalid_grant"), "{v}");
        }
    }
    assert_eq!(issued, 1);
}

#[tokio::test]
async fn a_quarantine_or_block_cancels_pending_and_refuses_approved_at_issue_time() {
    let app = spawn_gated(&approvals_config("")).await;
    // Pending, then its subject is blocked: cancelled.
    let pending = request(&app, &[]).await;
    // Approved, then its subject is blocked: refused when it would be issued.
    let approved = request(&app, &[("task_purpose", "second")]).await;
    let (s, _) = decide(&app, APPROVER_TOKEN, &approved, "approve", None).await;
    assert_eq!(s, 200);
    let (s, v) = app
        .admin_revoke(json!({"selector": {"subject": AGENT}, "reason": "incident"}))
        .await;
    assert_eq!(s, 200, "{v}");
    app.clock.advance(5);
    let (s, v) = poll(&app, &pending, &[]).await;
    assert_eq!((s, code(&v)), (400, "access_denied"), "{v}");
    let (s, v) = decide(&app, APPROVER_TOKEN, &pending, "approve", None).await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    let (s, v) = poll(&app, &approved, &[("task_purpose", "second")]).await;
    assert_eq!((s, code(&v)), (400, "invalid_grant"), "{v}");
    assert!(
        app.audit_records()
            .iter()
            .any(|r| r["event"] == "approval" && r["decision"] == "cancelled")
    );
}

#[tokio::test]
async fn without_an_approvals_section_a_gated_permit_refuses() {
    let app = spawn_gated("").await;
    let (s, v) = app.exchange(&app.svid(AGENT), DEPLOY, &[]).await;
    assert_eq!((s, code(&v)), (400, "invalid_scope"), "{v}");
}

#[tokio::test]
async fn metrics_count_pending_and_decisions() {
    let app = spawn_gated(&approvals_config("")).await;
    let a = request(&app, &[]).await;
    request(&app, &[("task_purpose", "b")]).await;
    decide(&app, APPROVER_TOKEN, &a, "approve", None).await;
    let (_, text) = app.get("/metrics").await;
    let text = text.as_str().unwrap().to_string();
    assert!(text.contains("writ_approvals_pending 1"), "{text}");
    assert!(
        text.contains("writ_approval_decisions_total{outcome=\"approved\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("writ_approval_decision_seconds_count{outcome=\"approved\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_one_replica_approve_through_another_poll_on_the_first() {
    let redis = RedisServer::start();
    let a = spawn_app_with(Options {
        extra_config: format!("{}{}", redis_store(&redis.url()), approvals_config("")),
        ..Options::default()
    })
    .await;
    add_policy(&a);
    let b = spawn_replica(&a).await;
    b.broker.policy.reload().unwrap();
    let id = request(&a, &[]).await;
    // B lists it and approves it.
    let (s, v) = b
        .call(
            Method::GET,
            "/admin/v1/approvals?state=pending",
            Some(APPROVER_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["approvals"][0]["approval_id"], id.as_str());
    // B answers the poll too: still pending.
    b.clock.advance(5);
    let (s, v) = poll(&b, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
    let (s, v) = decide(&b, &b.svid(APPROVER), &id, "approve", None).await;
    assert_eq!(s, 200, "{v}");
    // A issues.
    let (s, v) = poll(&a, &id, &[]).await;
    assert_eq!(s, 200, "{v}");
    // And B will not issue it again.
    let (s, v) = poll(&b, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "invalid_grant"), "{v}");
}

/// A webhook receiver: records each delivery with whether its signature checked out, here,
/// with an HMAC computed by this test's own code, not the broker's.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<(bool, Value)>>>,
}

async fn receiver(secret: &'static str) -> Receiver {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    let got: Arc<Mutex<Vec<(bool, Value)>>> = Arc::default();
    let sink = got.clone();
    let handler = move |headers: HeaderMap, body: Bytes| {
        let sink = sink.clone();
        async move {
            let sig = headers
                .get("writ-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let valid = sig == format!("sha256={}", hmac_sha256_hex(secret.as_bytes(), &body));
            sink.lock()
                .unwrap()
                .push((valid, serde_json::from_slice(&body).unwrap_or(Value::Null)));
            "ok"
        }
    };
    let router = axum::Router::new().route("/hook", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Receiver {
        url: format!("http://{addr}/hook"),
        got,
    }
}

/// HMAC-SHA256 (RFC 2104) written out here over a plain SHA-256: the receiver's own code.
fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    let sha = |parts: &[&[u8]]| {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            c.update(p);
        }
        c.finish().as_ref().to_vec()
    };
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha(&[key]));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = sha(&[&ipad, msg]);
    hex::encode(sha(&[&opad, &inner]))
}

const SECRET: &str = "webhook-secret-0123456789abcdef";

#[tokio::test]
async fn each_request_is_announced_signed_to_the_webhook() {
    let rx = receiver(SECRET).await;
    let app = spawn_gated(&approvals_config(&format!(
        "[approvals.webhook]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        rx.url
    )))
    .await;
    let id = request(&app, &[("task_purpose", "ship 1.2")]).await;
    let start = std::time::Instant::now();
    while rx.got.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "no delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (valid, body) = rx.got.lock().unwrap()[0].clone();
    assert!(valid, "the signature does not check out: {body}");
    assert_eq!(body["type"], "approval.requested");
    assert_eq!(body["approval"]["approval_id"], id.as_str());
    assert_eq!(body["approval"]["subject"], AGENT);
    assert_eq!(body["approval"]["scopes"], json!([DEPLOY]));
    assert_eq!(body["approval"]["audience"], json!([API]));
    assert_eq!(body["approval"]["purpose"], "ship 1.2");
    assert_eq!(body["approval"]["policies"], json!(["deploy-prod"]));
    assert!(body["approval"].get("act").is_some());
    assert!(
        body["approve"]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/admin/v1/approvals/{id}/approve"))
    );
    assert!(body["text"].as_str().unwrap().contains(&id));
    // Delivered is not approved.
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[("task_purpose", "ship 1.2")]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
}

#[tokio::test]
async fn a_webhook_that_is_down_is_retried_and_approves_nothing() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let app = spawn_gated(&approvals_config(&format!(
        "[approvals.webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"{SECRET}\"\n"
    )))
    .await;
    let id = request(&app, &[]).await;
    let start = std::time::Instant::now();
    loop {
        let (_, text) = app.get("/metrics").await;
        let text = text.as_str().unwrap().to_string();
        let failures = text
            .lines()
            .find_map(|l| l.strip_prefix("writ_approval_webhook_failures_total "))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap());
        if failures >= 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not retried: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.clock.advance(5);
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!((s, code(&v)), (400, "authorization_pending"), "{v}");
}

/// A task opened under an approval is still permitted when the policy changes: re-evaluation
/// does not take its approval for a denial (it did, revoking every approved task at the first
/// policy reload).
#[tokio::test]
async fn an_approved_task_survives_a_policy_change_reevaluation() {
    let app = spawn_gated(&approvals_config(
        "[trips]\nreevaluate_on_policy_change = true\n",
    ))
    .await;
    let id = request(&app, &[]).await;
    decide(&app, APPROVER_TOKEN, &id, "approve", None).await;
    let (s, v) = poll(&app, &id, &[]).await;
    assert_eq!(s, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_string();
    let old = app.broker.policy.current().version().to_string();
    std::fs::write(
        app.path("policies/extra.cedar"),
        "@id(\"extra\")\npermit (principal, action == Writ::Action::\"exchange\", resource == Writ::Scope::\"extra:read\");\n",
    )
    .unwrap();
    app.broker.policy.reload().unwrap();
    app.broker.reevaluate_open_tasks(&old).await.unwrap();
    assert_eq!(app.introspect(&token).await["active"], true);
}

/// The store failing or holding a corrupt approval: polls and decisions answer 503, nothing
/// is approved or issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_or_a_corrupt_approval_fails_closed() {
    let mut redis = RedisServer::start();
    let app = spawn_app_with(Options {
        extra_config: format!("{}{}", redis_store(&redis.url()), approvals_config("")),
        ..Options::default()
    })
    .await;
    add_policy(&app);
    let corrupt = request(&app, &[]).await;
    let held = request(&app, &[("task_purpose", "second")]).await;
    // A record that does not parse.
    redis
        .cli(&["HSET", "writ:{apr}:all", &corrupt, "7 {not json"])
        .unwrap();
    app.clock.advance(5);
    let (s, v) = poll(&app, &corrupt, &[]).await;
    assert_eq!((s, code(&v)), (503, "temporarily_unavailable"), "{v}");
    let (s, v) = decide(&app, APPROVER_TOKEN, &corrupt, "approve", None).await;
    assert_eq!((s, code(&v)), (503, "temporarily_unavailable"), "{v}");
    // The store gone: neither a poll nor an approval gets through.
    redis.kill();
    let (s, v) = decide(&app, APPROVER_TOKEN, &held, "approve", None).await;
    assert_eq!((s, code(&v)), (503, "temporarily_unavailable"), "{v}");
    let (s, v) = poll(&app, &held, &[("task_purpose", "second")]).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        !app.audit_records()
            .iter()
            .any(|r| r["event"] == "approval" && r["decision"] == "approved"),
        "nothing was approved"
    );
}
