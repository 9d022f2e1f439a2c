//! DPoP at the token endpoint (RFC 9449, SPEC §4.5): every check of a proof with its exact
//! error, the binding it gives the token, the nonce challenge, the task's key, and replay
//! refused across replicas on Redis.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use writ::token::keys::{KeyAlg, SigningKey, generate_pem};

use crate::helpers::*;
use crate::redis_support::RedisServer;

const HTU: &str = "https://writ.test/oauth2/token";

fn key(alg: KeyAlg) -> SigningKey {
    SigningKey::from_pem(generate_pem(alg).unwrap().as_bytes(), "dpop").unwrap()
}

/// The public members of a key's JWK.
fn public_jwk(k: &SigningKey) -> Value {
    let mut jwk = k.jwk().clone();
    jwk.as_object_mut()
        .unwrap()
        .retain(|m, _| matches!(m.as_str(), "kty" | "crv" | "x" | "y" | "n" | "e"));
    jwk
}

fn merge(base: &mut Value, over: &Value) {
    for (k, v) in over.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
}

/// A proof signed by `k` under `alg`, with header and claim overrides (null removes).
fn proof_as(k: &SigningKey, alg: &str, now: i64, header_over: Value, claims_over: Value) -> String {
    let mut header = json!({"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(k)});
    merge(&mut header, &header_over);
    let mut claims = json!({
        "jti": B64.encode(rand_bytes()),
        "htm": "POST",
        "htu": HTU,
        "iat": now,
    });
    merge(&mut claims, &claims_over);
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    // The header's alg as written; the signature by the key's own algorithm (PS256 for an
    // RSA key when asked).
    let jalg = if alg == "PS256" {
        jsonwebtoken::Algorithm::PS256
    } else {
        k.alg.jwt_alg()
    };
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), k.encoding_key(), jalg).unwrap();
    format!("{input}.{sig}")
}

fn proof(k: &SigningKey, now: i64) -> String {
    proof_as(k, k.alg.name(), now, json!({}), json!({}))
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b
}

fn thumbprint(k: &SigningKey) -> String {
    writ::token::dpop::thumbprint(&public_jwk(k)).unwrap()
}

/// An exchange with the given `DPoP` headers; returns status, body and headers.
async fn exchange_with(
    app: &TestApp,
    dpop: &[&str],
    extra: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let svid = app.svid(AGENT);
    let mut form = vec![
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", "repo:read"),
        ("audience", API),
    ];
    form.extend_from_slice(extra);
    let mut req = app
        .http
        .post(format!("{}/oauth2/token", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(&form).unwrap());
    for p in dpop {
        req = req.header("DPoP", *p);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    (status, body, headers)
}

async fn refused(app: &TestApp, dpop: &[&str], code: &str) -> Value {
    let (s, v, _) = exchange_with(app, dpop, &[]).await;
    assert_eq!((s, v["error"].as_str().unwrap_or("")), (400, code), "{v}");
    v
}

#[tokio::test]
async fn a_proof_binds_the_token_to_its_key_with_each_algorithm() {
    let app = spawn_app().await;
    for (alg, name) in [
        (KeyAlg::Es256, "ES256"),
        (KeyAlg::Ed25519, "EdDSA"),
        (KeyAlg::Ed25519, "Ed25519"),
        (KeyAlg::Rs256, "RS256"),
        (KeyAlg::Rs256, "PS256"),
    ] {
        let k = key(alg);
        let p = proof_as(&k, name, app.broker.now(), json!({}), json!({}));
        let (s, v, _) = exchange_with(&app, &[&p], &[]).await;
        assert_eq!(s, 200, "{name}: {v}");
        assert_eq!(v["token_type"], "DPoP", "{name}");
        let token = v["access_token"].as_str().unwrap();
        let claims = claims_of(token);
        assert_eq!(claims["cnf"], json!({"jkt": thumbprint(&k)}), "{name}");
        let intro = app.introspect(token).await;
        assert_eq!(intro["active"], true);
        assert_eq!(intro["cnf"], json!({"jkt": thumbprint(&k)}));
        assert_eq!(intro["token_type"], "DPoP");
    }
    // Without a proof: a bearer token, no cnf.
    let (s, v, _) = exchange_with(&app, &[], &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert!(claims_of(v["access_token"].as_str().unwrap())["cnf"].is_null());
    let (_, meta) = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(
        meta["dpop_signing_alg_values_supported"],
        json!(["ES256", "EdDSA", "Ed25519", "RS256", "PS256"])
    );
}

#[tokio::test]
async fn every_check_of_a_proof_answers_invalid_dpop_proof() {
    let app = spawn_app().await;
    let k = key(KeyAlg::Es256);
    let now = app.broker.now();
    let es = |h: Value, c: Value| proof_as(&k, "ES256", now, h, c);
    let good = proof(&k, now);
    // Exactly one header.
    refused(&app, &[&good, &proof(&k, now)], "invalid_dpop_proof").await;
    // Not a JWS at all; a header with `crit`.
    refused(&app, &["not-a-jwt"], "invalid_dpop_proof").await;
    refused(
        &app,
        &[&es(json!({"crit": ["exp"]}), json!({}))],
        "invalid_dpop_proof",
    )
    .await;
    // typ.
    refused(
        &app,
        &[&es(json!({"typ": "JWT"}), json!({}))],
        "invalid_dpop_proof",
    )
    .await;
    refused(
        &app,
        &[&es(json!({"typ": null}), json!({}))],
        "invalid_dpop_proof",
    )
    .await;
    // alg: none (no signature) and a symmetric one.
    let none = raw_jwt(
        &json!({"typ": "dpop+jwt", "alg": "none", "jwk": public_jwk(&k)}),
        &json!({"jti": "n1", "htm": "POST", "htu": HTU, "iat": now}),
        b"",
    );
    refused(&app, &[&none], "invalid_dpop_proof").await;
    let hs_header = json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": B64.encode(b"0123456789abcdef0123456789abcdef")}});
    let hs_input = format!(
        "{}.{}",
        B64.encode(hs_header.to_string()),
        B64.encode(json!({"jti": "h1", "htm": "POST", "htu": HTU, "iat": now}).to_string())
    );
    let hs_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
    let hs_sig = B64.encode(ring::hmac::sign(&hs_key, hs_input.as_bytes()).as_ref());
    refused(
        &app,
        &[&format!("{hs_input}.{hs_sig}")],
        "invalid_dpop_proof",
    )
    .await;
    // An asymmetric alg that is not accepted (ES384) and one that does not fit the key.
    refused(
        &app,
        &[&es(json!({"alg": "ES384"}), json!({}))],
        "invalid_dpop_proof",
    )
    .await;
    let ed = key(KeyAlg::Ed25519);
    refused(
        &app,
        &[&proof_as(
            &k,
            "ES256",
            now,
            json!({"jwk": public_jwk(&ed)}),
            json!({}),
        )],
        "invalid_dpop_proof",
    )
    .await;
    // jwk missing, or with the private key in it.
    refused(
        &app,
        &[&es(json!({"jwk": null}), json!({}))],
        "invalid_dpop_proof",
    )
    .await;
    let mut private = public_jwk(&k);
    private["d"] = json!(B64.encode([7u8; 32]));
    refused(
        &app,
        &[&es(json!({"jwk": private}), json!({}))],
        "invalid_dpop_proof",
    )
    .await;
    // Signature by another key than the jwk's.
    let other = key(KeyAlg::Es256);
    refused(
        &app,
        &[&proof_as(
            &other,
            "ES256",
            now,
            json!({"jwk": public_jwk(&k)}),
            json!({}),
        )],
        "invalid_dpop_proof",
    )
    .await;
    // A tampered payload.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = B64.encode(json!({"jti": "t", "htm": "POST", "htu": HTU, "iat": now}).to_string());
    refused(&app, &[&parts.join(".")], "invalid_dpop_proof").await;
    // htm, htu.
    refused(
        &app,
        &[&es(json!({}), json!({"htm": "GET"}))],
        "invalid_dpop_proof",
    )
    .await;
    refused(
        &app,
        &[&es(json!({}), json!({"htm": null}))],
        "invalid_dpop_proof",
    )
    .await;
    for htu in [
        "https://writ.test/oauth2/introspect",
        "http://writ.test/oauth2/token",
        "https://other.test/oauth2/token",
        &format!("{}/oauth2/token", app.base),
    ] {
        refused(
            &app,
            &[&es(json!({}), json!({"htu": htu}))],
            "invalid_dpop_proof",
        )
        .await;
    }
    // htu with a query is the same URI (RFC 9449 §4.3).
    let (s, v, _) = exchange_with(
        &app,
        &[&es(json!({}), json!({"htu": format!("{HTU}?x=1")}))],
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // iat: 61 s old or ahead is refused, 59 s is fine; missing is refused.
    refused(
        &app,
        &[&es(json!({}), json!({"iat": now - 61}))],
        "invalid_dpop_proof",
    )
    .await;
    refused(
        &app,
        &[&es(json!({}), json!({"iat": now + 61}))],
        "invalid_dpop_proof",
    )
    .await;
    refused(
        &app,
        &[&es(json!({}), json!({"iat": null}))],
        "invalid_dpop_proof",
    )
    .await;
    let (s, v, _) = exchange_with(&app, &[&es(json!({}), json!({"iat": now - 59}))], &[]).await;
    assert_eq!(s, 200, "{v}");
    // jti missing, empty or too long.
    refused(
        &app,
        &[&es(json!({}), json!({"jti": null}))],
        "invalid_dpop_proof",
    )
    .await;
    refused(
        &app,
        &[&es(json!({}), json!({"jti": ""}))],
        "invalid_dpop_proof",
    )
    .await;
    refused(
        &app,
        &[&es(json!({}), json!({"jti": "j".repeat(257)}))],
        "invalid_dpop_proof",
    )
    .await;
    // Replay: the good proof once, then never again.
    let (s, v, _) = exchange_with(&app, &[&good], &[]).await;
    assert_eq!(s, 200, "{v}");
    let v = refused(&app, &[&good], "invalid_dpop_proof").await;
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("used before"),
        "{v}"
    );
    // The refusals are recorded by the proof's hash, never the proof.
    let log = app.audit_text();
    assert!(log.contains("dpop proof refused"));
    assert!(!log.contains(&good));
}

#[tokio::test]
async fn policy_sees_the_binding() {
    let policy = r#"
@id("bound-deploy")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"deploy:prod"
) when { context.binding == "dpop" };
"#;
    let first = spawn_app().await;
    std::fs::write(first.path("policies/bound.cedar"), policy).unwrap();
    let app = spawn_edited(&first, |t| t.to_string()).await;
    let k = key(KeyAlg::Es256);
    // deploy:prod needs a DPoP-bound token.
    let svid = app.svid(AGENT);
    app.expect_error(&svid, "deploy:prod", &[], 400, "invalid_scope")
        .await;
    let p = proof(&k, app.broker.now());
    let (s, v, _) = exchange_with_scope(&app, &[&p], "deploy:prod").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "DPoP");
}

async fn exchange_with_scope(
    app: &TestApp,
    dpop: &[&str],
    scope: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let svid = app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", scope),
        ("audience", API),
    ];
    let mut req = app
        .http
        .post(format!("{}/oauth2/token", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(form).unwrap());
    for p in dpop {
        req = req.header("DPoP", *p);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap(), headers)
}

#[tokio::test]
async fn a_required_nonce_is_challenged_then_accepted() {
    let app = spawn_app_with(Options {
        extra_config: "[dpop]\nrequire_nonce = true\n".into(),
        ..Options::default()
    })
    .await;
    let k = key(KeyAlg::Es256);
    let now = app.broker.now();
    let (s, v, headers) = exchange_with(&app, &[&proof(&k, now)], &[]).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "use_dpop_nonce"),
        "{v}"
    );
    let nonce = headers["dpop-nonce"].to_str().unwrap().to_string();
    // A wrong nonce is challenged again.
    let wrong = proof_as(&k, "ES256", now, json!({}), json!({"nonce": "bogus"}));
    refused(&app, &[&wrong], "use_dpop_nonce").await;
    let p = proof_as(&k, "ES256", now, json!({}), json!({"nonce": nonce}));
    let (s, v, headers) = exchange_with(&app, &[&p], &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "DPoP");
    assert!(headers.contains_key("dpop-nonce"));
    // Every other check still answers invalid_dpop_proof.
    let bad = proof_as(
        &k,
        "ES256",
        now,
        json!({}),
        json!({"nonce": nonce, "htm": "GET"}),
    );
    refused(&app, &[&bad], "invalid_dpop_proof").await;
    // A nonce two windows old is no longer current.
    app.clock.advance(150);
    let later = app.broker.now();
    let old = proof_as(&k, "ES256", later, json!({}), json!({"nonce": nonce}));
    refused(&app, &[&old], "use_dpop_nonce").await;
    // Without [dpop] require_nonce, no nonce header is sent.
    let plain = spawn_app().await;
    let (_, _, headers) = exchange_with(&plain, &[&proof(&k, plain.broker.now())], &[]).await;
    assert!(!headers.contains_key("dpop-nonce"));
}

#[tokio::test]
async fn a_bound_task_keeps_its_key() {
    let app = spawn_app().await;
    let k = key(KeyAlg::Es256);
    let (s, v, _) = exchange_with(&app, &[&proof(&k, app.broker.now())], &[]).await;
    assert_eq!(s, 200, "{v}");
    let task = v["task_id"].as_str().unwrap().to_string();
    let extra = [("task_id", task.as_str())];
    // The same key mints into the task.
    let (s, v, _) = exchange_with(&app, &[&proof(&k, app.broker.now())], &extra).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        claims_of(v["access_token"].as_str().unwrap())["cnf"]["jkt"],
        thumbprint(&k)
    );
    // Another key, or no proof (a bearer token), is refused.
    let other = key(KeyAlg::Es256);
    let (s, v, _) = exchange_with(&app, &[&proof(&other, app.broker.now())], &extra).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_grant"),
        "{v}"
    );
    let (s, v, _) = exchange_with(&app, &[], &extra).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_grant"),
        "{v}"
    );
    // An unbound task may mint a bound token (stricter, never looser).
    let (s, v, _) = exchange_with(&app, &[], &[]).await;
    assert_eq!(s, 200, "{v}");
    let unbound = v["task_id"].as_str().unwrap().to_string();
    let (s, v, _) = exchange_with(
        &app,
        &[&proof(&k, app.broker.now())],
        &[("task_id", unbound.as_str())],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "DPoP");
}

#[tokio::test]
async fn a_proof_replayed_on_another_replica_is_refused() {
    let redis = RedisServer::start();
    let a = spawn_on_redis(&redis.url()).await;
    let b = spawn_replica(&a).await;
    a.wait_status("/readyz", 200).await;
    b.wait_status("/readyz", 200).await;
    let k = key(KeyAlg::Es256);
    let p = proof(&k, a.broker.now());
    let (s, v, _) = exchange_with(&a, &[&p], &[]).await;
    assert_eq!(s, 200, "{v}");
    refused(&b, &[&p], "invalid_dpop_proof").await;
    // The same proof sent to both at once: exactly one wins.
    let p = proof(&k, a.broker.now());
    let headers = [p.as_str()];
    let (ra, rb) = tokio::join!(
        exchange_with(&a, &headers, &[]),
        exchange_with(&b, &headers, &[])
    );
    let wins = [ra.0, rb.0].iter().filter(|s| **s == 200).count();
    assert_eq!(wins, 1, "{:?} {:?}", ra.1, rb.1);
    // A bound task opened on A keeps its key on B (the key is in the store).
    let (s, v, _) = exchange_with(&a, &[&proof(&k, a.broker.now())], &[]).await;
    assert_eq!(s, 200, "{v}");
    let task = v["task_id"].as_str().unwrap().to_string();
    let other = key(KeyAlg::Es256);
    let (s, v, _) = exchange_with(
        &b,
        &[&proof(&other, b.broker.now())],
        &[("task_id", task.as_str())],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_grant"),
        "{v}"
    );
}
