//! The client listener: accept, route match, connection limits, the WebSocket handshake (the
//! OPEN exchange happens before the client's `101`), plain-HTTP pass-through, and drain.

mod handshake;
mod proxy;
mod proxy_h1;
pub mod tls;
pub mod workers;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RouteTable;
use crate::grip::Registry;
use crate::transport::backend::{BackendPool, ProxyBody, full_body};

/// Default of [`GatewaySettings::max_header_bytes`] (`--max-header-bytes`): 16 KiB, as Node.js.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;

/// Settings of the gateway process (flags), as opposed to per-route settings.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Most concurrent WebSocket connections; the next handshake gets `503`.
    pub max_connections: usize,
    /// Time a client has to send its complete handshake request headers.
    pub handshake_timeout: Duration,
    /// After SIGTERM, open connections are served this long before they are closed.
    pub drain_period: Duration,
    /// Closes with 1001 are spread over this window so clients don't reconnect at once.
    pub close_pacing: Duration,
    /// Hard limit for the whole shutdown (drain + close + backend CLOSE requests).
    pub shutdown_timeout: Duration,
    /// Idle backend connections are kept this long.
    pub backend_idle_timeout: Duration,
    /// Idle backend connections kept per backend host.
    pub backend_max_idle_per_host: usize,
    /// Limits on backend response heads (`http://` backends).
    pub backend_response_head: crate::transport::h1::HeadLimits,
    /// Most request headers accepted from a client.
    pub max_headers: usize,
    /// Largest request head accepted from a client, in bytes (request line and headers); a
    /// larger one gets `431` before any backend request.
    pub max_header_bytes: usize,
    /// Data-plane worker threads (`--workers`) that [`workers::start`] runs; the backend pool
    /// keeps idle sockets per worker. 0: connections are served on the caller's runtime
    /// ([`run`]).
    pub workers: usize,
    /// Most publish jobs queued for one data-plane worker (`--publish-backlog`); a publish that
    /// finds the queue full delivers on the publishing thread.
    pub publish_backlog: usize,
    /// TLS on the client listener (`--tls-cert`/`--tls-key`): every connection starts with a
    /// TLS handshake, bounded by `handshake_timeout`. `None`: plain TCP.
    pub tls: Option<tls::ServerTls>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            drain_period: Duration::from_secs(5),
            close_pacing: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(25),
            backend_idle_timeout: Duration::from_secs(90),
            backend_max_idle_per_host: 1024,
            backend_response_head: crate::transport::h1::HeadLimits::default(),
            max_headers: 100,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            workers: 0,
            publish_backlog: crate::grip::DEFAULT_PUBLISH_BACKLOG,
            tls: None,
        }
    }
}

/// Counters of the data plane.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// WebSocket connections open now.
    pub open_connections: AtomicUsize,
    /// Handshakes accepted.
    pub handshakes_accepted: AtomicU64,
    /// Handshakes rejected by the backend.
    pub handshakes_rejected: AtomicU64,
    /// Handshakes failed (backend unreachable or malformed).
    pub handshakes_failed: AtomicU64,
    /// Handshakes refused for the connection limit.
    pub handshakes_over_limit: AtomicU64,
    /// Plain HTTP requests proxied.
    pub http_requests: AtomicU64,
    /// Messages from clients.
    pub client_messages: AtomicU64,
    /// Messages to clients.
    pub backend_messages: AtomicU64,
}

/// Shared state of one gateway process.
pub struct Gateway {
    /// The route table (swapped atomically on reload).
    pub table: Arc<ArcSwap<RouteTable>>,
    /// Backend clients.
    pub pool: BackendPool,
    /// Connections and channels.
    pub registry: Arc<Registry>,
    /// Process settings.
    pub settings: GatewaySettings,
    /// Counters.
    pub stats: GatewayStats,
    /// Per-route metric handles and scrape-time sources (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Fired to close open connections (after the drain period).
    pub close_connections: CancellationToken,
    /// Tracks connection tasks for shutdown.
    pub tracker: TaskTracker,
    /// Set when shutdown begins (readiness fails).
    pub draining: AtomicBool,
    /// Called when a channel gains its first / loses its last local subscriber.
    pub on_channel: Option<crate::grip::nats::ChannelHook>,
    /// Notified whenever a WebSocket connection ends.
    pub conn_closed: tokio::sync::Notify,
    conn_limit: Arc<Semaphore>,
    route_conns: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over a route table.
    pub fn new(table: Arc<ArcSwap<RouteTable>>, settings: GatewaySettings) -> Self {
        Self {
            table,
            pool: BackendPool::new(
                settings.backend_idle_timeout,
                settings.backend_max_idle_per_host,
                settings.backend_response_head,
                settings.workers,
            ),
            registry: Arc::new(Registry::with_workers(settings.workers, settings.publish_backlog)),
            conn_limit: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            stats: GatewayStats::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            close_connections: CancellationToken::new(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            on_channel: None,
            conn_closed: tokio::sync::Notify::new(),
            route_conns: Mutex::new(HashMap::new()),
        }
    }

    fn route_counter(&self, route: &str) -> Arc<AtomicUsize> {
        // Poisoning cannot leave the map inconsistent (single insert).
        let mut m = self.route_conns.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(route.to_owned()).or_default().clone()
    }

    /// Connections counted per route name (open WebSocket connections, handshakes in
    /// progress included), for the `wsgate_open_connections` gauge.
    pub fn route_connections(&self) -> Vec<(String, usize)> {
        let m = self.route_conns.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed))).collect()
    }

    /// Drains: waits `drain_period` serving connections, then closes them with 1001 (paced),
    /// waits for their backend CLOSE requests, bounded by `shutdown_timeout`.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let hard = start + self.settings.shutdown_timeout;
        if self.stats.open_connections.load(Ordering::SeqCst) > 0 {
            tokio::select! {
                () = tokio::time::sleep(self.settings.drain_period) => {}
                () = self.wait_idle() => {}
            }
        }
        self.close_connections.cancel();
        // Open connections notice the cancellation when their task runs next: wake them all.
        self.registry.wake_all();
        self.tracker.close();
        if tokio::time::timeout_at(hard, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = self.stats.open_connections.load(Ordering::SeqCst),
                "shutdown timeout reached with connections still open"
            );
        }
    }
}

impl Gateway {
    /// Resolves once no WebSocket connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.conn_closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stats.open_connections.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The current time as a std `Instant`, following tokio's clock (paused in tests).
pub fn now_std() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Binds a listener with `SO_REUSEADDR` and an accept queue of `backlog` connections
/// (tokio's `TcpListener::bind` uses 128, which drops SYNs under handshake bursts).
///
/// # Errors
///
/// When the socket cannot be created, bound or put in listening state.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Body type of responses to clients.
pub type ResponseBody = ProxyBody;

/// A plain response with a text body.
pub fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(full_body(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

/// Accepts clients until `stop` fires. Each TCP connection is served by hyper (HTTP/1.1 with
/// upgrades), after a TLS handshake when `settings.tls` is set (whose certificate files are
/// then watched for changes until `stop`); WebSocket connections then run in their own
/// tracked task.
pub async fn run(listener: TcpListener, gw: Arc<Gateway>, stop: CancellationToken) {
    let watcher = gw.settings.tls.clone().map(|t| tokio::spawn(t.watch(stop.clone())));
    accept_loop(listener, gw, stop).await;
    if let Some(w) = watcher {
        // Ends with `stop`.
        let _ = w.await;
    }
}

/// [`run`] without the certificate watcher: accepts until `stop`, serving every connection in
/// a tracked task on the current runtime.
pub(crate) async fn accept_loop(listener: TcpListener, gw: Arc<Gateway>, stop: CancellationToken) {
    let acceptor = gw.settings.tls.as_ref().map(tls::ServerTls::acceptor);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let stop = stop.clone();
        let Some(acceptor) = &acceptor else {
            gw.tracker
                .spawn(serve_connection(gw.clone(), TokioIo::new(stream), peer, false, stop));
            continue;
        };
        let acceptor = acceptor.clone();
        let gw2 = gw.clone();
        gw.tracker.spawn(async move {
            // The TLS handshake has the handshake timeout to itself; hyper's header timer
            // starts after it.
            let stream = tokio::select! {
                r = tokio::time::timeout(gw2.settings.handshake_timeout, acceptor.accept(stream)) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, cause = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = stop.cancelled() => return,
            };
            serve_connection(gw2, TokioIo::new(stream), peer, true, stop).await;
        });
    }
}

/// Serves one client connection with hyper until it ends, is upgraded, or `stop` fires.
async fn serve_connection<I>(gw: Arc<Gateway>, io: I, peer: SocketAddr, tls: bool, stop: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let gw2 = gw.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let gw = gw2.clone();
        async move { Ok::<_, Infallible>(handle(gw, req, peer, tls).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(gw.settings.handshake_timeout)
        .max_headers(gw.settings.max_headers)
        .max_header_size(gw.settings.max_header_bytes);
    let conn = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = stop.cancelled() => {}
    }
    // Plain HTTP keep-alive connections finish their current request and close;
    // upgraded connections have left hyper already.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, peer: SocketAddr, tls: bool) -> Response<ResponseBody> {
    let table = gw.table.load_full();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let path = req.uri().path().to_owned();
    let Some((route, prefix)) = table.match_route(host.as_deref(), &path) else {
        return text_response(StatusCode::NOT_FOUND, "no route\n");
    };
    let prefix = prefix.to_owned();
    if handshake::is_websocket_upgrade(&req) {
        handshake::handle(gw.clone(), req, peer, tls, route, prefix, table.version()).await
    } else {
        gw.stats.http_requests.fetch_add(1, Ordering::Relaxed);
        proxy::handle(&gw, req, peer, &route, &prefix, tls).await
    }
}

/// Drops a body, reading at most a little of it (for refused requests).
pub async fn discard(body: Incoming) {
    let _ = http_body_util::Limited::new(body, 64 * 1024).collect().await;
}
