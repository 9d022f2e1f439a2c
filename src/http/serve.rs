//! The accept loop and the limits that keep slow or hostile clients from holding the broker
//! (SPEC §8).
//!
//! Each connection is served by hyper's HTTP/1 server and watched by its own clock:
//!
//! - **headers**: a new connection must deliver its first request's head within
//!   `header_timeout` of being accepted; on a kept-alive connection a request's head must be
//!   complete within `header_timeout` of its first byte. A head larger than
//!   `max_header_bytes` is answered 431 by hyper.
//! - **body**: a request's body must arrive within `body_timeout` of its head; a late body is
//!   answered 408 and the connection closed.
//! - **idle**: a kept-alive connection with no request in progress is closed after
//!   `idle_timeout`.
//! - **count**: at most `max_connections` connections are served at once; past it the loop
//!   stops accepting (new connections wait in the listen backlog) and the ones being served
//!   keep going.
//!
//! With `[server.tls]` the TLS handshake is part of the first request's head: it must finish
//! within `header_timeout` of the accept, and a connection that never completes one holds a
//! `max_connections` slot no longer than that. A client certificate the handshake accepted
//! reaches every request of the connection as a [`PeerChain`] extension.
//!
//! The handler's own time is not bounded here: a request whose head and body have arrived
//! is the broker's to answer.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::broker::Broker;
use crate::config::ServerConfig;
use crate::error::BrokerError;
use crate::tls::{PeerChain, TlsServer};

/// The per-connection bounds, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
    pub max_header_bytes: usize,
}

impl Limits {
    pub fn from_config(s: &ServerConfig) -> Self {
        Limits {
            header_timeout: s.header_timeout,
            body_timeout: s.body_timeout,
            idle_timeout: s.idle_timeout,
            max_connections: s.max_connections,
            max_header_bytes: usize::try_from(s.max_header_bytes).unwrap_or(16 * 1024),
        }
    }
}

/// Serves `router` on `listener` until `stopping` turns true, then stops accepting and
/// returns once every connection has finished its request in flight (idle connections are
/// closed at once). Dropping the returned future aborts the connections still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    broker: Arc<Broker>,
    name: &'static str,
    tls: Option<Arc<TlsServer>>,
    mut stopping: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(
        usize::try_from(limits.max_connections).unwrap_or(usize::MAX),
    ));
    let open = Arc::new(AtomicU64::new(0));
    let mut connections = JoinSet::new();
    loop {
        // A permit first: past max_connections nothing is accepted, so new connections
        // wait in the kernel's backlog rather than in the broker's memory.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopping.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopping.wait_for(|s| *s) => break,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Per-connection failures (reset before accept) and resource exhaustion
                // (EMFILE) alike: log, breathe, go on.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = Connection {
            router: router.clone(),
            limits,
            broker: broker.clone(),
            name,
            open: open.clone(),
            stopping: stopping.clone(),
            tls: tls.clone(),
        };
        connections.spawn(async move {
            conn.run(stream, peer).await;
            drop(permit);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

struct Connection {
    router: Router,
    limits: Limits,
    broker: Arc<Broker>,
    name: &'static str,
    open: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
    tls: Option<Arc<TlsServer>>,
}

impl Connection {
    async fn run(self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let n = self.open.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        self.broker
            .metrics
            .set("writ_http_open_connections", &[("listener", self.name)], n);

        let clock = Arc::new(ConnClock::new(self.limits));
        let io = WatchedIo {
            inner: stream,
            clock: clock.clone(),
        };
        let name = self.name;
        let (open, broker) = (self.open.clone(), self.broker.clone());
        match self.tls.clone() {
            None => self.serve_io(io, peer, clock, None).await,
            Some(tls) => {
                // The handshake counts against the first head's deadline.
                let deadline = Instant::now() + self.limits.header_timeout;
                match tokio::time::timeout_at(deadline, tls.acceptor().accept(io)).await {
                    Ok(Ok(stream)) => {
                        let chain =
                            stream.get_ref().1.peer_certificates().map(|c| {
                                PeerChain(c.iter().map(|d| d.clone().into_owned()).collect())
                            });
                        self.serve_io(stream, peer, clock, chain).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                        broker.metrics.inc(
                            "writ_http_connections_closed_total",
                            &[("reason", "tls_handshake")],
                        );
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                        broker.metrics.inc(
                            "writ_http_connections_closed_total",
                            &[("reason", "header_timeout")],
                        );
                    }
                }
            }
        }
        let n = open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        broker
            .metrics
            .set("writ_http_open_connections", &[("listener", name)], n);
    }

    /// Serves HTTP/1.1 on `io` (the socket, or TLS over it) under the connection's clock.
    async fn serve_io<I>(
        mut self,
        io: I,
        peer: SocketAddr,
        clock: Arc<ConnClock>,
        chain: Option<PeerChain>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = hyper_util::rt::TokioIo::new(io);
        let svc = {
            let (router, clock, broker) = (self.router.clone(), clock.clone(), self.broker.clone());
            let body_timeout = self.limits.body_timeout;
            hyper::service::service_fn(move |req| {
                handle(
                    req,
                    router.clone(),
                    peer,
                    chain.clone(),
                    clock.clone(),
                    body_timeout,
                    broker.clone(),
                )
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .keep_alive(true)
            .max_buf_size(self.limits.max_header_bytes)
            // The connection clock below bounds the head; hyper's own header timer would
            // also run while a kept-alive connection is idle.
            .header_read_timeout(None);
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);

        let mut draining = false;
        let closed_by: Option<&'static str> = loop {
            let deadline = clock.deadline();
            let changed = clock.changed.notified();
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(listener = self.name, error = %e, "connection ended");
                    }
                    break None;
                }
                _ = sleep_until(deadline) => {
                    if let Some(reason) = clock.expired(Instant::now()) {
                        break Some(reason);
                    }
                }
                _ = changed => {}
                _ = self.stopping.wait_for(|s| *s), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        };
        if let Some(reason) = closed_by {
            tracing::debug!(listener = self.name, %peer, reason, "connection closed");
            self.broker
                .metrics
                .inc("writ_http_connections_closed_total", &[("reason", reason)]);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One request: the connection's clock learns that its head is in, the body gets its
/// deadline, the handler sees the peer address, and the response's end starts the idle
/// clock.
async fn handle(
    req: Request<Incoming>,
    router: Router,
    peer: SocketAddr,
    chain: Option<PeerChain>,
    clock: Arc<ConnClock>,
    body_timeout: Duration,
    broker: Arc<Broker>,
) -> Result<Response<TrackedBody>, Infallible> {
    clock.request_started();
    let done = ResponseDone(clock);
    let late = Arc::new(AtomicBool::new(false));
    let mut req = req.map(|incoming| {
        if incoming.is_end_stream() {
            Body::new(incoming)
        } else {
            Body::new(DeadlineBody {
                inner: incoming,
                deadline: Box::pin(tokio::time::sleep(body_timeout)),
                late: late.clone(),
            })
        }
    });
    req.extensions_mut().insert(ConnectInfo(peer));
    if let Some(chain) = chain {
        req.extensions_mut().insert(chain);
    }
    let resp = match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let resp = if late.load(Ordering::Relaxed) {
        broker.metrics.inc(
            "writ_http_connections_closed_total",
            &[("reason", "body_timeout")],
        );
        body_timeout_response()
    } else {
        resp
    };
    Ok(resp.map(|inner| TrackedBody { inner, _done: done }))
}

/// 408 for a body that did not arrive in time; the connection is closed after it.
fn body_timeout_response() -> Response<Body> {
    let mut resp = BrokerError::invalid_request(
        "the request body did not arrive within the server's body timeout",
    )
    .into_response();
    *resp.status_mut() = StatusCode::REQUEST_TIMEOUT;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// A request is being read, handled or answered.
    Busy,
    /// Kept alive, between requests.
    Idle,
}

struct ClockState {
    phase: Phase,
    deadline: Option<Instant>,
}

/// What a connection is doing and until when it may keep doing it.
struct ConnClock {
    state: Mutex<ClockState>,
    changed: Notify,
    limits: Limits,
}

impl ConnClock {
    fn new(limits: Limits) -> Self {
        ConnClock {
            state: Mutex::new(ClockState {
                phase: Phase::Head,
                deadline: Some(Instant::now() + limits.header_timeout),
            }),
            changed: Notify::new(),
            limits,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.state.lock().deadline
    }

    fn set(&self, phase: Phase, deadline: Option<Instant>) {
        {
            let mut s = self.state.lock();
            s.phase = phase;
            s.deadline = deadline;
        }
        // A stored permit when the watcher is not waiting: it re-reads the deadline.
        self.changed.notify_one();
    }

    /// Bytes arrived: on an idle connection they start a request head.
    fn bytes_read(&self) {
        let idle = self.state.lock().phase == Phase::Idle;
        if idle {
            self.set(
                Phase::Head,
                Some(Instant::now() + self.limits.header_timeout),
            );
        }
    }

    fn request_started(&self) {
        self.set(Phase::Busy, None);
    }

    fn response_done(&self) {
        self.set(Phase::Idle, Some(Instant::now() + self.limits.idle_timeout));
    }

    /// Why the connection must close at `now`, if it must.
    fn expired(&self, now: Instant) -> Option<&'static str> {
        let s = self.state.lock();
        match (s.phase, s.deadline) {
            (Phase::Head, Some(d)) if now >= d => Some("header_timeout"),
            (Phase::Idle, Some(d)) if now >= d => Some("idle_timeout"),
            _ => None,
        }
    }
}

/// Ends the busy phase when the response body is done with (sent, or dropped).
struct ResponseDone(Arc<ConnClock>);

impl Drop for ResponseDone {
    fn drop(&mut self) {
        self.0.response_done();
    }
}

/// A response body that tells the connection clock when it is dropped.
pub struct TrackedBody {
    inner: Body,
    _done: ResponseDone,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body did not arrive within `server.body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

/// A request body with a deadline for the whole of it.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    late: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.late.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, reporting reads to the connection clock.
struct WatchedIo {
    inner: TcpStream,
    clock: Arc<ConnClock>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        r
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
