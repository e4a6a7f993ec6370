//! PROTOCOL.md sections 6 and 7 end to end: the publish API and the connection API on the admin
//! listener, with real WebSocket clients subscribed through a real GRIP backend.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use wsgate::admin::AdminState;
use wsgate::admin::auth::Auth;
use wsgate::protocol::control::{ControlMessage, encode_control};
use wsgate::protocol::events::Event;
use wsgate::protocol::publish::{PublishError, WsMessageAction, parse_publish};
use wsgate::protocol::sig::{self, SigningKey};

// ---------------------------------------------------------------------------------------------
// A GRIP backend
// ---------------------------------------------------------------------------------------------

/// The query parameters of a request's URI, e.g. `/?channels=a,b&user=alice`.
fn query(r: &Recorded) -> BTreeMap<String, String> {
    r.uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn control(msg: ControlMessage) -> Event {
    Event::Text(encode_control(&msg))
}

/// A GRIP backend: answers OPEN with `Sec-WebSocket-Extensions: grip`, then (driven by the
/// client's query) `set-meta user=<user>`, and a `subscribe` for each of `channels` (default
/// `room`) with `filters`; `setmeta=<v>` adds `Set-Meta-User: <v>`. Later requests get an empty
/// answer, except that a CLOSE is answered with the same CLOSE.
fn grip_reply(r: &Recorded) -> Reply {
    let events = r.events();
    if events.first() != Some(&Event::Open) {
        let out: Vec<Event> = events.into_iter().filter(|e| matches!(e, Event::Close(_))).collect();
        return Reply::events(&out);
    }
    let q = query(r);
    let mut out = vec![Event::Open];
    if let Some(user) = q.get("user") {
        out.push(control(ControlMessage::SetMeta {
            name: "user".into(),
            value: Some(user.clone()),
        }));
    }
    let filters: Vec<String> = q
        .get("filters")
        .map(|f| f.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let channels = q.get("channels").map_or("room", String::as_str);
    for channel in channels.split(',') {
        out.push(control(ControlMessage::Subscribe {
            channel: channel.to_owned(),
            filters: filters.clone(),
        }));
    }
    let mut reply = Reply::events(&out).header("Sec-WebSocket-Extensions", "grip");
    if let Some(v) = q.get("setmeta") {
        reply = reply.header("Set-Meta-User", v);
    }
    reply
}

async fn grip_backend() -> Backend {
    Backend::start(grip_reply).await
}

/// Connects a client on `path` (which must be unique in the test) and returns it with its
/// Connection-Id once its subscriptions are registered (`channels` in order).
async fn connect_subscribed(gw: &TestGateway, backend: &Backend, path: &str, channels: &[&str]) -> (Client, String) {
    let client = gw.connect(path).await;
    let reqs = backend
        .wait_for(&format!("OPEN for {path}"), |r| {
            r.iter()
                .any(|x| x.uri.path_and_query().map(|p| p.as_str()) == Some(path))
        })
        .await;
    let id = reqs
        .iter()
        .find(|x| x.uri.path_and_query().map(|p| p.as_str()) == Some(path))
        .expect("found")
        .connection_id();
    let registry = gw.gw.registry.clone();
    let want: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
    eventually(&format!("{path} subscribed to {want:?}"), || {
        let info = registry.get(&id).map(|h| h.info());
        let want = want.clone();
        async move { info.is_some_and(|i| i.channels == want) }
    })
    .await;
    (client, id)
}

// ---------------------------------------------------------------------------------------------
// Publishing helpers
// ---------------------------------------------------------------------------------------------

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (StatusCode, HeaderMap, Bytes) {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    http_request(addr, "POST", path, &h, body).await
}

/// A one-item body in the Python shape (format directly on the item).
fn py_body(channel: &str, ws: Value) -> String {
    json!({"items": [{"channel": channel, "ws-message": ws}]}).to_string()
}

/// A one-item body in the JS shape (formats under `formats`).
fn js_body(channel: &str, ws: Value) -> String {
    json!({"items": [{"channel": channel, "formats": {"ws-message": ws}}]}).to_string()
}

async fn publish_ok(gw: &TestGateway, body: &str) {
    let (status, _, resp) = post(gw.admin, "/publish/", &[], body.as_bytes()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "publish answered {:?}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(&resp[..], b"Published\n");
}

/// One keep-alive HTTP/1.1 connection to the publish API, for publishing many items without
/// opening a socket per item.
struct Publisher {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Publisher {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect admin");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self {
            sender,
            host: addr.to_string(),
        }
    }

    async fn publish(&mut self, body: String) {
        let req = Request::post("/publish/")
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let fut = async {
            self.sender.ready().await.expect("publish connection ready");
            let resp = self.sender.send_request(req).await.expect("publish response");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("publish body").to_bytes();
            (status, body)
        };
        let (status, body) = tokio::time::timeout(DEADLINE, fut).await.expect("publish timed out");
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
}

/// Starts another admin listener on the gateway with authentication configured.
async fn admin_with_auth(gw: &TestGateway, auth: Auth) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(AdminState {
        gateway: gw.gw.clone(),
        listening: true.into(),
        reload: None,
        hub: wsgate::grip::Hub::new(gw.gw.registry.clone()),
        auth: Some(auth),
        max_publish_body: wsgate::admin::publish::DEFAULT_MAX_PUBLISH_BODY,
        control: None,
    });
    let stop = CancellationToken::new();
    tokio::spawn(wsgate::admin::run(listener, state, stop.clone()));
    (addr, stop)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------------
// Publish API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn both_item_shapes_deliver_to_a_subscriber() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    publish_ok(&gw, &py_body("room", json!({"content": "python shape"}))).await;
    c.expect_text("python shape").await;
    publish_ok(&gw, &js_body("room", json!({"content": "js shape"}))).await;
    c.expect_text("js shape").await;
    // Without the trailing slash too; other channels do not reach this client.
    let (status, _, _) = post(
        gw.admin,
        "/publish",
        &[],
        py_body("other", json!({"content": "no"})).as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = post(
        gw.admin,
        "/publish",
        &[],
        py_body("room", json!({"content": "yes"})).as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    c.expect_text("yes").await;
}

#[tokio::test]
async fn several_items_in_one_body_arrive_in_order() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let body = json!({"items": [
        {"channel": "room", "ws-message": {"content": "1"}},
        {"channel": "room", "http-stream": {"content": "ignored"}},
        {"channel": "room", "formats": {"ws-message": {"content": "2"}, "http-response": {"body": "x"}}},
    ]});
    publish_ok(&gw, &body.to_string()).await;
    c.expect_text("1").await;
    c.expect_text("2").await;
}

#[tokio::test]
async fn binary_publish_arrives_as_a_binary_frame() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    // 0x00 0x01 0xfe 0xff: not UTF-8.
    publish_ok(&gw, &js_body("room", json!({"content-bin": "AAH+/w=="}))).await;
    match c.next_data().await {
        WsMessage::Binary(b) => assert_eq!(&b[..], &[0x00, 0x01, 0xfe, 0xff]),
        other => panic!("expected a binary frame, got {other:?}"),
    }
    // `type: binary` with text content is binary too.
    publish_ok(&gw, &py_body("room", json!({"type": "binary", "content": "raw"}))).await;
    match c.next_data().await {
        WsMessage::Binary(b) => assert_eq!(&b[..], b"raw"),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

#[tokio::test]
async fn publish_close_with_code_and_reason() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    publish_ok(
        &gw,
        &js_body("room", json!({"action": "close", "code": 4000, "reason": "bye"})),
    )
    .await;
    assert_eq!(c.expect_close().await, (4000, "bye".to_owned()));
}

#[tokio::test]
async fn publish_close_without_code_is_1000() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    publish_ok(&gw, &py_body("room", json!({"action": "close"}))).await;
    assert_eq!(c.expect_close().await.0, 1000);
}

#[tokio::test]
async fn refresh_makes_the_gateway_call_the_backend() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (_c, id) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let count = |r: &[Recorded]| r.iter().filter(|x| x.connection_id() == id).count();
    let before = count(&backend.requests());
    assert_eq!(before, 1, "only the OPEN so far");
    publish_ok(&gw, &js_body("room", json!({"action": "refresh"}))).await;
    let reqs = backend.wait_for("a request after refresh", |r| count(r) > before).await;
    let refresh = reqs.iter().rfind(|x| x.connection_id() == id).expect("found");
    assert!(
        !refresh.events().contains(&Event::Open),
        "a refresh is a plain request, not a new OPEN"
    );
}

#[tokio::test]
async fn bad_publish_bodies_get_400_with_the_reason() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let cases: &[(&str, &str)] = &[
        ("bad JSON", "{"),
        ("empty body", ""),
        ("not an object", "[]"),
        ("missing items", "{}"),
        ("items not an array", r#"{"items":{}}"#),
        ("item not an object", r#"{"items":[7]}"#),
        ("no channel", r#"{"items":[{"ws-message":{"content":"x"}}]}"#),
        ("no formats", r#"{"items":[{"channel":"room"}]}"#),
        ("empty formats", r#"{"items":[{"channel":"room","formats":{}}]}"#),
        (
            "ws-message without content",
            r#"{"items":[{"channel":"room","ws-message":{}}]}"#,
        ),
        (
            "text type without content",
            r#"{"items":[{"channel":"room","formats":{"ws-message":{"type":"text"}}}]}"#,
        ),
        (
            "bad base64",
            r#"{"items":[{"channel":"room","ws-message":{"content-bin":"%%%"}}]}"#,
        ),
        (
            "unknown action",
            r#"{"items":[{"channel":"room","ws-message":{"action":"explode"}}]}"#,
        ),
        (
            "unknown type",
            r#"{"items":[{"channel":"room","ws-message":{"type":"close","content":"x"}}]}"#,
        ),
        (
            "bad close code",
            r#"{"items":[{"channel":"room","ws-message":{"action":"close","code":1006}}]}"#,
        ),
        (
            "meta not strings",
            r#"{"items":[{"channel":"room","meta":{"a":1},"ws-message":{"content":"x"}}]}"#,
        ),
        (
            "second item bad",
            r#"{"items":[{"channel":"room","ws-message":{"content":"x"}},{"channel":"room"}]}"#,
        ),
    ];
    for (what, body) in cases {
        let expected: PublishError = parse_publish(body.as_bytes()).expect_err(what);
        let (status, headers, resp) = post(gw.admin, "/publish/", &[], body.as_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(header(&headers, "content-type"), Some("text/plain"), "{what}");
        assert_eq!(String::from_utf8_lossy(&resp), format!("{expected}\n"), "{what}");
    }
    // Nothing was published by the failed requests (the bad second item rejects the first).
    assert_eq!(gw.gw.registry.stats.published.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    for (method, path) in [
        ("GET", "/publish/"),
        ("PUT", "/publish"),
        ("DELETE", "/publish/"),
        ("PATCH", "/publish"),
    ] {
        let (status, headers, _) = http_request(gw.admin, method, path, &[], b"").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(header(&headers, "allow"), Some("POST"), "{method} {path}");
    }
    // Health endpoints still answer.
    let (status, _, body) = http_request(gw.admin, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"ok\n");
}

#[tokio::test]
async fn body_limit_is_1_000_000_bytes() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    // Exactly at the limit (JSON padded with spaces): accepted.
    let mut body = js_body("room", json!({"content": "at the limit"})).into_bytes();
    body.resize(1_000_000, b' ');
    let (status, _, _) = post(gw.admin, "/publish/", &[], &body).await;
    assert_eq!(status, StatusCode::OK);
    c.expect_text("at the limit").await;
    // One byte over, with Content-Length: refused.
    body.push(b' ');
    let (status, _, _) = post(gw.admin, "/publish/", &[], &body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // One byte over, chunked (no Content-Length): cut at the limit while reading.
    let mut s = TcpStream::connect(gw.admin).await.expect("connect");
    let head = format!(
        "POST /publish/ HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        gw.admin
    );
    s.write_all(head.as_bytes()).await.expect("write");
    for chunk in body.chunks(100_000) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .expect("write");
        s.write_all(chunk).await.expect("write");
        s.write_all(b"\r\n").await.expect("write");
    }
    s.write_all(b"0\r\n\r\n").await.expect("write");
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    while !resp.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("response timed out")
            .expect("read");
        assert!(n > 0, "connection closed before a response");
        resp.extend_from_slice(&buf[..n]);
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");

    // Nothing from the refused bodies reached the client.
    publish_ok(&gw, &js_body("room", json!({"content": "after"}))).await;
    c.expect_text("after").await;
}

#[tokio::test]
async fn accept_json_gets_a_json_answer() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let body = js_body("room", json!({"content": "x"}));
    let (status, headers, resp) = post(
        gw.admin,
        "/publish/",
        &[("accept", "application/json")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&resp).expect("JSON"),
        json!({"message": "Published"})
    );
    let (status, headers, resp) = post(
        gw.admin,
        "/publish/",
        &[("accept", "text/html, application/json;q=0.5")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(&resp[..], br#"{"message":"Published"}"#);
    let (_, headers, resp) = post(gw.admin, "/publish/", &[("accept", "*/*")], body.as_bytes()).await;
    assert_eq!(header(&headers, "content-type"), Some("text/plain"));
    assert_eq!(&resp[..], b"Published\n");
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bearer_token_auth() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, id) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let (admin, _stop) = admin_with_auth(&gw, Auth::Bearer("s3cret".into())).await;
    let body = js_body("room", json!({"content": "authorized"}));

    let (status, headers, _) = post(admin, "/publish/", &[], body.as_bytes()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"));
    for bad in ["Bearer wrong", "Bearer s3cret2", "Basic czNjcmV0", "s3cret"] {
        let (status, headers, _) = post(admin, "/publish/", &[("authorization", bad)], body.as_bytes()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"), "{bad}");
    }
    // The connection API is protected the same way.
    let path = format!("/connections/{id}");
    let (status, _, _) = http_request(admin, "GET", &path, &[], b"").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = http_request(admin, "GET", &path, &[("authorization", "Bearer s3cret")], b"").await;
    assert_eq!(status, StatusCode::OK);

    let (status, _, resp) = post(
        admin,
        "/publish/",
        &[("authorization", "Bearer s3cret")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&resp[..], b"Published\n");
    // Only the authorized publish was delivered.
    c.expect_text("authorized").await;
    assert_eq!(gw.gw.registry.stats.published.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn jwt_auth_as_the_grip_publishers_send_it() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let key = SigningKey::new(b"publish-key".to_vec());
    let (admin, _stop) = admin_with_auth(&gw, Auth::Jwt(key.clone())).await;
    let body = js_body("room", json!({"content": "signed"}));

    let (status, headers, _) = post(admin, "/publish/", &[], body.as_bytes()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"));

    // Expired: signed two hours ago, so `exp` is an hour in the past.
    let expired = sig::sign(&key, "publisher", now_unix() - 7200);
    let (status, _, _) = post(
        admin,
        "/publish/",
        &[("authorization", &format!("Bearer {expired}"))],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Signed with another key.
    let forged = sig::sign(&SigningKey::new(b"other".to_vec()), "publisher", now_unix());
    let (status, _, _) = post(
        admin,
        "/publish/",
        &[("authorization", &format!("Bearer {forged}"))],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The raw key is not accepted in JWT mode.
    let (status, _, _) = post(
        admin,
        "/publish/",
        &[("authorization", "Bearer publish-key")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Valid: {"iss": .., "exp": now + 3600}, HS256, as pubcontrol/gripcontrol send it.
    let token = sig::sign(&key, "publisher", now_unix());
    let (status, _, _) = post(
        admin,
        "/publish/",
        &[("authorization", &format!("Bearer {token}"))],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    c.expect_text("signed").await;
    assert_eq!(gw.gw.registry.stats.published.load(Ordering::Relaxed), 1);
}

// ---------------------------------------------------------------------------------------------
// Fan-out, slow consumers, limits, filters
// ---------------------------------------------------------------------------------------------

/// Opens a WebSocket on a raw TCP socket with a small receive buffer and never reads from it.
async fn stalled_client(gw: &TestGateway, path: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(gw.addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // Read the 101 byte by byte so no WebSocket bytes are consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(DEADLINE, s.read_u8())
            .await
            .expect("101 timed out")
            .expect("read");
        head.push(b);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

fn numbered(i: usize) -> String {
    let mut s = format!("{i:08}:");
    s.push_str(&"x".repeat(1024 - s.len()));
    s
}

#[tokio::test]
async fn slow_consumer_is_closed_while_others_get_everything() {
    let backend = grip_backend().await;
    let yaml = format!(
        "routes:\n  - name: slow\n    backend:\n      url: {}\n    limits:\n      outboundQueueBytes: 65536\n",
        backend.url()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let stalled = stalled_client(&gw, "/?c=stalled").await;
    let stalled_id = backend.wait_for("OPEN of the stalled client", |r| !r.is_empty()).await[0].connection_id();
    let (mut normal, _) = connect_subscribed(&gw, &backend, "/?c=normal", &["room"]).await;
    let registry = gw.gw.registry.clone();
    let r2 = registry.clone();
    eventually("both subscribed", || {
        let n = r2.subscription_count();
        async move { n == 2 }
    })
    .await;

    // The normal subscriber reads everything until "end".
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        loop {
            match normal.next_data().await {
                WsMessage::Text(t) if t.as_str() == "end" => return got,
                WsMessage::Text(t) => {
                    assert_eq!(t.as_str(), numbered(got), "message {got} out of order or missing");
                    got += 1;
                }
                other => panic!("normal subscriber got {other:?} after {got} messages"),
            }
        }
    });

    // Publish at least 2000 x 1 KiB, and on until the stalled client is dropped (its kernel
    // buffers absorb an amount that depends on the host); the cap only bounds a failure.
    let mut publisher = Publisher::connect(gw.admin).await;
    let drops = || registry.stats.slow_consumer_drops.load(Ordering::Relaxed);
    let mut sent = 0usize;
    while sent < 2000 || drops() == 0 {
        assert!(sent < 50_000, "no slow-consumer drop after {sent} messages");
        publisher
            .publish(js_body("room", json!({"content": numbered(sent)})))
            .await;
        sent += 1;
    }
    publisher.publish(js_body("room", json!({"content": "end"}))).await;
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("normal subscriber timed out")
        .expect("reader task");
    assert_eq!(got, sent, "the normal subscriber receives every message");
    assert!(drops() >= 1);

    // The stalled client: what it finally reads is a prefix of the stream, ending in a 1013
    // close frame or with the connection closed by the gateway.
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stalled,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut received = 0usize;
    let mut close_code = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("stalled client never closed")
        {
            Some(Ok(WsMessage::Text(t))) => {
                assert_eq!(
                    t.as_str(),
                    numbered(received),
                    "stalled client reads an in-order prefix"
                );
                received += 1;
            }
            Some(Ok(WsMessage::Close(f))) => {
                close_code = Some(f.map(|f| u16::from(f.code)));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(
        received < sent,
        "the stalled client cannot have got all {sent} messages"
    );
    if let Some(code) = close_code {
        assert_eq!(code, Some(1013), "slow consumers are closed with 1013");
    }
    eventually("the stalled connection is gone", || {
        let gone = registry.get(&stalled_id).is_none();
        async move { gone }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_receive_a_hundred_messages_in_order() {
    const CLIENTS: usize = 1000;
    const MESSAGES: usize = 100;
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        clients.push(gw.connect(&format!("/?c={i}")).await);
    }
    let registry = gw.gw.registry.clone();
    eventually("all subscribed", || {
        let n = registry.subscription_count();
        async move { n == CLIENTS }
    })
    .await;
    for i in 0..MESSAGES {
        publish_ok(&gw, &js_body("room", json!({"content": format!("m{i}")}))).await;
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for i in 0..MESSAGES {
                    c.expect_text(&format!("m{i}")).await;
                }
            })
        })
        .collect();
    for r in futures_util::future::join_all(readers).await {
        r.expect("reader got every message in order");
    }
    assert_eq!(
        registry.stats.delivered.load(Ordering::Relaxed),
        (CLIENTS * MESSAGES) as u64
    );
}

#[tokio::test]
async fn the_21st_subscription_is_ignored() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let names: Vec<String> = (0..21).map(|i| format!("ch{i}")).collect();
    let path = format!("/?channels={}", names.join(","));
    let first20: Vec<&str> = names[..20].iter().map(String::as_str).collect();
    let (mut c, _) = connect_subscribed(&gw, &backend, &path, &first20).await;
    assert!(!gw.gw.registry.channels().contains(&"ch20".to_owned()));
    publish_ok(&gw, &js_body("ch20", json!({"content": "over the limit"}))).await;
    publish_ok(&gw, &js_body("ch19", json!({"content": "within the limit"}))).await;
    // Deliveries to one connection keep publish order, so the first message shows the ch20
    // one was not delivered.
    c.expect_text("within the limit").await;
}

#[tokio::test]
async fn skip_self_filter() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut alice, alice_id) = connect_subscribed(&gw, &backend, "/?user=alice&filters=skip-self", &["room"]).await;
    let (mut bob, bob_id) = connect_subscribed(&gw, &backend, "/?user=bob&filters=skip-self", &["room"]).await;
    for (id, user) in [(&alice_id, "alice"), (&bob_id, "bob")] {
        let info = gw.gw.registry.get(id).expect("connection").info();
        assert_eq!(info.sub_meta.get("user").map(String::as_str), Some(user));
    }
    let body = json!({"items": [{"channel": "room", "meta": {"sender": "alice"}, "formats": {"ws-message": {"content": "from alice"}}}]});
    publish_ok(&gw, &body.to_string()).await;
    publish_ok(&gw, &js_body("room", json!({"content": "from the server"}))).await;
    bob.expect_text("from alice").await;
    bob.expect_text("from the server").await;
    alice.expect_text("from the server").await;
    assert_eq!(gw.gw.registry.stats.filtered.load(Ordering::Relaxed), 1);
}

// ---------------------------------------------------------------------------------------------
// Connection API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connection_api_get() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (_c, id) = connect_subscribed(&gw, &backend, "/?setmeta=alice&user=bob", &["room"]).await;
    let (status, headers, body) = http_request(gw.admin, "GET", &format!("/connections/{id}"), &[], b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["id"], json!(id));
    assert_eq!(v["route"], json!(gw.table.load().routes()[0].name));
    assert_eq!(v["subscriptions"], json!(["room"]));
    assert_eq!(v["session_meta"], json!({"user": "bob"}));
    let meta = v["meta"].as_object().expect("meta object");
    assert_eq!(meta.len(), 1, "{meta:?}");
    let (name, value) = meta.iter().next().expect("one entry");
    assert!(name.eq_ignore_ascii_case("user"), "{name}");
    assert_eq!(value, "alice");
    assert!(v["age_secs"].as_u64().is_some_and(|a| a < 60), "{v}");

    let (status, _, _) = http_request(gw.admin, "GET", "/connections/no-such-id", &[], b"").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = http_request(gw.admin, "GET", "/connections/", &[], b"").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn connection_api_send() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, id) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let path = format!("/connections/{id}/messages");
    let (status, _, _) = post(gw.admin, &path, &[], br#"{"content":"just you"}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    c.expect_text("just you").await;
    let (status, _, _) = post(gw.admin, &path, &[], br#"{"content-bin":"AAE="}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    match c.next_data().await {
        WsMessage::Binary(b) => assert_eq!(&b[..], &[0, 1]),
        other => panic!("expected binary, got {other:?}"),
    }
    for bad in [
        &b"{"[..],
        b"[]",
        b"{}",
        br#"{"action":"hint"}"#,
        br#"{"action":"close","code":1}"#,
    ] {
        let (status, _, body) = post(gw.admin, &path, &[], bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(bad));
        assert!(body.ends_with(b"\n") && body.len() > 1);
    }
    let (status, _, _) = post(gw.admin, "/connections/no-such-id/messages", &[], br#"{"content":"x"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, headers, _) = http_request(gw.admin, "GET", &path, &[], b"").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&headers, "allow"), Some("POST"));
    let (status, headers, _) = http_request(gw.admin, "PUT", &format!("/connections/{id}"), &[], b"").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&headers, "allow"), Some("GET, DELETE"));
    // A close through the messages endpoint.
    let (status, _, _) = post(gw.admin, &path, &[], br#"{"action":"close","code":4002}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(c.expect_close().await.0, 4002);
}

#[tokio::test]
async fn connection_api_delete() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut a, a_id) = connect_subscribed(&gw, &backend, "/?c=a", &["room"]).await;
    let (mut b, b_id) = connect_subscribed(&gw, &backend, "/?c=b", &["room"]).await;
    let (status, _, _) = http_request(
        gw.admin,
        "DELETE",
        &format!("/connections/{a_id}"),
        &[],
        br#"{"code":4000,"reason":"kicked"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(a.expect_close().await, (4000, "kicked".to_owned()));
    // Without a body: 1000.
    let (status, _, _) = http_request(gw.admin, "DELETE", &format!("/connections/{b_id}"), &[], b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.expect_close().await.0, 1000);
    let registry = gw.gw.registry.clone();
    eventually("closed connections leave the registry", || {
        let gone = registry.get(&a_id).is_none() && registry.get(&b_id).is_none();
        async move { gone }
    })
    .await;
    let (status, _, _) = http_request(gw.admin, "DELETE", &format!("/connections/{a_id}"), &[], b"").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = http_request(gw.admin, "GET", &format!("/connections/{a_id}"), &[], b"").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn connection_api_delete_rejects_bad_bodies() {
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, id) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let path = format!("/connections/{id}");
    for bad in [
        &br#"{"code":1005}"#[..],
        br#"{"code":"x"}"#,
        br#"{"reason":1}"#,
        b"nope",
    ] {
        let (status, _, _) = http_request(gw.admin, "DELETE", &path, &[], bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(bad));
    }
    // Still open: a publish arrives.
    publish_ok(&gw, &js_body("room", json!({"content": "still here"}))).await;
    c.expect_text("still here").await;
}

// ---------------------------------------------------------------------------------------------
// `wsgate publish`
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn publish_client_against_a_live_gateway() {
    use wsgate::admin::client::{action_from_cli, publish};
    let backend = grip_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (mut c, _) = connect_subscribed(&gw, &backend, "/?c=1", &["room"]).await;
    let url = format!("http://{}", gw.admin);

    let text = action_from_cli(Some("hello from the cli"), false, None, None).expect("action");
    assert_eq!(publish(&url, None, "room", &text).await, Ok("Published\n".to_owned()));
    c.expect_text("hello from the cli").await;

    let binary = action_from_cli(Some("bytes"), true, None, None).expect("action");
    assert_eq!(
        publish(&format!("{url}/"), None, "room", &binary).await,
        Ok("Published\n".to_owned())
    );
    match c.next_data().await {
        WsMessage::Binary(b) => assert_eq!(&b[..], b"bytes"),
        other => panic!("expected binary, got {other:?}"),
    }

    // With authentication.
    let (admin, _stop) = admin_with_auth(&gw, Auth::Bearer("tok".into())).await;
    let auth_url = format!("http://{admin}");
    let err = publish(&auth_url, None, "room", &text).await.expect_err("401");
    assert!(err.contains("401"), "{err}");
    let err = publish(&auth_url, Some("bad"), "room", &text).await.expect_err("401");
    assert!(err.contains("401"), "{err}");
    let close = action_from_cli(None, false, Some(4001), Some("done")).expect("action");
    assert_eq!(
        close,
        WsMessageAction::Close {
            code: Some(4001),
            reason: "done".into()
        }
    );
    assert_eq!(
        publish(&auth_url, Some("tok"), "room", &close).await,
        Ok("Published\n".to_owned())
    );
    assert_eq!(c.expect_close().await, (4001, "done".to_owned()));

    // Nobody listening.
    let unused = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = format!("http://{}", unused.local_addr().expect("addr"));
    drop(unused);
    assert!(publish(&dead, None, "room", &text).await.is_err());
}
