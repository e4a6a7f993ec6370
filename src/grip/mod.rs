//! Connection and channel registry: every live connection's mailbox, and which connections
//! subscribe to which channel.
//!
//! # Slow consumers
//!
//! Each connection has a [`Mailbox`] bounded in bytes (the route's `outboundQueueBytes`).
//! A publish that would overflow it marks the mailbox overflowed and drops nothing silently:
//! the connection driver closes that client with `1013` ("try again later") and the drop is
//! counted. Memory per connection never grows past the bound, and other subscribers are not
//! slowed down.

pub mod hub;
pub mod nats;

pub use hub::Hub;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::protocol::frame::Message;
use crate::protocol::publish::{Filter, filters_allow};

/// Something delivered to one connection out of band.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Send this message (a close frame closes the connection).
    Message(Message),
    /// Make a backend request now.
    Refresh,
}

impl Delivery {
    fn cost(&self) -> usize {
        match self {
            Delivery::Message(Message::Text(b) | Message::Binary(b) | Message::Ping(b) | Message::Pong(b)) => {
                b.len() + 16
            }
            _ => 16,
        }
    }
}

/// Outcome of a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued.
    Queued,
    /// The mailbox is over its bound: the connection is being closed as a slow consumer.
    Overflow,
    /// The connection is gone.
    Closed,
}

#[derive(Debug, Default)]
struct MailboxInner {
    queue: VecDeque<Delivery>,
    bytes: usize,
    overflowed: bool,
    closed: bool,
}

/// A bounded queue of deliveries to one connection; a push wakes the connection's task.
#[derive(Debug)]
pub struct Mailbox {
    inner: Mutex<MailboxInner>,
    /// The connection task's waker and a pending flag: a push wakes the task at most once
    /// and is never lost (polling is cheap, no waiter list to join and leave).
    waker: futures_util::task::AtomicWaker,
    pending: std::sync::atomic::AtomicBool,
    limit: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent across a panic (single assignments).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mailbox {
    /// A mailbox holding at most `limit` bytes of undelivered content.
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Mutex::new(MailboxInner::default()),
            waker: futures_util::task::AtomicWaker::new(),
            pending: std::sync::atomic::AtomicBool::new(false),
            limit,
        }
    }

    /// Queues a delivery.
    pub fn push(&self, d: Delivery) -> PushOutcome {
        let mut g = lock(&self.inner);
        if g.closed {
            return PushOutcome::Closed;
        }
        if g.overflowed {
            // Already being closed as a slow consumer; counted once.
            return PushOutcome::Closed;
        }
        let cost = d.cost();
        if g.bytes + cost > self.limit && !g.queue.is_empty() {
            g.overflowed = true;
            drop(g);
            self.signal();
            return PushOutcome::Overflow;
        }
        g.bytes += cost;
        g.queue.push_back(d);
        drop(g);
        self.signal();
        PushOutcome::Queued
    }

    /// Wakes the connection's task without a delivery (it then re-checks its state, e.g.
    /// shutdown).
    pub fn wake(&self) {
        self.signal();
    }

    fn signal(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once something was pushed since the last time it was ready (the signal is kept
    /// until polled, so waiting is cancel-safe).
    pub fn poll_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.pending.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.pending.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }

    /// Waits until something was pushed (see [`Self::poll_ready`]).
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Takes everything queued. The flag is true once the mailbox overflowed.
    pub fn drain(&self, out: &mut Vec<Delivery>) -> bool {
        let mut g = lock(&self.inner);
        out.extend(g.queue.drain(..));
        g.bytes = 0;
        if g.queue.capacity() > 64 {
            g.queue.shrink_to_fit();
        }
        g.overflowed
    }

    /// Marks the mailbox closed; later pushes report [`PushOutcome::Closed`].
    pub fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.queue.clear();
        g.bytes = 0;
    }
}

/// What the connection API reports about a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// Metadata bound with `Set-Meta-*`.
    pub meta: BTreeMap<String, String>,
    /// Subscription metadata (`set-meta` control messages).
    pub sub_meta: BTreeMap<String, String>,
    /// Channels subscribed.
    pub channels: Vec<String>,
}

/// One live connection as the rest of the gateway sees it.
#[derive(Debug)]
pub struct ConnHandle {
    /// Connection-Id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// When the connection was accepted.
    pub created: SystemTime,
    /// Deliveries to this connection.
    pub mailbox: Mailbox,
    info: Mutex<ConnInfo>,
}

impl ConnHandle {
    /// Snapshot of metadata and subscriptions.
    pub fn info(&self) -> ConnInfo {
        lock(&self.info).clone()
    }

    /// Replaces the info snapshot (the driver calls this when meta or subscriptions change).
    pub fn set_info(&self, info: ConnInfo) {
        *lock(&self.info) = info;
    }
}

struct Subscriber {
    conn: Arc<ConnHandle>,
    filters: Vec<Filter>,
}

/// Counters of the registry.
#[derive(Debug, Default)]
pub struct RegistryStats {
    /// Publish items handled.
    pub published: AtomicU64,
    /// Messages queued to connections.
    pub delivered: AtomicU64,
    /// Connections closed as slow consumers.
    pub slow_consumer_drops: AtomicU64,
    /// Deliveries skipped by filters.
    pub filtered: AtomicU64,
}

const SHARDS: usize = 16;

/// All live connections and channel subscriptions of this replica.
pub struct Registry {
    conns: Vec<Mutex<HashMap<String, Arc<ConnHandle>>>>,
    channels: Mutex<HashMap<String, HashMap<String, Subscriber>>>,
    /// Counters.
    pub stats: RegistryStats,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

fn shard_of(id: &str) -> usize {
    // FNV-1a: ids are random UUIDs, any spread works.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            conns: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            channels: Mutex::new(HashMap::new()),
            stats: RegistryStats::default(),
        }
    }

    /// Registers a connection and returns its handle.
    pub fn register(&self, id: String, route: String, mailbox_limit: usize) -> Arc<ConnHandle> {
        let handle = Arc::new(ConnHandle {
            id: id.clone(),
            route,
            created: SystemTime::now(),
            mailbox: Mailbox::new(mailbox_limit),
            info: Mutex::new(ConnInfo::default()),
        });
        lock(&self.conns[shard_of(&id)]).insert(id, handle.clone());
        handle
    }

    /// Wakes every connection's task (see [`Mailbox::wake`]): used when the gateway starts
    /// closing connections.
    pub fn wake_all(&self) {
        for shard in &self.conns {
            for h in lock(shard).values() {
                h.mailbox.wake();
            }
        }
    }

    /// Removes a connection and all its subscriptions; returns the channels left without
    /// local subscribers.
    pub fn unregister(&self, handle: &ConnHandle) -> Vec<String> {
        handle.mailbox.close();
        lock(&self.conns[shard_of(&handle.id)]).remove(&handle.id);
        let channels = handle.info().channels;
        let mut emptied = Vec::new();
        for c in channels {
            if self.unsubscribe(&handle.id, &c) {
                emptied.push(c);
            }
        }
        emptied
    }

    /// The connection with this id, if it is on this replica.
    pub fn get(&self, id: &str) -> Option<Arc<ConnHandle>> {
        lock(&self.conns[shard_of(id)]).get(id).cloned()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.conns.iter().map(|s| lock(s).len()).sum()
    }

    /// True when no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribes; returns true when the channel had no local subscriber before.
    pub fn subscribe(&self, conn: &Arc<ConnHandle>, channel: &str, filters: &[String]) -> bool {
        let filters = filters.iter().filter_map(|f| Filter::parse(f)).collect();
        let mut ch = lock(&self.channels);
        let subs = ch.entry(channel.to_owned()).or_default();
        let first = subs.is_empty();
        subs.insert(
            conn.id.clone(),
            Subscriber {
                conn: conn.clone(),
                filters,
            },
        );
        first
    }

    /// Unsubscribes; returns true when the channel has no local subscriber left.
    pub fn unsubscribe(&self, conn_id: &str, channel: &str) -> bool {
        let mut ch = lock(&self.channels);
        let Some(subs) = ch.get_mut(channel) else {
            return false;
        };
        if subs.remove(conn_id).is_none() {
            return false;
        }
        if subs.is_empty() {
            ch.remove(channel);
            return true;
        }
        false
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> Vec<String> {
        lock(&self.channels).keys().cloned().collect()
    }

    /// Number of subscriptions across channels.
    pub fn subscription_count(&self) -> usize {
        lock(&self.channels).values().map(HashMap::len).sum()
    }

    /// Delivers to every local subscriber of `channel` that its filters allow; returns how
    /// many connections got it.
    pub fn publish(&self, channel: &str, item_meta: &BTreeMap<String, String>, d: &Delivery) -> usize {
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let targets: Vec<Arc<ConnHandle>> = {
            let ch = lock(&self.channels);
            let Some(subs) = ch.get(channel) else {
                return 0;
            };
            subs.values()
                .filter(|s| {
                    if s.filters.is_empty() {
                        return true;
                    }
                    let info = lock(&s.conn.info);
                    let is_subscribed = |c: &str| info.channels.iter().any(|x| x == c);
                    let ok = filters_allow(&s.filters, &info.sub_meta, item_meta, &is_subscribed);
                    drop(info);
                    if !ok {
                        self.stats.filtered.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                })
                .map(|s| s.conn.clone())
                .collect()
        };
        let mut n = 0;
        for c in targets {
            match c.mailbox.push(d.clone()) {
                PushOutcome::Queued => n += 1,
                PushOutcome::Overflow => {
                    self.stats.slow_consumer_drops.fetch_add(1, Ordering::Relaxed);
                }
                PushOutcome::Closed => {}
            }
        }
        self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}
