//! The `writ` binary: exit codes and messages of the offline commands.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::process::Command;

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
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = writ()
        .current_dir(dir.path())
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

#[test]
fn serve_logs_json_with_request_ids_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[server]\n",
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut child = writ()
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("WRIT_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).expect("JSON log lines");
    assert!(
        v["message"].as_str().unwrap().contains("listening"),
        "{first}"
    );
    // One request, with an id.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: req-42\r\nconnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.contains("x-request-id: req-42"),
            "{resp}"
        );
    }
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
    assert_eq!(v["span"]["request_id"], "req-42");
    assert!(rest.contains("stopped; decision log flushed"), "{rest}");
    // The decision log is intact.
    let (ok, stdout, err) = run(writ()
        .args(["audit", "verify"])
        .arg(dir.path().join("audit.jsonl")));
    assert!(ok, "{err}");
    assert!(stdout.contains("chain intact"));
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
