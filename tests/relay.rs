//! PROTOCOL.md sections 1-4 end to end: real WebSocket clients, a real gateway and a real
//! recording backend on 127.0.0.1.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::protocol::events::Event;
use wsgate::protocol::frame::CloseFrame;

fn text(s: &str) -> Event {
    Event::Text(Bytes::copy_from_slice(s.as_bytes()))
}

#[tokio::test]
async fn echo_through_the_gateway() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/chat?room=1").await;
    c.send_text("hello").await;
    c.expect_text("hello").await;
    c.send(WsMessage::binary(vec![0u8, 1, 2, 255])).await;
    match c.next_data().await {
        WsMessage::Binary(b) => assert_eq!(&b[..], &[0, 1, 2, 255]),
        other => panic!("expected binary, got {other:?}"),
    }
    let reqs = backend.requests();
    assert_eq!(reqs[0].events(), vec![Event::Open]);
    assert_eq!(reqs[0].method, http::Method::POST);
    assert_eq!(reqs[0].uri.path_and_query().map(|p| p.as_str()), Some("/chat?room=1"));
}

#[tokio::test]
async fn backend_requests_carry_protocol_headers_and_replayed_client_headers() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut headers = upgrade_headers();
    headers.extend([
        ("x-app", "7"),
        ("cookie", "sid=abc"),
        ("meta-user", "spoofed"),
        ("Meta-Admin", "yes"),
        ("sec-websocket-extensions", "permessage-deflate"),
        ("connection-id", "forged"),
        ("accept", "text/html"),
        ("x-forwarded-for", "10.1.1.1"),
        ("grip-sig", "forged"),
    ]);
    let (status, _, _) = http_request(gw.addr, "GET", "/ws", &headers, b"").await;
    assert_eq!(status, 101);
    let r = &backend.requests()[0];
    assert_eq!(r.header("content-type"), Some("application/websocket-events"));
    assert_eq!(r.header("accept"), Some("application/websocket-events"));
    assert_eq!(r.header("x-app"), Some("7"));
    assert_eq!(r.header("cookie"), Some("sid=abc"));
    assert_eq!(r.header("host"), Some(gw.addr.to_string().as_str()));
    assert_eq!(r.header("x-forwarded-for"), Some("10.1.1.1, 127.0.0.1"));
    assert_eq!(r.header("x-forwarded-proto"), Some("http"));
    assert_eq!(r.header("x-forwarded-host"), Some(gw.addr.to_string().as_str()));
    assert!(
        r.header("meta-user").is_none() && r.header("meta-admin").is_none(),
        "client Meta-* never reaches the backend"
    );
    assert!(
        r.header("upgrade").is_none() && r.header("connection").is_none(),
        "hop-by-hop headers are removed"
    );
    assert!(r.header("grip-sig").is_none(), "a client cannot forge Grip-Sig");
    // GRIP is on by default: the gateway's own extension offer, never the client's.
    assert_eq!(r.header("sec-websocket-extensions"), Some("grip"));
    let id = r.connection_id();
    assert_ne!(id, "forged");
    let parsed = uuid::Uuid::parse_str(&id).expect("Connection-Id is a UUID");
    assert_eq!(parsed.get_version_num(), 4);
    assert_eq!(id, id.to_lowercase());
}

#[tokio::test]
async fn connection_id_and_headers_are_the_same_on_every_request() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    for i in 0..3 {
        c.send_text(&format!("m{i}")).await;
        c.expect_text(&format!("m{i}")).await;
    }
    let reqs = backend.requests();
    assert!(reqs.len() >= 4);
    let id = reqs[0].connection_id();
    assert!(reqs.iter().all(|r| r.connection_id() == id));
    assert!(reqs.iter().all(|r| r.header("x-forwarded-for") == Some("127.0.0.1")));
}

#[tokio::test]
async fn rejected_handshake_passes_backend_status_headers_and_body() {
    let backend = Backend::start(|_| Reply::status(403, "forbidden here").header("x-why", "policy")).await;
    let gw = TestGateway::start(&backend.url()).await;
    let (status, headers, body) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 403);
    assert_eq!(headers.get("x-why").map(|v| v.as_bytes()), Some(&b"policy"[..]));
    assert_eq!(&body[..], b"forbidden here");
}

#[tokio::test]
async fn rejection_body_is_capped() {
    let big = "x".repeat(300_000);
    let backend = Backend::start(move |_| Reply::status(400, &big)).await;
    let gw = TestGateway::start(&backend.url()).await;
    let (status, _, body) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 400);
    assert_eq!(
        body.len(),
        100_000,
        "rejection body is capped at 100,000 bytes by default"
    );
}

#[tokio::test]
async fn backend_response_headers_reach_the_101() {
    let backend = Backend::start(|r| {
        echo_reply(r)
            .header("sec-websocket-protocol", "v2.chat")
            .header("x-session", "s1")
            .header("set-meta-user", "alice")
            .header("keep-alive-interval", "60")
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut headers = upgrade_headers();
    headers.push(("sec-websocket-protocol", "v1.chat, v2.chat"));
    let (status, h, _) = http_request(gw.addr, "GET", "/", &headers, b"").await;
    assert_eq!(status, 101);
    assert_eq!(
        h.get("sec-websocket-protocol").map(|v| v.as_bytes()),
        Some(&b"v2.chat"[..])
    );
    assert_eq!(h.get("x-session").map(|v| v.as_bytes()), Some(&b"s1"[..]));
    for absent in [
        "set-meta-user",
        "keep-alive-interval",
        "content-type",
        "sec-websocket-extensions",
    ] {
        assert!(h.get(absent).is_none(), "{absent} must not reach the client");
    }
    assert_eq!(
        h.get("sec-websocket-accept").map(|v| v.as_bytes()),
        Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
    );
}

#[tokio::test]
async fn unreachable_backend_gives_502() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let gw = TestGateway::start(&format!("http://127.0.0.1:{port}")).await;
    let (status, _, _) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn open_response_without_open_event_gives_502() {
    let backend = Backend::start(|_| Reply::events(&[text("no open")])).await;
    let gw = TestGateway::start(&backend.url()).await;
    let (status, _, _) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn content_type_parameters_are_tolerated() {
    let backend = Backend::start(|r| {
        let mut reply = echo_reply(r);
        reply.headers = vec![(
            "content-type".into(),
            "application/websocket-events; charset=utf-8".into(),
        )];
        reply
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("x").await;
    c.expect_text("x").await;
}

#[tokio::test]
async fn open_response_messages_are_delivered_at_once() {
    let backend = Backend::start(|r| {
        if r.events().contains(&Event::Open) {
            Reply::events(&[Event::Open, text("welcome"), text("second")])
        } else {
            Reply::events(&[])
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.expect_text("welcome").await;
    c.expect_text("second").await;
}

#[tokio::test]
async fn set_meta_is_sent_back_as_meta_headers() {
    let backend = Backend::start(|r| {
        let mut reply = echo_reply(r);
        if r.events().contains(&Event::Open) {
            reply = reply.header("Set-Meta-User", "alice").header("Set-Meta-Room", "lobby");
        } else if r.events().contains(&text("leave")) {
            reply = reply.header("Set-Meta-Room", "");
        }
        reply
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("one").await;
    c.expect_text("one").await;
    let r = backend.wait_event(text("one")).await;
    assert_eq!(r.header("meta-user"), Some("alice"));
    assert_eq!(r.header("meta-room"), Some("lobby"));
    c.send_text("leave").await;
    c.expect_text("leave").await;
    c.send_text("two").await;
    c.expect_text("two").await;
    let r = backend.wait_event(text("two")).await;
    assert_eq!(r.header("meta-user"), Some("alice"));
    assert!(r.header("meta-room").is_none(), "empty Set-Meta value removes it");
}

#[tokio::test]
async fn client_close_reaches_backend_and_backend_answer_reaches_client() {
    let backend = Backend::start(|r| {
        let evs = r.events();
        if evs.iter().any(|e| matches!(e, Event::Close(_))) {
            Reply::events(&[Event::Close(Some(CloseFrame {
                code: 4002,
                reason: "see you".into(),
            }))])
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.ws.close(Some(WsCloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4002, "see you"));
    backend
        .wait_event(Event::Close(Some(CloseFrame {
            code: 4001,
            reason: "bye".into(),
        })))
        .await;
}

#[tokio::test]
async fn backend_close_reaches_client_and_client_answer_is_relayed() {
    let backend = Backend::start(|r| {
        if r.events().contains(&text("close me")) {
            Reply::events(&[Event::Close(Some(CloseFrame {
                code: 4100,
                reason: "done".into(),
            }))])
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("close me").await;
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4100, "done"));
    // Polling the stream flushes tungstenite's queued close reply.
    let _ = c.ws.next().await;
    // tungstenite answers the close with the same code; that answer goes to the backend.
    backend
        .wait_event(Event::Close(Some(CloseFrame {
            code: 4100,
            reason: "done".into(),
        })))
        .await;
}

#[tokio::test]
async fn backend_close_without_code_gives_client_1005_no_status() {
    let backend = Backend::start(|r| {
        if r.events().contains(&text("bye")) {
            Reply::raw(b"CLOSE\r\n")
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("bye").await;
    // An empty close frame: tungstenite reports no close frame payload.
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 1005);
}

#[tokio::test]
async fn vanished_client_gives_backend_disconnect() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let c = gw.connect("/").await;
    drop(c); // TCP closed without a close frame.
    let r = backend.wait_event(Event::Disconnect).await;
    assert!(!r.connection_id().is_empty());
}

#[tokio::test]
async fn backend_disconnect_drops_the_client_without_close_frame() {
    let backend = Backend::start(|r| {
        if r.events().contains(&text("kill")) {
            Reply::events(&[Event::Disconnect])
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("kill").await;
    c.expect_dropped().await;
}

#[tokio::test]
async fn malformed_backend_body_closes_only_that_client_with_1011() {
    let backend = Backend::start(|r| {
        if r.events().contains(&text("poison")) {
            Reply::raw(b"TEXT 99\r\nshort\r\n")
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut victim = gw.connect("/").await;
    let mut other = gw.connect("/").await;
    victim.send_text("poison").await;
    let (code, _) = victim.expect_close().await;
    assert_eq!(code, 1011);
    other.send_text("still fine").await;
    other.expect_text("still fine").await;
    let poisoned = backend
        .requests()
        .iter()
        .find(|r| r.events().contains(&text("poison")))
        .map(|r| r.connection_id())
        .expect("poison request");
    let after: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r.connection_id() == poisoned)
        .collect();
    assert_eq!(
        after.len(),
        2,
        "nothing further is sent to the backend for a failed connection"
    );
}

#[tokio::test]
async fn backend_5xx_after_open_closes_client_with_1011() {
    let backend = Backend::start(|r| {
        if r.events().contains(&Event::Open) {
            echo_reply(r)
        } else {
            Reply::status(500, "boom")
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("x").await;
    assert_eq!(c.expect_close().await.0, 1011);
}

#[tokio::test]
async fn messages_sent_while_a_request_is_in_flight_are_batched() {
    // The first message's request is slow; the next ones queue and go in one request.
    let backend = Backend::start(|r| {
        let reply = echo_reply(r);
        if r.events().contains(&text("slow")) {
            reply.delay(Duration::from_millis(300))
        } else {
            reply
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("slow").await;
    backend.wait_event(text("slow")).await;
    for i in 0..5 {
        c.send_text(&format!("q{i}")).await;
    }
    c.expect_text("slow").await;
    for i in 0..5 {
        c.expect_text(&format!("q{i}")).await;
    }
    let batched = backend
        .requests()
        .into_iter()
        .find(|r| r.events().contains(&text("q0")))
        .expect("batch");
    assert_eq!(
        batched.events(),
        (0..5).map(|i| text(&format!("q{i}"))).collect::<Vec<_>>(),
        "all queued messages in one request"
    );
    // Never two requests of one connection at once: requests arrive strictly after responses.
}

#[tokio::test]
async fn keep_alive_requests_are_empty_and_follow_the_interval() {
    let backend = Backend::start(|r| echo_reply(r).header("keep-alive-interval", "1")).await;
    let gw = TestGateway::start(&backend.url()).await;
    let _c = gw.connect("/").await;
    let reqs = backend
        .wait_for("two keep-alive requests", |r| {
            r.iter().filter(|x| x.body.is_empty()).count() >= 2
        })
        .await;
    let ka: Vec<_> = reqs.iter().filter(|x| x.body.is_empty()).collect();
    assert_eq!(ka[0].header("content-type"), Some("application/websocket-events"));
}

#[tokio::test]
async fn empty_and_multibyte_and_large_messages_round_trip() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send_text("").await;
    c.expect_text("").await;
    let utf8 = "héllo wörld ✓ 日本語 🎉";
    c.send_text(utf8).await;
    c.expect_text(utf8).await;
    // Up to what an echo fits in the default 1,000,000-byte backend response limit.
    for size in [16 * 1024, 16 * 1024 + 1, 200_000, 999_000] {
        let big = "a".repeat(size);
        c.send_text(&big).await;
        c.expect_text(&big).await;
    }
    let empty = backend.wait_event(Event::Text(Bytes::new())).await;
    assert!(
        empty.body.starts_with(b"TEXT\r\n"),
        "an empty message is written TEXT\\r\\n"
    );
}

#[tokio::test]
async fn fragmented_client_messages_are_reassembled() {
    use tokio::io::AsyncWriteExt;
    use wsgate::protocol::frame::{Message, encode_masked};
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let (status, _, _) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 101);
    // Raw socket: send a text message in three fragments with a ping in between.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.expect("read");
    assert!(
        std::str::from_utf8(&buf[..n])
            .expect("utf8")
            .starts_with("HTTP/1.1 101")
    );
    let mask = [1, 2, 3, 4];
    let frag = |fin: bool, opcode: u8, payload: &[u8]| {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    s.write_all(&frag(false, 1, b"hel")).await.expect("write");
    let mut ping = bytes::BytesMut::new();
    encode_masked(&Message::Ping(Bytes::from_static(b"p")), mask, &mut ping);
    s.write_all(&ping).await.expect("write");
    s.write_all(&frag(false, 0, b"lo ")).await.expect("write");
    s.write_all(&frag(true, 0, b"world")).await.expect("write");
    backend.wait_event(text("hello world")).await;
}

#[tokio::test]
async fn message_over_the_limit_closes_with_1009_and_backend_gets_close() {
    let backend = Backend::echo().await;
    let yaml = format!(
        "routes:\n  - name: small\n    backend:\n      url: {}\n    limits:\n      maxMessageBytes: 1000\n",
        backend.url()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let mut c = gw.connect("/").await;
    c.send_text(&"a".repeat(1000)).await;
    c.expect_text(&"a".repeat(1000)).await;
    c.send_text(&"a".repeat(1001)).await;
    assert_eq!(c.expect_close().await.0, 1009);
    let r = backend
        .wait_for("CLOSE 1009", |r| {
            r.iter().any(|x| {
                x.events()
                    .iter()
                    .any(|e| matches!(e, Event::Close(Some(f)) if f.code == 1009))
            })
        })
        .await;
    assert!(!r.is_empty());
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.expect("read");
    assert!(n > 0);
    // Masked text frame with bytes 0xff 0xfe (never valid UTF-8).
    let mask = [9u8, 9, 9, 9];
    let mut f = vec![0x81u8, 0x82];
    f.extend_from_slice(&mask);
    f.extend([0xffu8 ^ 9, 0xfe ^ 9]);
    s.write_all(&f).await.expect("write");
    let n = tokio::time::timeout(DEADLINE, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
        .await
        .expect("timeout")
        .expect("read");
    assert!(n >= 4, "close frame expected");
    assert_eq!(buf[0], 0x88, "close opcode");
    assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 1007);
}

/// Protocol violations (RFC 6455 section 5): each closes that client with 1002 and the backend
/// hears `CLOSE 1002`; the gateway goes on serving others.
#[tokio::test]
async fn protocol_violations_close_with_1002() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mask = [9u8, 9, 9, 9];
    let masked = |first: u8, payload: &[u8]| {
        let mut f = vec![first, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().map(|b| b ^ 9));
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i']),
        ("reserved bit set", masked(0x81 | 0x40, b"hi")),
        ("unknown opcode", masked(0x83, b"hi")),
        ("fragmented ping", masked(0x09, b"x")),
        ("continuation without a start", masked(0x80, b"hi")),
        ("close with a reserved code", masked(0x88, &[0x03, 0xec])),
    ];
    for (what, frame) in cases {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            gw.addr
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 101"), "{what}: handshake");
        s.write_all(&frame).await.expect("write");
        let n = tokio::time::timeout(DEADLINE, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
            .await
            .expect("timeout")
            .expect("read");
        assert!(n >= 4, "{what}: close frame expected");
        assert_eq!(buf[0], 0x88, "{what}: close opcode");
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 1002, "{what}");
    }
    let closes = backend
        .wait_for("six CLOSE 1002 events", |rs| {
            rs.iter()
                .flat_map(|r| r.events())
                .filter(|e| matches!(e, Event::Close(Some(f)) if f.code == 1002))
                .count()
                == 6
        })
        .await;
    assert!(!closes.is_empty());
    // Others are unaffected.
    let mut c = gw.connect("/").await;
    c.send_text("still fine").await;
    c.expect_text("still fine").await;
}

#[tokio::test]
async fn client_pings_are_answered_by_the_gateway() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/").await;
    c.send(WsMessage::Ping(Bytes::from_static(b"are you there"))).await;
    match c.next().await {
        WsMessage::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected pong, got {other:?}"),
    }
    assert!(
        backend
            .requests()
            .iter()
            .all(|r| !r.events().iter().any(|e| matches!(e, Event::Ping(_)))),
        "pings are not relayed by default"
    );
}

#[tokio::test]
async fn plain_http_passes_through_to_the_backend() {
    let backend = Backend::start(|r| Reply {
        status: http::StatusCode::CREATED,
        headers: vec![
            ("x-backend".into(), "yes".into()),
            ("content-type".into(), "text/plain".into()),
        ],
        body: Bytes::from(format!("{} {} {}", r.method, r.uri, String::from_utf8_lossy(&r.body))),
        delay: None,
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;
    let (status, headers, body) = http_request(
        gw.addr,
        "PUT",
        "/api/items?x=1",
        &[("content-type", "text/plain"), ("meta-x", "kept")],
        b"payload",
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(headers.get("x-backend").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    assert_eq!(&body[..], b"PUT /api/items?x=1 payload");
    let r = &backend.requests()[0];
    assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(r.header("connection-id").is_none());
}

#[tokio::test]
async fn two_hundred_clients_twenty_messages_each() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = gw.ws_url("/load");
        tasks.push(tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
            let mut c = Client { ws };
            for j in 0..20 {
                let m = format!("c{i}-m{j}");
                c.send_text(&m).await;
                c.expect_text(&m).await;
            }
            c.ws.close(None).await.expect("close");
            c.expect_close().await;
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let msgs = backend
        .requests()
        .iter()
        .map(|r| r.events().iter().filter(|e| matches!(e, Event::Text(_))).count())
        .sum::<usize>();
    assert_eq!(msgs, 200 * 20);
}

#[tokio::test]
async fn connection_limit_gives_503() {
    let backend = Backend::echo().await;
    let route = wsgate::config::Route::catch_all(&backend.url()).expect("route");
    let gw = TestGateway::with_routes(
        vec![route],
        wsgate::server::GatewaySettings {
            max_connections: 2,
            ..Default::default()
        },
    )
    .await;
    let _a = gw.connect("/").await;
    let _b = gw.connect("/").await;
    let (status, _, _) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn drain_closes_clients_with_1001_and_backend_gets_close() {
    let backend = Backend::echo().await;
    let route = wsgate::config::Route::catch_all(&backend.url()).expect("route");
    let gw = TestGateway::with_routes(
        vec![route],
        wsgate::server::GatewaySettings {
            drain_period: Duration::from_millis(100),
            close_pacing: Duration::from_millis(50),
            ..Default::default()
        },
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(gw.connect("/").await);
    }
    let shutdown = gw.shutdown();
    let closes = async {
        let mut codes = Vec::new();
        for c in clients.iter_mut() {
            codes.push(c.expect_close().await.0);
        }
        codes
    };
    let ((), codes) = tokio::join!(shutdown, closes);
    assert!(codes.iter().all(|c| *c == 1001), "{codes:?}");
    let reqs = backend
        .wait_for("ten CLOSE 1001", |r| {
            r.iter()
                .filter(|x| {
                    x.events()
                        .iter()
                        .any(|e| matches!(e, Event::Close(Some(f)) if f.code == 1001))
                })
                .count()
                == 10
        })
        .await;
    assert!(!reqs.is_empty());
}

#[tokio::test]
async fn slow_handshake_is_cut_off_by_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let route = wsgate::config::Route::catch_all(&backend.url()).expect("route");
    let gw = TestGateway::with_routes(
        vec![route],
        wsgate::server::GatewaySettings {
            handshake_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    // Slowloris: a partial request line and headers, never finished.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("the gateway must end the slow handshake")
        .unwrap_or(0);
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(backend.requests().is_empty(), "the backend never hears of it");
}

#[tokio::test]
async fn silent_client_is_pinged_then_disconnected_and_backend_gets_disconnect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let yaml = format!(
        "routes:\n  - name: app\n    backend:\n      url: {}\n    keepAlive:\n      clientPingInterval: 1s\n      clientIdleTimeout: 2s\n",
        backend.url()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // Read everything the gateway sends until it closes the socket; never answer.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the gateway never gave up on the silent client"),
        }
    }
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("101 head") + 4;
    let frames = &got[head_end..];
    assert!(frames.starts_with(&[0x89, 0x00]), "a ping first: {frames:?}");
    backend.wait_event(Event::Disconnect).await;
}

#[tokio::test]
async fn relay_pings_option_sends_ping_events_and_relays_pong() {
    let backend = Backend::start(|r| {
        let mut out = Vec::new();
        for e in r.events() {
            match e {
                Event::Open => out.push(Event::Open),
                Event::Ping(p) => out.push(Event::Pong(p)),
                _ => {}
            }
        }
        Reply::events(&out)
    })
    .await;
    let yaml = format!(
        "routes:\n  - name: app\n    backend:\n      url: {}\n    keepAlive:\n      relayPings: true\n",
        backend.url()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let mut c = gw.connect("/").await;
    c.send(WsMessage::Ping(Bytes::from_static(b"relay me"))).await;
    match c.next().await {
        WsMessage::Pong(p) => assert_eq!(&p[..], b"relay me"),
        other => panic!("expected pong, got {other:?}"),
    }
    backend.wait_event(Event::Ping(Bytes::from_static(b"relay me"))).await;
}

#[tokio::test]
async fn an_edited_route_applies_to_open_connections() {
    let backend = Backend::echo().await;
    let yaml = |v: &str| {
        format!(
            "routes:\n  - name: app\n    backend:\n      url: {}\n    headers:\n      add: [{{name: X-Version, value: \"{v}\"}}]\n",
            backend.url()
        )
    };
    let gw = TestGateway::from_yaml(&yaml("1")).await;
    let mut c = gw.connect("/").await;
    c.send_text("a").await;
    c.expect_text("a").await;
    assert_eq!(backend.wait_event(text("a")).await.header("x-version"), Some("1"));
    let routes = wsgate::config::parse_routes_yaml(&yaml("2")).expect("yaml");
    gw.table.store(std::sync::Arc::new(
        wsgate::config::RouteTable::new(routes, 2).expect("table"),
    ));
    c.send_text("b").await;
    c.expect_text("b").await;
    assert_eq!(backend.wait_event(text("b")).await.header("x-version"), Some("2"));
}

/// The limits on a backend's response head (`--backend-max-response-headers`,
/// `--backend-max-response-head-bytes`): a handshake whose OPEN response exceeds them gets 502.
#[tokio::test]
async fn backend_response_heads_over_the_limits_fail_the_request() {
    let backend = Backend::start(|r| {
        let mut reply = echo_reply(r);
        if r.uri.path() == "/many" {
            for i in 0..10 {
                reply = reply.header(&format!("x-extra-{i}"), "v");
            }
        } else if r.uri.path() == "/big" {
            reply = reply.header("x-big", &"a".repeat(3000));
        }
        reply
    })
    .await;
    let route = wsgate::config::Route::catch_all(&backend.url()).expect("route");
    let gw = TestGateway::with_routes(
        vec![route],
        wsgate::server::GatewaySettings {
            backend_response_head: wsgate::transport::h1::HeadLimits {
                max_bytes: 2048,
                max_headers: 8,
            },
            ..Default::default()
        },
    )
    .await;
    for path in ["/many", "/big"] {
        let (status, _, _) = http_request(gw.addr, "GET", path, &upgrade_headers(), b"").await;
        assert_eq!(status, 502, "{path}");
    }
    // Within the limits the same backend is fine.
    let mut c = gw.connect("/ok").await;
    c.send_text("fits").await;
    c.expect_text("fits").await;
}
