//! Real SPIFFE servers for tests, each its own Python process (tests/interop/spiffe): a
//! Workload API server on a unix socket and a federation bundle endpoint over HTTPS. Both
//! rotate their keys on a signal and keep their material in a state directory, so a test can
//! stop one and start it again on the same socket or port.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of `.venv-spiffe`, with the pinned packages of
/// tests/interop/spiffe/requirements.lock (installed here when scripts/test.sh has not).
pub fn python() -> PathBuf {
    static READY: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let lock = READY.get_or_init(|| Mutex::new(None));
    let mut ready = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = ready.as_ref() {
        return p.clone();
    }
    let venv = root().join(".venv-spiffe");
    let py = venv.join("bin/python");
    let probe = || {
        Command::new(&py)
            .args([
                "-c",
                "import grpc, cryptography; from spiffe._proto import workload_pb2_grpc",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !probe() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot create {}", venv.display());
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(root().join("tests/interop/spiffe/requirements.lock"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok && probe(),
            "cannot install tests/interop/spiffe/requirements.lock"
        );
    }
    *ready = Some(py.clone());
    py
}

/// A Python server process whose stdout lines are read as they come.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, script: &str, args: &[String]) -> Proc {
        let mut child = Command::new(python())
            .arg(root().join("tests/interop/spiffe").join(script))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines, name }
    }

    /// The next stdout line starting with `prefix` (what follows it).
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(e) => panic!("{}: no `{prefix}` line: {e}", self.name),
            }
        }
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "{}: kill", self.name);
    }

    /// SIGTERM, then SIGKILL if it has not gone within 10 s.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_state(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
}

/// A Workload API server (tests/interop/spiffe/workload_api.py).
pub struct WorkloadApi {
    proc: Option<Proc>,
    args: Vec<String>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

impl WorkloadApi {
    /// Serves the X509-SVID of `spiffe_id`, and the bundles of its trust domain and of
    /// `other_domains`, on `dir/agent.sock`.
    pub fn start(dir: &Path, spiffe_id: &str, other_domains: &[&str]) -> WorkloadApi {
        let socket = dir.join("agent.sock");
        let state_dir = dir.join("workload-api");
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--state".into(),
            state_dir.display().to_string(),
            "--spiffe-id".into(),
            spiffe_id.to_string(),
        ];
        for td in other_domains {
            args.push("--trust-domain".into());
            args.push(td.to_string());
        }
        let mut w = WorkloadApi {
            proc: None,
            args,
            socket,
            state_dir,
        };
        w.start_again();
        w
    }

    /// `unix:///…` of the socket, for `workload_api = ...`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts the server again (same socket, same keys).
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let mut p = Proc::spawn("workload API server", "workload_api.py", &self.args);
        p.wait_line("READY");
        self.proc = Some(p);
    }

    /// Stops the server: its streams end, its socket answers nothing.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    fn change(&mut self, sig: i32) {
        let p = self.proc.as_mut().expect("running");
        p.signal(sig);
        p.wait_line("ROTATED");
    }

    /// Every trust domain gets a new JWT authority; the X509-SVID is re-issued.
    pub fn rotate(&mut self) {
        self.change(libc::SIGUSR1);
    }

    /// Every trust domain keeps only its newest JWT authority.
    pub fn retire(&mut self) {
        self.change(libc::SIGUSR2);
    }

    /// Every trust domain gets a new X.509 CA; the X509-SVID is re-issued by it.
    pub fn rotate_ca(&mut self) {
        self.change(libc::SIGHUP);
    }

    pub fn state(&self) -> Value {
        read_state(&self.state_dir)
    }

    /// The JWT authorities of `td`, oldest first: (kid, PKCS#8 PEM).
    pub fn jwt_keys(&self, td: &str) -> Vec<(String, String)> {
        keys_of(&self.state()["trust_domains"][td]["jwt_keys"])
    }

    /// The X509-SVID served now: (leaf certificate DER, PKCS#8 key DER).
    pub fn svid_der(&self) -> (Vec<u8>, Vec<u8>) {
        let s = self.state();
        let der = |k: &str| {
            pem::parse(s["svid"][k].as_str().unwrap())
                .unwrap()
                .into_contents()
        };
        (der("cert_pem"), der("key_pem"))
    }

    /// The X509-SVID served now as PEM: certificate, then PKCS#8 key.
    pub fn svid_pem(&self) -> String {
        let s = self.state();
        format!(
            "{}{}",
            s["svid"]["cert_pem"].as_str().unwrap(),
            s["svid"]["key_pem"].as_str().unwrap()
        )
    }

    /// The X.509 CA certificates (DER) of `td`, oldest first.
    pub fn ca_ders(&self, td: &str) -> Vec<Vec<u8>> {
        self.state()["trust_domains"][td]["cas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                pem::parse(c["cert_pem"].as_str().unwrap())
                    .unwrap()
                    .into_contents()
            })
            .collect()
    }
}

fn keys_of(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["kid"].as_str().unwrap().to_string(),
                k["pem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A federation bundle endpoint (tests/interop/spiffe/bundle_endpoint.py) over HTTPS, with
/// its own test web CA.
pub struct BundleEndpoint {
    proc: Option<Proc>,
    args: Vec<String>,
    pub url: String,
    pub state_dir: PathBuf,
}

impl BundleEndpoint {
    pub fn start(dir: &Path, td: &str, refresh_hint_secs: u64) -> BundleEndpoint {
        let state_dir = dir.join(format!("bundle-endpoint-{td}"));
        let args = vec![
            "--state".to_string(),
            state_dir.display().to_string(),
            "--trust-domain".into(),
            td.to_string(),
            "--refresh-hint".into(),
            refresh_hint_secs.to_string(),
        ];
        let mut p = Proc::spawn("bundle endpoint", "bundle_endpoint.py", &args);
        let url = p.wait_line("READY");
        BundleEndpoint {
            proc: Some(p),
            args,
            url,
            state_dir,
        }
    }

    /// The PEM of the test web CA that issued the endpoint's certificate.
    pub fn web_ca(&self) -> PathBuf {
        self.state_dir.join("web-ca.pem")
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Starts again on the same port with the same keys.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let port = self
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches("/bundle");
        let mut args = self.args.clone();
        args.extend(["--port".to_string(), port.to_string()]);
        let mut p = Proc::spawn("bundle endpoint", "bundle_endpoint.py", &args);
        assert_eq!(p.wait_line("READY"), self.url);
        self.proc = Some(p);
    }

    fn change(&mut self, sig: i32) {
        let p = self.proc.as_mut().expect("running");
        p.signal(sig);
        p.wait_line("ROTATED");
    }

    pub fn rotate(&mut self) {
        self.change(libc::SIGUSR1);
    }

    pub fn retire(&mut self) {
        self.change(libc::SIGUSR2);
    }

    /// The JWT authorities, oldest first: (kid, PKCS#8 PEM).
    pub fn jwt_keys(&self) -> Vec<(String, String)> {
        keys_of(&read_state(&self.state_dir)["jwt_keys"])
    }

    /// Bundle requests served so far.
    pub fn requests(&self) -> u64 {
        read_state(&self.state_dir)["requests"].as_u64().unwrap()
    }

    /// The trust domain's X.509 CA certificate (DER).
    pub fn ca_der(&self) -> Vec<u8> {
        let s = read_state(&self.state_dir);
        pem::parse(s["ca"]["cert_pem"].as_str().unwrap())
            .unwrap()
            .into_contents()
    }
}
