//! The `wsgate` binary: exit codes, admin endpoints, routes-file reload and SIGTERM drain, run
//! as a real process against real sockets on 127.0.0.1.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use support::process::GatewayProc;
use support::*;
use wsgate::protocol::events::Event;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

#[test]
fn bad_config_exits_64_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("wsgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "routes:\n  - name: a\n    backend:\n      url: ftp://x\n    limits:\n      maxMesageBytes: 5\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routes[0].backend.url"), "{err}");
    assert!(
        err.contains("maxMesageBytes"),
        "all errors are reported together: {err}"
    );

    let out = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backend",
            "not a url",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend"));

    let out = Command::new(BIN)
        .args(["gateway", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "no route source is a configuration error");

    let out = Command::new(BIN)
        .args(["gateway", "--backend", "http://127.0.0.1:1", "--workers", "5000"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "clap refuses an out-of-range value");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers") && err.contains("5000"), "{err}");

    let out = Command::new(BIN)
        .args(["gateway", "--backend", "http://127.0.0.1:1", "--publish-backlog", "0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "a publish backlog of 0 is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--publish-backlog"));
}

#[tokio::test]
async fn healthz_and_readyz() {
    let backend = Backend::echo().await;
    let p = GatewayProc::start(&["--backend", &backend.url()], &[]).await;
    let (status, _, body) = http_request(p.admin, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"ok\n");
    let (status, _, body) = http_request(p.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).starts_with("ready"));
}

#[tokio::test]
async fn sigterm_drains_clients_with_1001_closes_backends_and_exits_0() {
    drain_on_sigterm("1").await;
}

/// Connections accepted by different data-plane workers are all served and drained.
#[tokio::test]
async fn several_workers_serve_and_drain_every_connection() {
    drain_on_sigterm("3").await;
}

async fn drain_on_sigterm(workers: &str) {
    let backend = Backend::echo().await;
    let mut p = GatewayProc::start(
        &[
            "--backend",
            &backend.url(),
            "--drain-period",
            "200ms",
            "--close-pacing",
            "100ms",
            "--workers",
            workers,
        ],
        &[],
    )
    .await;
    let url = format!("ws://{}/", p.addr);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
        clients.push(Client { ws });
    }
    // Messages accepted before the signal are all answered.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("before {i}")).await;
        c.expect_text(&format!("before {i}")).await;
    }
    p.signal("TERM");
    // Readiness fails at once while connections are still served.
    let mut codes = Vec::new();
    for c in clients.iter_mut() {
        codes.push(c.expect_close().await.0);
    }
    assert!(codes.iter().all(|c| *c == 1001), "{codes:?}");
    assert_eq!(p.wait_exit(DEADLINE).await, Some(0));
    let closes = backend
        .requests()
        .iter()
        .filter(|r| {
            r.events()
                .iter()
                .any(|e| matches!(e, Event::Close(Some(f)) if f.code == 1001))
        })
        .count();
    assert_eq!(closes, 20, "every connection's backend got CLOSE 1001");
}

#[tokio::test]
async fn readiness_fails_during_drain() {
    let backend = Backend::echo().await;
    let p = GatewayProc::start(&["--backend", &backend.url(), "--drain-period", "5s"], &[]).await;
    let _c = {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", p.addr))
            .await
            .expect("connect");
        Client { ws }
    };
    p.signal("TERM");
    eventually("readyz fails while draining", || async {
        match tokio::net::TcpStream::connect(p.admin).await {
            Ok(_) => http_request(p.admin, "GET", "/readyz", &[], b"").await.0 == 503,
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test]
async fn routes_file_reload_keeps_open_connections_and_applies_edits() {
    let backend = Backend::echo().await;
    let dir = std::env::temp_dir().join(format!("wsgate-reload-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("routes.yaml");
    let v1 = format!("routes:\n  - name: app\n    backend:\n      url: {}\n", backend.url());
    std::fs::write(&path, &v1).expect("write");
    let p = GatewayProc::start(
        &["--config", path.to_str().expect("utf8"), "--reload-interval", "50ms"],
        &[],
    )
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", p.addr))
        .await
        .expect("connect");
    let mut c = Client { ws };
    c.send_text("one").await;
    c.expect_text("one").await;

    // An edit: the route now adds a header. The open connection carries on and uses it.
    let v2 = format!(
        "routes:\n  - name: app\n    backend:\n      url: {}\n    headers:\n      add: [{{name: X-Version, value: \"2\"}}]\n",
        backend.url()
    );
    write_routes(&path, &v2);
    eventually("reload applied", || async {
        let (_, _, body) = http_request(p.admin, "GET", "/readyz", &[], b"").await;
        String::from_utf8_lossy(&body).contains("version 2")
    })
    .await;
    c.send_text("two").await;
    c.expect_text("two").await;
    let r = backend.wait_event(Event::Text(Bytes::from_static(b"two"))).await;
    assert_eq!(r.header("x-version"), Some("2"));

    // An invalid file is rejected; the old table stays and traffic flows.
    write_routes(&path, "routes:\n  - name: app\n    backend: {}\n");
    c.send_text("three").await;
    c.expect_text("three").await;
    let (status, _, body) = http_request(p.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `/metrics` text (Prometheus format).
#[tokio::test]
async fn a_rejected_routes_file_shows_in_readyz_and_metrics_without_secrets() {
    let backend = Backend::echo().await;
    let dir = std::env::temp_dir().join(format!("wsgate-reject-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("routes.yaml");
    let good = |rev: &str| {
        format!(
            "routes:\n  - name: app\n    backend:\n      url: {}\n    headers:\n      add: [{{name: X-Rev, value: \"{rev}\"}}]\n",
            backend.url()
        )
    };
    std::fs::write(&path, good("1")).expect("write");
    let p = GatewayProc::start(
        &["--config", path.to_str().expect("utf8"), "--reload-interval", "50ms"],
        &[],
    )
    .await;
    let text = p.metrics().await;
    assert_eq!(
        sample(&text, r#"wsgate_config_info{version="1",source="file"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "wsgate_config_version"), Some(1.0));
    assert_eq!(sample(&text, "wsgate_config_source_up"), Some(1.0));
    assert_eq!(sample(&text, "wsgate_config_reload_failures_total"), Some(0.0));
    let first_success = sample(&text, "wsgate_config_last_success_timestamp_seconds").expect("last success");
    assert!(first_success > 1.6e9, "{first_success}");
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", p.addr))
        .await
        .expect("connect");
    let mut c = Client { ws };
    c.send_text("one").await;
    c.expect_text("one").await;

    // Rejected: credentials in a URL, a signing key given twice, a misspelt field. None of
    // the secret values may show in /readyz.
    let bad = "routes:\n  - name: app\n    backend:\n      url: http://admin:hunter2-password@127.0.0.1:1\n    \
               grip:\n      signingKey: {value: hunter2-signing-key, env: WSGATE_NO_SUCH_VAR}\n    \
               limits:\n      maxMesageBytes: 5\n";
    write_routes(&path, bad);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let body = loop {
        let (status, body) = p.readyz().await;
        assert_eq!(status, 200, "still ready: {body}");
        if body.contains("degraded: routes file failing since ") {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never reported the rejected file: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        body.starts_with("ready (routes version 1); degraded: routes file failing since "),
        "{body}"
    );
    assert!(body.contains("maxMesageBytes"), "the error names the field: {body}");
    assert!(
        body.contains("routes[0].backend.url: must not contain credentials"),
        "{body}"
    );
    assert!(!body.contains("hunter2"), "no secret in /readyz: {body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    let text = p.metrics().await;
    assert!(!text.contains("hunter2"), "no secret in /metrics");
    assert_eq!(sample(&text, "wsgate_config_source_up"), Some(0.0));
    assert_eq!(sample(&text, "wsgate_config_reload_failures_total"), Some(1.0));
    assert_eq!(
        sample(&text, r#"wsgate_config_info{version="1",source="file"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "wsgate_config_version"),
        Some(1.0),
        "the table in use stays"
    );
    // Traffic keeps flowing on the last good routes.
    c.send_text("two").await;
    c.expect_text("two").await;
    let r = backend.wait_event(Event::Text(Bytes::from_static(b"two"))).await;
    assert_eq!(r.header("x-rev"), Some("1"));

    // Fixed: healthy again, a new generation, the failure stays counted.
    write_routes(&path, &good("2"));
    eventually("readyz shows version 2 without degradation", || async {
        p.readyz().await == (200, "ready (routes version 2)\n".to_owned())
    })
    .await;
    let text = p.metrics().await;
    assert_eq!(
        sample(&text, r#"wsgate_config_info{version="2",source="file"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "wsgate_config_version"), Some(2.0));
    assert_eq!(sample(&text, "wsgate_config_source_up"), Some(1.0));
    assert_eq!(sample(&text, "wsgate_config_reload_failures_total"), Some(1.0));
    assert!(sample(&text, "wsgate_config_last_success_timestamp_seconds").is_some_and(|t| t >= first_success));
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn demo_serves_the_page_and_chat_works() {
    let addr = free_addr();
    let admin = free_addr();
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert!(first.contains(&format!("http://{addr}/")), "{first}");
    eventually("demo up", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let (status, headers, body) = http_request(addr, "GET", "/", &[], b"").await;
    assert_eq!(status, 200);
    assert!(
        headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/html"))
    );
    assert!(String::from_utf8_lossy(&body).contains("new WebSocket"));

    let mut echo = {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
            .await
            .expect("connect");
        Client { ws }
    };
    echo.send_text("ping?").await;
    echo.expect_text("ping?").await;

    let mut alice = {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat?name=alice"))
            .await
            .expect("connect");
        Client { ws }
    };
    let mut bob = {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat?name=bob"))
            .await
            .expect("connect");
        Client { ws }
    };
    // bob's join is announced to alice (both subscribed to the room).
    wait_text_containing(&mut alice, "bob joined").await;
    alice.send_text("hello bob").await;
    let got = wait_text_containing(&mut bob, "hello bob").await;
    let v: serde_json::Value = serde_json::from_str(&got).expect("json");
    assert_eq!(v["from"], "alice");
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_text_containing(c: &mut Client, needle: &str) -> String {
    loop {
        match c.next_data().await {
            tokio_tungstenite::tungstenite::Message::Text(t) if t.as_str().contains(needle) => {
                return t.to_string();
            }
            tokio_tungstenite::tungstenite::Message::Text(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn non_loopback_admin_without_auth_is_refused() {
    let out = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--backend",
            "http://127.0.0.1:1",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token"));
}

#[tokio::test]
async fn publish_subcommand_reaches_subscribers() {
    let backend = grip_subscriber_backend("news").await;
    let p = GatewayProc::start(&["--backend", &backend.url(), "--admin-token", "s3cret"], &[]).await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", p.addr))
        .await
        .expect("connect");
    let mut c = Client { ws };
    // The subscription is in place once the OPEN exchange is done; publish until it lands.
    let admin_url = format!("http://{}", p.admin);
    let out = Command::new(BIN)
        .args(["publish", "--url", &admin_url, "--channel", "news", "no token"])
        .output()
        .expect("run");
    assert!(!out.status.success(), "the publish API requires the token");
    let out = Command::new(BIN)
        .args([
            "publish",
            "--url",
            &admin_url,
            "--token",
            "s3cret",
            "--channel",
            "news",
            "extra!",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Published\n");
    c.expect_text("extra!").await;
    let out = Command::new(BIN)
        .args([
            "publish",
            "--url",
            &admin_url,
            "--token",
            "s3cret",
            "--channel",
            "news",
            "--close",
            "4001",
            "--reason",
            "bye",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(c.expect_close().await, (4001, "bye".to_owned()));
}

#[tokio::test]
async fn client_listener_has_the_configured_accept_queue() {
    let backend = Backend::echo().await;
    let p = GatewayProc::start(&["--backend", &backend.url(), "--listen-backlog", "2048"], &[]).await;
    // `ss` reports a listening socket's accept queue limit in its Send-Q column.
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", p.addr.port())])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(send_q, vec!["2048"], "{text}");
}
