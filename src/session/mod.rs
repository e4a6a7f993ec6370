//! The sans-IO state machine of one client connection.
//!
//! A [`Session`] owns everything the WebSocket-over-HTTP protocol decides for one client:
//! the OPEN handshake, the queue of client events waiting for the backend, one request in
//! flight at a time, batching, keep-alives, `Set-Meta-*`, partial accept, retries, the close
//! and disconnect exchanges in both directions, client pings and idle detection, and GRIP
//! control messages. It performs no I/O and reads no clock: the transport feeds it inputs
//! with the current time and carries out the [`Action`]s it polls.
//!
//! ```text
//!            handle_backend(OPEN accepted)
//!  Opening ─────────────────────────────────▶ Open ──client CLOSE──▶ ClientClosing ─┐
//!     │  rejected / failure                    │  └──backend CLOSE──▶ BackendClosing ┤
//!     ▼                                        │ failure / DISCONNECT / client gone    ▼
//!  Finished ◀──────────────────────────────────┴──────────────────────────────── Finished
//! ```
//!
//! Call [`Session::handle_client`], [`Session::handle_backend`], [`Session::handle_publish`]
//! and [`Session::handle_timeout`] when something happens; after each call drain
//! [`Session::poll_action`] until it returns `None`, then sleep until
//! [`Session::poll_timeout`].

mod grip;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::protocol::control::{ControlMessage, MessageType};
use crate::protocol::events::{self, Event};
use crate::protocol::frame::{CloseFrame, Message};

pub use grip::GripState;

/// Close code sent to the client when the backend fails (RFC 6455 "internal error").
pub const CLOSE_BACKEND_FAILED: u16 = 1011;
/// Close code for a policy violation (rate limit).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code sent on shutdown.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Settings of one session, compiled from the route by the transport.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Content bytes per backend request (a single larger event still goes alone).
    pub max_batch_bytes: usize,
    /// Largest event content accepted in a backend response.
    pub max_event_bytes: usize,
    /// Floor for the backend's `Keep-Alive-Interval`.
    pub keep_alive_floor: Duration,
    /// Send a ping to a client that has been quiet this long.
    pub client_ping_interval: Option<Duration>,
    /// A client quiet for this long is dead: the backend gets `DISCONNECT`.
    pub client_idle_timeout: Option<Duration>,
    /// Relay client pings to the backend as `PING` events instead of answering them.
    pub relay_pings: bool,
    /// Retries of backend requests that never reached the backend.
    pub retry_attempts: u32,
    /// First retry delay; doubles per attempt, plus up to one second of jitter.
    pub retry_initial_backoff: Duration,
    /// Largest retry delay.
    pub retry_max_backoff: Duration,
    /// Set-Meta names the backend may bind (lowercase); `None` allows any.
    pub meta_allowed: Option<Arc<std::collections::HashSet<String>>>,
    /// How long to wait for the peer's answer to a close before ending the connection.
    pub close_timeout: Duration,
    /// Whether the route allows GRIP.
    pub grip_enabled: bool,
    /// Channels one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Client messages per second (token bucket, burst of one second); `None` = unlimited.
    pub messages_per_second: Option<u32>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_batch_bytes: 200_000,
            max_event_bytes: 1_000_000,
            keep_alive_floor: Duration::from_secs(1),
            client_ping_interval: Some(Duration::from_secs(30)),
            client_idle_timeout: Some(Duration::from_secs(90)),
            relay_pings: false,
            retry_attempts: 5,
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(30),
            meta_allowed: None,
            close_timeout: Duration::from_secs(5),
            grip_enabled: true,
            max_subscriptions: 20,
            messages_per_second: None,
        }
    }
}

/// What the client side reports to the session.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientInput {
    /// A complete message or control frame.
    Message(Message),
    /// The connection ended without a close handshake (reset, EOF, write failure).
    Gone,
    /// The client broke RFC 6455; the code is 1002, 1007 or 1009.
    ProtocolError {
        /// Close code to send.
        code: u16,
        /// Short reason for the close frame.
        reason: String,
    },
}

/// A complete backend response (status, headers, body read within the limit).
#[derive(Debug, Clone)]
pub struct BackendResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body (for rejected handshakes already capped by the transport).
    pub body: Bytes,
}

/// Why a backend request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The backend was never reached (connect refused or timed out, TLS failure): safe to retry.
    #[error("backend unreachable: {0}")]
    Connect(String),
    /// No complete response within the request timeout.
    #[error("backend timed out")]
    Timeout,
    /// The response body exceeded the limit.
    #[error("backend response over {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Any other failure after the request may have reached the backend.
    #[error("backend request failed: {0}")]
    Failed(String),
}

/// One request for the transport to send. The transport adds the replayed client headers,
/// `Connection-Id`, content type, signature and tracing headers.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendRequest {
    /// Encoded `application/websocket-events` body (empty for a keep-alive).
    pub body: Bytes,
    /// `Meta-*` headers bound so far.
    pub meta: Arc<[(HeaderName, HeaderValue)]>,
    /// Content bytes at the front of `body` that a previous response left unaccepted.
    pub replayed: usize,
    /// Number of events in the body.
    pub events: usize,
    /// Retry number (0 for the first try).
    pub attempt: u32,
    /// True when GRIP is active: the request carries `Sec-WebSocket-Extensions: grip`.
    pub grip: bool,
}

/// What the transport must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this request to the backend now (at most one is in flight).
    SendBackend(BackendRequest),
    /// Complete the handshake with `101`, adding these headers from the backend.
    Accept {
        /// Headers to copy into the `101` response.
        headers: HeaderMap,
    },
    /// Refuse the handshake with this response.
    Reject {
        /// Status to answer with.
        status: StatusCode,
        /// Headers to answer with.
        headers: HeaderMap,
        /// Body to answer with.
        body: Bytes,
    },
    /// Send this message to the client.
    SendClient(Message),
    /// Flush what was sent and close the client's TCP connection.
    CloseClient,
    /// Stop reading from the client (a close was received or sent).
    StopReading,
    /// Subscribe this connection to a channel.
    Subscribe(String),
    /// Unsubscribe this connection from a channel.
    Unsubscribe(String),
    /// The session is over; release everything.
    Done,
}

/// Counters a session keeps for metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages received from the client.
    pub client_messages: u64,
    /// Messages sent to the client.
    pub backend_messages: u64,
    /// Backend requests completed.
    pub requests: u64,
    /// Retries of backend requests.
    pub retries: u64,
    /// Keep-alive requests sent.
    pub keep_alives: u64,
    /// Backend messages dropped because they lacked the GRIP message prefix.
    pub unprefixed_dropped: u64,
    /// Control messages that failed to parse or were refused.
    pub control_errors: u64,
    /// Messages not sent because a close frame had already gone to the client.
    pub dropped_after_close: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// OPEN request not yet accepted.
    Opening,
    /// Relaying in both directions.
    Open,
    /// The client sent a close (or broke the protocol); CLOSE goes to the backend, whose answer goes back.
    ClientClosing,
    /// The backend (or the gateway) sent a close to the client; waiting for the client's answer.
    BackendClosing,
    /// The client is gone; a DISCONNECT goes to the backend.
    Disconnecting,
    /// Nothing more will happen.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Open,
    Normal,
    KeepAlive,
    Disconnect,
}

#[derive(Debug)]
struct InFlight {
    kind: RequestKind,
    events: Vec<Event>,
    request: BackendRequest,
    /// Set while waiting to retry.
    retry_at: Option<Instant>,
    carries_close: bool,
}

/// The per-connection state machine. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    state: State,
    actions: VecDeque<Action>,
    queue: VecDeque<Event>,
    queued_bytes: usize,
    /// Content bytes at the front of `queue` that were sent before and not accepted.
    replay_bytes: usize,
    inflight: Option<InFlight>,
    meta: Vec<(String, HeaderValue)>,
    meta_headers: Arc<[(HeaderName, HeaderValue)]>,
    keep_alive_interval: Option<Duration>,
    keep_alive_at: Option<Instant>,
    open_retry_at: Option<Instant>,
    refresh_queued: bool,
    client_writable: bool,
    client_gone: bool,
    close_deadline: Option<Instant>,
    /// Shutdown was asked while a backend exchange was under way: the 1001 waits until the
    /// answer is delivered, at most until this instant.
    shutdown_at: Option<Instant>,
    /// A close frame went to the client: nothing may follow it (RFC 6455 section 5.5.1).
    close_sent: bool,
    /// Changes whenever metadata (`Set-Meta-*`, GRIP `set-meta`) changes.
    info_version: u64,
    /// The client's close (code, reason), kept to echo it when the backend does not answer.
    client_close: Option<Option<CloseFrame>>,
    last_client_activity: Instant,
    ping_sent: bool,
    rate_tokens: f64,
    rate_at: Instant,
    rng: u64,
    grip: Option<GripState>,
    stats: Stats,
    /// Time of the input being handled.
    now: Instant,
}

impl Session {
    /// Starts a session: the first action is the OPEN request.
    ///
    /// `seed` feeds the retry jitter (any value; the connection id's bits are a good one).
    pub fn new(cfg: SessionConfig, now: Instant, seed: u64) -> Self {
        let rate_tokens = cfg.messages_per_second.map_or(0.0, f64::from);
        let mut s = Self {
            cfg,
            state: State::Opening,
            actions: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            replay_bytes: 0,
            inflight: None,
            meta: Vec::new(),
            meta_headers: Arc::from(Vec::new()),
            keep_alive_interval: None,
            keep_alive_at: None,
            open_retry_at: None,
            refresh_queued: false,
            client_writable: true,
            client_gone: false,
            close_deadline: None,
            shutdown_at: None,
            close_sent: false,
            info_version: 0,
            client_close: None,
            last_client_activity: now,
            ping_sent: false,
            rate_tokens,
            rate_at: now,
            rng: seed | 1,
            grip: None,
            stats: Stats::default(),
            now,
        };
        s.send_request(RequestKind::Open, Vec::new());
        s
    }

    /// Counters for metrics and the connection log line.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// GRIP state, once the backend enabled GRIP for this connection.
    pub fn grip(&self) -> Option<&GripState> {
        self.grip.as_ref()
    }

    /// Metadata bound with `Set-Meta-*`, as `(name, value)`.
    pub fn meta(&self) -> impl Iterator<Item = (&str, &HeaderValue)> {
        self.meta.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// True once the handshake was accepted and until the session finishes.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Opening | State::Finished)
    }

    /// True when the session has ended.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Whether the transport should read more from the client. False while the queue toward
    /// the backend is full (backpressure) and after a close.
    pub fn wants_client_input(&self) -> bool {
        matches!(self.state, State::Open | State::BackendClosing)
            && !self.client_gone
            && self.queued_bytes < self.cfg.max_batch_bytes.max(1)
    }

    /// The transport reports whether the client's outbound buffer has room. While it has
    /// none, no new request is started (the response could not be delivered).
    pub fn set_client_writable(&mut self, writable: bool, now: Instant) {
        self.now = now;
        self.client_writable = writable;
        if writable {
            self.maybe_send(now);
        }
    }

    /// The next action for the transport, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Finished {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.inflight.as_ref().and_then(|f| f.retry_at));
        consider(self.open_retry_at);
        consider(self.keep_alive_at);
        consider(self.close_deadline);
        consider(self.shutdown_at);
        if self.is_open() && !self.client_gone {
            if let Some(i) = self.cfg.client_ping_interval
                && !self.ping_sent
            {
                consider(Some(self.last_client_activity + i));
            }
            if let Some(i) = self.cfg.client_idle_timeout {
                consider(Some(self.last_client_activity + i));
            }
        }
        if let Some(g) = &self.grip {
            consider(g.next_deadline());
        }
        t
    }

    /// Handles something from the client.
    pub fn handle_client(&mut self, input: ClientInput, now: Instant) {
        self.now = now;
        if self.state == State::Finished {
            return;
        }
        self.last_client_activity = now;
        self.ping_sent = false;
        match input {
            ClientInput::Message(msg) => self.recv_client_message(msg, now),
            ClientInput::Gone => self.recv_client_gone(now),
            ClientInput::ProtocolError { code, reason } => {
                self.close_client_with(code, &reason);
                self.push_event(Event::Close(Some(CloseFrame { code, reason })));
                self.enter_client_closing(now);
            }
        }
        self.maybe_send(now);
    }

    fn recv_client_message(&mut self, msg: Message, now: Instant) {
        match self.state {
            State::Open => {}
            State::BackendClosing => {
                // Only the client's answering close matters now; data is ignored (RFC 6455 5.5.1).
                if let Message::Close(frame) = msg {
                    self.actions.push_back(Action::CloseClient);
                    self.close_deadline = None;
                    self.push_event(Event::Close(frame));
                    self.state = State::ClientClosing;
                    self.finish_if_idle();
                }
                return;
            }
            _ => return,
        }
        match msg {
            Message::Text(b) => self.recv_data(Event::Text(b), now),
            Message::Binary(b) => self.recv_data(Event::Binary(b), now),
            Message::Ping(b) => {
                if self.cfg.relay_pings {
                    self.push_event(Event::Ping(b));
                } else {
                    self.send_client(Message::Pong(b));
                }
            }
            Message::Pong(b) => {
                if self.cfg.relay_pings {
                    self.push_event(Event::Pong(b));
                }
            }
            Message::Close(frame) => {
                self.client_close = Some(frame.clone());
                self.push_event(Event::Close(frame));
                self.actions.push_back(Action::StopReading);
                self.enter_client_closing(now);
            }
        }
    }

    fn recv_data(&mut self, ev: Event, now: Instant) {
        self.stats.client_messages += 1;
        if let Some(rate) = self.cfg.messages_per_second {
            let rate = f64::from(rate);
            let elapsed = now.saturating_duration_since(self.rate_at).as_secs_f64();
            self.rate_at = now;
            self.rate_tokens = (self.rate_tokens + elapsed * rate).min(rate.max(1.0));
            if self.rate_tokens < 1.0 {
                self.close_client_with(CLOSE_POLICY, "message rate limit exceeded");
                self.push_event(Event::Close(Some(CloseFrame {
                    code: CLOSE_POLICY,
                    reason: "message rate limit exceeded".into(),
                })));
                self.enter_client_closing(now);
                return;
            }
            self.rate_tokens -= 1.0;
        }
        if self.grip.as_ref().is_some_and(|g| g.detached) {
            return;
        }
        self.push_event(ev);
    }

    fn recv_client_gone(&mut self, now: Instant) {
        self.client_gone = true;
        match self.state {
            State::Opening => {} // DISCONNECT follows once the OPEN completes.
            State::Open | State::BackendClosing => {
                self.state = State::Disconnecting;
                self.close_deadline = None;
            }
            State::ClientClosing => {
                // The close is already on its way; nobody is left to answer.
                self.actions.push_back(Action::CloseClient);
            }
            State::Disconnecting | State::Finished => {}
        }
        self.maybe_send(now);
        self.finish_if_idle();
    }

    fn enter_client_closing(&mut self, now: Instant) {
        self.state = State::ClientClosing;
        self.keep_alive_at = None;
        self.close_deadline = Some(now + self.cfg.close_timeout);
    }

    /// Handles a message published to this connection (GRIP channel or connection API).
    pub fn handle_publish(&mut self, msg: Message, now: Instant) {
        self.now = now;
        if !self.is_open() || self.client_gone || self.state == State::BackendClosing {
            return;
        }
        match msg {
            Message::Close(frame) => self.begin_backend_close(frame, now),
            other => self.send_client(other),
        }
    }

    /// A publish asked the gateway to send a request to the backend now (`refresh`).
    pub fn handle_refresh(&mut self, now: Instant) {
        self.now = now;
        if self.state == State::Open {
            self.refresh_queued = true;
            self.maybe_send(now);
        }
    }

    /// The gateway is shutting down: the client gets `1001`, the backend `CLOSE 1001`.
    pub fn handle_shutdown(&mut self, now: Instant) {
        self.now = now;
        match self.state {
            // Messages the backend is answering now are delivered before the 1001: stop
            // taking client input and close once the exchange is over (bounded).
            State::Open if self.shutdown_at.is_some() => {}
            State::Open if self.inflight.is_some() || !self.queue.is_empty() => {
                self.shutdown_at = Some(now + self.cfg.close_timeout);
                self.actions.push_back(Action::StopReading);
            }
            State::Open => self.shut_down(now),
            State::BackendClosing => {
                self.actions.push_back(Action::CloseClient);
                self.finish();
            }
            _ => {}
        }
    }

    /// Closes an open connection for shutdown: 1001 to the client, `CLOSE` to the backend.
    fn shut_down(&mut self, now: Instant) {
        self.shutdown_at = None;
        match self.state {
            State::Open => {
                self.close_client_with(CLOSE_GOING_AWAY, "server shutting down");
                self.push_event(Event::Close(Some(CloseFrame {
                    code: CLOSE_GOING_AWAY,
                    reason: "server shutting down".into(),
                })));
                self.actions.push_back(Action::StopReading);
                self.enter_client_closing(now);
                self.maybe_send(now);
            }
            State::BackendClosing => {
                self.actions.push_back(Action::CloseClient);
                self.finish();
            }
            _ => {}
        }
    }

    /// Handles the outcome of the request last emitted with [`Action::SendBackend`].
    pub fn handle_backend(&mut self, result: Result<BackendResponse, BackendError>, now: Instant) {
        self.now = now;
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        match result {
            Ok(resp) => {
                self.stats.requests += 1;
                self.recv_response(inflight, resp, now);
            }
            Err(err) => self.recv_failure(inflight, err, now),
        }
        self.maybe_send(now);
        if self.shutdown_at.is_some() && self.inflight.is_none() && self.queue.is_empty() {
            self.shut_down(now);
        }
        self.finish_if_idle();
    }

    fn recv_failure(&mut self, mut inflight: InFlight, err: BackendError, now: Instant) {
        if inflight.kind == RequestKind::Open {
            let status = match err {
                BackendError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            self.reject(status, format!("{err}\n"));
            return;
        }
        let retryable = matches!(err, BackendError::Connect(_));
        if retryable && inflight.request.attempt < self.cfg.retry_attempts {
            let delay = self.backoff(inflight.request.attempt);
            inflight.request.attempt += 1;
            inflight.retry_at = Some(now + delay);
            self.stats.retries += 1;
            self.inflight = Some(inflight);
            return;
        }
        if inflight.kind == RequestKind::Disconnect || self.client_gone {
            self.finish();
            return;
        }
        self.fail(now);
    }

    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = self
            .cfg
            .retry_initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cfg.retry_max_backoff);
        // xorshift64: deterministic per seed, good enough for jitter.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        base + Duration::from_millis(self.rng % 1000)
    }

    fn recv_response(&mut self, inflight: InFlight, resp: BackendResponse, now: Instant) {
        let accepted = is_accepted(resp.status, &resp.headers);
        if !accepted {
            if inflight.kind == RequestKind::Open {
                let headers = filter_reject_headers(&resp.headers);
                self.actions.push_back(Action::Reject {
                    status: resp.status,
                    headers,
                    body: resp.body,
                });
                self.finish();
            } else if self.client_gone || inflight.kind == RequestKind::Disconnect {
                self.finish();
            } else {
                self.fail(now);
            }
            return;
        }
        self.apply_keep_alive(&resp.headers);
        self.apply_set_meta(&resp.headers);
        let events = match events::decode_body(resp.body, self.cfg.max_event_bytes) {
            Ok(e) => e,
            Err(_) => {
                if inflight.kind == RequestKind::Open {
                    self.reject(StatusCode::BAD_GATEWAY, "malformed backend response\n".into());
                } else if self.client_gone || inflight.kind == RequestKind::Disconnect {
                    self.finish();
                } else {
                    self.fail(now);
                }
                return;
            }
        };
        match inflight.kind {
            RequestKind::Open => self.recv_open_response(resp.headers, events, now),
            RequestKind::Disconnect => self.finish(),
            RequestKind::Normal | RequestKind::KeepAlive => {
                self.requeue_unaccepted(&inflight, &resp.headers);
                let got_close = self.deliver(events, now);
                if inflight.carries_close && self.state == State::ClientClosing && !got_close {
                    // Without keep-alives the backend had this one chance to answer the close.
                    if self.keep_alive_interval.is_none() {
                        self.echo_client_close();
                    }
                }
            }
        }
    }

    fn recv_open_response(&mut self, headers: HeaderMap, events: Vec<Event>, now: Instant) {
        if events.is_empty() {
            if let Some(interval) = self.keep_alive_interval {
                self.open_retry_at = Some(now + interval);
                return;
            }
            self.reject(StatusCode::BAD_GATEWAY, "backend accepted without OPEN\n".into());
            return;
        }
        if events.first() != Some(&Event::Open) {
            self.reject(
                StatusCode::BAD_GATEWAY,
                "backend response did not start with OPEN\n".into(),
            );
            return;
        }
        if self.cfg.grip_enabled
            && let Some(ext) = headers.get(http::header::SEC_WEBSOCKET_EXTENSIONS)
            && let Ok(v) = ext.to_str()
            && let Some(prefix) = crate::protocol::control::parse_grip_extension(v)
        {
            self.grip = Some(GripState::new(prefix));
        }
        self.actions.push_back(Action::Accept {
            headers: filter_accept_headers(&headers),
        });
        self.state = State::Open;
        self.last_client_activity = now;
        if self.client_gone {
            // The client left while OPEN was in flight: tell the backend.
            self.state = State::Disconnecting;
            self.actions.push_back(Action::CloseClient);
            return;
        }
        self.deliver(events.into_iter().skip(1).collect(), now);
    }

    /// Sends backend events to the client. Returns true if a CLOSE was among them.
    fn deliver(&mut self, events: Vec<Event>, now: Instant) -> bool {
        for ev in events {
            match ev {
                Event::Open => {
                    // OPEN outside the handshake: the backend lost track of this connection.
                    self.fail(now);
                    return false;
                }
                Event::Text(b) => self.deliver_text(b, now),
                Event::Binary(b) => self.deliver_binary(b),
                Event::Ping(b) => self.send_client(Message::Ping(b)),
                Event::Pong(b) => self.send_client(Message::Pong(b)),
                Event::Close(frame) => {
                    self.recv_backend_close(frame, now);
                    return true;
                }
                Event::Disconnect => {
                    self.actions.push_back(Action::CloseClient);
                    self.finish();
                    return false;
                }
            }
            if self.state == State::Finished {
                return false;
            }
        }
        false
    }

    fn deliver_text(&mut self, b: Bytes, now: Instant) {
        let Some(grip) = self.grip.as_mut() else {
            self.send_client(Message::Text(b));
            return;
        };
        match grip.classify_text(&b) {
            grip::Classified::Message(m) => self.send_client(Message::Text(m)),
            grip::Classified::Unprefixed => self.stats.unprefixed_dropped += 1,
            grip::Classified::Control(Ok(c)) => self.handle_control(c, now),
            grip::Classified::Control(Err(_)) => self.stats.control_errors += 1,
        }
    }

    fn deliver_binary(&mut self, b: Bytes) {
        let Some(grip) = self.grip.as_mut() else {
            self.send_client(Message::Binary(b));
            return;
        };
        match grip.classify_binary(&b) {
            grip::Classified::Message(m) => self.send_client(Message::Binary(m)),
            _ => self.stats.unprefixed_dropped += 1,
        }
    }

    fn handle_control(&mut self, c: ControlMessage, now: Instant) {
        let max = self.cfg.max_subscriptions;
        let Some(grip) = self.grip.as_mut() else {
            return;
        };
        match c {
            ControlMessage::Subscribe { channel, filters } => match grip.subscribe(&channel, filters, max) {
                Ok(true) => self.actions.push_back(Action::Subscribe(channel)),
                Ok(false) => {}
                Err(()) => {
                    self.stats.control_errors += 1;
                    tracing::warn!(channel = %channel, limit = max, "subscription limit reached; subscribe ignored");
                }
            },
            ControlMessage::Unsubscribe { channel } => {
                if grip.unsubscribe(&channel) {
                    self.actions.push_back(Action::Unsubscribe(channel));
                }
            }
            ControlMessage::Detach => grip.detached = true,
            ControlMessage::SetMeta { name, value } => {
                grip.set_meta(name, value);
                self.info_version += 1;
            }
            ControlMessage::KeepAlive(m) => grip.set_keep_alive(m, now),
            ControlMessage::SendDelayed(m) => {
                if let Some(prev) = grip.send_delayed(m, now) {
                    self.send_grip_message(prev.kind, prev.content, now);
                }
            }
            ControlMessage::FlushDelayed => {
                if let Some(m) = grip.take_delayed() {
                    self.send_grip_message(m.kind, m.content, now);
                }
            }
            ControlMessage::Session { id } => grip.session_id = id,
        }
    }

    fn send_grip_message(&mut self, kind: MessageType, content: Bytes, _now: Instant) {
        let msg = match kind {
            MessageType::Text => Message::Text(content),
            MessageType::Binary => Message::Binary(content),
            MessageType::Ping => Message::Ping(content),
            MessageType::Pong => Message::Pong(content),
        };
        self.send_client(msg);
    }

    fn recv_backend_close(&mut self, frame: Option<CloseFrame>, now: Instant) {
        match self.state {
            State::ClientClosing => {
                // The backend answered the client's close: that answer goes to the client.
                self.send_client(Message::Close(frame));
                self.actions.push_back(Action::CloseClient);
                self.close_deadline = None;
                self.queue.clear();
                self.queued_bytes = 0;
                self.finish();
            }
            State::Open => self.begin_backend_close(frame, now),
            _ => {}
        }
    }

    fn begin_backend_close(&mut self, frame: Option<CloseFrame>, now: Instant) {
        self.send_client(Message::Close(frame));
        self.state = State::BackendClosing;
        self.keep_alive_at = None;
        self.close_deadline = Some(now + self.cfg.close_timeout);
        // Client data queued but not yet sent is of no use to a backend that closed.
        self.queue.clear();
        self.queued_bytes = 0;
        self.replay_bytes = 0;
    }

    fn echo_client_close(&mut self) {
        let frame = self.client_close.take().flatten();
        self.send_client(Message::Close(frame));
        self.actions.push_back(Action::CloseClient);
        self.finish();
    }

    /// Frees the queues' spare capacity when they are empty: an idle connection keeps no
    /// buffers (call before the connection waits).
    pub fn release_idle_memory(&mut self) {
        if self.actions.is_empty() && self.actions.capacity() > 0 {
            self.actions = VecDeque::new();
        }
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
    }

    /// A number that changes whenever the connection's metadata changes (`Set-Meta-*`
    /// headers, GRIP `set-meta`); subscriptions are reported by actions.
    pub fn info_version(&self) -> u64 {
        self.info_version
    }

    /// Handles timers; call at or after [`Session::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.state == State::Finished {
            return;
        }
        if let Some(f) = self.inflight.as_mut()
            && f.retry_at.is_some_and(|t| t <= now)
        {
            f.retry_at = None;
            let req = f.request.clone();
            self.actions.push_back(Action::SendBackend(req));
        }
        if self.open_retry_at.is_some_and(|t| t <= now) {
            self.open_retry_at = None;
            self.send_request(RequestKind::Open, Vec::new());
        }
        if self.shutdown_at.is_some_and(|t| t <= now) {
            // The backend did not finish in time: close anyway.
            self.shut_down(now);
        }
        if self.close_deadline.is_some_and(|t| t <= now) {
            self.close_deadline = None;
            match self.state {
                State::ClientClosing => {
                    if self.inflight.is_none() && self.queue.is_empty() {
                        self.echo_client_close();
                    } else {
                        // The backend is slow to take the close; answer the client anyway and
                        // let the close request finish on its own.
                        let frame = self.client_close.take().flatten();
                        self.send_client(Message::Close(frame));
                        self.actions.push_back(Action::CloseClient);
                        self.client_gone = true;
                    }
                }
                State::BackendClosing => {
                    self.actions.push_back(Action::CloseClient);
                    self.finish();
                }
                _ => {}
            }
        }
        if self.is_open() && !self.client_gone {
            if let Some(idle) = self.cfg.client_idle_timeout
                && now >= self.last_client_activity + idle
            {
                self.actions.push_back(Action::CloseClient);
                self.recv_client_gone(now);
                return;
            }
            if let Some(i) = self.cfg.client_ping_interval
                && !self.ping_sent
                && now >= self.last_client_activity + i
            {
                self.ping_sent = true;
                self.send_client(Message::Ping(Bytes::new()));
            }
        }
        if let Some(g) = self.grip.as_mut() {
            let due = g.poll_due(now);
            for m in due {
                self.send_grip_message(m.kind, m.content, now);
            }
        }
        if self.keep_alive_at.is_some_and(|t| t <= now) {
            self.keep_alive_at = None;
            if self.inflight.is_none() && self.queue.is_empty() && self.state == State::Open {
                self.stats.keep_alives += 1;
                self.send_request(RequestKind::KeepAlive, Vec::new());
            }
        }
        self.maybe_send(now);
        self.finish_if_idle();
    }

    // ---- helpers -------------------------------------------------------------------------

    fn send_client(&mut self, msg: Message) {
        if self.close_sent {
            // After a close frame nothing more may reach the client.
            self.stats.dropped_after_close += 1;
            return;
        }
        if matches!(msg, Message::Close(_)) {
            self.close_sent = true;
        }
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            self.stats.backend_messages += 1;
        }
        if let Some(g) = self.grip.as_mut() {
            g.note_sent(self.now);
        }
        self.actions.push_back(Action::SendClient(msg));
    }

    fn close_client_with(&mut self, code: u16, reason: &str) {
        self.send_client(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned(),
        })));
        self.actions.push_back(Action::StopReading);
        self.actions.push_back(Action::CloseClient);
    }

    /// The backend failed after the handshake: the client gets 1011 and the backend nothing more.
    fn fail(&mut self, _now: Instant) {
        self.close_client_with(CLOSE_BACKEND_FAILED, "backend error");
        self.finish();
    }

    fn reject(&mut self, status: StatusCode, body: String) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        self.actions.push_back(Action::Reject {
            status,
            headers,
            body: Bytes::from(body),
        });
        self.finish();
    }

    fn finish(&mut self) {
        if self.state != State::Finished {
            self.state = State::Finished;
            self.inflight = None;
            self.queue.clear();
            self.queued_bytes = 0;
            self.keep_alive_at = None;
            self.open_retry_at = None;
            self.close_deadline = None;
            self.actions.push_back(Action::Done);
        }
    }

    /// Ends the session once nothing is left to send.
    fn finish_if_idle(&mut self) {
        if self.state == State::ClientClosing && self.client_gone && self.inflight.is_none() && self.queue.is_empty() {
            self.finish();
        }
    }

    fn push_event(&mut self, ev: Event) {
        self.queued_bytes += ev.content_len();
        self.queue.push_back(ev);
    }

    fn apply_keep_alive(&mut self, headers: &HeaderMap) {
        let Some(v) = headers.get(&KEEP_ALIVE_INTERVAL) else {
            return;
        };
        let secs = v.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok());
        self.keep_alive_interval = match secs {
            Some(n) if n > 0 => {
                let d = Duration::from_secs(u64::try_from(n).unwrap_or(u64::MAX).min(86_400 * 365));
                Some(d.max(self.cfg.keep_alive_floor))
            }
            _ => None,
        };
    }

    fn apply_set_meta(&mut self, headers: &HeaderMap) {
        let mut changed = false;
        for (name, value) in headers {
            let n = name.as_str();
            let Some(meta) = n.strip_prefix("set-meta-") else {
                continue;
            };
            if meta.is_empty() {
                continue;
            }
            if let Some(allowed) = &self.cfg.meta_allowed
                && !allowed.contains(meta)
            {
                tracing::debug!(name = meta, "Set-Meta name not allowed by the route; ignored");
                continue;
            }
            self.meta.retain(|(k, _)| k != meta);
            if !value.is_empty() {
                // A copy: the response's header values share the HTTP client's read buffer.
                let owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
                self.meta.push((meta.to_owned(), owned));
            }
            changed = true;
        }
        if changed {
            self.info_version += 1;
            self.meta_headers = self
                .meta
                .iter()
                .filter_map(|(k, v)| {
                    HeaderName::from_bytes(format!("meta-{k}").as_bytes())
                        .ok()
                        .map(|n| (n, v.clone()))
                })
                .collect::<Vec<_>>()
                .into();
        }
    }

    /// Puts content the backend did not accept (`Content-Bytes-Accepted`) back at the queue's front.
    fn requeue_unaccepted(&mut self, inflight: &InFlight, headers: &HeaderMap) {
        let Some(accepted) = headers
            .get(&CONTENT_BYTES_ACCEPTED)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<usize>().ok())
        else {
            return;
        };
        let mut skip = accepted;
        let mut back: Vec<Event> = Vec::new();
        for ev in &inflight.events {
            let len = ev.content_len();
            let is_message = matches!(ev, Event::Text(_) | Event::Binary(_) | Event::Ping(_) | Event::Pong(_));
            if !is_message {
                if skip == 0 || !back.is_empty() {
                    back.push(ev.clone());
                }
                continue;
            }
            if skip >= len && back.is_empty() {
                skip -= len;
                continue;
            }
            let rest = |b: &Bytes| b.slice(skip.min(b.len())..);
            back.push(match ev {
                Event::Text(b) => Event::Text(rest(b)),
                Event::Binary(b) => Event::Binary(rest(b)),
                Event::Ping(b) => Event::Ping(rest(b)),
                Event::Pong(b) => Event::Pong(rest(b)),
                other => other.clone(),
            });
            skip = 0;
        }
        if back.is_empty() {
            return;
        }
        let replay: usize = back.iter().map(Event::content_len).sum();
        for ev in back.into_iter().rev() {
            self.queued_bytes += ev.content_len();
            self.queue.push_front(ev);
        }
        self.replay_bytes += replay;
    }

    /// Starts the next request if one is due and none is in flight.
    fn maybe_send(&mut self, now: Instant) {
        if self.inflight.is_some() {
            return;
        }
        match self.state {
            State::Disconnecting => {
                let events: Vec<Event> = self.queue.drain(..).chain([Event::Disconnect]).collect();
                self.queued_bytes = 0;
                self.send_request(RequestKind::Disconnect, events);
            }
            State::Open | State::ClientClosing | State::BackendClosing => {
                let must = self.state == State::ClientClosing || self.state == State::BackendClosing;
                if self.queue.is_empty() && !self.refresh_queued {
                    self.schedule_keep_alive(now);
                    return;
                }
                if !self.client_writable && !must {
                    return;
                }
                self.refresh_queued = false;
                let mut events = Vec::new();
                let mut bytes = 0usize;
                while let Some(ev) = self.queue.front() {
                    let len = ev.content_len();
                    if !events.is_empty() && bytes + len > self.cfg.max_batch_bytes {
                        break;
                    }
                    bytes += len;
                    self.queued_bytes -= len;
                    if let Some(ev) = self.queue.pop_front() {
                        events.push(ev);
                    }
                }
                self.send_request(RequestKind::Normal, events);
            }
            State::Opening | State::Finished => {}
        }
    }

    fn schedule_keep_alive(&mut self, now: Instant) {
        if self.state == State::Open
            && self.keep_alive_at.is_none()
            && let Some(i) = self.keep_alive_interval
        {
            self.keep_alive_at = Some(now + i);
        }
    }

    fn send_request(&mut self, kind: RequestKind, events: Vec<Event>) {
        let events = if kind == RequestKind::Open {
            let mut with_open = Vec::with_capacity(events.len() + 1);
            with_open.push(Event::Open);
            with_open.extend(events);
            with_open
        } else {
            events
        };
        let len: usize = events.iter().map(Event::encoded_len).sum();
        let mut body = BytesMut::with_capacity(len);
        let mut content = 0usize;
        let mut carries_close = false;
        for ev in &events {
            ev.encode_into(&mut body);
            content += ev.content_len();
            carries_close |= matches!(ev, Event::Close(_));
        }
        let replayed = self.replay_bytes.min(content);
        self.replay_bytes -= replayed;
        self.keep_alive_at = None;
        let request = BackendRequest {
            body: body.freeze(),
            meta: self.meta_headers.clone(),
            replayed,
            events: events.len(),
            attempt: 0,
            grip: self.cfg.grip_enabled,
        };
        self.actions.push_back(Action::SendBackend(request.clone()));
        self.inflight = Some(InFlight {
            kind,
            events,
            request,
            retry_at: None,
            carries_close,
        });
    }
}

/// True for a response the protocol accepts: 200 with media type `application/websocket-events`
/// (parameters tolerated).
pub fn is_accepted(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::OK
        && headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
            // The media type, before any parameter; compared as bytes (it is ASCII).
            let b = v.as_bytes();
            let media = b.iter().position(|&c| c == b';').map_or(b, |i| &b[..i]);
            media.trim_ascii().eq_ignore_ascii_case(b"application/websocket-events")
        })
}

/// `Keep-Alive-Interval` (a name the `http` crate has no constant for).
static KEEP_ALIVE_INTERVAL: HeaderName = HeaderName::from_static("keep-alive-interval");
/// `Content-Bytes-Accepted`.
static CONTENT_BYTES_ACCEPTED: HeaderName = HeaderName::from_static("content-bytes-accepted");

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "upgrade" | "transfer-encoding" | "te" | "trailer"
    ) || name.starts_with("proxy-")
}

/// Headers of the backend's OPEN response that reach the client's `101`.
pub fn filter_accept_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if is_hop_by_hop(n)
            || matches!(
                n,
                "content-type"
                    | "content-length"
                    | "keep-alive-interval"
                    | "sec-websocket-extensions"
                    | "sec-websocket-accept"
                    | "date"
                    | "content-bytes-accepted"
            )
            || n.starts_with("set-meta-")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Headers of a rejecting backend response that reach the client.
pub fn filter_reject_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if is_hop_by_hop(n) || n == "content-length" || n.starts_with("set-meta-") || n == "keep-alive-interval" {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests;
