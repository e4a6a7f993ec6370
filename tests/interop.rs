//! Interop with the published GRIP libraries: backends written with Python `gripcontrol` (PyPI)
//! and npm `@fanoutio/serve-grip` + `@fanoutio/grip`, run as real processes behind an
//! in-process gateway, with a tokio-tungstenite client in front; and the libraries' publishers
//! (`GripPubControl`, `Publisher`) publishing through the gateway's publish API, with and without
//! its authentication.
//!
//! The libraries are installed by `scripts/test`, which exports where they are:
//! `WSGATE_PYTHON` (a Python with `gripcontrol`), `WSGATE_NODE` (node, default `node`) and
//! `WSGATE_NODE_MODULES` (a `node_modules` with both npm packages). Without them a test prints
//! why and passes without running, except under `CI=true`, where a missing tool fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The key the gateway signs `Grip-Sig` with (32 bytes or more, so PyJWT does not warn).
const KEY: &str = "wsgate-interop-signing-key-0123456789";

/// Which backend implementation to run.
#[derive(Debug, Clone, Copy)]
enum Lang {
    /// tests/interop/grip_backend.py with PyPI `gripcontrol`.
    Python,
    /// tests/interop/grip_backend.mjs with npm `@fanoutio/serve-grip` and `@fanoutio/grip`.
    Node,
    /// examples/echo_backend.py: the protocol by hand, no library.
    Example,
}

/// The value of a tool variable exported by scripts/test. `None` (with the reason printed) when
/// it is missing outside CI; a missing tool fails the test under `CI=true`.
fn tool_var(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            let why = format!("{var} is not set ({what}); scripts/test installs it and sets {var}");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and {why}");
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// The Python that scripts/test set up (`gripcontrol` installed).
fn python() -> Option<String> {
    tool_var("WSGATE_PYTHON", "a Python with the PyPI package gripcontrol")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(name)
}

/// A GRIP backend process on 127.0.0.1. It exits when its stdin closes (on drop) and is killed
/// on drop as well.
struct ExternalBackend {
    lang: Lang,
    addr: std::net::SocketAddr,
    _child: Child,
    _stdin: ChildStdin,
}

impl ExternalBackend {
    /// Starts the backend for `lang`, checking `Grip-Sig` against `verify_key`; `None` when the
    /// tool is missing outside CI.
    async fn start(lang: Lang, verify_key: &str) -> Option<Self> {
        let mut cmd = match lang {
            Lang::Python => {
                let mut cmd = Command::new(python()?);
                cmd.arg(script("grip_backend.py"));
                cmd
            }
            Lang::Example => unreachable!("the example backend is started with spawn"),
            Lang::Node => {
                let modules = tool_var(
                    "WSGATE_NODE_MODULES",
                    "node_modules with @fanoutio/grip and @fanoutio/serve-grip",
                )?;
                let node = std::env::var("WSGATE_NODE").unwrap_or_else(|_| "node".to_owned());
                let mut cmd = Command::new(node);
                cmd.arg(script("grip_backend.mjs")).env("WSGATE_NODE_MODULES", modules);
                cmd
            }
        };
        cmd.env("GRIP_KEY", verify_key).env("GRIP_ISS", "wsgate");
        Some(Self::spawn(lang, cmd).await)
    }

    /// Runs `cmd` and waits for its first stdout line, which ends with the port it listens on
    /// (`LISTENING 4321`, `... http://127.0.0.1:4321`).
    async fn spawn(lang: Lang, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {lang:?} backend: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the {lang:?} backend printed no port in time"))
            .expect("read backend stdout");
        let Some(line) = first else {
            let status = child.wait().await;
            panic!("the {lang:?} backend exited before listening ({status:?}); see its stderr above");
        };
        let trimmed = line.trim_end();
        let port: u16 = trimmed
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port at the end of the {lang:?} backend's first line: {line:?}"));
        Self {
            lang,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            _child: child,
            _stdin: stdin,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The backend's log of events requests, once an event of `event_type` is in it (the
    /// backend waits for it, up to 8 s).
    async fn log_until(&self, event_type: &str) -> Vec<Value> {
        let (status, _, body) = http_request(
            self.addr,
            "GET",
            &format!("/log?until={event_type}&timeout=8"),
            &[],
            b"",
        )
        .await;
        assert_eq!(status, 200, "GET /log on the {:?} backend", self.lang);
        let log: Value = serde_json::from_slice(&body).expect("backend log is JSON");
        let requests = log["requests"].as_array().expect("requests array").clone();
        assert!(
            requests
                .iter()
                .any(|r| events_of(r).iter().any(|e| e["type"] == event_type)),
            "the {:?} backend never saw {event_type}; log: {requests:#?}",
            self.lang
        );
        requests
    }

    /// Has the backend publish `text` to `channel` through the gateway's publish API, with
    /// the library's publisher (`GripPubControl` / `Publisher`).
    async fn publish(&self, control_uri: &str, channel: &str, text: &str) {
        let (ok, error) = self.try_publish(control_uri, channel, text, &[]).await;
        assert!(ok, "{:?} library publish failed: {error}", self.lang);
    }

    /// Like [`Self::publish`] with extra publisher settings (`iss`, `key`); returns whether the
    /// library reported success, and its error text.
    async fn try_publish(
        &self,
        control_uri: &str,
        channel: &str,
        text: &str,
        extra: &[(&str, &str)],
    ) -> (bool, String) {
        let mut path = format!("/publish?control_uri={control_uri}&channel={channel}&text={text}");
        for (name, value) in extra {
            path.push_str(&format!("&{name}={value}"));
        }
        let (status, _, body) = http_request(self.addr, "POST", &path, &[], b"").await;
        (status == 200, String::from_utf8_lossy(&body).into_owned())
    }
}

fn events_of(request: &Value) -> Vec<Value> {
    request["events"].as_array().cloned().unwrap_or_default()
}

/// A gateway with one route to `backend_url`, GRIP on, signing with `key`.
async fn gateway(backend_url: &str, key: &str) -> TestGateway {
    TestGateway::from_yaml(&format!(
        "routes:\n  - name: interop\n    backend: {{url: \"{backend_url}\"}}\n    grip:\n      signingKey: {{value: \"{key}\"}}\n"
    ))
    .await
}

/// Echo, metadata, signature and a clean close against the backend written in `lang`.
async fn echo_and_clean_close(lang: Lang) {
    let Some(backend) = ExternalBackend::start(lang, KEY).await else {
        return;
    };
    let gw = gateway(&backend.url(), KEY).await;
    let mut c = gw.connect("/chat?room=1").await;
    c.send_text("hello").await;
    // The library sends "m:hello"; the gateway strips the GRIP message prefix.
    c.expect_text("hello").await;
    c.send_text("second").await;
    c.expect_text("second").await;
    c.ws.close(Some(WsCloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .expect("send close");
    assert_eq!(
        c.expect_close().await,
        (1000, String::new()),
        "the backend's CLOSE answer"
    );

    let log = backend.log_until("CLOSE").await;
    assert_eq!(
        events_of(&log[0]),
        vec![serde_json::json!({"type": "OPEN"})],
        "first request: {log:#?}"
    );
    assert_eq!(log[0]["path"], "/chat?room=1");
    let id = log[0]["connection_id"].as_str().expect("Connection-Id").to_owned();
    for r in &log {
        assert_eq!(
            r["connection_id"],
            id.as_str(),
            "one Connection-Id per connection: {r:#}"
        );
        assert_eq!(r["grip_extension"], "grip", "GRIP offered on every request: {r:#}");
        assert_eq!(r["sig_present"], true, "Grip-Sig on every request: {r:#}");
        assert_eq!(r["sig_valid"], true, "the library accepted Grip-Sig: {r:#}");
    }
    // The backend bound user=alice on OPEN (Set-Meta-User); later requests carry it.
    assert!(log.len() >= 3, "OPEN, messages and CLOSE: {log:#?}");
    for r in &log[1..] {
        assert_eq!(r["meta"]["user"], "alice", "Meta-User after Set-Meta-User: {r:#}");
    }
    let texts: Vec<Value> = log
        .iter()
        .flat_map(events_of)
        .filter(|e| e["type"] == "TEXT")
        .map(|e| e["text"].clone())
        .collect();
    assert_eq!(texts, vec![Value::from("hello"), Value::from("second")]);
    let close = log
        .iter()
        .flat_map(events_of)
        .find(|e| e["type"] == "CLOSE")
        .expect("CLOSE");
    assert_eq!(close["code"], 1000);
}

/// A gateway signing with a different key than the backend verifies with: the library must
/// reject every signature (so the positive check above is meaningful).
async fn wrong_key_fails_validation(lang: Lang) {
    let Some(backend) = ExternalBackend::start(lang, KEY).await else {
        return;
    };
    let gw = gateway(&backend.url(), "another-key-that-the-backend-does-not-know").await;
    let mut c = gw.connect("/").await;
    c.send_text("x").await;
    c.expect_text("x").await;
    let log = backend.log_until("TEXT").await;
    for r in &log {
        assert_eq!(r["sig_present"], true);
        assert_eq!(
            r["sig_valid"], false,
            "a signature with the wrong key must not validate: {r:#}"
        );
    }
}

/// The backend subscribed the connection to `room` when it opened; a publish made with the
/// library's publisher through the gateway's publish API reaches the client.
async fn library_publish_reaches_subscriber(lang: Lang) {
    let Some(backend) = ExternalBackend::start(lang, KEY).await else {
        return;
    };
    let gw = gateway(&backend.url(), KEY).await;
    let mut c = gw.connect("/").await;
    // One round trip: the OPEN response (with the subscribe) has been applied before this echo.
    c.send_text("ready").await;
    c.expect_text("ready").await;
    backend
        .publish(&format!("http://{}", gw.admin), "room", "from-the-library")
        .await;
    c.expect_text("from-the-library").await;
}

#[tokio::test]
async fn python_gripcontrol_backend_echo_meta_sig_and_close() {
    echo_and_clean_close(Lang::Python).await;
}

#[tokio::test]
async fn python_gripcontrol_rejects_a_signature_made_with_another_key() {
    wrong_key_fails_validation(Lang::Python).await;
}

#[tokio::test]
async fn node_serve_grip_backend_echo_meta_sig_and_close() {
    echo_and_clean_close(Lang::Node).await;
}

#[tokio::test]
async fn node_grip_rejects_a_signature_made_with_another_key() {
    wrong_key_fails_validation(Lang::Node).await;
}

/// The README's example backend (examples/echo_backend.py, standard library only) works
/// behind the gateway as documented: WebSocket echo, and plain HTTP passed through.
#[tokio::test]
async fn example_echo_backend_works_behind_the_gateway() {
    let Some(python) = python() else {
        return;
    };
    let mut cmd = Command::new(python);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/echo_backend.py"))
        .args(["--port", "0"]);
    let backend = ExternalBackend::spawn(Lang::Example, cmd).await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/any/path").await;
    c.send_text("hi").await;
    c.expect_text("hi").await;
    c.send(tokio_tungstenite::tungstenite::Message::binary(vec![0u8, 255, 1]))
        .await;
    match c.next_data().await {
        tokio_tungstenite::tungstenite::Message::Binary(b) => assert_eq!(&b[..], &[0, 255, 1]),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    c.ws.close(Some(WsCloseFrame {
        code: CloseCode::Away,
        reason: "done".into(),
    }))
    .await
    .expect("send close");
    assert_eq!(c.expect_close().await, (1001, "done".to_owned()));
    let (status, _, body) = http_request(gw.addr, "GET", "/", &[], b"").await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&body).starts_with("wsgate echo backend"),
        "{body:?}"
    );
}

#[tokio::test]
async fn python_grippubcontrol_publish_reaches_the_subscribed_client() {
    library_publish_reaches_subscriber(Lang::Python).await;
}

#[tokio::test]
async fn node_publisher_publish_reaches_the_subscribed_client() {
    library_publish_reaches_subscriber(Lang::Node).await;
}

/// A second admin listener on the test gateway's registry that requires `auth`.
async fn admin_with_auth(gw: &TestGateway, auth: wsgate::admin::auth::Auth) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let addr = listener.local_addr().expect("admin addr");
    let state = std::sync::Arc::new(wsgate::admin::AdminState {
        gateway: gw.gw.clone(),
        listening: true.into(),
        reload: None,
        hub: wsgate::grip::Hub::new(gw.gw.registry.clone()),
        auth: Some(auth),
        max_publish_body: wsgate::admin::publish::DEFAULT_MAX_PUBLISH_BODY,
        control: None,
    });
    // Stops with the test's runtime.
    tokio::spawn(wsgate::admin::run(
        listener,
        state,
        tokio_util::sync::CancellationToken::new(),
    ));
    format!("http://{addr}")
}

/// The publish API with `--publish-jwt-key`: the library's publisher configured with
/// `control_iss` and `key` signs a JWT the gateway accepts; with another key it is refused.
async fn library_publish_with_jwt_auth(lang: Lang) {
    const PUBLISH_KEY: &str = "publish-key-for-the-interop-tests-0123";
    let Some(backend) = ExternalBackend::start(lang, KEY).await else {
        return;
    };
    let gw = gateway(&backend.url(), KEY).await;
    let auth = wsgate::admin::auth::Auth::from_flags(None, Some(PUBLISH_KEY.to_owned()))
        .expect("valid key")
        .expect("auth on");
    let control_uri = admin_with_auth(&gw, auth).await;
    let mut c = gw.connect("/").await;
    c.send_text("ready").await;
    c.expect_text("ready").await;

    let (ok, error) = backend
        .try_publish(
            &control_uri,
            "room",
            "forged",
            &[("iss", "app"), ("key", "not-the-publish-key-0123456789abcdef")],
        )
        .await;
    assert!(!ok, "a JWT signed with another key must be refused");
    assert!(error.contains("401"), "the library reports the 401: {error}");
    let (ok, error) = backend
        .try_publish(&control_uri, "room", "signed", &[("iss", "app"), ("key", PUBLISH_KEY)])
        .await;
    assert!(ok, "{lang:?} library publish with a JWT failed: {error}");
    // The refused publish delivered nothing: the first message is the signed one.
    c.expect_text("signed").await;
}

/// The publish API with `--admin-token`: npm `Publisher` with `key` and no `control_iss` sends
/// `Authorization: Bearer <key>`, which the gateway compares with its token.
#[tokio::test]
async fn node_publisher_bearer_key_meets_admin_token() {
    let Some(backend) = ExternalBackend::start(Lang::Node, KEY).await else {
        return;
    };
    let gw = gateway(&backend.url(), KEY).await;
    let auth = wsgate::admin::auth::Auth::from_flags(Some("admin-token-42".to_owned()), None)
        .expect("valid token")
        .expect("auth on");
    let control_uri = admin_with_auth(&gw, auth).await;
    let mut c = gw.connect("/").await;
    c.send_text("ready").await;
    c.expect_text("ready").await;
    let (ok, error) = backend
        .try_publish(&control_uri, "room", "wrong", &[("key", "admin-token-41")])
        .await;
    assert!(
        !ok && error.contains("401"),
        "a wrong bearer token must be refused: {error}"
    );
    let (ok, error) = backend
        .try_publish(&control_uri, "room", "right", &[("key", "admin-token-42")])
        .await;
    assert!(ok, "publish with the admin token failed: {error}");
    c.expect_text("right").await;
}

#[tokio::test]
async fn python_grippubcontrol_jwt_meets_publish_jwt_key() {
    library_publish_with_jwt_auth(Lang::Python).await;
}

#[tokio::test]
async fn node_publisher_jwt_meets_publish_jwt_key() {
    library_publish_with_jwt_auth(Lang::Node).await;
}
