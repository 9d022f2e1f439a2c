//! Exchanging OIDC ID tokens, against a fake issuer on a loopback port.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use parking_lot::RwLock;
use serde_json::{Value, json};
use writ::domain::Clock;
use writ::token::keys::{KeyAlg, SigningKey, generate_pem};

use crate::helpers::*;

const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";

struct Issuer {
    base: String,
    jwks: Arc<RwLock<Value>>,
    key: SigningKey,
}

async fn issuer() -> Issuer {
    let key = SigningKey::from_pem(generate_pem(KeyAlg::Rs256).unwrap().as_bytes(), "i").unwrap();
    let jwks = Arc::new(RwLock::new(json!({"keys": [key.jwk()]})));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (b, j) = (base.clone(), jwks.clone());
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || {
                let b = b.clone();
                async move { axum::Json(json!({"issuer": b, "jwks_uri": format!("{b}/keys")})) }
            }),
        )
        .route(
            "/keys",
            get(move || {
                let j = j.clone();
                async move { axum::Json(j.read().clone()) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Issuer { base, jwks, key }
}

fn id_token(iss: &Issuer, now: i64, repo: &str) -> String {
    let mut h = jsonwebtoken::Header::new(iss.key.alg.jwt_alg());
    h.kid = Some(iss.key.kid.clone());
    let claims = json!({"iss": iss.base, "sub": "repo:org/app:ref:refs/heads/main", "aud": "writ",
                        "iat": now, "exp": now + 300, "repository": repo});
    jsonwebtoken::encode(&h, &claims, iss.key.encoding_key()).unwrap()
}

#[tokio::test]
async fn oidc_id_tokens_are_exchanged_and_policy_sees_their_claims() {
    let iss = issuer().await;
    let app = spawn_app_with(Options {
        extra_config: format!(
            "[[oidc.issuers]]\nissuer = \"{}\"\naudience = \"writ\"\n",
            iss.base
        ),
        ..Options::default()
    })
    .await;
    let now = app.clock.now();
    for token_type in [JWT_TYPE, ID_TOKEN_TYPE] {
        let token = id_token(&iss, now, "org/app");
        let (s, v, _) = app
            .post_form(
                "/oauth2/token",
                &[
                    ("grant_type", GRANT),
                    ("subject_token", &token),
                    ("subject_token_type", token_type),
                    ("scope", "ci:deploy"),
                    ("audience", API),
                ],
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let c = claims_of(v["access_token"].as_str().unwrap());
        assert_eq!(
            c["sub"],
            format!("{}#repo:org/app:ref:refs/heads/main", iss.base)
        );
    }
    // Another repository is refused by policy.
    app.expect_error(
        &id_token(&iss, now, "org/other"),
        "ci:deploy",
        &[],
        400,
        "invalid_scope",
    )
    .await;
    // An id_token-typed JWT-SVID is not an ID token.
    let (s, v, _) = app
        .post_form(
            "/oauth2/token",
            &[
                ("grant_type", GRANT),
                ("subject_token", &app.svid(AGENT)),
                ("subject_token_type", ID_TOKEN_TYPE),
                ("scope", "repo:read"),
                ("audience", API),
            ],
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
    // The issuer's keys vanish (rotation with no usable key): invalid, not an outage.
    *iss.jwks.write() = json!({"keys": []});
    app.clock.advance(0);
    let other = SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "o").unwrap();
    let mut h = jsonwebtoken::Header::new(other.alg.jwt_alg());
    h.kid = Some(other.kid.clone());
    let forged = jsonwebtoken::encode(
        &h,
        &json!({"iss": iss.base, "sub": "x", "aud": "writ", "iat": now, "exp": now + 300}),
        other.encoding_key(),
    )
    .unwrap();
    app.expect_error(&forged, "ci:deploy", &[], 400, "invalid_request")
        .await;
}

#[tokio::test]
async fn an_unreachable_issuer_is_503_not_a_refusal() {
    // An issuer on a port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let app = spawn_app_with(Options {
        extra_config: format!("[[oidc.issuers]]\nissuer = \"{base}\"\naudience = \"writ\"\n"),
        ..Options::default()
    })
    .await;
    let key = SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "i").unwrap();
    let mut h = jsonwebtoken::Header::new(key.alg.jwt_alg());
    h.kid = Some(key.kid.clone());
    let now = app.clock.now();
    let token = jsonwebtoken::encode(
        &h,
        &json!({"iss": base, "sub": "x", "aud": "writ", "iat": now, "exp": now + 300}),
        key.encoding_key(),
    )
    .unwrap();
    app.expect_error(&token, "ci:deploy", &[], 503, "temporarily_unavailable")
        .await;
    app.assert_still_serving().await;
}

fn id_token_with(iss: &Issuer, claims: Value) -> String {
    let mut h = jsonwebtoken::Header::new(iss.key.alg.jwt_alg());
    h.kid = Some(iss.key.kid.clone());
    jsonwebtoken::encode(&h, &claims, iss.key.encoding_key()).unwrap()
}

/// OIDC Core §3.1.3.7: an ID token with an audience that is not trusted is refused, unless
/// configured as an allowed extra; `iat` is required.
#[tokio::test]
async fn id_tokens_with_untrusted_audiences_or_without_iat_are_refused() {
    let iss = issuer().await;
    let app = spawn_app_with(Options {
        extra_config: format!(
            "[[oidc.issuers]]\nissuer = \"{}\"\naudience = \"writ\"\nallowed_extra_audiences = [\"https://ci.example\"]\n",
            iss.base
        ),
        ..Options::default()
    })
    .await;
    let now = app.clock.now();
    let base = |aud: Value| {
        json!({"iss": iss.base, "sub": "repo:org/app:ref:refs/heads/main", "aud": aud,
               "iat": now, "exp": now + 300, "repository": "org/app"})
    };
    let evil = id_token_with(&iss, base(json!(["writ", "https://evil.example"])));
    app.expect_error(&evil, "ci:deploy", &[], 400, "invalid_request")
        .await;
    let extra = id_token_with(&iss, base(json!(["writ", "https://ci.example"])));
    let (s, v) = app.exchange(&extra, "ci:deploy", &[]).await;
    assert_eq!(s, 200, "{v}");
    let mut no_iat = base(json!("writ"));
    no_iat.as_object_mut().unwrap().remove("iat");
    let no_iat = id_token_with(&iss, no_iat);
    app.expect_error(&no_iat, "ci:deploy", &[], 400, "invalid_request")
        .await;
    assert!(app.audit_text().contains("not trusted"));
}

/// RFC 8725 §3.11: a JWT typed `at+jwt` presented as an ID token is refused; the same token
/// as a plain `jwt` is still accepted.
#[tokio::test]
async fn an_access_token_presented_as_an_id_token_is_refused() {
    let iss = issuer().await;
    let app = spawn_app_with(Options {
        extra_config: format!(
            "[[oidc.issuers]]\nissuer = \"{}\"\naudience = \"writ\"\n",
            iss.base
        ),
        ..Options::default()
    })
    .await;
    let now = app.clock.now();
    let mut h = jsonwebtoken::Header::new(iss.key.alg.jwt_alg());
    h.kid = Some(iss.key.kid.clone());
    h.typ = Some("at+jwt".into());
    let claims = json!({"iss": iss.base, "sub": "repo:org/app:ref:refs/heads/main", "aud": "writ",
                        "iat": now, "exp": now + 300, "repository": "org/app"});
    let at = jsonwebtoken::encode(&h, &claims, iss.key.encoding_key()).unwrap();
    let form = |t: &'static str| {
        vec![
            ("grant_type", GRANT),
            ("subject_token", at.as_str()),
            ("subject_token_type", t),
            ("scope", "ci:deploy"),
            ("audience", API),
        ]
    };
    let (s, v, _) = app.post_form("/oauth2/token", &form(ID_TOKEN_TYPE)).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "invalid_request"),
        "{v}"
    );
    assert!(app.audit_text().contains("not an ID token"));
    let (s, v, _) = app.post_form("/oauth2/token", &form(JWT_TYPE)).await;
    assert_eq!(s, 200, "{v}");
}
