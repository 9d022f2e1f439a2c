//! The resource-server verifier (SPEC §9) in front of the example resource server
//! (examples/resource_server.rs), against a real broker: what a request must present, and
//! the exact `WWW-Authenticate` challenge for everything it refuses.

use std::sync::Arc;

use serde_json::{Value, json};
use writ::domain::Clock;
use writ::token::dpop::make_proof;
use writ::token::keys::{KeyAlg, KeySet, SigningKey, generate_pem};
use writ::token::status::{StatusClaim, StatusRef};
use writ::token::{Aud, TaskClaims, TokenIssuer};
use writ::verify::{Presented, Verifier};

use crate::helpers::*;
use crate::resource_server;

const ISSUER: &str = "https://writ.test";
const HTU: &str = "https://writ.test/oauth2/token";
const ALGS: &str = "algs=\"ES256 EdDSA Ed25519 RS256 PS256\"";

/// The example resource server, on a loopback port, verifying with the broker's clock.
struct Rs {
    base: String,
    verifier: Verifier,
    http: reqwest::Client,
}

async fn start_rs(app: &TestApp) -> Rs {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = resource_server::Settings {
        broker: app.base.clone(),
        issuer: ISSUER.into(),
        audience: API.into(),
        listen: addr,
        resource_url: None,
    };
    let mut config = settings.verifier_config(addr);
    let clock = app.clock.clone();
    config.clock = Some(Arc::new(move || clock.now()));
    let verifier = Verifier::new(config).unwrap();
    let serving = verifier.clone();
    tokio::spawn(async move { resource_server::serve(listener, &serving).await });
    Rs {
        base: format!("http://{addr}"),
        verifier,
        http: reqwest::Client::new(),
    }
}

/// A broker whose status lists say `ttl = 2s`, and the resource server in front of it.
async fn setup() -> (TestApp, Rs) {
    let app = spawn_app_with(Options {
        extra_config: "[status]\nttl = \"2s\"\nlist_size = 64\n".into(),
        ..Options::default()
    })
    .await;
    let rs = start_rs(&app).await;
    (app, rs)
}

fn key() -> SigningKey {
    SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "dpop").unwrap()
}

/// A token bound to `key` (DPoP at the token endpoint) for `scope`.
async fn bound_token(app: &TestApp, key: &SigningKey, scope: &str) -> String {
    let proof = make_proof(key, "POST", HTU, app.clock.now(), None, None).unwrap();
    let svid = app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", scope),
        ("audience", API),
    ];
    let resp = app
        .http
        .post(format!("{}/oauth2/token", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("DPoP", proof)
        .body(serde_urlencoded::to_string(form).unwrap())
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["token_type"], "DPoP", "{v}");
    v["access_token"].as_str().unwrap().to_string()
}

impl Rs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A proof by `key` for `method` `path` of this server, for `token`.
    fn proof(
        &self,
        app: &TestApp,
        key: &SigningKey,
        method: &str,
        path: &str,
        token: &str,
    ) -> String {
        make_proof(
            key,
            method,
            &self.url(path),
            app.clock.now(),
            None,
            Some(token),
        )
        .unwrap()
    }

    /// `method path` with `Authorization: <auth>` and these `DPoP` headers; returns the
    /// status, the `WWW-Authenticate` challenge ("" without one) and the JSON body (null
    /// when there is none).
    async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        dpop: &[&str],
    ) -> (u16, String, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        for p in dpop {
            req = req.header("DPoP", *p);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = resp.text().await.unwrap();
        (
            status,
            challenge,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    /// A DPoP call with a fresh proof by `key`.
    async fn dpop_call(
        &self,
        app: &TestApp,
        key: &SigningKey,
        method: &str,
        path: &str,
        token: &str,
    ) -> (u16, String, Value) {
        let proof = self.proof(app, key, method, path, token);
        self.call(method, path, Some(&format!("DPoP {token}")), &[&proof])
            .await
    }
}

/// Asserts a refusal: status, scheme and error code of the challenge.
fn refused(got: &(u16, String, Value), status: u16, scheme: &str, error: &str) {
    assert_eq!(got.0, status, "{got:?}");
    let prefix = format!("{scheme} error=\"{error}\"");
    assert!(
        got.1.starts_with(&prefix),
        "challenge {:?} is not {prefix}",
        got.1
    );
    if scheme == "DPoP" {
        assert!(got.1.ends_with(ALGS), "{:?}", got.1);
    }
}

#[tokio::test]
async fn a_bound_token_with_its_proof_is_accepted_and_its_claims_reach_the_handler() {
    let (app, rs) = setup().await;
    let k = key();
    let token = bound_token(&app, &k, "repo:read").await;
    let got = rs.dpop_call(&app, &k, "GET", "/repo", &token).await;
    assert_eq!(got.0, 200, "{got:?}");
    let body = got.2;
    assert_eq!(body["subject"], AGENT);
    assert_eq!(body["client_id"], AGENT);
    assert_eq!(body["scopes"], json!(["repo:read"]));
    assert_eq!(body["binding"], "dpop");
    assert_eq!(body["task_id"], claims_of(&token)["txn"]);
    assert_eq!(body["cnf"]["jkt"], claims_of(&token)["cnf"]["jkt"]);
    // A query string is not part of `htu` (RFC 9449 §4.3).
    let proof = rs.proof(&app, &k, "GET", "/repo", &token);
    let got = rs
        .call(
            "GET",
            "/repo?page=2",
            Some(&format!("DPoP {token}")),
            &[&proof],
        )
        .await;
    assert_eq!(got.0, 200, "{got:?}");

    // A bearer token is accepted as Bearer.
    let (bearer, _) = app.task_token(AGENT, "repo:read").await;
    let got = rs
        .call("GET", "/repo", Some(&format!("Bearer {bearer}")), &[])
        .await;
    assert_eq!(got.0, 200, "{got:?}");
    assert_eq!(got.2["binding"], "none");

    // No credentials: both schemes offered, no error code (RFC 6750 §3.1, RFC 9449 §7.2).
    let got = rs.call("GET", "/repo", None, &[]).await;
    assert_eq!(
        (got.0, got.1.as_str()),
        (401, format!("Bearer, DPoP {ALGS}").as_str())
    );
    // A malformed Authorization header: 400 invalid_request.
    let got = rs
        .call("GET", "/repo", Some("Basic dXNlcjpwYXNz"), &[])
        .await;
    refused(&got, 400, "Bearer", "invalid_request");
    // The open route needs nothing.
    assert_eq!(rs.call("GET", "/healthz", None, &[]).await.0, 200);
}

#[tokio::test]
async fn a_scope_the_route_needs_and_the_token_lacks_is_403_insufficient_scope() {
    let (app, rs) = setup().await;
    let (bearer, _) = app.task_token(AGENT, "repo:read").await;
    let got = rs
        .call("POST", "/repo", Some(&format!("Bearer {bearer}")), &[])
        .await;
    refused(&got, 403, "Bearer", "insufficient_scope");
    assert!(got.1.contains("scope=\"repo:write\""), "{}", got.1);
    let got = rs
        .call("GET", "/tickets", Some(&format!("Bearer {bearer}")), &[])
        .await;
    refused(&got, 403, "Bearer", "insufficient_scope");
    // The same for a bound token, in the DPoP scheme.
    let k = key();
    let token = bound_token(&app, &k, "repo:read").await;
    let got = rs.dpop_call(&app, &k, "POST", "/repo", &token).await;
    refused(&got, 403, "DPoP", "insufficient_scope");
    // With the scope, the same route answers.
    let token = bound_token(&app, &k, "repo:write").await;
    assert_eq!(rs.dpop_call(&app, &k, "POST", "/repo", &token).await.0, 200);
}

#[tokio::test]
async fn a_bound_token_is_refused_without_a_valid_proof_of_its_key() {
    let (app, rs) = setup().await;
    let k = key();
    let token = bound_token(&app, &k, "repo:read").await;
    let auth = format!("DPoP {token}");

    // No proof.
    let got = rs.call("GET", "/repo", Some(&auth), &[]).await;
    refused(&got, 401, "DPoP", "invalid_dpop_proof");
    // A proof by another key, for this very request and token.
    let other = key();
    let got = rs.dpop_call(&app, &other, "GET", "/repo", &token).await;
    refused(&got, 401, "DPoP", "invalid_dpop_proof");
    // A replayed proof: accepted once, then refused.
    let proof = rs.proof(&app, &k, "GET", "/repo", &token);
    assert_eq!(rs.call("GET", "/repo", Some(&auth), &[&proof]).await.0, 200);
    let got = rs.call("GET", "/repo", Some(&auth), &[&proof]).await;
    refused(&got, 401, "DPoP", "invalid_dpop_proof");
    // `ath` of another token.
    let second = bound_token(&app, &k, "repo:read").await;
    let proof = rs.proof(&app, &k, "GET", "/repo", &second);
    let got = rs.call("GET", "/repo", Some(&auth), &[&proof]).await;
    refused(&got, 401, "DPoP", "invalid_dpop_proof");
    // No `ath` at all.
    let no_ath = make_proof(&k, "GET", &rs.url("/repo"), app.clock.now(), None, None).unwrap();
    let got = rs.call("GET", "/repo", Some(&auth), &[&no_ath]).await;
    refused(&got, 401, "DPoP", "invalid_dpop_proof");
    // Another `htu` (another route), another `htm`.
    let proof = rs.proof(&app, &k, "GET", "/tickets", &token);
    refused(
        &rs.call("GET", "/repo", Some(&auth), &[&proof]).await,
        401,
        "DPoP",
        "invalid_dpop_proof",
    );
    let proof = rs.proof(&app, &k, "POST", "/repo", &token);
    refused(
        &rs.call("GET", "/repo", Some(&auth), &[&proof]).await,
        401,
        "DPoP",
        "invalid_dpop_proof",
    );
    // An `iat` outside the window.
    let old = make_proof(
        &k,
        "GET",
        &rs.url("/repo"),
        app.clock.now() - 120,
        None,
        Some(&token),
    )
    .unwrap();
    refused(
        &rs.call("GET", "/repo", Some(&auth), &[&old]).await,
        401,
        "DPoP",
        "invalid_dpop_proof",
    );
    // Two proofs.
    let (p1, p2) = (
        rs.proof(&app, &k, "GET", "/repo", &token),
        rs.proof(&app, &k, "GET", "/repo", &token),
    );
    refused(
        &rs.call("GET", "/repo", Some(&auth), &[&p1, &p2]).await,
        401,
        "DPoP",
        "invalid_dpop_proof",
    );
    // The proof of the token endpoint.
    let exchange_proof = make_proof(&k, "POST", HTU, app.clock.now(), None, None).unwrap();
    refused(
        &rs.call("GET", "/repo", Some(&auth), &[&exchange_proof])
            .await,
        401,
        "DPoP",
        "invalid_dpop_proof",
    );

    // A bound token presented as a bearer token, with or without a proof.
    let got = rs
        .call("GET", "/repo", Some(&format!("Bearer {token}")), &[])
        .await;
    refused(&got, 401, "DPoP", "invalid_token");
    let proof = rs.proof(&app, &k, "GET", "/repo", &token);
    let got = rs
        .call("GET", "/repo", Some(&format!("Bearer {token}")), &[&proof])
        .await;
    refused(&got, 401, "DPoP", "invalid_token");
    // An unbound token presented in the DPoP scheme.
    let (bearer, _) = app.task_token(AGENT, "repo:read").await;
    let got = rs.dpop_call(&app, &k, "GET", "/repo", &bearer).await;
    refused(&got, 401, "DPoP", "invalid_token");

    // After all that, the right proof still works.
    assert_eq!(rs.dpop_call(&app, &k, "GET", "/repo", &token).await.0, 200);
}

#[tokio::test]
async fn a_revoked_token_is_refused_once_its_cached_list_is_older_than_the_ttl() {
    let (app, rs) = setup().await;
    let k = key();
    let token = bound_token(&app, &k, "repo:read").await;
    let (bearer, task) = app.task_token(AGENT, "repo:read").await;
    let auth = format!("Bearer {bearer}");
    assert_eq!(rs.call("GET", "/repo", Some(&auth), &[]).await.0, 200);
    assert_eq!(rs.dpop_call(&app, &k, "GET", "/repo", &token).await.0, 200);

    // Revoked at the broker: the task of the bearer token ends, the bound token is revoked
    // by RFC 7009.
    let (s, v) = app.end_task(&task, &bearer).await;
    assert_eq!(s, 200, "{v}");
    let form = serde_urlencoded::to_string([("token", token.as_str())]).unwrap();
    let (s, _, _) = app
        .post_raw("/oauth2/revoke", "application/x-www-form-urlencoded", form)
        .await;
    assert_eq!(s, 200);
    // Within the list's ttl (2 s) the cached list still says valid: the verifier does not
    // fetch the list for every request.
    assert_eq!(rs.call("GET", "/repo", Some(&auth), &[]).await.0, 200);
    // Past it, the list is fetched again and both tokens are refused.
    app.clock.advance(3);
    let got = rs.call("GET", "/repo", Some(&auth), &[]).await;
    refused(&got, 401, "Bearer", "invalid_token");
    assert!(got.1.contains("revoked"), "{}", got.1);
    let got = rs.dpop_call(&app, &k, "GET", "/repo", &token).await;
    refused(&got, 401, "DPoP", "invalid_token");
    // A token that was not revoked still passes with the fresh list.
    let (fresh, _) = app.task_token(AGENT, "repo:read").await;
    assert_eq!(
        rs.call("GET", "/repo", Some(&format!("Bearer {fresh}")), &[])
            .await
            .0,
        200
    );
}

/// A token signed with the broker's own key, with these claim changes.
async fn forged(app: &TestApp, edit: impl FnOnce(&mut TaskClaims)) -> String {
    let k = SigningKey::load(&app.path("signing.pem")).unwrap();
    let issuer = TokenIssuer::new(ISSUER.into(), KeySet::new(vec![k]).unwrap()).unwrap();
    let now = app.clock.now();
    // A real token's status slot, so that only the edited claims differ.
    let real = claims_of(&app.task_token(AGENT, "repo:read").await.0);
    let status: StatusClaim = serde_json::from_value(real["status"].clone()).unwrap();
    let mut claims = TaskClaims {
        iss: ISSUER.into(),
        sub: AGENT.into(),
        client_id: AGENT.into(),
        aud: Aud::One(API.into()),
        scope: "repo:read".into(),
        txn: "tsk_forged".into(),
        jti: "forged".into(),
        iat: now,
        nbf: now,
        exp: now + 300,
        cnf: None,
        act: None,
        status: Some(status),
    };
    edit(&mut claims);
    issuer.sign(&claims).unwrap()
}

#[tokio::test]
async fn wrong_issuer_audience_type_key_or_time_is_invalid_token() {
    let (app, rs) = setup().await;
    let bearer = |t: &str| format!("Bearer {t}");
    let invalid = |got: (u16, String, Value)| refused(&got, 401, "Bearer", "invalid_token");

    // The broker's key, but not the broker's issuer.
    let t = forged(&app, |c| c.iss = "https://evil.test".into()).await;
    invalid(rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await);
    // Another audience, issued by the broker itself.
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "repo:read",
            &[("audience", "https://other.example.org")],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let other_aud = v["access_token"].as_str().unwrap();
    invalid(rs.call("GET", "/repo", Some(&bearer(other_aud)), &[]).await);
    // Not yet valid.
    let t = forged(&app, |c| c.nbf = c.iat + 120).await;
    invalid(rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await);
    // Another `typ`: a JWS the broker signed that is not an access token.
    let k = SigningKey::load(&app.path("signing.pem")).unwrap();
    let keys = KeySet::new(vec![k]).unwrap();
    let real = claims_of(&app.task_token(AGENT, "repo:read").await.0);
    let jws = writ::token::sign_jws(&keys, "JWT", &real).unwrap();
    invalid(rs.call("GET", "/repo", Some(&bearer(&jws)), &[]).await);
    // Another key under the broker's `kid`.
    let other = SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "x").unwrap();
    let kid = keys.active().kid.clone();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = Some("at+jwt".into());
    header.kid = Some(kid);
    let t = jsonwebtoken::encode(&header, &real, other.encoding_key()).unwrap();
    invalid(rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await);
    // A `kid` the broker does not have.
    header.kid = Some("unknown".into());
    let t = jsonwebtoken::encode(&header, &real, other.encoding_key()).unwrap();
    invalid(rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await);
    // Not a JWT.
    invalid(rs.call("GET", "/repo", Some("Bearer abc"), &[]).await);

    // Expired: past `exp` (and its leeway) on the verifier's clock.
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    assert_eq!(
        rs.call("GET", "/repo", Some(&bearer(&token)), &[]).await.0,
        200
    );
    let exp = claims_of(&token)["exp"].as_i64().unwrap();
    app.clock.set(exp + 6);
    let got = rs.call("GET", "/repo", Some(&bearer(&token)), &[]).await;
    invalid(got.clone());
    assert!(got.1.contains("expired"), "{}", got.1);
}

#[tokio::test]
async fn a_status_the_list_cannot_confirm_fails_closed() {
    let (app, rs) = setup().await;
    let bearer = |t: &str| format!("Bearer {t}");
    // An index past the end of a real list (64 indexes).
    let t = forged(&app, |c| {
        c.status.as_mut().unwrap().status_list.idx = 64;
    })
    .await;
    let got = rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await;
    refused(&got, 401, "Bearer", "invalid_token");
    // The last index of the same list is in range (and not revoked).
    let t = forged(&app, |c| c.status.as_mut().unwrap().status_list.idx = 63).await;
    assert_eq!(rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await.0, 200);
    // A list the broker does not know (404).
    let t = forged(&app, |c| {
        c.status = Some(StatusClaim {
            status_list: StatusRef {
                idx: 0,
                uri: format!("{ISSUER}/oauth2/status/sl_unknown"),
            },
        })
    })
    .await;
    let got = rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await;
    refused(&got, 401, "Bearer", "invalid_token");
    // A list that is not the broker's: never fetched.
    let t = forged(&app, |c| {
        c.status = Some(StatusClaim {
            status_list: StatusRef {
                idx: 0,
                uri: "https://elsewhere.test/oauth2/status/sl_x".into(),
            },
        })
    })
    .await;
    refused(
        &rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await,
        401,
        "Bearer",
        "invalid_token",
    );
    // No `status` claim at all.
    let t = forged(&app, |c| c.status = None).await;
    refused(
        &rs.call("GET", "/repo", Some(&bearer(&t)), &[]).await,
        401,
        "Bearer",
        "invalid_token",
    );

    // The broker goes away: a token whose list is cached still passes within the list's
    // ttl; once the cache is older than that, the list cannot be fetched and the request is
    // refused with 503, never let through.
    let (token, _) = app.task_token(AGENT, "repo:read").await;
    assert_eq!(
        rs.call("GET", "/repo", Some(&bearer(&token)), &[]).await.0,
        200
    );
    let clock = app.clock.clone();
    app.stop().await;
    assert_eq!(
        rs.call("GET", "/repo", Some(&bearer(&token)), &[]).await.0,
        200
    );
    clock.advance(3);
    let got = rs.call("GET", "/repo", Some(&bearer(&token)), &[]).await;
    assert_eq!((got.0, got.1.as_str()), (503, ""), "{got:?}");
}

#[tokio::test]
async fn an_mtls_bound_token_needs_the_peer_certificate_it_names() {
    let (app, rs) = setup().await;
    const CERT: &[u8] = b"a DER certificate";
    let x5t = writ::verify::cert_thumbprint(CERT);
    let t = forged(&app, |c| c.cnf = Some(json!({"x5t#S256": x5t}))).await;
    let auth = format!("Bearer {t}");
    let presented = |peer: Option<&'static [u8]>| {
        let url = rs.url("/repo");
        let auth = auth.clone();
        let verifier = rs.verifier.clone();
        async move {
            let authorization = [auth.as_str()];
            verifier
                .verify(&Presented {
                    method: "GET",
                    url: &url,
                    authorization: &authorization,
                    dpop: &[],
                    peer_certificate: peer,
                })
                .await
        }
    };
    let ok = presented(Some(CERT)).await.unwrap();
    assert_eq!(
        ok.binding,
        writ::verify::Binding::Mtls {
            x5t_s256: x5t.clone()
        }
    );
    for peer in [None, Some(&b"another certificate"[..])] {
        let e = presented(peer).await.unwrap_err();
        assert_eq!(e.status(), 401);
        assert!(
            e.www_authenticate()
                .unwrap()
                .starts_with("Bearer error=\"invalid_token\"")
        );
    }
    // The example server has no peer-certificate hook: it refuses the token.
    refused(
        &rs.call("GET", "/repo", Some(&auth), &[]).await,
        401,
        "Bearer",
        "invalid_token",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_proof_racing_itself_is_accepted_exactly_once() {
    // The replay cache's check and insert are one step: of many requests carrying the same
    // proof at the same moment, one gets through and every other one is a replay.
    let (app, rs) = setup().await;
    let k = key();
    let token = bound_token(&app, &k, "repo:read").await;
    let auth = format!("DPoP {token}");
    let proof = rs.proof(&app, &k, "GET", "/repo", &token);
    let proofs = [proof.as_str()];
    let calls = (0..24).map(|_| rs.call("GET", "/repo", Some(&auth), &proofs));
    let got = futures_util::future::join_all(calls).await;
    let accepted = got.iter().filter(|g| g.0 == 200).count();
    assert_eq!(accepted, 1, "{got:?}");
    for g in got.iter().filter(|g| g.0 != 200) {
        refused(g, 401, "DPoP", "invalid_dpop_proof");
    }
}
