//! Every config and shell snippet of README.md works as written: TOML blocks load with the
//! config loader, TOML shown inline parses, example files appear verbatim, and every shell
//! block runs against a `writ dev` broker or says why it cannot.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use writ::config::Config;

const README: &str = include_str!("../README.md");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A fenced block: its language, the README line it starts on, its text.
struct Block {
    lang: String,
    line: usize,
    body: String,
}

fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    for (i, raw) in README.lines().enumerate() {
        let t = raw.trim_start();
        let indent = raw.len() - t.len();
        match (&mut open, t.strip_prefix("```")) {
            (None, Some(lang)) => {
                let block = Block {
                    lang: lang.trim().to_string(),
                    line: i + 1,
                    body: String::new(),
                };
                open = Some((block, indent));
            }
            (Some(_), Some(_)) => out.extend(open.take().map(|(b, _)| b)),
            (Some((b, fence)), None) => {
                // A block inside a list item is indented like its fence.
                b.body.push_str(raw.get(indent.min(*fence)..).unwrap_or(""));
                b.body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README ends inside a fenced block");
    out
}

/// The smallest config every partial snippet is laid over.
const BASE: &str = r#"
[server]
issuer = "https://writ.example.org"
[tokens]
signing_keys = ["keys/writ-1.pem"]
[policy]
dir = "policies"
"#;

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn load(text: &str) -> Result<Config, String> {
    Config::from_toml_with_env(text, std::iter::empty()).map_err(|e| e.to_string())
}

/// A whole config (it names `server.issuer`) must load as it is; a fragment must load when
/// laid over the smallest config, so every key it shows is one Writ knows.
fn check_toml(text: &str) -> Result<(), String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("not TOML: {e}"))?;
    let whole = table.get("server").and_then(|s| s.get("issuer")).is_some();
    if whole {
        return load(text).map(|_| ());
    }
    let mut base: toml::Table = toml::from_str(BASE).unwrap();
    merge(&mut base, table);
    load(&toml::to_string(&base).unwrap()).map(|_| ())
}

#[test]
fn every_toml_block_loads_with_the_config_loader() {
    let mut failures = Vec::new();
    let mut seen = 0;
    for b in blocks().iter().filter(|b| b.lang == "toml") {
        seen += 1;
        if let Err(e) = check_toml(&b.body) {
            failures.push(format!("README line {}: {e}", b.line));
        }
    }
    assert!(seen >= 8, "only {seen} toml blocks found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Inline code outside fenced blocks, e.g. `signing_keys = ["a.pem", "b.pem"]`.
fn inline_spans() -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in README.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let Some(code) = parts.next() {
            out.push((i + 1, code.to_string()));
            parts.next();
        }
    }
    out
}

#[test]
fn inline_toml_assignments_parse() {
    let mut failures = Vec::new();
    let mut seen = 0;
    for (line, code) in inline_spans() {
        let Some((key, _)) = code.split_once(" = ") else {
            continue;
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        {
            continue;
        }
        seen += 1;
        if let Err(e) = toml::from_str::<toml::Table>(&code) {
            failures.push(format!("README line {line}: `{code}`: {}", e.message()));
        }
    }
    assert!(seen >= 3, "only {seen} inline assignments found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn production_example_loads_and_is_shown_verbatim() {
    let path = Path::new(ROOT).join("examples/production/writ.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    load(&text).unwrap();
    assert!(
        blocks().iter().any(|b| b.lang == "toml" && b.body == text),
        "README does not show examples/production/writ.toml verbatim in a toml block"
    );
}

/// What is done with each shell block: run (the block must succeed, or fail with the
/// `# error: ...` line it shows, and print `stdout`), or skipped for a reason.
enum Use {
    Run { stdout: &'static str },
    Skip(&'static str),
}

/// Each README shell block matches the first entry whose marker it contains.
const SHELL: &[(&str, Use)] = &[
    (
        "scripts/test.sh                # run the whole",
        Use::Skip("runs the whole suite, which runs this test"),
    ),
    (
        "cargo run --release -- dev\n",
        Use::Skip("the broker the runnable blocks talk to: this test starts it"),
    ),
    (
        "--purpose \"triage issue 42\"",
        Use::Run {
            stdout: "\"access_token\"",
        },
    ),
    ("--scope \"repo:read repo:admin\"", Use::Run { stdout: "" }),
    (
        "--dpop-key agent-dpop.pem",
        Use::Run {
            stdout: "\"token_type\": \"DPoP\"",
        },
    ),
    (
        "dev svid --spiffe-id spiffe://dev.writ.local/ci/job",
        Use::Run { stdout: "eyJ" },
    ),
    (
        "subject_token=$(cat job.svid)",
        Use::Run {
            stdout: "\"access_token\"",
        },
    ),
    (
        "curl -s http://127.0.0.1:8080/oauth2/token",
        Use::Run {
            stdout: "\"access_token\"",
        },
    ),
    (
        "--cert agent-svid.pem",
        Use::Skip(
            "needs a TLS listener and an X509-SVID; tests/api/mtls.rs and tests/interop run \
             mTLS clients (curl --cert, Python ssl) against one",
        ),
    ),
    (
        "--reason \"compromised runner\"",
        Use::Skip("`rev_...` stands for the id the revocation prints (tests/api runs revocations)"),
    ),
    (
        "writ store confirm-reset",
        Use::Skip("needs a Redis that lost its state (tests/api covers it)"),
    ),
    (
        "quarantines lift qtn_...",
        Use::Skip("`qtn_...` stands for the id a trip prints (tests/api runs trips)"),
    ),
    (
        "docker build",
        Use::Skip("needs docker, kubectl and a cluster; tests/chart renders the chart"),
    ),
    (
        "--set redis.existingSecret=writ-redis",
        Use::Skip("needs kubectl and a cluster; tests/chart renders the existing-Secret wiring"),
    ),
    (
        "INC-1234",
        Use::Skip("a production broker and its admin token"),
    ),
    (
        "openssl rand",
        Use::Run {
            stdout: "admin.token_sha256",
        },
    ),
    (
        "policy test config/policies",
        Use::Run { stdout: "0 failed" },
    ),
    (
        "writ audit verify .writ-dev/decisions.jsonl",
        Use::Run { stdout: "" },
    ),
    ("export WRIT_BROKER", Use::Run { stdout: "" }),
    (
        "token delegate --broker",
        Use::Run {
            stdout: "\"access_token\"",
        },
    ),
    (
        "node_modules/.bin/tsc",
        Use::Skip(
            "needs npm ci in tests/interop/node; tests/interop/run.sh compiles and runs agent.ts",
        ),
    ),
    (
        "python3 examples/agents/agent.py",
        Use::Run {
            stdout: "after the end: 400 invalid_grant",
        },
    ),
];

fn shell_use(body: &str) -> Option<usize> {
    SHELL.iter().position(|(marker, _)| body.contains(marker))
}

#[test]
fn every_shell_block_is_run_or_skipped_for_a_reason() {
    let mut unknown = Vec::new();
    let mut used = vec![false; SHELL.len()];
    for b in blocks()
        .iter()
        .filter(|b| b.lang == "sh" || b.lang == "bash")
    {
        match shell_use(&b.body) {
            Some(i) => {
                used[i] = true;
                if let Use::Skip(reason) = &SHELL[i].1 {
                    assert!(
                        !reason.is_empty(),
                        "README line {}: a skip needs its reason",
                        b.line
                    );
                }
            }
            None => unknown.push(format!("README line {}:\n{}", b.line, b.body)),
        }
    }
    assert!(
        unknown.is_empty(),
        "shell blocks neither run nor skipped:\n{}",
        unknown.join("\n")
    );
    for ((marker, _), used) in SHELL.iter().zip(used) {
        assert!(used, "no README block matches `{marker}` any more");
    }
}

/// `writ dev` in a scratch directory, stopped on drop.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    base: String,
    bin: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev() -> Dev {
    let dir = tempfile::tempdir().unwrap();
    for shared in ["config", "examples"] {
        std::os::unix::fs::symlink(Path::new(ROOT).join(shared), dir.path().join(shared)).unwrap();
    }
    // `writ` on PATH, as the README's production commands call it.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_writ"), bin.join("writ")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_writ"))
        .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dev = Dev {
        child,
        base: format!("http://127.0.0.1:{port}"),
        bin,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || !dev.dir.path().join(".writ-dev/demo.svid").exists()
    {
        assert!(Instant::now() < deadline, "writ dev did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first signed checkpoint (the head `audit verify --head-from` reads) comes
    // within a second of start.
    std::thread::sleep(Duration::from_millis(1500));
    dev
}

/// Runs a block as a user would paste it, with `cargo run --release --` as the built binary.
fn run_block(dev: &Dev, body: &str) -> (bool, String, String) {
    let script = body
        .replace("cargo run --release -- ", "writ ")
        .replace("http://127.0.0.1:8080", &dev.base);
    let path = format!(
        "{}:{}",
        dev.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-eo", "pipefail", "-c", &script])
        .current_dir(dev.dir.path())
        .env("PATH", path)
        .env_remove("WRIT_BROKER")
        .env_remove("WRIT_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn runnable_shell_blocks_work_against_writ_dev() {
    let dev = start_dev();
    let mut failures = Vec::new();
    for b in blocks()
        .iter()
        .filter(|b| b.lang == "sh" || b.lang == "bash")
    {
        let Some(Use::Run { stdout }) = shell_use(&b.body).map(|i| &SHELL[i].1) else {
            continue;
        };
        let (ok, out, err) = run_block(&dev, &b.body);
        let shown_error = b
            .body
            .lines()
            .find_map(|l| l.trim().strip_prefix("# error: "));
        let good = match shown_error {
            Some(text) => !ok && err.contains(&format!("error: {text}")),
            None => ok && out.contains(stdout),
        };
        if !good {
            failures.push(format!(
                "README line {} (ok: {ok}):\n{}--- stdout:\n{out}--- stderr:\n{err}",
                b.line, b.body
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn admin_token_commands_print_the_hash_of_the_token() {
    let dev = start_dev();
    let block = blocks()
        .into_iter()
        .find(|b| b.lang == "sh" && b.body.contains("openssl rand"))
        .unwrap();
    let (ok, out, err) = run_block(&dev, &block.body);
    assert!(ok, "{err}");
    let token = std::fs::read(dev.dir.path().join("admin-token")).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &token);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        out.trim(),
        format!("token_sha256 = [\"{hex}\"]   # admin.token_sha256")
    );
    assert!(check_toml(&format!("[admin]\n{}", out.trim())).is_ok());
}

/// A subject token is the token exactly (RFC 8693 §2.1; a JWT holds no whitespace), so the
/// files the README sends byte for byte must hold none, and a token with a newline is refused.
#[test]
fn subject_tokens_are_not_trimmed_and_demo_svid_has_no_newline() {
    let dev = start_dev();
    let svid = std::fs::read_to_string(dev.dir.path().join(".writ-dev/demo.svid")).unwrap();
    assert_eq!(svid, svid.trim(), "demo.svid must hold the token only");
    let (ok, out, err) = run_block(
        &dev,
        "writ dev svid --spiffe-id spiffe://dev.writ.local/agent/demo > job.svid\n\
         curl -s http://127.0.0.1:8080/oauth2/token \
         -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
         --data-urlencode subject_token@job.svid \
         -d subject_token_type=urn:ietf:params:oauth:token-type:jwt -d scope=repo:read\n",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out,
        r#"{"error":"invalid_request","error_description":"subject_token is not valid"}"#
    );
}

/// The TypeScript shown in the README is the agent example's own code, word for word.
#[test]
fn typescript_blocks_are_excerpts_of_the_agent_example() {
    let source = std::fs::read_to_string(Path::new(ROOT).join("examples/agents/agent.ts")).unwrap();
    let ts: Vec<Block> = blocks().into_iter().filter(|b| b.lang == "ts").collect();
    assert!(!ts.is_empty(), "README shows no ts block");
    for b in ts {
        assert!(
            source.contains(&b.body),
            "README line {}: this ts block is not in examples/agents/agent.ts",
            b.line
        );
    }
}

#[test]
fn helm_values_example_is_shown_verbatim() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("examples/production/my-values.yaml"))
        .unwrap();
    assert!(
        blocks().iter().any(|b| b.lang == "yaml" && b.body == text),
        "README does not show examples/production/my-values.yaml verbatim in a yaml block"
    );
}
