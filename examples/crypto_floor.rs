//! The crypto floor of one exchange on one core: verify one ES256 JWT-SVID (header parse,
//! bundle key lookup, signature, claims) and sign one ES256 task token, through the same
//! code the broker uses. Prints `ops_per_sec=N`.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use writ::identity::bundles::DomainBundle;
use writ::identity::spiffe::{JwtSvidVerifier, TrustDomain};
use writ::token::keys::{KeyAlg, KeySet, SigningKey, generate_pem};
use writ::token::{Aud, TaskClaims, TokenIssuer};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let svid_key = SigningKey::from_pem(generate_pem(KeyAlg::Es256)?.as_bytes(), "svid")?;
    let mut jwk = svid_key.jwk().clone();
    jwk["use"] = "jwt-svid".into();
    let bundle_path = dir.path().join("bundle.json");
    std::fs::write(&bundle_path, serde_json::json!({"keys": [jwk]}).to_string())?;
    let mut domains = HashMap::new();
    domains.insert(
        "example.org".to_string(),
        TrustDomain {
            audience: "writ".into(),
            bundle: Arc::new(DomainBundle::from_file(
                "example.org",
                &bundle_path,
                Arc::new(tokio::sync::watch::channel(0u64).0),
            )?),
        },
    );
    let verifier = JwtSvidVerifier::new(domains);
    let svid = writ::dev::sign_svid(
        &svid_key,
        "spiffe://example.org/agent/demo",
        "writ",
        Duration::from_secs(3600),
    )?;
    let signer = SigningKey::from_pem(generate_pem(KeyAlg::Es256)?.as_bytes(), "writ")?;
    let issuer = TokenIssuer::new(
        "https://writ.example.org".into(),
        KeySet::new(vec![signer]).ok_or_else(|| anyhow::anyhow!("no key"))?,
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;

    let one = |i: u64| -> anyhow::Result<()> {
        let id = verifier.verify(&svid, now)?;
        let claims = TaskClaims {
            iss: "https://writ.example.org".into(),
            sub: id.spiffe_id.to_string(),
            client_id: id.spiffe_id.to_string(),
            aud: Aud::One("https://api.example.org".into()),
            scope: "repo:read".into(),
            txn: format!("tsk_{i:022}"),
            jti: format!("{i:022}"),
            iat: now,
            nbf: now,
            exp: now + 300,
            cnf: None,
            act: None,
            status: None,
        };
        std::hint::black_box(issuer.sign(&claims)?);
        Ok(())
    };
    for i in 0..2_000 {
        one(i)?;
    }
    let budget = Duration::from_secs(3);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..256 {
            one(n)?;
            n += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("ops_per_sec={:.0}", n as f64 / secs);
    Ok(())
}
