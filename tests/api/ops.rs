//! JWKS, metadata, health and readiness.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn jwks_publishes_every_configured_key() {
    let app = spawn_app().await;
    let (s, jwks) = app.get("/oauth2/jwks").await;
    assert_eq!(s, 200);
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert_eq!(keys[0]["use"], "sig");
    assert!(
        keys[0].get("d").is_none(),
        "private part must never be published"
    );
}

#[tokio::test]
async fn metadata_follows_rfc8414() {
    let app = spawn_app().await;
    let (s, m) = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(s, 200);
    assert_eq!(m["issuer"], "https://writ.test");
    assert_eq!(m["token_endpoint"], "https://writ.test/oauth2/token");
    assert_eq!(m["jwks_uri"], "https://writ.test/oauth2/jwks");
    assert_eq!(m["grant_types_supported"][0], GRANT);
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let (s, _) = app.get("/healthz").await;
    assert_eq!(s, 200);
    let (s, r) = app.get("/readyz").await;
    assert_eq!(s, 200);
    assert_eq!(r["checks"]["store"], "ok");
    assert_eq!(
        r["checks"]["policy_version"],
        app.broker.policy.current().version()
    );
}

#[tokio::test]
async fn metrics_count_outcomes_and_report_state() {
    let app = spawn_app().await;
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    app.expect_error(&app.svid(AGENT), "repo:admin", &[], 400, "invalid_scope")
        .await;
    app.introspect(&token).await;
    app.introspect("garbage").await;
    let form = Some((
        "application/x-www-form-urlencoded",
        format!("token={token}"),
    ));
    app.call(reqwest::Method::POST, "/oauth2/revoke", None, form)
        .await;
    let text = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "writ_exchanges_total{outcome=\"issued\"} 1",
        "writ_exchanges_total{outcome=\"invalid_scope\"} 1",
        "writ_introspections_total{outcome=\"active\"} 1",
        "writ_introspections_total{outcome=\"inactive\"} 1",
        "writ_revocations_total{kind=\"token\"} 1",
        "writ_open_tasks 1",
        "writ_revocation_feed_fresh 1",
        "writ_http_requests_total{route=\"/oauth2/token\",status=\"200\"} 1",
        "# TYPE writ_http_request_duration_seconds histogram",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    let version = app.broker.policy.current().version().to_string();
    assert!(text.contains(&format!(
        "writ_policy_version_info{{version=\"{version}\"}} 1"
    )));
    let kid = app.broker.tokens.keys().active().kid.clone();
    assert!(text.contains(&format!(
        "writ_signing_key_info{{kid=\"{kid}\",alg=\"ES256\",active=\"true\"}} 1"
    )));
    assert!(!text.contains(&token), "no token in metrics");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let resp = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!made.is_empty());
    let resp = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    // The broker's own id answers, whatever the caller sent (the caller's is logged as
    // `client_request_id`: see the `writ serve` test in tests/cli.rs).
    let second = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(second, "abc-123");
    assert_ne!(second, made, "one id per request");
    let resp = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "a\"b{c}")
        .send()
        .await
        .unwrap();
    assert_ne!(resp.headers()["x-request-id"], "a\"b{c}");
}

const TOO_LARGE: &str = "the body is larger than 65536 bytes";

/// Sends a raw HTTP/1.1 request with a chunked body (no `Content-Length`), so the size is only
/// found while reading; answers the status and the JSON body.
async fn post_chunked(app: &TestApp, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\nx-request-id: chunked-1\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(8 * 1024) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The broker may answer before it has read the whole body; the answer is what counts.
    let _ = stream.write_all(&req).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("x-request-id: ") && !head.contains("x-request-id: chunked-1"),
        "the broker's own request id: {head}"
    );
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

#[tokio::test]
async fn a_too_large_body_gets_the_oauth_error_however_it_is_sent() {
    let app = spawn_app().await;
    let form = format!(
        "grant_type={}&subject_token=x&pad={}",
        GRANT,
        "x".repeat(70 * 1024)
    );
    // Announced by Content-Length.
    let resp = app
        .http
        .post(format!("{}/oauth2/token", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-request-id", "big-1")
        .body(form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_ne!(resp.headers()["x-request-id"], "big-1");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": "invalid_request", "error_description": TOO_LARGE})
    );
    // Streamed in chunks: found while reading.
    let (s, v) = post_chunked(
        &app,
        "/oauth2/token",
        "application/x-www-form-urlencoded",
        form.as_bytes(),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            413,
            json!({"error": "invalid_request", "error_description": TOO_LARGE})
        )
    );
    // The admin API has the same limit and answer.
    let big_reason = json!({"subject": AGENT, "reason": "r".repeat(70 * 1024)}).to_string();
    let (s, v) = app
        .call(
            reqwest::Method::POST,
            "/admin/v1/revocations",
            Some(ADMIN_TOKEN),
            Some(("application/json", big_reason)),
        )
        .await;
    assert_eq!(
        (s, v),
        (
            413,
            json!({"error": "invalid_request", "error_description": TOO_LARGE})
        )
    );
    // Exactly the limit is not too large: the form is read and judged on its content.
    let exact = format!("grant_type={GRANT}&pad=");
    let exact = format!("{exact}{}", "x".repeat(64 * 1024 - exact.len()));
    assert_eq!(exact.len(), 64 * 1024);
    let (s, v, _) = app
        .post_raw("/oauth2/token", "application/x-www-form-urlencoded", exact)
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    assert_ne!(v["error_description"], TOO_LARGE);
    // Refusals are counted under their route.
    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("writ_http_requests_total{route=\"/oauth2/token\",status=\"413\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_openapi_description_matches_the_routes_served() {
    let app = spawn_app().await;
    let (s, spec) = app.get("/openapi.json").await;
    assert_eq!(s, 200);
    assert_eq!(spec["openapi"], "3.1.0");
    let mut described: Vec<(String, String)> = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            described.push((method.to_uppercase(), path.clone()));
        }
    }
    described.sort();
    let mut routes: Vec<(String, String)> = writ::http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(described, routes, "the description and the router disagree");
    // Every described operation is served (no 404 or 405 for its method and path).
    for (method, path) in &routes {
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{task_id}", "tsk_AAAAAAAAAAAAAAAAAAAAAA")
                .replace("{id}", "rev_x")
        );
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let status = app
            .http
            .request(m, &url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(
            status != 405 && (status != 404 || path.contains('{')),
            "{method} {path} -> {status}"
        );
    }
    // Every error a handler can send is one of the described codes.
    let codes: Vec<String> =
        spec["components"]["schemas"]["OAuthError"]["properties"]["error"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
    for code in [
        "invalid_request",
        "invalid_grant",
        "invalid_scope",
        "invalid_target",
        "unsupported_grant_type",
        "invalid_token",
        "invalid_client",
        "access_denied",
        "not_found",
        "temporarily_unavailable",
        "invalid_dpop_proof",
        "use_dpop_nonce",
    ] {
        assert!(codes.contains(&code.to_string()), "{code}");
    }
}

/// Waits (10 s at most) for a `policy_load` record that `wanted` picks in the broker's log.
async fn policy_load_record(app: &TestApp, wanted: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        if let Some(r) = app
            .audit_records()
            .into_iter()
            .find(|r| r["event"] == "policy_load" && wanted(r))
        {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no such policy_load record in:\n{}",
            app.audit_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_emptied_policy_file_is_refused_and_the_old_set_keeps_serving() {
    let app = spawn_app().await;
    let version = app.broker.policy.current().version().to_string();
    app.assert_still_serving().await;
    // Truncated in place while the broker runs: the watcher sees it change.
    std::fs::write(app.path("policies/test.cedar"), "").unwrap();
    let refused = policy_load_record(&app, |r| r["decision"] == "deny").await;
    assert_eq!(refused["policy_version"], version.as_str(), "{refused}");
    let reason = refused["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("policy reload refused: ") && reason.contains("policy.max_drop_share"),
        "{reason}"
    );
    assert_eq!(app.broker.policy.current().version(), version);
    app.assert_still_serving().await;
    let (s, v) = app.get("/readyz").await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn with_allow_empty_an_emptied_policy_file_is_taken() {
    let first = spawn_app().await;
    let app = spawn_edited(&first, |t| {
        t.replace("[policy]\n", "[policy]\nallow_empty = true\n")
    })
    .await;
    let version = app.broker.policy.current().version().to_string();
    app.assert_still_serving().await;
    // The replica reads the first broker's policy directory.
    std::fs::write(first.path("policies/test.cedar"), "").unwrap();
    let start = std::time::Instant::now();
    while app.broker.policy.current().policy_count() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the empty set was not taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loaded = policy_load_record(&app, |r| r["reason"] == "reloaded").await;
    assert_ne!(loaded["policy_version"], version.as_str(), "{loaded}");
    assert_eq!(
        loaded["detail"]["previous_version"],
        version.as_str(),
        "{loaded}"
    );
    assert_eq!(loaded["detail"]["policies"], 0, "{loaded}");
    // An empty set permits nothing.
    app.expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_scope")
        .await;
}
