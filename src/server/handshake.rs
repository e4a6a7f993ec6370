//! The WebSocket handshake: validate the upgrade, run the OPEN exchange with the backend,
//! answer `101` (or the backend's rejection), then hand the upgraded socket to the driver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{Gateway, ResponseBody, discard, text_response};
use crate::config::Route;
use crate::protocol::frame;
use crate::session::{Action, ClientInput, Session, SessionConfig};
use crate::telemetry::{ConnectionSpans, HandshakeOutcome};
use crate::transport::backend::{ClientInfo, RequestTemplate, full_body};
use crate::transport::client::{self, BackendLimits, Connection};
use crate::transport::io::ClientIo;

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True for a request asking to upgrade to WebSocket.
pub fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    req.method() == http::Method::GET
        && header_has_token(req, header::CONNECTION, "upgrade")
        && header_has_token(req, header::UPGRADE, "websocket")
}

/// The session settings a route implies.
pub fn session_config(route: &Route) -> SessionConfig {
    SessionConfig {
        max_batch_bytes: route.limits.max_batch_bytes,
        max_event_bytes: route.limits.max_response_bytes,
        keep_alive_floor: route.keep_alive.min_interval,
        client_ping_interval: route.keep_alive.client_ping_interval,
        client_idle_timeout: route.keep_alive.client_idle_timeout,
        relay_pings: route.keep_alive.relay_pings,
        retry_attempts: route.retries.attempts,
        retry_initial_backoff: route.retries.initial_backoff,
        retry_max_backoff: route.retries.max_backoff,
        meta_allowed: route.meta_allowed.clone().map(Arc::new),
        close_timeout: route.timeouts.close,
        grip_enabled: route.grip.enabled,
        max_subscriptions: route.grip.max_subscriptions,
        messages_per_second: route.limits.messages_per_second,
    }
}

/// Releases the connection slots when the connection ends.
struct Slots {
    gw: Arc<Gateway>,
    route_count: Arc<std::sync::atomic::AtomicUsize>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.route_count.fetch_sub(1, Ordering::SeqCst);
        self.gw.stats.open_connections.fetch_sub(1, Ordering::SeqCst);
        self.gw.conn_closed.notify_waiters();
    }
}

pub(super) async fn handle(
    gw: Arc<Gateway>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
    route: Arc<Route>,
    prefix: String,
    table_version: u64,
) -> Response<ResponseBody> {
    if gw.draining.load(Ordering::SeqCst) {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text_response(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !version_ok {
        let mut r = text_response(StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version\n");
        r.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let mut spans = ConnectionSpans::start(&route.name, req.uri().path(), req.headers());
    // Connection limits: global, then per route.
    let Ok(permit) = gw.conn_limit.clone().try_acquire_owned() else {
        gw.stats.handshakes_over_limit.fetch_add(1, Ordering::Relaxed);
        spans.finish_handshake(HandshakeOutcome::OverLimit, StatusCode::SERVICE_UNAVAILABLE);
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "connection limit reached\n");
    };
    let route_count = gw.route_counter(&route.name);
    let n = route_count.fetch_add(1, Ordering::SeqCst) + 1;
    gw.stats.open_connections.fetch_add(1, Ordering::SeqCst);
    let slots = Slots {
        gw: gw.clone(),
        route_count,
        _permit: permit,
    };
    if route.limits.max_connections.is_some_and(|max| n > max) {
        gw.stats.handshakes_over_limit.fetch_add(1, Ordering::Relaxed);
        spans.finish_handshake(HandshakeOutcome::OverLimit, StatusCode::SERVICE_UNAVAILABLE);
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "route connection limit reached\n");
    }
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    // A random (v4) id from the thread's CSPRNG (ChaCha, seeded from the OS): unguessable, as
    // `Uuid::new_v4` is, without a `getrandom` system call per connection.
    let conn_id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let id = conn_id.hyphenated().to_string();
    spans.set_connection_id(&id);
    let template = match RequestTemplate::new(
        route.clone(),
        &prefix,
        &path_and_query,
        req.headers(),
        &ClientInfo { peer, tls },
        Some(&id),
        true,
    ) {
        Ok(t) => t,
        Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The request body of a GET upgrade is empty; release it.
    let (_parts, body) = req.into_parts();
    tokio::spawn(discard(body));

    let seed = conn_id.as_u64_pair().0;
    let session = Session::new(session_config(&route), super::now_std(), seed);
    let handle = gw
        .registry
        .register(id.clone(), route.name.clone(), route.limits.outbound_queue_bytes);
    let conn = Connection {
        session,
        template,
        pool: gw.pool.clone(),
        limits: BackendLimits {
            timeout: route.timeouts.request,
            max_body: route.limits.max_response_bytes,
            max_reject_body: route.limits.max_reject_body_bytes,
        },
        handle,
        registry: gw.registry.clone(),
        shutdown: gw.close_connections.clone(),
        max_message_bytes: route.limits.max_message_bytes,
        outbound_limit: route.limits.outbound_queue_bytes,
        on_channel: gw.on_channel.clone(),
        close_pacing: gw.settings.close_pacing,
        table: Some(gw.table.clone()),
        table_version,
        metrics: gw.metrics.route(&route.name),
        span: spans.handshake_parent(),
    };
    let (tx, rx) = oneshot::channel();
    let accept_key = frame::accept_key(key.as_bytes());
    let gw2 = gw.clone();
    // The exchange runs in its own task so that a client leaving mid-OPEN still gets its
    // DISCONNECT sent once the OPEN completes.
    gw.tracker
        .spawn(connection_task(gw2, conn, tx, on_upgrade, accept_key, id, spans, slots));
    match rx.await {
        Ok(resp) => resp,
        Err(_) => text_response(StatusCode::BAD_GATEWAY, "handshake failed\n"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection_task(
    gw: Arc<Gateway>,
    mut conn: Connection,
    mut tx: oneshot::Sender<Response<ResponseBody>>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept_key: String,
    id: String,
    mut spans: ConnectionSpans,
    slots: Slots,
) {
    let started = std::time::Instant::now();
    // Run the OPEN exchange (with OPEN retries on keep-alive) until accepted or refused.
    let response = loop {
        match conn.session.poll_action() {
            Some(Action::SendBackend(req)) => {
                let res = client::start_request(&conn, &req).await;
                conn.session.handle_backend(res, super::now_std());
            }
            Some(Action::Accept { headers }) => {
                let mut r = Response::new(full_body(Bytes::new()));
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let h = r.headers_mut();
                for (name, value) in &headers {
                    h.append(name.clone(), value.clone());
                }
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                if let Ok(v) = HeaderValue::from_str(&accept_key) {
                    h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
                }
                break Ok(r);
            }
            Some(Action::Reject { status, headers, body }) => {
                let mut r = Response::new(full_body(body));
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                if status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT {
                    gw.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                    spans.finish_handshake(HandshakeOutcome::Failed, status);
                } else {
                    gw.stats.handshakes_rejected.fetch_add(1, Ordering::Relaxed);
                    spans.finish_handshake(HandshakeOutcome::Rejected, status);
                }
                break Err(r);
            }
            Some(Action::Done) => break Err(text_response(StatusCode::BAD_GATEWAY, "handshake failed\n")),
            Some(_) => {}
            None => match conn.session.poll_timeout() {
                Some(t) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(tokio::time::Instant::from_std(t)) => {
                            conn.session.handle_timeout(super::now_std());
                        }
                        () = tx.closed() => {
                            conn.session.handle_client(ClientInput::Gone, super::now_std());
                        }
                    }
                }
                None => break Err(text_response(StatusCode::BAD_GATEWAY, "handshake failed\n")),
            },
        }
    };
    let response = match response {
        Ok(r) => r,
        Err(r) => {
            // No-op when the rejection was already recorded.
            spans.finish_handshake(HandshakeOutcome::Failed, r.status());
            let _ = tx.send(r);
            gw.registry.unregister(&conn.handle);
            return;
        }
    };
    // Later backend requests are children of the connection span.
    conn.span = spans.connection_parent();
    // Subscriptions from the OPEN response take effect before the client's 101, so a
    // publish that follows the handshake (even one the backend triggers while answering
    // another client's OPEN) is never missed. The session's Subscribe actions, applied
    // later by the driver, then find them in place.
    if let Some(grip) = conn.session.grip() {
        for sub in grip.subscriptions() {
            if gw.registry.subscribe(&conn.handle, &sub.channel, &sub.filters)
                && let Some(cb) = &conn.on_channel
            {
                cb(&sub.channel, true);
            }
        }
        // Recorded at once, so that unregistering always finds them.
        let mut info = conn.handle.info();
        info.channels = grip.subscriptions().iter().map(|s| s.channel.clone()).collect();
        conn.handle.set_info(info);
    }
    if tx.send(response).is_err() {
        spans.finish_handshake(HandshakeOutcome::ClientGone, StatusCode::SWITCHING_PROTOCOLS);
        // The client left before its 101: the backend learns with DISCONNECT.
        conn.session.handle_client(ClientInput::Gone, super::now_std());
        drive_without_client(&mut conn).await;
        gw.registry.unregister(&conn.handle);
        return;
    }
    gw.stats.handshakes_accepted.fetch_add(1, Ordering::Relaxed);
    spans.finish_handshake(HandshakeOutcome::Accepted, StatusCode::SWITCHING_PROTOCOLS);
    let io = match on_upgrade.await {
        Ok(upgraded) => client_io(upgraded, conn.template.route.timeouts.close),
        Err(_) => None,
    };
    let Some((stream, leftover)) = io else {
        conn.session.handle_client(ClientInput::Gone, super::now_std());
        drive_without_client(&mut conn).await;
        gw.registry.unregister(&conn.handle);
        return;
    };
    tracing::debug!(conn_id = %id, route = %conn.handle.route, "connection open");
    // The open connection lives in a task of its own: this one (which carried the OPEN
    // exchange and the upgrade, a large future) ends here and frees its memory, so an idle
    // connection costs only the small driver task.
    let tracker = gw.tracker.clone();
    let route = conn.handle.route.clone();
    // Made outside the task's future so that future does not also carry the connection.
    let driver = client::run(stream, leftover, conn);
    tracker.spawn(async move {
        let _slots = slots;
        let summary = driver.await;
        gw.stats
            .client_messages
            .fetch_add(summary.client_messages, Ordering::Relaxed);
        gw.stats
            .backend_messages
            .fetch_add(summary.backend_messages, Ordering::Relaxed);
        spans.finish_connection(summary.close_code, summary.client_messages, summary.backend_messages);
        tracing::info!(
            conn_id = %id,
            route = %route,
            duration_ms = started.elapsed().as_millis() as u64,
            close_code = summary.close_code,
            client_messages = summary.client_messages,
            backend_messages = summary.backend_messages,
            slow_consumer = summary.slow_consumer,
            "connection closed"
        );
    });
}

/// The socket under an upgraded connection, and the bytes hyper read past the request. For
/// TLS, rustls's session comes along with what it holds (decrypted plaintext not yet read,
/// records not yet written); `close_timeout` bounds its final flush.
fn client_io(upgraded: hyper::upgrade::Upgraded, close_timeout: std::time::Duration) -> Option<(ClientIo, Bytes)> {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Some((ClientIo::plain(parts.io.into_inner()), parts.read_buf)),
        Err(u) => u,
    };
    match upgraded.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>() {
        Ok(parts) => {
            let (tcp, session) = parts.io.into_inner().into_inner();
            Some((ClientIo::tls(tcp, session, close_timeout), parts.read_buf))
        }
        Err(_) => None,
    }
}

/// Runs the session's remaining backend exchange (DISCONNECT) when there is no client socket.
async fn drive_without_client(conn: &mut Connection) {
    loop {
        match conn.session.poll_action() {
            Some(Action::SendBackend(req)) => {
                let res = client::start_request(conn, &req).await;
                conn.session.handle_backend(res, super::now_std());
            }
            Some(Action::Done) => return,
            Some(_) => {}
            None => match conn.session.poll_timeout() {
                Some(t) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
                    conn.session.handle_timeout(super::now_std());
                }
                None => return,
            },
        }
    }
}
