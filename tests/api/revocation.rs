//! Introspection, holder revocation, task end and the admin revocation API on one broker.

use reqwest::Method;
use serde_json::json;
use writ::domain::Clock;
use writ::token::keys::{KeyAlg, SigningKey, generate_pem};

use crate::helpers::*;

#[tokio::test]
async fn introspection_answers_active_with_the_token_claims() {
    let app = spawn_app().await;
    let (token, task) = app.task_token(AGENT, "repo:read").await;
    let v = app.introspect(&token).await;
    assert_eq!(v["active"], true);
    assert_eq!(v["scope"], "repo:read");
    assert_eq!(v["client_id"], AGENT);
    assert_eq!(v["sub"], AGENT);
    assert_eq!(v["aud"], API);
    assert_eq!(v["iss"], "https://writ.test");
    assert_eq!(v["txn"], task.as_str());
    assert_eq!(v["token_type"], "Bearer");
    let c = claims_of(&token);
    for k in ["exp", "iat", "jti"] {
        assert_eq!(v[k], c[k], "{k}");
    }
    // The admin token may introspect too.
    let (s, v) = app.introspect_as(ADMIN_TOKEN, &token).await;
    assert_eq!((s, v["active"].as_bool()), (200, Some(true)));
}

#[tokio::test]
async fn introspection_refuses_callers_that_are_not_resource_servers() {
    let app = spawn_app().await;
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .call(
            Method::POST,
            "/oauth2/introspect",
            None,
            Some((
                "application/x-www-form-urlencoded",
                format!("token={token}"),
            )),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (401, "invalid_token"),
        "{v}"
    );
    let (s, v) = app.introspect_as("garbage", &token).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (401, "invalid_token"),
        "{v}"
    );
    // A valid workload that is not an introspection principal.
    let (s, v) = app.introspect_as(&app.svid(AGENT), &token).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (403, "access_denied"),
        "{v}"
    );
    // A task token is not a credential for introspection.
    let (s, _) = app.introspect_as(&token, &token).await;
    assert_eq!(s, 401);
    assert!(app.audit_text().contains("\"event\":\"introspect_denied\""));
}

#[tokio::test]
async fn inactive_tokens_answer_exactly_active_false() {
    let app = spawn_app().await;
    let other_key =
        SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "o").unwrap();
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    // Foreign: same claims, another key.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = Some("at+jwt".into());
    header.kid = Some(app.broker.tokens.keys().active().kid.clone());
    let foreign =
        jsonwebtoken::encode(&header, &claims_of(&token), other_key.encoding_key()).unwrap();
    for t in ["garbage", "a.b.c", foreign.as_str(), &app.svid(AGENT)] {
        assert_eq!(app.introspect(t).await, json!({"active": false}));
    }
    // Expired: move the clock past exp.
    app.clock.advance(301);
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    // Missing token parameter.
    let (s, v) = app
        .call(
            Method::POST,
            "/oauth2/introspect",
            Some(ADMIN_TOKEN),
            Some(("application/x-www-form-urlencoded", String::new())),
        )
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (400, "invalid_request"));
}

#[tokio::test]
async fn a_holder_revokes_its_own_token() {
    let app = spawn_app().await;
    let (token, task) = app.task_token(AGENT, "repo:read").await;
    let (second, _) = {
        let (s, v) = app
            .exchange(&app.svid(AGENT), "repo:read", &[("task_id", &task)])
            .await;
        assert_eq!(s, 200, "{v}");
        (v["access_token"].as_str().unwrap().to_string(), ())
    };
    let form = |t: &str| {
        Some((
            "application/x-www-form-urlencoded",
            serde_urlencoded::to_string([("token", t)]).unwrap(),
        ))
    };
    let (s, v) = app
        .call(Method::POST, "/oauth2/revoke", None, form(&token))
        .await;
    assert_eq!((s, v.clone()), (200, json!({})));
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    // Only that token: the task's other token stays active.
    assert_eq!(app.introspect(&second).await["active"], true);
    // Unknown tokens: still 200.
    let (s, _) = app
        .call(Method::POST, "/oauth2/revoke", None, form("not-a-token"))
        .await;
    assert_eq!(s, 200);
    // A hint Writ has no tokens of is ignored (RFC 7009 §2.1).
    let body = serde_urlencoded::to_string([
        ("token", token.as_str()),
        ("token_type_hint", "refresh_token"),
    ])
    .unwrap();
    let (s, v) = app
        .call(
            Method::POST,
            "/oauth2/revoke",
            None,
            Some(("application/x-www-form-urlencoded", body)),
        )
        .await;
    assert_eq!((s, v), (200, json!({})));
    // A revoked token cannot be used for delegation (RFC 8693 §2.2.2: `invalid_request`).
    let (s, v) = app.delegate(&token, "repo:read").await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
}

#[tokio::test]
async fn ending_a_task_revokes_its_tokens_and_its_delegations() {
    let app = spawn_app().await;
    let (token, task) = app.task_token(AGENT, "repo:read").await;
    let grant = app.grant_for_delegate(AGENT, &task, "repo:read").await;
    let (s, v) = app.delegate(&grant, "repo:read").await;
    assert_eq!(s, 200, "{v}");
    let child = v["access_token"].as_str().unwrap().to_string();

    let (s, v) = app
        .call(
            Method::GET,
            &format!("/v1/tasks/{task}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "open");
    assert_eq!(v["owner"], AGENT);

    // A token of another task may neither read nor end this one.
    let (other, _) = app
        .task_token("spiffe://example.org/agent/other", "repo:read")
        .await;
    let (s, v) = app
        .call(
            Method::POST,
            &format!("/v1/tasks/{task}/end"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (403, "access_denied"),
        "{v}"
    );
    let (s, _) = app
        .call(
            Method::GET,
            &format!("/v1/tasks/{task}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, 401);
    let (s, v) = app
        .call(Method::POST, &format!("/v1/tasks/{task}/end"), None, None)
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (401, "invalid_token"));

    let (s, v) = app
        .call(
            Method::POST,
            &format!("/v1/tasks/{task}/end"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "ended");
    assert_eq!(v["revoked_tasks"], 2);
    // The task's token and the grant minted into it, and the delegated task's token.
    assert_eq!(v["revoked_tokens"], 3);
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    assert_eq!(app.introspect(&child).await, json!({"active": false}));
    // The admin still reads the ended task.
    let (s, v) = app
        .call(
            Method::GET,
            &format!("/v1/tasks/{task}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v["state"].as_str().unwrap()), (200, "ended"));
    // Minting into it is refused.
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("task_id", &task)],
        400,
        "invalid_grant",
    )
    .await;
    assert!(app.audit_text().contains("\"event\":\"task_end\""));
    let (s, _) = app
        .call(Method::GET, "/v1/tasks/tsk_nope", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn admin_revocations_by_each_selector() {
    let app = spawn_app().await;
    // jti
    let (t1, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"jti": claims_of(&t1)["jti"]}, "reason": "leaked"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["revocation_id"].as_str().unwrap().starts_with("rev_"));
    assert_eq!(
        (v["revoked_tasks"].as_u64(), v["revoked_tokens"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(app.introspect(&t1).await, json!({"active": false}));
    // task
    let (t2, task2) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"task_id": task2}, "reason": "runaway"}))
        .await;
    assert_eq!(
        (s, v["revoked_tasks"].as_u64(), v["revoked_tokens"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(app.introspect(&t2).await, json!({"active": false}));
    let (s, v) = app
        .call(
            Method::GET,
            &format!("/v1/tasks/{task2}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v["state"].as_str().unwrap()), (200, "revoked"));
    let (s, v) = app
        .admin_revoke(json!({"selector": {"task_id": "tsk_AAAAAAAAAAAAAAAAAAAAAA"}, "reason": "x"}))
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (404, "not_found"));
}

#[tokio::test]
async fn subject_prefix_revocation_blocks_until_lifted() {
    let app = spawn_app().await;
    let agents = [
        "spiffe://example.org/agent/a",
        "spiffe://example.org/agent/b",
    ];
    let mut tokens = Vec::new();
    for a in agents {
        tokens.push(app.task_token(a, "repo:read").await.0);
    }
    let (bystander, _) = app
        .task_token("spiffe://example.org/agentx/c", "tickets:read")
        .await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"subject": "spiffe://example.org/agent/*"}, "reason": "compromised runner"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["revoked_tasks"].as_u64(), v["revoked_tokens"].as_u64()),
        (Some(2), Some(2))
    );
    let rid = v["revocation_id"].as_str().unwrap().to_string();
    for t in &tokens {
        assert_eq!(app.introspect(t).await, json!({"active": false}));
    }
    // `/agent/*` does not cover `/agentx/...`.
    assert_eq!(app.introspect(&bystander).await["active"], true);
    // New exchanges for the selector are refused until lifted.
    let e = app
        .expect_error(&app.svid(agents[0]), "repo:read", &[], 400, "invalid_grant")
        .await;
    assert!(e["error_description"].as_str().unwrap().contains(&rid));
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/revocations",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["revocations"][0]["id"], rid.as_str());
    assert_eq!(
        v["revocations"][0]["selector"],
        json!({"subject": "spiffe://example.org/agent/*"})
    );
    let (s, v) = app
        .call(
            Method::DELETE,
            &format!("/admin/v1/revocations/{rid}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["lifted_at"].is_i64());
    let (s, v) = app.exchange(&app.svid(agents[0]), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    // Tokens issued before the revocation stay revoked after the lift.
    assert_eq!(app.introspect(&tokens[1]).await, json!({"active": false}));
    let (s, v) = app
        .call(
            Method::DELETE,
            "/admin/v1/revocations/rev_nope",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (404, "not_found"));
}

#[tokio::test]
async fn issuer_and_kill_switch_revocations() {
    let app = spawn_app().await;
    let (t, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .admin_revoke(
            json!({"selector": {"issuer": "example.org"}, "reason": "trust domain compromise"}),
        )
        .await;
    assert_eq!((s, v["revoked_tasks"].as_u64()), (200, Some(1)), "{v}");
    // The block covers the trust domain's resource servers too: the admin token introspects.
    let (s, body) = app.introspect_as(ADMIN_TOKEN, &t).await;
    assert_eq!((s, body), (200, json!({"active": false})));
    let (s, body) = app.introspect_as(&app.svid(RESOURCE), &t).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (403, Some("access_denied")),
        "{body}"
    );
    app.expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_grant")
        .await;
    let rid = v["revocation_id"].as_str().unwrap().to_string();
    app.call(
        Method::DELETE,
        &format!("/admin/v1/revocations/{rid}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    app.clock.advance(1);
    let (t2, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"all": true}, "reason": "kill switch"}))
        .await;
    assert_eq!((s, v["revoked_tasks"].as_u64()), (200, Some(1)), "{v}");
    let (s, v) = app.introspect_as(ADMIN_TOKEN, &t2).await;
    assert_eq!((s, v), (200, json!({"active": false})));
    app.expect_error(
        &app.svid("spiffe://example.org/agent/z"),
        "repo:read",
        &[],
        400,
        "invalid_grant",
    )
    .await;
    let text = app.audit_text();
    assert!(text.contains("kill switch") && text.contains("admin-token:"));
}

#[tokio::test]
async fn admin_api_bad_input_and_bad_callers() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"selector": {"color": "red"}, "reason": "x"}),
            "unknown selector",
        ),
        (
            json!({"selector": {"jti": "a"}, "reason": ""}),
            "empty reason",
        ),
        (json!({"selector": {"jti": "a"}}), "missing reason"),
        (
            json!({"selector": {"jti": "a", "all": true}, "reason": "x"}),
            "two selectors",
        ),
        (json!({"selector": {}, "reason": "x"}), "empty selector"),
        (
            json!({"selector": {"all": false}, "reason": "x"}),
            "all false",
        ),
        (
            json!({"selector": {"subject": "not-a-subject"}, "reason": "x"}),
            "bad subject",
        ),
        (
            json!({"selector": {"task_id": "nope"}, "reason": "x"}),
            "bad task id",
        ),
        (
            json!({"selector": {"jti": "a"}, "reason": "x", "extra": 1}),
            "unknown field",
        ),
    ];
    for (body, name) in cases {
        let (s, v) = app.admin_revoke(body).await;
        assert_eq!(
            (s, v["error"].as_str().unwrap_or("")),
            (400, "invalid_request"),
            "{name}: {v}"
        );
    }
    let (s, v) = app
        .call(
            Method::POST,
            "/admin/v1/revocations",
            Some(ADMIN_TOKEN),
            Some(("application/json", "{not json".into())),
        )
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (400, "invalid_request"));
    let good = json!({"selector": {"all": true}, "reason": "x"}).to_string();
    // No bearer, a wrong admin token, a workload that is not an admin principal.
    let (s, _) = app
        .call(
            Method::POST,
            "/admin/v1/revocations",
            None,
            Some(("application/json", good.clone())),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .call(
            Method::POST,
            "/admin/v1/revocations",
            Some("wrong"),
            Some(("application/json", good.clone())),
        )
        .await;
    assert_eq!(s, 401);
    let (s, v) = app
        .call(
            Method::POST,
            "/admin/v1/revocations",
            Some(&app.svid(AGENT)),
            Some(("application/json", good.clone())),
        )
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (403, "access_denied"));
    // Nothing was revoked by any of that.
    app.assert_still_serving().await;
    // A security principal is an admin.
    let (s, v) = app
        .call(
            Method::POST,
            "/admin/v1/revocations",
            Some(&app.svid(SECURITY)),
            Some((
                "application/json",
                json!({"selector": {"subject": "spiffe://example.org/agent/x"}, "reason": "test"})
                    .to_string(),
            )),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(app.audit_text().contains(SECURITY));
}

#[tokio::test]
async fn admin_lists_tasks_by_subject_and_state() {
    let app = spawn_app().await;
    let (_, t1) = app.task_token(AGENT, "repo:read").await;
    let (tok2, t2) = app
        .task_token("spiffe://example.org/agent/b", "repo:read")
        .await;
    app.call(
        Method::POST,
        &format!("/v1/tasks/{t2}/end"),
        Some(&tok2),
        None,
    )
    .await;
    let (s, v) = app
        .call(Method::GET, "/admin/v1/tasks", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);
    let (_, v) = app
        .call(
            Method::GET,
            &format!("/admin/v1/tasks?subject={AGENT}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(v["tasks"][0]["task_id"], t1.as_str());
    assert_eq!(v["tasks"].as_array().unwrap().len(), 1);
    let (_, v) = app
        .call(
            Method::GET,
            "/admin/v1/tasks?state=ended",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(v["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(v["tasks"][0]["task_id"], t2.as_str());
    let (_, v) = app
        .call(
            Method::GET,
            "/admin/v1/tasks?subject=spiffe://example.org/agent/*&state=open",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(v["tasks"].as_array().unwrap().len(), 1);
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/tasks?state=weird",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!((s, v["error"].as_str().unwrap()), (400, "invalid_request"));
    let (s, _) = app
        .call(Method::GET, "/admin/v1/tasks", Some(&app.svid(AGENT)), None)
        .await;
    assert_eq!(s, 403);
    let _ = app.clock.now();
}

/// The decision log's refusals of `subject` as a caller of `event`'s endpoints.
fn caller_refusals(app: &TestApp, event: &str, subject: &str) -> Vec<serde_json::Value> {
    app.audit_records()
        .into_iter()
        .filter(|r| r["event"] == event && r["decision"] == "deny" && r["subject"] == subject)
        .collect()
}

#[tokio::test]
async fn a_blocked_admin_workload_cannot_lift_its_own_block() {
    let app = spawn_app().await;
    let admin = app.svid(SECURITY);
    let (s, v) = app
        .admin_revoke(json!({"selector": {"subject": SECURITY}, "reason": "stolen laptop"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let rid = v["revocation_id"].as_str().unwrap().to_string();
    let path = format!("/admin/v1/revocations/{rid}");
    let (s, v) = app.call(Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("access_denied")),
        "{v}"
    );
    assert!(
        v["error_description"].as_str().unwrap().contains(&rid),
        "{v}"
    );
    // Nor may it read or revoke anything else while blocked.
    let (s, _) = app
        .call(Method::GET, "/admin/v1/revocations", Some(&admin), None)
        .await;
    assert_eq!(s, 403);
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/revocations",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["revocations"][0]["id"], rid.as_str());
    assert!(v["revocations"][0]["lifted_at"].is_null(), "{v}");
    assert_eq!(caller_refusals(&app, "admin", SECURITY).len(), 2);
    // An admin token is not a subject: it lifts the block, and the workload is back.
    let (s, v) = app
        .call(Method::DELETE, &path, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = app
        .call(Method::GET, "/admin/v1/revocations", Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn a_quarantined_admin_workload_cannot_lift_its_quarantine() {
    let app = spawn_app_with(Options {
        extra_config: "[trips]\ndenials = { count = 2, window = \"1m\" }\nquarantine = \"10m\"\n"
            .into(),
        ..Options::default()
    })
    .await;
    let admin = app.svid(SECURITY);
    for _ in 0..2 {
        app.expect_error(&admin, "repo:admin", &[], 400, "invalid_scope")
            .await;
    }
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/quarantines",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let qid = v["quarantines"][0]["id"].as_str().unwrap().to_string();
    let path = format!("/admin/v1/quarantines/{qid}");
    let (s, v) = app.call(Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("access_denied")),
        "{v}"
    );
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("quarantined until"),
        "{v}"
    );
    let (s, v) = app
        .call(
            Method::GET,
            "/admin/v1/quarantines",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["quarantines"][0]["id"], qid.as_str(), "still standing");
    assert_eq!(caller_refusals(&app, "admin", SECURITY).len(), 1);
}

#[tokio::test]
async fn a_blocked_introspection_caller_is_refused() {
    let app = spawn_app().await;
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"subject": "spiffe://example.org/resource/*"}, "reason": "rogue API"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = app.introspect_as(&app.svid(RESOURCE), &token).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("access_denied")),
        "{v}"
    );
    assert_eq!(
        caller_refusals(&app, "introspect_denied", RESOURCE).len(),
        1
    );
    // The admin token still introspects: the block covers subjects only.
    let (s, v) = app.introspect_as(ADMIN_TOKEN, &token).await;
    assert_eq!((s, v["active"].as_bool()), (200, Some(true)), "{v}");
}

#[tokio::test]
async fn a_restarted_memory_store_broker_vouches_for_no_token_issued_before() {
    let app = spawn_app().await;
    let (ended, ended_task) = app.task_token(AGENT, "repo:read").await;
    let (live, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app.end_task(&ended_task, &ended).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(app.introspect(&ended).await, json!({"active": false}));
    assert_eq!(app.introspect(&live).await["active"], true);

    // Same keys, same files: the memory store forgot the end and every task.
    let app = restart(stop(app)).await;
    assert_eq!(app.introspect(&ended).await, json!({"active": false}));
    assert_eq!(app.introspect(&live).await, json!({"active": false}));
    let (fresh, _) = app.task_token(AGENT, "repo:read").await;
    assert_eq!(app.introspect(&fresh).await["active"], true);
}
