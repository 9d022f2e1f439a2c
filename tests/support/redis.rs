//! Real Redis servers for tests: each on a free loopback port, in its own directory, stopped
//! when dropped. Never the shared port 6379.
//!
//! Every server is tied to the test process: it is started with a parent-death signal, so it
//! goes away even when the test binary is killed. The servers shared by all tests of a binary
//! ([`shared_server_url`], [`shared_cluster_urls`]) live in statics, which are never dropped;
//! they are stopped and their directories removed by an exit handler.

// Each test binary that includes this file uses a different part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what} did not come up within {deadline:?}");
}

/// Runs `f` on one thread that lives as long as the test process. A parent-death signal fires
/// when the *thread* that started the child ends, not the process, and each test runs on its
/// own short-lived thread; so servers are started from this thread.
fn on_keeper_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    type Job = Box<dyn FnOnce() + Send>;
    static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("redis-keeper".into())
            // The sender lives in a static, so this loop ends only with the process.
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .unwrap();
        tx
    });
    let (tx, rx) = mpsc::channel();
    jobs.send(Box::new(move || {
        let _ = tx.send(f());
    }))
    .unwrap();
    rx.recv().unwrap()
}

/// Spawns `cmd` so that the kernel kills it when this test process ends, however it ends.
fn spawn_tied_to_this_process(mut cmd: Command) -> std::io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have gone between fork and prctl: then nothing would kill us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    on_keeper_thread(move || cmd.spawn())
}

/// Values dropped when the test process exits normally (all tests done, failed or not).
static AT_EXIT: Mutex<Vec<Box<dyn Send>>> = Mutex::new(Vec::new());

extern "C" fn drop_at_exit() {
    let kept = match AT_EXIT.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    drop(kept);
}

/// Keeps `value` alive until the test process exits, then drops it.
fn keep_until_exit(value: impl Send + 'static) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a plain function with the C runtime; it runs once, at exit.
        let rc = unsafe { libc::atexit(drop_at_exit) };
        assert_eq!(rc, 0, "atexit failed");
    });
    AT_EXIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Box::new(value));
}

/// The URL of a redis-server shared by all tests of this binary, started on first use.
/// Tests sharing it must keep apart by key prefix.
pub fn shared_server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let server = RedisServer::start();
        let url = server.url();
        keep_until_exit(server);
        url
    })
    .clone()
}

/// The node URLs of a 3-node Redis Cluster shared by all tests of this binary, started on
/// first use. Tests sharing it must keep apart by key prefix.
pub fn shared_cluster_urls() -> Vec<String> {
    static URLS: OnceLock<Vec<String>> = OnceLock::new();
    URLS.get_or_init(|| {
        let cluster = RedisCluster::start();
        let urls = cluster.urls();
        keep_until_exit(cluster);
        urls
    })
    .clone()
}

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_this_process(cmd)
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_for("redis-server", Duration::from_secs(10), || {
            redis_cli(port, &["PING"]).is_some_and(|o| o.trim() == "PONG")
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn cli(&self, args: &[&str]) -> Option<String> {
        redis_cli(self.port, args)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-node Redis Cluster (masters only) on free loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(out.success(), "redis-cli --cluster create failed");
        for n in &nodes {
            let port = n.port;
            wait_for("cluster", Duration::from_secs(20), || {
                redis_cli(port, &["CLUSTER", "INFO"])
                    .is_some_and(|o| o.contains("cluster_state:ok"))
            });
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }
}

impl RedisCluster {
    /// The node serving `slot`, by index into `nodes`.
    pub fn owner_of(&self, slot: u16) -> usize {
        let out = self.nodes[0].cli(&["CLUSTER", "SHARDS"]).unwrap();
        let port = shard_port_for(&out, slot).expect("slot owned by a node");
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }

    /// Up to `n` slots served by node `node`, lowest first, from one look at the cluster.
    pub fn slots_of(&self, node: usize, n: usize) -> Vec<u16> {
        let out = self.nodes[0].cli(&["CLUSTER", "SHARDS"]).unwrap();
        let port = self.nodes[node].port;
        (0..16384u16)
            .filter(|&s| shard_port_for(&out, s) == Some(port))
            .take(n)
            .collect()
    }

    /// Moves `slot` to node `to` as `redis-cli --cluster reshard` does.
    pub fn move_slot(&self, slot: u16, to: usize) {
        self.move_slots(&[slot], to);
    }

    /// Moves `slots` (all on one node) to node `to` as `redis-cli --cluster reshard` does:
    /// IMPORTING on the target, MIGRATING on the source, MIGRATE of every key, then the new
    /// owner on every node (target first).
    pub fn move_slots(&self, slots: &[u16], to: usize) {
        let from = self.begin_move(slots, to);
        self.finish_move(slots, from, to);
    }

    /// The first half of a move: `slots` are MIGRATING on their owner and IMPORTING on `to`;
    /// their keys have not moved yet. Returns the owner.
    pub fn begin_move(&self, slots: &[u16], to: usize) -> usize {
        let from = self.owner_of(slots[0]);
        assert_ne!(from, to, "the slots are already on node {to}");
        let (src_id, dst_id) = (self.nodes[from].id(), self.nodes[to].id());
        let state = |node: usize, how: &str, id: &str| {
            let cmds: Vec<String> = slots
                .iter()
                .map(|s| format!("CLUSTER SETSLOT {s} {how} {id}"))
                .collect();
            let out = self.nodes[node].cli_batch(&cmds);
            assert!(out.lines().all(|l| l.trim() == "OK"), "{how}: {out}");
        };
        state(to, "IMPORTING", &src_id);
        state(from, "MIGRATING", &dst_id);
        from
    }

    /// The second half of a move begun by [`begin_move`]: the keys move, then the owner.
    pub fn finish_move(&self, slots: &[u16], from: usize, to: usize) {
        let (src, dst) = (&self.nodes[from], &self.nodes[to]);
        let counts: Vec<String> = slots
            .iter()
            .map(|s| format!("CLUSTER COUNTKEYSINSLOT {s}"))
            .collect();
        let counts = src.cli_batch(&counts);
        let holding = slots
            .iter()
            .zip(counts.lines())
            .filter(|(_, n)| n.trim() != "0")
            .map(|(s, _)| s);
        for slot in holding {
            let s = slot.to_string();
            loop {
                let keys = src.cli(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]).unwrap();
                let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
                if keys.is_empty() {
                    break;
                }
                let port = dst.port.to_string();
                let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
                args.extend(keys);
                let out = src.cli(&args).unwrap_or_default();
                assert_eq!(out.trim(), "OK", "migrate");
            }
        }
        let dst_id = dst.id();
        let cmds: Vec<String> = slots
            .iter()
            .map(|s| format!("CLUSTER SETSLOT {s} NODE {dst_id}"))
            .collect();
        let others = (0..self.nodes.len()).filter(|&n| n != from && n != to);
        for n in [to, from].into_iter().chain(others) {
            let out = self.nodes[n].cli_batch(&cmds);
            assert!(out.lines().all(|l| l.trim() == "OK"), "node: {out}");
        }
        for n in &self.nodes {
            wait_for("slot move", Duration::from_secs(10), || {
                let out = n.cli(&["CLUSTER", "SHARDS"]).unwrap();
                slots
                    .iter()
                    .all(|&s| shard_port_for(&out, s) == Some(dst.port))
            });
        }
    }
}

impl RedisServer {
    /// This node's cluster id.
    pub fn id(&self) -> String {
        self.cli(&["CLUSTER", "MYID"]).unwrap().trim().to_string()
    }

    /// Runs `commands` (one a line) through one redis-cli; its output.
    pub fn cli_batch(&self, commands: &[String]) -> String {
        use std::io::Write;
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(commands.join("\n").as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The port of the shard owning `slot` in `CLUSTER SHARDS` output (redis-cli's plain form:
/// one value a line).
fn shard_port_for(shards: &str, slot: u16) -> Option<u16> {
    let lines: Vec<&str> = shards.lines().map(str::trim).collect();
    let mut i = 0;
    let mut owns = false;
    while i < lines.len() {
        if lines[i] == "slots" {
            owns = false;
            let mut j = i + 1;
            while j + 1 < lines.len() {
                let (Ok(a), Ok(b)) = (lines[j].parse::<u16>(), lines[j + 1].parse::<u16>()) else {
                    break;
                };
                owns |= a <= slot && slot <= b;
                j += 2;
            }
            i = j;
            continue;
        }
        if owns && lines[i] == "port" {
            return lines.get(i + 1).and_then(|p| p.parse().ok());
        }
        i += 1;
    }
    None
}
