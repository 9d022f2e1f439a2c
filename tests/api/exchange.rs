//! POST /oauth2/token: the exchange, its claims, and every refusal with its exact code.

use serde_json::json;
use writ::domain::Clock;
use writ::token::keys::{KeyAlg, SigningKey, generate_pem};

use crate::helpers::*;

#[tokio::test]
async fn exchange_issues_a_task_token_with_the_contract_claims() {
    let app = spawn_app().await;
    let svid = app.svid(AGENT);
    let (s, body, headers) = app
        .post_form(
            "/oauth2/token",
            &[
                ("grant_type", GRANT),
                ("subject_token", &svid),
                ("subject_token_type", JWT_TYPE),
                ("scope", "repo:read"),
                ("audience", API),
                ("task_purpose", "triage issue 42"),
            ],
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["issued_token_type"], AT_TYPE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "repo:read");
    // @max_ttl("5m") and the default 5m: 300 s.
    assert_eq!(body["expires_in"], 300);
    let token = body["access_token"].as_str().unwrap();
    let h = header_of(token);
    assert_eq!(h["typ"], "at+jwt");
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["kid"], app.broker.tokens.keys().active().kid.as_str());
    let c = claims_of(token);
    assert_eq!(c["iss"], "https://writ.test");
    assert_eq!(c["sub"], AGENT);
    assert_eq!(c["client_id"], AGENT);
    assert_eq!(c["aud"], API);
    assert_eq!(c["scope"], "repo:read");
    assert_eq!(c["txn"], body["task_id"]);
    assert!(c["txn"].as_str().unwrap().starts_with("tsk_"));
    assert!(c["jti"].as_str().unwrap().len() >= 22);
    let now = app.clock.now();
    assert_eq!(c["iat"], now);
    assert_eq!(c["nbf"], now);
    assert_eq!(c["exp"], now + 300);
    assert!(c.get("cnf").is_none() && c.get("act").is_none());
    // The token verifies against the broker's own keys.
    app.broker.tokens.verify(token, now).unwrap();

    // The decision is in the log, with the policy version and the determining policy, and
    // neither token appears in it.
    let records = app.audit_records();
    let allow = records.iter().find(|r| r["decision"] == "allow").unwrap();
    assert_eq!(allow["event"], "exchange");
    assert_eq!(allow["subject"], AGENT);
    assert_eq!(allow["task_id"], body["task_id"]);
    assert_eq!(allow["jti"], c["jti"]);
    assert_eq!(allow["scopes_granted"], json!(["repo:read"]));
    assert_eq!(allow["ttl"], 300);
    assert_eq!(allow["policies"], json!(["agent-read"]));
    assert_eq!(
        allow["policy_version"],
        app.broker.policy.current().version()
    );
    assert_eq!(allow["source_ip"], "127.0.0.1");
    let text = app.audit_text();
    assert!(!text.contains(token) && !text.contains(&svid));
    // Intact, and at least as long as what was read above (a checkpoint may have followed).
    let v = writ::audit::verify_file(&app.path("audit.jsonl")).unwrap();
    assert!(
        matches!(&v, writ::audit::Verification::Intact(r) if r.records >= records.len() as u64),
        "{v:?}"
    );
}

#[tokio::test]
async fn ttl_is_the_minimum_of_request_policy_config_and_deadline() {
    let app = spawn_app().await;
    // Request below every cap.
    let (_, v) = app
        .exchange(&app.svid(AGENT), "repo:read", &[("expires_in", "60")])
        .await;
    assert_eq!(v["expires_in"], 60);
    // Request above the policy cap (5m): capped, never extended.
    let (_, v) = app
        .exchange(&app.svid(AGENT), "repo:read", &[("expires_in", "3600")])
        .await;
    assert_eq!(v["expires_in"], 300);
    // Two scopes: the smaller policy cap (repo:write, 2m) wins.
    let (_, v) = app
        .exchange(&app.svid(AGENT), "repo:read repo:write", &[])
        .await;
    assert_eq!(v["expires_in"], 120);
    let task = v["task_id"].as_str().unwrap().to_string();
    // Near the task deadline (1h), the deadline wins.
    app.clock.advance(3600 - 30);
    let (s, v) = app
        .exchange(&app.svid(AGENT), "repo:read", &[("task_id", &task)])
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["expires_in"], 30);
    assert_eq!(
        claims_of(v["access_token"].as_str().unwrap())["exp"],
        app.clock.now() + 30
    );
}

#[tokio::test]
async fn config_max_ttl_is_a_hard_ceiling() {
    let app = spawn_app_with(Options {
        extra_config: String::new(),
        ..Options::default()
    })
    .await;
    // tokens.max_ttl in the harness is 15m, above the policy cap; lower it through a config
    // with a 1m ceiling instead.
    drop(app);
    let app = spawn_app_with(Options::default()).await;
    let text = app
        .config_text
        .replace("max_ttl = \"15m\"", "max_ttl = \"1m\"")
        .replace("default_ttl = \"5m\"", "default_ttl = \"1m\"");
    // A broker of its own beside the running one: its own decision log.
    let text = text.replace("audit.jsonl", "audit-2.jsonl");
    let config = writ::config::Config::from_toml_with_env(&text, Vec::new()).unwrap();
    let broker = writ::broker::Broker::build(config).await.unwrap();
    assert_eq!(broker.limits.max_ttl_secs, 60);
    let req = writ::exchange::ExchangeRequest {
        subject_token: app.svid(AGENT).into(),
        subject_token_type: writ::exchange::SubjectTokenType::Jwt,
        scopes: writ::domain::parse_scopes("repo:read").unwrap(),
        audiences: vec![writ::domain::Audience::parse(API).unwrap()],
        purpose: String::new(),
        task_id: None,
        expires_in: Some(900),
        source_ip: None,
        actor_token: None,
        approval_id: None,
        dpop: None,
        flow: writ::exchange::Flow::Exchange,
        client_id: None,
        peer: None,
    };
    let resp = broker.exchange(req).await.unwrap();
    assert_eq!(resp.expires_in, 60);
}

#[tokio::test]
async fn every_signing_algorithm_issues_verifiable_tokens() {
    for (alg, name) in [
        (KeyAlg::Es256, "ES256"),
        (KeyAlg::Ed25519, "EdDSA"),
        (KeyAlg::Rs256, "RS256"),
    ] {
        let app = spawn_app_with(Options {
            signing_alg: alg,
            ..Options::default()
        })
        .await;
        let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
        let token = v["access_token"].as_str().unwrap();
        assert_eq!(header_of(token)["alg"], name);
        let (_, jwks) = app.get("/oauth2/jwks").await;
        assert_eq!(jwks["keys"][0]["alg"], name);
        assert_eq!(jwks["keys"][0]["kid"], header_of(token)["kid"]);
    }
}

#[tokio::test]
async fn minting_into_a_task_and_its_refusals() {
    let app = spawn_app_with(Options {
        max_tokens: 3,
        ..Options::default()
    })
    .await;
    let (s, v) = app
        .exchange(&app.svid(AGENT), "repo:read repo:write", &[])
        .await;
    assert_eq!(s, 200, "{v}");
    let task = v["task_id"].as_str().unwrap().to_string();

    // Same subject, same task: a second and third token.
    for _ in 0..2 {
        let (s, v2) = app
            .exchange(&app.svid(AGENT), "repo:read", &[("task_id", &task)])
            .await;
        assert_eq!(s, 200, "{v2}");
        assert_eq!(v2["task_id"], task.as_str());
    }
    // Over budget (3 tokens).
    let e = app
        .expect_error(
            &app.svid(AGENT),
            "repo:read",
            &[("task_id", &task)],
            400,
            "invalid_grant",
        )
        .await;
    assert!(
        e["error_description"].as_str().unwrap().contains("budget"),
        "{e}"
    );

    // Task of another subject.
    let other = "spiffe://example.org/agent/other";
    let (s, v) = app.exchange(&app.svid(other), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let other_task = v["task_id"].as_str().unwrap().to_string();
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("task_id", &other_task)],
        400,
        "invalid_grant",
    )
    .await;

    // Unknown task, and a malformed task id.
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("task_id", "tsk_AAAAAAAAAAAAAAAAAAAAAA")],
        400,
        "invalid_grant",
    )
    .await;
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("task_id", "nope")],
        400,
        "invalid_request",
    )
    .await;

    // Escalation: a scope the task was not first granted, even one policy allows.
    let (s, v) = app
        .exchange(&app.svid(other), "repo:read", &[("task_id", &other_task)])
        .await;
    assert_eq!(s, 200, "{v}");
    app.expect_error(
        &app.svid(other),
        "repo:write",
        &[("task_id", &other_task)],
        400,
        "invalid_scope",
    )
    .await;
    assert!(app.audit_text().contains("escalation"));

    // Ended task: close it in the store, then mint.
    app.broker
        .store
        .close_task(
            &writ::domain::TaskId::parse(&other_task).unwrap(),
            writ::store::TaskState::Ended,
            "done",
            app.clock.now(),
        )
        .await
        .unwrap();
    app.expect_error(
        &app.svid(other),
        "repo:read",
        &[("task_id", &other_task)],
        400,
        "invalid_grant",
    )
    .await;

    // A task past its deadline is ended too.
    let (_, v) = app.exchange(&app.svid(other), "repo:read", &[]).await;
    let t = v["task_id"].as_str().unwrap().to_string();
    app.clock.advance(3601);
    app.expect_error(
        &app.svid(other),
        "repo:read",
        &[("task_id", &t)],
        400,
        "invalid_grant",
    )
    .await;
    app.assert_still_serving().await;
}

#[tokio::test]
async fn policy_denial_is_invalid_scope_with_no_silent_narrowing() {
    let app = spawn_app().await;
    let e = app
        .expect_error(
            &app.svid(AGENT),
            "repo:read repo:admin",
            &[],
            400,
            "invalid_scope",
        )
        .await;
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("repo:admin")
    );
    // A workload outside /agent/* is refused repo:read.
    app.expect_error(
        &app.svid("spiffe://example.org/ci/job"),
        "repo:read",
        &[],
        400,
        "invalid_scope",
    )
    .await;
    let records = app.audit_records();
    let deny = records
        .iter()
        .rev()
        .find(|r| r["decision"] == "deny")
        .unwrap();
    assert_eq!(deny["subject"], "spiffe://example.org/ci/job");
    assert_eq!(
        deny["policy_version"],
        app.broker.policy.current().version()
    );
    assert!(deny["reason"].as_str().unwrap().contains("repo:read"));
    app.assert_still_serving().await;
}

#[tokio::test]
async fn bad_subject_tokens_are_invalid_request() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let kid = app.svid_key.kid.clone();
    let other_key =
        SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "o").unwrap();
    let claims = json!({"sub": AGENT, "aud": [AUD], "iat": now, "exp": now + 300});

    let hs256 = {
        // HS256 keyed with the public key, hoping the verifier uses it as an HMAC secret.
        let header = json!({"alg": "HS256", "kid": kid, "typ": "JWT"});
        let signing_input = format!(
            "{}.{}",
            base64_url(&header.to_string()),
            base64_url(&claims.to_string())
        );
        let secret = app.svid_key.jwk().to_string();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = ring::hmac::sign(&key, signing_input.as_bytes());
        format!("{signing_input}.{}", base64_url_bytes(tag.as_ref()))
    };

    let cases: Vec<(&str, String)> = vec![
        ("expired", app.svid_with(json!({"exp": now - 120}))),
        ("not yet valid", app.svid_with(json!({"nbf": now + 600}))),
        (
            "wrong audience",
            app.svid_with(json!({"aud": ["someone-else"]})),
        ),
        ("no exp", app.svid_with(json!({"exp": null}))),
        (
            "unknown trust domain",
            app.svid("spiffe://other.org/agent/demo"),
        ),
        (
            "wrong key",
            sign_jwt(&json!({"alg": "ES256", "kid": kid}), &claims, &other_key),
        ),
        (
            "alg none",
            raw_jwt(&json!({"alg": "none", "kid": kid}), &claims, b""),
        ),
        ("HS256 with the public key", hs256),
        ("garbage", "not-a-jwt".to_string()),
        ("garbage with dots", "a.b.c".to_string()),
        (
            "non-SPIFFE sub",
            app.svid_with(json!({"sub": "agent-demo"})),
        ),
        (
            "dot segment",
            app.svid_with(json!({"sub": "spiffe://example.org/agent/../admin"})),
        ),
        (
            "uppercase trust domain",
            app.svid_with(json!({"sub": "spiffe://Example.org/agent/demo"})),
        ),
        (
            "percent-encoded",
            app.svid_with(json!({"sub": "spiffe://example.org/agent/%64emo"})),
        ),
        (
            "missing kid",
            sign_jwt(&json!({"alg": "ES256"}), &claims, &app.svid_key),
        ),
        (
            "EdDSA is not a JWT-SVID algorithm",
            raw_jwt(&json!({"alg": "EdDSA", "kid": kid}), &claims, &[0u8; 64]),
        ),
        (
            "oversized token",
            format!("{}.{}.x", "a".repeat(9000), "b".repeat(9000)),
        ),
    ];
    for (name, token) in cases {
        let (s, v) = app.exchange(&token, "repo:read", &[]).await;
        assert_eq!(
            (s, v["error"].as_str().unwrap_or("")),
            (400, "invalid_request"),
            "{name}: {v}"
        );
        // Nothing about why leaks to the caller.
        assert_eq!(
            v["error_description"], "subject_token is not valid",
            "{name}"
        );
    }
    // Within the 60 s skew an expired SVID is still accepted.
    let (s, v) = app
        .exchange(&app.svid_with(json!({"exp": now - 30})), "repo:read", &[])
        .await;
    assert_eq!(s, 200, "{v}");
    app.assert_still_serving().await;
    // Refusals are recorded without the token.
    let text = app.audit_text();
    assert!(text.contains("subject token refused: token has expired"));
    assert!(!text.contains("not-a-jwt"));
}

fn base64_url(s: &str) -> String {
    base64_url_bytes(s.as_bytes())
}

fn base64_url_bytes(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[tokio::test]
async fn malformed_requests_get_their_exact_error() {
    let app = spawn_app().await;
    let svid = app.svid(AGENT);
    let base = |extra: &[(&'static str, &str)]| {
        let mut v: Vec<(String, String)> = vec![
            ("grant_type".into(), GRANT.into()),
            ("subject_token".into(), svid.clone()),
            ("subject_token_type".into(), JWT_TYPE.into()),
            ("scope".into(), "repo:read".into()),
            ("audience".into(), API.into()),
        ];
        for (k, val) in extra {
            v.retain(|(name, _)| name != k);
            v.push((k.to_string(), val.to_string()));
        }
        v
    };
    let post = |pairs: Vec<(String, String)>| {
        let body = serde_urlencoded::to_string(&pairs).unwrap();
        app.post_raw("/oauth2/token", "application/x-www-form-urlencoded", body)
    };
    type Case<'a> = (&'a str, Vec<(String, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown grant_type",
            base(&[("grant_type", "password")]),
            400,
            "unsupported_grant_type",
        ),
        (
            "missing grant_type",
            base(&[])
                .into_iter()
                .filter(|(k, _)| k != "grant_type")
                .collect(),
            400,
            "invalid_request",
        ),
        (
            "unsupported subject_token_type",
            base(&[(
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:saml2",
            )]),
            400,
            "invalid_request",
        ),
        (
            "missing subject_token",
            base(&[])
                .into_iter()
                .filter(|(k, _)| k != "subject_token")
                .collect(),
            400,
            "invalid_request",
        ),
        ("empty scope", base(&[("scope", "")]), 400, "invalid_scope"),
        (
            "missing scope",
            base(&[])
                .into_iter()
                .filter(|(k, _)| k != "scope")
                .collect(),
            400,
            "invalid_scope",
        ),
        (
            "malformed scope",
            base(&[("scope", "repo:read  repo:write")]),
            400,
            "invalid_scope",
        ),
        (
            "malformed audience",
            base(&[("audience", "not a uri")]),
            400,
            "invalid_target",
        ),
        (
            "relative audience",
            base(&[("audience", "/api")]),
            400,
            "invalid_target",
        ),
        (
            "audience with fragment",
            base(&[("audience", "https://api.example.org/#x")]),
            400,
            "invalid_target",
        ),
        (
            "audience over 255 bytes",
            base(&[(
                "audience",
                &format!("https://api.example.org/{}", "a".repeat(240)),
            )]),
            400,
            "invalid_target",
        ),
        (
            "bad requested_token_type",
            base(&[(
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:refresh_token",
            )]),
            400,
            "invalid_request",
        ),
        (
            "bad expires_in",
            base(&[("expires_in", "-5")]),
            400,
            "invalid_request",
        ),
        (
            "purpose over 1 KiB",
            base(&[("task_purpose", &"p".repeat(1025))]),
            400,
            "invalid_request",
        ),
    ];
    for (name, pairs, status, code) in cases {
        let (s, v, h) = post(pairs).await;
        assert_eq!(
            (s, v["error"].as_str().unwrap_or("")),
            (status, code),
            "{name}: {v}"
        );
        assert_eq!(h["cache-control"], "no-store", "{name}");
    }

    // Repeated parameters (other than audience/resource).
    let mut pairs = base(&[]);
    pairs.push(("scope".into(), "repo:write".into()));
    let (s, v, _) = post(pairs).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
    assert!(v["error_description"].as_str().unwrap().contains("scope"));

    // JSON instead of a form.
    let (s, v, _) = app
        .post_raw(
            "/oauth2/token",
            "application/json",
            json!({"grant_type": GRANT}).to_string(),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );

    // A body over 64 KiB.
    let big = format!(
        "{}&pad={}",
        serde_urlencoded::to_string(base(&[])).unwrap(),
        "x".repeat(70 * 1024)
    );
    let (s, v, _) = app
        .post_raw("/oauth2/token", "application/x-www-form-urlencoded", big)
        .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap_or("")),
        (413, "invalid_request"),
        "{v}"
    );

    // No audience and no default audience.
    let pairs: Vec<(String, String)> = base(&[])
        .into_iter()
        .filter(|(k, _)| k != "audience")
        .collect();
    let (s, v, _) = post(pairs).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_target"),
        "{v}"
    );

    // audience and resource may repeat, and both land in `aud`.
    let mut pairs = base(&[]);
    pairs.push(("resource".into(), "spiffe://example.org/svc/db".into()));
    let (s, v, _) = post(pairs).await;
    assert_eq!(s, 200, "{v}");
    let aud = claims_of(v["access_token"].as_str().unwrap())["aud"].clone();
    assert_eq!(aud, json!([API, "spiffe://example.org/svc/db"]));
    app.assert_still_serving().await;
}

#[tokio::test]
async fn default_audience_applies_when_none_is_requested() {
    let app = spawn_app().await;
    let text = app.config_text.replace(
        "max_ttl = \"15m\"",
        "max_ttl = \"15m\"\ndefault_audience = \"https://default.example.org\"",
    );
    // A broker of its own beside the running one: its own decision log.
    let text = text.replace("audit.jsonl", "audit-2.jsonl");
    let config = writ::config::Config::from_toml_with_env(&text, Vec::new()).unwrap();
    let broker = writ::broker::Broker::build(config).await.unwrap();
    let req = writ::exchange::ExchangeRequest {
        subject_token: app.svid(AGENT).into(),
        subject_token_type: writ::exchange::SubjectTokenType::Jwt,
        scopes: writ::domain::parse_scopes("repo:read").unwrap(),
        audiences: vec![],
        purpose: String::new(),
        task_id: None,
        expires_in: None,
        source_ip: None,
        actor_token: None,
        approval_id: None,
        dpop: None,
        flow: writ::exchange::Flow::Exchange,
        client_id: None,
        peer: None,
    };
    let resp = broker.exchange(req).await.unwrap();
    assert_eq!(
        claims_of(&resp.access_token)["aud"],
        "https://default.example.org"
    );
}

#[tokio::test]
async fn delegation_narrows_and_records_the_actor() {
    let app = spawn_app().await;
    let (_, v) = app
        .exchange(&app.svid(AGENT), "repo:read repo:write", &[])
        .await;
    let parent_task = v["task_id"].as_str().unwrap().to_string();
    let grant = app
        .grant_for_delegate(AGENT, &parent_task, "repo:read repo:write")
        .await;
    let delegate = |scope: &'static str, token: String| {
        let app = &app;
        async move { app.delegate(&token, scope).await }
    };
    let (s, v) = delegate("repo:read", grant.clone()).await;
    assert_eq!(s, 200, "{v}");
    let child = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(child["sub"], AGENT);
    assert_eq!(child["client_id"], DELEGATE);
    assert_eq!(child["act"], json!({"sub": DELEGATE}));
    assert_ne!(child["txn"], parent_task.as_str());
    // The delegate policy does not permit repo:write.
    let (s, v) = delegate("repo:write", grant.clone()).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_scope"),
        "{v}"
    );
    // A scope the grant never had is refused before policy.
    let (s, v) = delegate("tickets:read", grant.clone()).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_scope"),
        "{v}"
    );
    // A forged task token is not valid.
    let (s, v) = delegate("repo:read", format!("{grant}x")).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
    // Once the parent task is closed, delegation is refused.
    app.broker
        .store
        .close_task(
            &writ::domain::TaskId::parse(&parent_task).unwrap(),
            writ::store::TaskState::Ended,
            "done",
            app.clock.now(),
        )
        .await
        .unwrap();
    let (s, v) = delegate("repo:read", grant).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
}

/// A JWT-SVID for `AGENT` signed by `key`; `n` makes each one distinct, so no verification
/// result can be reused from an earlier check.
fn svid_signed_by(app: &TestApp, key: &SigningKey, n: i64) -> String {
    let now = app.clock.now();
    let claims = json!({"sub": AGENT, "aud": [AUD], "iat": now, "exp": now + 300 + n});
    sign_jwt(&json!({"alg": "ES256", "kid": key.kid}), &claims, key)
}

/// Replaces the trust bundle file. The watcher notices a change by size and modification
/// time, so consecutive writes are spaced apart.
fn replace_bundle(app: &TestApp, contents: Option<&[&SigningKey]>) {
    std::thread::sleep(std::time::Duration::from_millis(20));
    match contents {
        Some(keys) => write_bundle(&app.path("bundle.json"), keys),
        None => std::fs::write(app.path("bundle.json"), "{broken").unwrap(),
    }
}

/// Exchanges fresh tokens signed by `key` until one is accepted, within `limit`.
async fn accepted_within(app: &TestApp, key: &SigningKey, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < limit {
        n += 1;
        if app
            .exchange(&svid_signed_by(app, key, n), "repo:read", &[])
            .await
            .0
            == 200
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

fn new_key(name: &str) -> SigningKey {
    SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), name).unwrap()
}

#[tokio::test]
async fn trust_bundle_changes_are_picked_up() {
    // The watcher re-reads bundle files once a second.
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(1);
    let app = spawn_app().await;
    let second = new_key("second");
    // Before the rotation a token signed by the new key is refused.
    app.expect_error(
        &svid_signed_by(&app, &second, 0),
        "repo:read",
        &[],
        400,
        "invalid_request",
    )
    .await;
    // Rotate: the bundle now holds only the new key; the watcher picks it up.
    replace_bundle(&app, Some(&[&second]));
    assert!(
        accepted_within(&app, &second, 5 * PERIOD).await,
        "the rotated bundle was not picked up"
    );
    // The old key is gone.
    app.expect_error(&app.svid(AGENT), "repo:read", &[], 400, "invalid_request")
        .await;

    // A broken bundle file keeps the last good bundle serving: for longer than two watcher
    // periods, so the watcher has read the broken file, every new token from the current key
    // is accepted.
    replace_bundle(&app, None);
    let start = std::time::Instant::now();
    let mut n = 1000;
    while start.elapsed() < 2 * PERIOD + PERIOD / 2 {
        n += 1;
        let (s, v) = app
            .exchange(&svid_signed_by(&app, &second, n), "repo:read", &[])
            .await;
        assert_eq!(
            s,
            200,
            "after {:?} with a broken file: {v}",
            start.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The watcher is still running, so it did see the broken file in that time: a good file
    // written after it is picked up, and the key it dropped is refused.
    let third = new_key("third");
    replace_bundle(&app, Some(&[&third]));
    assert!(
        accepted_within(&app, &third, 5 * PERIOD).await,
        "the watcher stopped after the broken bundle"
    );
    app.expect_error(
        &svid_signed_by(&app, &second, 0),
        "repo:read",
        &[],
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn thousands_of_audiences_are_refused_at_the_bound() {
    let app = spawn_app().await;
    // 3,400 distinct, well-formed audiences in one body under 64 KiB.
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut body = serde_urlencoded::to_string([
        ("grant_type", GRANT),
        ("subject_token", &app.svid(AGENT)),
        ("subject_token_type", JWT_TYPE),
        ("scope", "repo:read"),
    ])
    .unwrap();
    for i in 0..3400usize {
        let d = |n: usize| char::from(*DIGITS.get(n % DIGITS.len()).unwrap());
        let id: String = [d(i / (62 * 62)), d(i / 62), d(i)].iter().collect();
        body.push_str(&format!("&audience=urn:{id}"));
    }
    assert!(body.len() < 64 * 1024, "{}", body.len());
    let started = std::time::Instant::now();
    let (s, v, _) = app
        .post_raw("/oauth2/token", "application/x-www-form-urlencoded", body)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(
        (s, v["error"].as_str().unwrap_or("")),
        (400, "invalid_target"),
        "{v}"
    );
    assert_eq!(
        v["error_description"],
        "at most 8 audiences may be requested"
    );
    eprintln!("3,400 audiences refused in {elapsed:?}");
    app.assert_still_serving().await;
}
