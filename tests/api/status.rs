//! Token status lists (SPEC §4.6): every token has a slot, every revocation path sets its
//! bit, indexes never collide (across replicas too), lists roll over, unknown lists are 404,
//! and a revocation taken on one replica is in the other's served list within 1 s.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;

const ISSUER: &str = "https://writ.test";

/// The token's `status.status_list`: (path under the broker, index).
fn slot(token: &str) -> (String, u64) {
    let c = claims_of(token);
    let sl = &c["status"]["status_list"];
    let uri = sl["uri"].as_str().unwrap();
    assert!(
        uri.starts_with(&format!("{ISSUER}/oauth2/status/")),
        "{uri}"
    );
    (
        uri.strip_prefix(ISSUER).unwrap().to_string(),
        sl["idx"].as_u64().unwrap(),
    )
}

/// Fetches the list at `path`, checks the response and the JWT's signature against the
/// broker's JWKS, and returns its claims.
async fn fetch_list(app: &TestApp, path: &str) -> Value {
    let resp = app
        .http
        .get(format!("{}{path}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/statuslist+jwt"
    );
    assert_eq!(
        resp.headers()["cache-control"].to_str().unwrap(),
        "max-age=10"
    );
    let jwt = resp.text().await.unwrap();
    let header = header_of(&jwt);
    assert_eq!(header["typ"], "statuslist+jwt");
    let (_, jwks) = app.get("/oauth2/jwks").await;
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let (input, sig) = jwt.rsplit_once('.').unwrap();
    let alg: jsonwebtoken::Algorithm = header["alg"].as_str().unwrap().parse().unwrap();
    assert!(jsonwebtoken::crypto::verify(sig, input.as_bytes(), &key, alg).unwrap());
    let claims = claims_of(&jwt);
    assert_eq!(claims["sub"], format!("{ISSUER}{path}"));
    assert_eq!(claims["ttl"], 10);
    assert!(claims["exp"].as_i64().unwrap() > claims["iat"].as_i64().unwrap());
    assert_eq!(claims["status_list"]["bits"], 1);
    claims
}

/// The token's bit in the list the broker serves now.
async fn bit(app: &TestApp, token: &str) -> u8 {
    let (path, idx) = slot(token);
    let claims = fetch_list(app, &path).await;
    let list: writ::token::status::EncodedList =
        serde_json::from_value(claims["status_list"].clone()).unwrap();
    let bytes = writ::token::status::decode(&list).unwrap();
    writ::token::status::status_at(&bytes, idx).unwrap()
}

async fn app_with(extra: &str) -> TestApp {
    spawn_app_with(Options {
        extra_config: extra.to_string(),
        ..Options::default()
    })
    .await
}

fn oauth_form(token: &str) -> String {
    serde_urlencoded::to_string([("token", token)]).unwrap()
}

#[tokio::test]
async fn every_revocation_path_sets_the_bit() {
    let app =
        app_with("[trips]\ndenials = { count = 2, window = \"1m\" }\nquarantine = \"1m\"\n").await;
    // RFC 7009.
    let (t, _) = app.task_token(AGENT, "repo:read").await;
    assert_eq!(bit(&app, &t).await, 0);
    let (s, _) = app
        .call(
            Method::POST,
            "/oauth2/revoke",
            None,
            Some(("application/x-www-form-urlencoded", oauth_form(&t))),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(bit(&app, &t).await, 1, "RFC 7009");
    // Admin jti.
    let (t, _) = app.task_token(AGENT, "repo:read").await;
    let jti = claims_of(&t)["jti"].as_str().unwrap().to_string();
    let (s, v) = app
        .admin_revoke(json!({"selector": {"jti": jti}, "reason": "r"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(bit(&app, &t).await, 1, "admin jti");
    // Task end: every token of the task, and of the task delegated from it.
    let (t1, task) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .exchange(&app.svid(AGENT), "repo:read", &[("task_id", &task)])
        .await;
    assert_eq!(s, 200, "{v}");
    let t2 = v["access_token"].as_str().unwrap().to_string();
    let (s, v) = app.delegate(&t1, "repo:read").await;
    let child = (s == 200).then(|| v["access_token"].as_str().unwrap().to_string());
    assert_eq!((bit(&app, &t1).await, bit(&app, &t2).await), (0, 0));
    let (s, v) = app.end_task(&task, &t1).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (bit(&app, &t1).await, bit(&app, &t2).await),
        (1, 1),
        "task end"
    );
    if let Some(child) = child {
        assert_eq!(bit(&app, &child).await, 1, "delegation cascade");
    }
    // Admin task_id.
    let (t, task) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .admin_revoke(json!({"selector": {"task_id": task}, "reason": "r"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(bit(&app, &t).await, 1, "admin task_id");
    // Admin subject, issuer and all: each revokes the open tasks it covers.
    for (subject, selector) in [
        (
            "spiffe://example.org/agent/s1",
            json!({"subject": "spiffe://example.org/agent/s1"}),
        ),
        (
            "spiffe://example.org/agent/s2",
            json!({"subject": "spiffe://example.org/agent/*"}),
        ),
        (
            "spiffe://example.org/agent/s3",
            json!({"issuer": "example.org"}),
        ),
        ("spiffe://example.org/agent/s4", json!({"all": true})),
    ] {
        let (t, _) = app.task_token(subject, "repo:read").await;
        assert_eq!(bit(&app, &t).await, 0);
        let (s, v) = app
            .admin_revoke(json!({"selector": selector, "reason": "r"}))
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(bit(&app, &t).await, 1, "admin {selector}");
        let id = v["revocation_id"].as_str().unwrap();
        let (s, _) = app
            .call(
                Method::DELETE,
                &format!("/admin/v1/revocations/{id}"),
                Some(ADMIN_TOKEN),
                None,
            )
            .await;
        assert_eq!(s, 200);
    }
    // A trip (denials): the subject's open tasks are revoked.
    let tripper = "spiffe://example.org/agent/tripper";
    let (t, _) = app.task_token(tripper, "repo:read").await;
    for _ in 0..2 {
        app.expect_error(&app.svid(tripper), "repo:admin", &[], 400, "invalid_scope")
            .await;
    }
    assert_eq!(bit(&app, &t).await, 1, "trip");
}

#[tokio::test]
async fn a_policy_re_evaluation_sets_the_bit() {
    let app = app_with("[trips]\nreevaluate_on_policy_change = true\n").await;
    let (w, _) = app.task_token(AGENT, "repo:write").await;
    let (r, _) = app.task_token(AGENT, "repo:read").await;
    let without_write = POLICY.replace(
        "@id(\"agent-write\")\n@max_ttl(\"2m\")\npermit (\n  principal in Writ::TrustDomain::\"example.org\",\n  action == Writ::Action::\"exchange\",\n  resource == Writ::Scope::\"repo:write\"\n) when { principal.path like \"/agent/*\" };",
        "",
    );
    assert_ne!(without_write, POLICY);
    std::fs::write(app.path("policies/test.cedar"), without_write).unwrap();
    let start = Instant::now();
    while bit(&app, &w).await == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "not revoked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bit(&app, &r).await, 0, "a task that keeps its permission");
}

#[tokio::test]
async fn indexes_are_unique_and_lists_roll_over() {
    let app = app_with("[status]\nlist_size = 8\n").await;
    let mut seen = HashSet::new();
    let mut lists = Vec::new();
    let mut tokens = Vec::new();
    for _ in 0..20 {
        let (t, _) = app.task_token(AGENT, "repo:read").await;
        let (path, idx) = slot(&t);
        assert!(idx < 8, "{idx}");
        assert!(seen.insert((path.clone(), idx)), "index handed out twice");
        if lists.last() != Some(&path) {
            lists.push(path);
        }
        tokens.push(t);
    }
    assert_eq!(lists.len(), 3, "{lists:?}");
    // Each list is 8 bits; the first one is still served and its bits are right.
    let claims = fetch_list(&app, &lists[0]).await;
    let list: writ::token::status::EncodedList =
        serde_json::from_value(claims["status_list"].clone()).unwrap();
    assert_eq!(writ::token::status::decode(&list).unwrap(), vec![0u8]);
    let (s, v) = app
        .call(
            Method::POST,
            "/oauth2/revoke",
            None,
            Some(("application/x-www-form-urlencoded", oauth_form(&tokens[3]))),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(bit(&app, &tokens[3]).await, 1);
    assert_eq!(bit(&app, &tokens[2]).await, 0);
    // Concurrent exchanges never share an index.
    let mut handles = Vec::new();
    let app = std::sync::Arc::new(app);
    for _ in 0..30 {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            let (t, _) = app.task_token(AGENT, "repo:read").await;
            slot(&t)
        }));
    }
    for h in handles {
        assert!(seen.insert(h.await.unwrap()), "index handed out twice");
    }
}

#[tokio::test]
async fn unknown_and_expired_lists_are_404() {
    let app = spawn_app().await;
    for path in [
        "/oauth2/status/sl_unknown",
        "/oauth2/status/nope",
        "/oauth2/status/sl_..%2F..",
        &format!("/oauth2/status/sl_{}", "a".repeat(100)),
    ] {
        let (s, v) = app.get(path).await;
        assert_eq!((s, v["error"].as_str()), (404, Some("not_found")), "{path}");
    }
    // A list is served until its last token has expired, then it is gone.
    let (t, _) = app.task_token(AGENT, "repo:read").await;
    let (path, _) = slot(&t);
    let exp = claims_of(&t)["exp"].as_i64().unwrap();
    app.clock.set(exp);
    let (s, _) = app.get(&path).await;
    assert_eq!(s, 200, "served while its last token lives");
    app.clock.set(exp + 1);
    let (s, _) = app.get(&path).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn two_replicas_share_indexes_and_bits() {
    let redis = RedisServer::start();
    let a = app_with(&format!(
        "{}[status]\nlist_size = 16\n",
        redis_store(&redis.url())
    ))
    .await;
    let b = spawn_replica(&a).await;
    a.wait_status("/readyz", 200).await;
    b.wait_status("/readyz", 200).await;
    // Allocation from both at once: no index twice, rollover included.
    let mut handles = Vec::new();
    let a = std::sync::Arc::new(a);
    let b = std::sync::Arc::new(b);
    for i in 0..40 {
        let app = if i % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            let (t, _) = app.task_token(AGENT, "repo:read").await;
            t
        }));
    }
    let mut seen = HashSet::new();
    let mut tokens = Vec::new();
    for h in handles {
        let t = h.await.unwrap();
        assert!(seen.insert(slot(&t)), "index handed out twice");
        tokens.push(t);
    }
    // A revocation on A is in B's served list within 1 s.
    for t in tokens.iter().take(5) {
        assert_eq!(bit(&b, t).await, 0);
        let (s, _) = a
            .call(
                Method::POST,
                "/oauth2/revoke",
                None,
                Some(("application/x-www-form-urlencoded", oauth_form(t))),
            )
            .await;
        assert_eq!(s, 200);
        let start = Instant::now();
        while bit(&b, t).await == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "not in B's list within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // A task ended on B is in A's list.
    let (t, task) = b.task_token(AGENT, "repo:read").await;
    let (s, v) = b.end_task(&task, &t).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(bit(&a, &t).await, 1);
}

/// Ending a task sets the bits of every token of the tree delegated from it, at any depth,
/// and revoking a grant sets the bits of the tasks delegated from it: an offline verifier
/// learns of the cascade as an introspecting one does.
#[tokio::test]
async fn a_delegation_cascade_sets_the_bits_of_the_whole_tree() {
    use crate::delegation::{SUB, delegate_with, grant, open};
    const SUB2: &str = "spiffe://example.org/agent/sub/second";
    let app = spawn_app().await;
    let (root, task) = open(&app, "repo:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let child = v["access_token"].as_str().unwrap().to_string();
    let child_task = v["task_id"].as_str().unwrap().to_string();
    let g2 = grant(&app, SUB, &child_task, SUB2, "repo:read").await;
    let (s, v) = delegate_with(&app, &g2, Some(&app.svid(SUB2)), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let grandchild = v["access_token"].as_str().unwrap().to_string();
    for t in [&root, &g, &child, &g2, &grandchild] {
        assert_eq!(bit(&app, t).await, 0);
    }
    let (s, v) = app.end_task(&task, &root).await;
    assert_eq!(s, 200, "{v}");
    for (name, t) in [
        ("root", &root),
        ("grant", &g),
        ("child", &child),
        ("grant 2", &g2),
        ("grandchild", &grandchild),
    ] {
        assert_eq!(bit(&app, t).await, 1, "{name}");
    }

    // A grant revoked by RFC 7009: its own bit and those of the tasks delegated from it.
    let (kept, task) = open(&app, "repo:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let child = v["access_token"].as_str().unwrap().to_string();
    let (s, _, _) = app.post_form("/oauth2/revoke", &[("token", &g)]).await;
    assert_eq!(s, 200);
    assert_eq!(bit(&app, &g).await, 1);
    assert_eq!(bit(&app, &child).await, 1);
    assert_eq!(
        bit(&app, &kept).await,
        0,
        "the parent's own token stays valid"
    );
}

/// A served list is never already expired: with `ttl = 1s`, a list signed at one second is
/// not served again once the broker's clock has reached its `exp`, even within the second
/// during which unchanged bits reuse a signature.
#[tokio::test]
async fn a_served_list_is_never_past_its_exp() {
    let app = app_with("[status]\nttl = \"1s\"\n").await;
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let (path, _) = slot(&token);
    for _ in 0..3 {
        let resp = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let claims = claims_of(&resp.text().await.unwrap());
        let now = writ::domain::Clock::now(app.clock.as_ref());
        assert_eq!(claims["iat"].as_i64().unwrap(), now, "{claims}");
        assert!(claims["exp"].as_i64().unwrap() > now, "{claims} at {now}");
        app.clock.advance(1);
    }
}
