//! Deterministic tests of the session state machine with a fake clock.

use super::*;

fn t0() -> Instant {
    // One base instant; tests only add durations to it.
    Instant::now()
}

fn cfg() -> SessionConfig {
    SessionConfig {
        client_ping_interval: None,
        client_idle_timeout: None,
        ..SessionConfig::default()
    }
}

fn ok(body: &[u8], headers: &[(&str, &str)]) -> Result<BackendResponse, BackendError> {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/websocket-events"),
    );
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
            HeaderValue::from_str(v).expect("test header value"),
        );
    }
    Ok(BackendResponse {
        status: StatusCode::OK,
        headers: h,
        body: Bytes::copy_from_slice(body),
    })
}

fn actions(s: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn request(a: &[Action]) -> Option<BackendRequest> {
    a.iter().find_map(|a| match a {
        Action::SendBackend(r) => Some(r.clone()),
        _ => None,
    })
}

fn sent(a: &[Action]) -> Vec<Message> {
    a.iter()
        .filter_map(|a| match a {
            Action::SendClient(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn text(s: &str) -> Message {
    Message::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn close(code: u16, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// A session past its handshake, with the OPEN exchange done.
fn open(cfg: SessionConfig, now: Instant) -> Session {
    let mut s = Session::new(cfg, now, 7);
    let a = actions(&mut s);
    assert_eq!(request(&a).expect("OPEN request").body, Bytes::from_static(b"OPEN\r\n"));
    s.handle_backend(ok(b"OPEN\r\n", &[]), now);
    let a = actions(&mut s);
    assert!(matches!(a.first(), Some(Action::Accept { .. })), "{a:?}");
    s
}

#[test]
fn open_is_the_first_request_and_accept_carries_backend_headers() {
    let now = t0();
    let mut s = Session::new(cfg(), now, 1);
    let a = actions(&mut s);
    assert_eq!(a.len(), 1);
    let r = request(&a).expect("request");
    assert_eq!(&r.body[..], b"OPEN\r\n");
    assert_eq!(r.events, 1);
    s.handle_backend(
        ok(
            b"OPEN\r\nTEXT 5\r\nhello\r\n",
            &[
                ("Sec-WebSocket-Protocol", "chat"),
                ("Set-Meta-User", "alice"),
                ("Keep-Alive-Interval", "30"),
                ("X-Custom", "1"),
            ],
        ),
        now,
    );
    let a = actions(&mut s);
    let Action::Accept { headers } = &a[0] else {
        panic!("expected Accept first: {a:?}")
    };
    assert_eq!(
        headers.get("sec-websocket-protocol").map(|v| v.as_bytes()),
        Some(&b"chat"[..])
    );
    assert_eq!(headers.get("x-custom").map(|v| v.as_bytes()), Some(&b"1"[..]));
    for gone in ["content-type", "set-meta-user", "keep-alive-interval", "content-length"] {
        assert!(headers.get(gone).is_none(), "{gone} must not reach the 101");
    }
    assert_eq!(sent(&a), vec![text("hello")]);
    assert!(s.is_open());
    assert_eq!(
        s.meta().collect::<Vec<_>>(),
        vec![("user", &HeaderValue::from_static("alice"))]
    );
}

#[test]
fn rejected_open_passes_status_headers_and_body() {
    let now = t0();
    let mut s = Session::new(cfg(), now, 1);
    actions(&mut s);
    let mut h = HeaderMap::new();
    h.insert("x-reason", HeaderValue::from_static("nope"));
    h.insert("content-type", HeaderValue::from_static("text/plain"));
    s.handle_backend(
        Ok(BackendResponse {
            status: StatusCode::FORBIDDEN,
            headers: h,
            body: Bytes::from_static(b"go away"),
        }),
        now,
    );
    let a = actions(&mut s);
    match &a[0] {
        Action::Reject { status, headers, body } => {
            assert_eq!(*status, StatusCode::FORBIDDEN);
            assert_eq!(headers.get("x-reason").map(|v| v.as_bytes()), Some(&b"nope"[..]));
            assert_eq!(&body[..], b"go away");
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    assert_eq!(a.last(), Some(&Action::Done));
    assert!(s.is_finished());
}

#[test]
fn open_without_open_event_or_malformed_is_502() {
    for body in [&b"TEXT 2\r\nhi\r\n"[..], b"", b"OPEN\r\nTEXT zz\r\n"] {
        let now = t0();
        let mut s = Session::new(cfg(), now, 1);
        actions(&mut s);
        s.handle_backend(ok(body, &[]), now);
        let a = actions(&mut s);
        assert!(
            matches!(&a[0], Action::Reject { status, .. } if *status == StatusCode::BAD_GATEWAY),
            "body {body:?}: {a:?}"
        );
    }
}

#[test]
fn unreachable_backend_on_open_is_502_without_retry() {
    let now = t0();
    let mut s = Session::new(cfg(), now, 1);
    actions(&mut s);
    s.handle_backend(Err(BackendError::Connect("refused".into())), now);
    let a = actions(&mut s);
    assert!(matches!(&a[0], Action::Reject { status, .. } if *status == StatusCode::BAD_GATEWAY));
}

#[test]
fn empty_open_response_with_keep_alive_retries_open_after_interval() {
    let now = t0();
    let mut s = Session::new(cfg(), now, 1);
    actions(&mut s);
    s.handle_backend(ok(b"", &[("Keep-Alive-Interval", "3")]), now);
    assert!(actions(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(3)));
    s.handle_timeout(now + Duration::from_secs(3));
    let a = actions(&mut s);
    assert_eq!(&request(&a).expect("OPEN again").body[..], b"OPEN\r\n");
}

#[test]
fn one_request_in_flight_and_batching() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("a")), now);
    let r1 = request(&actions(&mut s)).expect("first request");
    assert_eq!(&r1.body[..], b"TEXT 1\r\na\r\n");
    // While it is in flight, more messages queue up.
    s.handle_client(ClientInput::Message(text("b")), now);
    s.handle_client(
        ClientInput::Message(Message::Binary(Bytes::from_static(b"\x00\x01"))),
        now,
    );
    assert!(request(&actions(&mut s)).is_none(), "only one request in flight");
    s.handle_backend(ok(b"", &[]), now);
    let r2 = request(&actions(&mut s)).expect("batched request");
    assert_eq!(&r2.body[..], b"TEXT 1\r\nb\r\nBINARY 2\r\n\x00\x01\r\n");
    assert_eq!(r2.events, 2);
}

#[test]
fn batch_is_capped_by_bytes_but_a_large_message_goes_alone() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            max_batch_bytes: 10,
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(text("first")), now);
    actions(&mut s);
    s.handle_client(ClientInput::Message(text("123456")), now);
    s.handle_client(ClientInput::Message(text("789012")), now);
    s.handle_backend(ok(b"", &[]), now);
    let r = request(&actions(&mut s)).expect("request");
    assert_eq!(
        &r.body[..],
        b"TEXT 6\r\n123456\r\n",
        "second message exceeds the 10-byte batch"
    );
    s.handle_backend(ok(b"", &[]), now);
    let r = request(&actions(&mut s)).expect("request");
    assert_eq!(&r.body[..], b"TEXT 6\r\n789012\r\n");
    s.handle_backend(ok(b"", &[]), now);
    s.handle_client(ClientInput::Message(text("a message longer than ten")), now);
    let r = request(&actions(&mut s)).expect("oversized message still sent");
    assert_eq!(r.events, 1);
}

#[test]
fn backpressure_stops_reading_when_queue_is_full() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            max_batch_bytes: 8,
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(text("x")), now);
    actions(&mut s);
    assert!(s.wants_client_input());
    s.handle_client(ClientInput::Message(text("123456789")), now);
    assert!(!s.wants_client_input(), "queue over the batch limit must pause reading");
    s.handle_backend(ok(b"", &[]), now);
    actions(&mut s);
    assert!(s.wants_client_input());
}

#[test]
fn keep_alive_requests_follow_interval_with_floor() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            keep_alive_floor: Duration::from_secs(5),
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(text("a")), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[("Keep-Alive-Interval", "2")]), now);
    assert!(actions(&mut s).is_empty());
    // 2 s is raised to the 5 s floor.
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(5)));
    s.handle_timeout(now + Duration::from_secs(5));
    let r = request(&actions(&mut s)).expect("keep-alive");
    assert!(r.body.is_empty(), "a keep-alive is an empty request");
    assert_eq!(s.stats().keep_alives, 1);
    // Keep-Alive-Interval: 0 turns it off.
    s.handle_backend(ok(b"", &[("Keep-Alive-Interval", "0")]), now + Duration::from_secs(5));
    assert!(actions(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn keep_alive_absent_header_keeps_previous_setting() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("a")), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[("Keep-Alive-Interval", "10")]), now);
    s.handle_client(ClientInput::Message(text("b")), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[]), now);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
    s.handle_client(ClientInput::Message(text("c")), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[("Keep-Alive-Interval", "junk")]), now);
    assert_eq!(s.poll_timeout(), None, "unparsable turns keep-alive off");
}

#[test]
fn set_meta_binds_replaces_and_removes() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("a")), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[("Set-Meta-User", "alice"), ("Set-Meta-Room", "r1")]), now);
    s.handle_client(ClientInput::Message(text("b")), now);
    let r = request(&actions(&mut s)).expect("request");
    let names: Vec<_> = r.meta.iter().map(|(n, v)| (n.as_str().to_owned(), v.clone())).collect();
    assert!(names.contains(&("meta-user".into(), HeaderValue::from_static("alice"))));
    assert!(names.contains(&("meta-room".into(), HeaderValue::from_static("r1"))));
    s.handle_backend(ok(b"", &[("set-meta-user", "bob"), ("Set-Meta-Room", "")]), now);
    s.handle_client(ClientInput::Message(text("c")), now);
    let r = request(&actions(&mut s)).expect("request");
    let names: Vec<_> = r.meta.iter().map(|(n, v)| (n.as_str().to_owned(), v.clone())).collect();
    assert_eq!(names, vec![("meta-user".into(), HeaderValue::from_static("bob"))]);
}

#[test]
fn set_meta_respects_allow_list() {
    let now = t0();
    let allowed: std::collections::HashSet<String> = ["user".to_owned()].into();
    let mut s = open(
        SessionConfig {
            meta_allowed: Some(Arc::new(allowed)),
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(text("a")), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[("Set-Meta-User", "alice"), ("Set-Meta-Admin", "yes")]), now);
    assert_eq!(s.meta().map(|(k, _)| k.to_owned()).collect::<Vec<_>>(), vec!["user"]);
}

#[test]
fn partial_accept_replays_the_rest_with_header() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("[foo]")), now);
    actions(&mut s);
    s.handle_client(ClientInput::Message(text("[hello")), now);
    s.handle_backend(ok(b"", &[]), now);
    let r = request(&actions(&mut s)).expect("request");
    assert_eq!(&r.body[..], b"TEXT 6\r\n[hello\r\n");
    // The backend takes only 2 bytes of it.
    s.handle_client(ClientInput::Message(text(" world]")), now);
    s.handle_backend(ok(b"", &[("Content-Bytes-Accepted", "2")]), now);
    let r = request(&actions(&mut s)).expect("replay request");
    assert_eq!(&r.body[..], b"TEXT 4\r\nello\r\nTEXT 7\r\n world]\r\n");
    assert_eq!(r.replayed, 4);
}

#[test]
fn client_close_goes_to_backend_and_backend_answer_reaches_client() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(Message::Close(close(4001, "bye"))), now);
    let a = actions(&mut s);
    assert!(a.contains(&Action::StopReading));
    let r = request(&a).expect("close request");
    assert_eq!(&r.body[..], b"CLOSE 5\r\n\x0f\xa1bye\r\n");
    s.handle_backend(ok(b"CLOSE 7\r\n\x0f\xa2later\r\n", &[]), now);
    let a = actions(&mut s);
    assert_eq!(sent(&a), vec![Message::Close(close(4002, "later"))]);
    assert!(a.contains(&Action::CloseClient));
    assert_eq!(a.last(), Some(&Action::Done));
}

#[test]
fn client_close_without_backend_answer_echoes_client_code() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(Message::Close(close(1000, ""))), now);
    actions(&mut s);
    s.handle_backend(ok(b"", &[]), now);
    let a = actions(&mut s);
    assert_eq!(sent(&a), vec![Message::Close(close(1000, ""))]);
    assert_eq!(a.last(), Some(&Action::Done));
}

#[test]
fn backend_close_reaches_client_and_client_answer_is_relayed() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("x")), now);
    actions(&mut s);
    s.handle_backend(ok(b"CLOSE\r\n", &[]), now);
    let a = actions(&mut s);
    assert_eq!(sent(&a), vec![Message::Close(None)]);
    // Data after the close is ignored; the client's answering close goes to the backend.
    s.handle_client(ClientInput::Message(text("late")), now);
    assert!(request(&actions(&mut s)).is_none());
    s.handle_client(ClientInput::Message(Message::Close(close(1000, ""))), now);
    let a = actions(&mut s);
    assert!(a.contains(&Action::CloseClient));
    let r = request(&a).expect("relayed close");
    assert_eq!(&r.body[..], b"CLOSE 2\r\n\x03\xe8\r\n");
    s.handle_backend(ok(b"", &[]), now);
    assert_eq!(actions(&mut s).last(), Some(&Action::Done));
}

#[test]
fn client_gone_sends_queued_events_then_disconnect() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("a")), now);
    actions(&mut s);
    s.handle_client(ClientInput::Message(text("b")), now);
    s.handle_client(ClientInput::Gone, now);
    s.handle_backend(ok(b"TEXT 3\r\nfoo\r\n", &[]), now);
    let a = actions(&mut s);
    let r = request(&a).expect("disconnect request");
    assert_eq!(&r.body[..], b"TEXT 1\r\nb\r\nDISCONNECT\r\n");
    s.handle_backend(ok(b"", &[]), now);
    assert_eq!(actions(&mut s).last(), Some(&Action::Done));
}

#[test]
fn client_gone_during_open_sends_disconnect_after_open() {
    let now = t0();
    let mut s = Session::new(cfg(), now, 1);
    actions(&mut s);
    s.handle_client(ClientInput::Gone, now);
    s.handle_backend(ok(b"OPEN\r\n", &[]), now);
    let a = actions(&mut s);
    assert_eq!(&request(&a).expect("disconnect").body[..], b"DISCONNECT\r\n");
}

#[test]
fn backend_disconnect_drops_client_without_close_frame() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("a")), now);
    actions(&mut s);
    s.handle_backend(ok(b"TEXT 1\r\nz\r\nDISCONNECT\r\nTEXT 1\r\nq\r\n", &[]), now);
    let a = actions(&mut s);
    assert_eq!(
        sent(&a),
        vec![text("z")],
        "events after DISCONNECT are ignored, no close frame"
    );
    assert!(a.contains(&Action::CloseClient));
    assert_eq!(a.last(), Some(&Action::Done));
}

#[test]
fn backend_failure_after_open_closes_client_1011_and_stops() {
    for resp in [
        Err(BackendError::Timeout),
        Err(BackendError::TooLarge { limit: 10 }),
        ok(b"GARBAGE", &[]),
        Ok(BackendResponse {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }),
    ] {
        let now = t0();
        let mut s = open(cfg(), now);
        s.handle_client(ClientInput::Message(text("a")), now);
        actions(&mut s);
        s.handle_backend(resp.clone(), now);
        let a = actions(&mut s);
        let closes: Vec<_> = sent(&a);
        assert!(
            matches!(&closes[..], [Message::Close(Some(f))] if f.code == 1011),
            "{resp:?} → {a:?}"
        );
        assert!(request(&a).is_none(), "nothing further goes to the backend");
        assert_eq!(a.last(), Some(&Action::Done));
    }
}

#[test]
fn connect_failures_are_retried_with_backoff_then_1011() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            retry_attempts: 2,
            retry_initial_backoff: Duration::from_millis(100),
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(text("a")), now);
    let first = request(&actions(&mut s)).expect("request");
    let mut t = now;
    for attempt in 1..=2u32 {
        s.handle_backend(Err(BackendError::Connect("refused".into())), t);
        assert!(actions(&mut s).is_empty());
        let at = s.poll_timeout().expect("retry timer");
        let delay = at - t;
        let base = Duration::from_millis(100 * (1 << (attempt - 1)));
        assert!(
            delay >= base && delay < base + Duration::from_secs(1),
            "attempt {attempt}: {delay:?}"
        );
        t = at;
        s.handle_timeout(t);
        let r = request(&actions(&mut s)).expect("retried request");
        assert_eq!(r.body, first.body);
        assert_eq!(r.attempt, attempt);
    }
    s.handle_backend(Err(BackendError::Connect("refused".into())), t);
    let a = actions(&mut s);
    assert!(matches!(&sent(&a)[..], [Message::Close(Some(f))] if f.code == 1011));
    assert_eq!(s.stats().retries, 2);
}

#[test]
fn pings_are_answered_locally_by_default_and_relayed_on_request() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(Message::Ping(Bytes::from_static(b"p"))), now);
    let a = actions(&mut s);
    assert_eq!(sent(&a), vec![Message::Pong(Bytes::from_static(b"p"))]);
    assert!(request(&a).is_none());

    let mut s = open(
        SessionConfig {
            relay_pings: true,
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(Message::Ping(Bytes::from_static(b"p"))), now);
    let a = actions(&mut s);
    assert!(sent(&a).is_empty());
    assert_eq!(&request(&a).expect("ping relayed").body[..], b"PING 1\r\np\r\n");
    s.handle_backend(ok(b"PONG 1\r\np\r\n", &[]), now);
    assert_eq!(sent(&actions(&mut s)), vec![Message::Pong(Bytes::from_static(b"p"))]);
}

#[test]
fn idle_client_is_pinged_then_declared_dead() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            client_ping_interval: Some(Duration::from_secs(10)),
            client_idle_timeout: Some(Duration::from_secs(25)),
            ..cfg()
        },
        now,
    );
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
    s.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(sent(&actions(&mut s)), vec![Message::Ping(Bytes::new())]);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(25)));
    s.handle_timeout(now + Duration::from_secs(25));
    let a = actions(&mut s);
    assert!(a.contains(&Action::CloseClient));
    assert_eq!(&request(&a).expect("disconnect").body[..], b"DISCONNECT\r\n");
}

#[test]
fn client_activity_postpones_ping() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            client_ping_interval: Some(Duration::from_secs(10)),
            ..cfg()
        },
        now,
    );
    let later = now + Duration::from_secs(8);
    s.handle_client(ClientInput::Message(Message::Pong(Bytes::new())), later);
    assert_eq!(s.poll_timeout(), Some(later + Duration::from_secs(10)));
}

#[test]
fn protocol_error_closes_client_with_code_and_tells_backend() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(
        ClientInput::ProtocolError {
            code: 1009,
            reason: "message too big".into(),
        },
        now,
    );
    let a = actions(&mut s);
    assert!(matches!(&sent(&a)[..], [Message::Close(Some(f))] if f.code == 1009));
    let r = request(&a).expect("close to backend");
    let evs = events::decode_body(r.body, 1000).expect("valid body");
    assert!(matches!(&evs[..], [Event::Close(Some(f))] if f.code == 1009), "{evs:?}");
}

#[test]
fn shutdown_sends_1001_to_client_and_close_to_backend() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_shutdown(now);
    let a = actions(&mut s);
    assert!(matches!(&sent(&a)[..], [Message::Close(Some(f))] if f.code == 1001));
    let r = request(&a).expect("close to backend");
    assert!(r.body.starts_with(b"CLOSE "));
    s.handle_backend(ok(b"", &[]), now);
    s.handle_client(ClientInput::Gone, now);
    assert!(s.is_finished());
}

#[test]
fn shutdown_waits_for_the_answer_in_flight_and_sends_nothing_after_the_close() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("hi")), now);
    assert!(request(&actions(&mut s)).is_some(), "TEXT goes to the backend");
    s.handle_shutdown(now);
    let a = actions(&mut s);
    assert!(sent(&a).is_empty(), "no 1001 while the backend answers: {a:?}");
    assert!(a.contains(&Action::StopReading));
    // The answer arrives: its message reaches the client first, then the 1001.
    s.handle_backend(ok(b"TEXT 5\r\nreply\r\n", &[]), now);
    let a = actions(&mut s);
    assert!(
        matches!(&sent(&a)[..], [Message::Text(t), Message::Close(Some(f))] if &t[..] == b"reply" && f.code == 1001),
        "{a:?}"
    );
    assert!(request(&a).expect("close to backend").body.starts_with(b"CLOSE "));
    // The backend's answer to CLOSE (data and its own close) may not follow the 1001.
    s.handle_backend(ok(b"TEXT 4\r\nlate\r\nCLOSE 2\r\n\x03\xe9\r\n", &[]), now);
    let a = actions(&mut s);
    assert!(sent(&a).is_empty(), "nothing after a close frame: {a:?}");
    assert_eq!(s.stats().dropped_after_close, 2);
}

#[test]
fn shutdown_does_not_wait_longer_than_the_close_timeout() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("hi")), now);
    actions(&mut s);
    s.handle_shutdown(now);
    actions(&mut s);
    let deadline = s.poll_timeout().expect("a deadline for the pending shutdown");
    assert_eq!(deadline, now + cfg().close_timeout);
    s.handle_timeout(deadline);
    let a = actions(&mut s);
    assert!(
        matches!(&sent(&a)[..], [Message::Close(Some(f))] if f.code == 1001),
        "{a:?}"
    );
}

#[test]
fn rate_limit_closes_with_1008() {
    let now = t0();
    let mut s = open(
        SessionConfig {
            messages_per_second: Some(2),
            ..cfg()
        },
        now,
    );
    s.handle_client(ClientInput::Message(text("1")), now);
    s.handle_client(ClientInput::Message(text("2")), now);
    actions(&mut s);
    s.handle_client(ClientInput::Message(text("3")), now);
    let a = actions(&mut s);
    assert!(
        matches!(&sent(&a)[..], [Message::Close(Some(f))] if f.code == 1008),
        "{a:?}"
    );
    // A second later there are tokens again, but the connection is closing.
    assert!(!s.wants_client_input());
}

#[test]
fn publish_close_reaches_client_and_answer_goes_to_backend() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_publish(Message::Close(close(4000, "kicked")), now);
    let a = actions(&mut s);
    assert_eq!(sent(&a), vec![Message::Close(close(4000, "kicked"))]);
    s.handle_client(ClientInput::Message(Message::Close(close(4000, "kicked"))), now);
    let a = actions(&mut s);
    assert!(request(&a).expect("relayed").body.starts_with(b"CLOSE "));
}

#[test]
fn refresh_sends_a_request_now() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_refresh(now);
    let r = request(&actions(&mut s)).expect("refresh request");
    assert!(r.body.is_empty());
}

// ---- GRIP ---------------------------------------------------------------------------------

fn open_grip(cfg: SessionConfig, now: Instant) -> Session {
    let mut s = Session::new(cfg, now, 7);
    let r = request(&actions(&mut s)).expect("OPEN");
    assert!(r.grip, "OPEN offers GRIP when the route enables it");
    s.handle_backend(ok(b"OPEN\r\n", &[("Sec-WebSocket-Extensions", "grip")]), now);
    let a = actions(&mut s);
    let Action::Accept { headers } = &a[0] else {
        panic!("{a:?}")
    };
    assert!(
        headers.get("sec-websocket-extensions").is_none(),
        "grip extension is consumed"
    );
    assert!(s.grip().is_some());
    s
}

fn backend_says(s: &mut Session, body: &str, now: Instant) -> Vec<Action> {
    s.handle_client(ClientInput::Message(text("x")), now);
    actions(s);
    let mut enc = BytesMut::new();
    Event::Text(Bytes::copy_from_slice(body.as_bytes())).encode_into(&mut enc);
    s.handle_backend(ok(&enc, &[]), now);
    actions(s)
}

#[test]
fn grip_prefix_is_stripped_and_unprefixed_dropped() {
    let now = t0();
    let mut s = open_grip(cfg(), now);
    let a = backend_says(&mut s, "m:hello", now);
    assert_eq!(sent(&a), vec![text("hello")]);
    let a = backend_says(&mut s, "hello", now);
    assert!(sent(&a).is_empty());
    assert_eq!(s.stats().unprefixed_dropped, 1);
}

#[test]
fn grip_subscribe_and_unsubscribe_emit_actions_with_limit() {
    let now = t0();
    let mut s = open_grip(
        SessionConfig {
            max_subscriptions: 1,
            ..cfg()
        },
        now,
    );
    let a = backend_says(&mut s, r#"c:{"type":"subscribe","channel":"room"}"#, now);
    assert!(a.contains(&Action::Subscribe("room".into())));
    let a = backend_says(&mut s, r#"c:{"type":"subscribe","channel":"other"}"#, now);
    assert!(
        !a.iter().any(|x| matches!(x, Action::Subscribe(_))),
        "over the limit: ignored"
    );
    let a = backend_says(&mut s, r#"c:{"type":"unsubscribe","channel":"room"}"#, now);
    assert!(a.contains(&Action::Unsubscribe("room".into())));
}

#[test]
fn grip_detach_stops_relaying_client_messages() {
    let now = t0();
    let mut s = open_grip(cfg(), now);
    backend_says(&mut s, r#"c:{"type":"detach"}"#, now);
    s.handle_client(ClientInput::Message(text("ignored")), now);
    assert!(request(&actions(&mut s)).is_none());
}

#[test]
fn grip_keep_alive_is_sent_by_the_gateway() {
    let now = t0();
    let mut s = open_grip(cfg(), now);
    backend_says(&mut s, r#"c:{"type":"keep-alive","content":"ka","timeout":10}"#, now);
    let due = s.poll_timeout().expect("keep-alive timer");
    assert_eq!(due, now + Duration::from_secs(10));
    s.handle_timeout(due);
    assert_eq!(sent(&actions(&mut s)), vec![text("ka")]);
}

#[test]
fn grip_send_delayed_fires_after_timeout_and_flush_sends_now() {
    let now = t0();
    let mut s = open_grip(cfg(), now);
    backend_says(
        &mut s,
        r#"c:{"type":"send-delayed","content":"later","timeout":3}"#,
        now,
    );
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(3)));
    s.handle_timeout(now + Duration::from_secs(3));
    assert_eq!(sent(&actions(&mut s)), vec![text("later")]);

    backend_says(&mut s, r#"c:{"type":"send-delayed","content":"one","timeout":10}"#, now);
    // A new send-delayed flushes the pending one first.
    let a = backend_says(&mut s, r#"c:{"type":"send-delayed","content":"two","timeout":10}"#, now);
    assert_eq!(sent(&a), vec![text("one")]);
    let a = backend_says(&mut s, r#"c:{"type":"flush-delayed"}"#, now);
    assert_eq!(sent(&a), vec![text("two")]);
    assert_eq!(s.poll_timeout(), None, "nothing left pending");
}

#[test]
fn grip_set_meta_and_session_are_recorded() {
    let now = t0();
    let mut s = open_grip(cfg(), now);
    backend_says(&mut s, r#"c:{"type":"set-meta","name":"user","value":"alice"}"#, now);
    backend_says(&mut s, r#"c:{"type":"session","id":"s-1"}"#, now);
    let g = s.grip().expect("grip");
    assert_eq!(g.meta.get("user").map(String::as_str), Some("alice"));
    assert_eq!(g.session_id.as_deref(), Some("s-1"));
    backend_says(&mut s, r#"c:{"type":"set-meta","name":"user"}"#, now);
    assert!(s.grip().expect("grip").meta.is_empty(), "no value deletes");
}

#[test]
fn grip_malformed_control_is_ignored_and_counted() {
    let now = t0();
    let mut s = open_grip(cfg(), now);
    let a = backend_says(&mut s, r#"c:{"type":"no-such-thing"}"#, now);
    assert!(sent(&a).is_empty());
    backend_says(&mut s, "c:{not json", now);
    assert_eq!(s.stats().control_errors, 2);
    assert!(s.is_open(), "the connection carries on");
}

#[test]
fn grip_off_for_route_means_messages_pass_unchanged() {
    let now = t0();
    let mut s = Session::new(
        SessionConfig {
            grip_enabled: false,
            ..cfg()
        },
        now,
        1,
    );
    let r = request(&actions(&mut s)).expect("OPEN");
    assert!(!r.grip);
    s.handle_backend(ok(b"OPEN\r\n", &[("Sec-WebSocket-Extensions", "grip")]), now);
    actions(&mut s);
    assert!(
        s.grip().is_none(),
        "a route without GRIP ignores the backend's extension"
    );
    let a = backend_says(&mut s, "c:{\"type\":\"detach\"}", now);
    assert_eq!(sent(&a), vec![text("c:{\"type\":\"detach\"}")]);
}

#[test]
fn an_idle_session_releases_its_queue_capacity() {
    let now = t0();
    let mut s = open(cfg(), now);
    s.handle_client(ClientInput::Message(text("hi")), now);
    actions(&mut s);
    s.handle_backend(ok(b"TEXT 2\r\nhi\r\n", &[]), now);
    actions(&mut s);
    assert!(
        s.actions.capacity() > 0 && s.queue.capacity() > 0,
        "the exchange used both queues"
    );
    s.release_idle_memory();
    assert_eq!((s.actions.capacity(), s.queue.capacity()), (0, 0));
    // Still works afterwards.
    s.handle_client(ClientInput::Message(text("again")), now);
    assert!(request(&actions(&mut s)).is_some());
}
