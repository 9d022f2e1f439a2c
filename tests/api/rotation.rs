//! Key rotation without downtime: add a key (published, not signing), switch signing to it
//! (the old one still published), retire the old one. Tokens signed by a published key keep
//! verifying through the overlap.

use serde_json::json;
use writ::token::keys::{KeyAlg, generate_pem};

use crate::helpers::*;
use crate::redis_support::RedisServer;

async fn with_keys(first: &TestApp, files: &[&str]) -> TestApp {
    let list = files
        .iter()
        .map(|f| format!("\"{}\"", first.path(f).display()))
        .collect::<Vec<_>>()
        .join(", ");
    // Each broker keeps its own decision log.
    let audit = first.path(&format!("audit-{}.jsonl", files.join("-")));
    let text = first
        .config_text
        .lines()
        .map(|l| {
            if l.starts_with("signing_keys") {
                format!("signing_keys = [{list}]")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            &first.path("audit.jsonl").display().to_string(),
            &audit.display().to_string(),
        );
    let mut a = spawn_with_text(&text).await;
    a.svid_key_pem = first.svid_key_pem.clone();
    a.svid_key =
        writ::token::keys::SigningKey::from_pem(first.svid_key_pem.as_bytes(), "svid").unwrap();
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_every_published_key_verifying() {
    // Replicas share their tasks and revocations through Redis: a broker vouches only for
    // tokens whose task its store holds.
    let redis = RedisServer::start();
    let old = spawn_on_redis(&redis.url()).await;
    std::fs::write(old.path("next.pem"), generate_pem(KeyAlg::Es256).unwrap()).unwrap();
    let old_kid = old.broker.tokens.keys().active().kid.clone();
    let (t_old, _) = old.task_token(AGENT, "repo:read").await;

    // 1. Publish the new key; the old one still signs.
    let step1 = with_keys(&old, &["signing.pem", "next.pem"]).await;
    let (_, jwks) = step1.get("/oauth2/jwks").await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let new_kid = jwks["keys"][1]["kid"].as_str().unwrap().to_string();
    let (t1, _) = step1.task_token(AGENT, "repo:read").await;
    assert_eq!(header_of(&t1)["kid"], old_kid.as_str());
    assert_eq!(step1.introspect(&t_old).await["active"], true);

    // 2. Switch signing to the new key; the old one stays published for the overlap.
    let step2 = with_keys(&old, &["next.pem", "signing.pem"]).await;
    let (t2, _) = step2.task_token(AGENT, "repo:read").await;
    assert_eq!(header_of(&t2)["kid"], new_kid.as_str());
    assert_eq!(
        step2.introspect(&t_old).await["active"],
        true,
        "old tokens verify through the overlap"
    );
    assert_eq!(step2.introspect(&t1).await["active"], true);
    // A replica still on step 1 verifies tokens of the new key too (published since step 1).
    assert_eq!(step1.introspect(&t2).await["active"], true);

    // 3. Retire the old key once its tokens have expired (after tokens.max_ttl).
    let step3 = with_keys(&old, &["next.pem"]).await;
    let (_, jwks) = step3.get("/oauth2/jwks").await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(step3.introspect(&t2).await["active"], true);
    assert_eq!(step3.introspect(&t_old).await, json!({"active": false}));
}
