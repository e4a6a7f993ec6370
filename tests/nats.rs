//! Scale out (DESIGN.md): publishes and the connection API across gateway replicas over a real
//! `nats-server`. Two in-process gateways with their own registries, hubs and bridges are two
//! replicas; one test runs two real `wsgate gateway` processes.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use support::nats::{NatsServer, Replica, connection_id_for, grip_backend, sub_path};
use support::*;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wsgate::grip::nats::NatsState;
use wsgate::protocol::control::MessageType;
use wsgate::protocol::publish::{Item, WsMessageAction};

fn text_item(channel: &str, text: &str) -> Item {
    Item {
        channel: channel.into(),
        id: None,
        prev_id: None,
        meta: BTreeMap::new(),
        ws: Some(WsMessageAction::Send {
            kind: MessageType::Text,
            content: Bytes::copy_from_slice(text.as_bytes()),
        }),
    }
}

/// Publishes `prefix-N` through `publish` until `client` receives one of them (paced by a short
/// receive timeout, bounded by the test deadline): for waiting until a path has recovered.
async fn publish_until_received<F, Fut>(client: &mut Client, prefix: &str, mut publish: F)
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for i in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {prefix} message arrived in time"
        );
        publish(format!("{prefix}-{i}")).await;
        match tokio::time::timeout(Duration::from_millis(100), client.ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str().starts_with(prefix) => return,
            Ok(other) => panic!("unexpected while probing: {other:?}"),
        }
    }
}

/// Expects `want` next, skipping earlier probe messages starting with `skip`.
async fn expect_text_skipping(client: &mut Client, want: &str, skip: &str) {
    loop {
        match client.next_data().await {
            WsMessage::Text(t) if t.as_str().starts_with(skip) => continue,
            WsMessage::Text(t) => {
                assert_eq!(t.as_str(), want);
                return;
            }
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn publish_reaches_subscribers_on_every_replica_exactly_once() {
    let nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = Replica::start(&backend.url(), &nats.url()).await;
    let b = Replica::start(&backend.url(), &nats.url()).await;
    assert_ne!(a.bridge.replica_id(), b.bridge.replica_id());

    let mut a1 = a.subscriber("room", "a1").await;
    let mut b1 = b.subscriber("room", "b1").await;
    a.wait_subscribed("room").await;
    b.wait_subscribed("room").await;

    assert_eq!(
        a.hub.publish(&[text_item("room", "m1")]).await,
        1,
        "one local subscriber on A"
    );
    a1.expect_text("m1").await;
    b1.expect_text("m1").await;
    // The next message each client sees is m2: m1 came exactly once (no NATS echo on A).
    a.hub.publish(&[text_item("room", "m2")]).await;
    a1.expect_text("m2").await;
    b1.expect_text("m2").await;

    // The other way round, through B's publish API over HTTP.
    let body = br#"{"items":[{"channel":"room","formats":{"ws-message":{"content":"m3"}}}]}"#;
    let (status, _, resp) = http_request(b.tg.admin, "POST", "/publish", &[], body).await;
    assert_eq!(status, 200, "{resp:?}");
    b1.expect_text("m3").await;
    a1.expect_text("m3").await;
    a.hub.publish(&[text_item("room", "m4")]).await;
    a1.expect_text("m4").await;
    b1.expect_text("m4").await;

    assert_eq!(
        a.bridge.stats().own_echo_skipped.load(Ordering::Relaxed),
        0,
        "no_echo keeps our own publishes away"
    );
    assert_eq!(a.bridge.stats().forwarded.load(Ordering::Relaxed), 3);
    assert_eq!(b.bridge.stats().received.load(Ordering::Relaxed), 3);
    assert_eq!(a.bridge.stats().received.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn nats_subscriptions_follow_local_subscribers() {
    let nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = Replica::start(&backend.url(), &nats.url()).await;
    let b = Replica::start(&backend.url(), &nats.url()).await;
    b.bridge.sync().await.expect("sync");
    assert!(
        b.bridge.subscribed_channels().is_empty(),
        "no local subscriber, no NATS subscription"
    );

    let mut b1 = b.subscriber("news", "b1").await;
    b.wait_subscribed("news").await;
    assert_eq!(b.bridge.subscribed_channels(), vec!["news".to_owned()]);
    // A publishes without local subscribers (and holds no subscription itself): B still gets it.
    assert_eq!(a.hub.publish(&[text_item("news", "n1")]).await, 0);
    b1.expect_text("n1").await;
    assert!(a.bridge.subscribed_channels().is_empty());

    // A second subscriber on B does not add a subscription; the first leaving keeps it.
    let mut b2 = b.subscriber("news", "b2").await;
    let reg = b.tg.gw.registry.clone();
    eventually("two local subscriptions on B", || {
        let reg = reg.clone();
        async move { reg.subscription_count() == 2 }
    })
    .await;
    b1.ws.close(None).await.expect("close b1");
    eventually("one local subscription on B", || {
        let reg = reg.clone();
        async move { reg.subscription_count() == 1 }
    })
    .await;
    b.bridge.sync().await.expect("sync");
    assert_eq!(b.bridge.subscribed_channels(), vec!["news".to_owned()]);
    a.hub.publish(&[text_item("news", "n2")]).await;
    b2.expect_text("n2").await;

    // The last one leaving drops the NATS subscription.
    b2.ws.close(None).await.expect("close b2");
    b.wait_unsubscribed("news").await;
    b.bridge.sync().await.expect("sync");
    assert!(b.bridge.subscribed_channels().is_empty());
}

#[tokio::test]
async fn channel_hook_handles_quick_and_reordered_changes() {
    let nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = Replica::start(&backend.url(), &nats.url()).await;
    let hook = a.bridge.channel_hook();

    for _ in 0..50 {
        hook("flap", true);
        hook("flap", false);
    }
    a.bridge.sync().await.expect("sync");
    assert!(
        a.bridge.subscribed_channels().is_empty(),
        "subscribe/unsubscribe pairs leave nothing"
    );

    // Two connection tasks racing: the registry went 1 -> 0 -> 1, the callbacks arrived as
    // "first" before "last left". The channel still has a subscriber.
    hook("race", true);
    a.bridge.sync().await.expect("sync");
    hook("race", true);
    hook("race", false);
    a.bridge.sync().await.expect("sync");
    assert_eq!(a.bridge.subscribed_channels(), vec!["race".to_owned()]);
    hook("race", false);
    a.bridge.sync().await.expect("sync");
    assert!(a.bridge.subscribed_channels().is_empty());

    // Registry 0 -> 1 -> 0 with the callbacks reversed: nothing to subscribe.
    hook("rev", false);
    hook("rev", true);
    a.bridge.sync().await.expect("sync");
    assert!(a.bridge.subscribed_channels().is_empty());
}

#[tokio::test]
async fn nats_outage_keeps_local_delivery_and_cross_replica_delivery_resumes() {
    let mut nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = Replica::start(&backend.url(), &nats.url()).await;
    let b = Replica::start(&backend.url(), &nats.url()).await;
    let mut a1 = a.subscriber("room", "a1").await;
    let mut b1 = b.subscriber("room", "b1").await;
    a.wait_subscribed("room").await;
    b.wait_subscribed("room").await;
    a.hub.publish(&[text_item("room", "before")]).await;
    a1.expect_text("before").await;
    b1.expect_text("before").await;

    nats.kill().await;
    a.wait_state(NatsState::Disconnected).await;
    b.wait_state(NatsState::Disconnected).await;
    assert_eq!(a.bridge.degraded_reason(), Some("nats disconnected"));

    // Local delivery goes on, and publishing does not wait for NATS.
    let started = tokio::time::Instant::now();
    assert_eq!(a.hub.publish(&[text_item("room", "during")]).await, 1);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "publish waited for NATS"
    );
    a1.expect_text("during").await;
    assert!(a.bridge.stats().dropped_disconnected.load(Ordering::Relaxed) >= 1);
    // Connection-API calls for unknown ids answer at once while disconnected.
    let started = tokio::time::Instant::now();
    assert!(a.hub.get("not-a-connection").await.is_none());
    assert!(started.elapsed() < Duration::from_millis(100));
    // A subscriber arriving during the outage gets its subscription after the reconnect.
    let mut b2 = b.subscriber("late", "b2").await;
    let b_bridge = b.bridge.clone();
    eventually("B records the wanted subscription", move || {
        let b = b_bridge.clone();
        async move { b.subscribed_channels().contains(&"late".to_owned()) }
    })
    .await;

    nats.restart().await;
    a.wait_state(NatsState::Connected).await;
    b.wait_state(NatsState::Connected).await;
    assert_eq!(a.bridge.degraded_reason(), None);

    // async-nats re-sends subscriptions after reconnecting: B hears A again.
    let hub = a.hub.clone();
    publish_until_received(&mut b1, "probe", |m| {
        let hub = hub.clone();
        async move {
            hub.publish(&[text_item("room", &m)]).await;
        }
    })
    .await;
    a.hub.publish(&[text_item("room", "after")]).await;
    expect_text_skipping(&mut b1, "after", "probe").await;
    expect_text_skipping(&mut a1, "after", "probe").await;

    let hub = a.hub.clone();
    publish_until_received(&mut b2, "late", |m| {
        let hub = hub.clone();
        async move {
            hub.publish(&[text_item("late", &m)]).await;
        }
    })
    .await;
}

#[tokio::test]
async fn connection_api_reaches_connections_on_other_replicas() {
    let nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = Replica::start(&backend.url(), &nats.url()).await;
    let b = Replica::start(&backend.url(), &nats.url()).await;
    let path = sub_path("room", "a1");
    let mut a1 = a.tg.connect(&path).await;
    a.wait_subscribed("room").await;
    let id = connection_id_for(&backend, &path);
    assert!(b.tg.gw.registry.get(&id).is_none(), "the connection lives on A");

    let (status, _, body) = http_request(b.tg.admin, "GET", &format!("/connections/{id}"), &[], b"").await;
    assert_eq!(status, 200, "{body:?}");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["subscriptions"], serde_json::json!(["room"]));

    let (status, _, body) = http_request(
        b.tg.admin,
        "POST",
        &format!("/connections/{id}/messages"),
        &[],
        br#"{"content":"direct"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body:?}");
    a1.expect_text("direct").await;

    let (status, _, body) = http_request(
        b.tg.admin,
        "DELETE",
        &format!("/connections/{id}"),
        &[],
        br#"{"code":4000,"reason":"bye"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(a1.expect_close().await, (4000, "bye".to_owned()));
    // Polling again sends the client's close reply, so A ends the connection without waiting.
    let end = tokio::time::timeout(DEADLINE, a1.ws.next())
        .await
        .expect("connection ends");
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");

    let reg = a.tg.gw.registry.clone();
    let gone = id.clone();
    eventually("connection unregistered on A", move || {
        let (reg, gone) = (reg.clone(), gone.clone());
        async move { reg.get(&gone).is_none() }
    })
    .await;
    let (status, _, _) = http_request(b.tg.admin, "GET", &format!("/connections/{id}"), &[], b"").await;
    assert_eq!(status, 404);
    let (status, _, _) = http_request(
        b.tg.admin,
        "POST",
        &format!("/connections/{id}/messages"),
        &[],
        br#"{"content":"x"}"#,
    )
    .await;
    assert_eq!(status, 404);
    assert!(b.bridge.stats().remote_requests.load(Ordering::Relaxed) >= 5);
    assert_eq!(a.bridge.stats().requests_answered.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn channel_names_that_are_not_subject_tokens_work() {
    let nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = Replica::start(&backend.url(), &nats.url()).await;
    let b = Replica::start(&backend.url(), &nats.url()).await;
    let long = "l".repeat(600);
    let names = ["chat.room 1", "a.*.>", "tab\there", "ünï ☃", long.as_str(), "chat"];
    let mut clients = Vec::new();
    for (i, n) in names.iter().enumerate() {
        clients.push(b.subscriber(n, &format!("c{i}")).await);
        b.wait_subscribed(n).await;
    }
    let mut want = names.map(str::to_owned).to_vec();
    want.sort();
    assert_eq!(b.bridge.subscribed_channels(), want);
    // Each client receives its own channel only: no name leaks into another's subject.
    for (i, n) in names.iter().enumerate() {
        a.hub.publish(&[text_item(n, &format!("to {i}"))]).await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.expect_text(&format!("to {i}")).await;
    }
    a.hub.publish(&[text_item("chat", "end")]).await;
    clients[5].expect_text("end").await;
    assert_eq!(b.bridge.stats().rejected.load(Ordering::Relaxed), 0);
}

// ---- two real `wsgate gateway` processes ----

struct Process {
    child: tokio::process::Child,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Process {
    async fn start(backend: &str, nats: &str) -> Self {
        let (listen, admin) = (free_addr(), free_addr());
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args([
                "gateway",
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args(["--backend", backend, "--nats", nats])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsgate");
        let p = Self { child, listen, admin };
        eventually("wsgate process ready", || async move {
            match tokio::net::TcpStream::connect(admin).await {
                Ok(_) => http_request(admin, "GET", "/readyz", &[], b"").await.0 == 200,
                Err(_) => false,
            }
        })
        .await;
        p
    }

    async fn connect(&self, path: &str) -> Client {
        let url = format!("ws://{}{path}", self.listen);
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("websocket handshake");
        Client { ws }
    }
}

async fn publish_http(admin: SocketAddr, channel: &str, text: &str) {
    let body = serde_json::json!({"items": [{"channel": channel, "formats": {"ws-message": {"content": text}}}]});
    let (status, _, resp) = http_request(admin, "POST", "/publish", &[], body.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{resp:?}");
}

#[tokio::test]
async fn two_gateway_processes_share_publishes_over_nats() {
    let nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let mut a = Process::start(&backend.url(), &nats.url()).await;
    let mut b = Process::start(&backend.url(), &nats.url()).await;
    let mut a1 = a.connect(&sub_path("room", "a1")).await;
    let mut b1 = b.connect(&sub_path("room", "b1")).await;

    // B's NATS subscription is live once a probe published on A reaches b1.
    let admin = a.admin;
    publish_until_received(
        &mut b1,
        "probe",
        |m| async move { publish_http(admin, "room", &m).await },
    )
    .await;
    publish_http(a.admin, "room", "hello").await;
    expect_text_skipping(&mut b1, "hello", "probe").await;
    expect_text_skipping(&mut a1, "hello", "probe").await;
    publish_http(b.admin, "room", "back").await;
    a1.expect_text("back").await;
    b1.expect_text("back").await;

    let _ = a.child.kill().await;
    let _ = b.child.kill().await;
}
