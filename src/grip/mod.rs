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
    /// The subscribers as a publish walks them, by data-plane worker: made by the first
    /// publish after a change and shared by the publishes after it, which then neither copy
    /// the list nor hold the lock while delivering.
    snapshot: Option<Arc<[Group]>>,
}

/// The subscribers of a channel whose connections run on one data-plane worker.
struct Group {
    subs: Arc<[Subscriber]>,
    /// Whether any of them has filters (then a publish checks them one by one).
    filtered: bool,
}

/// Groups `subs` by the worker running each connection: index `w` holds worker `w`'s,
/// index 0 those not on a worker with a relay (`relays` workers have one each).
fn group_by_worker<'a>(subs: impl Iterator<Item = &'a Subscriber>, relays: usize) -> Arc<[Group]> {
    let mut by_worker: Vec<Vec<Subscriber>> = (0..=relays).map(|_| Vec::new()).collect();
    for s in subs {
        let w = s.conn.mailbox.worker;
        by_worker[if w <= relays { w } else { 0 }].push(s.clone());
    }
    by_worker
        .into_iter()
        .map(|subs| Group {
            filtered: subs.iter().any(|s| !s.filters.is_empty()),
            subs: subs.into(),
        })
        .collect()
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
    /// Publishes that found a worker's delivery queue full (`--publish-backlog`) and delivered
    /// its queued jobs on the publishing thread.
    pub publish_backlog_full: AtomicU64,
    /// Deliveries skipped by filters.
    pub filtered: AtomicU64,
}

const SHARDS: usize = 16;

/// Default of `--publish-backlog`: publish jobs queued per data-plane worker.
pub const DEFAULT_PUBLISH_BACKLOG: usize = 4096;

/// Delivers publishes to the connections of one data-plane worker, on that worker's thread.
///
/// A publish to thousands of subscribers, made on another thread, would touch every
/// subscriber's mailbox and waker from that thread (cache lines the worker's core owns, moved
/// across cores for each delivery), and waking a task of a single-threaded runtime from
/// another thread wakes that runtime's thread (a syscall) each time. A publish instead hands
/// each worker one job (the item and the worker's share of the channel's subscribers) and
/// wakes the worker's relay task once; the relay queues the item to each mailbox and wakes
/// each connection's task locally. Jobs run in the order they were handed over, so deliveries
/// to a connection keep publish order.
///
/// The queue is bounded (`--publish-backlog`): a publish that finds it full runs the queued
/// jobs and its own on the publishing thread, which then goes at the pace of delivery.
#[derive(Default)]
struct Relay {
    jobs: Mutex<Vec<Job>>,
    /// Held while jobs taken from the queue run, so batches run one after another in order
    /// (the relay's, or a publisher's that found the queue full).
    running_jobs: Mutex<()>,
    task: futures_util::task::AtomicWaker,
    /// Set while the relay task runs (a job handed to a relay that doesn't run would be
    /// lost: then the publishing thread runs it).
    running: std::sync::atomic::AtomicBool,
}

/// One publish to the subscribers of one worker.
struct Job {
    targets: Targets,
    delivery: Delivery,
}

enum Targets {
    /// Every subscriber of the group (none has filters).
    All(Arc<[Subscriber]>),
    /// Those the filters allowed.
    Some(Vec<Arc<ConnHandle>>),
}

impl Targets {
    fn len(&self) -> usize {
        match self {
            Targets::All(subs) => subs.len(),
            Targets::Some(conns) => conns.len(),
        }
    }
}

impl Job {
    /// Queues the delivery to every target and wakes their tasks; counts what was queued
    /// and the slow consumers it found.
    fn run(self, stats: &RegistryStats) {
        let mut delivered = 0;
        let mut push = |mailbox: &Mailbox| match mailbox.push(self.delivery.clone()) {
            PushOutcome::Queued => delivered += 1,
            PushOutcome::Overflow => {
                stats.slow_consumer_drops.fetch_add(1, Ordering::Relaxed);
            }
            PushOutcome::Closed => {}
        };
        match &self.targets {
            Targets::All(subs) => subs.iter().for_each(|s| push(&s.conn.mailbox)),
            Targets::Some(conns) => conns.iter().for_each(|c| push(&c.mailbox)),
        }
        stats.delivered.fetch_add(delivered, Ordering::Relaxed);
    }
}

impl Relay {
    /// Hands `job` to the relay and wakes its task. Runs the queue here when the relay has
    /// stopped, or when more than `backlog` jobs wait.
    fn submit(&self, job: Job, backlog: usize, stats: &RegistryStats) {
        let queued = {
            let mut jobs = lock(&self.jobs);
            jobs.push(job);
            jobs.len()
        };
        if queued > backlog {
            stats.publish_backlog_full.fetch_add(1, Ordering::Relaxed);
            self.run_queued(stats);
            return;
        }
        self.task.wake();
        if !self.running.load(Ordering::Acquire) {
            // The relay stopped meanwhile (its runtime is ending): run what is left here.
            self.run_queued(stats);
        }
    }

    /// Runs the queued jobs on this thread, after any batch already running.
    fn run_queued(&self, stats: &RegistryStats) {
        let _running = lock(&self.running_jobs);
        for job in std::mem::take(&mut *lock(&self.jobs)) {
            job.run(stats);
        }
    }
}

/// Marks a relay stopped when its task ends or is dropped.
struct RelayRunning<'a> {
    relay: &'a Relay,
    stats: &'a RegistryStats,
}

impl Drop for RelayRunning<'_> {
    fn drop(&mut self) {
        self.relay.running.store(false, Ordering::Release);
        // Jobs handed over after the last poll: run them here.
        self.relay.run_queued(self.stats);
    }
}

/// All live connections and channel subscriptions of this replica.
pub struct Registry {
    conns: Vec<Mutex<HashMap<String, Arc<ConnHandle>>>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// One per data-plane worker (index = worker - 1).
    relays: Box<[Relay]>,
    /// Most publish jobs queued for one worker's relay.
    backlog: usize,
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
        Self::with_workers(0, DEFAULT_PUBLISH_BACKLOG)
    }

    /// An empty registry with a delivery relay for each of `workers` data-plane workers
    /// (each worker runs its relay with [`Self::relay`]), each queueing at most `backlog`
    /// publish jobs (at least 1).
    pub fn with_workers(workers: usize, backlog: usize) -> Self {
        Self {
            conns: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            channels: Mutex::new(HashMap::new()),
            relays: (0..workers).map(|_| Relay::default()).collect(),
            backlog: backlog.max(1),
            stats: RegistryStats::default(),
        }
    }

    /// Runs worker `worker`'s delivery relay (see `Relay`): a task on that worker's runtime
    /// that never ends by itself. Returns at once for an unknown worker.
    pub async fn relay(&self, worker: usize) {
        let Some(relay) = worker.checked_sub(1).and_then(|i| self.relays.get(i)) else {
            return;
        };
        relay.running.store(true, Ordering::Release);
        let _running = RelayRunning {
            relay,
            stats: &self.stats,
        };
        std::future::poll_fn(|cx| {
            relay.task.register(cx.waker());
            relay.run_queued(&self.stats);
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
    /// many connections it was addressed to. The subscribers on a data-plane worker get it
    /// through that worker's relay (queued and woken on the worker's thread, shortly after
    /// this returns), the others before this returns; either way in publish order.
    pub fn publish(&self, channel: &str, item_meta: &BTreeMap<String, String>, d: &Delivery) -> usize {
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let groups = {
            let mut ch = lock(&self.channels);
            let Some(c) = ch.get_mut(channel) else {
                return 0;
            };
            c.snapshot
                .get_or_insert_with(|| group_by_worker(c.subs.values(), self.relays.len()))
                .clone()
        };
        let mut n = 0;
        for (worker, group) in groups.iter().enumerate() {
            if group.subs.is_empty() {
                continue;
            }
            let targets = if group.filtered {
                Targets::Some(self.allowed(&group.subs, item_meta))
            } else {
                Targets::All(group.subs.clone())
            };
            n += targets.len();
            let job = Job {
                targets,
                delivery: d.clone(),
            };
            match worker
                .checked_sub(1)
                .and_then(|i| self.relays.get(i))
                .filter(|r| r.running.load(Ordering::Acquire))
            {
                Some(relay) => relay.submit(job, self.backlog, &self.stats),
                None => job.run(&self.stats),
            }
        }
        n
    }

    /// The connections of `subs` whose filters allow an item with `item_meta`; counts the
    /// others.
    fn allowed(&self, subs: &[Subscriber], item_meta: &BTreeMap<String, String>) -> Vec<Arc<ConnHandle>> {
        let mut out = Vec::with_capacity(subs.len());
        for s in subs {
            if !s.filters.is_empty() {
                let info = lock(&s.conn.info);
                let is_subscribed = |c: &str| info.channels.iter().any(|x| x == c);
                if !filters_allow(&s.filters, &info.sub_meta, item_meta, &is_subscribed) {
                    self.stats.filtered.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            out.push(s.conn.clone());
        }
        out
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
    /// `relay`, the worker runs its delivery relay. The connection subscribes to `news` with
    /// `filters`. Returns the handle and the deliveries.
    fn worker_connection(
        registry: &Arc<Registry>,
        worker: usize,
        relay: bool,
        filters: &[&str],
    ) -> (Arc<ConnHandle>, std::sync::mpsc::Receiver<Delivery>) {
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
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
                    tokio::spawn(async move { r.relay(worker).await });
                    tokio::task::yield_now().await;
                }
                let handle = registry.register(format!("c{worker}"), "r".into(), 1 << 20);
                assert_eq!(handle.mailbox.worker, worker);
                registry.subscribe(&handle, "news", &filters);
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
        let registry = Arc::new(Registry::with_workers(2, DEFAULT_PUBLISH_BACKLOG));
        let (a_conn, a) = worker_connection(&registry, 1, true, &["skip-self"]);
        let (_b, b) = worker_connection(&registry, 2, false, &[]);
        assert!(
            registry.relays[0].running.load(Ordering::Acquire),
            "worker 1 runs its relay"
        );
        assert!(!registry.relays[1].running.load(Ordering::Acquire));
        let wait = Duration::from_secs(10);
        let none = BTreeMap::new();
        for (i, s) in ["one", "two", "three"].into_iter().enumerate() {
            assert_eq!(registry.publish("news", &none, &text(s)), 2, "publish {i}");
            assert_eq!(a.recv_timeout(wait).expect("worker 1 (relay)"), text(s));
            assert_eq!(b.recv_timeout(wait).expect("worker 2 (directly)"), text(s));
        }
        // Filters are checked for subscribers on a relay's worker too.
        a_conn.set_info(ConnInfo {
            sub_meta: BTreeMap::from([("user".to_owned(), "alice".to_owned())]),
            channels: vec!["news".to_owned()],
            ..ConnInfo::default()
        });
        let from_alice = BTreeMap::from([("sender".to_owned(), "alice".to_owned())]);
        assert_eq!(registry.publish("news", &from_alice, &text("own")), 1);
        assert_eq!(registry.publish("news", &none, &text("four")), 2);
        assert_eq!(b.recv_timeout(wait).expect("b"), text("own"));
        assert_eq!(b.recv_timeout(wait).expect("b"), text("four"));
        assert_eq!(
            a.recv_timeout(wait).expect("a"),
            text("four"),
            "alice's own message skipped"
        );
        assert_eq!(registry.stats.filtered.load(Ordering::Relaxed), 1);
        assert_eq!(registry.stats.delivered.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn publishes_see_every_subscription_change_since_the_last_one() {
        let registry = Registry::new();
        let a = registry.register("a".into(), "r".into(), 1 << 20);
        let b = registry.register("b".into(), "r".into(), 1 << 20);
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
        assert_eq!(drained(&a), vec![text("1"), text("2"), text("3")]);
        assert_eq!(drained(&b), vec![text("3"), text("4")]);
        assert!(registry.unsubscribe("b", "news"), "the channel is empty");
        assert_eq!(registry.publish("news", &none, &text("5")), 0);
        assert!(registry.channels().is_empty());
    }

    /// A connection of worker 1 subscribed to `news`, in a registry whose worker-1 relay looks
    /// running but is never polled (like a busy worker); the test thread stays worker 0.
    fn unpolled_relay_connection(registry: &Registry) -> Arc<ConnHandle> {
        registry.relays[0].running.store(true, Ordering::Release);
        crate::worker::set_current(1);
        let conn = registry.register("a".into(), "r".into(), 1 << 20);
        crate::worker::set_current(0);
        registry.subscribe(&conn, "news", &[]);
        conn
    }

    /// What `conn`'s mailbox holds.
    fn drained(conn: &ConnHandle) -> Vec<Delivery> {
        let mut out = Vec::new();
        conn.mailbox.drain(&mut out);
        out
    }

    #[test]
    fn a_full_backlog_is_delivered_by_the_publisher_in_order() {
        let registry = Registry::with_workers(1, 2);
        let relay = &registry.relays[0];
        let conn = unpolled_relay_connection(&registry);
        let drained = || drained(&conn);
        let none = BTreeMap::new();
        for s in ["1", "2"] {
            assert_eq!(registry.publish("news", &none, &text(s)), 1);
        }
        assert_eq!(drained(), vec![], "two jobs wait for the relay");
        assert_eq!(registry.stats.publish_backlog_full.load(Ordering::Relaxed), 0);
        // The third finds the queue over its bound: the publisher delivers all three, in order.
        assert_eq!(registry.publish("news", &none, &text("3")), 1);
        assert_eq!(drained(), vec![text("1"), text("2"), text("3")]);
        assert!(lock(&relay.jobs).is_empty());
        assert_eq!(registry.stats.publish_backlog_full.load(Ordering::Relaxed), 1);
        assert_eq!(registry.stats.delivered.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_stopped_relay_hands_its_jobs_back_to_the_publisher() {
        let registry = Registry::with_workers(1, DEFAULT_PUBLISH_BACKLOG);
        let relay = &registry.relays[0];
        let conn = unpolled_relay_connection(&registry);
        let drained = || drained(&conn);
        let none = BTreeMap::new();
        assert_eq!(registry.publish("news", &none, &text("1")), 1);
        assert_eq!(drained(), vec![], "handed to the relay, not queued yet");
        assert_eq!(registry.stats.delivered.load(Ordering::Relaxed), 0);
        // The guard of a relay that ends runs what was handed over after its last poll.
        drop(RelayRunning {
            relay,
            stats: &registry.stats,
        });
        assert_eq!(registry.stats.delivered.load(Ordering::Relaxed), 1);
        // Once stopped, publishes are delivered by the publishing thread.
        assert_eq!(registry.publish("news", &none, &text("2")), 1);
        assert_eq!(drained(), vec![text("1"), text("2")]);
        assert_eq!(registry.stats.delivered.load(Ordering::Relaxed), 2);
        assert!(lock(&relay.jobs).is_empty());
    }
}
