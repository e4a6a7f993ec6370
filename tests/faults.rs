//! Fault injection (issue #8, "Reliability"): a real `wsgate gateway` process (or an in-process
//! gateway where the fault is on the backend side) under drain, routes-file reloads, backend
//! resets, a client that stops reading, message floods, a NATS outage and a controller outage.
//! Everything runs on 127.0.0.1 with real sockets and real processes; conditions are awaited
//! with deadlines, never with fixed sleeps.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use support::process::GatewayProc;
use support::*;
use wsgate::protocol::events::{self, Event};
use wsgate::protocol::frame::CloseFrame;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---- a `wsgate gateway` process ---------------------------------------------------------------

/// The routes version `/readyz` reports (`ready (routes version N)...`).
fn readyz_version(body: &str) -> Option<u64> {
    let rest = body.split("routes version ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("wsgate-faults-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn ws_connect(url: &str) -> Ws {
    // Nagle off: pipelined small messages would otherwise wait for delayed ACKs (40 ms).
    let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async_with_config(url, None, true))
        .await
        .expect("connect timed out")
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

fn ws_close_frame(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(WsCloseFrame {
        code: code.into(),
        reason: reason.into(),
    }))
}

fn text_of(ev: &Event) -> Option<String> {
    match ev {
        Event::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

// ---- 1. drain ---------------------------------------------------------------------------------

/// TEXT events the drain backend answers each client message with.
const REPLIES: usize = 3;

/// What the drain backend saw and answered, per client (`/c/<index>`).
#[derive(Default)]
struct DrainBook {
    /// TEXT events returned in accepted responses, per client, with the time each response
    /// was produced.
    returned: HashMap<usize, Vec<(Instant, usize)>>,
    /// Connection-Ids seen per client.
    ids: HashMap<usize, HashSet<String>>,
    /// CLOSE codes per Connection-Id (`None`: a CLOSE without code).
    closes: HashMap<String, Vec<Option<u16>>>,
    /// Connection-Ids that got DISCONNECT.
    disconnects: HashSet<String>,
}

enum RoundEnd {
    Answered,
    Closed(u16),
    Failed(String),
}

/// One lockstep round: send `idx:n`, read the REPLIES answers in order.
async fn drain_round(ws: &mut Ws, idx: usize, n: u64, got: &mut usize) -> RoundEnd {
    let msg = format!("{idx}:{n}");
    // A send may fail once the gateway stopped reading; the close frame may still be readable.
    let send_error = ws.send(WsMessage::text(msg.clone())).await.err();
    let mut k = 0;
    while k < REPLIES {
        match tokio::time::timeout(DEADLINE, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                let want = format!("{msg}#{k}");
                if t.as_str() != want {
                    return RoundEnd::Failed(format!("out of order: want {want:?}, got {:?}", t.as_str()));
                }
                *got += 1;
                k += 1;
            }
            Ok(Some(Ok(WsMessage::Close(f)))) => return RoundEnd::Closed(f.map_or(1005, |f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                return RoundEnd::Failed(format!("read error {e} (send error: {send_error:?})"));
            }
            Ok(None) => return RoundEnd::Failed(format!("ended without a close (send error: {send_error:?})")),
            Err(_) => return RoundEnd::Failed(format!("no answer to {msg:?} within {DEADLINE:?}")),
        }
    }
    RoundEnd::Answered
}

struct DrainOutcome {
    idx: usize,
    close: Option<u16>,
    error: Option<String>,
    /// TEXT messages received before the close.
    got: usize,
    /// Rounds completed after the release (i.e. after SIGTERM).
    rounds_after_term: u64,
}

/// SIGTERM with 1,000 clients exchanging messages: every client is served during the drain
/// period, then gets 1001; the backend gets CLOSE 1001 for every connection; every TEXT the
/// backend returned in an accepted response reaches its client before the close; exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_1000_clients_zero_loss() {
    const CLIENTS: usize = 1000;
    let book = Arc::new(Mutex::new(DrainBook::default()));
    let b2 = book.clone();
    let backend = Backend::start(move |r| {
        let idx = r
            .uri
            .path()
            .strip_prefix("/c/")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let id = r.connection_id();
        let mut out = Vec::new();
        let mut texts = 0;
        let mut book = b2.lock().expect("book");
        for ev in r.events() {
            match ev {
                Event::Open => out.push(Event::Open),
                Event::Text(b) => {
                    let m = String::from_utf8_lossy(&b).into_owned();
                    for k in 0..REPLIES {
                        out.push(Event::Text(Bytes::from(format!("{m}#{k}"))));
                    }
                    texts += REPLIES;
                }
                Event::Close(f) => {
                    book.closes
                        .entry(id.clone())
                        .or_default()
                        .push(f.as_ref().map(|f| f.code));
                    out.push(Event::Close(f));
                }
                Event::Disconnect => {
                    book.disconnects.insert(id.clone());
                }
                _ => {}
            }
        }
        book.ids.entry(idx).or_default().insert(id);
        if texts > 0 {
            book.returned.entry(idx).or_default().push((Instant::now(), texts));
        }
        Reply::events(&out)
    })
    .await;
    let mut gw = GatewayProc::start(
        &[
            "--backend",
            &backend.url(),
            "--drain-period",
            "3s",
            "--close-pacing",
            "1s",
            // Connections spread over several data-plane workers (whatever the machine's CPUs).
            "--workers",
            "3",
        ],
        &[],
    )
    .await;

    // Connect everyone (64 handshakes at a time) and do one round each; then wait for the go.
    let connect_gate = Arc::new(tokio::sync::Semaphore::new(64));
    let ready = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let t_connect = Instant::now();
    for idx in 0..CLIENTS {
        let url = gw.ws_url(&format!("/c/{idx}"));
        let (gate, ready, mut go) = (connect_gate.clone(), ready.clone(), go_rx.clone());
        tasks.spawn(async move {
            let mut out = DrainOutcome {
                idx,
                close: None,
                error: None,
                got: 0,
                rounds_after_term: 0,
            };
            let permit = gate.acquire_owned().await.expect("semaphore");
            let mut ws = ws_connect(&url).await;
            match drain_round(&mut ws, idx, 0, &mut out.got).await {
                RoundEnd::Answered => {}
                RoundEnd::Closed(c) => panic!("client {idx} closed ({c}) before the drain"),
                RoundEnd::Failed(e) => panic!("client {idx} failed before the drain: {e}"),
            }
            drop(permit);
            ready.fetch_add(1, Ordering::SeqCst);
            go.wait_for(|g| *g).await.expect("go");
            let mut n = 1;
            loop {
                match drain_round(&mut ws, idx, n, &mut out.got).await {
                    RoundEnd::Answered => out.rounds_after_term += 1,
                    RoundEnd::Closed(code) => {
                        out.close = Some(code);
                        break;
                    }
                    RoundEnd::Failed(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
                n += 1;
            }
            out
        });
    }
    let r2 = ready.clone();
    eventually_long(
        "1,000 clients connected and answered",
        Duration::from_secs(30),
        move || {
            let r = r2.clone();
            async move { r.load(Ordering::SeqCst) == CLIENTS }
        },
    )
    .await;
    let connect_time = t_connect.elapsed();
    assert_eq!(
        gw.metric("wsgate_open_connections{route=\"default\"}").await,
        Some(CLIENTS as f64)
    );

    let term_at = Instant::now();
    gw.signal("TERM");
    go_tx.send(true).expect("release clients");
    let code = gw.wait_exit(Duration::from_secs(30)).await;
    let drain_time = term_at.elapsed();
    let mut outcomes = Vec::with_capacity(CLIENTS);
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r.expect("client task"));
    }
    outcomes.sort_by_key(|o| o.idx);
    eprintln!(
        "drain: {CLIENTS} clients connected in {connect_time:?}; SIGTERM to exit {drain_time:?} \
         (drain period 3s, close pacing 1s); rounds per client after SIGTERM: min {}, mean {:.1}",
        outcomes.iter().map(|o| o.rounds_after_term).min().unwrap_or(0),
        outcomes.iter().map(|o| o.rounds_after_term).sum::<u64>() as f64 / CLIENTS as f64
    );

    // Every check runs; the failures are reported together.
    let mut failures = Vec::new();
    let errors: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("client {}: {e}", o.idx)))
        .collect();
    if !errors.is_empty() {
        failures.push(format!(
            "{} clients did not get a close frame: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        ));
    }
    let not_1001: Vec<(usize, Option<u16>)> = outcomes
        .iter()
        .filter(|o| o.error.is_none() && o.close != Some(1001))
        .map(|o| (o.idx, o.close))
        .collect();
    if !not_1001.is_empty() {
        failures.push(format!("clients closed without 1001: {not_1001:?}"));
    }
    let idle: Vec<usize> = outcomes
        .iter()
        .filter(|o| o.rounds_after_term == 0)
        .map(|o| o.idx)
        .collect();
    if !idle.is_empty() {
        failures.push(format!(
            "{} clients were not served during the drain period (e.g. {:?})",
            idle.len(),
            &idle[..idle.len().min(5)]
        ));
    }
    if code != Some(0) {
        failures.push(format!("exit code {code:?} after a drain"));
    }

    let book = book.lock().expect("book");
    // Every connection's backend got CLOSE 1001 (and no DISCONNECT).
    let mut ids = HashSet::new();
    for idx in 0..CLIENTS {
        let seen = book.ids.get(&idx).map_or(0, HashSet::len);
        assert_eq!(seen, 1, "client {idx}: Connection-Ids seen by the backend");
        ids.extend(book.ids[&idx].iter().cloned());
    }
    let without_close = ids
        .iter()
        .filter(|id| !book.closes.get(*id).is_some_and(|c| c.contains(&Some(1001))))
        .count();
    if without_close > 0 {
        failures.push(format!(
            "{without_close} of {CLIENTS} connections never sent CLOSE 1001 to the backend"
        ));
    }
    if !book.disconnects.is_empty() {
        failures.push(format!(
            "{} connections sent DISCONNECT instead of CLOSE 1001",
            book.disconnects.len()
        ));
    }

    // Zero loss: every TEXT the backend returned in an accepted response reached its client
    // before the close.
    let mut lost = Vec::new();
    let mut returned_total = 0;
    let mut after_term = 0;
    for o in &outcomes {
        let returned: usize = book.returned.get(&o.idx).map_or(0, |v| v.iter().map(|(_, n)| n).sum());
        after_term += book.returned.get(&o.idx).map_or(0, |v| {
            v.iter().filter(|(t, _)| *t > term_at).map(|(_, n)| n).sum::<usize>()
        });
        returned_total += returned;
        if o.got != returned {
            lost.push((o.idx, returned, o.got));
        }
    }
    eprintln!(
        "drain: backend returned {returned_total} TEXT events ({after_term} after SIGTERM); \
         {} clients lost some",
        lost.len()
    );
    // A response in flight when the drain ends is delivered before the 1001 (the session
    // defers the close until the exchange is over, bounded by the close timeout).
    if !lost.is_empty() {
        failures.push(format!(
            "{} of {CLIENTS} clients lost TEXT events the backend returned in accepted responses \
             (client, returned, received): {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    assert!(failures.is_empty(), "drain failures:\n{}", failures.join("\n"));
}

/// The drain with one backend request in flight (a backend that takes 300 ms): the client
/// must get that response's message and then exactly one close frame, 1001, with nothing
/// after it (RFC 6455 5.5.1: no data after a close frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_a_request_in_flight_sends_its_response_before_the_1001() {
    let backend = Backend::start(|r| {
        let reply = echo_reply(r);
        if r.events().iter().any(|e| matches!(e, Event::Text(_))) {
            // A slow backend: the drain starts while this request is in flight.
            reply.delay(Duration::from_millis(300))
        } else {
            reply
        }
    })
    .await;
    let mut gw = GatewayProc::start(
        &[
            "--backend",
            &backend.url(),
            "--drain-period",
            "0s",
            "--close-pacing",
            "0s",
        ],
        &[],
    )
    .await;
    let mut client = raw_ws_client(gw.addr, "/").await;
    let mut frame = bytes::BytesMut::new();
    wsgate::protocol::frame::encode_masked(
        &wsgate::protocol::frame::Message::Text(Bytes::from_static(b"in flight")),
        [1, 2, 3, 4],
        &mut frame,
    );
    client.write_all(&frame).await.expect("send");
    backend
        .wait_for("the TEXT request reached the backend", |rs| {
            rs.iter()
                .any(|r| r.events().iter().any(|e| matches!(e, Event::Text(_))))
        })
        .await;
    gw.signal("TERM");
    let frames = server_frames(&read_to_end(&mut client).await);
    assert_eq!(gw.wait_exit(DEADLINE).await, Some(0));
    backend
        .wait_for("CLOSE 1001 to the backend", |rs| {
            rs.iter().any(|r| {
                r.events()
                    .iter()
                    .any(|e| matches!(e, Event::Close(Some(f)) if f.code == 1001))
            })
        })
        .await;
    // The 1001 waits for the answer in flight; the backend's CLOSE echo does not become a
    // second close frame (nothing follows a close frame, RFC 6455 section 5.5.1).
    assert_eq!(
        frames,
        vec![WireFrame::Text("in flight".into()), WireFrame::Close(Some(1001))],
        "frames the client got during the drain"
    );
}

/// Like `eventually`, with a longer deadline (1,000 handshakes on 2 shared cores).
async fn eventually_long<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- 2. reload under load ---------------------------------------------------------------------

/// Messages one reload client sends before reading their echoes (checks ordering).
const PIPELINE: u64 = 4;

/// 200 clients exchange messages while the routes file is rewritten: valid edits apply to open
/// connections, an invalid one is rejected and the old routes stay, and no connection drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_zero_drops() {
    const CLIENTS: usize = 200;
    // Phases: 0 = v1, 1 = v2 applied, 2 = invalid file rejected, 3 = v4 applied, 4 = v5 applied.
    const PHASES: usize = 5;
    let tstart = Instant::now();
    let backend = Backend::echo().await;
    let dir = TempDir::new("reload");
    let path = dir.0.join("routes.yaml");
    let routes = |rev: &str, extra: &str| {
        format!(
            "routes:\n  - name: app\n    backend:\n      url: {}\n    headers:\n      add: [{{name: X-Rev, value: \"{rev}\"}}]\n{extra}",
            backend.url()
        )
    };
    write_routes(&path, &routes("1", ""));
    let gw = GatewayProc::start(
        &[
            "--config",
            path.to_str().expect("utf-8 path"),
            "--reload-interval",
            "50ms",
        ],
        &[],
    )
    .await;
    assert_eq!(readyz_version(&gw.readyz().await.1), Some(1));

    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Clients that completed a round in each phase.
    let done_in: Arc<Vec<AtomicUsize>> = Arc::new((0..PHASES).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = tokio::task::JoinSet::new();
    // Connect everyone first (16 handshakes at a time), then start the traffic.
    let mut connecting = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    for idx in 0..CLIENTS {
        let (url, gate) = (gw.ws_url(&format!("/r/{idx}")), gate.clone());
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            (idx, ws_connect(&url).await)
        });
    }
    let mut clients = Vec::with_capacity(CLIENTS);
    while let Some(r) = connecting.join_next().await {
        clients.push(r.expect("connect task"));
    }
    for (idx, mut ws) in clients {
        let (phase, stop, done_in) = (phase.clone(), stop.clone(), done_in.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            let mut seen = [false; PHASES];
            // First message sent in each phase.
            let mut first_in = [None::<u64>; PHASES];
            while !stop.load(Ordering::SeqCst) {
                let p = phase.load(Ordering::SeqCst);
                first_in[p].get_or_insert(n);
                for k in 0..PIPELINE {
                    ws.send(WsMessage::text(format!("{idx}:{}", n + k)))
                        .await
                        .map_err(|e| format!("client {idx}: send failed: {e}"))?;
                }
                for k in 0..PIPELINE {
                    let want = format!("{idx}:{}", n + k);
                    match tokio::time::timeout(DEADLINE, ws.next()).await {
                        Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str() == want => {}
                        other => return Err(format!("client {idx}: want {want:?}, got {other:?}")),
                    }
                }
                n += PIPELINE;
                if !seen[p] {
                    seen[p] = true;
                    done_in[p].fetch_add(1, Ordering::SeqCst);
                }
            }
            ws.send(ws_close_frame(1000, "done"))
                .await
                .map_err(|e| format!("client {idx}: close failed: {e}"))?;
            loop {
                match tokio::time::timeout(DEADLINE, ws.next()).await {
                    Ok(Some(Ok(WsMessage::Close(Some(f))))) if u16::from(f.code) == 1000 => break,
                    Ok(Some(Ok(WsMessage::Text(_)))) => {}
                    other => return Err(format!("client {idx}: want close 1000, got {other:?}")),
                }
            }
            Ok::<_, String>((idx, n, first_in))
        });
    }
    let all_done_in = |p: usize| {
        let d = done_in.clone();
        move || {
            let d = d.clone();
            async move { d[p].load(Ordering::SeqCst) == CLIENTS }
        }
    };
    eventually("every client exchanged messages on v1", all_done_in(0)).await;

    // A valid edit: new header.
    write_routes(&path, &routes("2", ""));
    gw.wait_readyz(200, "routes version 2").await;
    phase.store(1, Ordering::SeqCst);
    eventually("every client exchanged messages on v2", all_done_in(1)).await;

    // An invalid edit (a misspelt field): rejected, logged, the old routes stay.
    write_routes(&path, &routes("3", "    limits:\n      maxMesageBytes: 5\n"));
    let log = gw.wait_log("routes file rejected", 1).await;
    assert!(log.contains("maxMesageBytes"), "the rejection names the field:\n{log}");
    let (status, body) = gw.readyz().await;
    assert_eq!((status, readyz_version(&body)), (200, Some(2)), "{body}");
    assert_eq!(gw.metric("wsgate_config_version").await, Some(2.0));
    phase.store(2, Ordering::SeqCst);
    eventually(
        "every client exchanged messages after the rejected edit",
        all_done_in(2),
    )
    .await;

    // Valid again, with a second route added; then one more edit.
    write_routes(
        &path,
        &routes(
            "4",
            &format!(
                "  - name: other\n    match: {{pathPrefixes: [/other]}}\n    backend:\n      url: {}\n",
                backend.url()
            ),
        ),
    );
    gw.wait_readyz(200, "routes version 3").await;
    phase.store(3, Ordering::SeqCst);
    eventually("every client exchanged messages on v4", all_done_in(3)).await;
    write_routes(&path, &routes("5", ""));
    gw.wait_readyz(200, "routes version 4").await;
    phase.store(4, Ordering::SeqCst);
    eventually("every client exchanged messages on v5", all_done_in(4)).await;
    assert_eq!(gw.metric("wsgate_config_version").await, Some(4.0));
    assert_eq!(gw.log().matches("routes file rejected").count(), 1, "{}", gw.log());

    stop.store(true, Ordering::SeqCst);
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.expect("client task"));
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} clients failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let results: Vec<(usize, u64, [Option<u64>; PHASES])> = results.into_iter().filter_map(Result::ok).collect();
    let total: u64 = results.iter().map(|r| r.1).sum();
    eprintln!(
        "reload: {CLIENTS} clients echoed {total} messages in order across 3 reloads and 1 rejected edit in {:?}",
        tstart.elapsed()
    );

    // Each phase's first message went out with that phase's routes (open connections move to
    // the new version of their route; the rejected edit changed nothing).
    let rev_of: HashMap<String, String> = backend
        .requests()
        .iter()
        .filter(|r| r.header("content-type").is_some())
        .flat_map(|r| {
            let rev = r.header("x-rev").unwrap_or("").to_owned();
            r.events()
                .iter()
                .filter_map(text_of)
                .map(move |t| (t, rev.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let want_rev = ["1", "2", "2", "4", "5"];
    for (idx, _, first_in) in &results {
        for (p, first) in first_in.iter().enumerate() {
            let Some(n) = first else { continue };
            let text = format!("{idx}:{n}");
            assert_eq!(
                rev_of.get(&text).map(String::as_str),
                Some(want_rev[p]),
                "message {text:?} (phase {p}) went out with the wrong route version"
            );
        }
    }
    let requests = backend.requests();
    let disconnects = requests
        .iter()
        .filter(|r| r.header("content-type").is_some() && r.events().contains(&Event::Disconnect))
        .count();
    assert_eq!(disconnects, 0, "no connection dropped");
}

// ---- 3. backend reset mid-stream --------------------------------------------------------------

/// What the raw backend does with a request.
fn raw_backend_answer(path: &str, body: &Bytes) -> Result<Vec<u8>, Vec<u8>> {
    const HEAD_OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/websocket-events\r\n";
    let evs = events::decode_body(body.clone(), 1 << 20).unwrap_or_default();
    let is_open = evs.contains(&Event::Open);
    if path == "/reset-head" && is_open {
        // Part of the status line and headers, then RST.
        return Err(format!("{HEAD_OK}Content-Len").into_bytes());
    }
    if path == "/reset-open-body" && is_open {
        return Err(format!("{HEAD_OK}Content-Length: 64\r\n\r\nOPEN\r\nTEXT 5\r\nhe").into_bytes());
    }
    if evs.iter().any(|e| text_of(e).as_deref() == Some("boom")) {
        // A complete head promising 100 bytes, part of the body, then RST.
        return Err(format!("{HEAD_OK}Content-Length: 100\r\n\r\nTEXT 5\r\nhel").into_bytes());
    }
    let mut out = Vec::new();
    for ev in evs {
        match ev {
            Event::Open | Event::Text(_) | Event::Binary(_) | Event::Close(_) => out.push(ev),
            _ => {}
        }
    }
    let body = events::encode(&out);
    let mut resp = format!("{HEAD_OK}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    resp.extend_from_slice(&body);
    Ok(resp)
}

/// Reads one HTTP/1.1 request (head and Content-Length body); `None` at EOF.
async fn read_raw_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String, Bytes)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let path = head.split_whitespace().nth(1)?.to_owned();
            let header = |name: &str| {
                head.lines().skip(1).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
            };
            let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let conn_id = header("connection-id").unwrap_or_default();
            let mut tmp = [0u8; 8192];
            while buf.len() < end + 4 + len {
                let n = s.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = Bytes::copy_from_slice(&buf[end + 4..end + 4 + len]);
            buf.drain(..end + 4 + len);
            return Some((path, conn_id, body));
        }
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Requests the raw backend got: (path, Connection-Id, events).
type RawLog = Arc<Mutex<Vec<(String, String, Vec<Event>)>>>;

/// A hand-written HTTP/1.1 backend that can cut a response short with a TCP reset.
async fn start_raw_backend() -> (SocketAddr, RawLog) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log: RawLog = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = l2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((path, id, body)) = read_raw_request(&mut s, &mut buf).await {
                    let evs = events::decode_body(body.clone(), 1 << 20).unwrap_or_default();
                    log.lock().expect("log").push((path.clone(), id, evs));
                    match raw_backend_answer(&path, &body) {
                        Ok(resp) => {
                            if s.write_all(&resp).await.is_err() {
                                return;
                            }
                        }
                        Err(partial) => {
                            let _ = s.write_all(&partial).await;
                            let _ = s.flush().await;
                            // SO_LINGER 0: close() sends RST instead of FIN.
                            s.set_zero_linger().expect("SO_LINGER 0");
                            drop(s);
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, log)
}

/// A backend that resets the TCP connection in the middle of a response: during the handshake
/// the client gets 502; on an open connection the client gets 1011 (a failure after the
/// request was sent is not retried) within the request timeout, the backend hears nothing more
/// from that connection, and another connection on the same gateway goes on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_mid_stream() {
    let (backend, log) = start_raw_backend().await;
    let gw = TestGateway::from_yaml(&format!(
        "routes:\n  - name: flaky\n    backend: {{url: \"http://{backend}\"}}\n    timeouts: {{request: 3s}}\n"
    ))
    .await;
    let request_timeout = Duration::from_secs(3);

    // A neighbour exchanging messages the whole time.
    let mut neighbour = gw.connect("/ok").await;
    let rounds = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (r2, s2) = (rounds.clone(), stop.clone());
    let neighbour_task = tokio::spawn(async move {
        let mut n = 0u64;
        while !s2.is_cancelled() {
            let m = format!("n{n}");
            neighbour.send_text(&m).await;
            neighbour.expect_text(&m).await;
            n += 1;
            r2.store(n, Ordering::SeqCst);
        }
        neighbour
    });
    let wait_rounds = |more: u64| {
        let rounds = rounds.clone();
        let from = rounds.load(Ordering::SeqCst);
        async move {
            eventually("the neighbour keeps exchanging messages", || {
                let rounds = rounds.clone();
                async move { rounds.load(Ordering::SeqCst) >= from + more }
            })
            .await;
        }
    };
    wait_rounds(5).await;

    // Handshake: the OPEN response is cut in its head, or in its body.
    for path in ["/reset-head", "/reset-open-body"] {
        let started = Instant::now();
        let (status, _, body) = http_request(gw.addr, "GET", path, &upgrade_headers(), b"").await;
        assert_eq!(status, 502, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(
            started.elapsed() < request_timeout,
            "{path}: 502 took {:?}",
            started.elapsed()
        );
        wait_rounds(3).await;
    }

    // Open connection: a later response is cut mid-body.
    let mut victim = gw.connect("/reset-body").await;
    victim.send_text("hello").await;
    victim.expect_text("hello").await;
    let started = Instant::now();
    victim.send_text("boom").await;
    let (code, reason) = victim.expect_close().await;
    let took = started.elapsed();
    assert_eq!(code, 1011, "close after a reset mid-response ({reason})");
    assert!(took < request_timeout, "the 1011 took {took:?}");
    wait_rounds(10).await;
    let victim_id = log
        .lock()
        .expect("log")
        .iter()
        .find(|(p, _, _)| p == "/reset-body")
        .map(|(_, id, _)| id.clone())
        .expect("victim's OPEN");
    let victim_requests: Vec<Vec<Event>> = log
        .lock()
        .expect("log")
        .iter()
        .filter(|(_, id, _)| *id == victim_id)
        .map(|(_, _, evs)| evs.clone())
        .collect();
    assert_eq!(
        victim_requests.len(),
        3,
        "OPEN, hello, boom and nothing after (no retry of a request that reached the backend): {victim_requests:?}"
    );

    stop.cancel();
    let mut neighbour = neighbour_task.await.expect("neighbour task");
    neighbour.send_text("still here").await;
    neighbour.expect_text("still here").await;
    neighbour.send(ws_close_frame(1000, "bye")).await;
    assert_eq!(neighbour.expect_close().await.0, 1000);
    eprintln!(
        "reset: 1011 after {took:?}; the neighbour completed {} round trips meanwhile",
        rounds.load(Ordering::SeqCst)
    );
}

// ---- 4. a client that stops reading -----------------------------------------------------------

/// Published messages, and their size.
const PUBLISHES: usize = 20_000;
const PUBLISH_BYTES: usize = 2048;
/// Messages the reading subscriber may lag behind the publisher.
const LAG_WINDOW: u64 = 256;

fn published_text(seq: usize) -> String {
    let mut s = format!("{seq:06}:");
    s.extend(std::iter::repeat_n('x', PUBLISH_BYTES - s.len()));
    s
}

/// Completes a WebSocket handshake on a raw socket with a small receive buffer; the caller
/// then never reads it.
async fn raw_ws_client(addr: SocketAddr, path: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small fixed receive buffer (no autotuning), so the gateway's output backs up soon.
    sock.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut s = sock.connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut byte))
            .await
            .expect("handshake answer in time")
            .expect("read");
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A frame a server sent, as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WireFrame {
    Text(String),
    Close(Option<u16>),
    Other(u8),
}

/// The complete (unmasked) frames in a server's byte stream; a frame cut short at the end is
/// left out.
fn server_frames(mut b: &[u8]) -> Vec<WireFrame> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let opcode = b[0] & 0x0f;
        let (len, at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (usize::try_from(u64::from_be_bytes(l)).unwrap_or(usize::MAX), 10)
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        if b.len() - at < len {
            break; // cut mid-frame
        }
        let payload = &b[at..at + len];
        out.push(match opcode {
            0x1 => WireFrame::Text(String::from_utf8_lossy(payload).into_owned()),
            0x8 => WireFrame::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))),
            op => WireFrame::Other(op),
        });
        b = &b[at + len..];
    }
    out
}

/// Reads a raw socket until the peer ends the stream (or the deadline).
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_all)
        .await
        .expect("the connection ends in time");
    got
}

/// A GRIP subscriber that stops reading while 20,000 x 2 KiB messages are published: the
/// gateway's memory stays bounded, the slow client is cut (1013 or dropped) and counted, and a
/// reading subscriber of the same channel gets every message in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_client_memory_bounded() {
    // Per connection the gateway holds at most outboundQueueBytes in its mailbox plus about
    // outboundQueueBytes in its write buffer (a client is cut once that buffer is over the
    // limit): 2 x 1 MiB per subscriber, 4 MiB for both, plus one publish request (~210 KB)
    // and its parsed items at a time. 16 MiB leaves room for the allocator and is far under
    // the 40 MiB published: buffering what the slow client does not read (all but the few MiB
    // its socket buffers take) would exceed it twice over.
    const RSS_BOUND_KIB: u64 = 16 * 1024;
    let backend = grip_subscriber_backend("feed").await;
    let dir = TempDir::new("slow");
    let path = dir.0.join("routes.yaml");
    write_routes(
        &path,
        &format!(
            "routes:\n  - name: feed\n    backend: {{url: \"{}\"}}\n    limits: {{outboundQueueBytes: 1048576}}\n    timeouts: {{close: 1s}}\n",
            backend.url()
        ),
    );
    let gw = GatewayProc::start(&["--config", path.to_str().expect("utf-8 path")], &[]).await;
    let mut slow = raw_ws_client(gw.addr, "/slow").await;
    let reader_ws = ws_connect(&gw.ws_url("/reader")).await;
    gw.wait_metric("wsgate_subscriptions", 2.0).await;
    let baseline = gw.rss_kib();

    let (count_tx, mut count_rx) = watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut c = Client { ws: reader_ws };
        for seq in 0..PUBLISHES {
            match c.next_data().await {
                WsMessage::Text(t) if t.as_str() == published_text(seq) => {}
                other => {
                    let shown = match &other {
                        WsMessage::Text(t) => short(t.as_str()),
                        m => format!("{m:?}"),
                    };
                    return Err(format!("reader: message {seq}: got {shown}"));
                }
            }
            let _ = count_tx.send(seq as u64 + 1);
        }
        Ok(c)
    });

    let started = Instant::now();
    let mut peak = baseline;
    const BATCH: usize = 100;
    for batch in 0..PUBLISHES / BATCH {
        let items: Vec<serde_json::Value> = (batch * BATCH..(batch + 1) * BATCH)
            .map(|seq| serde_json::json!({"channel": "feed", "formats": {"ws-message": {"content": published_text(seq)}}}))
            .collect();
        let body = serde_json::json!({ "items": items }).to_string();
        let (status, _, resp) = http_request(
            gw.admin,
            "POST",
            "/publish/",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{resp:?}");
        peak = peak.max(gw.rss_kib());
        // Keep the reading subscriber within LAG_WINDOW messages (it must not become slow).
        let published = ((batch + 1) * BATCH) as u64;
        tokio::time::timeout(DEADLINE, count_rx.wait_for(|c| c + LAG_WINDOW >= published))
            .await
            .expect("the reading subscriber keeps up")
            .expect("reader alive");
    }
    let mut reader = reader
        .await
        .expect("reader task")
        .expect("reader got every message in order");
    let publish_time = started.elapsed();
    peak = peak.max(gw.rss_kib());

    assert!(
        gw.metric("wsgate_slow_consumer_drops_total").await >= Some(1.0),
        "the slow consumer is counted"
    );
    gw.wait_metric("wsgate_open_connections{route=\"feed\"}", 1.0).await;
    // The slow client: what it got is a gap-free prefix, then a 1013 close or the end of the
    // stream.
    let frames = server_frames(&read_to_end(&mut slow).await);
    let texts: Vec<&String> = frames
        .iter()
        .filter_map(|f| match f {
            WireFrame::Text(t) => Some(t),
            _ => None,
        })
        .collect();
    let close = frames.iter().find_map(|f| match f {
        WireFrame::Close(c) => Some(c.unwrap_or(1005)),
        _ => None,
    });
    for (seq, t) in texts.iter().enumerate() {
        assert!(**t == published_text(seq), "slow client: message {seq} out of order");
    }
    assert!(
        texts.len() < PUBLISHES,
        "the slow client was cut, not served everything"
    );
    assert!(matches!(close, None | Some(1013)), "slow client close code {close:?}");

    // The reader is still connected and served.
    let (status, _, _) = http_request(
        gw.admin,
        "POST",
        "/publish/",
        &[],
        br#"{"items":[{"channel":"feed","formats":{"ws-message":{"content":"after"}}}]}"#,
    )
    .await;
    assert_eq!(status, 200);
    reader.expect_text("after").await;

    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "slow consumer: {PUBLISHES} x {PUBLISH_BYTES} B published in {publish_time:?}; RSS baseline {baseline} KiB, \
         peak {peak} KiB (+{growth} KiB, bound +{RSS_BOUND_KIB} KiB); slow client got {} messages then {}",
        texts.len(),
        close.map_or("end of stream".to_owned(), |c| format!("close {c}"))
    );
    assert!(
        growth < RSS_BOUND_KIB,
        "gateway RSS grew by {growth} KiB (baseline {baseline} KiB, peak {peak} KiB), over the {RSS_BOUND_KIB} KiB bound"
    );
}

// ---- 5. rate limit ----------------------------------------------------------------------------

/// A client over `limits.messagesPerSecond` is closed with 1008; the backend never sees more
/// than the token bucket allows; another client on the same route is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_closes_1008() {
    const RATE: u32 = 5;
    let backend = Backend::echo().await;
    let gw = TestGateway::from_yaml(&format!(
        "routes:\n  - name: limited\n    backend: {{url: \"{}\"}}\n    limits: {{messagesPerSecond: {RATE}}}\n",
        backend.url()
    ))
    .await;
    let mut calm = gw.connect("/calm").await;
    for i in 0..2 {
        calm.send_text(&format!("calm {i}")).await;
        calm.expect_text(&format!("calm {i}")).await;
    }

    let mut flood = gw.connect("/flood").await;
    let started = Instant::now();
    let mut sent = 0;
    for i in 0..100 {
        if flood.ws.send(WsMessage::text(format!("flood {i}"))).await.is_err() {
            break;
        }
        sent += 1;
    }
    let (code, reason) = flood.expect_close().await;
    let elapsed = started.elapsed();
    assert_eq!(code, 1008, "flooding client: {reason}");

    let close_1008 = Event::Close(Some(CloseFrame {
        code: 1008,
        reason: reason.clone(),
    }));
    let reqs = backend
        .wait_for("CLOSE 1008 from the flooding client", |rs| {
            rs.iter().any(|r| {
                r.uri.path() == "/flood" && r.header("content-type").is_some() && r.events().contains(&close_1008)
            })
        })
        .await;
    let seen = reqs
        .iter()
        .filter(|r| r.uri.path() == "/flood")
        .flat_map(|r| r.events())
        .filter(|e| matches!(e, Event::Text(_)))
        .count();
    // Token bucket: a burst of RATE, then RATE per second.
    let allowed = RATE as usize + (elapsed.as_secs_f64() * f64::from(RATE)).ceil() as usize;
    assert!(
        seen <= allowed,
        "backend saw {seen} of {sent} flood messages; at most {allowed} allowed in {elapsed:?}"
    );
    assert!(seen >= RATE as usize, "the burst of {RATE} got through (saw {seen})");

    for i in 2..4 {
        calm.send_text(&format!("calm {i}")).await;
        calm.expect_text(&format!("calm {i}")).await;
    }
    calm.send(ws_close_frame(1000, "bye")).await;
    assert_eq!(calm.expect_close().await.0, 1000, "the calm client was never limited");
}

// ---- 6. NATS outage ---------------------------------------------------------------------------

async fn publish_via(admin: SocketAddr, channel: &str, text: &str) {
    let body = serde_json::json!({"items": [{"channel": channel, "formats": {"ws-message": {"content": text}}}]});
    let (status, _, resp) = http_request(admin, "POST", "/publish/", &[], body.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{resp:?}");
}

/// Publishes `prefix-N` on `admin` until `client` receives one (each probe waits 100 ms for
/// it, all bounded by the deadline): for waiting until cross-replica delivery works. Every
/// probe prefix starts with `probe`.
async fn probe_until_received(client: &mut Client, admin: SocketAddr, channel: &str, prefix: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for i in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {prefix} probe arrived in time"
        );
        publish_via(admin, channel, &format!("{prefix}-{i}")).await;
        match tokio::time::timeout(Duration::from_millis(100), client.ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str().starts_with(prefix) => return,
            // An earlier probe (local deliveries of probes published on this replica).
            Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str().starts_with("probe") => {}
            Ok(other) => panic!("unexpected while probing: {other:?}"),
        }
    }
}

/// Expects `want`, skipping probes starting with `skip`.
async fn expect_skipping(client: &mut Client, want: &str, skip: &str) {
    loop {
        match client.next_data().await {
            WsMessage::Text(t) if t.as_str().starts_with(skip) => {}
            WsMessage::Text(t) => {
                assert_eq!(t.as_str(), want);
                return;
            }
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
}

/// Two gateway processes over a real nats-server that is killed and restarted: local delivery
/// goes on, /readyz and /metrics report the outage, and cross-replica delivery resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_kill_restart() {
    use support::nats::{NatsServer, grip_backend, sub_path};
    let mut nats = NatsServer::start().await;
    let backend = grip_backend().await;
    let a = GatewayProc::start(&["--backend", &backend.url(), "--nats", &nats.url()], &[]).await;
    let b = GatewayProc::start(&["--backend", &backend.url(), "--nats", &nats.url()], &[]).await;
    for g in [&a, &b] {
        g.wait_metric("wsgate_nats_state", 1.0).await;
        let (status, body) = g.readyz().await;
        assert!(status == 200 && !body.contains("degraded"), "{status} {body}");
    }
    let mut a1 = Client {
        ws: ws_connect(&a.ws_url(&sub_path("room", "a1"))).await,
    };
    let mut b1 = Client {
        ws: ws_connect(&b.ws_url(&sub_path("room", "b1"))).await,
    };
    probe_until_received(&mut b1, a.admin, "room", "probe").await;
    publish_via(a.admin, "room", "before").await;
    expect_skipping(&mut a1, "before", "probe").await;
    expect_skipping(&mut b1, "before", "probe").await;

    nats.kill().await;
    let outage = Instant::now();
    for g in [&a, &b] {
        g.wait_readyz(200, "degraded: nats disconnected").await;
        g.wait_metric("wsgate_nats_state", 0.0).await;
    }
    eprintln!("nats: outage reported by both gateways after {:?}", outage.elapsed());
    // Local delivery goes on, without waiting for NATS.
    let started = Instant::now();
    publish_via(a.admin, "room", "during on a").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "publish waited {:?}",
        started.elapsed()
    );
    a1.expect_text("during on a").await;
    publish_via(b.admin, "room", "during on b").await;
    b1.expect_text("during on b").await;

    nats.restart().await;
    let restart = Instant::now();
    for g in [&a, &b] {
        g.wait_metric("wsgate_nats_state", 1.0).await;
        let (status, body) = g.readyz().await;
        assert!(status == 200 && !body.contains("degraded"), "{status} {body}");
    }
    eprintln!(
        "nats: both gateways reconnected {:?} after the restart",
        restart.elapsed()
    );
    probe_until_received(&mut b1, a.admin, "room", "probe-ab").await;
    probe_until_received(&mut a1, b.admin, "room", "probe-ba").await;
    publish_via(a.admin, "room", "after").await;
    expect_skipping(&mut a1, "after", "probe").await;
    expect_skipping(&mut b1, "after", "probe").await;
    publish_via(b.admin, "room", "after from b").await;
    // A probe published on b before a's "after" may still cross NATS after it.
    expect_skipping(&mut a1, "after from b", "probe").await;
    expect_skipping(&mut b1, "after from b", "probe").await;
}

// ---- 7. controller outage ---------------------------------------------------------------------

mod controller_outage {
    use super::*;
    use kube::Api;
    use kube::api::{Patch, PatchParams, PostParams};
    use serde_json::json;
    use support::fake_kube::FakeKube;
    use wsgate::config::control::Snapshot;
    use wsgate::controller::{ControlPlane, ControllerConfig, LeaseConfig, WebSocketRoute};

    const NS: &str = "apps";

    /// Runs a controller on `addr` (binding it again after a stop may take a moment).
    async fn start_controller(fake: &FakeKube, addr: SocketAddr) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let mut config = ControllerConfig::new(LeaseConfig {
            namespace: "wsgate-system".into(),
            name: "wsgate-controller".into(),
            identity: "ctl-0".into(),
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(100),
        });
        config.api.poll_timeout = Duration::from_secs(5);
        let plane = ControlPlane::new(fake.client(), config);
        let listener = bind_again(addr).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(plane.run(listener, stop.clone()));
        (stop, task)
    }

    async fn bind_again(addr: SocketAddr) -> TcpListener {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return l,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "cannot bind {addr} again: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A control API that answers the first snapshot request with `bad` (valid JSON, routes
    /// that cannot form a table) and holds every later request open until `stop`.
    async fn serve_bad_snapshot(addr: SocketAddr, bad: String, stop: CancellationToken) -> Arc<AtomicUsize> {
        let listener = bind_again(addr).await;
        let served = Arc::new(AtomicUsize::new(0));
        let s2 = served.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    () = stop.cancelled() => return,
                };
                let (bad, served, stop) = (bad.clone(), s2.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((path, _, _)) = read_raw_request(&mut s, &mut buf).await {
                        if !path.starts_with("/v1/snapshot") || served.fetch_add(1, Ordering::SeqCst) > 0 {
                            stop.cancelled().await;
                            return;
                        }
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{bad}",
                            bad.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        served
    }

    fn route(backend: &str, rev: &str) -> WebSocketRoute {
        serde_json::from_value(json!({
            "apiVersion": "wsgate.io/v1alpha1", "kind": "WebSocketRoute",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {
                "match": {"pathPrefixes": ["/chat"]},
                "backend": {"url": backend},
                "workloadSelector": {"app": "chat"},
                "headers": {"add": [{"name": "x-rev", "value": rev}]}
            }
        }))
        .expect("route")
    }

    /// The `x-rev` header the backend saw with TEXT `text`.
    fn rev_for(backend: &Backend, text: &str) -> Option<String> {
        backend
            .requests()
            .iter()
            .find(|r| {
                r.header("content-type").is_some() && r.events().iter().any(|e| text_of(e).as_deref() == Some(text))
            })
            .and_then(|r| r.header("x-rev").map(str::to_owned))
    }

    /// `wsgate_config_info`'s version and `wsgate_config_version`, as [`config_metrics`] reads
    /// them.
    type ConfigMetrics = (Option<u64>, Option<f64>);

    /// What `/metrics` says about the route table: the exact version from
    /// `wsgate_config_info{version=...,source="control"}` and the generation
    /// (`wsgate_config_version`).
    async fn config_metrics(gw: &GatewayProc) -> ConfigMetrics {
        let (status, _, body) = http_request(gw.admin, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200, "GET /metrics");
        let text = String::from_utf8_lossy(&body);
        let info: Vec<&str> = text.lines().filter(|l| l.starts_with("wsgate_config_info{")).collect();
        assert_eq!(info.len(), 1, "one wsgate_config_info sample: {info:?}");
        assert!(
            info[0].ends_with(" 1") && info[0].contains(r#"source="control""#),
            "{}",
            info[0]
        );
        let version = info[0]
            .split("version=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|v| v.parse().ok());
        let generation = metric_in(&text, "wsgate_config_version").and_then(|v| v.parse().ok());
        (version, generation)
    }

    /// A gateway process fed by the control API: when the controller stops, open connections
    /// and new ones keep working on the last good snapshot and /readyz stays ready with its
    /// version; an invalid snapshot is rejected; after a restart the gateway picks up new
    /// snapshot versions and open connections move to them. `/metrics` shows the exact
    /// version `/readyz` shows and whether the controller is reachable; `/readyz` says it is
    /// degraded while it is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controller_kill_restart() {
        let fake = FakeKube::start().await;
        let control_addr = free_addr();
        let (stop_controller, controller) = start_controller(&fake, control_addr).await;

        let token = fake.gateway_pod_token(NS, "chat-0", json!({"app": "chat"})).await;
        let dir = TempDir::new("control");
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token file");

        let backend = Backend::echo().await;
        let routes: Api<WebSocketRoute> = Api::namespaced(fake.client(), NS);
        routes
            .create(&PostParams::default(), &route(&backend.url(), "1"))
            .await
            .expect("create route");

        let control_url = format!("http://{control_addr}");
        let gw = GatewayProc::start(
            &[
                "--control-url",
                &control_url,
                "--control-token-file",
                token_file.to_str().expect("utf-8 path"),
            ],
            &[("POD_NAMESPACE", NS), ("POD_NAME", "chat-0")],
        )
        .await;
        // (readyz version, (wsgate_config_info version, wsgate_config_version)), checked at
        // the end.
        let mut version_reports: Vec<(u64, ConfigMetrics)> = Vec::new();
        let (_, body) = gw.readyz().await;
        assert!(!body.contains("degraded"), "{body}");
        let v1 = readyz_version(&body).expect("routes version in /readyz");
        version_reports.push((v1, config_metrics(&gw).await));
        assert_eq!(gw.metric("wsgate_config_source_up").await, Some(1.0));
        assert_eq!(gw.metric("wsgate_config_reload_failures_total").await, Some(0.0));
        assert!(
            gw.metric("wsgate_config_last_success_timestamp_seconds")
                .await
                .is_some_and(|t| t > 1.6e9),
            "a real Unix time"
        );

        let mut client = Client {
            ws: ws_connect(&gw.ws_url("/chat")).await,
        };
        client.send_text("one").await;
        client.expect_text("one").await;
        assert_eq!(rev_for(&backend, "one").as_deref(), Some("1"));

        // The controller stops: the last good snapshot keeps serving.
        stop_controller.cancel();
        controller.await.expect("controller stops");
        gw.wait_log("control API unavailable", 1).await;
        client.send_text("two").await;
        client.expect_text("two").await;
        let mut second = Client {
            ws: ws_connect(&gw.ws_url("/chat/second")).await,
        };
        second.send_text("new connection").await;
        second.expect_text("new connection").await;
        let (status, body) = gw.readyz().await;
        assert_eq!((status, readyz_version(&body)), (200, Some(v1)), "{body}");
        // ... and says the controller is away, in /readyz (still 200) and /metrics.
        let body = gw.wait_readyz(200, "; degraded: control API unreachable since ").await;
        assert_eq!(readyz_version(&body), Some(v1), "{body}");
        assert!(
            body.contains("control API request failed"),
            "the error is shown: {body}"
        );
        assert!(!body.contains("token-"), "no token in /readyz: {body}");
        gw.wait_metric("wsgate_config_source_up", 0.0).await;
        assert!(
            gw.metric("wsgate_config_reload_failures_total")
                .await
                .is_some_and(|n| n >= 1.0)
        );
        assert_eq!(
            config_metrics(&gw).await,
            version_reports[0].1,
            "the table in use stays"
        );

        // An invalid snapshot (two routes with one name) is rejected; the old routes stay.
        let bad_route = json!({
            "namespace": NS, "name": "chat", "backendUrl": "http://127.0.0.1:1",
            "spec": {"backend": {"url": "http://127.0.0.1:1"}}
        });
        let bad = json!({"version": 77, "routes": [bad_route, bad_route]}).to_string();
        let parsed: Snapshot = serde_json::from_str(&bad).expect("the bad snapshot decodes");
        assert!(parsed.compile().is_err(), "the bad snapshot cannot form a table");
        let stop_bad = CancellationToken::new();
        let served = serve_bad_snapshot(control_addr, bad, stop_bad.clone()).await;
        gw.wait_log("snapshot rejected", 1).await;
        assert!(served.load(Ordering::SeqCst) >= 1);
        let body = gw.wait_readyz(200, "; degraded: control API failing since ").await;
        assert_eq!(readyz_version(&body), Some(v1), "{body}");
        assert!(body.contains("snapshot rejected"), "{body}");
        assert_eq!(gw.metric("wsgate_config_source_up").await, Some(0.0));
        version_reports.push((v1, config_metrics(&gw).await));
        client.send_text("three").await;
        client.expect_text("three").await;
        assert_eq!(rev_for(&backend, "three").as_deref(), Some("1"));
        stop_bad.cancel();

        // The controller is back: an edit reaches the gateway as a new version, and the open
        // connection moves to it.
        let (stop_controller, controller) = start_controller(&fake, control_addr).await;
        let edit = json!({"spec": {"headers": {"add": [{"name": "x-rev", "value": "2"}]}}});
        routes
            .patch("chat", &PatchParams::default(), &Patch::Merge(&edit))
            .await
            .expect("patch route");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let v2 = loop {
            let (status, body) = gw.readyz().await;
            assert_eq!(status, 200, "{body}");
            match readyz_version(&body) {
                Some(v) if v != v1 && v != 77 => break v,
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new snapshot after the restart: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        version_reports.push((v2, config_metrics(&gw).await));
        gw.wait_metric("wsgate_config_source_up", 1.0).await;
        let body = gw.wait_readyz(200, "ready (routes version ").await;
        assert!(!body.contains("degraded"), "the controller is back: {body}");
        client.send_text("four").await;
        client.expect_text("four").await;
        assert_eq!(
            rev_for(&backend, "four").as_deref(),
            Some("2"),
            "the open connection uses the new snapshot"
        );
        second.send_text("five").await;
        second.expect_text("five").await;

        // More edits, until a snapshot version above i64::MAX was seen (half of all content
        // hashes are), each one reported by /readyz and /metrics.
        let mut last = v2;
        for rev in 3..24 {
            if version_reports.iter().any(|(v, _)| *v > i64::MAX as u64) {
                break;
            }
            let edit = json!({"spec": {"headers": {"add": [{"name": "x-rev", "value": rev.to_string()}]}}});
            routes
                .patch("chat", &PatchParams::default(), &Patch::Merge(&edit))
                .await
                .expect("patch route");
            let deadline = tokio::time::Instant::now() + DEADLINE;
            last = loop {
                let (_, body) = gw.readyz().await;
                match readyz_version(&body) {
                    Some(v) if v != last => break v,
                    _ => {}
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "edit {rev} never arrived: {body}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            version_reports.push((last, config_metrics(&gw).await));
        }
        stop_controller.cancel();
        controller.await.expect("controller stops");

        // The exact version is in wsgate_config_info (a u64 content hash does not fit a
        // sample value, a float64); wsgate_config_version counts the snapshots applied.
        assert!(
            version_reports.iter().any(|(v, _)| *v > i64::MAX as u64),
            "{version_reports:?}"
        );
        for (version, (info, _)) in &version_reports {
            assert_eq!(
                *info,
                Some(*version),
                "wsgate_config_info's version must be the one /readyz reports ({version_reports:?})"
            );
        }
        assert!(
            version_reports[0].1.1.is_some_and(|g| g >= 1.0),
            "the first snapshot is generation 1 or later: {version_reports:?}"
        );
        for pair in version_reports.windows(2) {
            let ((v0, (_, g0)), (v1, (_, g1))) = (&pair[0], &pair[1]);
            let (g0, g1) = (g0.expect("generation"), g1.expect("generation"));
            if v0 == v1 {
                assert_eq!(g0, g1, "{version_reports:?}");
            } else {
                assert!(g1 > g0, "a new snapshot is a new generation: {version_reports:?}");
            }
        }
    }
}
