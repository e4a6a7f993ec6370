//! Builders for integration tests: a recording WebSocket-over-HTTP backend, an in-process
//! gateway on 127.0.0.1:0, and WebSocket client helpers. Everything uses real sockets.
#![allow(dead_code)]

pub mod fake_kube;
pub mod nats;
pub mod process;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use wsgate::admin::AdminState;
use wsgate::config::{Route, RouteTable};
use wsgate::protocol::events::{self, Event};
use wsgate::server::{Gateway, GatewaySettings};

/// How long any test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The events of an events request.
    pub fn events(&self) -> Vec<Event> {
        events::decode_body(self.body.clone(), 16 << 20).expect("backend got a malformed events body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn connection_id(&self) -> String {
        self.header("connection-id").expect("Connection-Id header").to_owned()
    }
}

/// What the backend answers.
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Delay before answering (a real delay under test, e.g. a slow backend).
    pub delay: Option<Duration>,
}

impl Reply {
    /// 200 with events.
    pub fn events(evs: &[Event]) -> Self {
        Self {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "application/websocket-events".into())],
            body: events::encode(evs),
            delay: None,
        }
    }

    /// 200 with a raw events body.
    pub fn raw(body: &[u8]) -> Self {
        Self {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "application/websocket-events".into())],
            body: Bytes::copy_from_slice(body),
            delay: None,
        }
    }

    pub fn status(status: u16, body: &str) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("status"),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Bytes::copy_from_slice(body.as_bytes()),
            delay: None,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A recording backend on 127.0.0.1:0.
pub struct Backend {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    notify: Arc<Notify>,
    stop: CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backend {
    /// Starts a backend answering with `handler`.
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        Self::serve(listener, Arc::new(handler))
    }

    /// Starts on an already bound listener (to restart on the same port).
    pub fn serve(listener: TcpListener, handler: Handler) -> Self {
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (r2, n2, s2) = (requests.clone(), notify.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    () = s2.cancelled() => return,
                };
                let (r3, n3, h3) = (r2.clone(), n2.clone(), handler.clone());
                let stop = s2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (r4, n4, h4) = (r3.clone(), n3.clone(), h3.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            let reply = h4(&rec);
                            r4.lock().expect("lock").push(rec);
                            n4.notify_waiters();
                            if let Some(d) = reply.delay {
                                tokio::time::sleep(d).await;
                            }
                            let mut resp = Response::new(Full::new(reply.body));
                            *resp.status_mut() = reply.status;
                            for (k, v) in reply.headers {
                                resp.headers_mut().append(
                                    http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                                    http::HeaderValue::from_str(&v).expect("value"),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            notify,
            stop,
        }
    }

    /// A backend that echoes TEXT and BINARY, answers OPEN with OPEN and CLOSE with CLOSE.
    pub async fn echo() -> Self {
        Self::start(echo_reply).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    /// Waits until `cond` holds over the recorded requests, or fails the test.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let reqs = self.requests.lock().expect("lock");
                if cond(&reqs) {
                    return reqs.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out waiting for backend condition: {what}; got {:#?}",
                    self.requests()
                        .iter()
                        .map(|r| short(&String::from_utf8_lossy(&r.body)))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    /// Waits for a request whose events contain `ev`.
    pub async fn wait_event(&self, ev: Event) -> Recorded {
        let reqs = self
            .wait_for(&format!("event {ev:?}"), |r| {
                r.iter()
                    .any(|x| x.header("content-type").is_some() && x.events().contains(&ev))
            })
            .await;
        reqs.into_iter()
            .find(|x| x.header("content-type").is_some() && x.events().contains(&ev))
            .expect("found")
    }
}

/// A GRIP backend's answer to OPEN: the `grip` extension, and a subscription to `channel`
/// when there is one.
pub fn grip_open_reply(channel: Option<&str>) -> Reply {
    let mut events = vec![Event::Open];
    if let Some(channel) = channel {
        events.push(Event::Text(wsgate::protocol::control::encode_control(
            &wsgate::protocol::control::ControlMessage::Subscribe {
                channel: channel.into(),
                filters: vec![],
            },
        )));
    }
    Reply::events(&events).header("sec-websocket-extensions", "grip")
}

/// A GRIP backend that answers OPEN with the `grip` extension and a subscription to
/// `channel`, and every later request with no events.
pub async fn grip_subscriber_backend(channel: &'static str) -> Backend {
    Backend::start(move |r| {
        if r.events().contains(&Event::Open) {
            grip_open_reply(Some(channel))
        } else {
            Reply::events(&[])
        }
    })
    .await
}

/// The echo backend's reply to one request.
pub fn echo_reply(r: &Recorded) -> Reply {
    let mut out = Vec::new();
    for ev in r.events() {
        match ev {
            Event::Open => out.push(Event::Open),
            Event::Text(b) => out.push(Event::Text(b)),
            Event::Binary(b) => out.push(Event::Binary(b)),
            Event::Close(f) => out.push(Event::Close(f)),
            _ => {}
        }
    }
    Reply::events(&out)
}

/// An in-process gateway on 127.0.0.1:0 with its admin listener.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gw: Arc<Gateway>,
    pub table: Arc<ArcSwap<RouteTable>>,
    stop: CancellationToken,
    admin_stop: CancellationToken,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
        self.admin_stop.cancel();
        self.gw.close_connections.cancel();
        self.gw.registry.wake_all();
    }
}

impl TestGateway {
    /// A gateway with one catch-all route to `backend_url`.
    pub async fn start(backend_url: &str) -> Self {
        let route = Route::catch_all(backend_url).expect("catch-all route");
        Self::with_routes(vec![route], GatewaySettings::default()).await
    }

    /// A gateway from a routes-file YAML text.
    pub async fn from_yaml(yaml: &str) -> Self {
        let routes = wsgate::config::parse_routes_yaml(yaml).expect("valid routes yaml");
        Self::with_routes(routes, GatewaySettings::default()).await
    }

    pub async fn with_routes(routes: Vec<Route>, settings: GatewaySettings) -> Self {
        let table = Arc::new(ArcSwap::from_pointee(RouteTable::new(routes, 1).expect("route table")));
        let gw = Gateway::new(table, settings);
        let hub = wsgate::grip::Hub::new(gw.registry.clone());
        Self::with_gateway(gw, hub).await
    }

    /// A gateway built by the caller (e.g. with `on_channel` set), with `hub` behind its admin
    /// listener's publish and connection APIs.
    pub async fn with_gateway(gw: Gateway, hub: wsgate::grip::Hub) -> Self {
        let table = gw.table.clone();
        let gw = Arc::new(gw);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gateway");
        let addr = listener.local_addr().expect("addr");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin = admin_listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        let state = Arc::new(AdminState {
            listening: true.into(),
            hub,
            ..AdminState::new(gw.clone())
        });
        tokio::spawn(wsgate::admin::run(admin_listener, state, admin_stop.clone()));
        tokio::spawn(wsgate::server::run(listener, gw.clone(), stop.clone()));
        Self {
            addr,
            admin,
            gw,
            table,
            stop,
            admin_stop,
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Connects a WebSocket client, failing the test on error.
    pub async fn connect(&self, path: &str) -> Client {
        let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(self.ws_url(path)))
            .await
            .expect("connect timed out")
            .expect("websocket handshake");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        Client { ws }
    }

    /// Stops accepting and drains like SIGTERM does.
    pub async fn shutdown(&self) {
        self.gw.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.cancel();
        self.gw.drain().await;
    }
}

/// A WebSocket client (tokio-tungstenite).
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(WsMessage::text(s)).await.expect("send text");
    }

    pub async fn send(&mut self, m: WsMessage) {
        self.ws.send(m).await.expect("send");
    }

    /// Next message (pings/pongs included), failing on timeout or end of stream.
    pub async fn next(&mut self) -> WsMessage {
        match tokio::time::timeout(DEADLINE, self.ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => panic!("client error: {e}"),
            Ok(None) => panic!("connection ended"),
            Err(_) => panic!("timed out waiting for a message"),
        }
    }

    /// Next text or binary message, skipping control frames.
    pub async fn next_data(&mut self) -> WsMessage {
        loop {
            let m = self.next().await;
            if matches!(m, WsMessage::Text(_) | WsMessage::Binary(_) | WsMessage::Close(_)) {
                return m;
            }
        }
    }

    pub async fn expect_text(&mut self, want: &str) {
        match self.next_data().await {
            WsMessage::Text(t) => assert!(
                t.as_str() == want,
                "expected text {:?} ({} bytes), got {:?} ({} bytes)",
                short(want),
                want.len(),
                short(t.as_str()),
                t.len()
            ),
            other => panic!("expected text {:?}, got {other:?}", short(want)),
        }
    }

    /// Reads until the close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next()).await {
                Ok(Some(Ok(WsMessage::Close(Some(f))))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Some(Ok(WsMessage::Close(None)))) => return (1005, String::new()),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("expected a close frame, got error {e}"),
                Ok(None) => panic!("expected a close frame, connection ended"),
                Err(_) => panic!("timed out waiting for close"),
            }
        }
    }

    /// Waits until the connection ends without a close frame (TCP closed).
    pub async fn expect_dropped(&mut self) {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return,
                Ok(Some(Ok(WsMessage::Close(f)))) => panic!("expected a drop without close, got close {f:?}"),
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("timed out waiting for the connection to drop"),
            }
        }
    }
}

/// The value of `series` (name with labels, as written) in a Prometheus text exposition.
pub fn metric_in(text: &str, series: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| match l.rsplit_once(' ') {
            Some((name, value)) if name == series => Some(value.to_owned()),
            _ => None,
        })
}

/// Writes a routes file atomically (write + rename), as editors and ConfigMap updates do: a
/// gateway polling it never reads a half-written file.
pub fn write_routes(path: &std::path::Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write routes");
    std::fs::rename(&tmp, path).expect("rename routes");
}

/// [`metric_in`] as a number.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    metric_in(text, series).and_then(|v| v.parse().ok())
}

/// A loopback address whose port was free a moment ago (for processes that need a concrete
/// address to listen on).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The first 80 characters, for failure messages.
pub fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Performs a raw HTTP/1.1 request and returns status, headers and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (StatusCode, HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn.with_upgrades());
    let mut req = Request::builder().method(method).uri(path);
    let mut has_host = false;
    for (k, v) in headers {
        has_host |= k.eq_ignore_ascii_case("host");
        req = req.header(*k, *v);
    }
    if !has_host {
        req = req.header("host", addr.to_string());
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).expect("request");
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("response timed out")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        Bytes::new()
    } else {
        tokio::time::timeout(DEADLINE, body.collect())
            .await
            .expect("body timed out")
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    (parts.status, parts.headers, body)
}

/// Standard handshake headers for a raw upgrade request.
pub fn upgrade_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
}

/// Waits for a condition with the test deadline, yielding between checks.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;
