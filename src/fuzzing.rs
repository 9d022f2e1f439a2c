//! The bodies of the fuzz targets in `fuzz/`, kept in the library so that the same checks run
//! under `cargo fuzz` (coverage-guided, `scripts/fuzz.sh`) and as regression tests over the
//! inputs the fuzzer once tripped on (`tests/fuzz_regressions.rs`).
//!
//! Each function takes arbitrary bytes, drives one parser, and asserts properties that hold
//! for every input: no panic, and outputs that obey the rules the parser exists to enforce.
//! An assertion failing is a finding.
//!
//! Built only with the `fuzzing` feature, which `fuzz/Cargo.toml` enables and under which
//! `scripts/test.sh` runs the regression tests.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use crate::domain::{MAX_SPIFFE_ID_LEN, Scope, parse_spiffe_id};
use crate::http::oauth::{EXCHANGE_PARAMS, Form, parse_exchange};
use crate::identity::bundles::DomainBundle;
use crate::identity::spiffe::{JwtSvidVerifier, TrustDomain};
use crate::policy::{PolicyAction, PolicyContext, PolicyPrincipal, PolicySet, PrincipalKind};
use crate::token::jwt::{JwtFormatError, ParsedJwt};

/// The longest error description the form parser may produce: fixed text plus echoed input
/// that is clipped to 64 characters.
const MAX_ERROR_DESCRIPTION: usize = 256;

/// Token endpoint form: `application/x-www-form-urlencoded` bytes through the same split,
/// repeated-parameter rule and exchange parsing as `POST /oauth2/token`.
pub fn token_form(data: &[u8]) {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(data).into_owned().collect();
    let form = match Form::new(pairs, EXCHANGE_PARAMS, &["audience", "resource"]) {
        Ok(f) => f,
        Err(e) => {
            assert!(e.description.chars().count() <= MAX_ERROR_DESCRIPTION);
            return;
        }
    };
    match parse_exchange(&form, None, &[], true) {
        Ok(req) => {
            // Without a subject_token the TLS client's certificate stands for the subject.
            assert!(
                req.subject_token_type == crate::exchange::SubjectTokenType::PeerCertificate
                    || !secrecy::ExposeSecret::expose_secret(&req.subject_token).is_empty()
            );
            assert!(!req.scopes.is_empty() && req.scopes.len() <= crate::domain::MAX_SCOPES);
            for s in &req.scopes {
                assert_eq!(Scope::parse(s.as_str()).as_ref(), Some(s));
            }
            assert!(req.audiences.len() <= crate::domain::MAX_AUDIENCES);
            assert!(req.purpose.len() <= crate::domain::MAX_PURPOSE_LEN);
            assert!(req.expires_in.is_none_or(|n| n > 0));
        }
        Err(e) => assert!(
            e.description.chars().count() <= MAX_ERROR_DESCRIPTION,
            "error description echoes too much input: {} chars",
            e.description.chars().count()
        ),
    }
}

/// A verifier for trust domain `example.org` whose key is generated here, so no input can
/// carry a valid signature. The files it is built from are removed once loaded.
#[expect(
    clippy::expect_used,
    reason = "a fuzz harness that cannot build its fixture must stop, not report findings"
)]
fn svid_verifier() -> &'static JwtSvidVerifier {
    static VERIFIER: OnceLock<JwtSvidVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "writ-fuzz-{}-{}",
            std::process::id(),
            crate::domain::TokenId::generate().expect("random")
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let key_path = dir.join("td.pem");
        crate::token::keys::generate_file(crate::token::keys::KeyAlg::Es256, &key_path)
            .expect("key");
        let key = crate::token::keys::SigningKey::load(&key_path).expect("key loads");
        let mut jwk = key.jwk().clone();
        jwk.as_object_mut()
            .expect("a JWK is an object")
            .insert("use".into(), Value::from("jwt-svid"));
        let bundle_path = dir.join("bundle.json");
        std::fs::write(
            &bundle_path,
            serde_json::to_vec(&serde_json::json!({"keys": [jwk]})).expect("json"),
        )
        .expect("bundle written");
        let changes = Arc::new(tokio::sync::watch::channel(0u64).0);
        let bundle = Arc::new(
            DomainBundle::from_file("example.org", &bundle_path, changes).expect("bundle loads"),
        );
        let _ = std::fs::remove_dir_all(&dir);
        JwtSvidVerifier::new(HashMap::from([(
            "example.org".to_string(),
            TrustDomain {
                audience: "writ".into(),
                bundle,
            },
        )]))
    })
}

/// JWT header and claims: the one-pass split and decode, the claim accessors, and JWT-SVID
/// verification against a trust domain whose key the input cannot know, so nothing may verify.
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    const MAX: usize = 16 * 1024;
    match ParsedJwt::parse(token, MAX) {
        Ok(jwt) => {
            assert!(token.len() <= MAX);
            assert_eq!(token.matches('.').count(), 2);
            let _ = jwt.str_claim("sub");
            let _ = jwt.int_claim("exp");
            let _ = jwt.int_claim("nbf");
            let _ = jwt.audience_contains("writ");
        }
        Err(JwtFormatError::TooLarge) => assert!(token.len() > MAX),
        Err(JwtFormatError::Malformed | JwtFormatError::Critical) => {}
    }
    let verified = svid_verifier().verify(token, 1_700_000_000);
    assert!(
        verified.is_err(),
        "a token not signed by the trust domain's key verified"
    );
}

/// SPIFFE ID parsing, checked both ways against a reading of the SPIFFE ID specification
/// written here: whatever the parser accepts the reference accepts, and the reverse.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_spiffe_id(s);
    let reference = spec_valid_spiffe_id(s);
    assert_eq!(
        parsed.is_some(),
        reference,
        "parser and specification disagree on {s:?}"
    );
    if let Some(id) = parsed {
        assert_eq!(id.to_string(), s);
        assert!(s.starts_with(&format!("spiffe://{}", id.trust_domain_name())));
    }
}

/// SPIFFE ID §2: `spiffe://` + trust domain (1–255 of `[a-z0-9.-_]`) + path of `/segment`s,
/// each non-empty, not `.` or `..`, of `[a-zA-Z0-9.-_]`; no port, userinfo, query, fragment or
/// percent-encoding (all excluded by the character sets); at most 2048 bytes in all.
pub fn spec_valid_spiffe_id(s: &str) -> bool {
    if s.len() > MAX_SPIFFE_ID_LEN {
        return false;
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let td_ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !td_ok {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    })
}

#[expect(
    clippy::expect_used,
    reason = "the sample policies ship with Writ and always load; if not, fuzzing must stop"
)]
fn sample_policies() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        PolicySet::from_sources(&[(
            "demo.cedar".to_string(),
            include_str!("../config/policies/demo.cedar").to_string(),
        )])
        .expect("the sample policies load")
    })
}

/// Policy entity mapping: an arbitrary principal (SPIFFE or OIDC with arbitrary JSON claims),
/// scopes and context mapped to Cedar entities and decided against the sample policies. Every
/// scope gets exactly one decision, an allow never carries an evaluation error, and deciding
/// twice gives the same answer.
pub fn policy_entities(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let who = parts.next().unwrap_or("");
    let scopes_line = parts.next().unwrap_or("");
    let ctx_line = parts.next().unwrap_or("");
    let claims_text = parts.next().unwrap_or("");

    let kind = match parse_spiffe_id(who) {
        Some(id) => PrincipalKind::Spiffe {
            trust_domain: id.trust_domain_name().to_string(),
            path: id.path().to_string(),
            spiffe_id: id.to_string(),
        },
        None => {
            let (issuer, sub) = who.split_once('#').unwrap_or((who, ""));
            let claims = match serde_json::from_str::<Value>(claims_text) {
                Ok(Value::Object(m)) => m,
                Ok(other) => Map::from_iter([("sub".to_string(), other)]),
                Err(_) => Map::from_iter([(
                    "namespace".to_string(),
                    Value::from(claims_text.to_string()),
                )]),
            };
            PrincipalKind::Oidc {
                issuer: issuer.to_string(),
                sub: sub.to_string(),
                claims,
            }
        }
    };
    let principal = PolicyPrincipal {
        subject: who.to_string(),
        kind,
    };
    let scopes: Vec<String> = scopes_line
        .split(' ')
        .take(crate::domain::MAX_SCOPES)
        .map(str::to_string)
        .collect();
    let mut nums = ctx_line.split(' ');
    let mut num = || nums.next().and_then(|n| n.parse::<i64>().ok()).unwrap_or(0);
    let ctx = PolicyContext {
        audience: ctx_line.split(' ').take(4).map(str::to_string).collect(),
        purpose: ctx_line.to_string(),
        ttl: num().unsigned_abs(),
        source: ctx_line.chars().take(16).collect(),
        depth: u32::try_from(num().unsigned_abs()).unwrap_or(u32::MAX),
        now: num(),
        on_behalf_of: ctx_line.chars().take(32).collect(),
        parent_task: ctx_line.chars().rev().take(32).collect(),
        binding: ctx_line.chars().take(8).collect(),
    };
    let set = sample_policies();
    let action = if data.first().is_some_and(|b| b & 1 == 1) {
        PolicyAction::Delegate
    } else {
        PolicyAction::Exchange
    };
    let first = set.decide_all(&principal, action, &scopes, &ctx);
    assert_eq!(first.len(), scopes.len());
    for (d, s) in first.iter().zip(&scopes) {
        assert_eq!(&d.scope, s);
        assert!(!d.allowed || d.errors.is_empty());
        assert!(d.allowed || d.max_ttl.is_none());
    }
    let again = set.decide_all(&principal, action, &scopes, &ctx);
    assert_eq!(first, again);
}
