//! Re-evaluation of 10,000 open tasks after a policy change, on the Redis at `REDIS_URL`:
//! half the tasks hold a scope the new policy no longer permits. Prints the time to finish
//! and what was revoked.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use writ::broker::{Broker, connect_store};
use writ::config::Config;
use writ::domain::{Clock, Subject, SystemClock, TaskId};
use writ::store::{TaskRecord, TaskState, TokenEntry};

const OLD: &str = r#"
permit (principal in Writ::TrustDomain::"example.org", action == Writ::Action::"exchange",
        resource == Writ::Scope::"repo:read");
permit (principal in Writ::TrustDomain::"example.org", action == Writ::Action::"exchange",
        resource == Writ::Scope::"repo:write");
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL")?;
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n);
    std::fs::write(
        p("k.pem"),
        writ::token::keys::generate_pem(writ::token::keys::KeyAlg::Es256)?,
    )?;
    std::fs::create_dir_all(p("policies"))?;
    std::fs::write(p("policies/p.cedar"), OLD)?;
    let prefix = writ::domain::random_id("reeval")?
        .chars()
        .take(12)
        .collect::<String>()
        + ":";
    let text = format!(
        "[server]\nissuer = \"https://writ.bench\"\n[tokens]\nsigning_keys = [\"{}\"]\n[policy]\ndir = \"{}\"\n[audit]\npath = \"{}\"\n[store]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n[trips]\nreevaluate_on_policy_change = true\n",
        p("k.pem").display(),
        p("policies").display(),
        p("audit.jsonl").display()
    );
    let config = Config::from_toml_with_env(&text, Vec::new())?;
    let store = connect_store(&config).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let broker = Arc::new(Broker::build_with(config, clock.clone(), store)?);
    tokio::spawn(writ::revocation::follow(
        broker.store.clone(),
        broker.revocations.clone(),
        clock.clone(),
    ));
    while !broker.revocations.is_fresh() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let old_version = broker.policy.current().version().to_string();
    let now = clock.now();
    const N: usize = 10_000;
    let mut handles = Vec::new();
    for w in 0..32 {
        let b = broker.clone();
        let v = old_version.clone();
        handles.push(tokio::spawn(async move {
            for i in (w..N).step_by(32) {
                let scopes = if i % 2 == 0 {
                    vec!["repo:read".to_string(), "repo:write".to_string()]
                } else {
                    vec!["repo:read".to_string()]
                };
                let t = TaskRecord {
                    id: TaskId::generate()?,
                    owner: Subject::from_trusted(format!("spiffe://example.org/agent/a{i}")),
                    issuer: "example.org".into(),
                    purpose: String::new(),
                    created_at: now,
                    deadline: now + 3600,
                    state: TaskState::Open,
                    ended_at: None,
                    end_reason: None,
                    policy_version: v.clone(),
                    scopes,
                    audience: vec!["https://api.example.org".into()],
                    tokens_issued: 1,
                    parent: None,
                    depth: 0,
                    source: "jwt-svid".into(),
                    claims: Default::default(),
                    grant: None,
                    on_behalf_of: None,
                    act: None,
                    approval: None,
                    jkt: None,
                    x5t: None,
                };
                let jti = writ::domain::random_id("")?;
                b.store
                    .create_task(
                        &t,
                        &TokenEntry {
                            jti,
                            exp: now + 300,
                        },
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    // The new policy no longer permits repo:write.
    std::fs::write(
        p("policies/p.cedar"),
        OLD.lines().take(3).collect::<Vec<_>>().join("\n"),
    )?;
    broker.policy.reload()?;
    let started = Instant::now();
    let report = broker.reevaluate_open_tasks(&old_version).await?;
    let secs = started.elapsed().as_secs_f64();
    println!("reeval_tasks_evaluated={}", report.evaluated);
    println!("reeval_tasks_revoked={}", report.revoked);
    println!("reeval_seconds={secs:.2}");
    Ok(())
}
