//! Plain HTTP pass-through to `http://` backends (the in-task client): framing of request and
//! response bodies, keep-alive reuse, connection closes and resets, timeouts and header
//! hygiene, against hand-written backends on 127.0.0.1 that control every byte on the wire.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::{DEADLINE, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---- a raw HTTP/1.1 backend ------------------------------------------------------------------

/// One request as the raw backend read it (body de-chunked).
#[derive(Debug, Clone)]
struct RawRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The connection (by accept order, from 1) it came on.
    conn: usize,
}

impl RawRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A backend connection: reads requests, writes raw bytes.
struct BackendConn {
    stream: TcpStream,
    buf: BytesMut,
    id: usize,
    log: Arc<Mutex<Vec<RawRequest>>>,
}

impl BackendConn {
    async fn fill(&mut self) -> bool {
        matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// The next request head (method, target, headers); `None` when the gateway closed.
    async fn head(&mut self) -> Option<(String, String, Vec<(String, String)>)> {
        loop {
            let mut raw = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut raw);
            if let httparse::Status::Complete(n) = req.parse(&self.buf).expect("gateway sent a valid request head") {
                let head = (
                    req.method.expect("method").to_owned(),
                    req.path.expect("path").to_owned(),
                    req.headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>(),
                );
                self.buf.advance(n);
                return Some(head);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next whole request (body read by its framing), recorded in the backend's log.
    async fn request(&mut self) -> Option<RawRequest> {
        let (method, target, headers) = self.head().await?;
        let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            while let Some(chunk) = self.chunk().await {
                if chunk.is_empty() {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
        } else if let Some(n) = find("content-length") {
            let n: usize = n.parse().expect("numeric content-length");
            while self.buf.len() < n {
                assert!(self.fill().await, "gateway closed mid-body");
            }
            body.extend_from_slice(&self.buf.split_to(n));
        }
        let r = RawRequest {
            method,
            target,
            headers,
            body,
            conn: self.id,
        };
        self.log.lock().expect("lock").push(r.clone());
        Some(r)
    }

    /// One chunk of a chunked request body (empty: the last one, trailers consumed).
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let line = self.line().await?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).expect("hex chunk size");
        if size == 0 {
            while !self.line().await?.is_empty() {}
            return Some(Vec::new());
        }
        while self.buf.len() < size + 2 {
            if !self.fill().await {
                return None;
            }
        }
        let data = self.buf.split_to(size).to_vec();
        assert_eq!(&self.buf[..2], b"\r\n", "CRLF after chunk data");
        self.buf.advance(2);
        Some(data)
    }

    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.advance(i + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("backend write");
    }

    /// A complete `200` with a `Content-Length` body.
    async fn ok(&mut self, body: &str) {
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        self.write(resp.as_bytes()).await;
    }
}

/// A raw backend on 127.0.0.1:0 running `serve` for every accepted connection.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<RawRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(BackendConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a2, l2) = (accepted.clone(), log.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let id = a2.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve(BackendConn {
                    stream,
                    buf: BytesMut::new(),
                    id,
                    log: l2.clone(),
                }));
            }
        });
        Self {
            addr,
            accepted,
            log,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<RawRequest> {
        self.log.lock().expect("lock").clone()
    }
}

/// Serves `200` with the request's method, target and body length, keep-alive, forever.
async fn echo_line(mut c: BackendConn) {
    while let Some(r) = c.request().await {
        c.ok(&format!("{} {} {}", r.method, r.target, r.body.len())).await;
    }
}

// ---- a keep-alive client of the gateway ------------------------------------------------------

type ClientBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One keep-alive HTTP/1.1 connection to the gateway.
struct GwClient {
    sender: hyper::client::conn::http1::SendRequest<ClientBody>,
    addr: SocketAddr,
}

impl GwClient {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to the gateway");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender, addr }
    }

    async fn send(&mut self, method: &str, target: &str, body: ClientBody) -> Response<Incoming> {
        let req = Request::builder()
            .method(method)
            .uri(target)
            .header("host", self.addr.to_string())
            .body(body)
            .expect("request");
        self.send_request(req).await
    }

    async fn send_request(&mut self, req: Request<ClientBody>) -> Response<Incoming> {
        tokio::time::timeout(DEADLINE, async {
            self.sender.ready().await.expect("client connection usable");
            self.sender.send_request(req).await.expect("response")
        })
        .await
        .expect("response timed out")
    }

    /// Sends a request and reads the whole response.
    async fn fetch(&mut self, method: &str, target: &str, body: &[u8]) -> (StatusCode, http::HeaderMap, Bytes) {
        let body = if body.is_empty() && method != "POST" && method != "PUT" {
            Empty::new().boxed()
        } else {
            Full::new(Bytes::copy_from_slice(body)).boxed()
        };
        let resp = self.send(method, target, body).await;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .expect("body timed out")
            .expect("complete body")
            .to_bytes();
        (parts.status, parts.headers, body)
    }
}

/// A request body fed from a channel: unknown length, so it goes out chunked.
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, ClientBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

async fn gateway_with_request_timeout(url: &str, timeout: Duration) -> TestGateway {
    let mut route = wsgate::config::Route::catch_all(url).expect("route");
    route.timeouts.request = timeout;
    TestGateway::with_routes(vec![route], wsgate::server::GatewaySettings::default()).await
}

// ---- tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_reuses_one_backend_connection() {
    let backend = RawBackend::start(echo_line).await;
    let gw = TestGateway::start(&backend.url()).await;
    // Sequential requests from two client connections share the backend connection.
    for round in 0..2 {
        let mut client = GwClient::connect(gw.addr).await;
        for i in 0..5 {
            let (status, _, body) = client.fetch("GET", &format!("/r{round}/{i}"), b"").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, format!("GET /r{round}/{i} 0"));
        }
    }
    assert_eq!(backend.requests().len(), 10);
    assert_eq!(backend.accepted(), 1, "every request went over one backend connection");
}

#[tokio::test]
async fn methods_query_strings_and_content_length_bodies_are_preserved() {
    let backend = RawBackend::start(echo_line).await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let cases: [(&str, &str, &[u8]); 5] = [
        ("POST", "/items?x=1&y=%20z", b"{\"a\":1}"),
        ("PUT", "/items/7?force", b"replacement body"),
        ("DELETE", "/items/7?reason=old&x=", b""),
        ("PATCH", "/items/7", b"p"),
        ("GET", "/search?q=a%2Fb", b""),
    ];
    for (method, target, body) in cases {
        let (status, _, got) = client.fetch(method, target, body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got, format!("{method} {target} {}", body.len()));
    }
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 5);
    assert_eq!(reqs[0].body, b"{\"a\":1}");
    assert_eq!(reqs[0].header("content-length"), Some("7"));
    assert_eq!(reqs[0].header("transfer-encoding"), None);
    assert_eq!(reqs[1].body, b"replacement body");
    // A bodiless DELETE and GET carry no body framing at all.
    assert_eq!(reqs[2].header("content-length"), None);
    assert_eq!(reqs[2].header("transfer-encoding"), None);
    assert_eq!(reqs[4].header("content-length"), None);
    for r in &reqs {
        assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));
        assert!(r.header("host").is_some());
    }
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn chunked_request_and_large_chunked_response_are_streamed() {
    const TOTAL: usize = 20 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let first_chunk_seen = Arc::new(tokio::sync::Notify::new());
    let client_got_start = Arc::new(tokio::sync::Notify::new());
    let (seen2, got2) = (first_chunk_seen.clone(), client_got_start.clone());
    let backend = RawBackend::start(move |mut c| {
        let (seen, got) = (seen2.clone(), got2.clone());
        async move {
            let (method, target, headers) = c.head().await.expect("request head");
            assert_eq!((method.as_str(), target.as_str()), ("POST", "/upload"));
            assert!(headers.iter().any(|(n, v)| n == "transfer-encoding" && v == "chunked"));
            assert!(!headers.iter().any(|(n, _)| n == "content-length"));
            // The first chunk arrives while the client still holds the rest of its body.
            assert_eq!(c.chunk().await.expect("first chunk"), b"part one;");
            seen.notify_one();
            let mut rest = Vec::new();
            loop {
                let chunk = c.chunk().await.expect("chunk");
                if chunk.is_empty() {
                    break;
                }
                rest.extend_from_slice(&chunk);
            }
            assert_eq!(rest, b"part two;part three");
            c.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nstart\r\n")
                .await;
            // The rest is only sent once the client has the start: nothing waits for the whole body.
            got.notified().await;
            let block = vec![b'x'; CHUNK];
            let mut sent = 0;
            while sent < TOTAL {
                c.write(format!("{CHUNK:x}\r\n").as_bytes()).await;
                c.write(&block).await;
                c.write(b"\r\n").await;
                sent += CHUNK;
            }
            c.write(b"0\r\n\r\n").await;
            echo_line(c).await;
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (tx, body) = channel_body();
    let send = tokio::spawn(async move {
        tx.send(Bytes::from_static(b"part one;")).await.expect("send");
        tokio::time::timeout(DEADLINE, first_chunk_seen.notified())
            .await
            .expect("the backend saw the first chunk before the body ended");
        tx.send(Bytes::from_static(b"part two;")).await.expect("send");
        tx.send(Bytes::from_static(b"part three")).await.expect("send");
    });
    let resp = client.send("POST", "/upload", body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    send.await.expect("sender task");
    let mut body = resp.into_body();
    let mut received = 0usize;
    let mut started = false;
    while let Some(frame) = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("frame timed out")
    {
        let frame = frame.expect("body frame");
        let Some(data) = frame.data_ref() else { continue };
        if !started {
            assert!(data.starts_with(b"start"));
            started = true;
            client_got_start.notify_one();
        }
        received += data.len();
    }
    assert_eq!(received, 5 + TOTAL);
    // The connection was left clean: the next request reuses it.
    let (status, _, got) = client.fetch("GET", "/after", b"").await;
    assert_eq!((status, &got[..]), (StatusCode::OK, &b"GET /after 0"[..]));
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn an_early_response_streams_while_the_request_body_is_still_sent() {
    // The backend answers after the first request chunk and echoes each later chunk as it
    // arrives (full duplex): the gateway keeps sending the body while the response streams.
    let backend = RawBackend::start(|mut c| async move {
        let (method, _, _) = c.head().await.expect("request head");
        assert_eq!(method, "POST");
        let first = c.chunk().await.expect("first chunk");
        c.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
        let mut chunk = first;
        while !chunk.is_empty() {
            c.write(format!("{:x}\r\n", chunk.len()).as_bytes()).await;
            c.write(&chunk).await;
            c.write(b"\r\n").await;
            chunk = c.chunk().await.expect("chunk");
        }
        c.write(b"0\r\n\r\n").await;
        echo_line(c).await;
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(b"one")).await.expect("send");
    let resp = client.send("POST", "/duplex", body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut next = async || {
        loop {
            let frame = tokio::time::timeout(DEADLINE, body.frame())
                .await
                .expect("frame timed out")
                .map(|f| f.expect("body frame"));
            match frame {
                Some(f) if f.is_data() => return f.into_data().ok(),
                Some(_) => continue,
                None => return None,
            }
        }
    };
    assert_eq!(next().await.as_deref(), Some(&b"one"[..]));
    tx.send(Bytes::from_static(b"two")).await.expect("send");
    assert_eq!(next().await.as_deref(), Some(&b"two"[..]));
    drop(tx);
    assert_eq!(next().await, None);
    let (status, _, got) = client.fetch("GET", "/after", b"").await;
    assert_eq!((status, &got[..]), (StatusCode::OK, &b"GET /after 0"[..]));
    assert_eq!(
        backend.accepted(),
        1,
        "a completed duplex exchange leaves the connection reusable"
    );
}

#[tokio::test]
async fn head_204_304_and_interim_responses_carry_no_body() {
    let backend = RawBackend::start(|mut c| async move {
        while let Some(r) = c.request().await {
            match r.target.as_str() {
                "/head" => c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\nx-h: 1\r\n\r\n").await,
                "/204" => c.write(b"HTTP/1.1 204 No Content\r\nx-h: 2\r\n\r\n").await,
                "/304" => c.write(b"HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\ncontent-length: 99\r\n\r\n").await,
                "/interim" => c.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate").await,
                _ => c.ok("plain").await,
            }
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (status, headers, body) = client.fetch("HEAD", "/head", b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers.get("content-length").map(|v| v.as_bytes()), Some(&b"1234"[..]));
    assert!(body.is_empty());
    let (status, headers, body) = client.fetch("GET", "/204", b"").await;
    assert_eq!(
        (status, headers.get("x-h").map(|v| v.as_bytes())),
        (StatusCode::NO_CONTENT, Some(&b"2"[..]))
    );
    assert!(body.is_empty());
    let (status, headers, body) = client.fetch("GET", "/304", b"").await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(headers.get("etag").map(|v| v.as_bytes()), Some(&b"\"e\""[..]));
    assert!(body.is_empty());
    let (status, _, body) = client.fetch("GET", "/interim", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"late"[..]));
    // Every response was framed right: the same backend connection still answers.
    let (status, _, body) = client.fetch("GET", "/", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"plain"[..]));
    assert_eq!(backend.requests().len(), 5);
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_close_delimited_response_is_read_to_the_end() {
    let backend = RawBackend::start(|mut c| async move {
        if c.request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
                .await;
            c.write(b"the end").await;
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (status, _, body) = client.fetch("GET", "/", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"until the end"[..]));
    let (status, _, body) = client.fetch("GET", "/", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"until the end"[..]));
    assert_eq!(backend.accepted(), 2, "a close-delimited response ends its connection");
}

#[tokio::test]
async fn backend_connection_close_then_next_request_uses_a_new_connection() {
    let backend = RawBackend::start(|mut c| async move {
        if let Some(r) = c.request().await {
            let body = format!("conn {}", r.conn);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            c.write(resp.as_bytes()).await;
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    for i in 1..=3 {
        let (status, headers, body) = client.fetch("GET", "/", b"").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("conn {i}"));
        assert!(
            headers.get("connection").is_none(),
            "the backend's Connection header is hop-by-hop"
        );
    }
    assert_eq!(backend.accepted(), 3);
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_replaced_transparently() {
    // Connection 1 answers once, then reads the next request and closes without answering
    // (an idle-timeout race); connection 2 closes right after its answer (an idle close the
    // gateway may or may not have noticed); later ones serve normally.
    let backend = RawBackend::start(|mut c| async move {
        match c.id {
            1 => {
                if c.request().await.is_some() {
                    c.ok("first").await;
                }
                let _ = c.head().await;
            }
            2 => {
                if let Some(r) = c.request().await {
                    c.ok(&format!("second {}", r.target)).await;
                }
            }
            _ => echo_line(c).await,
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (status, _, body) = client.fetch("GET", "/1", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"first"[..]));
    // Sent on the pooled connection 1, which closes unanswered: retried on a new one.
    let (status, _, body) = client.fetch("GET", "/2", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"second /2"[..]));
    let (status, _, body) = client.fetch("DELETE", "/3", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"DELETE /3 0"[..]));
    assert_eq!(backend.accepted(), 3);
    let targets: Vec<(usize, String)> = backend.requests().iter().map(|r| (r.conn, r.target.clone())).collect();
    assert_eq!(
        targets,
        vec![(1, "/1".to_owned()), (2, "/2".to_owned()), (3, "/3".to_owned())]
    );
}

#[tokio::test]
async fn a_request_with_a_body_is_not_retried_on_a_closed_pooled_connection() {
    let backend = RawBackend::start(|mut c| async move {
        if c.id == 1 {
            if c.request().await.is_some() {
                c.ok("first").await;
            }
            // Read the next request completely, then close without answering.
            let _ = c.request().await;
        } else {
            echo_line(c).await;
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (status, _, _) = client.fetch("GET", "/1", b"").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = client.fetch("POST", "/2", b"not idempotent").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::BAD_GATEWAY, &b"backend unavailable\n"[..])
    );
    let posts = backend.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "the POST reached the backend once");
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_backend_reset_mid_body_aborts_the_client_body() {
    // The backend resets its connection once the client has the response head.
    let reset = Arc::new(tokio::sync::Notify::new());
    let r2 = reset.clone();
    let backend = RawBackend::start(move |mut c| {
        let reset = r2.clone();
        async move {
            if let Some(r) = c.request().await {
                let head = if r.target == "/chunked" {
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nsome\r\n"
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nsome"
                };
                c.write(head.as_bytes()).await;
                reset.notified().await;
                // An abortive close: RST instead of FIN (a zero linger does not block on drop).
                #[allow(deprecated)]
                c.stream.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
            }
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    for target in ["/length", "/chunked"] {
        let mut client = GwClient::connect(gw.addr).await;
        let resp = client.send("GET", target, Empty::new().boxed()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        reset.notify_one();
        let got = tokio::time::timeout(DEADLINE, resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{target}: the client's body hung"));
        assert!(
            got.is_err(),
            "{target}: the client must see an aborted body, got a complete one"
        );
    }
}

#[tokio::test]
async fn a_slow_backend_gets_504_within_the_request_timeout() {
    let backend = RawBackend::start(|mut c| async move {
        if c.request().await.is_some() {
            // Never answers; holds the connection open.
            std::future::pending::<()>().await;
        }
    })
    .await;
    let timeout = Duration::from_millis(300);
    let gw = gateway_with_request_timeout(&backend.url(), timeout).await;
    let mut client = GwClient::connect(gw.addr).await;
    let started = tokio::time::Instant::now();
    let (status, _, body) = client.fetch("GET", "/slow", b"").await;
    let took = started.elapsed();
    assert_eq!(
        (status, &body[..]),
        (StatusCode::GATEWAY_TIMEOUT, &b"backend timed out\n"[..])
    );
    assert!(took >= timeout, "answered after {took:?}, before the timeout");
    assert!(took < timeout + Duration::from_secs(3), "answered after {took:?}");
}

#[tokio::test]
async fn an_unreachable_backend_gets_502() {
    let addr = support::free_addr();
    let gw = TestGateway::start(&format!("http://{addr}")).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (status, _, body) = client.fetch("GET", "/", b"").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::BAD_GATEWAY, &b"backend unavailable\n"[..])
    );
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_stripped() {
    let backend = RawBackend::start(|mut c| async move {
        while c.request().await.is_some() {
            c.write(
                b"HTTP/1.1 200 OK\r\nconnection: x-custom\r\nkeep-alive: timeout=5\r\nx-custom: 1\r\n\
                  proxy-authenticate: Basic\r\ntrailer: x-t\r\nupgrade: foo\r\nx-kept: yes\r\n\
                  content-length: 2\r\n\r\nok",
            )
            .await;
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = GwClient::connect(gw.addr).await;
    let (status, headers, body) = client.fetch("GET", "/", b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(headers.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    for name in [
        "connection",
        "keep-alive",
        "x-custom",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(headers.get(name).is_none(), "{name} reached the client");
    }
}
