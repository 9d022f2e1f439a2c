//! Conformance with the RFCs where they are stricter or looser than a first reading of our
//! SPEC: error descriptions, empty and unknown parameters, default scope, error codes for bad
//! subject tokens, and revocation hints.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// RFC 6749 §5.2: `error_description` is limited to %x20-21 / %x23-5B / %x5D-7E.
fn assert_description_is_clean(v: &Value) {
    let d = v["error_description"].as_str().unwrap_or("");
    assert!(
        d.chars()
            .all(|c| matches!(c, '\x20'..='\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e')),
        "a disallowed character in {d:?}"
    );
}

const HOSTILE: &str = "x\"\\\u{e9}\n\u{7f}<\u{202e}";

#[tokio::test]
async fn error_descriptions_never_carry_disallowed_characters() {
    let app = spawn_app().await;
    let svid = app.svid(AGENT);
    let base = |name: &'static str, value: &'static str| {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", GRANT),
            ("subject_token", "s"),
            ("subject_token_type", JWT_TYPE),
            ("scope", "repo:read"),
        ];
        form.retain(|(n, _)| *n != name);
        form.push((name, value));
        form
    };
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (base("grant_type", HOSTILE), "unsupported_grant_type"),
        (base("subject_token_type", HOSTILE), "invalid_request"),
        (base("requested_token_type", HOSTILE), "invalid_request"),
        (base("task_id", HOSTILE), "invalid_request"),
        (base("expires_in", HOSTILE), "invalid_request"),
        (base("audience", HOSTILE), "invalid_target"),
        (base("resource", HOSTILE), "invalid_target"),
        (base("scope", HOSTILE), "invalid_scope"),
        (base("subject_token", HOSTILE), "invalid_request"),
    ];
    for (form, code) in cases {
        let (s, v, _) = app.post_form("/oauth2/token", &form).await;
        assert_eq!((s, v["error"].as_str().unwrap_or("")), (400, code), "{v}");
        assert_description_is_clean(&v);
        // The value is never echoed, not even cleaned up.
        assert!(
            !v["error_description"].as_str().unwrap().contains("x\""),
            "{v}"
        );
    }
    // Policy refusals name the scopes, which are checked characters already.
    let (s, v) = app.exchange(&svid, "repo:admin", &[]).await;
    assert_eq!((s, v["error"].as_str().unwrap()), (400, "invalid_scope"));
    assert_description_is_clean(&v);
}

/// RFC 6749 §3.1: a parameter sent without a value is treated as omitted.
#[tokio::test]
async fn empty_parameters_count_as_absent() {
    let app = spawn_app().await;
    for name in [
        "requested_token_type",
        "actor_token",
        "actor_token_type",
        "task_id",
        "expires_in",
        "task_purpose",
    ] {
        let (s, v) = app
            .exchange(&app.svid(AGENT), "repo:read", &[(name, "")])
            .await;
        assert_eq!(s, 200, "{name}: {v}");
    }
    // An empty audience beside a real one: the real one is used.
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "repo:read",
            &[("audience", ""), ("resource", API)],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // At revoke, an empty hint.
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = revoke(&app, &[("token", &token), ("token_type_hint", "")]).await;
    assert_eq!((s, v), (200, json!({})));
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    // A required parameter that is empty is still missing.
    let e = app
        .expect_error(&app.svid(AGENT), "", &[], 400, "invalid_scope")
        .await;
    assert_description_is_clean(&e);
}

async fn revoke(app: &TestApp, form: &[(&str, &str)]) -> (u16, Value) {
    app.call(
        Method::POST,
        "/oauth2/revoke",
        None,
        Some((
            "application/x-www-form-urlencoded",
            serde_urlencoded::to_string(form).unwrap(),
        )),
    )
    .await
}

/// RFC 6749 §3.3: no `scope` and no default is `invalid_scope`.
#[tokio::test]
async fn a_missing_scope_without_a_default_is_invalid_scope() {
    let app = spawn_app().await;
    let svid = app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("audience", API),
    ];
    let (s, v, h) = app.post_form("/oauth2/token", &form).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_scope"),
        "{v}"
    );
    assert_eq!(h["cache-control"], "no-store");
}

#[tokio::test]
async fn a_missing_scope_takes_the_configured_default() {
    let first = spawn_app().await;
    let app = spawn_edited(&first, |t| {
        t.replace(
            "[tokens]\n",
            "[tokens]\ndefault_scope = \"repo:read tickets:read\"\n",
        )
    })
    .await;
    let svid = app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("audience", API),
    ];
    let (s, v, _) = app.post_form("/oauth2/token", &form).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["scope"], "repo:read tickets:read");
    // An explicit scope still wins.
    let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
    assert_eq!((s, v["scope"].as_str().unwrap()), (200, "repo:read"));
}

#[test]
fn a_malformed_default_scope_is_refused_naming_the_key() {
    for bad in ["", "a  b", "a\"b", "a\\b"] {
        let text = format!(
            "[server]\nissuer = \"https://writ.example.org\"\n[tokens]\nsigning_keys = [\"k.pem\"]\ndefault_scope = {}\n[policy]\ndir = \"p\"\n",
            serde_json::to_string(bad).unwrap()
        );
        let e = writ::config::Config::from_toml_with_env(&text, Vec::new()).unwrap_err();
        assert_eq!(e.key, "tokens.default_scope", "{bad:?}: {e}");
    }
}

/// RFC 6749 §3.2: unknown parameters are ignored, repeated or not; known ones may not repeat.
#[tokio::test]
async fn unknown_parameters_are_ignored_even_repeated() {
    let app = spawn_app().await;
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "repo:read",
            &[("x_trace", "1"), ("x_trace", "2"), ("client_id", "a")],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for name in ["scope", "subject_token_type", "task_purpose", "expires_in"] {
        let e = app
            .expect_error(
                &app.svid(AGENT),
                "repo:read",
                &[(name, "repo:read"), (name, "repo:read")],
                400,
                "invalid_request",
            )
            .await;
        assert!(
            e["error_description"].as_str().unwrap().contains(name),
            "{e}"
        );
    }
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = revoke(&app, &[("token", &token), ("x", "1"), ("x", "2")]).await;
    assert_eq!((s, v), (200, json!({})));
    let (s, v) = revoke(&app, &[("token", &token), ("token", &token)]).await;
    assert_eq!((s, v["error"].as_str().unwrap()), (400, "invalid_request"));
}

/// RFC 8693 §2.2.2: an unacceptable subject token is `invalid_request`.
#[tokio::test]
async fn a_revoked_or_ended_task_token_as_subject_is_invalid_request() {
    let app = spawn_app().await;
    let (revoked, _) = app.task_token(AGENT, "repo:read").await;
    let (s, _) = revoke(&app, &[("token", &revoked)]).await;
    assert_eq!(s, 200);
    let (s, v) = app.delegate(&revoked, "repo:read").await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );

    let (ended, task) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .call(
            Method::POST,
            &format!("/v1/tasks/{task}/end"),
            Some(&ended),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = app.delegate(&ended, "repo:read").await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
    // Garbage as a task token.
    let (s, v) = app.delegate("garbage", "repo:read").await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
}

/// RFC 7009 §2.1: a hint that does not match is ignored and the token searched everywhere.
#[tokio::test]
async fn revocation_ignores_a_wrong_or_unknown_hint() {
    let app = spawn_app().await;
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = revoke(
        &app,
        &[("token", &token), ("token_type_hint", "refresh_token")],
    )
    .await;
    assert_eq!((s, v), (200, json!({})));
    assert_eq!(app.introspect(&token).await, json!({"active": false}));
    for hint in ["refresh_token", "access_token", "nonsense"] {
        let (s, v) = revoke(&app, &[("token", "garbage"), ("token_type_hint", hint)]).await;
        assert_eq!((s, v), (200, json!({})), "{hint}");
    }
}

const BILLING: &str = "spiffe://example.org/resource/billing";
const BILLING_API: &str = "https://billing.example.org";

/// RFC 7662 §4: a resource server mapped to its audiences sees other tokens as inactive.
#[tokio::test]
async fn a_mapped_introspector_sees_only_tokens_for_its_audiences() {
    let app = spawn_app_with(Options {
        extra_config: format!(
            "[[introspection.resources]]\nprincipal = \"{BILLING}\"\naudiences = [\"{BILLING_API}\"]\n"
        ),
        ..Options::default()
    })
    .await;
    let (for_api, _) = app.task_token(AGENT, "repo:read").await;
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "repo:read",
            &[("audience", API), ("audience", BILLING_API)],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let for_both = v["access_token"].as_str().unwrap().to_string();

    let billing = app.svid(BILLING);
    let (s, v) = app.introspect_as(&billing, &for_api).await;
    assert_eq!((s, v), (200, json!({"active": false})));
    let (s, v) = app.introspect_as(&billing, &for_both).await;
    assert_eq!((s, v["active"].as_bool()), (200, Some(true)), "{v}");
    // Unmapped introspection principals, admin principals and admin tokens see all.
    for caller in [
        app.svid(RESOURCE),
        app.svid(SECURITY),
        ADMIN_TOKEN.to_string(),
    ] {
        let (s, v) = app.introspect_as(&caller, &for_api).await;
        assert_eq!((s, v["active"].as_bool()), (200, Some(true)), "{v}");
    }
}

#[test]
fn introspection_resources_are_validated_naming_the_key() {
    let cases = [
        (
            "principal = \"spiffe://example.org/resource/*\"\naudiences = [\"https://a.org\"]",
            "introspection.resources[0].principal",
        ),
        (
            "principal = \"spiffe://example.org/r\"\naudiences = []",
            "introspection.resources[0].audiences",
        ),
        (
            "principal = \"spiffe://example.org/r\"\naudiences = [\"not a uri\"]",
            "introspection.resources[0].audiences",
        ),
    ];
    for (entry, key) in cases {
        let text = format!(
            "[server]\nissuer = \"https://writ.example.org\"\n[tokens]\nsigning_keys = [\"k.pem\"]\n[policy]\ndir = \"p\"\n[[introspection.resources]]\n{entry}\n"
        );
        let e = writ::config::Config::from_toml_with_env(&text, Vec::new()).unwrap_err();
        assert!(e.key.starts_with(key), "{entry}: {e:?}");
    }
}

/// RFC 8414 §3.1: an issuer with a path has its metadata at the well-known path followed by
/// the issuer's path, and every endpoint it advertises is served.
#[tokio::test]
async fn an_issuer_with_a_path_serves_its_metadata_and_endpoints() {
    let first = spawn_app().await;
    let app = spawn_edited(&first, |t| {
        t.replace(
            "issuer = \"https://writ.test\"",
            "issuer = \"https://writ.test/writ\"",
        )
    })
    .await;
    let (s, m) = app
        .get("/.well-known/oauth-authorization-server/writ")
        .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["issuer"], "https://writ.test/writ");
    assert_eq!(m["token_endpoint"], "https://writ.test/writ/oauth2/token");
    assert_eq!(m["jwks_uri"], "https://writ.test/writ/oauth2/jwks");
    assert!(m.get("response_types_supported").is_none(), "{m}");
    assert_eq!(
        m["scopes_supported"],
        json!(["ci:deploy", "repo:read", "repo:write", "tickets:read"])
    );
    // The root metadata stays.
    let (s, root) = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!((s, &root["issuer"]), (200, &m["issuer"]));
    // Every advertised endpoint is served under the path.
    for key in [
        "token_endpoint",
        "jwks_uri",
        "introspection_endpoint",
        "revocation_endpoint",
    ] {
        let path = m[key]
            .as_str()
            .unwrap()
            .strip_prefix("https://writ.test")
            .unwrap();
        let status = app
            .http
            .request(
                if key == "jwks_uri" {
                    Method::GET
                } else {
                    Method::POST
                },
                format!("{}{path}", app.base),
            )
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_ne!(status, 404, "{key} {path}");
    }
    let svid = app.svid(AGENT);
    let (s, v, _) = app
        .post_form(
            "/writ/oauth2/token",
            &[
                ("grant_type", GRANT),
                ("subject_token", &svid),
                ("subject_token_type", JWT_TYPE),
                ("scope", "repo:read"),
                ("audience", API),
            ],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(c["iss"], "https://writ.test/writ");
    // The root routes stay.
    app.assert_still_serving().await;
}

#[tokio::test]
async fn metadata_lists_the_policy_scopes_and_no_empty_response_types() {
    let app = spawn_app().await;
    let (s, m) = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(s, 200, "{m}");
    assert!(m.get("response_types_supported").is_none(), "{m}");
    assert_eq!(
        m["scopes_supported"],
        json!(["ci:deploy", "repo:read", "repo:write", "tickets:read"])
    );
    assert_eq!(
        app.get("/.well-known/oauth-authorization-server/writ")
            .await
            .0,
        404
    );
}

#[test]
fn an_issuer_path_that_cannot_be_served_is_refused_naming_the_key() {
    for issuer in [
        "https://h.example/writ/",
        "https://h.example/a%20b",
        "https://h.example/a/../b",
        "https://h.example/oauth2",
        "https://h.example/x{y}",
    ] {
        let text = format!(
            "[server]\nissuer = \"{issuer}\"\n[tokens]\nsigning_keys = [\"k.pem\"]\n[policy]\ndir = \"p\"\n"
        );
        let e = writ::config::Config::from_toml_with_env(&text, Vec::new()).unwrap_err();
        assert_eq!(e.key, "server.issuer", "{issuer}: {e:?}");
    }
}

/// RFC 7515 §4.1.11 and JWT-SVID §3.2: a `crit` header is refused (Writ understands no
/// extension), and a JWT-SVID's `typ`, when present, is `JWT` or `JOSE`.
#[tokio::test]
async fn svid_headers_with_crit_or_a_foreign_typ_are_refused() {
    let app = spawn_app().await;
    let now = writ::domain::Clock::now(&*app.clock);
    let claims = json!({"sub": AGENT, "aud": [AUD], "iat": now, "exp": now + 300});
    let kid = app.svid_key.kid.clone();
    let with_header = |header: Value| sign_jwt(&header, &claims, &app.svid_key);
    for header in [
        json!({"alg": "ES256", "kid": kid, "typ": "JWT", "crit": ["exp"], "exp": now + 60}),
        json!({"alg": "ES256", "kid": kid, "crit": []}),
        json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"}),
        json!({"alg": "ES256", "kid": kid, "typ": "dpop+jwt"}),
    ] {
        app.expect_error(
            &with_header(header),
            "repo:read",
            &[],
            400,
            "invalid_request",
        )
        .await;
    }
    for header in [
        json!({"alg": "ES256", "kid": kid, "typ": "JOSE"}),
        json!({"alg": "ES256", "kid": kid, "typ": "jwt"}),
        json!({"alg": "ES256", "kid": kid}),
    ] {
        let (s, v) = app.exchange(&with_header(header), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
    }
}

/// RFC 8707: `audience` and `resource` are absolute URIs by RFC 3986 (or SPIFFE IDs), taken
/// as given: what a forgiving URL parser would accept or rewrite is refused.
#[tokio::test]
async fn audiences_must_be_rfc3986_absolute_uris() {
    let app = spawn_app().await;
    let svid = app.svid(AGENT);
    for bad in [
        "https://a.org/<script>",
        "https://api/{\"x\"}|^",
        "https://a.org/%zz",
        "https://a.org/%4",
        "https:\\\\evil.org",
        "https://a.org/a`b",
        "1https://a.org",
        "https://a.org/#frag",
    ] {
        app.expect_error(
            &svid,
            "repo:read",
            &[("audience", bad)],
            400,
            "invalid_target",
        )
        .await;
        app.expect_error(
            &svid,
            "repo:read",
            &[("resource", bad)],
            400,
            "invalid_target",
        )
        .await;
    }
    for good in [
        "urn:example:api",
        "https://a.org/p%20q",
        "https://api.example.org",
        "https://a.org:8443/v1/items?x=1&y=(2)",
        "spiffe://example.org/resource/billing",
    ] {
        let (s, v) = app
            .exchange(&svid, "repo:read", &[("audience", good)])
            .await;
        assert_eq!(s, 200, "{good}: {v}");
        assert_eq!(claims_of(v["access_token"].as_str().unwrap())["aud"], good);
    }
}

/// One request with an `Authorization` header given as is: status, `WWW-Authenticate`,
/// `Retry-After` and the `error` of the body.
async fn raw(
    app: &TestApp,
    path: &str,
    authorization: Option<&str>,
    form: &str,
) -> (u16, Option<String>, Option<String>, Value) {
    let mut req = app
        .http
        .post(format!("{}{path}", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_string());
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (challenge, retry) = (header("www-authenticate"), header("retry-after"));
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, challenge, retry, body["error"].clone())
}

/// RFC 6749 §5.2 and RFC 6750 §3.1: a client credential the broker cannot verify is
/// `invalid_client` with a Basic challenge; a missing bearer gets a challenge without an
/// error attribute; a valid caller without the privilege gets `insufficient_scope`.
#[tokio::test]
async fn challenges_name_what_is_missing() {
    let app = spawn_app().await;
    let basic = "Basic d3JpdDpzZWNyZXQ=";
    let form = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token={}&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&scope=repo%3Aread&audience=https%3A%2F%2Fapi.example.org",
        app.svid(AGENT)
    );
    for (path, body) in [
        ("/oauth2/token", form.as_str()),
        ("/oauth2/revoke", "token=x"),
    ] {
        let (s, challenge, _, error) = raw(&app, path, Some(basic), body).await;
        assert_eq!(
            (s, challenge.as_deref(), error.as_str()),
            (401, Some("Basic realm=\"writ\""), Some("invalid_client")),
            "{path}"
        );
    }
    let (s, challenge, _, error) = raw(&app, "/oauth2/introspect", None, "token=x").await;
    assert_eq!(
        (s, challenge.as_deref(), error.as_str()),
        (401, Some("Bearer realm=\"writ\""), Some("invalid_token"))
    );
    let bearer = format!("Bearer {}", app.svid("spiffe://example.org/agent/nosy"));
    let (s, challenge, _, error) = raw(&app, "/oauth2/introspect", Some(&bearer), "token=x").await;
    assert_eq!(
        (s, challenge.as_deref(), error.as_str()),
        (
            403,
            Some("Bearer error=\"insufficient_scope\""),
            Some("access_denied")
        )
    );
    let (s, challenge, _, _) =
        raw(&app, "/oauth2/introspect", Some("Bearer junk"), "token=x").await;
    assert_eq!(
        (s, challenge.as_deref()),
        (401, Some("Bearer error=\"invalid_token\""))
    );
}
