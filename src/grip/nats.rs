//! The NATS bridge: carries publishes and connection-API calls between gateway replicas
//! (DESIGN.md, "Scale out"; PROTOCOL.md sections 6 and 7).
//!
//! # Subjects
//!
//! All subjects start with a configurable prefix ([`NatsConfig::subject_prefix`], `wsgate` by
//! default), so several gateway deployments can share one NATS cluster.
//!
//! | Subject | Carries |
//! |---|---|
//! | `wsgate.ch.<token>` | publishes to one channel |
//! | `wsgate.chx.<sha256-hex>` | publishes to a channel whose name is longer than 512 bytes |
//! | `wsgate.conn.<token>` | connection-API requests for one connection id (request/reply) |
//! | `wsgate.sync.<replica-id>` | round trips of [`NatsBridge::sync`] (nobody subscribes; the server answers "no responders") |
//!
//! Channel names may contain bytes a NATS subject cannot (`.`, `*`, `>`, whitespace), so a
//! subject carries `<token>` = the name in unpadded base64url (RFC 4648 section 5: letters,
//! digits, `-` and `_`, all valid in a subject token). Names over [`MAX_PLAIN_CHANNEL_BYTES`] use the SHA-256 of
//! the name instead, which keeps subjects short; the channel name inside the payload is checked
//! on receipt, so neither a hash collision nor a foreign publisher can misdeliver.
//!
//! # Wire format
//!
//! A channel message's payload is a publish body with one item, exactly what `POST /publish`
//! accepts (`{"items":[item]}`, item in the JS shape of [`Item::to_json`]), so any NATS client can
//! publish into the gateway. The header `Wsgate-Origin` names the replica that published it.
//! Items whose `channel` differs from the subscription's channel are dropped and counted.
//!
//! Connection-API requests and replies are small JSON objects ([`ConnRequest`], [`ConnReply`]).
//! Every replica subscribes to `wsgate.conn.*` (no queue group); only the replica that holds the
//! connection answers, the requester takes the first answer, and no answer within
//! [`NatsConfig::request_timeout`] means "not found".
//!
//! # Duplicates
//!
//! The NATS connection is opened with `no_echo`, so the server never hands a replica its own
//! publishes; as a second guard, messages whose `Wsgate-Origin` is this replica are skipped
//! (and counted). A publish is therefore delivered once locally (by [`Hub`](super::Hub)) and once
//! on every other replica that has subscribers.
//!
//! # Subscriptions follow local subscribers
//!
//! The connection drivers call [`NatsBridge::channel_hook`] when a channel gains its first
//! (`true`) or loses its last (`false`) local subscriber. The hook never blocks: it adjusts a
//! per-channel counter under a short lock and wakes the subscription manager task. Because the
//! registry reports every 0→1 and 1→0 transition exactly once, the counter is the number of local
//! subscribers' "presence" (0 or 1) once all callbacks have run, even when two connection tasks
//! race and their callbacks arrive out of order. The manager subscribes when the counter is
//! positive and unsubscribes otherwise; a quick subscribe/unsubscribe pair collapses into
//! nothing. async-nats re-sends every live subscription after a reconnect.
//!
//! # When NATS is down
//!
//! Delivery is at most once, as in Pushpin. [`NatsBridge::forward`] never waits: while the client
//! is not connected, or when the bounded forward queue is full, the item is dropped for other
//! replicas (counted in [`NatsStats`]); local delivery is unaffected. async-nats reconnects
//! forever with capped, jittered exponential backoff. Connection-API calls for connections not on
//! this replica report "not found" while disconnected. [`NatsBridge::degraded_reason`] reports
//! the outage for `/readyz`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, HeaderMap, Request, ServerAddr, Subscriber};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hub::{ConnectionView, Targeted, delivery_for, send_to, view_of};
use super::{ConnInfo, Registry};
use crate::protocol::control::MessageType;
use crate::protocol::publish::{Item, WsMessageAction, parse_publish};

/// Header naming the replica that published a channel message.
pub const ORIGIN_HEADER: &str = "Wsgate-Origin";

/// The type of `Gateway::on_channel`: called with a channel and `true` when it gains its first
/// local subscriber, `false` when it loses its last.
pub type ChannelHook = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// Longest wait of [`NatsBridge::sync`] for the server.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// Channel names up to this many bytes are carried in subjects as base64url; longer ones as a
/// SHA-256 hash.
pub const MAX_PLAIN_CHANNEL_BYTES: usize = 512;

/// Connection state of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsState {
    /// Connected to a NATS server.
    Connected,
    /// The connection was lost; reconnecting in the background.
    Disconnected,
    /// Never connected yet; connecting in the background.
    Connecting,
}

/// Why the bridge could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    /// The server URL list is empty.
    #[error("no NATS server URL given")]
    NoUrl,
    /// A server URL does not parse.
    #[error("bad NATS server URL '{url}': {reason}")]
    BadUrl {
        /// The URL (credentials removed).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The subject prefix is not a valid subject.
    #[error("bad NATS subject prefix '{0}': tokens must be non-empty, without whitespace, '*' or '>'")]
    BadPrefix(String),
    /// The NATS client refused to start.
    #[error("cannot start the NATS client: {0}")]
    Client(String),
    /// [`NatsBridge::sync`] could not finish: not connected, or no answer in time.
    #[error("NATS sync failed: {0}")]
    Sync(&'static str),
}

/// Settings of the bridge.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs, comma separated (`nats://host:4222`; `user:pass@` allowed; `tls://` for TLS).
    pub url: String,
    /// First subject tokens of every subject the bridge uses.
    pub subject_prefix: String,
    /// How long a connection-API call waits for the replica holding the connection.
    pub request_timeout: Duration,
    /// Limit for one connection attempt (TCP, TLS, NATS handshake).
    pub connection_timeout: Duration,
    /// Longest pause between reconnect attempts (backoff doubles up to this, with ±20% jitter).
    pub reconnect_max_delay: Duration,
    /// Interval of NATS PINGs (a dead server is noticed after two unanswered ones).
    pub ping_interval: Duration,
    /// Publishes waiting for the NATS client; more are dropped for other replicas.
    pub forward_queue: usize,
}

impl NatsConfig {
    /// Defaults for `url`: prefix `wsgate`, 500 ms request timeout, 2 s connection timeout,
    /// 2 s longest reconnect backoff, 10 s pings, 8192 queued publishes.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            subject_prefix: "wsgate".into(),
            request_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(2),
            reconnect_max_delay: Duration::from_secs(2),
            ping_interval: Duration::from_secs(10),
            forward_queue: 8192,
        }
    }
}

/// Counters of the bridge.
#[derive(Debug, Default)]
pub struct NatsStats {
    /// Items handed to the NATS client.
    pub forwarded: AtomicU64,
    /// Items not sent to other replicas because NATS was not connected.
    pub dropped_disconnected: AtomicU64,
    /// Items not sent to other replicas because the forward queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Items the NATS client refused (e.g. over the server's `max_payload`).
    pub publish_failed: AtomicU64,
    /// Items from other replicas delivered to local subscribers.
    pub received: AtomicU64,
    /// Messages carrying this replica's own origin (skipped).
    pub own_echo_skipped: AtomicU64,
    /// Channel messages that did not parse or named another channel (dropped).
    pub rejected: AtomicU64,
    /// Connection-API calls sent to other replicas.
    pub remote_requests: AtomicU64,
    /// Connection-API calls from other replicas answered here.
    pub requests_answered: AtomicU64,
    /// Successful (re)connections to a NATS server.
    pub connects: AtomicU64,
    /// Lost connections.
    pub disconnects: AtomicU64,
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations that cannot leave the data inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The subject token for a channel name or connection id: unpadded base64url.
pub fn subject_token(name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name.as_bytes())
}

/// The subject carrying publishes to `channel`.
pub fn channel_subject(prefix: &str, channel: &str) -> String {
    if channel.len() <= MAX_PLAIN_CHANNEL_BYTES {
        format!("{prefix}.ch.{}", subject_token(channel))
    } else {
        let digest = Sha256::digest(channel.as_bytes());
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        format!("{prefix}.chx.{hex}")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The subject of connection-API requests for connection `id`.
pub fn conn_subject(prefix: &str, id: &str) -> String {
    format!("{prefix}.conn.{}", subject_token(id))
}

fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty() && t != "*" && t != ">" && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        })
}

/// Encodes one item as a channel message payload (a publish body with one item).
pub fn encode_item(item: &Item) -> Bytes {
    let body = serde_json::json!({ "items": [item.to_json()] });
    Bytes::from(body.to_string())
}

/// Why a channel message was dropped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// The payload is not a valid publish body.
    #[error("payload is not a publish body: {0}")]
    Publish(#[from] crate::protocol::publish::PublishError),
    /// An item names another channel than the subject it came on.
    #[error("item for channel '{got}' arrived on the subject of another channel")]
    WrongChannel {
        /// Channel named by the item.
        got: String,
    },
}

/// Decodes a channel message payload received on `channel`'s subject.
///
/// # Errors
///
/// [`WireError`] when the payload is not a publish body or an item names another channel.
pub fn decode_items(payload: &[u8], channel: &str) -> Result<Vec<Item>, WireError> {
    let req = parse_publish(payload)?;
    if let Some(bad) = req.items.iter().find(|i| i.channel != channel) {
        return Err(WireError::WrongChannel {
            got: bad.channel.clone(),
        });
    }
    Ok(req.items)
}

/// A connection-API request between replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ConnRequest {
    /// Describe the connection.
    Get {
        /// Connection-Id.
        id: String,
    },
    /// Deliver an action to the connection.
    Send {
        /// Connection-Id.
        id: String,
        /// The action.
        action: WireAction,
    },
}

impl ConnRequest {
    fn id(&self) -> &str {
        match self {
            Self::Get { id } | Self::Send { id, .. } => id,
        }
    }
}

/// A [`WsMessageAction`] as carried between replicas (no validation on the way: the replica
/// that took the API call already validated it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum WireAction {
    /// [`WsMessageAction::Send`].
    Send {
        /// `text`, `binary`, `ping` or `pong`.
        kind: String,
        /// Payload, standard base64.
        content: String,
    },
    /// [`WsMessageAction::Close`].
    Close {
        /// Close code.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// [`WsMessageAction::Refresh`].
    Refresh,
}

impl From<&WsMessageAction> for WireAction {
    fn from(a: &WsMessageAction) -> Self {
        match a {
            WsMessageAction::Send { kind, content } => Self::Send {
                kind: kind.as_str().to_owned(),
                content: base64::engine::general_purpose::STANDARD.encode(content),
            },
            WsMessageAction::Close { code, reason } => Self::Close {
                code: *code,
                reason: reason.clone(),
            },
            WsMessageAction::Refresh => Self::Refresh,
        }
    }
}

impl WireAction {
    /// The action, or `None` for an unknown kind or bad base64.
    pub fn to_action(&self) -> Option<WsMessageAction> {
        Some(match self {
            Self::Send { kind, content } => WsMessageAction::Send {
                kind: MessageType::from_name(kind)?,
                content: Bytes::from(base64::engine::general_purpose::STANDARD.decode(content).ok()?),
            },
            Self::Close { code, reason } => WsMessageAction::Close {
                code: *code,
                reason: reason.clone(),
            },
            Self::Refresh => WsMessageAction::Refresh,
        })
    }
}

/// The owner's answer to a [`ConnRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum ConnReply {
    /// The action was queued.
    Delivered,
    /// The connection is closing as a slow consumer.
    Overflow,
    /// The connection was here but has just closed.
    NotFound,
    /// The connection, described.
    Found {
        /// Route name.
        route: String,
        /// Seconds since accept.
        age_secs: u64,
        /// `Set-Meta-*` metadata.
        meta: BTreeMap<String, String>,
        /// Subscription metadata.
        sub_meta: BTreeMap<String, String>,
        /// Channels subscribed.
        channels: Vec<String>,
    },
}

/// What this replica answers to `req`, or `None` when the connection is not here (stay silent:
/// another replica may hold it).
pub fn answer(registry: &Registry, req: &ConnRequest) -> Option<ConnReply> {
    match req {
        ConnRequest::Get { id } => {
            let view = view_of(registry, id)?;
            Some(ConnReply::Found {
                route: view.route,
                age_secs: view.age_secs,
                meta: view.info.meta,
                sub_meta: view.info.sub_meta,
                channels: view.info.channels,
            })
        }
        ConnRequest::Send { id, action } => {
            registry.get(id)?;
            // An action this replica cannot read (a newer peer's) is reported undelivered.
            let Some(action) = action.to_action() else {
                return Some(ConnReply::NotFound);
            };
            Some(match send_to(registry, id, &action) {
                Targeted::Delivered => ConnReply::Delivered,
                Targeted::Overflow => ConnReply::Overflow,
                Targeted::NotFound => ConnReply::NotFound,
            })
        }
    }
}

/// Which channels this replica wants a NATS subscription for (see the module docs).
#[derive(Debug, Default)]
struct Wanted {
    inner: Mutex<WantedInner>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct WantedInner {
    /// Sum of +1 (first local subscriber) and -1 (last one left) per channel; absent = 0.
    counts: HashMap<String, i64>,
    /// Channels whose count changed since the manager last looked.
    dirty: HashSet<String>,
}

impl Wanted {
    fn record(&self, channel: &str, first: bool) {
        {
            let mut g = lock(&self.inner);
            let n = g.counts.entry(channel.to_owned()).or_insert(0);
            *n += if first { 1 } else { -1 };
            if *n == 0 {
                g.counts.remove(channel);
            }
            if !g.dirty.contains(channel) {
                g.dirty.insert(channel.to_owned());
            }
        }
        self.notify.notify_one();
    }

    /// Takes the changed channels with whether each should be subscribed now.
    fn take_dirty(&self) -> Vec<(String, bool)> {
        let mut g = lock(&self.inner);
        let dirty = std::mem::take(&mut g.dirty);
        dirty
            .into_iter()
            .map(|c| {
                let want = g.counts.get(&c).is_some_and(|n| *n > 0);
                (c, want)
            })
            .collect()
    }
}

/// What channel readers and the request server need.
#[derive(Debug)]
struct Shared {
    replica_id: String,
    registry: Arc<Registry>,
    stats: NatsStats,
}

struct Inner {
    shared: Arc<Shared>,
    client: Client,
    prefix: String,
    request_timeout: Duration,
    wanted: Arc<Wanted>,
    subscribed: Arc<Mutex<BTreeSet<String>>>,
    forward_tx: mpsc::Sender<Outbound>,
    sync_tx: mpsc::Sender<oneshot::Sender<Result<(), NatsError>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Outbound {
    subject: String,
    payload: Bytes,
}

/// The link between this replica and the others, over NATS. Cheap to clone (one shared state);
/// background tasks stop when the last clone is dropped or on [`NatsBridge::shutdown`].
#[derive(Clone)]
pub struct NatsBridge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBridge")
            .field("replica_id", &self.inner.shared.replica_id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn parse_urls(list: &str) -> Result<Vec<ServerAddr>, NatsError> {
    let urls: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if urls.is_empty() {
        return Err(NatsError::NoUrl);
    }
    urls.into_iter()
        .map(|u| {
            u.parse::<ServerAddr>().map_err(|e| NatsError::BadUrl {
                url: redact(u),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// The URL without `user:pass@`, for messages.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
}

fn backoff(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    let base = Duration::from_millis(50).saturating_mul(1u32 << exp).min(max);
    let jitter: f64 = rand::Rng::random_range(&mut rand::rng(), 0.8..1.2);
    base.mul_f64(jitter).min(max)
}

impl NatsBridge {
    /// Starts the bridge: the NATS client connects (and reconnects) in the background, so this
    /// returns at once even when no server is reachable yet. Channel messages from other
    /// replicas are delivered to `registry`'s connections.
    ///
    /// # Errors
    ///
    /// [`NatsError`] for a malformed URL or subject prefix; never for an unreachable server.
    pub async fn connect(config: NatsConfig, registry: Arc<Registry>) -> Result<Self, NatsError> {
        let urls = parse_urls(&config.url)?;
        if !is_valid_prefix(&config.subject_prefix) {
            return Err(NatsError::BadPrefix(config.subject_prefix));
        }
        let replica_id = uuid::Uuid::new_v4().simple().to_string();
        let shared = Arc::new(Shared {
            replica_id: replica_id.clone(),
            registry,
            stats: NatsStats::default(),
        });
        let events = shared.clone();
        let max_delay = config.reconnect_max_delay;
        let client = ConnectOptions::new()
            .name(format!("wsgate-{replica_id}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.connection_timeout)
            .ping_interval(config.ping_interval)
            .request_timeout(Some(config.request_timeout))
            .subscription_capacity(8192)
            .reconnect_delay_callback(move |attempts| backoff(attempts, max_delay))
            .event_callback(move |event| {
                let shared = events.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            count(&shared.stats.connects);
                            tracing::info!(replica = %shared.replica_id, "nats connected");
                        }
                        async_nats::Event::Disconnected => {
                            count(&shared.stats.disconnects);
                            tracing::warn!(replica = %shared.replica_id, "nats disconnected; reconnecting");
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            tracing::warn!(sid, "nats subscription too slow; messages dropped");
                        }
                        // Each failed reconnect attempt reports one; the disconnect was logged.
                        async_nats::Event::ClientError(e) => tracing::debug!(cause = %e, "nats client error"),
                        other => tracing::warn!(event = %other, "nats client event"),
                    }
                }
            })
            .connect(urls)
            .await
            .map_err(|e| NatsError::Client(e.to_string()))?;

        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let wanted = Arc::new(Wanted::default());
        let subscribed = Arc::new(Mutex::new(BTreeSet::new()));
        let (forward_tx, forward_rx) = mpsc::channel(config.forward_queue.max(1));
        let (sync_tx, sync_rx) = mpsc::channel(16);

        let conn_sub = client
            .subscribe(format!("{}.conn.*", config.subject_prefix))
            .await
            .map_err(|e| NatsError::Client(e.to_string()))?;
        tasks.spawn(serve_conn_requests(
            client.clone(),
            conn_sub,
            shared.clone(),
            stop.clone(),
        ));
        tasks.spawn(forward(client.clone(), forward_rx, shared.clone(), stop.clone()));
        tasks.spawn(
            Manager {
                client: client.clone(),
                prefix: config.subject_prefix.clone(),
                shared: shared.clone(),
                wanted: wanted.clone(),
                subscribed: subscribed.clone(),
                subs: HashMap::new(),
                tasks: tasks.clone(),
                stop: stop.clone(),
            }
            .run(sync_rx),
        );
        tracing::info!(replica = %replica_id, servers = %redact(&config.url), "nats bridge started");
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                client,
                prefix: config.subject_prefix,
                request_timeout: config.request_timeout,
                wanted,
                subscribed,
                forward_tx,
                sync_tx,
                stop,
                tasks,
            }),
        })
    }

    /// This replica's random id (the `Wsgate-Origin` of its publishes).
    pub fn replica_id(&self) -> &str {
        &self.inner.shared.replica_id
    }

    /// Connection state now.
    pub fn state(&self) -> NatsState {
        match self.inner.client.connection_state() {
            async_nats::connection::State::Connected => NatsState::Connected,
            async_nats::connection::State::Disconnected => NatsState::Disconnected,
            async_nats::connection::State::Pending => NatsState::Connecting,
        }
    }

    /// Why the replica is degraded, for `/readyz`: `None` when connected.
    pub fn degraded_reason(&self) -> Option<&'static str> {
        match self.state() {
            NatsState::Connected => None,
            NatsState::Disconnected => Some("nats disconnected"),
            NatsState::Connecting => Some("nats connecting"),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &NatsStats {
        &self.inner.shared.stats
    }

    /// The callback for `Gateway::on_channel`. It never blocks.
    pub fn channel_hook(&self) -> ChannelHook {
        let wanted = self.inner.wanted.clone();
        Arc::new(move |channel: &str, first: bool| wanted.record(channel, first))
    }

    /// Channels this replica holds a NATS subscription for now (sorted).
    pub fn subscribed_channels(&self) -> Vec<String> {
        lock(&self.inner.subscribed).iter().cloned().collect()
    }

    /// Hands `item` to NATS for the other replicas without waiting; returns true when queued.
    /// Items without a `ws-message` or with an empty channel are not forwarded (nobody could
    /// receive them).
    pub fn forward(&self, item: &Item) -> bool {
        if item.ws.is_none() || item.channel.is_empty() {
            return false;
        }
        let stats = &self.inner.shared.stats;
        if self.state() != NatsState::Connected {
            count(&stats.dropped_disconnected);
            return false;
        }
        let out = Outbound {
            subject: channel_subject(&self.inner.prefix, &item.channel),
            payload: encode_item(item),
        };
        match self.inner.forward_tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                count(&stats.dropped_queue_full);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                count(&stats.dropped_disconnected);
                false
            }
        }
    }

    async fn request(&self, req: &ConnRequest) -> Option<ConnReply> {
        if self.state() != NatsState::Connected {
            return None;
        }
        count(&self.inner.shared.stats.remote_requests);
        let payload = match serde_json::to_vec(req) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::warn!(cause = %e, "cannot encode a connection request");
                return None;
            }
        };
        let request = Request::new()
            .payload(payload)
            .timeout(Some(self.inner.request_timeout));
        let subject = conn_subject(&self.inner.prefix, req.id());
        match self.inner.client.send_request(subject, request).await {
            Ok(msg) => match serde_json::from_slice::<ConnReply>(&msg.payload) {
                Ok(reply) => Some(reply),
                Err(e) => {
                    tracing::warn!(cause = %e, "malformed connection reply from another replica");
                    None
                }
            },
            Err(e) => {
                use async_nats::RequestErrorKind as K;
                if !matches!(e.kind(), K::TimedOut | K::NoResponders) {
                    tracing::warn!(cause = %e, "connection request over nats failed");
                }
                None
            }
        }
    }

    /// Asks the other replicas to deliver `action` to connection `id`.
    pub async fn send_remote(&self, id: &str, action: &WsMessageAction) -> Targeted {
        let req = ConnRequest::Send {
            id: id.to_owned(),
            action: action.into(),
        };
        match self.request(&req).await {
            Some(ConnReply::Delivered) => Targeted::Delivered,
            Some(ConnReply::Overflow) => Targeted::Overflow,
            Some(ConnReply::NotFound | ConnReply::Found { .. }) | None => Targeted::NotFound,
        }
    }

    /// Asks the other replicas to describe connection `id`.
    pub async fn get_remote(&self, id: &str) -> Option<ConnectionView> {
        match self.request(&ConnRequest::Get { id: id.to_owned() }).await? {
            ConnReply::Found {
                route,
                age_secs,
                meta,
                sub_meta,
                channels,
            } => Some(ConnectionView {
                id: id.to_owned(),
                route,
                age_secs,
                info: ConnInfo {
                    meta,
                    sub_meta,
                    channels,
                },
            }),
            _ => None,
        }
    }

    /// Waits until every subscription change reported through the hook so far is applied and
    /// acknowledged by the NATS server (a request round trip on this connection), bounded by
    /// five seconds. For tests and orderly hand-offs.
    ///
    /// # Errors
    ///
    /// [`NatsError::Sync`] when the bridge is not connected, stopped, or the server did not
    /// answer in time.
    pub async fn sync(&self) -> Result<(), NatsError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .sync_tx
            .send(tx)
            .await
            .map_err(|_| NatsError::Sync("bridge stopped"))?;
        rx.await.map_err(|_| NatsError::Sync("bridge stopped"))?
    }

    /// Stops the background tasks (dropping NATS subscriptions) and flushes pending output,
    /// bounded by one second.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.inner.tasks.wait().await;
            let _ = self.inner.client.flush().await;
        })
        .await;
    }
}

/// Owns the channel subscriptions: applies [`Wanted`] changes in order.
struct Manager {
    client: Client,
    prefix: String,
    shared: Arc<Shared>,
    wanted: Arc<Wanted>,
    subscribed: Arc<Mutex<BTreeSet<String>>>,
    subs: HashMap<String, ChannelSub>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

struct ChannelSub {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Manager {
    async fn run(mut self, mut sync_rx: mpsc::Receiver<oneshot::Sender<Result<(), NatsError>>>) {
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                Some(done) = sync_rx.recv() => {
                    self.apply().await;
                    let _ = done.send(self.round_trip().await);
                }
                () = self.wanted.notify.notified() => self.apply().await,
            }
        }
        for (_, sub) in self.subs.drain() {
            sub.stop.cancel();
        }
    }

    /// A round trip through the server after everything queued so far. async-nats' `flush`
    /// only writes the socket, so this sends a request to a subject nobody subscribes to: the
    /// server answers "no responders" only after it has processed the earlier SUBs and UNSUBs.
    async fn round_trip(&self) -> Result<(), NatsError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(NatsError::Sync("not connected"));
        }
        let subject = format!("{}.sync.{}", self.prefix, self.shared.replica_id);
        let request = Request::new().payload(Bytes::new()).timeout(Some(SYNC_TIMEOUT));
        match self.client.send_request(subject, request).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                Err(NatsError::Sync("no answer from the server in time"))
            }
            Err(_) => Err(NatsError::Sync("request failed")),
        }
    }

    async fn apply(&mut self) {
        for (channel, want) in self.wanted.take_dirty() {
            let have = self.subs.contains_key(&channel);
            if want && !have {
                self.subscribe(channel).await;
            } else if !want && have {
                self.unsubscribe(&channel).await;
            }
        }
    }

    async fn subscribe(&mut self, channel: String) {
        let subject = channel_subject(&self.prefix, &channel);
        let sub = match self.client.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(cause = %e, channel = %channel, "nats subscribe failed");
                return;
            }
        };
        let stop = self.stop.child_token();
        let task = self
            .tasks
            .spawn(read_channel(sub, channel.clone(), self.shared.clone(), stop.clone()));
        lock(&self.subscribed).insert(channel.clone());
        self.subs.insert(channel, ChannelSub { stop, task });
    }

    async fn unsubscribe(&mut self, channel: &str) {
        let Some(sub) = self.subs.remove(channel) else {
            return;
        };
        sub.stop.cancel();
        // Wait until the reader has sent UNSUB, so a later SUB for the same channel follows it
        // on the wire and the two subscriptions never both deliver.
        let _ = sub.task.await;
        lock(&self.subscribed).remove(channel);
    }
}

/// Delivers one channel's messages from other replicas to local subscribers.
async fn read_channel(mut sub: Subscriber, channel: String, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                let _ = sub.unsubscribe().await;
                return;
            }
            msg = sub.next() => match msg {
                Some(msg) => deliver(&shared, &channel, &msg),
                None => return,
            },
        }
    }
}

fn deliver(shared: &Shared, channel: &str, msg: &async_nats::Message) {
    let origin = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(ORIGIN_HEADER))
        .map(|v| v.as_str());
    if origin == Some(shared.replica_id.as_str()) {
        count(&shared.stats.own_echo_skipped);
        return;
    }
    let items = match decode_items(&msg.payload, channel) {
        Ok(items) => items,
        Err(e) => {
            count(&shared.stats.rejected);
            tracing::warn!(cause = %e, channel = %channel, "dropped a malformed nats channel message");
            return;
        }
    };
    for item in items {
        if let Some(action) = &item.ws {
            count(&shared.stats.received);
            shared
                .registry
                .publish(&item.channel, &item.meta, &delivery_for(action));
        }
    }
}

/// Sends queued publishes to NATS, tagged with this replica's origin.
async fn forward(client: Client, mut rx: mpsc::Receiver<Outbound>, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let out = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            out = rx.recv() => match out {
                Some(o) => o,
                None => return,
            },
        };
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN_HEADER, shared.replica_id.as_str());
        match client.publish_with_headers(out.subject, headers, out.payload).await {
            Ok(()) => count(&shared.stats.forwarded),
            Err(e) => {
                count(&shared.stats.publish_failed);
                tracing::warn!(cause = %e, "nats publish failed; item not sent to other replicas");
            }
        }
    }
}

/// Answers connection-API requests for connections on this replica.
async fn serve_conn_requests(client: Client, mut sub: Subscriber, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let msg = tokio::select! {
            biased;
            () = stop.cancelled() => {
                let _ = sub.unsubscribe().await;
                return;
            }
            msg = sub.next() => match msg {
                Some(m) => m,
                None => return,
            },
        };
        let Some(reply_to) = msg.reply else {
            continue;
        };
        let req: ConnRequest = match serde_json::from_slice(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(cause = %e, "malformed connection request from another replica");
                continue;
            }
        };
        let Some(reply) = answer(&shared.registry, &req) else {
            continue;
        };
        let payload = match serde_json::to_vec(&reply) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::warn!(cause = %e, "cannot encode a connection reply");
                continue;
            }
        };
        count(&shared.stats.requests_answered);
        if let Err(e) = client.publish(reply_to, payload).await {
            tracing::warn!(cause = %e, "cannot send a connection reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn item(channel: &str, text: &str) -> Item {
        Item {
            channel: channel.into(),
            id: Some("i1".into()),
            prev_id: None,
            meta: BTreeMap::from([("sender".to_owned(), "u1".to_owned())]),
            ws: Some(WsMessageAction::Send {
                kind: MessageType::Text,
                content: Bytes::copy_from_slice(text.as_bytes()),
            }),
        }
    }

    fn is_valid_subject_token(t: &str) -> bool {
        !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>'))
    }

    #[test]
    fn channel_subjects_are_valid_and_distinct_for_awkward_names() {
        let names = [
            "room",
            "a.b",
            "a b",
            "*",
            ">",
            "a.*.>",
            "tab\tnl\n",
            "ünï ☃",
            "",
            "a",
            "b",
        ];
        let mut seen = HashSet::new();
        for n in names {
            let s = channel_subject("wsgate", n);
            let token = s.strip_prefix("wsgate.ch.").expect("plain form");
            assert!(n.is_empty() || is_valid_subject_token(token), "{n:?} -> {s:?}");
            assert!(seen.insert(s.clone()), "two names share a subject");
            let back = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .expect("base64url");
            assert_eq!(back, n.as_bytes());
        }
    }

    #[test]
    fn long_channel_names_are_hashed() {
        let long = "x".repeat(MAX_PLAIN_CHANNEL_BYTES + 1);
        let s = channel_subject("p", &long);
        let hex = s.strip_prefix("p.chx.").expect("hashed form");
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(channel_subject("p", &"y".repeat(MAX_PLAIN_CHANNEL_BYTES + 1)), s);
        let edge = "x".repeat(MAX_PLAIN_CHANNEL_BYTES);
        assert!(channel_subject("p", &edge).starts_with("p.ch."));
    }

    #[test]
    fn item_round_trips_through_the_wire_format() {
        let it = item("a.b c", "hello");
        let payload = encode_item(&it);
        let v: Value = serde_json::from_slice(&payload).expect("json");
        assert!(v.get("items").is_some_and(Value::is_array));
        assert_eq!(decode_items(&payload, "a.b c").expect("decodes"), vec![it]);
    }

    #[test]
    fn binary_and_close_items_round_trip() {
        for ws in [
            WsMessageAction::Send {
                kind: MessageType::Binary,
                content: Bytes::from_static(&[0, 255, 1]),
            },
            WsMessageAction::Close {
                code: Some(4001),
                reason: "bye".into(),
            },
            WsMessageAction::Refresh,
        ] {
            let it = Item {
                ws: Some(ws),
                ..item("c", "")
            };
            assert_eq!(decode_items(&encode_item(&it), "c").expect("decodes"), vec![it]);
        }
    }

    #[test]
    fn items_for_another_channel_are_rejected() {
        let payload = encode_item(&item("other", "x"));
        assert_eq!(
            decode_items(&payload, "room"),
            Err(WireError::WrongChannel { got: "other".into() })
        );
        assert!(matches!(decode_items(b"not json", "room"), Err(WireError::Publish(_))));
    }

    #[test]
    fn wanted_counts_survive_reordered_callbacks() {
        let w = Wanted::default();
        // In registry order: T F T; callbacks arrive as T T F.
        w.record("c", true);
        w.record("c", true);
        w.record("c", false);
        assert_eq!(w.take_dirty(), vec![("c".to_owned(), true)]);
        // Registry: F T; callbacks arrive as T F: still wanted (count back to 1).
        w.record("c", true);
        w.record("c", false);
        assert_eq!(w.take_dirty(), vec![("c".to_owned(), true)]);
        // The last subscriber leaves.
        w.record("c", false);
        assert_eq!(w.take_dirty(), vec![("c".to_owned(), false)]);
        assert!(w.take_dirty().is_empty());
        // Registry: T F; callbacks arrive F T: not wanted in the end.
        w.record("d", false);
        w.record("d", true);
        assert_eq!(w.take_dirty(), vec![("d".to_owned(), false)]);
    }

    #[test]
    fn quick_subscribe_unsubscribe_collapses() {
        let w = Wanted::default();
        for _ in 0..100 {
            w.record("c", true);
            w.record("c", false);
        }
        assert_eq!(w.take_dirty(), vec![("c".to_owned(), false)]);
    }

    #[test]
    fn wire_actions_round_trip() {
        for a in [
            WsMessageAction::Send {
                kind: MessageType::Ping,
                content: Bytes::from_static(b"p"),
            },
            WsMessageAction::Send {
                kind: MessageType::Text,
                content: Bytes::from_static("é".as_bytes()),
            },
            WsMessageAction::Close {
                code: None,
                reason: String::new(),
            },
            WsMessageAction::Close {
                code: Some(1005),
                reason: "odd code kept".into(),
            },
            WsMessageAction::Refresh,
        ] {
            let req = ConnRequest::Send {
                id: "x".into(),
                action: (&a).into(),
            };
            let json = serde_json::to_vec(&req).expect("encode");
            let back: ConnRequest = serde_json::from_slice(&json).expect("decode");
            let ConnRequest::Send { action, .. } = back else {
                panic!("wrong op");
            };
            assert_eq!(action.to_action(), Some(a));
        }
        let bad = WireAction::Send {
            kind: "nope".into(),
            content: String::new(),
        };
        assert_eq!(bad.to_action(), None);
    }

    #[test]
    fn answer_is_silent_for_unknown_connections_and_describes_known_ones() {
        let reg = Registry::new();
        assert_eq!(answer(&reg, &ConnRequest::Get { id: "nope".into() }), None);
        let h = reg.register("c1".into(), "r".into(), 1 << 20);
        h.set_info(ConnInfo {
            meta: BTreeMap::from([("user".to_owned(), "u".to_owned())]),
            sub_meta: BTreeMap::new(),
            channels: vec!["room".into()],
        });
        match answer(&reg, &ConnRequest::Get { id: "c1".into() }) {
            Some(ConnReply::Found {
                route, meta, channels, ..
            }) => {
                assert_eq!(route, "r");
                assert_eq!(meta.get("user").map(String::as_str), Some("u"));
                assert_eq!(channels, vec!["room".to_owned()]);
            }
            other => panic!("expected Found, got {other:?}"),
        }
        let send = ConnRequest::Send {
            id: "c1".into(),
            action: (&WsMessageAction::Refresh).into(),
        };
        assert_eq!(answer(&reg, &send), Some(ConnReply::Delivered));
        let mut out = Vec::new();
        h.mailbox.drain(&mut out);
        assert_eq!(out, vec![super::super::Delivery::Refresh]);
        reg.unregister(&h);
        assert_eq!(answer(&reg, &send), None);
    }

    #[test]
    fn config_errors_are_reported() {
        assert!(matches!(parse_urls(" , "), Err(NatsError::NoUrl)));
        assert!(
            matches!(parse_urls("http://user:secret@x:1"), Err(NatsError::BadUrl { url, .. }) if !url.contains("secret"))
        );
        assert!(matches!(parse_urls("nats://a:1, b:2").map(|v| v.len()), Ok(2)));
        assert!(is_valid_prefix("wsgate"));
        assert!(is_valid_prefix("team.wsgate"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", ">", "a>b"] {
            assert!(!is_valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff(1, max), Duration::ZERO);
        assert!(backoff(2, max) <= Duration::from_millis(60));
        for n in 2..100 {
            assert!(backoff(n, max) <= max);
        }
        assert!(backoff(20, max) >= Duration::from_millis(1600));
    }

    #[test]
    fn redact_removes_credentials() {
        assert_eq!(redact("nats://u:p@h:4222"), "nats://h:4222");
        assert_eq!(redact("h:4222"), "h:4222");
    }
}
