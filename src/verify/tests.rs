use super::*;

#[test]
fn authorization_takes_one_bearer_or_dpop_token() {
    assert_eq!(
        authorization(&["Bearer abc.def-_~+/="]).unwrap(),
        (Scheme::Bearer, "abc.def-_~+/=")
    );
    assert_eq!(
        authorization(&["dpop x.y.z"]).unwrap(),
        (Scheme::Dpop, "x.y.z")
    );
    assert_eq!(authorization(&[]).unwrap_err().code, ErrorCode::Missing);
    for bad in [
        "Basic abc",
        "Bearer",
        "Bearer ",
        "Bearer a b",
        "Bearer a\"b",
    ] {
        assert_eq!(
            authorization(&[bad]).unwrap_err().code,
            ErrorCode::InvalidRequest,
            "{bad}"
        );
    }
    assert_eq!(
        authorization(&["Bearer a", "Bearer b"]).unwrap_err().code,
        ErrorCode::InvalidRequest
    );
}

#[test]
fn challenges_follow_rfc_6750_and_9449() {
    let missing = authorization(&[]).unwrap_err();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.www_authenticate().unwrap(),
        "Bearer, DPoP algs=\"ES256 EdDSA Ed25519 RS256 PS256\""
    );
    let token = Rejection::token(Scheme::Bearer, "the access token is not valid here");
    assert_eq!(token.status(), 401);
    assert_eq!(
        token.www_authenticate().unwrap(),
        "Bearer error=\"invalid_token\", error_description=\"the access token is not valid here\""
    );
    let proof = Rejection::proof("a DPoP proof is required");
    assert_eq!(
        proof.www_authenticate().unwrap(),
        "DPoP error=\"invalid_dpop_proof\", error_description=\"a DPoP proof is required\", \
         algs=\"ES256 EdDSA Ed25519 RS256 PS256\""
    );
    let scope = Rejection {
        code: ErrorCode::InsufficientScope,
        scheme: Scheme::Bearer,
        description: "d",
        scope: Some("repo:write".into()),
    };
    assert_eq!(scope.status(), 403);
    assert_eq!(
        scope.www_authenticate().unwrap(),
        "Bearer error=\"insufficient_scope\", error_description=\"d\", scope=\"repo:write\""
    );
    assert_eq!(Rejection::unavailable(Scheme::Bearer, "x").status(), 503);
    assert_eq!(
        Rejection::unavailable(Scheme::Bearer, "x").www_authenticate(),
        None
    );
}

#[test]
fn config_errors_name_the_field() {
    let err = |c: Config| Verifier::new(c).unwrap_err().to_string();
    assert!(err(Config::new("not a url", "https://api")).starts_with("`issuer`"));
    assert!(err(Config::new("ftp://writ", "https://api")).starts_with("`issuer`"));
    assert!(err(Config::new("https://writ", "")).starts_with("`audience`"));
    let mut c = Config::new("https://writ", "https://api");
    c.broker_url = Some("https://writ/?x=1".into());
    assert!(err(c).starts_with("`broker_url`"));
    let mut c = Config::new("https://writ", "https://api");
    c.resource_url = Some("api".into());
    assert!(err(c).starts_with("`resource_url`"));
    let mut c = Config::new("https://writ", "https://api");
    c.leeway = Duration::from_secs(61);
    assert!(err(c).starts_with("`leeway`"));
    let mut c = Config::new("https://writ", "https://api");
    c.replay_capacity = 0;
    assert!(err(c).starts_with("`replay_capacity`"));
}

#[test]
fn status_lists_are_fetched_from_the_broker_only() {
    let mut c = Config::new("https://writ.example/", "https://api");
    c.broker_url = Some("http://writ.internal:8080".into());
    let v = Verifier::new(c).unwrap();
    assert_eq!(
        v.list_url("https://writ.example/oauth2/status/sl_abc-_1")
            .as_deref(),
        Some("http://writ.internal:8080/oauth2/status/sl_abc-_1")
    );
    for elsewhere in [
        "https://evil.example/oauth2/status/sl_a",
        "https://writ.example.evil/oauth2/status/sl_a",
        "https://writ.example/oauth2/status/",
        "https://writ.example/oauth2/status/sl_a/../../x",
        "https://writ.example/oauth2/status/sl_a?x=1",
        "https://writ.example/other/sl_a",
    ] {
        assert_eq!(v.list_url(elsewhere), None, "{elsewhere}");
    }
}

#[test]
fn the_actor_chain_is_read_outermost_first() {
    let v = Verified {
        subject: "s".into(),
        client_id: "b".into(),
        scopes: vec![],
        task_id: "t".into(),
        token_id: "j".into(),
        audience: vec![],
        expires_at: 0,
        act: Some(serde_json::json!({"sub": "b", "act": {"sub": "a"}})),
        cnf: None,
        binding: Binding::None,
    };
    assert_eq!(v.actors(), vec!["b".to_string(), "a".to_string()]);
}

/// A stand-in for the broker's JWKS and one status list, whose answers a test changes and
/// whose fetches it counts.
mod fake {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use parking_lot::Mutex;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::{Value, json};

    use crate::token::status::{StatusClaim, StatusListClaims, StatusRef, encode};
    use crate::token::{Aud, TaskClaims};
    use crate::verify::{Config, Verifier};

    pub const API: &str = "https://api.test";

    pub struct Key {
        pub kid: String,
        enc: jsonwebtoken::EncodingKey,
        pub jwk: Value,
    }

    pub fn key(kid: &str) -> Key {
        crate::token::crypto::ensure_installed();
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        Key {
            kid: kid.into(),
            enc: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": B64.encode(&point[1..33]),
                        "y": B64.encode(&point[33..65]), "kid": kid, "use": "sig", "alg": "ES256"}),
        }
    }

    pub fn sign(key: &Key, typ: &str, claims: &impl serde::Serialize) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.typ = Some(typ.into());
        h.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&h, claims, &key.enc).unwrap()
    }

    pub struct Broker {
        pub base: String,
        pub jwks: Mutex<Value>,
        pub list: Mutex<(u16, String)>,
        pub jwks_hits: AtomicUsize,
        pub list_hits: AtomicUsize,
        pub now: Arc<AtomicI64>,
    }

    impl Broker {
        pub fn list_uri(&self) -> String {
            format!("{}/oauth2/status/sl_t", self.base)
        }

        /// A list of 64 indexes with `revoked` set, signed by `key`.
        pub fn list(&self, key: &Key, revoked: &[u64], ttl: u64, exp_in: i64) -> String {
            let mut bytes = [0u8; 8];
            for i in revoked {
                bytes[usize::try_from(*i / 8).unwrap()] |= 1 << (i % 8);
            }
            let now = self.now.load(Ordering::SeqCst);
            let claims = StatusListClaims {
                sub: self.list_uri(),
                iat: now,
                exp: now + exp_in,
                ttl,
                status_list: encode(&bytes).unwrap(),
            };
            sign(key, "statuslist+jwt", &claims)
        }

        pub fn token(&self, key: &Key, idx: u64) -> String {
            let now = self.now.load(Ordering::SeqCst);
            let claims = TaskClaims {
                iss: self.base.clone(),
                sub: "spiffe://td/a".into(),
                client_id: "spiffe://td/a".into(),
                aud: Aud::One(API.into()),
                scope: "read".into(),
                txn: "tsk_t".into(),
                jti: "j".into(),
                iat: now,
                nbf: now,
                exp: now + 300,
                cnf: None,
                act: None,
                status: Some(StatusClaim {
                    status_list: StatusRef {
                        idx,
                        uri: self.list_uri(),
                    },
                }),
            };
            sign(key, "at+jwt", &claims)
        }

        pub fn verifier(&self, min_refresh_secs: u64) -> Verifier {
            let mut c = Config::new(&self.base, API);
            c.jwks_min_refresh = std::time::Duration::from_secs(min_refresh_secs);
            let now = self.now.clone();
            c.clock = Some(Arc::new(move || now.load(Ordering::SeqCst)));
            Verifier::new(c).unwrap()
        }

        pub fn hits(&self) -> (usize, usize) {
            (
                self.jwks_hits.load(Ordering::SeqCst),
                self.list_hits.load(Ordering::SeqCst),
            )
        }
    }

    pub async fn start() -> Arc<Broker> {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = Arc::new(Broker {
            base: format!("http://{}", listener.local_addr().unwrap()),
            jwks: Mutex::new(json!({"keys": []})),
            list: Mutex::new((404, String::new())),
            jwks_hits: AtomicUsize::new(0),
            list_hits: AtomicUsize::new(0),
            now: Arc::new(AtomicI64::new(1_900_000_000)),
        });
        let (b1, b2) = (broker.clone(), broker.clone());
        let app = axum::Router::new()
            .route(
                "/oauth2/jwks",
                get(move || {
                    b1.jwks_hits.fetch_add(1, Ordering::SeqCst);
                    let jwks = b1.jwks.lock().clone();
                    async move { axum::Json(jwks) }
                }),
            )
            .route(
                "/oauth2/status/sl_t",
                get(move || {
                    b2.list_hits.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = b2.list.lock().clone();
                    async move {
                        (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            [("content-type", "application/statuslist+jwt")],
                            body,
                        )
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        broker
    }
}

async fn check(v: &Verifier, token: &str) -> Result<Verified, Rejection> {
    let auth = format!("Bearer {token}");
    v.verify(&Presented {
        method: "GET",
        url: "https://api.test/x",
        authorization: &[auth.as_str()],
        dpop: &[],
        peer_certificate: None,
    })
    .await
}

#[tokio::test]
async fn the_jwks_is_fetched_again_only_for_an_unknown_kid_and_at_most_every_min_refresh() {
    let b = fake::start().await;
    let (k1, k2) = (fake::key("k1"), fake::key("k2"));
    *b.jwks.lock() = serde_json::json!({"keys": [k1.jwk]});
    *b.list.lock() = (200, b.list(&k1, &[], 60, 60));

    let v = b.verifier(3600);
    check(&v, &b.token(&k1, 3)).await.unwrap();
    assert_eq!(b.hits(), (1, 1));
    // Both come from the caches now.
    check(&v, &b.token(&k1, 4)).await.unwrap();
    assert_eq!(b.hits(), (1, 1));
    // A `kid` the JWKS does not hold, within `min_refresh` of the last fetch: refused
    // without asking the broker again.
    for _ in 0..3 {
        let e = check(&v, &b.token(&k2, 3)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidToken);
    }
    assert_eq!(b.hits(), (1, 1));

    // The broker rotates to k2; a verifier that may fetch again finds it.
    let v = b.verifier(0);
    check(&v, &b.token(&k1, 3)).await.unwrap();
    assert_eq!(b.hits().0, 2);
    *b.jwks.lock() = serde_json::json!({"keys": [k2.jwk, k1.jwk]});
    check(&v, &b.token(&k2, 3)).await.unwrap();
    assert_eq!(b.hits().0, 3);
    // A key that is still unknown after the fetch is refused.
    let e = check(&v, &b.token(&fake::key("k3"), 3)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidToken);

    // A JWKS that cannot be fetched, for a key not held: 503, not a pass; and still 503,
    // not "unknown key", while the verifier waits before asking again.
    *b.jwks.lock() = serde_json::json!("not a jwks");
    let v = b.verifier(3600);
    let before = b.hits().0;
    for _ in 0..2 {
        let e = check(&v, &b.token(&k1, 3)).await.unwrap_err();
        assert_eq!((e.code, e.status()), (ErrorCode::Unavailable, 503));
    }
    assert_eq!(b.hits().0, before + 1);
}

#[tokio::test]
async fn a_list_that_does_not_verify_or_cannot_be_fetched_refuses_with_503() {
    let b = fake::start().await;
    let k1 = fake::key("k1");
    let stranger = fake::key("k1");
    *b.jwks.lock() = serde_json::json!({"keys": [k1.jwk]});
    let token = b.token(&k1, 3);
    let uri = b.list_uri();
    let now = b.now.load(std::sync::atomic::Ordering::SeqCst);
    let other_sub = fake::sign(
        &k1,
        "statuslist+jwt",
        &serde_json::json!({"sub": format!("{uri}x"), "iat": now, "exp": now + 60, "ttl": 60,
                            "status_list": crate::token::status::encode(&[0u8; 8]).unwrap()}),
    );
    let cases: Vec<(&str, (u16, String))> = vec![
        (
            "signed by another key under the same kid",
            (200, b.list(&stranger, &[], 60, 60)),
        ),
        (
            "another typ",
            (
                200,
                fake::sign(&k1, "JWT", &serde_json::json!({"sub": uri})),
            ),
        ),
        ("another list's sub", (200, other_sub)),
        ("expired", (200, b.list(&k1, &[], 60, -10))),
        ("not a JWT", (200, "garbage".into())),
        ("a broker error", (500, String::new())),
    ];
    for (name, answer) in cases {
        *b.list.lock() = answer;
        let e = check(&b.verifier(30), &token).await.unwrap_err();
        assert_eq!(
            (e.code, e.status()),
            (ErrorCode::Unavailable, 503),
            "{name}"
        );
    }
    // The list the broker does not know: the token is invalid.
    *b.list.lock() = (404, String::new());
    let e = check(&b.verifier(30), &token).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidToken);
    // A good list, for contrast; a revoked bit and an index past the end.
    *b.list.lock() = (200, b.list(&k1, &[5], 60, 60));
    let v = b.verifier(30);
    check(&v, &token).await.unwrap();
    let e = check(&v, &b.token(&k1, 5)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidToken);
    assert_eq!(e.description, "the access token has been revoked");
    let e = check(&v, &b.token(&k1, 64)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidToken);
}

#[tokio::test]
async fn a_list_is_cached_for_its_ttl_and_never_past_its_exp() {
    use std::sync::atomic::Ordering;
    let b = fake::start().await;
    let k1 = fake::key("k1");
    *b.jwks.lock() = serde_json::json!({"keys": [k1.jwk]});
    let token = b.token(&k1, 3);

    // ttl 10 s, exp in 60 s: fetched again after 10 s.
    *b.list.lock() = (200, b.list(&k1, &[], 10, 60));
    let v = b.verifier(30);
    check(&v, &token).await.unwrap();
    b.now.fetch_add(9, Ordering::SeqCst);
    check(&v, &token).await.unwrap();
    assert_eq!(b.hits().1, 1);
    // The broker revokes index 3; the verifier sees it once its copy is 10 s old.
    *b.list.lock() = (200, b.list(&k1, &[3], 10, 60));
    b.now.fetch_add(1, Ordering::SeqCst);
    let e = check(&v, &token).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidToken);
    assert_eq!(b.hits().1, 2);

    // ttl 60 s but exp in 2 s: fetched again after 2 s.
    *b.list.lock() = (200, b.list(&k1, &[], 60, 2));
    let token = b.token(&k1, 3);
    let v = b.verifier(30);
    check(&v, &token).await.unwrap();
    b.now.fetch_add(1, Ordering::SeqCst);
    check(&v, &token).await.unwrap();
    assert_eq!(b.hits().1, 3);
    *b.list.lock() = (200, b.list(&k1, &[3], 60, 60));
    b.now.fetch_add(1, Ordering::SeqCst);
    assert!(check(&v, &token).await.is_err());
    assert_eq!(b.hits().1, 4);
}
