//! The client side: drives one upgraded WebSocket connection, feeding a [`Session`] with
//! frames read from the socket, backend responses, deliveries and timers, and carrying out
//! its actions.
//!
//! The socket is read with `readable()` + `try_read_buf`, so an idle connection holds no read
//! buffer; the write buffer exists only while output is pending. Both are fields of
//! [`Driver`], never future locals, so every `select!` arm is cancel-safe.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use tokio::time::{Instant as TokioInstant, Sleep};
use tokio_util::sync::CancellationToken;

use super::backend::{self, RequestTemplate};
use super::io::{ClientIo, IoEvent};
use crate::grip::{ConnHandle, ConnInfo, Delivery, Registry};
use crate::metrics::Direction;
use crate::protocol::frame::{self, CloseFrame, FrameDecoder, Message};
use crate::session::{Action, BackendError, BackendResponse, ClientInput, Session};

/// Close code for a client that does not keep up with deliveries ("try again later").
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

/// Time for the whole backend exchange of one request.
#[derive(Debug, Clone)]
pub struct BackendLimits {
    /// Request timeout.
    pub timeout: Duration,
    /// Largest accepted response body.
    pub max_body: usize,
    /// Largest body passed through on a rejection.
    pub max_reject_body: usize,
}

/// Everything a connection needs besides its socket.
pub struct Connection {
    /// The protocol state machine (already past the handshake or still in it).
    pub session: Session,
    /// Request template for the backend.
    pub template: RequestTemplate,
    /// Backend clients (in-task HTTP/1.1 for `http://`, pooled hyper for `https://`).
    pub pool: backend::BackendPool,
    /// Backend limits.
    pub limits: BackendLimits,
    /// Registry entry (mailbox, connection API).
    pub handle: Arc<ConnHandle>,
    /// The registry, for subscriptions.
    pub registry: Arc<Registry>,
    /// Fires when the gateway drains.
    pub shutdown: CancellationToken,
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Bytes that may wait in the write buffer before backpressure / slow-consumer close.
    pub outbound_limit: usize,
    /// Called when a channel gains its first or loses its last local subscriber.
    pub on_channel: Option<crate::grip::nats::ChannelHook>,
    /// On shutdown, the 1001 close is delayed by a per-connection share of this window.
    pub close_pacing: Duration,
    /// The live route table: when its version changes, the connection moves to the new
    /// version of its route (by name) before its next backend request.
    pub table: Option<Arc<arc_swap::ArcSwap<crate::config::RouteTable>>>,
    /// Version of the table the template's route came from.
    pub table_version: u64,
    /// Counters of the connection's route (messages, bytes, backend requests).
    pub metrics: Arc<crate::metrics::RouteMetrics>,
    /// Parent of the `backend.request` spans: the handshake span during the OPEN exchange,
    /// the connection span afterwards (empty when tracing is off).
    pub span: crate::telemetry::SpanParent,
}

impl Connection {
    /// Picks up an edited route (headers, backend, signing key) without dropping the
    /// connection. A deleted route leaves the connection on the version it has.
    pub fn refresh_route(&mut self) {
        let Some(table) = &self.table else { return };
        let t = table.load();
        if t.version() == self.table_version {
            return;
        }
        self.table_version = t.version();
        if let Some(route) = t.get(&self.template.route.name)
            && !Arc::ptr_eq(&route, &self.template.route)
            && self.template.rebind(route)
        {
            tracing::debug!(conn_id = %self.handle.id, version = self.table_version, "connection moved to the new route version");
        }
    }
}

/// How a connection ended, for the log line and metrics.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages from the client.
    pub client_messages: u64,
    /// Messages to the client.
    pub backend_messages: u64,
    /// Close code sent to the client, if any.
    pub close_code: Option<u16>,
    /// Slow-consumer close.
    pub slow_consumer: bool,
}

fn now() -> std::time::Instant {
    TokioInstant::now().into_std()
}

/// Sends one session request to the backend.
pub fn start_request(
    conn: &Connection,
    req: &crate::session::BackendRequest,
) -> BoxFuture<'static, Result<BackendResponse, BackendError>> {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    conn.metrics.record_request_sent(req);
    let span = crate::telemetry::RequestSpan::start(&conn.span, req);
    let limits = conn.limits.clone();
    let metrics = conn.metrics.clone();
    let route = &conn.template.route;
    if conn.template.uri.scheme() == Some(&http::uri::Scheme::HTTP) {
        // The in-task client: the exchange is polled by this connection's task, no hop.
        let mut head = conn.template.http1_head(req, now_unix, &span);
        // A small body goes behind the head (no reference to it is kept).
        let body = super::h1::coalesce(&mut head, &req.body);
        let pool = conn.pool.h1.clone();
        let uri = conn.template.uri.clone();
        let ex = super::h1::ExchangeLimits {
            connect: route.timeouts.connect,
            max_body: limits.max_body,
            max_reject_body: limits.max_reject_body,
        };
        return Box::pin(async move {
            let started = TokioInstant::now();
            let authority = uri.authority().map_or("", |a| a.as_str());
            let res = match tokio::time::timeout(limits.timeout, pool.exchange(authority, head, body, ex)).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::Timeout),
            };
            let trace_id = span.finish(&res);
            metrics.record_backend(started.elapsed(), &res, trace_id);
            res
        });
    }
    let mut request = conn.template.build(req, now_unix);
    span.inject(request.headers_mut());
    let client = conn.pool.client_for(route);
    Box::pin(async move {
        let started = TokioInstant::now();
        let res = backend::send_events(
            &client,
            request,
            limits.timeout,
            limits.max_body,
            limits.max_reject_body,
        )
        .await;
        let trace_id = span.finish(&res);
        metrics.record_backend(started.elapsed(), &res, trace_id);
        res
    })
}

fn pacing_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Driver {
    conn: Connection,
    io: ClientIo,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: FrameDecoder,
    reading: bool,
    close_after_flush: bool,
    done: bool,
    inflight: Option<BoxFuture<'static, Result<BackendResponse, BackendError>>>,
    sleep: Option<Pin<Box<Sleep>>>,
    shutdown_seen: bool,
    shutdown_at: Option<Pin<Box<Sleep>>>,
    summary: Summary,
    deliveries: Vec<Delivery>,
    /// [`Session::info_version`] last published to the registry.
    synced_info: u64,
}

/// Runs an upgraded connection to its end. `leftover` holds bytes the HTTP layer read past
/// the handshake.
///
/// The driver is built here, on the heap, before the future exists: the returned future
/// holds one pointer while the connection runs, and the memory of an idle connection is
/// the driver's fields, not an async state machine's.
pub fn run(io: ClientIo, leftover: Bytes, conn: Connection) -> impl Future<Output = Summary> + Send {
    let decoder = FrameDecoder::new(conn.max_message_bytes);
    // `leftover` is a slice of hyper's read buffer: copy what it holds and release it now, or
    // the whole buffer would stay alive as long as the connection (a parameter of an async fn
    // lives until the function returns).
    let rbuf = if leftover.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&leftover[..])
    };
    drop(leftover);
    // On the heap: the connection task's future then holds a pointer, not the driver.
    let mut d = Box::new(Driver {
        conn,
        io,
        rbuf,
        wbuf: BytesMut::new(),
        decoder,
        reading: true,
        close_after_flush: false,
        done: false,
        inflight: None,
        sleep: None,
        shutdown_seen: false,
        shutdown_at: None,
        summary: Summary::default(),
        deliveries: Vec::new(),
        // Not a version the session has: the first pass publishes.
        synced_info: u64::MAX,
    });
    async move {
        if !d.rbuf.is_empty() {
            d.decode_input();
        }
        std::future::poll_fn(|cx| d.poll_run(cx)).await;
        // Boxed: only a closing connection carries the larger closing state.
        Box::pin(d.finish()).await
    }
}

impl Driver {
    /// One pass over everything that can wake the connection: the socket, the backend
    /// exchange, the session's timer, deliveries and shutdown. Every source is polled each
    /// pass (so none starves another) and passes repeat while any made progress. `Ready`
    /// once the connection is over.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            self.apply_actions();
            self.try_flush();
            // Flushing may have let the session start a request.
            self.apply_actions();
            if self.done {
                return Poll::Ready(());
            }
            self.update_sleep();
            let want_read = self.reading && !self.close_after_flush && self.conn.session.wants_client_input();
            let want_write = !self.wbuf.is_empty() || self.io.wants_write();
            let open = self.conn.session.is_open();
            let mut progressed = false;
            let mut waiting = false;
            if want_read || want_write {
                waiting = true;
                if let Poll::Ready(ev) = self.io.poll_io(cx, want_read, want_write, &mut self.rbuf) {
                    progressed = true;
                    match ev {
                        IoEvent::Read(r) => self.read_done(r),
                        IoEvent::Writable(Err(_)) => self.client_gone(),
                        IoEvent::Writable(Ok(())) => self.try_flush(),
                    }
                }
            }
            if let Some(f) = self.inflight.as_mut() {
                waiting = true;
                if let Poll::Ready(res) = f.as_mut().poll(cx) {
                    progressed = true;
                    self.inflight = None;
                    self.conn.session.handle_backend(res, now());
                }
            }
            if let Some(s) = self.sleep.as_mut() {
                waiting = true;
                if s.as_mut().poll(cx).is_ready() {
                    progressed = true;
                    self.sleep = None;
                    self.conn.session.handle_timeout(now());
                }
            }
            // The mailbox also carries the wake-up for shutdown (`Registry::wake_all`).
            if open || !self.shutdown_seen {
                waiting = true;
                if self.conn.handle.mailbox.poll_ready(cx).is_ready() {
                    progressed = true;
                    if open {
                        self.take_deliveries();
                    }
                }
            }
            if !self.shutdown_seen && self.conn.shutdown.is_cancelled() {
                progressed = true;
                self.shutdown_seen = true;
                // Spread closes over the pacing window so clients don't reconnect at once.
                let window = self.conn.close_pacing.as_millis() as u64;
                let jitter = if window == 0 {
                    0
                } else {
                    pacing_hash(&self.conn.handle.id) % window
                };
                self.shutdown_at = Some(Box::pin(tokio::time::sleep(Duration::from_millis(jitter))));
            }
            if let Some(s) = self.shutdown_at.as_mut() {
                waiting = true;
                if s.as_mut().poll(cx).is_ready() {
                    progressed = true;
                    self.shutdown_at = None;
                    self.conn.session.handle_shutdown(now());
                }
            }
            if progressed {
                continue;
            }
            if waiting {
                // About to sleep: an idle connection keeps no spare capacity.
                if self.inflight.is_none() {
                    self.conn.session.release_idle_memory();
                }
                if self.deliveries.is_empty() && self.deliveries.capacity() > 0 {
                    self.deliveries = Vec::new();
                }
            } else {
                // Nothing can make progress (no socket interest, request, timer or
                // delivery): the connection is over.
                tracing::debug!(conn_id = %self.conn.handle.id, "connection idle with nothing pending; ending");
                return Poll::Ready(());
            }
            return Poll::Pending;
        }
    }

    fn client_gone(&mut self) {
        self.reading = false;
        self.wbuf = BytesMut::new();
        self.conn.session.handle_client(ClientInput::Gone, now());
    }

    fn read_done(&mut self, r: std::io::Result<usize>) {
        match r {
            Ok(0) => {
                self.client_gone();
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => {
                self.client_gone();
                return;
            }
        }
        self.decode_input();
    }

    fn decode_input(&mut self) {
        loop {
            if !self.conn.session.wants_client_input() && !self.reading {
                break;
            }
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(msg)) => {
                    if let Message::Text(b) | Message::Binary(b) = &msg {
                        self.conn.metrics.record_message(Direction::ClientToBackend, b.len());
                    }
                    if matches!(msg, Message::Close(_)) {
                        self.reading = false;
                    }
                    self.conn.session.handle_client(ClientInput::Message(msg), now());
                    self.apply_actions();
                    if !self.reading {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.reading = false;
                    let code = e.close_code();
                    let mut reason = e.to_string();
                    reason.truncate(120);
                    self.conn
                        .session
                        .handle_client(ClientInput::ProtocolError { code, reason }, now());
                    break;
                }
            }
        }
        if self.rbuf.is_empty() {
            // Idle connections keep no read buffer.
            self.rbuf = BytesMut::new();
        }
    }

    fn take_deliveries(&mut self) {
        let overflowed = self.conn.handle.mailbox.drain(&mut self.deliveries);
        let over_limit = self.wbuf.len() > self.conn.outbound_limit;
        if overflowed || over_limit {
            self.deliveries.clear();
            if !self.summary.slow_consumer {
                self.summary.slow_consumer = true;
                if over_limit && !overflowed {
                    self.conn
                        .registry
                        .stats
                        .slow_consumer_drops
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tracing::info!(conn_id = %self.conn.handle.id, "slow consumer: closing with 1013");
                self.conn.session.handle_publish(
                    Message::Close(Some(CloseFrame {
                        code: CLOSE_SLOW_CONSUMER,
                        reason: "slow consumer".into(),
                    })),
                    now(),
                );
            }
            return;
        }
        let mut ds = std::mem::take(&mut self.deliveries);
        for d in ds.drain(..) {
            match d {
                Delivery::Message(m) => self.conn.session.handle_publish(m, now()),
                Delivery::Refresh => self.conn.session.handle_refresh(now()),
            }
        }
        self.deliveries = ds;
        if self.deliveries.capacity() > 256 {
            self.deliveries = Vec::new();
        }
    }

    fn apply_actions(&mut self) {
        let mut info_changed = false;
        while let Some(a) = self.conn.session.poll_action() {
            match a {
                Action::SendBackend(req) => {
                    self.conn.refresh_route();
                    self.inflight = Some(start_request(&self.conn, &req));
                }
                Action::SendClient(msg) => {
                    if let Message::Text(b) | Message::Binary(b) = &msg {
                        self.conn.metrics.record_message(Direction::BackendToClient, b.len());
                    }
                    if let Message::Close(Some(f)) = &msg {
                        self.summary.close_code = Some(f.code);
                    } else if let Message::Close(None) = &msg {
                        self.summary.close_code = Some(1005);
                    }
                    frame::encode_message(&msg, &mut self.wbuf);
                    if self.wbuf.len() > self.conn.outbound_limit {
                        self.conn.session.set_client_writable(false, now());
                    }
                }
                Action::CloseClient => {
                    self.close_after_flush = true;
                    self.reading = false;
                }
                Action::StopReading => self.reading = false,
                Action::Subscribe(channel) => {
                    let filters = self
                        .conn
                        .session
                        .grip()
                        .and_then(|g| g.subscriptions().iter().find(|s| s.channel == channel))
                        .map(|s| s.filters.clone())
                        .unwrap_or_default();
                    if self.conn.registry.subscribe(&self.conn.handle, &channel, &filters)
                        && let Some(cb) = &self.conn.on_channel
                    {
                        cb(&channel, true);
                    }
                    info_changed = true;
                }
                Action::Unsubscribe(channel) => {
                    if self.conn.registry.unsubscribe(&self.conn.handle.id, &channel)
                        && let Some(cb) = &self.conn.on_channel
                    {
                        cb(&channel, false);
                    }
                    info_changed = true;
                }
                Action::Accept { .. } | Action::Reject { .. } => {}
                Action::Done => self.done = true,
            }
        }
        let version = self.conn.session.info_version();
        if info_changed || version != self.synced_info {
            self.synced_info = version;
            self.sync_info();
        }
    }

    /// Publishes meta and subscriptions to the registry for the connection API and filters.
    fn sync_info(&self) {
        let s = &self.conn.session;
        let info = ConnInfo {
            meta: s
                .meta()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.to_owned(), v.to_owned())))
                .collect(),
            sub_meta: s.grip().map(|g| g.meta.clone()).unwrap_or_default(),
            channels: s
                .grip()
                .map(|g| g.subscriptions().iter().map(|x| x.channel.clone()).collect())
                .unwrap_or_default(),
        };
        if self.conn.handle.info() != info {
            self.conn.handle.set_info(info);
        }
    }

    fn try_flush(&mut self) {
        while !self.wbuf.is_empty() {
            match self.io.try_write(&self.wbuf) {
                Ok(0) => {
                    self.client_gone();
                    return;
                }
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.client_gone();
                    return;
                }
            }
        }
        // Nothing pending: free the buffer and let the backend go on.
        self.wbuf = BytesMut::new();
        self.conn.session.set_client_writable(true, now());
    }

    fn update_sleep(&mut self) {
        match self.conn.session.poll_timeout() {
            Some(t) => {
                let t = TokioInstant::from_std(t);
                match self.sleep.as_mut() {
                    Some(s) if s.deadline() == t => {}
                    Some(s) => s.as_mut().reset(t),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(t))),
                }
            }
            None => self.sleep = None,
        }
    }

    async fn finish(&mut self) -> Summary {
        self.apply_actions();
        // Give the client a bounded time to take what is left (close frame included).
        if !self.wbuf.is_empty() {
            // Bounded by the route's close timeout, like the close handshake itself.
            let deadline = tokio::time::sleep(self.conn.template.route.timeouts.close);
            tokio::pin!(deadline);
            loop {
                self.try_flush();
                if self.wbuf.is_empty() {
                    break;
                }
                tokio::select! {
                    r = self.io.writable() => if r.is_err() { break },
                    () = &mut deadline => break,
                }
            }
        }
        let _ = self.io.shutdown().await;
        let emptied = self.conn.registry.unregister(&self.conn.handle);
        if let Some(cb) = &self.conn.on_channel {
            for c in emptied {
                cb(&c, false);
            }
        }
        let st = self.conn.session.stats();
        self.summary.client_messages = st.client_messages;
        self.summary.backend_messages = st.backend_messages;
        std::mem::take(&mut self.summary)
    }
}
