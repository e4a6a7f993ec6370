//! The security rules, one test each, every test trying to break its rule through real sockets
//! (an in-process gateway on 127.0.0.1, or the real `wsgate` binary where the rule lives in the
//! command line: startup checks, flag wiring, logs).
//!
//! Rules covered elsewhere and not repeated here:
//! - the control API serves a gateway only its own snapshot (401 without a valid token, 401 for a
//!   token of another audience, 403 for another pod's token):
//!   `tests/support/scenarios.rs::gateways_are_authenticated`, run by
//!   `tests/controller.rs::routes_get_status_events_and_snapshots` (and against a real
//!   kube-apiserver by `tests/kube_real.rs`); a gateway's snapshot holds only the routes whose
//!   `workloadSelector` matches its pod: `tests/control_e2e.rs`;
//! - the injection webhook never injects excluded namespaces (the controller's own):
//!   `tests/webhook.rs::https_admission_reviews_are_answered_and_verified_with_the_ca`, with the
//!   decision counted by reason in `admission_decisions_are_counted_by_decision_and_reason`;
//! - publish API bearer/JWT checks against an in-process admin listener, with the
//!   `WWW-Authenticate` header: `tests/publish_api.rs::{bearer_token_auth,
//!   jwt_auth_as_the_grip_publishers_send_it}`. Here the same rules are attacked through the
//!   real binary's flags, on the connection API and `PUT /log-level` too.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::StatusCode;
use support::process::GatewayProc;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsgate::config::RouteTable;
use wsgate::protocol::events::Event;
use wsgate::protocol::sig::{self, SigError, SigningKey};
use wsgate::server::GatewaySettings;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The reply of a GRIP echo: each text message back with the `m:` message prefix, closes
/// answered.
fn grip_echo(r: &Recorded) -> Reply {
    let mut out = Vec::new();
    for ev in r.events() {
        match ev {
            Event::Text(t) => {
                let mut prefixed = b"m:".to_vec();
                prefixed.extend_from_slice(&t);
                out.push(Event::Text(Bytes::from(prefixed)));
            }
            Event::Close(f) => out.push(Event::Close(f)),
            _ => {}
        }
    }
    Reply::events(&out)
}

/// A scratch directory for one test (removed on drop).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-security-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A GRIP backend: OPEN is answered with the `grip` extension, a binding `Set-Meta-User:
/// alice` and a subscription to `channel`; later requests are echoed ([`grip_echo`]), plain
/// requests get `200 plain`.
async fn binding_backend(channel: &'static str) -> Backend {
    Backend::start(move |r| {
        if r.events().contains(&Event::Open) {
            grip_open_reply(Some(channel)).header("set-meta-user", "alice")
        } else if r.header("content-type").is_some() {
            grip_echo(r)
        } else {
            Reply::status(200, "plain")
        }
    })
    .await
}

/// Connects a WebSocket client sending `headers` on its handshake; returns the client and the
/// `101`'s headers.
async fn connect_with(url: &str, headers: &[(&str, &str)]) -> (Client, http::HeaderMap) {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .expect("websocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    (Client { ws }, resp.headers().clone())
}

/// Every header the client might use to forge metadata or a signature, in several spellings.
const FORGED: [(&str, &str); 7] = [
    ("Meta-User", "forged-admin"),
    ("META-ROLE", "forged-root"),
    ("meta-", "forged-empty-name"),
    ("Set-Meta-User", "forged-set"),
    ("set-meta-role", "forged-set-role"),
    ("Grip-Sig", "forged.grip.sig"),
    ("grip-sig", "forged.second.sig"),
];

/// The same names spelled with `_`: CGI/WSGI servers (and PHP, and Go's CGI) map both `-` and
/// `_` to `_` (`HTTP_META_USER`), so to such a backend `Meta_User` *is* `Meta-User`.
const FORGED_UNDERSCORE: [(&str, &str); 3] = [
    ("Meta_User", "forged-underscore"),
    ("Set_Meta_User", "forged-set-underscore"),
    ("Grip_Sig", "forged.underscore.sig"),
];

fn forged_value_in(headers: &http::HeaderMap, forged: &[(&str, &str)]) -> Option<String> {
    headers.iter().find_map(|(name, value)| {
        let v = value.to_str().unwrap_or_default();
        forged
            .iter()
            .any(|(_, f)| v.contains(f))
            .then(|| format!("{name}: {v}"))
    })
}

/// Rule: client `Meta-*`, `Set-Meta-*` and `Grip-Sig` headers (any case, several at once, a
/// bare `Meta-`) never reach the backend: not on OPEN, not on later requests, not in
/// pass-through (where `Meta-*` and `Grip-Sig` are dropped). Later requests carry only the
/// metadata the backend bound.
#[tokio::test]
async fn client_meta_and_signature_headers_never_reach_the_backend() {
    let backend = binding_backend("room").await;
    let key = SigningKey::new(b"route-key".to_vec());
    let gw = TestGateway::from_yaml(&format!(
        "routes:\n  - name: app\n    backend: {{url: \"{}\"}}\n    grip: {{signingKey: {{value: route-key}}}}\n",
        backend.url()
    ))
    .await;
    let (mut client, resp_headers) = connect_with(&gw.ws_url("/ws"), &FORGED).await;
    assert!(
        resp_headers.keys().all(|k| !k.as_str().starts_with("set-meta-")),
        "the backend's Set-Meta-* stays between gateway and backend: {resp_headers:?}"
    );
    client.send_text("one").await;
    client.expect_text("one").await;
    client.send_text("two").await;
    client.expect_text("two").await;
    client.ws.close(None).await.expect("close");
    let reqs = backend
        .wait_for("OPEN, two messages and CLOSE", |r| {
            r.iter()
                .any(|x| x.events().iter().any(|e| matches!(e, Event::Close(_))))
        })
        .await;
    assert!(reqs.len() >= 3, "{reqs:?}");
    let now = now_unix();
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(
            forged_value_in(&r.headers, &FORGED),
            None,
            "request {i} carries a forged header"
        );
        let names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert!(
            !names.iter().any(|n| n.starts_with("set-meta-")),
            "request {i}: {names:?}"
        );
        let sigs: Vec<_> = r.headers.get_all("grip-sig").iter().collect();
        assert_eq!(sigs.len(), 1, "request {i}: exactly the gateway's own Grip-Sig");
        sig::verify(sigs[0].to_str().expect("ascii"), &key, now).expect("Grip-Sig verifies");
        let metas: Vec<(&str, &str)> = r
            .headers
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("meta-"))
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or_default()))
            .collect();
        if r.events().contains(&Event::Open) {
            assert_eq!(metas, [], "nothing is bound before OPEN's answer");
        } else {
            assert_eq!(
                metas,
                [("meta-user", "alice")],
                "request {i}: only the backend's binding"
            );
        }
    }

    // Pass-through (a plain request on the same route): Meta-* and Grip-Sig are dropped.
    let mut headers: Vec<(&str, &str)> = FORGED.to_vec();
    headers.push(("x-kept", "yes"));
    let before = backend.requests().len();
    let (status, _, body) = http_request(gw.addr, "GET", "/page", &headers, b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"plain"[..]));
    let reqs = backend.requests();
    assert_eq!(reqs.len(), before + 1);
    let plain = &reqs[before];
    assert_eq!(plain.header("x-kept"), Some("yes"), "ordinary headers do pass");
    for (name, value) in &plain.headers {
        let n = name.as_str();
        let v = value.to_str().unwrap_or_default();
        assert!(
            !n.starts_with("meta-") && n != "grip-sig",
            "pass-through forwarded {n}: {v}"
        );
    }
}

/// Rule (the same, for backends behind CGI-style header mapping): `Meta_User`, `Set_Meta_User`
/// and `Grip_Sig` from a client never reach the backend, since CGI, WSGI, PHP and Rack
/// servers show `Meta_User` as `HTTP_META_USER`, the very key a GRIP library reads for the
/// trusted `Meta-User` (nginx drops such headers by default, `underscores_in_headers off`).
#[tokio::test]
async fn underscore_spellings_of_meta_and_signature_headers_never_reach_the_backend() {
    let backend = binding_backend("room").await;
    let gw = TestGateway::from_yaml(&format!(
        "routes:\n  - name: app\n    backend: {{url: \"{}\"}}\n    grip: {{signingKey: {{value: route-key}}}}\n",
        backend.url()
    ))
    .await;
    let (mut client, _) = connect_with(&gw.ws_url("/ws"), &FORGED_UNDERSCORE).await;
    client.send_text("one").await;
    client.expect_text("one").await;
    let (status, _, _) = http_request(gw.addr, "GET", "/page", &FORGED_UNDERSCORE, b"").await;
    assert_eq!(status, StatusCode::OK);
    for (i, r) in backend.requests().iter().enumerate() {
        assert_eq!(
            forged_value_in(&r.headers, &FORGED_UNDERSCORE),
            None,
            "request {i} ({:?}) carries a forged header",
            r.events()
        );
    }
}

/// Rule: with a signing key, every backend request of a connection (OPEN, messages, CLOSE)
/// carries a `Grip-Sig` that verifies with the route's key (HS256, `iss`, `exp` an hour out) and
/// with no other key; after an edit of the route's key, the next request of an open connection
/// is signed with the new key, never the stale one.
#[tokio::test]
async fn grip_sig_is_on_every_request_verifies_and_follows_a_key_rotation() {
    let backend = Backend::echo().await;
    let yaml = |key: &str| {
        format!(
            "routes:\n  - name: app\n    backend: {{url: \"{}\"}}\n    grip: {{signingKey: {{value: \"{key}\"}}, issuer: gw-test}}\n",
            backend.url()
        )
    };
    let old_key = SigningKey::new(b"old-key".to_vec());
    let new_key = SigningKey::new(b"new-key".to_vec());
    let gw = TestGateway::from_yaml(&yaml("old-key")).await;
    let mut c = gw.connect("/").await;
    c.send_text("a").await;
    c.expect_text("a").await;
    let signed_old = backend.requests();
    assert_eq!(signed_old.len(), 2, "OPEN and one message");
    let now = now_unix();
    for r in &signed_old {
        let token = r.header("grip-sig").expect("every request is signed");
        let claims = sig::verify(token, &old_key, now).expect("verifies with the route's key");
        assert_eq!(claims["iss"], "gw-test");
        let exp = claims["exp"].as_u64().expect("exp");
        assert!(exp > now + 3500 && exp <= now + 3601, "exp {exp}, now {now}");
        assert_eq!(
            sig::verify(token, &SigningKey::new(b"wrong".to_vec()), now),
            Err(SigError::BadSignature)
        );
        // Tampering with the claims breaks it.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(r#"{"iss":"gw-test","exp":99999999999}"#);
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(sig::verify(&forged, &old_key, now), Err(SigError::BadSignature));
    }

    // Rotate the key (same route name): the open connection's next request uses the new key.
    let routes = wsgate::config::parse_routes_yaml(&yaml("new-key")).expect("routes");
    gw.table.store(Arc::new(RouteTable::new(routes, 2).expect("table")));
    c.send_text("b").await;
    c.expect_text("b").await;
    c.ws.close(None).await.expect("close");
    let reqs = backend
        .wait_for("CLOSE", |r| {
            r.iter()
                .any(|x| x.events().iter().any(|e| matches!(e, Event::Close(_))))
        })
        .await;
    assert!(reqs.len() >= 4, "{reqs:?}");
    for r in &reqs[2..] {
        let token = r.header("grip-sig").expect("every request is signed");
        sig::verify(token, &new_key, now_unix()).expect("signed with the new key");
        assert_eq!(
            sig::verify(token, &old_key, now_unix()),
            Err(SigError::BadSignature),
            "never with the stale key"
        );
    }
    // A new connection uses the new key from its OPEN on.
    let before = backend.requests().len();
    let _c2 = gw.connect("/").await;
    let open = &backend.requests()[before];
    assert_eq!(open.events(), vec![Event::Open]);
    sig::verify(open.header("grip-sig").expect("signed"), &new_key, now_unix()).expect("new key");
}

/// A JWT with any header and claims and the given signature segment.
fn jwt(header: &str, claims: &str, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    )
}

/// The admin requests a caller without credentials must not get through: a publish, the three
/// connection-API calls on a live connection, and `PUT /log-level`. Each answer's status.
async fn admin_calls(admin: SocketAddr, connection: &str, authorization: Option<&str>) -> Vec<(String, StatusCode)> {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = authorization {
        headers.push(("authorization", a));
    }
    let publish = br#"{"items":[{"channel":"room","formats":{"ws-message":{"content":"intruder"}}}]}"#;
    let conn = format!("/connections/{connection}");
    let send = format!("/connections/{connection}/messages");
    let calls: [(&str, &str, &[u8]); 5] = [
        ("POST", "/publish/", publish),
        ("GET", &conn, b""),
        ("POST", &send, br#"{"content":"intruder"}"#),
        ("DELETE", &conn, b""),
        ("PUT", "/log-level", b"trace"),
    ];
    let mut out = Vec::new();
    for (method, path, body) in calls {
        let (status, headers_back, _) = http_request(admin, method, path, &headers, body).await;
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                headers_back.get("www-authenticate").map(|v| v.as_bytes()),
                Some(&b"Bearer"[..]),
                "{method} {path}"
            );
        }
        out.push((format!("{method} {path}"), status));
    }
    out
}

/// Rule: with `--admin-token` or `--publish-jwt-key`, the publish API, the connection API and
/// `PUT /log-level` answer 401 to a caller without valid credentials: none, a wrong token,
/// the right token in the wrong scheme or with extra bytes; a JWT signed with another key,
/// expired, `alg: none`, `alg: HS512`, claims swapped under a valid signature, or the raw key
/// itself. Nothing reaches the subscriber until a valid call.
#[tokio::test]
async fn publish_and_connection_apis_refuse_bad_credentials_when_auth_is_set() {
    let backend = binding_backend("room").await;
    let open_id = |backend: &Backend| {
        backend
            .requests()
            .iter()
            .rev()
            .find(|r| r.events().contains(&Event::Open))
            .expect("an OPEN")
            .connection_id()
    };

    // Static token.
    let p = GatewayProc::start(&["--backend", &backend.url(), "--admin-token", "t0ken-s3cret"], &[]).await;
    let (mut c, _) = connect_with(&format!("ws://{}/", p.addr), &[]).await;
    let id = open_id(&backend);
    for bad in [
        None,
        Some("Bearer wrong"),
        Some("Bearer t0ken-s3cre"),
        Some("Bearer t0ken-s3cretX"),
        Some("Bearer  "),
        Some("Basic dDBrZW4tczNjcmV0"),
        Some("t0ken-s3cret"),
        Some("Token t0ken-s3cret"),
    ] {
        for (call, status) in admin_calls(p.admin, &id, bad).await {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{call} with {bad:?}");
        }
    }
    let (status, _, _) = http_request(
        p.admin,
        "POST",
        "/publish/",
        &[("authorization", "Bearer t0ken-s3cret")],
        br#"{"items":[{"channel":"room","formats":{"ws-message":{"content":"legit"}}}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    c.expect_text("legit").await;
    drop(p);

    // JWT.
    let p = GatewayProc::start(&["--backend", &backend.url(), "--publish-jwt-key", "jwt-k3y"], &[]).await;
    let (mut c, _) = connect_with(&format!("ws://{}/", p.addr), &[]).await;
    let id = open_id(&backend);
    let key = SigningKey::new(b"jwt-k3y".to_vec());
    let now = now_unix();
    let valid = sig::sign(&key, "publisher", now);
    let parts: Vec<&str> = valid.split('.').collect();
    let exp = now + 600;
    let swapped_claims = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"root","exp":{}}}"#, exp + 1)),
        parts[2]
    );
    let bad_tokens = [
        sig::sign(&SigningKey::new(b"other-key".to_vec()), "publisher", now),
        sig::sign(&key, "publisher", now - 7200),
        jwt(r#"{"alg":"none","typ":"JWT"}"#, &format!(r#"{{"exp":{exp}}}"#), ""),
        jwt(
            r#"{"alg":"HS512","typ":"JWT"}"#,
            &format!(r#"{{"exp":{exp}}}"#),
            parts[2],
        ),
        swapped_claims,
        "jwt-k3y".to_owned(),
        format!("{valid}x"),
    ];
    for token in &bad_tokens {
        let auth = format!("Bearer {token}");
        for (call, status) in admin_calls(p.admin, &id, Some(&auth)).await {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{call} with {token}");
        }
    }
    for (call, status) in admin_calls(p.admin, &id, None).await {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{call} without credentials");
    }
    let (status, _, _) = http_request(
        p.admin,
        "POST",
        "/publish/",
        &[("authorization", &format!("Bearer {valid}"))],
        br#"{"items":[{"channel":"room","formats":{"ws-message":{"content":"signed"}}}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The first data message the subscriber sees is the authorized one: no intruder got through.
    c.expect_text("signed").await;
}

/// Runs `wsgate gateway` expecting it to refuse its configuration; returns its stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let started = std::time::Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.arg("gateway")
        .args(args)
        .env_remove("WSGATE_ADMIN_TOKEN")
        .env_remove("WSGATE_PUBLISH_JWT_KEY")
        .env_remove("WSGATE_ADMIN_LISTEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run wsgate");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(started.elapsed() < DEADLINE, "refusal took {:?}", started.elapsed());
    stderr
}

/// Rule: an admin listener off loopback without `--admin-token`/`--publish-jwt-key` refuses to
/// start (exit 64 naming the flags), before anything is bound: the address is never bound
/// (the same address with a token gets past the check and fails to bind, a different message).
/// An empty token does not count as one. IPv4-mapped loopback counts as loopback; the
/// unspecified and mapped-unspecified addresses do not.
#[test]
fn admin_listener_off_loopback_without_auth_refuses_to_start() {
    let listen = free_addr().to_string();
    // 192.0.2.1 (TEST-NET-1) is not on this host: binding it would fail with another message.
    for admin in [
        "192.0.2.1:9",
        "0.0.0.0:9",
        "[::]:9",
        "[::ffff:0.0.0.0]:9",
        "[fe80::1]:9",
    ] {
        let stderr = refused(
            &[
                "--listen",
                &listen,
                "--admin-listen",
                admin,
                "--backend",
                "http://127.0.0.1:1",
            ],
            &[],
        );
        assert!(
            stderr.contains("is not a loopback address") && stderr.contains("--admin-token"),
            "{admin}: {stderr}"
        );
        assert!(
            !stderr.contains("cannot listen"),
            "{admin}: refused before binding: {stderr}"
        );
    }
    // The same through the environment, and with an empty token.
    let stderr = refused(
        &["--listen", &listen, "--backend", "http://127.0.0.1:1"],
        &[("WSGATE_ADMIN_LISTEN", "192.0.2.1:9")],
    );
    assert!(stderr.contains("is not a loopback address"), "{stderr}");
    let stderr = refused(
        &[
            "--listen",
            &listen,
            "--admin-listen",
            "192.0.2.1:9",
            "--backend",
            "http://127.0.0.1:1",
        ],
        &[("WSGATE_ADMIN_TOKEN", "")],
    );
    assert!(stderr.contains("must not be empty"), "{stderr}");
    // With a token the check passes and the (unbindable) address fails to bind instead.
    let stderr = refused(
        &[
            "--listen",
            &listen,
            "--admin-listen",
            "192.0.2.1:9",
            "--backend",
            "http://127.0.0.1:1",
            "--admin-token",
            "t",
        ],
        &[],
    );
    assert!(
        stderr.contains("cannot listen on 192.0.2.1:9") && !stderr.contains("loopback"),
        "{stderr}"
    );

    use wsgate::admin::auth::is_loopback;
    for (addr, loopback) in [
        ("127.0.0.1:1", true),
        ("127.255.255.254:1", true),
        ("[::1]:1", true),
        ("[::ffff:127.0.0.1]:1", true),
        ("0.0.0.0:1", false),
        ("[::]:1", false),
        ("[::ffff:0.0.0.0]:1", false),
        ("[::ffff:10.0.0.1]:1", false),
        ("10.0.0.1:1", false),
        ("[fe80::1]:1", false),
    ] {
        assert_eq!(is_loopback(&addr.parse().expect("addr")), loopback, "{addr}");
    }
}

/// Sends raw request bytes and returns the response's status line (up to the first CRLF).
async fn raw_status(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        match tokio::time::timeout(DEADLINE, s.read(&mut chunk)).await {
            Ok(Ok(0)) => panic!("closed without a response: {:?}", String::from_utf8_lossy(&buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("read failed: {e}"),
            Err(_) => panic!("no response"),
        }
    }
}

/// A request head: the request line, `Host`, the WebSocket upgrade headers when `upgrade`,
/// then `x-h<i>: v` headers up to `count` headers in total, then one `x-big` header of `big`
/// bytes when `big > 0`.
fn request(upgrade: bool, count: usize, big: usize) -> Vec<u8> {
    let mut head = String::from("GET /ws HTTP/1.1\r\nHost: gw.test\r\n");
    let mut n = 1;
    if upgrade {
        head.push_str(
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        );
        n += 4;
    }
    if big > 0 {
        n += 1;
    }
    for i in n..count {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    if big > 0 {
        head.push_str(&format!("x-big: {}\r\n", "b".repeat(big)));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// OPEN requests the backend got so far.
fn opens(backend: &Backend) -> usize {
    backend
        .requests()
        .iter()
        .filter(|r| r.events().contains(&Event::Open))
        .count()
}

/// Plain (pass-through) requests the backend got so far.
fn plains(backend: &Backend) -> usize {
    backend
        .requests()
        .iter()
        .filter(|r| r.header("content-type").is_none())
        .count()
}

/// Rule: a handshake or plain request with more headers than `--max-headers` (100) or a head
/// larger than `--max-header-bytes` (16 KiB) gets `431` and no backend request; requests just
/// inside both limits go through. The real binary applies `--max-header-bytes` and refuses a
/// value under 1 KiB.
#[tokio::test]
async fn oversized_or_overfull_request_heads_get_431_and_never_reach_the_backend() {
    let backend = binding_backend("room").await;
    // Only `x-h5` is replayed: the backend (hyper, at most 100 headers itself) must not refuse
    // the gateway's requests for the client's many headers.
    let gw = TestGateway::from_yaml(&format!(
        "routes:\n  - name: app\n    backend: {{url: \"{}\"}}\n    headers: {{replayAllow: [x-h5]}}\n",
        backend.url()
    ))
    .await;
    let defaults = GatewaySettings::default();
    assert_eq!((defaults.max_headers, defaults.max_header_bytes), (100, 16 * 1024));
    const TOO_LARGE: &str = "HTTP/1.1 431 Request Header Fields Too Large";

    for upgrade in [true, false] {
        // Over the limits: nothing reaches the backend.
        for (what, req) in [
            ("101 headers", request(upgrade, 101, 0)),
            ("a 17,000-byte header", request(upgrade, 0, 17_000)),
            ("a 16,385-byte head", {
                let base = request(upgrade, 0, 1).len() - 1;
                request(upgrade, 0, 16 * 1024 + 1 - base)
            }),
        ] {
            assert_eq!(raw_status(gw.addr, &req).await, TOO_LARGE, "{what}, upgrade {upgrade}");
            assert!(backend.requests().is_empty(), "{what} reached the backend");
        }
    }
    // Inside the limits: 100 headers, a 16,384-byte head.
    let ok_head = {
        let base = request(true, 0, 1).len() - 1;
        request(true, 0, 16 * 1024 - base)
    };
    assert_eq!(ok_head.len(), 16 * 1024);
    for (what, req) in [("100 headers", request(true, 100, 0)), ("a 16 KiB head", ok_head)] {
        let before = opens(&backend);
        assert_eq!(
            raw_status(gw.addr, &req).await,
            "HTTP/1.1 101 Switching Protocols",
            "{what}"
        );
        assert_eq!(opens(&backend), before + 1, "{what}: one OPEN");
    }
    assert_eq!(raw_status(gw.addr, &request(false, 100, 0)).await, "HTTP/1.1 200 OK");
    assert_eq!(plains(&backend), 1);

    // The real binary: the flag is applied, and a tiny value is refused.
    let p = GatewayProc::start(&["--backend", &backend.url(), "--max-header-bytes", "2048"], &[]).await;
    let before = opens(&backend);
    assert_eq!(raw_status(p.addr, &request(true, 0, 3000)).await, TOO_LARGE);
    assert_eq!(raw_status(p.addr, &request(false, 0, 3000)).await, TOO_LARGE);
    assert_eq!((opens(&backend), plains(&backend)), (before, 1));
    assert_eq!(
        raw_status(p.addr, &request(true, 0, 1500)).await,
        "HTTP/1.1 101 Switching Protocols"
    );
    assert_eq!(opens(&backend), before + 1);
    let out = Command::new(BIN)
        .args([
            "gateway",
            "--backend",
            "http://127.0.0.1:1",
            "--max-header-bytes",
            "100",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-header-bytes"));
}

/// Rule: no secret reaches the logs, even at `--log-level debug` (every crate, text and JSON):
/// not the routes' signing key, not the admin token (nor a wrong one a caller tried), not the
/// `Grip-Sig` tokens the gateway sent, and not the client's `Cookie`, `Authorization` or forged
/// `Grip-Sig` values, on WebSocket handshakes, messages, pass-through requests and publishes.
#[tokio::test]
async fn secrets_never_appear_in_debug_logs() {
    let scratch = Scratch::new("logs");
    let backend = binding_backend("room").await;
    let routes = scratch.path("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "routes:\n  - name: app\n    backend: {{url: \"{}\"}}\n    grip: {{signingKey: {{value: \"SIGNINGKEY-7f3a9\"}}}}\n",
            backend.url()
        ),
    )
    .expect("routes file");
    let routes = routes.to_str().expect("utf-8 path").to_owned();
    let client_secrets = [
        ("cookie", "session=COOKIE-SECRET-41d2"),
        ("authorization", "Bearer CLIENT-AUTH-SECRET-88e1"),
        ("proxy-authorization", "Basic PROXY-AUTH-SECRET-5b0c"),
        ("grip-sig", "FORGED-SIG-SECRET-0c3f"),
    ];
    let mut logs = Vec::new();
    for format in ["text", "json"] {
        let p = GatewayProc::start(
            &[
                "--log-level",
                "debug",
                "--log-format",
                format,
                "--config",
                &routes,
                "--admin-token",
                "ADMINTOKEN-c81b",
                "--drain-period",
                "0s",
            ],
            &[],
        )
        .await;
        let (mut c, _) = connect_with(&format!("ws://{}/chat?x=1", p.addr), &client_secrets).await;
        c.send_text("hello").await;
        c.expect_text("hello").await;
        let (status, _, _) = http_request(p.addr, "GET", "/page", &client_secrets, b"").await;
        assert_eq!(status, StatusCode::OK);
        let publish = br#"{"items":[{"channel":"room","formats":{"ws-message":{"content":"pub"}}}]}"#;
        for token in ["WRONG-TOKEN-SECRET-9aa0", "ADMINTOKEN-c81b"] {
            let auth = format!("Bearer {token}");
            http_request(p.admin, "POST", "/publish/", &[("authorization", &auth)], publish).await;
        }
        c.expect_text("pub").await;
        c.send(WsMessage::Close(None)).await;
        let log = p.stop().await;
        assert!(
            log.contains("wsgate gateway started") && log.contains("admin request not authenticated"),
            "debug logging was on ({format}):\n{log}"
        );
        logs.push(log);
    }
    let mut secrets: Vec<String> = vec![
        "SIGNINGKEY-7f3a9".into(),
        "ADMINTOKEN-c81b".into(),
        "WRONG-TOKEN-SECRET-9aa0".into(),
        "COOKIE-SECRET-41d2".into(),
        "CLIENT-AUTH-SECRET-88e1".into(),
        "PROXY-AUTH-SECRET-5b0c".into(),
        "FORGED-SIG-SECRET-0c3f".into(),
    ];
    let sent: Vec<String> = backend
        .requests()
        .iter()
        .filter_map(|r| r.header("grip-sig").map(str::to_owned))
        .collect();
    assert!(sent.len() >= 4, "the gateway signed its requests: {sent:?}");
    // Each token's signature segment alone is the secret part.
    secrets.extend(sent.iter().filter_map(|t| t.rsplit('.').next().map(str::to_owned)));
    for log in &logs {
        for secret in &secrets {
            assert!(!log.contains(secret.as_str()), "the log shows {secret:?}:\n{log}");
        }
    }
}
