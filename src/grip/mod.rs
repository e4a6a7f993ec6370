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
    /// The data-plane worker running the connection's task ([`crate::worker::current`] when
    /// the mailbox was made).
    worker: usize,
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
            worker: crate::worker::current(),
        }
    }

    /// Queues a delivery and wakes the connection's task.
    pub fn push(&self, d: Delivery) -> PushOutcome {
        let outcome = self.enqueue(d);
        if outcome != PushOutcome::Closed {
            self.signal();
        }
        outcome
    }

    /// [`Self::push`] without the wake: the caller signals unless the outcome is
    /// [`PushOutcome::Closed`].
    fn enqueue(&self, d: Delivery) -> PushOutcome {
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
            return PushOutcome::Overflow;
        }
        g.bytes += cost;
        g.queue.push_back(d);
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

    /// [`Self::signal`], handing the task's waker to `relays` when its worker runs one.
    fn signal_via(&self, relays: &mut RelayBatch<'_>) {
        self.pending.store(true, Ordering::Release);
        if let Some(w) = self.waker.take() {
            relays.wake(self.worker, w);
        }
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

#[derive(Clone)]
struct Subscriber {
    conn: Arc<ConnHandle>,
    filters: Arc<[Filter]>,
}

/// One channel's local subscribers.
#[derive(Default)]
struct Channel {
    subs: HashMap<String, Subscriber>,
    /// The subscribers as a publish walks them: made by the first publish after a change and
    /// shared by the publishes after it, which then neither copy the list nor hold the lock
    /// while delivering.
    snapshot: Option<Arc<[Subscriber]>>,
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

/// Wakes the tasks of one data-plane worker on that worker's own thread.
///
/// A waker of a task on a single-threaded runtime, woken from another thread, queues the task
/// remotely and wakes the runtime's thread (a syscall) every time; a publish to thousands of
/// subscribers would make thousands of them. A publish instead hands each worker its
/// subscribers' wakers in one batch and wakes the worker's relay task once; the relay, on the
/// worker's thread, wakes them locally.
#[derive(Debug, Default)]
struct WakeRelay {
    queue: Mutex<Vec<std::task::Waker>>,
    task: futures_util::task::AtomicWaker,
    /// Set while the relay task runs (a batch handed to a relay that doesn't run would be
    /// lost: then wakers are woken directly).
    running: std::sync::atomic::AtomicBool,
}

/// Wakers gathered during one publish, by worker.
struct RelayBatch<'a> {
    relays: &'a [WakeRelay],
    batches: Vec<Vec<std::task::Waker>>,
}

impl<'a> RelayBatch<'a> {
    fn new(relays: &'a [WakeRelay]) -> Self {
        Self {
            relays,
            batches: Vec::new(),
        }
    }

    /// Wakes `w` (a task of worker `worker`) now, or through its worker's relay.
    fn wake(&mut self, worker: usize, w: std::task::Waker) {
        match worker
            .checked_sub(1)
            .filter(|&i| self.relays.get(i).is_some_and(|r| r.running.load(Ordering::Acquire)))
        {
            Some(i) => {
                if self.batches.len() <= i {
                    self.batches.resize_with(i + 1, Vec::new);
                }
                self.batches[i].push(w);
            }
            None => w.wake(),
        }
    }

    /// Hands every batch to its relay and wakes each relay once.
    fn finish(self) {
        for (relay, batch) in self.relays.iter().zip(self.batches) {
            if batch.is_empty() {
                continue;
            }
            {
                let mut q = lock(&relay.queue);
                if q.is_empty() {
                    *q = batch;
                } else {
                    q.extend(batch);
                }
            }
            relay.task.wake();
            if !relay.running.load(Ordering::Acquire) {
                // The relay stopped meanwhile (its runtime is ending): wake them here.
                for w in std::mem::take(&mut *lock(&relay.queue)) {
                    w.wake();
                }
            }
        }
    }
}

/// Marks a relay stopped when its task ends or is dropped.
struct RelayRunning<'a>(&'a WakeRelay);

impl Drop for RelayRunning<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        // Wakers handed over after the last poll: wake them directly.
        for w in std::mem::take(&mut *lock(&self.0.queue)) {
            w.wake();
        }
    }
}

/// All live connections and channel subscriptions of this replica.
pub struct Registry {
    conns: Vec<Mutex<HashMap<String, Arc<ConnHandle>>>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// One per data-plane worker (index = worker - 1).
    relays: Box<[WakeRelay]>,
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
        Self::with_workers(0)
    }

    /// An empty registry with a wake relay for each of `workers` data-plane workers (each
    /// worker runs its relay with [`Self::wake_relay`]).
    pub fn with_workers(workers: usize) -> Self {
        Self {
            conns: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            channels: Mutex::new(HashMap::new()),
            relays: (0..workers).map(|_| WakeRelay::default()).collect(),
            stats: RegistryStats::default(),
        }
    }

    /// Runs worker `worker`'s wake relay (see `WakeRelay`): a task on that worker's runtime
    /// that never ends by itself. Returns at once for an unknown worker.
    pub async fn wake_relay(&self, worker: usize) {
        let Some(relay) = worker.checked_sub(1).and_then(|i| self.relays.get(i)) else {
            return;
        };
        relay.running.store(true, Ordering::Release);
        let _running = RelayRunning(relay);
        std::future::poll_fn(|cx| {
            relay.task.register(cx.waker());
            let batch = std::mem::take(&mut *lock(&relay.queue));
            for w in batch {
                w.wake();
            }
            std::task::Poll::<()>::Pending
        })
        .await;
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
        let channel = ch.entry(channel.to_owned()).or_default();
        let first = channel.subs.is_empty();
        channel.subs.insert(
            conn.id.clone(),
            Subscriber {
                conn: conn.clone(),
                filters,
            },
        );
        channel.snapshot = None;
        first
    }

    /// Unsubscribes; returns true when the channel has no local subscriber left.
    pub fn unsubscribe(&self, conn_id: &str, channel: &str) -> bool {
        let mut ch = lock(&self.channels);
        let Some(c) = ch.get_mut(channel) else {
            return false;
        };
        if c.subs.remove(conn_id).is_none() {
            return false;
        }
        c.snapshot = None;
        if c.subs.is_empty() {
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
        lock(&self.channels).values().map(|c| c.subs.len()).sum()
    }

    /// Delivers to every local subscriber of `channel` that its filters allow; returns how
    /// many connections got it.
    pub fn publish(&self, channel: &str, item_meta: &BTreeMap<String, String>, d: &Delivery) -> usize {
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let subs = {
            let mut ch = lock(&self.channels);
            let Some(c) = ch.get_mut(channel) else {
                return 0;
            };
            c.snapshot
                .get_or_insert_with(|| c.subs.values().cloned().collect())
                .clone()
        };
        let mut n = 0;
        let mut wakes = RelayBatch::new(&self.relays);
        for s in subs.iter() {
            if !s.filters.is_empty() {
                let info = lock(&s.conn.info);
                let is_subscribed = |c: &str| info.channels.iter().any(|x| x == c);
                let ok = filters_allow(&s.filters, &info.sub_meta, item_meta, &is_subscribed);
                drop(info);
                if !ok {
                    self.stats.filtered.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let mailbox = &s.conn.mailbox;
            match mailbox.enqueue(d.clone()) {
                PushOutcome::Queued => {
                    n += 1;
                    mailbox.signal_via(&mut wakes);
                }
                PushOutcome::Overflow => {
                    self.stats.slow_consumer_drops.fetch_add(1, Ordering::Relaxed);
                    mailbox.signal_via(&mut wakes);
                }
                PushOutcome::Closed => {}
            }
        }
        wakes.finish();
        self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(s: &'static str) -> Delivery {
        Delivery::Message(Message::Text(bytes::Bytes::from_static(s.as_bytes())))
    }

    /// A connection registered on worker thread `worker` of `registry`, whose task (on that
    /// thread's single-threaded runtime) reports each delivery it takes from its mailbox; with
    /// `relay`, the worker runs its wake relay. Returns the handle and the deliveries.
    fn worker_connection(
        registry: &Arc<Registry>,
        worker: usize,
        relay: bool,
    ) -> (Arc<ConnHandle>, std::sync::mpsc::Receiver<Delivery>) {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        let registry = registry.clone();
        std::thread::spawn(move || {
            crate::worker::set_current(worker);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if relay {
                    let r = registry.clone();
                    tokio::spawn(async move { r.wake_relay(worker).await });
                    tokio::task::yield_now().await;
                }
                let handle = registry.register(format!("c{worker}"), "r".into(), 1 << 20);
                assert_eq!(handle.mailbox.worker, worker);
                registry.subscribe(&handle, "news", &[]);
                handle_tx.send(handle.clone()).expect("send handle");
                let mut out = Vec::new();
                loop {
                    handle.mailbox.notified().await;
                    handle.mailbox.drain(&mut out);
                    for d in out.drain(..) {
                        if tx.send(d).is_err() {
                            return;
                        }
                    }
                }
            });
        });
        (handle_rx.recv().expect("handle"), rx)
    }

    #[test]
    fn publishes_from_another_thread_reach_connections_on_workers_with_and_without_a_relay() {
        let registry = Arc::new(Registry::with_workers(2));
        let (_a, a) = worker_connection(&registry, 1, true);
        let (_b, b) = worker_connection(&registry, 2, false);
        assert!(
            registry.relays[0].running.load(Ordering::Acquire),
            "worker 1 runs its relay"
        );
        assert!(!registry.relays[1].running.load(Ordering::Acquire));
        for (i, s) in ["one", "two", "three"].into_iter().enumerate() {
            assert_eq!(registry.publish("news", &BTreeMap::new(), &text(s)), 2, "publish {i}");
            let wait = Duration::from_secs(10);
            assert_eq!(a.recv_timeout(wait).expect("worker 1 woken (relay)"), text(s));
            assert_eq!(b.recv_timeout(wait).expect("worker 2 woken (directly)"), text(s));
        }
        assert_eq!(registry.stats.delivered.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn publishes_see_every_subscription_change_since_the_last_one() {
        let registry = Registry::new();
        let a = registry.register("a".into(), "r".into(), 1 << 20);
        let b = registry.register("b".into(), "r".into(), 1 << 20);
        let got = |h: &ConnHandle| {
            let mut out = Vec::new();
            h.mailbox.drain(&mut out);
            out
        };
        let none = BTreeMap::new();
        assert!(registry.subscribe(&a, "news", &[]));
        assert_eq!(registry.publish("news", &none, &text("1")), 1);
        assert_eq!(registry.publish("news", &none, &text("2")), 1, "the same snapshot");
        assert!(!registry.subscribe(&b, "news", &[]));
        assert_eq!(
            registry.publish("news", &none, &text("3")),
            2,
            "a new subscriber is seen"
        );
        assert!(!registry.unsubscribe("a", "news"));
        assert_eq!(registry.publish("news", &none, &text("4")), 1, "a gone one is not");
        assert_eq!(got(&a), vec![text("1"), text("2"), text("3")]);
        assert_eq!(got(&b), vec![text("3"), text("4")]);
        assert!(registry.unsubscribe("b", "news"), "the channel is empty");
        assert_eq!(registry.publish("news", &none, &text("5")), 0);
        assert!(registry.channels().is_empty());
    }

    #[test]
    fn a_stopped_relay_hands_back_to_direct_wakes() {
        let registry = Arc::new(Registry::with_workers(1));
        let relay = &registry.relays[0];
        relay.running.store(true, Ordering::Release);
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let waker = std::task::Waker::from(Arc::new(Count(woken.clone())));
        // Handed over while the relay looked running, but nobody polls it: the guard of a
        // relay that ends wakes what is left.
        let mut batch = RelayBatch::new(&registry.relays);
        batch.wake(1, waker.clone());
        batch.finish();
        assert_eq!(woken.load(Ordering::SeqCst), 0, "queued for the relay");
        drop(RelayRunning(relay));
        assert_eq!(woken.load(Ordering::SeqCst), 1, "woken when the relay stopped");
        // Once stopped, wakers are woken at once.
        let mut batch = RelayBatch::new(&registry.relays);
        batch.wake(1, waker);
        assert_eq!(woken.load(Ordering::SeqCst), 2);
        batch.finish();
        assert!(lock(&relay.queue).is_empty());
    }
}
