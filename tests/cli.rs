//! The `writ` binary: exit codes and messages of the offline commands.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::process::Command;

#[allow(
    dead_code,
    reason = "the Workload API server is used here, the bundle endpoint in tests/api"
)]
#[path = "support/spiffe.rs"]
mod spiffe_support;

fn writ() -> Command {
    Command::new(env!("CARGO_BIN_EXE_writ"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let key = dir.join("k.pem");
    if !key.exists() {
        let (ok, _, err) = run(writ()
            .args(["keys", "generate", "--alg", "ES256", "--out"])
            .arg(&key));
        assert!(ok, "{err}");
    }
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies");
    let cfg = dir.join("writ.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nissuer = \"https://writ.test\"\n[tokens]\nsigning_keys = [\"{}\"]\n[policy]\ndir = \"{policies}\"\n[audit]\npath = \"{}\"\n{extra}",
            key.display(),
            dir.join("audit.jsonl").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn keys_generate_writes_each_algorithm_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    for alg in ["ES256", "Ed25519", "RS256"] {
        let out = dir.path().join(format!("{alg}.pem"));
        let (ok, stdout, err) = run(writ()
            .args(["keys", "generate", "--alg", alg, "--out"])
            .arg(&out));
        assert!(ok, "{err}");
        assert!(stdout.contains("kid"), "{stdout}");
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
    let (ok, _, err) = run(writ().args(["keys", "generate", "--alg", "HS256", "--out", "x.pem"]));
    assert!(!ok);
    assert!(err.contains("HS256"), "{err}");
}

#[test]
fn config_check_accepts_a_good_config_and_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let (ok, stdout, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(ok, "{err}");
    assert!(stdout.contains("config ok"), "{stdout}");

    let cfg = write_config(dir.path(), "[tasks]\nmax_tokens = 0\n");
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    assert!(err.contains("`tasks.max_tokens`"), "{err}");

    let cfg = write_config(dir.path(), "[tasks]\nmax_tokenz = 3\n");
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    assert!(err.contains("`tasks.max_tokenz`"), "{err}");

    // The environment overrides a key, and a bad override names it.
    let cfg = write_config(dir.path(), "");
    let (ok, _, err) = run(writ()
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env("WRIT_TASKS__MAX_DURATION", "forever"));
    assert!(!ok);
    assert!(err.contains("`tasks.max_duration`"), "{err}");

    // A key file that is not a key.
    std::fs::write(dir.path().join("k.pem"), "nope").unwrap();
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    assert!(err.contains("`tokens.signing_keys[0]`"), "{err}");
}

#[test]
fn policy_check_and_test() {
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies");
    let (ok, stdout, err) = run(writ().args(["policy", "check", policies]));
    assert!(ok, "{err}");
    assert!(stdout.contains("policies ok"), "{stdout}");
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies/cases.json");
    let (ok, stdout, err) = run(writ().args(["policy", "test", policies, cases]));
    assert!(ok, "{err}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.cedar"),
        "permit (principal, action, resource) when { principal.nope };",
    )
    .unwrap();
    let (ok, _, err) = run(writ().args(["policy", "check"]).arg(dir.path()));
    assert!(!ok);
    assert!(err.contains("bad.cedar"), "{err}");

    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, r#"{"cases": [{"name": "w", "principal": "spiffe://dev.writ.local/agent/demo", "scope": "repo:read", "expect": "deny"}]}"#).unwrap();
    let (ok, stdout, _) = run(writ().args(["policy", "test", policies]).arg(&wrong));
    assert!(!ok);
    assert!(
        stdout.contains("FAIL w: expected deny but got allow"),
        "{stdout}"
    );
}

#[test]
fn audit_verify_reports_the_first_broken_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.jsonl");
    let log = writ::audit::AuditLog::open(path.to_str().unwrap()).unwrap();
    for r in ["a", "b", "c"] {
        log.append(
            writ::audit::Event::Admin,
            writ::audit::Entry {
                reason: r.into(),
                ..Default::default()
            },
        )
        .unwrap();
    }
    drop(log);
    let (ok, stdout, err) = run(writ().args(["audit", "verify"]).arg(&path));
    assert!(ok, "{err}");
    assert!(stdout.contains("3 records"), "{stdout}");
    let text =
        std::fs::read_to_string(&path)
            .unwrap()
            .replacen("\"reason\":\"b\"", "\"reason\":\"x\"", 1);
    std::fs::write(&path, text).unwrap();
    let (ok, _, err) = run(writ().args(["audit", "verify"]).arg(&path));
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn dev_svid_needs_the_dev_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(writ().current_dir(dir.path()).args([
        "dev",
        "svid",
        "--spiffe-id",
        "spiffe://dev.writ.local/agent/x",
    ]));
    assert!(!ok);
    assert!(err.contains("run `writ dev` first"), "{err}");
    let (ok, _, err) = run(writ().current_dir(dir.path()).args([
        "dev",
        "svid",
        "--spiffe-id",
        "spiffe://other.org/x",
    ]));
    assert!(!ok);
    assert!(err.contains("not in the dev trust domain"), "{err}");
}

#[test]
fn token_exchange_reports_an_unreachable_broker() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("t");
    std::fs::write(&tok, "x.y.z").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (ok, _, err) = run(writ()
        .args([
            "token",
            "exchange",
            "--broker",
            &url,
            "--scope",
            "a",
            "--subject-token",
        ])
        .arg(&tok));
    assert!(!ok);
    assert!(err.contains("cannot reach the broker"), "{err}");
    assert!(!err.contains("x.y.z"), "the token is never echoed");
}

#[test]
fn dev_starts_a_working_broker_and_prints_how_to_use_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = writ()
        .current_dir(dir.path())
        .args(["dev", "--listen", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    for line in lines.by_ref().take(40) {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Decision log:") {
            break;
        }
    }
    // Keep draining what the broker prints.
    std::thread::spawn(move || lines.for_each(drop));
    assert!(
        banner.contains(&format!("listening on http://{addr}")),
        "{banner}"
    );
    assert!(banner.contains("Admin token"), "{banner}");
    assert!(banner.contains("token exchange --broker"), "{banner}");
    let svid = dir.path().join(".writ-dev/demo.svid");
    let (ok, stdout, err) = run(writ()
        .current_dir(dir.path())
        .args([
            "token",
            "exchange",
            "--broker",
            &format!("http://{addr}"),
            "--scope",
            "repo:read",
            "--audience",
            "https://api.example.org",
            "--subject-token",
        ])
        .arg(&svid));
    let (ok2, _, err2) = run(writ().current_dir(dir.path()).args([
        "dev",
        "svid",
        "--spiffe-id",
        "spiffe://dev.writ.local/agent/x",
        "--ttl",
        "5m",
    ]));
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["scope"], "repo:read");
    assert!(ok2, "{err2}");
    assert!(dir.path().join(".writ-dev/policies/demo.cedar").exists());
}

/// A `writ dev` broker in a temporary directory; killed when dropped.
struct Dev {
    dir: tempfile::TempDir,
    child: std::process::Child,
    url: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev() -> Dev {
    start_dev_with(&[])
}

/// A `writ dev` broker with `WRIT_` overrides of its config.
fn start_dev_with(env: &[(&str, &str)]) -> Dev {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = writ()
        .current_dir(dir.path())
        .envs(env.iter().copied())
        .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("Decision log:") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Dev {
        dir,
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

#[test]
fn store_confirm_reset_from_the_command_line() {
    let dev = start_dev();
    let d = dev.dir.path();
    // The embedded store cannot lose its state: nothing to confirm.
    let (ok, stdout, err) = run(writ().current_dir(d).args([
        "store",
        "confirm-reset",
        "--broker",
        &dev.url,
        "--admin-token",
        ".writ-dev/admin-token",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v, serde_json::json!({"confirmed": false}));
    // A workload's credential is not an admin's.
    let (ok, _, err) = run(writ().current_dir(d).args([
        "store",
        "confirm-reset",
        "--broker",
        &dev.url,
        "--admin-token",
        ".writ-dev/demo.svid",
    ]));
    assert!(
        !ok && err.contains("(403)") && err.contains("access_denied"),
        "{err}"
    );
}

#[test]
fn task_end_revoke_and_listings_from_the_command_line() {
    let dev = start_dev();
    let d = dev.dir.path();
    let exchange = |scope: &str| {
        let (ok, stdout, err) = run(writ().current_dir(d).args([
            "token",
            "exchange",
            "--broker",
            &dev.url,
            "--scope",
            scope,
            "--subject-token",
            ".writ-dev/demo.svid",
        ]));
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        v["access_token"].as_str().unwrap().to_string()
    };
    // task end, with the token on standard input.
    let token = exchange("repo:read");
    let mut child = writ()
        .current_dir(d)
        .args(["task", "end", "--broker", &dev.url, "--token", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "ended");

    let admin = ".writ-dev/admin-token";
    let (ok, stdout, err) = run(writ().current_dir(d).args([
        "task",
        "list",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
        "--state",
        "ended",
        "--output",
        "json",
    ]));
    assert!(ok, "{err}");
    assert!(stdout.contains("\"ended\""), "{stdout}");

    let (ok, stdout, err) = run(writ().current_dir(d).args([
        "revoke",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
        "--subject",
        "spiffe://dev.writ.local/agent/*",
        "--reason",
        "drill",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rid = v["revocation_id"].as_str().unwrap().to_string();
    let (ok, _, err) = run(writ().current_dir(d).args([
        "token",
        "exchange",
        "--broker",
        &dev.url,
        "--scope",
        "repo:read",
        "--subject-token",
        ".writ-dev/demo.svid",
    ]));
    assert!(!ok);
    assert!(err.contains("invalid_grant"), "{err}");
    let (ok, stdout, _) = run(writ().current_dir(d).args([
        "revocations",
        "list",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
    ]));
    assert!(ok && stdout.contains(&rid), "{stdout}");
    let (ok, _, err) = run(writ().current_dir(d).args([
        "revocations",
        "lift",
        &rid,
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
    ]));
    assert!(ok, "{err}");
    exchange("repo:read");

    // Quarantines: none standing; an unknown id (sent as one encoded path segment) is 404.
    let (ok, stdout, err) = run(writ().current_dir(d).args([
        "quarantines",
        "list",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
        "--output",
        "json",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v, serde_json::json!({"quarantines": []}));
    let (ok, _, err) = run(writ().current_dir(d).args([
        "quarantines",
        "lift",
        "no/such id",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
    ]));
    assert!(
        !ok && err.contains("(404)") && err.contains("not_found"),
        "{err}"
    );

    // No selector, two selectors, a wrong admin token.
    let (ok, _, err) = run(writ().current_dir(d).args([
        "revoke",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
        "--reason",
        "x",
    ]));
    assert!(!ok && err.contains("required"), "{err}");
    let (ok, _, _) = run(writ().current_dir(d).args([
        "revoke",
        "--broker",
        &dev.url,
        "--admin-token",
        admin,
        "--all",
        "--jti",
        "j",
        "--reason",
        "x",
    ]));
    assert!(!ok);
    std::fs::write(d.join("wrong"), "nope").unwrap();
    let (ok, _, err) = run(writ().current_dir(d).args([
        "revoke",
        "--broker",
        &dev.url,
        "--admin-token",
        "wrong",
        "--all",
        "--reason",
        "x",
    ]));
    assert!(!ok && err.contains("401"), "{err}");
    assert!(!err.contains("nope"), "the secret is never echoed");
}

/// `writ serve` with `write_config(dir, extra)` listening on `127.0.0.1:port`, stderr piped
/// (`WRIT_LOG` set to `log` when given): the child and its stderr.
fn spawn_serve(
    dir: &std::path::Path,
    port: u16,
    extra: &str,
    log: Option<&str>,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStderr>,
) {
    let cfg = write_config(dir, extra);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[server]\n",
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = writ();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    if let Some(level) = log {
        cmd.env("WRIT_LOG", level);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    (child, stderr)
}

#[test]
fn serve_logs_json_with_request_ids_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, Read};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut child, mut stderr) = spawn_serve(dir.path(), port, "", Some("debug"));
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).expect("JSON log lines");
    assert!(
        v["message"].as_str().unwrap().contains("listening"),
        "{first}"
    );
    // One request, with the caller's own id.
    let ours = {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: req-42\r\nconnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        resp.lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no request id in {resp}"))
            .trim()
            .to_string()
    };
    assert_ne!(ours, "req-42", "the broker answers with its own id");
    let started = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let line = rest
        .lines()
        .find(|l| l.contains("req-42"))
        .unwrap_or_else(|| panic!("no request line in:\n{rest}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["span"]["client_request_id"], "req-42");
    assert_eq!(v["span"]["request_id"], ours.as_str());
    assert!(rest.contains("stopped; decision log flushed"), "{rest}");
    // The memory store says what it forgets.
    assert!(
        rest.contains("store.backend is memory: tasks, revocations, blocks and quarantines live in this process only and are forgotten when it stops"),
        "{rest}"
    );
    // The decision log is intact.
    let (ok, stdout, err) = run(writ()
        .args(["audit", "verify"])
        .arg(dir.path().join("audit.jsonl")));
    assert!(ok, "{err}");
    assert!(stdout.contains("chain intact"));
}

#[test]
fn serve_puts_the_admin_api_on_admin_listen_only() {
    use std::io::{BufRead, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let token = "cli-admin-token-0123456789";
    let (mut child, mut stderr) = spawn_serve(
        dir.path(),
        port,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_sha256 = [\"{}\"]\n",
            writ::domain::sha256_hex(token.as_bytes())
        ),
        None,
    );
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(first.contains("listening"), "{first}");
    let main = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    assert_eq!(http_get(&main, "/admin/v1/tasks", token).0, 404);
    let (status, body) = http_get(&admin, "/admin/v1/tasks", token);
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(&admin, "/admin/v1/tasks", "wrong").0, 401);
    assert_eq!(http_get(&main, "/healthz", "").0, 200);
    assert_eq!(http_get(&admin, "/healthz", "").0, 404);
    // The token endpoint is not on the admin listener.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
    s.write_all(b"POST /oauth2/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A signed decision log written through the library, with a checkpoint every 3 records
/// (1 2 3 cp4 5 6 7 cp8 9 10 11 cp12 13), and the broker's JWKS beside it.
fn signed_log(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use writ::token::keys::{KeyAlg, KeySet, SigningKey, generate_pem};
    let pem = generate_pem(KeyAlg::Es256).unwrap();
    let keys = KeySet::new(vec![SigningKey::from_pem(pem.as_bytes(), "k").unwrap()]).unwrap();
    let path = dir.join("decisions.jsonl");
    let log = writ::audit::AuditLog::open_with(
        path.to_str().unwrap(),
        writ::audit::AuditOptions {
            checkpoint_every: 3,
            checkpoint_interval: std::time::Duration::from_secs(3600),
            unauthenticated_per_minute: 20,
            unauthenticated_max_sources: 10,
        },
        Some(keys.clone()),
        std::sync::Arc::new(writ::domain::ManualClock::new(1_800_000_000)),
    )
    .unwrap();
    for i in 1..=10 {
        log.append(
            writ::audit::Event::Exchange,
            writ::audit::Entry {
                decision: Some("allow"),
                reason: format!("r{i}"),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, keys.jwks().to_string()).unwrap();
    (path, jwks)
}

fn read_records(path: &std::path::Path) -> Vec<writ::audit::Record> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_records(path: &std::path::Path, recs: &[writ::audit::Record]) {
    let text: String = recs
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

/// What a forger with write access does after an edit: every later hash recomputed.
fn rechain(recs: &mut [writ::audit::Record], from_seq: u64) {
    for i in 0..recs.len() {
        if recs[i].seq < from_seq {
            continue;
        }
        if i > 0 {
            recs[i].prev = recs[i - 1].hash.clone().unwrap();
        }
        recs[i].hash = Some(recs[i].compute_hash().unwrap());
    }
}

fn audit_verify(log: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    run(writ().args(["audit", "verify"]).arg(log).args(args))
}

#[test]
fn audit_verify_names_the_first_bad_seq_of_an_edited_deleted_or_reordered_log() {
    let dir = tempfile::tempdir().unwrap();
    let (log, jwks) = signed_log(dir.path());
    let jwks = jwks.to_str().unwrap();
    let (ok, stdout, err) = audit_verify(&log, &["--jwks", jwks]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("13 records, chain intact")
            && stdout.contains("checkpoints: 3, signatures verified")
            && stdout.contains("seq 13 comes after the last checkpoint"),
        "{stdout}"
    );
    let original = read_records(&log);
    let tampered = dir.path().join("tampered.jsonl");
    type Tamper = fn(&mut Vec<writ::audit::Record>);
    let cases: [(&str, Tamper, &str); 3] = [
        (
            "edited",
            |r| r[5].reason = "edited".into(),
            "broken at seq 6 (line 6)",
        ),
        ("deleted", |r| drop(r.remove(5)), "broken at seq 6 (line 6)"),
        ("reordered", |r| r.swap(4, 5), "broken at seq 5 (line 5)"),
    ];
    for (what, tamper, expected) in cases {
        let mut recs = original.clone();
        tamper(&mut recs);
        write_records(&tampered, &recs);
        let (ok, _, err) = audit_verify(&tampered, &["--jwks", jwks]);
        assert!(!ok, "{what}: accepted");
        assert!(err.contains(expected), "{what}: {err}");
    }
}

#[test]
fn audit_verify_catches_a_rechained_log_and_a_forged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (log, jwks) = signed_log(dir.path());
    let jwks = jwks.to_str().unwrap();
    let mut recs = read_records(&log);
    recs[5].reason = "edited".into(); // seq 6
    rechain(&mut recs, 6);
    let tampered = dir.path().join("tampered.jsonl");
    write_records(&tampered, &recs);
    // The chain holds again, but the checkpoint at seq 8 signed the old hash of seq 7.
    for args in [&["--jwks", jwks][..], &[]] {
        let (ok, _, err) = audit_verify(&tampered, args);
        assert!(!ok, "a re-chained log was accepted");
        assert!(
            err.contains("broken at seq 8") && err.contains("a record in seq 4 to 7 was rewritten"),
            "{err}"
        );
    }
    // The forger re-signs every later checkpoint with a key of their own.
    let other = writ::token::keys::KeySet::new(vec![
        writ::token::keys::SigningKey::from_pem(
            writ::token::keys::generate_pem(writ::token::keys::KeyAlg::Es256)
                .unwrap()
                .as_bytes(),
            "other",
        )
        .unwrap(),
    ])
    .unwrap();
    for cp in [8u64, 12] {
        let i = recs.iter().position(|r| r.seq == cp).unwrap();
        let (seq, hash) = (recs[i - 1].seq, recs[i - 1].hash.clone().unwrap());
        let jws = writ::audit::checkpoint::sign(&other, seq, &hash).unwrap();
        recs[i].detail = Some(serde_json::json!({"seq": seq, "hash": hash, "jws": jws}));
        rechain(&mut recs, cp);
    }
    write_records(&tampered, &recs);
    let (ok, _, err) = audit_verify(&tampered, &["--jwks", jwks]);
    assert!(!ok, "a forged checkpoint was accepted");
    assert!(
        err.contains("broken at seq 8") && err.contains("which the JWKS does not hold"),
        "{err}"
    );
    // Without the JWKS the signatures cannot be checked, and the output says so.
    let (ok, stdout, err) = audit_verify(&tampered, &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("signatures NOT verified"), "{stdout}");
    // A JWKS that is not one is an error naming it.
    let (ok, _, err) = audit_verify(&tampered, &["--jwks", log.to_str().unwrap()]);
    assert!(!ok && err.contains("the JWKS"), "{err}");
}

/// GET with a bearer over plain HTTP/1.1: (status, body).
fn http_get(base: &str, path: &str, bearer: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {bearer}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

#[test]
fn audit_verify_with_head_from_catches_a_cut_tail() {
    let dev = start_dev_with(&[("WRIT_AUDIT__CHECKPOINT_INTERVAL", "1s")]);
    let d = dev.dir.path();
    for i in 0..3 {
        dev_token(&dev, &format!("token-{i}"));
    }
    let log = d.join(".writ-dev/decisions.jsonl");
    let written = read_records(&log).last().unwrap().seq;
    let admin_file = d.join(".writ-dev/admin-token");
    let admin = std::fs::read_to_string(&admin_file).unwrap();
    // Within a checkpoint interval the broker signs a head covering every exchange.
    let started = std::time::Instant::now();
    let head = loop {
        let (status, body) = http_get(&dev.url, "/admin/v1/audit/head", admin.trim());
        if status == 200 {
            let head: serde_json::Value = serde_json::from_str(&body).unwrap();
            if head["seq"].as_u64().unwrap() >= written {
                break head["seq"].as_u64().unwrap();
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "no head at seq {written} yet: {status} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let jwks = format!("{}/oauth2/jwks", dev.url);
    let with_head = [
        "--jwks",
        &jwks,
        "--head-from",
        &dev.url,
        "--admin-token",
        admin_file.to_str().unwrap(),
    ];
    let copy = d.join("copy.jsonl");
    std::fs::copy(&log, &copy).unwrap();
    let (ok, stdout, err) = audit_verify(&copy, &with_head);
    assert!(ok, "{err}");
    assert!(
        stdout.contains(&format!("signed head at seq {head}")),
        "{stdout}"
    );
    // Cut the tail from the head's record on: the chain alone cannot tell...
    let recs: Vec<_> = read_records(&log)
        .into_iter()
        .filter(|r| r.seq < head)
        .collect();
    write_records(&copy, &recs);
    let (ok, _, err) = audit_verify(&copy, &["--jwks", &jwks]);
    assert!(ok, "{err}");
    // ...the broker's head can.
    let (ok, _, err) = audit_verify(&copy, &with_head);
    assert!(!ok, "a cut log was accepted");
    assert!(
        err.contains(&format!("broken at seq {head}")) && err.contains("cut from the tail"),
        "{err}"
    );
    // The head endpoint is for admins only, and the flags go together.
    let (ok, _, err) = audit_verify(&copy, &["--head-from", &dev.url]);
    assert!(!ok && err.contains("--admin-token"), "{err}");
    let wrong = d.join("wrong-token");
    std::fs::write(&wrong, "nope").unwrap();
    let (ok, _, err) = audit_verify(
        &copy,
        &[
            "--head-from",
            &dev.url,
            "--admin-token",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("401"), "{err}");
}

#[test]
fn config_check_refuses_a_signing_key_listed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let key = dir.path().join("k.pem");
    let kid = writ::token::keys::SigningKey::load(&key).unwrap().kid;
    let text = std::fs::read_to_string(&cfg).unwrap();
    let listed = format!("[\"{}\"]", key.display());
    // The same path twice.
    let twice = format!("[\"{0}\", \"{0}\"]", key.display());
    std::fs::write(&cfg, text.replace(&listed, &twice)).unwrap();
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    let want = format!(
        "error: config error at `tokens.signing_keys[1]`: duplicates tokens.signing_keys[0] (same key, kid {kid})"
    );
    assert!(err.lines().any(|l| l == want), "{err}");
    // Another file with the same key, behind a different key.
    let other = dir.path().join("other.pem");
    let copy = dir.path().join("copy.pem");
    let (ok, _, err) = run(writ()
        .args(["keys", "generate", "--alg", "Ed25519", "--out"])
        .arg(&other));
    assert!(ok, "{err}");
    std::fs::copy(&key, &copy).unwrap();
    let three = format!(
        "[\"{}\", \"{}\", \"{}\"]",
        key.display(),
        other.display(),
        copy.display()
    );
    std::fs::write(&cfg, text.replace(&listed, &three)).unwrap();
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    let want = format!(
        "error: config error at `tokens.signing_keys[2]`: duplicates tokens.signing_keys[0] (same key, kid {kid})"
    );
    assert!(err.lines().any(|l| l == want), "{err}");
}

#[cfg(unix)]
#[test]
fn config_check_warns_of_a_signing_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let key = dir.path().join("k.pem");
    let check = || {
        run(writ()
            .args(["config", "check", "--config"])
            .arg(&cfg)
            .env("NO_COLOR", "1"))
    };
    let (ok, _, err) = check();
    assert!(ok, "{err}");
    assert!(!err.contains("chmod"), "an owner-only key is quiet: {err}");
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let (ok, stdout, err) = check();
        assert!(ok, "a warning, not a refusal: {err}");
        assert!(stdout.contains("config ok"), "{stdout}");
        let line = err
            .lines()
            .find(|l| l.contains("WARN") && l.contains("chmod 600"))
            .unwrap_or_else(|| panic!("no warning for {mode:o}: {err}"));
        assert!(line.contains(&key.display().to_string()), "{line}");
        assert!(line.contains(&format!("{mode:04o}")), "{line}");
    }
}

/// Runs `cmd` for at most `secs` seconds: (exited, success, stderr). A command still
/// running at the bound is killed.
fn run_bounded(cmd: &mut Command, secs: u64) -> (bool, bool, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (true, status.success(), err);
        }
        if start.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            return (false, false, String::new());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A dev broker that writes nothing more to its log (past its first checkpoint) while a test
/// compares the log.
fn start_quiet_dev() -> Dev {
    let dev = start_dev_with(&[("WRIT_AUDIT__CHECKPOINT_INTERVAL", "1h")]);
    let log = dev.dir.path().join(".writ-dev/decisions.jsonl");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("\"event\":\"checkpoint\"")
    {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    dev
}

#[test]
fn config_check_leaves_a_running_brokers_log_byte_identical() {
    let dev = start_quiet_dev();
    let d = dev.dir.path();
    let log = d.join(".writ-dev/decisions.jsonl");
    let before = std::fs::read_to_string(&log).unwrap();
    let (ok, stdout, err) =
        run(writ()
            .current_dir(d)
            .args(["config", "check", "--config", ".writ-dev/writ.toml"]));
    assert!(ok, "{err}");
    assert!(stdout.contains("config ok"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        before,
        "the check wrote to the log"
    );
    let (ok, _, err) = run(writ().current_dir(d).args(["audit", "verify"]).arg(&log));
    assert!(ok, "{err}");
}

#[test]
fn a_second_broker_on_the_same_decision_log_refuses_to_start() {
    let dev = start_quiet_dev();
    let d = dev.dir.path();
    let log = d.join(".writ-dev/decisions.jsonl");
    let before = std::fs::read_to_string(&log).unwrap();
    let (exited, ok, err) = run_bounded(
        writ()
            .current_dir(d)
            .env("WRIT_SERVER__LISTEN", "127.0.0.1:0")
            .args(["serve", "--config", ".writ-dev/writ.toml"]),
        20,
    );
    assert!(exited, "a second broker started on the same decision log");
    assert!(!ok);
    assert!(
        err.contains(
            "config error at `audit.path`: decision log `.writ-dev/decisions.jsonl` is locked: \
             another broker is running and writes it (one process appends to a log; stop that \
             broker, or give this one its own audit.path)"
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
}

#[test]
fn a_second_writ_dev_leaves_the_running_ones_files_alone() {
    let dev = start_quiet_dev();
    let d = dev.dir.path();
    let files = ["writ.toml", "dev.writ.local.bundle.json", "decisions.jsonl"];
    let read_all = || -> Vec<String> {
        files
            .iter()
            .map(|f| std::fs::read_to_string(d.join(".writ-dev").join(f)).unwrap())
            .collect()
    };
    let before = read_all();
    // On the same folder, another port or the same one.
    let other = format!("127.0.0.1:{}", free_port());
    let same = dev.url.trim_start_matches("http://").to_string();
    for listen in [other.as_str(), same.as_str()] {
        let (exited, ok, err) =
            run_bounded(writ().current_dir(d).args(["dev", "--listen", listen]), 20);
        assert!(exited, "a second dev broker started on {listen}");
        assert!(!ok);
        assert!(
            err.contains(
                "error: a `writ dev` broker is already running on .writ-dev/ (its decision log \
                 `.writ-dev/decisions.jsonl` is locked); stop it first. Nothing was written"
            ),
            "{err}"
        );
        assert_eq!(
            read_all(),
            before,
            "files of the running broker changed ({listen})"
        );
    }
    // From another folder, on the running broker's port: nothing is written there either.
    let elsewhere = tempfile::tempdir().unwrap();
    let (exited, ok, err) = run_bounded(
        writ()
            .current_dir(elsewhere.path())
            .args(["dev", "--listen", &same]),
        20,
    );
    assert!(exited && !ok);
    assert!(
        err.contains(&format!("error: cannot listen on `{same}`: ")),
        "{err}"
    );
    assert!(
        err.contains("(is another broker running there? pass --listen to choose another address). Nothing was written"),
        "{err}"
    );
    assert!(!elsewhere.path().join(".writ-dev").exists());
}

#[test]
fn keys_generate_keeps_an_existing_key_unless_forced_and_creates_folders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k.pem");
    let generate = |out: &std::path::Path, force: bool| {
        let mut cmd = writ();
        cmd.args(["keys", "generate", "--alg", "ES256", "--out"])
            .arg(out);
        if force {
            cmd.arg("--force");
        }
        run(&mut cmd)
    };
    let (ok, _, err) = generate(&out, false);
    assert!(ok, "{err}");
    let first = std::fs::read(&out).unwrap();
    let (ok, stdout, err) = generate(&out, false);
    assert!(!ok, "{stdout}");
    assert_eq!(
        err,
        format!(
            "error: key file `{}` already exists; it is kept (replace it with --force)\n",
            out.display()
        )
    );
    assert_eq!(std::fs::read(&out).unwrap(), first);
    let (ok, _, err) = generate(&out, true);
    assert!(ok, "{err}");
    assert_ne!(std::fs::read(&out).unwrap(), first);

    // Missing folders are created.
    let nested = dir.path().join("a/b/k.pem");
    let (ok, _, err) = generate(&nested, false);
    assert!(ok, "{err}");
    assert!(nested.exists());

    // A folder that cannot be: one clean message, its cause said once.
    std::fs::write(dir.path().join("file"), "").unwrap();
    let blocked = dir.path().join("file/k.pem");
    let (ok, _, err) = generate(&blocked, false);
    assert!(!ok);
    assert_eq!(
        err,
        format!(
            "error: cannot write key file `{}`: File exists (os error 17)\n",
            blocked.display()
        )
    );
}

const PASTED_SECRET: &str = "writ-admin-Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eA";

#[test]
fn a_secret_given_where_a_file_is_expected_is_never_echoed() {
    let (ok, _, err) = run(writ()
        .env_remove("WRIT_ADMIN_TOKEN")
        .args([
            "task",
            "list",
            "--broker",
            "http://127.0.0.1:9",
            "--admin-token",
        ])
        .arg(PASTED_SECRET));
    assert!(!ok);
    assert!(!err.contains(PASTED_SECRET), "{err}");
    assert_eq!(
        err,
        "error: the value of --admin-token looks like a secret, not a file name: pass the name \
         of a file holding it, or - to read it from standard input, or set WRIT_ADMIN_TOKEN to \
         the token itself\n"
    );

    let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJlLW5vdC1yZWFs";
    let (ok, _, err) = run(writ().args([
        "token",
        "exchange",
        "--broker",
        "http://127.0.0.1:9",
        "--scope",
        "a",
        "--subject-token",
        jwt,
    ]));
    assert!(!ok);
    assert!(!err.contains(jwt), "{err}");
    assert_eq!(
        err,
        "error: the value of --subject-token looks like a secret, not a file name: pass the \
         name of a file holding it, or - to read it from standard input\n"
    );

    let (ok, _, err) = run(writ()
        .args([
            "revocations",
            "list",
            "--broker",
            "http://127.0.0.1:9",
            "--admin-token",
        ])
        .arg("no-such-file"));
    assert!(!ok);
    assert_eq!(
        err,
        "error: the file named by --admin-token could not be read: no such file\n"
    );

    let (ok, _, err) = run(writ().env_remove("WRIT_ADMIN_TOKEN").args([
        "task",
        "list",
        "--broker",
        "http://127.0.0.1:9",
    ]));
    assert!(!ok);
    assert_eq!(
        err,
        "error: an admin token is needed: pass --admin-token FILE (or - for standard input), \
         or set WRIT_ADMIN_TOKEN to the token\n"
    );

    // Help shows where the token may come from, never its value.
    let (ok, stdout, err) = run(writ()
        .env("WRIT_ADMIN_TOKEN", PASTED_SECRET)
        .env("WRIT_BROKER", "http://127.0.0.1:9")
        .args(["task", "list", "--help"]));
    assert!(ok, "{err}");
    assert!(stdout.contains("WRIT_ADMIN_TOKEN"), "{stdout}");
    assert!(!stdout.contains(PASTED_SECRET), "{stdout}");
}

#[test]
fn broker_urls_without_a_scheme_or_with_a_path_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("t");
    std::fs::write(&tok, "x.y.z").unwrap();
    let exchange = |broker: &str| {
        run(writ()
            .args([
                "token",
                "exchange",
                "--scope",
                "a",
                "--broker",
                broker,
                "--subject-token",
            ])
            .arg(&tok))
    };
    let (ok, _, err) = exchange("127.0.0.1:8080");
    assert!(!ok);
    assert_eq!(
        err,
        "error: `127.0.0.1:8080` is not a broker URL: it has no scheme (write \
         http://127.0.0.1:8080 or https://127.0.0.1:8080)\n"
    );
    let (ok, _, err) = exchange("http://127.0.0.1:8080/oauth2/token");
    assert!(!ok);
    assert_eq!(
        err,
        "error: `http://127.0.0.1:8080/oauth2/token` is not a broker URL: it has a path \
         (`/oauth2/token`); give the broker's base URL, e.g. http://127.0.0.1:8080\n"
    );
    let (ok, _, err) = exchange("ftp://127.0.0.1:8080");
    assert!(!ok);
    assert_eq!(
        err,
        "error: `ftp://127.0.0.1:8080` is not a broker URL: its scheme must be http or https\n"
    );
}

#[test]
fn the_broker_and_the_admin_token_may_come_from_the_environment() {
    let dev = start_dev();
    let d = dev.dir.path();
    let admin = std::fs::read_to_string(d.join(".writ-dev/admin-token")).unwrap();
    let (ok, stdout, err) = run(writ()
        .current_dir(d)
        .env("WRIT_BROKER", &dev.url)
        .env("WRIT_ADMIN_TOKEN", admin.trim())
        .args(["task", "list"]));
    assert!(ok, "{err}");
    assert!(stdout.starts_with("TASK_ID"), "{stdout}");
    // A file named on the command line wins over the environment.
    let (ok, _, err) = run(writ()
        .current_dir(d)
        .env("WRIT_BROKER", &dev.url)
        .env("WRIT_ADMIN_TOKEN", "not-the-token")
        .args(["task", "list", "--admin-token", ".writ-dev/admin-token"]));
    assert!(ok, "{err}");
}

/// `writ <args> --broker URL --admin-token .writ-dev/admin-token` in the dev broker's folder.
fn admin_run(dev: &Dev, args: &[&str]) -> (Option<i32>, String, String) {
    let out = writ()
        .current_dir(dev.dir.path())
        .args(args)
        .args([
            "--broker",
            &dev.url,
            "--admin-token",
            ".writ-dev/admin-token",
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A task token of the dev broker's demo agent, written to `name` in its folder; its task id.
fn dev_token(dev: &Dev, name: &str) -> String {
    let (ok, stdout, err) = run(writ().current_dir(dev.dir.path()).args([
        "token",
        "exchange",
        "--broker",
        &dev.url,
        "--scope",
        "repo:read",
        "--subject-token",
        ".writ-dev/demo.svid",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    std::fs::write(
        dev.dir.path().join(name),
        v["access_token"].as_str().unwrap(),
    )
    .unwrap();
    v["task_id"].as_str().unwrap().to_string()
}

#[test]
fn token_introspect_and_task_get_show_the_state_with_readable_times() {
    let dev = start_dev();
    let task = dev_token(&dev, "tok");
    // Active: status 0, a readable expiry.
    let (code, stdout, err) = admin_run(&dev, &["token", "introspect", "tok"]);
    assert_eq!(code, Some(0), "{err}");
    let active = stdout.lines().find(|l| l.starts_with("active")).unwrap();
    assert!(active.ends_with("true"), "{stdout}");
    let exp = stdout.lines().find(|l| l.starts_with("exp")).unwrap();
    assert!(exp.contains("Z (in "), "{stdout}");
    let (code, stdout, err) = admin_run(&dev, &["token", "introspect", "tok", "--output", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["txn"], task.as_str());

    // The task, as a person and as JSON.
    let (code, stdout, err) = admin_run(&dev, &["task", "get", &task]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains(&task), "{stdout}");
    let state = stdout.lines().find(|l| l.starts_with("state")).unwrap();
    assert!(state.ends_with("open"), "{stdout}");
    let deadline = stdout.lines().find(|l| l.starts_with("deadline")).unwrap();
    assert!(deadline.contains("Z (in "), "{stdout}");
    let (code, stdout, _) = admin_run(&dev, &["task", "get", &task, "--output", "json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["state"], "open");
    let (code, _, err) = admin_run(&dev, &["task", "get", "tsk_nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("(404)"), "{err}");

    // Inactive once its task ended: status 2, exactly `{"active": false}`.
    let (ok, _, err) = run(writ()
        .current_dir(dev.dir.path())
        .args(["task", "end", "--broker", &dev.url, "--token", "tok"]));
    assert!(ok, "{err}");
    let (code, stdout, err) = admin_run(&dev, &["token", "introspect", "tok", "--output", "json"]);
    assert_eq!(code, Some(2), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v, serde_json::json!({"active": false}));
    assert!(err.is_empty(), "{err}");
    // A token pasted where its file is expected is refused and never echoed.
    let (code, _, err) = admin_run(
        &dev,
        &[
            "token",
            "introspect",
            "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("looks like a secret"), "{err}");
    assert!(!err.contains("eyJhbGci"), "{err}");
}

#[test]
fn list_commands_print_a_table_by_default_and_json_on_request() {
    let dev = start_dev();
    let task = dev_token(&dev, "tok");
    let (code, stdout, err) = admin_run(&dev, &["task", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let mut lines = stdout.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("TASK_ID") && header.contains("DEADLINE"),
        "{stdout}"
    );
    let row = lines.find(|l| l.starts_with(&task)).unwrap();
    assert!(row.contains("open") && row.contains("Z (in "), "{stdout}");
    let (code, stdout, _) = admin_run(&dev, &["task", "list", "--output", "json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["tasks"][0]["task_id"], task.as_str());

    let (code, _, err) = admin_run(
        &dev,
        &[
            "revoke",
            "--subject",
            "spiffe://dev.writ.local/agent/*",
            "--reason",
            "drill",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, stdout, err) = admin_run(&dev, &["revocations", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.starts_with("ID "), "{stdout}");
    let row = stdout.lines().nth(1).unwrap();
    assert!(row.starts_with("rev_"), "{stdout}");
    assert!(
        row.contains("subject=spiffe://dev.writ.local/agent/*"),
        "{stdout}"
    );
    assert!(row.contains("drill") && row.contains("Z ("), "{stdout}");
    let (code, stdout, _) = admin_run(&dev, &["revocations", "list", "--output", "json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["revocations"][0]["reason"], "drill");
    let (code, stdout, _) = admin_run(&dev, &["quarantines", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.starts_with("ID ") && stdout.contains("UNTIL"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let (code, _, err) = admin_run(&dev, &["quarantines", "list", "--output", "yaml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("invalid value 'yaml' for '--output"), "{err}");
}

#[test]
fn lift_answers_exactly_for_ids_it_cannot_lift() {
    let dev = start_dev();
    // A jti revocation is final: its id is answered, and lift says why it is not there.
    let (code, stdout, err) = admin_run(&dev, &["revoke", "--jti", "j-1", "--reason", "leak"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rid = v["revocation_id"].as_str().unwrap().to_string();
    let (code, _, err) = admin_run(&dev, &["revocations", "lift", &rid]);
    assert_eq!(code, Some(1));
    assert!(err.contains("(404)"), "{err}");
    assert!(
        err.contains("a jti or task_id revocation is final and leaves nothing to lift"),
        "{err}"
    );
    // Ids of the other kind point at the other command.
    let (code, _, err) = admin_run(&dev, &["revocations", "lift", "qtn_abc"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("`qtn_abc` is a quarantine, not a revocation: lift it with `writ quarantines lift qtn_abc`"),
        "{err}"
    );
    let (code, _, err) = admin_run(&dev, &["quarantines", "lift", &rid]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("lift it with `writ revocations lift {rid}`")),
        "{err}"
    );
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, stdout, err) = run(writ().args(["completions", shell]));
        assert!(ok, "{shell}: {err}");
        assert!(stdout.contains("writ"), "{shell}: {stdout}");
        assert!(stdout.contains("introspect"), "{shell}");
        assert!(stdout.contains("quarantines"), "{shell}");
    }
    let (ok, _, err) = run(writ().args(["completions", "tcsh"]));
    assert!(!ok);
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
}

#[test]
fn config_check_says_it_is_offline_and_is() {
    let (ok, stdout, err) = run(writ().args(["config", "check", "--help"]));
    assert!(ok, "{err}");
    assert!(stdout.contains("Read-only and offline"), "{stdout}");
    assert!(stdout.contains("connects to nothing"), "{stdout}");
    // A store nobody listens on is not noticed: nothing is connected.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let cfg = write_config(
        dir.path(),
        &format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\n"),
    );
    let (ok, stdout, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(ok, "{err}");
    assert!(stdout.contains("config ok"), "{stdout}");
}

#[test]
fn help_lists_the_new_commands() {
    let (ok, stdout, _) = run(writ().arg("--help"));
    assert!(ok);
    assert!(stdout.contains("completions"), "{stdout}");
    let (_, stdout, _) = run(writ().args(["token", "--help"]));
    assert!(stdout.contains("introspect"), "{stdout}");
    let (_, stdout, _) = run(writ().args(["task", "--help"]));
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("get ")),
        "{stdout}"
    );
    let (_, stdout, _) = run(writ().args(["token", "introspect", "--help"]));
    assert!(
        stdout.contains("exits 0 when it is active, 2 when it is not"),
        "{stdout}"
    );
}

/// A JWT with this payload and a junk signature, its header naming key `k1`.
fn unsigned_jwt(payload: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let header = serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
    format!("{}.{}.c2ln", b64(&header), b64(&payload))
}

#[test]
fn serve_logs_without_colour_to_a_pipe_and_warns_of_an_unreachable_issuer() {
    use std::io::{BufRead, Read};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{}", free_port());
    let (mut child, mut stderr) = spawn_serve(
        dir.path(),
        port,
        &format!("[[oidc.issuers]]\nissuer = \"{issuer}\"\naudience = \"writ\"\n"),
        Some("debug"),
    );
    let mut head = String::new();
    while !head.contains("listening") {
        assert!(stderr.read_line(&mut head).unwrap() > 0, "{head}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = unsigned_jwt(serde_json::json!({
        "iss": issuer, "sub": "ci", "aud": "writ", "iat": now, "exp": now + 300,
    }));
    std::fs::write(dir.path().join("oidc.jwt"), token).unwrap();
    let (ok, _, err) = run(writ().current_dir(dir.path()).args([
        "token",
        "exchange",
        "--broker",
        &format!("http://127.0.0.1:{port}"),
        "--scope",
        "repo:read",
        "--subject-token",
        "oidc.jwt",
    ]));
    assert!(!ok && err.contains("(503)"), "{err}");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let all = format!("{head}{rest}");
    assert!(!all.contains('\x1b'), "colour codes in a pipe:\n{all}");
    // One line, a warning of the broker's part that failed; no refusal of the caller.
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("discovery failed"))
        .collect();
    assert_eq!(lines.len(), 1, "{all}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["level"], "WARN", "{all}");
    assert_eq!(v["message"], "identity source unavailable", "{all}");
    assert_eq!(v["part"], "identity", "{all}");
    assert!(!all.contains("subject token refused"), "{all}");
}

#[test]
fn dev_logs_without_colour_to_a_pipe() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = writ()
        .current_dir(dir.path())
        .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The memory store's warning at start.
    let mut err = String::new();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    while !err.contains("store.backend is memory") {
        assert!(stderr.read_line(&mut err).unwrap() > 0, "{err}");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(err.contains("WARN"), "{err}");
    assert!(!err.contains('\x1b'), "colour codes in a pipe:\n{err}");
}

#[test]
fn policy_test_refuses_an_expect_or_action_outside_the_allowed_values() {
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies");
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("typo.json");
    std::fs::write(
        &cases,
        r#"{"cases": [
  {"name": "reads", "principal": "spiffe://dev.writ.local/agent/demo", "scope": "repo:read", "expect": "permit"},
  {"principal": "spiffe://dev.writ.local/agent/demo", "scope": "repo:read", "expect": "allow"},
  {"principal": "spiffe://dev.writ.local/agent/demo", "action": "exchnage", "scope": "repo:read", "expect": "Deny"}
]}"#,
    )
    .unwrap();
    let (ok, stdout, err) = run(writ().args(["policy", "test", policies]).arg(&cases));
    assert!(!ok, "{stdout}");
    assert_eq!(
        err.trim_end(),
        format!(
            "error: policy test cases `{}` are not valid:\n  \
             case 1 (`reads`): `expect` is `permit`; allowed values: `allow`, `deny`\n  \
             case 3: `expect` is `Deny`; allowed values: `allow`, `deny`\n  \
             case 3: `action` is `exchnage`; allowed values: `exchange`, `delegate`",
            cases.display()
        )
    );
    assert_eq!(stdout, "", "no case runs while one is invalid");
}

#[test]
fn policy_check_reports_every_error_with_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    // Two syntax errors in one file, one in another, and a schema violation in a third.
    std::fs::write(
        dir.path().join("a.cedar"),
        "permit (principal, action, resource) when { 1 + };\n\npermit (principal, action, resource) when { ( };\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.cedar"),
        "permit (principal, action, resource\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.cedar"),
        "permit (principal, action, resource);\npermit (principal, action, resource) when { principal.nope == \"x\" };\n",
    )
    .unwrap();
    let (ok, _, err) = run(writ().args(["policy", "check"]).arg(dir.path()));
    assert!(!ok);
    assert_eq!(
        err.trim_end(),
        "error: the policy set has 3 errors:\n  \
         policy file `a.cedar` does not parse: unexpected token `}` (line 1, column 49); \
         unexpected token `}` (line 3, column 47)\n  \
         policy file `b.cedar` does not parse: unexpected end of input (line 1, column 36)\n  \
         policies do not validate against the Writ schema: `c.cedar` policy `c:1`: for policy \
         `c:1`, attribute `nope` on entity type `Writ::Workload` not found (line 2, column 45)"
    );
}

#[test]
fn config_syntax_error_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("writ.toml");
    std::fs::write(
        &cfg,
        "[server]\nissuer = \"https://writ.test\"\n[tokens]\nsigning_keys = [writ-1.pem, writ-2.pem]\n",
    )
    .unwrap();
    let (ok, _, err) = run(writ()
        .args(["config", "check", "--syntax-only", "--config"])
        .arg(&cfg));
    assert!(!ok);
    assert_eq!(
        err.trim_end(),
        "error: config error at `<file>`: not valid TOML at line 4, column 17: string values must be quoted, expected literal string"
    );
}

/// `writ token delegate`: the sub-agent's side of a delegation, with the grant minted by
/// `writ token exchange --task-id ... --audience <sub-agent>`.
#[test]
fn token_delegate_exchanges_a_grant_with_the_actors_own_identity() {
    let dev = start_dev();
    let dir = dev.dir.path();
    let sub = "spiffe://dev.writ.local/agent/sub/reviewer";
    let task = dev_token(&dev, "tok");
    let (ok, svid, err) =
        run(writ()
            .current_dir(dir)
            .args(["dev", "svid", "--spiffe-id", sub, "--ttl", "10m"]));
    assert!(ok, "{err}");
    std::fs::write(dir.join("sub.svid"), svid.trim()).unwrap();
    let (ok, stdout, err) = run(writ().current_dir(dir).args([
        "token",
        "exchange",
        "--broker",
        &dev.url,
        "--subject-token",
        ".writ-dev/demo.svid",
        "--scope",
        "repo:read",
        "--audience",
        sub,
        "--task-id",
        &task,
    ]));
    assert!(ok, "{err}");
    let grant: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(grant["task_id"], task.as_str());
    std::fs::write(dir.join("grant"), grant["access_token"].as_str().unwrap()).unwrap();
    let delegate = |args: &[&str]| {
        run(writ()
            .current_dir(dir)
            .args(["token", "delegate", "--broker", &dev.url])
            .args(args))
    };
    let (ok, stdout, err) = delegate(&[
        "--grant",
        "grant",
        "--actor-token",
        "sub.svid",
        "--scope",
        "repo:read",
        "--audience",
        "https://api.example.org",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let payload = v["access_token"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "spiffe://dev.writ.local/agent/demo");
    assert_eq!(claims["client_id"], sub);
    assert_eq!(claims["act"], serde_json::json!({"sub": sub}));
    assert!(
        v["task_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{task}."))
    );
    // The demo agent is not the grant's audience: the broker's refusal, exit 1.
    let (ok, _, err) = delegate(&[
        "--grant",
        "grant",
        "--actor-token",
        ".writ-dev/demo.svid",
        "--scope",
        "repo:read",
    ]);
    assert!(!ok);
    assert!(err.contains("invalid_grant"), "{err}");
    // A scope outside the grant.
    let (ok, _, err) = delegate(&[
        "--grant",
        "grant",
        "--actor-token",
        "sub.svid",
        "--scope",
        "tickets:read",
    ]);
    assert!(!ok);
    assert!(err.contains("invalid_scope"), "{err}");
    // Both secrets from standard input cannot be.
    let (ok, _, err) = delegate(&["--grant", "-", "--actor-token", "-", "--scope", "repo:read"]);
    assert!(!ok);
    assert!(
        err.contains("only one of --grant and --actor-token"),
        "{err}"
    );
    let (_, stdout, _) = run(writ().args(["token", "--help"]));
    assert!(stdout.contains("delegate"), "{stdout}");
}

/// The approver's side from the command line: an agent's `deploy:prod` is held, listed,
/// approved (its repeat with `--approval-id` gets the token), or denied with a reason.
#[test]
fn approvals_are_listed_approved_and_denied_from_the_command_line() {
    let dev = start_dev();
    let d = dev.dir.path();
    let exchange = |extra: &[&str]| {
        run(writ()
            .current_dir(d)
            .args([
                "token",
                "exchange",
                "--broker",
                &dev.url,
                "--scope",
                "deploy:prod",
                "--purpose",
                "release 1.2",
                "--subject-token",
                ".writ-dev/demo.svid",
            ])
            .args(extra))
    };
    let held = |err: &str| {
        assert!(err.contains("authorization_pending"), "{err}");
        let at = err.find("apr_").unwrap();
        err[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect::<String>()
    };
    let (ok, _, err) = exchange(&[]);
    assert!(!ok);
    let id = held(&err);

    let (code, stdout, err) = admin_run(&dev, &["approvals", "list", "--state", "pending"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.starts_with("ID"), "{stdout}");
    assert!(
        stdout.contains(&id) && stdout.contains("deploy:prod"),
        "{stdout}"
    );

    let (code, stdout, err) = admin_run(&dev, &["approvals", "approve", &id]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["state"], "approved");

    let (ok, stdout, err) = exchange(&["--approval-id", &id]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["scope"], "deploy:prod");

    // Denied, with a reason: the repeat gets access_denied.
    let (_, _, err) = exchange(&[]);
    let second = held(&err);
    let (code, stdout, err) = admin_run(
        &dev,
        &["approvals", "deny", &second, "--reason", "change freeze"],
    );
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("denied"), Some("change freeze"))
    );
    let (ok, _, err) = exchange(&["--approval-id", &second]);
    assert!(!ok && err.contains("access_denied"), "{err}");

    // Deciding it again, or an id that does not exist: a non-zero exit that says why.
    let (code, _, err) = admin_run(&dev, &["approvals", "approve", &second]);
    assert_ne!(code, Some(0));
    assert!(err.contains("409"), "{err}");
    let (code, _, err) = admin_run(&dev, &["approvals", "approve", "apr_nope000000000000"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("404"), "{err}");
}

#[test]
fn token_exchange_with_a_dpop_key_binds_the_token_and_answers_a_nonce_challenge() {
    for env in [&[][..], &[("WRIT_DPOP__REQUIRE_NONCE", "true")][..]] {
        let dev = start_dev_with(env);
        let d = dev.dir.path();
        let (ok, _, err) = run(writ()
            .current_dir(d)
            .args(["keys", "generate", "--alg", "ES256", "--out", "dpop.pem"]));
        assert!(ok, "{err}");
        let (ok, stdout, err) = run(writ().current_dir(d).args([
            "token",
            "exchange",
            "--broker",
            &dev.url,
            "--scope",
            "repo:read",
            "--subject-token",
            ".writ-dev/demo.svid",
            "--dpop-key",
            "dpop.pem",
        ]));
        assert!(ok, "{env:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["token_type"], "DPoP");
        let key = writ::token::keys::SigningKey::load(&d.join("dpop.pem")).unwrap();
        let token = v["access_token"].as_str().unwrap();
        let payload = token.split('.').nth(1).unwrap();
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        // The key's kid is its RFC 7638 thumbprint: the token's cnf.jkt.
        assert_eq!(claims["cnf"]["jkt"], key.kid.as_str());
        // A file that is not a key is named in the error.
        std::fs::write(d.join("not-a-key.pem"), "hello").unwrap();
        let (ok, _, err) = run(writ().current_dir(d).args([
            "token",
            "exchange",
            "--broker",
            &dev.url,
            "--scope",
            "repo:read",
            "--subject-token",
            ".writ-dev/demo.svid",
            "--dpop-key",
            "not-a-key.pem",
        ]));
        assert!(!ok);
        assert!(err.contains("--dpop-key"), "{err}");
    }
}

#[test]
fn config_check_reads_a_bundle_endpoint_ca_and_connects_to_no_trust_source() {
    let dir = tempfile::tempdir().unwrap();
    let td = |extra: &str| {
        format!(
            "[[spiffe.trust_domains]]\nname = \"fed.test\"\naudience = \"writ\"\n\
             bundle_endpoint = \"https://127.0.0.1:{}/bundle\"\n{extra}\
             [[spiffe.trust_domains]]\nname = \"wl.test\"\naudience = \"writ\"\n\
             workload_api = \"unix://{}/nobody.sock\"\n",
            free_port(),
            dir.path().display()
        )
    };
    // Nothing listens on the endpoint or the socket: config check is offline.
    let cfg = write_config(dir.path(), &td(""));
    let (ok, stdout, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(ok, "{err}");
    assert!(stdout.contains("config ok"), "{stdout}");
    // The endpoint's extra CA file is read and must hold PEM certificates.
    let ca = dir.path().join("ca.pem");
    let cfg = write_config(
        dir.path(),
        &td(&format!("bundle_endpoint_ca = \"{}\"\n", ca.display())),
    );
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    assert!(
        err.contains("`spiffe.trust_domains[0].bundle_endpoint_ca`") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let (ok, _, err) = run(writ().args(["config", "check", "--config"]).arg(&cfg));
    assert!(!ok);
    assert!(
        err.contains("`spiffe.trust_domains[0].bundle_endpoint_ca`")
            && err.contains("no PEM certificate"),
        "{err}"
    );
}

/// A token exchange against a broker on `port`: (status, body).
fn exchange(port: u16, subject_token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let body = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token={subject_token}\
         &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&scope=repo%3Aread\
         &audience=https%3A%2F%2Fapi.example.org"
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /oauth2/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// Polls `/readyz` of a broker on `port` until `trust_domain` reads `want` (a prefix).
fn wait_trust_domain(port: u16, trust_domain: &str, want: &str) {
    let start = std::time::Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "not listening"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        let (s, body) = http_get(&format!("http://127.0.0.1:{port}"), "/readyz", "none");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let got = v["checks"]["trust_domains"][trust_domain]
            .as_str()
            .unwrap_or("");
        if s == 200 && got.starts_with(want) {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{trust_domain} never `{want}`: {s} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn serve_reads_a_trust_domain_from_the_workload_api_and_fails_closed_while_it_is_away() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let mut agent =
        spiffe_support::WorkloadApi::start(dir.path(), "spiffe://dev.writ.local/writ", &[]);
    let port = free_port();
    let extra = format!(
        "[[spiffe.trust_domains]]\nname = \"dev.writ.local\"\nworkload_api = \"{}\"\naudience = \"writ\"\n",
        agent.url()
    );
    let (mut child, mut stderr) = spawn_serve(dir.path(), port, &extra, None);
    wait_trust_domain(port, "dev.writ.local", "ok");
    // A JWT-SVID signed by the agent's JWT authority, as its workloads get them.
    let (kid, pem) = agent.jwt_keys("dev.writ.local").remove(0);
    let key = writ::token::keys::SigningKey::from_pem(pem.as_bytes(), "authority").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(key.alg.jwt_alg());
    header.kid = Some(kid);
    let claims = serde_json::json!({"sub": "spiffe://dev.writ.local/agent/demo", "aud": ["writ"],
                                    "iat": now, "exp": now + 300});
    let svid = jsonwebtoken::encode(&header, &claims, key.encoding_key()).unwrap();
    let (s, body) = exchange(port, &svid);
    assert_eq!(s, 200, "{body}");

    agent.stop();
    wait_trust_domain(port, "dev.writ.local", "not ready: Workload API");
    let (s, body) = exchange(port, &svid);
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("\"temporarily_unavailable\""), "{body}");

    agent.start_again();
    wait_trust_domain(port, "dev.writ.local", "ok");
    let (s, body) = exchange(port, &svid);
    assert_eq!(s, 200, "recovered without a restart: {body}");

    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(
        log.contains("Workload API unavailable; its trust domains fail closed until it is back"),
        "{log}"
    );
    assert!(
        log.contains("trust bundle received from the Workload API"),
        "{log}"
    );
}
