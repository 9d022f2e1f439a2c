//! Against a fake OIDC issuer on a loopback port.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::json;

use super::*;
use crate::token::keys::{KeyAlg, SigningKey, generate_pem};

#[derive(Clone)]
struct Fake {
    jwks: Arc<RwLock<Value>>,
    issuer_override: Arc<RwLock<Option<String>>>,
    jwks_hits: Arc<AtomicUsize>,
    discovery_hits: Arc<AtomicUsize>,
    base: Arc<RwLock<String>>,
    huge: Arc<RwLock<bool>>,
    hang: Arc<RwLock<bool>>,
    jwks_uri_override: Arc<RwLock<Option<String>>>,
}

async fn discovery(State(f): State<Fake>) -> axum::Json<Value> {
    f.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let base = f.base.read().clone();
    let issuer = f
        .issuer_override
        .read()
        .clone()
        .unwrap_or_else(|| base.clone());
    let jwks_uri = f
        .jwks_uri_override
        .read()
        .clone()
        .unwrap_or_else(|| format!("{base}/jwks"));
    axum::Json(json!({"issuer": issuer, "jwks_uri": jwks_uri}))
}

async fn jwks(State(f): State<Fake>) -> axum::response::Response {
    use axum::response::IntoResponse;
    f.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if *f.hang.read() {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    if *f.huge.read() {
        return "x".repeat(300 * 1024).into_response();
    }
    axum::Json(f.jwks.read().clone()).into_response()
}

fn key(alg: KeyAlg) -> SigningKey {
    SigningKey::from_pem(generate_pem(alg).unwrap().as_bytes(), "k").unwrap()
}

async fn fake(keys: &[&SigningKey]) -> (String, Fake) {
    let f = Fake {
        jwks: Arc::new(RwLock::new(
            json!({"keys": keys.iter().map(|k| k.jwk().clone()).collect::<Vec<_>>()}),
        )),
        issuer_override: Arc::default(),
        jwks_hits: Arc::default(),
        discovery_hits: Arc::default(),
        base: Arc::default(),
        huge: Arc::default(),
        hang: Arc::default(),
        jwks_uri_override: Arc::default(),
    };
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .with_state(f.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    *f.base.write() = base.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, f)
}

fn set_keys(f: &Fake, keys: &[&SigningKey]) {
    *f.jwks.write() = json!({"keys": keys.iter().map(|k| k.jwk().clone()).collect::<Vec<_>>()});
}

fn verifier(base: &str, opts: OidcOptions) -> OidcVerifier {
    OidcVerifier::new(
        vec![OidcIssuerConfig {
            issuer: base.to_string(),
            audience: "writ".into(),
            allowed_extra_audiences: Vec::new(),
            jwks_uri: None,
        }],
        opts,
    )
    .unwrap()
}

fn opts() -> OidcOptions {
    OidcOptions {
        http_timeout: Duration::from_millis(500),
        min_refresh_interval: Duration::from_secs(3600),
        ..OidcOptions::default()
    }
}

fn mint(k: &SigningKey, claims: Value) -> String {
    let mut h = jsonwebtoken::Header::new(k.alg.jwt_alg());
    h.kid = Some(k.kid.clone());
    jsonwebtoken::encode(&h, &claims, k.encoding_key()).unwrap()
}

const NOW: i64 = 1_800_000_000;

fn claims(iss: &str) -> Value {
    json!({"iss": iss, "sub": "repo:org/app:ref:refs/heads/main", "aud": "writ", "iat": NOW, "exp": NOW + 300,
           "repository": "org/app"})
}

#[tokio::test]
async fn valid_tokens_and_time_checks() {
    let k = key(KeyAlg::Rs256);
    let (base, _f) = fake(&[&k]).await;
    let v = verifier(&base, opts());
    let id = v.verify(&mint(&k, claims(&base)), NOW).await.unwrap();
    assert_eq!(
        id.subject,
        format!("{base}#repo:org/app:ref:refs/heads/main")
    );
    assert_eq!(id.claims["repository"], "org/app");
    assert_eq!(id.audience, vec!["writ".to_string()]);
    // Expired beyond the 60 s skew, but accepted within it.
    assert!(matches!(
        v.verify(&mint(&k, claims(&base)), NOW + 361).await,
        Err(OidcError::Expired)
    ));
    assert!(v.verify(&mint(&k, claims(&base)), NOW + 350).await.is_ok());
    let mut c = claims(&base);
    c["nbf"] = json!(NOW + 120);
    assert!(matches!(
        v.verify(&mint(&k, c), NOW).await,
        Err(OidcError::NotYetValid)
    ));
    let mut c = claims(&base);
    c["iat"] = json!(NOW + 120);
    assert!(matches!(
        v.verify(&mint(&k, c), NOW).await,
        Err(OidcError::IssuedInFuture)
    ));
    let mut c = claims(&base);
    c["aud"] = json!(["other"]);
    assert!(matches!(
        v.verify(&mint(&k, c), NOW).await,
        Err(OidcError::WrongAudience)
    ));
    let mut c = claims(&base);
    c.as_object_mut().unwrap().remove("exp");
    assert!(matches!(
        v.verify(&mint(&k, c), NOW).await,
        Err(OidcError::MissingClaim("exp"))
    ));
}

#[tokio::test]
async fn issuer_must_match_exactly() {
    let k = key(KeyAlg::Es256);
    let (base, f) = fake(&[&k]).await;
    let v = verifier(&base, opts());
    assert!(!v.knows_issuer(&format!("{base}/")));
    assert!(matches!(
        v.verify(&mint(&k, claims(&format!("{base}/"))), NOW).await,
        Err(OidcError::UnknownIssuer)
    ));
    // A discovery document naming another issuer is a misconfiguration: unavailable.
    *f.issuer_override.write() = Some("https://evil.example".into());
    let v = verifier(&base, opts());
    let e = v.verify(&mint(&k, claims(&base)), NOW).await.unwrap_err();
    assert!(
        matches!(e, OidcError::Discovery(_)) && e.is_unavailable(),
        "{e}"
    );
}

#[tokio::test]
async fn forbidden_algorithms_and_missing_kid() {
    let k = key(KeyAlg::Es256);
    let (base, _f) = fake(&[&k]).await;
    let v = verifier(&base, opts());
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": k.kid})),
        b64(&claims(&base))
    );
    assert!(matches!(
        v.verify(&none, NOW).await,
        Err(OidcError::Malformed)
    ));
    let hs = format!(
        "{}.{}.AAAA",
        b64(&json!({"alg": "HS256", "kid": k.kid})),
        b64(&claims(&base))
    );
    assert!(matches!(
        v.verify(&hs, NOW).await,
        Err(OidcError::UnsupportedAlg)
    ));
    let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
    h.kid = None;
    let no_kid = jsonwebtoken::encode(&h, &claims(&base), k.encoding_key()).unwrap();
    assert!(matches!(
        v.verify(&no_kid, NOW).await,
        Err(OidcError::MissingKid)
    ));
    assert!(matches!(
        v.verify(&"a".repeat(20_000), NOW).await,
        Err(OidcError::TooLargeToken)
    ));
    // Signed by another key under a known kid.
    let other = key(KeyAlg::Es256);
    let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
    h.kid = Some(k.kid.clone());
    let forged = jsonwebtoken::encode(&h, &claims(&base), other.encoding_key()).unwrap();
    assert!(matches!(
        v.verify(&forged, NOW).await,
        Err(OidcError::BadSignature)
    ));
}

#[tokio::test]
async fn unknown_kid_refetches_once_and_is_rate_limited() {
    let k = key(KeyAlg::Es256);
    let (base, f) = fake(&[&k]).await;
    let v = verifier(&base, opts());
    v.verify(&mint(&k, claims(&base)), NOW).await.unwrap();
    assert_eq!(f.jwks_hits.load(Ordering::SeqCst), 1);
    assert_eq!(f.discovery_hits.load(Ordering::SeqCst), 1);
    let stranger = key(KeyAlg::Es256);
    // The rate limit counts from the last fetch (just now): no refetch within the interval.
    assert!(matches!(
        v.verify(&mint(&stranger, claims(&base)), NOW).await,
        Err(OidcError::UnknownKid)
    ));
    assert!(matches!(
        v.verify(&mint(&stranger, claims(&base)), NOW).await,
        Err(OidcError::UnknownKid)
    ));
    assert_eq!(f.jwks_hits.load(Ordering::SeqCst), 1);
    // With no rate limit, an unknown kid refetches exactly once per attempt.
    let v = verifier(
        &base,
        OidcOptions {
            min_refresh_interval: Duration::ZERO,
            ..opts()
        },
    );
    v.verify(&mint(&k, claims(&base)), NOW).await.unwrap();
    let before = f.jwks_hits.load(Ordering::SeqCst);
    assert!(matches!(
        v.verify(&mint(&stranger, claims(&base)), NOW).await,
        Err(OidcError::UnknownKid)
    ));
    assert_eq!(f.jwks_hits.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn key_rotation_is_followed() {
    let old = key(KeyAlg::Es256);
    let (base, f) = fake(&[&old]).await;
    let v = verifier(
        &base,
        OidcOptions {
            min_refresh_interval: Duration::ZERO,
            ..opts()
        },
    );
    let old_token = mint(&old, claims(&base));
    v.verify(&old_token, NOW).await.unwrap();
    // The issuer adds a key and signs with it: the unknown kid brings it in.
    let new = key(KeyAlg::Rs256);
    set_keys(&f, &[&old, &new]);
    v.verify(&mint(&new, claims(&base)), NOW).await.unwrap();
    v.verify(&old_token, NOW).await.unwrap();
    // The old key is retired: after the next refetch old tokens no longer verify.
    set_keys(&f, &[&new]);
    let v2 = verifier(
        &base,
        OidcOptions {
            min_refresh_interval: Duration::ZERO,
            max_age: Duration::ZERO,
            ..opts()
        },
    );
    assert!(matches!(
        v2.verify(&old_token, NOW).await,
        Err(OidcError::UnknownKid)
    ));
    v2.verify(&mint(&new, claims(&base)), NOW).await.unwrap();
}

#[tokio::test]
async fn oversized_and_hanging_issuers_are_unavailable() {
    let k = key(KeyAlg::Es256);
    let (base, f) = fake(&[&k]).await;
    *f.huge.write() = true;
    let v = verifier(&base, opts());
    let e = v.verify(&mint(&k, claims(&base)), NOW).await.unwrap_err();
    assert!(
        matches!(e, OidcError::TooLarge(_)) && e.is_unavailable(),
        "{e}"
    );
    *f.huge.write() = false;
    *f.hang.write() = true;
    let v = verifier(&base, opts());
    let started = Instant::now();
    let e = v.verify(&mint(&k, claims(&base)), NOW).await.unwrap_err();
    assert!(
        matches!(e, OidcError::Timeout(_)) && e.is_unavailable(),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn configured_jwks_uri_skips_discovery() {
    let k = key(KeyAlg::Ed25519);
    let (base, f) = fake(&[&k]).await;
    let v = OidcVerifier::new(
        vec![OidcIssuerConfig {
            issuer: base.clone(),
            audience: "writ".into(),
            allowed_extra_audiences: Vec::new(),
            jwks_uri: Some(format!("{base}/jwks")),
        }],
        opts(),
    )
    .unwrap();
    v.verify(&mint(&k, claims(&base)), NOW).await.unwrap();
    assert_eq!(f.discovery_hits.load(Ordering::SeqCst), 0);
    // Plain http to a non-loopback host is refused at configuration.
    assert!(
        OidcVerifier::new(
            vec![OidcIssuerConfig {
                issuer: "http://issuer.example".into(),
                audience: "writ".into(),
                allowed_extra_audiences: Vec::new(),
                jwks_uri: None
            }],
            opts()
        )
        .is_err()
    );
}

/// The `jwks_uri` a discovery document leads to, without fetching the keys (so that no test
/// ever connects anywhere but loopback).
async fn discovered(base: &str, jwks_uri: &str, f: &Fake) -> Result<String, OidcError> {
    *f.jwks_uri_override.write() = Some(jwks_uri.to_string());
    let v = verifier(base, opts());
    let state = v.issuers.get(base).unwrap();
    v.jwks_uri(state).await
}

#[tokio::test]
async fn discovery_cannot_point_the_broker_at_internal_addresses() {
    let k = key(KeyAlg::Es256);
    let (base, f) = fake(&[&k]).await;
    // The issuer is on loopback, so its keys may be too (local issuers, tests)...
    let own = format!("{base}/jwks");
    assert_eq!(discovered(&base, &own, &f).await.unwrap(), own);
    // ...but a discovery document is not trusted to name private or link-local addresses.
    for target in [
        "https://10.0.0.5/keys",
        "https://172.16.3.4/keys",
        "https://192.168.1.1/keys",
        "https://169.254.169.254/latest/meta-data/keys",
        "https://[fe80::1]/keys",
        "https://[fd00::1]/keys",
        "https://[::ffff:10.0.0.5]/keys",
        "http://10.0.0.5/keys",
        "http://issuer.example/keys",
    ] {
        let e = discovered(&base, target, &f).await.unwrap_err();
        assert!(matches!(e, OidcError::Discovery(_)), "{target}: {e}");
        assert!(e.is_unavailable(), "{target}");
    }
}

#[test]
fn configured_jwks_uris_are_trusted_with_internal_addresses() {
    // An operator's own configuration may name internal addresses; nothing is fetched here.
    for jwks_uri in ["https://10.0.0.5/keys", "https://169.254.169.254/keys"] {
        OidcVerifier::new(
            vec![OidcIssuerConfig {
                issuer: "https://issuer.example".into(),
                audience: "writ".into(),
                allowed_extra_audiences: Vec::new(),
                jwks_uri: Some(jwks_uri.into()),
            }],
            opts(),
        )
        .unwrap();
    }
}
