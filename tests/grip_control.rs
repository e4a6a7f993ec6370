//! GRIP control messages end to end (PROTOCOL.md section 5): a real backend sends `c:` control
//! messages on a real connection and the client sees their effect.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use support::*;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wsgate::grip::Delivery;
use wsgate::protocol::events::Event;
use wsgate::protocol::frame::Message;

/// A GRIP backend driven by the client: a client message `say X` makes the backend answer
/// with the TEXT `X` verbatim (a control message or a prefixed message); anything else is
/// ignored. OPEN enables GRIP with the prefix given in the path (`/p/<prefix>`) or the default.
async fn scripted_backend() -> Backend {
    Backend::start(|r| {
        let mut out = Vec::new();
        let mut ext = "grip".to_owned();
        if let Some(p) = r.uri.path().strip_prefix("/p/") {
            ext = format!("grip; message-prefix=\"{p}\"");
        }
        for e in r.events() {
            match e {
                Event::Open => out.push(Event::Open),
                Event::Text(t) => {
                    if let Some(rest) = t.strip_prefix(b"say ") {
                        out.push(Event::Text(Bytes::copy_from_slice(rest)));
                    }
                }
                _ => {}
            }
        }
        Reply::events(&out).header("sec-websocket-extensions", &ext)
    })
    .await
}

async fn say(c: &mut Client, what: &str) {
    c.send_text(&format!("say {what}")).await;
}

/// Ping and wait for the pong: everything the client sent before is processed by then.
async fn barrier(c: &mut Client) {
    c.send(WsMessage::Ping(Bytes::from_static(b"barrier"))).await;
    loop {
        if let WsMessage::Pong(p) = c.next().await
            && &p[..] == b"barrier"
        {
            return;
        }
    }
}

fn deliver(gw: &TestGateway, channel: &str, text: &str) -> usize {
    gw.gw.registry.publish(
        channel,
        &BTreeMap::new(),
        &Delivery::Message(Message::Text(Bytes::copy_from_slice(text.as_bytes()))),
    )
}

#[tokio::test]
async fn subscribe_then_unsubscribe() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    say(&mut c, r#"c:{"type":"subscribe","channel":"news"}"#).await;
    say(&mut c, "m:subscribed").await;
    c.expect_text("subscribed").await;
    assert_eq!(deliver(&gw, "news", "first"), 1);
    c.expect_text("first").await;
    say(&mut c, r#"c:{"type":"unsubscribe","channel":"news"}"#).await;
    say(&mut c, "m:unsubscribed").await;
    c.expect_text("unsubscribed").await;
    assert_eq!(deliver(&gw, "news", "second"), 0, "no subscriber left");
    assert_eq!(gw.gw.registry.subscription_count(), 0);
}

#[tokio::test]
async fn detach_stops_relaying_client_messages_but_publishes_arrive() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    say(&mut c, r#"c:{"type":"subscribe","channel":"d"}"#).await;
    say(&mut c, r#"c:{"type":"detach"}"#).await;
    say(&mut c, "m:detached").await;
    c.expect_text("detached").await;
    c.send_text("after detach").await;
    barrier(&mut c).await;
    assert_eq!(deliver(&gw, "d", "still here"), 1);
    c.expect_text("still here").await;
    assert!(
        !backend
            .requests()
            .iter()
            .any(|r| r.events().contains(&Event::Text(Bytes::from_static(b"after detach")))),
        "a detached connection's messages never reach the backend"
    );
}

#[tokio::test]
async fn keep_alive_idle_mode_is_sent_by_the_gateway_and_turned_off() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    say(&mut c, r#"c:{"type":"keep-alive","content":"ka","timeout":1}"#).await;
    c.expect_text("ka").await;
    c.expect_text("ka").await;
    // No content turns it off: after the marker, nothing but the marker arrives.
    say(&mut c, r#"c:{"type":"keep-alive"}"#).await;
    say(&mut c, "m:off").await;
    loop {
        match c.next_data().await {
            WsMessage::Text(t) if t.as_str() == "off" => break,
            WsMessage::Text(t) if t.as_str() == "ka" => continue, // one may have been in flight
            other => panic!("unexpected {other:?}"),
        }
    }
    let quiet = tokio::time::timeout(Duration::from_millis(2500), c.next_data()).await;
    assert!(quiet.is_err(), "keep-alive still running: {quiet:?}");
}

#[tokio::test]
async fn keep_alive_binary_content_and_ping_type() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    // content-bin "AAEC" is base64 for [0, 1, 2].
    say(
        &mut c,
        r#"c:{"type":"keep-alive","content-bin":"AAEC","timeout":1,"mode":"interval"}"#,
    )
    .await;
    match c.next_data().await {
        WsMessage::Binary(b) => assert_eq!(&b[..], &[0, 1, 2]),
        other => panic!("expected binary keep-alive, got {other:?}"),
    }
    say(
        &mut c,
        r#"c:{"type":"keep-alive","content":"hb","message-type":"ping","timeout":1}"#,
    )
    .await;
    loop {
        if let WsMessage::Ping(p) = c.next().await
            && &p[..] == b"hb"
        {
            break;
        }
    }
}

#[tokio::test]
async fn send_delayed_and_flush_delayed() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    say(&mut c, r#"c:{"type":"send-delayed","content":"later","timeout":1}"#).await;
    c.expect_text("later").await;
    say(&mut c, r#"c:{"type":"send-delayed","content":"flushed","timeout":60}"#).await;
    say(&mut c, r#"c:{"type":"flush-delayed"}"#).await;
    c.expect_text("flushed").await;
}

#[tokio::test]
async fn set_meta_is_visible_through_the_connection_api() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    say(&mut c, r#"c:{"type":"set-meta","name":"user","value":"alice"}"#).await;
    say(&mut c, r#"c:{"type":"subscribe","channel":"m"}"#).await;
    say(&mut c, "m:done").await;
    c.expect_text("done").await;
    let id = backend.requests()[0].connection_id();
    let (status, _, body) = http_request(gw.admin, "GET", &format!("/connections/{id}"), &[], b"").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["session_meta"]["user"], "alice");
    assert_eq!(v["subscriptions"], serde_json::json!(["m"]));
}

#[tokio::test]
async fn custom_message_prefix_and_unprefixed_messages_dropped() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/p/msg:").await;
    say(&mut c, "m:wrong prefix").await;
    say(&mut c, "no prefix at all").await;
    say(&mut c, "msg:right prefix").await;
    c.expect_text("right prefix").await;
    // A message that must start with "c:" goes out with the prefix in front.
    say(&mut c, "msg:c:not a control").await;
    c.expect_text("c:not a control").await;
}

#[tokio::test]
async fn malformed_and_unknown_control_messages_are_ignored() {
    let backend = scripted_backend().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    say(&mut c, "c:{not json").await;
    say(&mut c, r#"c:{"type":"teleport"}"#).await;
    say(&mut c, "m:alive").await;
    c.expect_text("alive").await;
}
