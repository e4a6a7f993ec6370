//! Micro-benchmark of one data-plane step of the sans-IO session, without sockets:
//! a client message in → `SendBackend` out → the backend's response in → `SendClient` out.
//! `pipeline` adds the codecs around it (client frame decode, server frame encode), i.e. the
//! per-message work of the gateway minus I/O, HTTP and scheduling.
//!
//! Run with `cargo bench --bench session`; results are in `target/criterion/`.

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, StatusCode};
use wsgate::protocol::frame::{self, FrameDecoder, Message};
use wsgate::session::{Action, BackendResponse, ClientInput, Session, SessionConfig};

fn events_response(body: Bytes) -> BackendResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/websocket-events"),
    );
    BackendResponse {
        status: StatusCode::OK,
        headers,
        body,
    }
}

/// A session past the OPEN exchange.
fn open_session(now: Instant) -> Session {
    let cfg = SessionConfig {
        client_ping_interval: None,
        client_idle_timeout: None,
        ..SessionConfig::default()
    };
    let mut s = Session::new(cfg, now, 7);
    while s.poll_action().is_some() {}
    s.handle_backend(Ok(events_response(Bytes::from_static(b"OPEN\r\n"))), now);
    while s.poll_action().is_some() {}
    assert!(s.is_open(), "the OPEN exchange must open the session");
    s
}

/// Drains the actions; returns the request body (if any) and the number of client sends.
fn drain(s: &mut Session) -> (Option<Bytes>, usize) {
    let mut body = None;
    let mut sends = 0;
    while let Some(a) = s.poll_action() {
        match a {
            Action::SendBackend(r) => body = Some(r.body),
            Action::SendClient(m) => {
                sends += 1;
                black_box(m);
            }
            other => {
                black_box(other);
            }
        }
    }
    (body, sends)
}

fn session_step(c: &mut Criterion) {
    let now = Instant::now();
    let msg = Message::Text(Bytes::from(vec![b'x'; 64]));
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));

    let mut s = open_session(now);
    g.bench_function("step/64B", |b| {
        b.iter(|| {
            s.handle_client(ClientInput::Message(black_box(msg.clone())), now);
            let (req, _) = drain(&mut s);
            // The backend echoes the request body: exactly the request's events.
            let body = req.unwrap_or_default();
            s.handle_backend(Ok(events_response(body)), now);
            let (_, sends) = drain(&mut s);
            assert_eq!(sends, 1);
        })
    });

    let mut s = open_session(now);
    let mut wire = BytesMut::new();
    frame::encode_masked(&msg, [1, 2, 3, 4], &mut wire);
    let wire = wire.freeze();
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut out = BytesMut::with_capacity(256);
    g.bench_function("pipeline/64B", |b| {
        b.iter(|| {
            let mut rbuf = BytesMut::from(&wire[..]);
            let Ok(Some(m)) = decoder.decode(&mut rbuf) else {
                panic!("the frame must decode");
            };
            s.handle_client(ClientInput::Message(m), now);
            let (req, _) = drain(&mut s);
            s.handle_backend(Ok(events_response(req.unwrap_or_default())), now);
            out.clear();
            while let Some(a) = s.poll_action() {
                if let Action::SendClient(m) = a {
                    frame::encode_message(&m, &mut out);
                }
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, session_step);
criterion_main!(benches);
