//! TLS on the client listener: `wss://` and `https://` pass-through through rustls, the
//! handshake timeout, clients that don't speak TLS, and certificate reload without
//! disturbing open connections. Clients are tokio-tungstenite / hyper over tokio-rustls,
//! trusting a test CA made with rcgen.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use support::process::GatewayProc;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::protocol::events::{CloseFrame, Event};
use wsgate::server::GatewaySettings;
use wsgate::server::tls::ServerTls;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// Routes with room for 1 MB messages both ways.
fn routes_yaml(backend_url: &str) -> String {
    format!(
        "routes:\n  - name: app\n    backend:\n      url: {backend_url}\n    limits:\n      maxMessageBytes: 2000000\n      \
         maxResponseBytes: 4000000\n      outboundQueueBytes: 4000000\n"
    )
}

/// A test CA and the server certificates it signs.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

/// A server certificate for `localhost`, as PEM files' content and the DER a client sees.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsgate test CA");
        let cert = params.self_signed(&key).expect("ca cert");
        Self {
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn leaf(&self, cn: &str, serial: u64) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A client configuration trusting this CA only, offering `h2` and `http/1.1`.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("root");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A directory removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("wsgate-tls-client-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        Self(dir)
    }

    fn cert(&self) -> PathBuf {
        self.0.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.0.join("tls.key")
    }

    /// Writes the pair, each file replaced atomically (written aside, then renamed).
    fn install(&self, cert_pem: &str, key_pem: &str) {
        write_atomic(&self.key(), key_pem);
        write_atomic(&self.cert(), cert_pem);
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A gateway on 127.0.0.1:0 serving TLS with a fresh CA's certificate.
struct TlsGateway {
    gw: TestGateway,
    tls: ServerTls,
    ca: Ca,
    leaf: Leaf,
    dir: TempDir,
}

impl TlsGateway {
    async fn start(backend_url: &str) -> Self {
        Self::with(backend_url, GatewaySettings::default(), Duration::ZERO).await
    }

    async fn with(backend_url: &str, settings: GatewaySettings, reload_interval: Duration) -> Self {
        let ca = Ca::new();
        let leaf = ca.leaf("wsgate-a", 1001);
        let dir = TempDir::new();
        dir.install(&leaf.cert_pem, &leaf.key_pem);
        let tls = ServerTls::load(dir.cert(), dir.key(), reload_interval).expect("load certificate");
        let routes = wsgate::config::parse_routes_yaml(&routes_yaml(backend_url)).expect("routes");
        let settings = GatewaySettings {
            tls: Some(tls.clone()),
            ..settings
        };
        let gw = TestGateway::with_routes(routes, settings).await;
        Self { gw, tls, ca, leaf, dir }
    }

    async fn tls(&self) -> TlsStream<TcpStream> {
        tls_connect(self.gw.addr, self.ca.client_config()).await
    }

    async fn wss(&self, path: &str) -> Wss {
        Wss::connect(self.gw.addr, self.ca.client_config(), path).await
    }
}

async fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(DEADLINE, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake")
}

/// A `wss://` client and the certificate the server showed it.
struct Wss {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    server_cert: CertificateDer<'static>,
}

impl Wss {
    async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>, path: &str) -> Self {
        let tls = tls_connect(addr, config).await;
        let (_, session) = tls.get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN picks HTTP/1.1");
        let server_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("server certificate")
            .clone()
            .into_owned();
        let url = format!("wss://localhost:{}{path}", addr.port());
        let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("websocket handshake timed out")
            .expect("websocket handshake");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        Self { ws, server_cert }
    }

    async fn send(&mut self, m: WsMessage) {
        self.ws.send(m).await.expect("send");
    }

    async fn next(&mut self) -> WsMessage {
        match tokio::time::timeout(DEADLINE, self.ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => panic!("client error: {e}"),
            Ok(None) => panic!("connection ended"),
            Err(_) => panic!("timed out waiting for a message"),
        }
    }

    async fn echo(&mut self, text: &str) {
        self.send(WsMessage::text(text)).await;
        match self.next().await {
            WsMessage::Text(t) => assert_eq!(t.as_str(), text),
            other => panic!("expected text {text:?}, got {other:?}"),
        }
    }

    /// Waits until the stream ends (after a close handshake).
    async fn expect_end(&mut self) {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("timed out waiting for the connection to end"),
            }
        }
    }
}

/// The echo backend for events; `plain ok` for any other request (pass-through).
async fn echo_and_plain_backend() -> Backend {
    Backend::start(|r| {
        if r.header("content-type") == Some("application/websocket-events") {
            echo_reply(r)
        } else {
            Reply::status(200, "plain ok").header("x-backend", "yes")
        }
    })
    .await
}

#[tokio::test]
async fn wss_echoes_text_binary_large_and_many_messages() {
    let backend = Backend::echo().await;
    let gw = TlsGateway::start(&backend.url()).await;
    let mut c = gw.wss("/").await;
    assert_eq!(c.server_cert, gw.leaf.der);

    c.echo("hello over tls").await;
    c.send(WsMessage::binary(vec![0u8, 1, 2, 255])).await;
    assert_eq!(c.next().await, WsMessage::binary(vec![0u8, 1, 2, 255]));

    // 1 MB each way: many TLS records, more than rustls queues at once.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    c.send(WsMessage::binary(big.clone())).await;
    match c.next().await {
        WsMessage::Binary(b) => assert!(b[..] == big[..], "1 MB binary came back changed ({} bytes)", b.len()),
        other => panic!("expected binary, got {other:?}"),
    }
    let big_text: String = (0..1_000_000u32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    c.send(WsMessage::text(big_text.clone())).await;
    match c.next().await {
        WsMessage::Text(t) => assert!(
            t.as_str() == big_text,
            "1 MB text came back changed ({} bytes)",
            t.len()
        ),
        other => panic!("expected text, got {other:?}"),
    }

    // Many small messages without waiting: all back, in order.
    for i in 0..500 {
        c.ws.feed(WsMessage::text(format!("m{i}"))).await.expect("feed");
    }
    c.ws.flush().await.expect("flush");
    for i in 0..500 {
        match c.next().await {
            WsMessage::Text(t) => assert_eq!(t.as_str(), format!("m{i}")),
            other => panic!("expected m{i}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn backend_sees_https_as_the_forwarded_proto() {
    let backend = Backend::echo().await;
    let gw = TlsGateway::start(&backend.url()).await;
    let mut c = gw.wss("/chat").await;
    c.echo("x").await;
    let open = backend.wait_event(Event::Open).await;
    assert_eq!(open.header("x-forwarded-proto"), Some("https"));

    // The same gateway without TLS says http.
    let plain = TestGateway::start(&backend.url()).await;
    let mut p = plain.connect("/plain").await;
    p.send_text("y").await;
    p.expect_text("y").await;
    let reqs = backend
        .wait_for("OPEN from the plain gateway", |r| {
            r.iter().any(|x| x.uri.path() == "/plain")
        })
        .await;
    let plain_open = reqs.iter().find(|x| x.uri.path() == "/plain").expect("open");
    assert_eq!(plain_open.header("x-forwarded-proto"), Some("http"));
}

#[tokio::test]
async fn pings_are_answered_and_closes_complete_over_tls() {
    let backend = Backend::start(|r| {
        if r.events().contains(&Event::Text(Bytes::from_static(b"close me"))) {
            Reply::events(&[Event::Close(Some(CloseFrame {
                code: 4100,
                reason: "done".into(),
            }))])
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TlsGateway::start(&backend.url()).await;

    // A ping is answered by the gateway.
    let mut c = gw.wss("/").await;
    c.send(WsMessage::Ping(Bytes::from_static(b"are you there"))).await;
    assert_eq!(c.next().await, WsMessage::Pong(Bytes::from_static(b"are you there")));

    // Client close: the backend gets it, the client gets the answer, the connection ends.
    c.ws.close(Some(WsCloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    match c.next().await {
        WsMessage::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected the close answer, got {other:?}"),
    }
    c.expect_end().await;
    backend
        .wait_event(Event::Close(Some(CloseFrame {
            code: 4001,
            reason: "bye".into(),
        })))
        .await;

    // Backend close: the client gets it and the connection ends.
    let mut c = gw.wss("/").await;
    c.send(WsMessage::text("close me")).await;
    match c.next().await {
        WsMessage::Close(Some(f)) => assert_eq!((u16::from(f.code), f.reason.as_str()), (4100, "done")),
        other => panic!("expected close 4100, got {other:?}"),
    }
    c.expect_end().await;
    eventually("connections closed", || async {
        gw.gw
            .gw
            .stats
            .open_connections
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
    })
    .await;
}

#[tokio::test]
async fn plain_http_passes_through_over_tls() {
    let backend = echo_and_plain_backend().await;
    let gw = TlsGateway::start(&backend.url()).await;
    let tls = gw.tls().await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    for i in 0..2 {
        // Twice on one connection: keep-alive over TLS.
        let req = Request::builder()
            .uri(format!("/page/{i}?q=1"))
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
            .await
            .expect("response timed out")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().get("x-backend").map(|v| v.as_bytes()), Some(&b"yes"[..]));
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"plain ok");
    }
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].uri.path_and_query().map(|p| p.as_str()), Some("/page/1?q=1"));
    assert_eq!(
        reqs[1].header("x-forwarded-proto"),
        Some("https"),
        "pass-through knows it came over TLS"
    );
}

#[tokio::test]
async fn a_client_speaking_plain_http_to_the_tls_port_is_dropped_alone() {
    let backend = Backend::echo().await;
    let gw = TlsGateway::start(&backend.url()).await;
    let mut other = gw.wss("/").await;
    other.echo("before").await;

    let mut tcp = TcpStream::connect(gw.gw.addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let r = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut got))
        .await
        .expect("the gateway did not drop the connection");
    // Ended (FIN, or a reset), with at most a TLS alert, never an HTTP answer.
    let _ = r;
    assert!(!got.starts_with(b"HTTP/"), "an HTTP answer on the TLS port: {got:?}");
    assert!(got.is_empty() || got[0] == 0x15, "only a TLS alert record: {got:?}");
    assert!(backend.requests().iter().all(|r| r.header("connection-id").is_some()));

    other.echo("after").await;
    gw.wss("/").await.echo("new").await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_by_the_handshake_timeout() {
    let backend = Backend::echo().await;
    let timeout = Duration::from_millis(300);
    let settings = GatewaySettings {
        handshake_timeout: timeout,
        ..GatewaySettings::default()
    };
    let gw = TlsGateway::with(&backend.url(), settings, Duration::ZERO).await;
    let started = tokio::time::Instant::now();
    // One says nothing; one sends the start of a ClientHello record and stops.
    let mut silent = TcpStream::connect(gw.gw.addr).await.expect("connect");
    let mut partial = TcpStream::connect(gw.gw.addr).await.expect("connect");
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .expect("write");
    // Others are served meanwhile.
    gw.wss("/").await.echo("while stalled").await;
    for (name, s) in [("silent", &mut silent), ("partial", &mut partial)] {
        let mut got = Vec::new();
        // Ends with a FIN or a reset: either way, cut.
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("the {name} handshake was not cut"));
        assert!(got.is_empty() || got[0] == 0x15, "only a TLS alert: {got:?}");
        assert!(
            started.elapsed() >= timeout,
            "the {name} connection was cut after {:?}, before the timeout",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn certificate_reload_serves_new_connections_and_keeps_open_ones() {
    let backend = Backend::echo().await;
    let gw = TlsGateway::with(&backend.url(), GatewaySettings::default(), Duration::from_millis(20)).await;
    let mut status = gw.tls.subscribe();
    let mut old = gw.wss("/").await;
    assert_eq!(old.server_cert, gw.leaf.der);
    old.echo("on the first certificate").await;

    // A new certificate (other serial and CN) replaces the files.
    let next = gw.ca.leaf("wsgate-b", 2002);
    assert_ne!(next.der, gw.leaf.der);
    gw.dir.install(&next.cert_pem, &next.key_pem);
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.loads == 2))
        .await
        .expect("the new certificate was not loaded")
        .expect("status");
    let mut new = gw.wss("/").await;
    assert_eq!(new.server_cert, next.der, "a new connection gets the new certificate");
    new.echo("on the second certificate").await;
    old.echo("the open connection goes on").await;

    // Garbage replaces the files: refused, the second certificate stays. (The swap above
    // may have been seen half done, new key with old certificate, and refused once.)
    let failures = gw.tls.status().failures;
    gw.dir.install("garbage", "more garbage");
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.failures > failures))
        .await
        .expect("the garbage was not noticed")
        .expect("status");
    assert!(gw.tls.status().last_error.is_some());
    let mut third = gw.wss("/").await;
    assert_eq!(third.server_cert, next.der, "the last good certificate is still served");
    third.echo("still served").await;
    old.echo("first").await;
    new.echo("second").await;
}

/// Runs the real binary to its exit (bounded), returning the exit code and stderr.
async fn run_gateway(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["gateway", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--backend", "http://127.0.0.1:9"])
        .args(args)
        .env_remove("WSGATE_TLS_CERT")
        .env_remove("WSGATE_TLS_KEY")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn wsgate");
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("wsgate did not exit")
        .expect("wait");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn cli_tls_flags_come_in_pairs_and_bad_files_exit_64() {
    let (code, err) = run_gateway(&["--tls-cert", "/nonexistent/tls.crt"], &[]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--tls-key"), "names the missing flag: {err}");

    let (code, err) = run_gateway(&[], &[("WSGATE_TLS_KEY", "/nonexistent/tls.key")]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--tls-cert"), "names the missing flag: {err}");

    let dir = TempDir::new();
    dir.install("not a certificate", "not a key");
    let cert = dir.cert().display().to_string();
    let key = dir.key().display().to_string();
    let (code, err) = run_gateway(&["--tls-cert", &cert, "--tls-key", &key], &[]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("tls.crt"), "names the file: {err}");
}

#[tokio::test]
async fn cli_serves_wss_with_the_tls_flags() {
    let backend = Backend::echo().await;
    let ca = Ca::new();
    let leaf = ca.leaf("wsgate-cli", 7);
    let dir = TempDir::new();
    dir.install(&leaf.cert_pem, &leaf.key_pem);
    let cert = dir.cert().display().to_string();
    let key = dir.key().display().to_string();
    let gw = GatewayProc::start(
        &["--backend", &backend.url()],
        &[("WSGATE_TLS_CERT", &cert), ("WSGATE_TLS_KEY", &key)],
    )
    .await;
    let mut c = Wss::connect(gw.addr, ca.client_config(), "/").await;
    assert_eq!(c.server_cert, leaf.der);
    c.echo("through the binary").await;
    let open = backend.wait_event(Event::Open).await;
    assert_eq!(open.header("x-forwarded-proto"), Some("https"));
}
