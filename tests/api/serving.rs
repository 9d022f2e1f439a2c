//! Serving limits (SPEC §8), on real sockets: slow and idle clients are cut off at their
//! timeouts, connections past `max_connections` wait, memory stays bounded, and `/metrics`
//! and the admin API can be moved off the main listener.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Short limits, so that the tests wait seconds, not minutes.
const SHORT: &str = "header_timeout = \"1s\"\nbody_timeout = \"1s\"\nidle_timeout = \"3s\"";
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const BODY_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// How late after its timeout a connection may be closed.
const SLACK: Duration = Duration::from_secs(2);

async fn app_with(server: &str) -> TestApp {
    spawn_app_with(Options {
        server_extra: server.to_string(),
        ..Options::default()
    })
    .await
}

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

/// Waits for the peer to close the connection (EOF or reset), keeping what it sent. `None`
/// when it is still open at `limit`.
async fn wait_closed(
    r: &mut (impl AsyncRead + Unpin),
    limit: Duration,
) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, r.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((start.elapsed(), got)),
            Ok(Ok(n)) => got.extend_from_slice(buf.get(..n).unwrap()),
        }
    }
}

/// Writes `chunk` every `every`, `times` times, stopping at the first failed write.
fn dribble(
    mut w: impl AsyncWrite + Unpin + Send + 'static,
    chunk: &'static [u8],
    every: Duration,
    times: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..times {
            if w.write_all(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        // Keep the write side open (a FIN would end the request early) until aborted.
        std::future::pending::<()>().await;
    })
}

/// Reads one response (head and a `content-length` body); returns the status and body.
async fn read_response(r: &mut (impl AsyncRead + Unpin)) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 16 * 1024, "response head too long");
        let n = r.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "connection closed in a response head: {head:?}");
        head.extend_from_slice(&byte);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: writ\r\n\r\n";

async fn healthz_on(stream: &mut TcpStream) -> u16 {
    stream.write_all(HEALTHZ).await.unwrap();
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), read_response(stream))
        .await
        .expect("no response");
    status
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn metrics_text(app: &TestApp) -> String {
    reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn slow_headers_are_cut_off_at_header_timeout() {
    let app = app_with(SHORT).await;
    let stream = TcpStream::connect(addr(&app)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    w.write_all(b"GET /healthz HTTP/1.1\r\nhost: writ\r\n")
        .await
        .unwrap();
    // A header line every 200 ms: always progressing, never finishing (for 10 s).
    let d = dribble(w, b"x-slow: 1\r\n", Duration::from_millis(200), 50);
    let closed = wait_closed(&mut r, HEADER_TIMEOUT + SLACK).await;
    d.abort();
    let (after, sent) = closed.expect("a slow-header connection outlived header_timeout + 2 s");
    assert!(
        after >= HEADER_TIMEOUT - Duration::from_millis(100),
        "closed after {after:?}, before header_timeout"
    );
    assert!(
        !String::from_utf8_lossy(&sent).contains(" 200 "),
        "an unfinished request was answered"
    );
    let text = metrics_text(&app).await;
    assert_eq!(
        metric(
            &text,
            "writ_http_connections_closed_total{reason=\"header_timeout\"}"
        ),
        1,
        "{text}"
    );
    app.assert_still_serving().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_header_timeout() {
    let app = app_with(SHORT).await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    let closed = wait_closed(&mut stream, HEADER_TIMEOUT + SLACK).await;
    let (after, _) = closed.expect("a connection that sent nothing outlived header_timeout + 2 s");
    assert!(
        after >= HEADER_TIMEOUT - Duration::from_millis(100),
        "{after:?}"
    );
}

#[tokio::test]
async fn slow_bodies_are_cut_off_at_body_timeout() {
    let app = app_with(SHORT).await;
    let stream = TcpStream::connect(addr(&app)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    w.write_all(
        b"POST /oauth2/token HTTP/1.1\r\nhost: writ\r\n\
          content-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\n\
          grant_type=",
    )
    .await
    .unwrap();
    // One byte every 200 ms of a 1000-byte body: it would take 3 minutes.
    let d = dribble(w, b"a", Duration::from_millis(200), 50);
    let closed = wait_closed(&mut r, BODY_TIMEOUT + SLACK).await;
    d.abort();
    let (after, sent) = closed.expect("a slow-body connection outlived body_timeout + 2 s");
    assert!(
        after >= BODY_TIMEOUT - Duration::from_millis(100),
        "closed after {after:?}, before body_timeout"
    );
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 408 "), "{sent}");
    assert!(sent.contains("\"error\":\"invalid_request\""), "{sent}");
    app.assert_still_serving().await;
}

#[tokio::test]
async fn idle_connections_are_closed_at_idle_timeout_not_header_timeout() {
    let mut app = app_with(SHORT).await;
    // The harness's pooled connection would idle out too: let it go.
    app.http = reqwest::Client::new();
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    assert_eq!(healthz_on(&mut stream).await, 200);
    // Idle for longer than header_timeout but less than idle_timeout: still usable.
    tokio::time::sleep(HEADER_TIMEOUT * 2).await;
    assert_eq!(healthz_on(&mut stream).await, 200);
    let closed = wait_closed(&mut stream, IDLE_TIMEOUT + SLACK).await;
    let (after, sent) = closed.expect("an idle connection outlived idle_timeout + 2 s");
    assert!(
        after >= IDLE_TIMEOUT - Duration::from_millis(300),
        "closed after {after:?} idle, before idle_timeout"
    );
    assert!(sent.is_empty(), "{sent:?}");
    let text = metrics_text(&app).await;
    assert_eq!(
        metric(
            &text,
            "writ_http_connections_closed_total{reason=\"idle_timeout\"}"
        ),
        1,
        "{text}"
    );
}

#[tokio::test]
async fn connections_past_max_connections_wait_and_the_served_ones_keep_going() {
    let mut app = app_with("max_connections = 2").await;
    // The harness's own client keeps a pooled connection open: let it go.
    app.http = reqwest::Client::new();
    let mut a = TcpStream::connect(addr(&app)).await.unwrap();
    assert_eq!(healthz_on(&mut a).await, 200);
    let mut b = TcpStream::connect(addr(&app)).await.unwrap();
    assert_eq!(healthz_on(&mut b).await, 200);
    // A third connection is not served while two are open...
    let mut c = TcpStream::connect(addr(&app)).await.unwrap();
    c.write_all(HEALTHZ).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), read_response(&mut c))
            .await
            .is_err(),
        "a third connection was served with max_connections = 2"
    );
    // ...while the two being served keep going...
    assert_eq!(healthz_on(&mut a).await, 200);
    assert_eq!(healthz_on(&mut b).await, 200);
    // ...and it is served as soon as one of them closes.
    drop(b);
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), read_response(&mut c))
        .await
        .expect("the waiting connection was not served after a slot freed");
    assert_eq!(status, 200);
}

/// Resident memory of this process, KiB.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn five_hundred_slow_sockets_neither_starve_nor_hold_the_broker() {
    let app = app_with(SHORT).await;
    let target = addr(&app);
    let started = Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..500 {
        let target = target.clone();
        sockets.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&target).await.unwrap();
            let (mut r, mut w) = stream.into_split();
            w.write_all(b"GET /healthz HTTP/1.1\r\nhost: writ\r\n")
                .await
                .unwrap();
            let d = dribble(w, b"x", Duration::from_millis(250), 40);
            let closed = wait_closed(&mut r, HEADER_TIMEOUT + SLACK).await;
            d.abort();
            closed.is_some()
        }));
    }
    // While they are open, exchanges are answered.
    for _ in 0..3 {
        let t = Instant::now();
        app.assert_still_serving().await;
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    let mut closed = 0;
    for s in sockets {
        closed += usize::from(s.await.unwrap());
    }
    assert_eq!(
        closed,
        500,
        "slow sockets still open {:?} after they connected",
        started.elapsed()
    );
    app.assert_still_serving().await;
}

// Two worker threads, so that an unbounded server would have the CPU to take in all it is
// sent (on one thread it falls behind, and holds less than it would in production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_500_oversized_slow_heads() {
    let app = app_with(SHORT).await;
    let target = addr(&app);
    // Each socket sends 200 KiB of an unfinished header and then waits: unbounded, the
    // broker would hold 500 x 200 KiB = 100 MiB of buffers for as long as they stay.
    let mut payload = b"GET /healthz HTTP/1.1\r\nhost: writ\r\nx-pad: ".to_vec();
    payload.resize(payload.len() + 200 * 1024, b'a');
    let payload = Arc::new(payload);
    let before = vm_rss_kib();
    let mut sockets = Vec::new();
    for _ in 0..500 {
        let (target, payload) = (target.clone(), payload.clone());
        sockets.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&target).await.unwrap();
            let (mut r, mut w) = stream.into_split();
            let writer = tokio::spawn(async move {
                let _ = w.write_all(&payload).await;
                std::future::pending::<()>().await;
            });
            let closed = wait_closed(&mut r, HEADER_TIMEOUT + SLACK).await;
            writer.abort();
            closed.is_some()
        }));
    }
    let mut closed = 0;
    for s in sockets {
        closed += usize::from(s.await.unwrap());
    }
    let after = vm_rss_kib();
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("VmRSS {before} KiB -> {after} KiB (+{grown_mib} MiB), {closed} of 500 closed");
    assert!(
        grown_mib < 48,
        "resident memory grew by {grown_mib} MiB under 500 slow oversized heads"
    );
    assert_eq!(closed, 500, "oversized slow heads still open");
    app.assert_still_serving().await;
}

#[tokio::test]
async fn metrics_are_served_on_their_own_listener_when_configured() {
    // Default: on the main listener.
    let app = spawn_app().await;
    let (s, _) = app.get("/metrics").await;
    assert_eq!(s, 200);

    let port = crate::redis_support::free_port();
    let app = spawn_app_with(Options {
        extra_config: format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        ..Options::default()
    })
    .await;
    app.task_token(AGENT, "repo:read").await;
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("writ_exchanges_total{outcome=\"issued\"} 1"),
        "{text}"
    );
    // Not on the main listener, and nothing else on the metrics listener.
    let (s, _) = app.get("/metrics").await;
    assert_eq!(s, 404);
    let s = reqwest::get(format!("http://127.0.0.1:{port}/oauth2/jwks"))
        .await
        .unwrap()
        .status();
    assert_eq!(s, 404);
    app.assert_still_serving().await;
}

#[tokio::test]
async fn admin_routes_are_served_on_their_own_listener_when_configured() {
    // Default: on the main listener.
    let first = app_with(SHORT).await;
    let (s, v) = first
        .call(
            reqwest::Method::GET,
            "/admin/v1/tasks",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");

    let port = crate::redis_support::free_port();
    let app = spawn_edited(&first, |t| {
        t.replace(
            "[admin]\n",
            &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
        )
    })
    .await;
    let admin = format!("http://127.0.0.1:{port}");
    let (_, task) = app.task_token(AGENT, "repo:read").await;
    // On the admin listener, with request ids as on the main one.
    let resp = app
        .http
        .get(format!("{admin}/admin/v1/tasks"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v.to_string().contains(&task), "{v}");
    // Not on the main listener: answered as an unknown path.
    let (s, _) = app
        .call(
            reqwest::Method::GET,
            "/admin/v1/tasks",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .admin_revoke(serde_json::json!({"selector": {"task_id": task}, "reason": "x"}))
        .await;
    assert_eq!(s, 404);
    // Nothing but the admin API on the admin listener.
    for (method, path) in [
        (reqwest::Method::POST, "/oauth2/token"),
        (reqwest::Method::GET, "/oauth2/jwks"),
        (reqwest::Method::GET, "/metrics"),
    ] {
        let s = app
            .http
            .request(method, format!("{admin}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s, 404, "{path}");
    }
    // The per-connection limits hold there too: a silent connection is cut at header_timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let closed = wait_closed(&mut silent, HEADER_TIMEOUT + SLACK).await;
    assert!(
        closed.is_some(),
        "a silent admin connection outlived header_timeout"
    );
    app.assert_still_serving().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_requests_in_flight() {
    let app = spawn_app().await;
    // A second listener on the same broker, whose stop this test controls.
    let server = writ::app::Application::from_broker(app.broker.clone())
        .await
        .unwrap();
    let target = server.local_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run_until(async move {
        let _ = stopped.await;
    }));

    let mut idle = TcpStream::connect(&target).await.unwrap();
    assert_eq!(healthz_on(&mut idle).await, 200);
    // A request in flight: its head is in, its body half sent.
    let body =
        serde_urlencoded::to_string([("grant_type", GRANT), ("scope", "repo:read")]).unwrap();
    let (first, rest) = body.split_at(10);
    let mut busy = TcpStream::connect(&target).await.unwrap();
    busy.write_all(
        format!(
            "POST /oauth2/token HTTP/1.1\r\nhost: writ\r\n\
             content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{first}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.send(()).unwrap();
    // The idle connection is closed at once.
    let closed = wait_closed(&mut idle, Duration::from_secs(2)).await;
    assert!(closed.is_some(), "an idle connection outlived the stop");
    // New connections are no longer accepted.
    let t = Instant::now();
    while TcpStream::connect(&target).await.is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "still accepting after the stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request in flight is finished and answered, then its connection closed.
    busy.write_all(rest.as_bytes()).await.unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), read_response(&mut busy))
        .await
        .expect("the request in flight was not answered");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("subject_token"), "{body}");
    assert!(
        wait_closed(&mut busy, Duration::from_secs(2))
            .await
            .is_some()
    );
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("run_until did not return once the connections were done")
        .unwrap()
        .unwrap();
    app.assert_still_serving().await;
}

#[tokio::test]
async fn heads_over_max_header_bytes_are_refused_with_431() {
    let app = app_with("max_header_bytes = 8192").await;
    let head = |pad: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nhost: writ\r\nx-pad: {}\r\n\r\n",
            "a".repeat(pad)
        )
    };
    // Under the bound: served.
    let mut ok = TcpStream::connect(addr(&app)).await.unwrap();
    ok.write_all(head(7000).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut ok).await.0, 200);
    // Over it: 431, and the connection is closed.
    let stream = TcpStream::connect(addr(&app)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let _ = w.write_all(head(9000).as_bytes()).await;
    let (_, sent) = wait_closed(&mut r, Duration::from_secs(2))
        .await
        .expect("an oversized head was not refused");
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 431 "), "{sent}");
}
