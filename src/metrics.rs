//! Metrics of the data plane and their exposition at `GET /metrics` on the admin listener.
//!
//! Counters are plain atomics bumped where things happen. Per-route counters live in a
//! [`RouteMetrics`] that a connection looks up once, when it starts, and then holds: counting a
//! message is one relaxed atomic add per counter, with no allocation, lock or label lookup.
//! Everything else (handshakes, publishes, subscriptions, open connections, the route table
//! and the state of its source, the NATS state) is read from the owning structures at scrape
//! time.
//!
//! The exposition is written by hand ([`Exposition`]) in the OpenMetrics text format, with
//! trace-id exemplars on the backend latency histogram, or in the Prometheus text format 0.0.4
//! (no exemplars) for scrapers that do not ask for OpenMetrics ([`Format::negotiate`]).
//!
//! # Metric families
//!
//! | name | type | labels |
//! |---|---|---|
//! | `wsgate_build_info` | gauge (1) | `version` |
//! | `wsgate_open_connections` | gauge | `route` |
//! | `wsgate_handshakes_total` | counter | `outcome` = `accepted`, `rejected`, `failed`, `over_limit` |
//! | `wsgate_http_requests_total` | counter | |
//! | `wsgate_messages_total` | counter | `route`, `direction` = `client_to_backend`, `backend_to_client` |
//! | `wsgate_message_bytes_total` | counter | `route`, `direction` |
//! | `wsgate_backend_request_duration_seconds` | histogram, exemplar `trace_id` | `route` |
//! | `wsgate_backend_errors_total` | counter | `route`, `kind` = `connect`, `timeout`, `too_large`, `failed`, `status` |
//! | `wsgate_backend_retries_total` | counter | `route` |
//! | `wsgate_keepalives_total` | counter | `route` |
//! | `wsgate_publishes_total` | counter | |
//! | `wsgate_deliveries_total` | counter | |
//! | `wsgate_deliveries_filtered_total` | counter | |
//! | `wsgate_slow_consumer_drops_total` | counter | |
//! | `wsgate_publish_backlog_full_total` | counter | |
//! | `wsgate_subscriptions` | gauge | |
//! | `wsgate_nats_state` | gauge (only once a source is set) | |
//! | `wsgate_config_info` | gauge (1) | `version` (the table's exact version, as `/readyz` shows it), `source` = `static`, `file`, `control` |
//! | `wsgate_config_version` | gauge | |
//! | `wsgate_config_source_up` | gauge | |
//! | `wsgate_config_reload_failures_total` | counter | |
//! | `wsgate_config_last_success_timestamp_seconds` | gauge (only once there was one) | |
//!
//! `wsgate_config_version` is the *generation* of the route table in use: 1 for the table the
//! gateway started with, plus one per applied reload or controller snapshot (with `control`,
//! 0 until the first snapshot). The version itself goes in `wsgate_config_info`'s label: a
//! controller snapshot's version is a 64-bit content hash, which a sample value (a float64)
//! cannot hold exactly.
//!
//! The controller's families (`wsgate_controller_*`) are written by [`encode_controller`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::config::ReloadStatus;
use crate::config::control::ControlStatus;
use crate::controller::metrics::MetricsSnapshot;
use crate::server::{Gateway, ResponseBody, text_response};
use crate::session::{BackendError, BackendRequest, BackendResponse};
use crate::transport::backend::full_body;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the backend request duration buckets; `+Inf` follows.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets including `+Inf`.
const SLOTS: usize = DURATION_BUCKETS.len() + 1;

/// The two exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text: `# UNIT` lines, exemplars, `# EOF`.
    OpenMetrics,
    /// Prometheus text 0.0.4: no units, no exemplars.
    Prometheus,
}

impl Format {
    /// OpenMetrics when the `Accept` header lists it (as Prometheus does), Prometheus text
    /// otherwise.
    pub fn negotiate(accept: Option<&HeaderValue>) -> Self {
        let wants_om = accept.and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(',').any(|range| {
                range
                    .split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/openmetrics-text"))
            })
        });
        if wants_om { Self::OpenMetrics } else { Self::Prometheus }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// Direction of a WebSocket message through the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read from the client, sent on to the backend.
    ClientToBackend = 0,
    /// Sent to the client (from a backend response or a publish).
    BackendToClient = 1,
}

impl Direction {
    /// Both directions, in label order.
    pub const ALL: [Direction; 2] = [Direction::ClientToBackend, Direction::BackendToClient];

    /// The `direction` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientToBackend => "client_to_backend",
            Self::BackendToClient => "backend_to_client",
        }
    }
}

/// Why a backend request counted as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The backend was not reached.
    Connect = 0,
    /// No complete response within the request timeout.
    Timeout = 1,
    /// The response body was over the limit.
    TooLarge = 2,
    /// Any other transport failure.
    Failed = 3,
    /// The backend answered with a status outside 2xx.
    Status = 4,
}

impl BackendErrorKind {
    /// Every kind, in label order.
    pub const ALL: [BackendErrorKind; 5] = [
        BackendErrorKind::Connect,
        BackendErrorKind::Timeout,
        BackendErrorKind::TooLarge,
        BackendErrorKind::Failed,
        BackendErrorKind::Status,
    ];

    /// The kind of a failed request.
    pub fn of(err: &BackendError) -> Self {
        match err {
            BackendError::Connect(_) => Self::Connect,
            BackendError::Timeout => Self::Timeout,
            BackendError::TooLarge { .. } => Self::TooLarge,
            BackendError::Failed(_) => Self::Failed,
        }
    }

    /// The kind of a request's outcome, `None` for a 2xx answer.
    pub fn of_result(res: &Result<BackendResponse, BackendError>) -> Option<Self> {
        match res {
            Ok(r) if r.status.is_success() => None,
            Ok(_) => Some(Self::Status),
            Err(e) => Some(Self::of(e)),
        }
    }

    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::TooLarge => "too_large",
            Self::Failed => "failed",
            Self::Status => "status",
        }
    }
}

/// A latency observation picked as an exemplar of its bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    /// W3C trace id of the traced request.
    pub trace_id: u128,
    /// The observed value in seconds.
    pub value: f64,
    /// Unix time of the observation in seconds.
    pub timestamp: f64,
}

/// A fixed-bucket latency histogram ([`DURATION_BUCKETS`]) made of atomics, with the latest
/// exemplar of each bucket.
#[derive(Debug)]
pub struct Histogram {
    /// Non-cumulative bucket counts (the last one is `+Inf`).
    counts: [AtomicU64; SLOTS],
    sum_nanos: AtomicU64,
    /// Touched only for traced observations, and then with `try_lock`: a contended exemplar is
    /// skipped rather than waited for.
    exemplars: Mutex<[Option<Exemplar>; SLOTS]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative count per bucket, `+Inf` last (so the last one is the total count).
    pub cumulative: [u64; SLOTS],
    /// Sum of the observations in seconds.
    pub sum: f64,
    /// Latest exemplar per bucket.
    pub exemplars: [Option<Exemplar>; SLOTS],
}

impl HistogramSnapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative[SLOTS - 1]
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            exemplars: Mutex::new([None; SLOTS]),
        }
    }

    /// Records one duration; with a trace id it becomes its bucket's exemplar.
    pub fn observe(&self, d: Duration, trace_id: Option<u128>) {
        let secs = d.as_secs_f64();
        let slot = DURATION_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(SLOTS - 1);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some(trace_id) = trace_id
            && let Ok(mut ex) = self.exemplars.try_lock()
        {
            ex[slot] = Some(Exemplar {
                trace_id,
                value: secs,
                timestamp: unix_now(),
            });
        }
    }

    /// Reads the histogram (counts are read one by one: a concurrent observation may show
    /// in a bucket and not yet in the sum).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; SLOTS];
        let mut acc = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Ordering::Relaxed);
            cumulative[i] = acc;
        }
        let exemplars = *self.exemplars.lock().unwrap_or_else(|e| e.into_inner());
        HistogramSnapshot {
            cumulative,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            exemplars,
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Counters of one route, shared by all of its connections. A connection takes its handle
/// from [`Metrics::route`] when it starts.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    messages: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    backend_duration: Histogram,
    backend_errors: [AtomicU64; 5],
    retries: AtomicU64,
    keep_alives: AtomicU64,
}

impl RouteMetrics {
    /// Counts one data message (text or binary) of `payload` bytes.
    #[inline]
    pub fn record_message(&self, dir: Direction, payload: usize) {
        self.messages[dir as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[dir as usize].fetch_add(payload as u64, Ordering::Relaxed);
    }

    /// Counts a backend request as it is sent: retries (`attempt > 0`) and keep-alives (a
    /// first try with an empty body).
    #[inline]
    pub fn record_request_sent(&self, req: &BackendRequest) {
        if req.attempt > 0 {
            self.retries.fetch_add(1, Ordering::Relaxed);
        } else if req.body.is_empty() {
            self.keep_alives.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a finished backend request: its duration (with the trace id as exemplar when
    /// traced) and its error kind, if any.
    pub fn record_backend(
        &self,
        elapsed: Duration,
        res: &Result<BackendResponse, BackendError>,
        trace_id: Option<u128>,
    ) {
        self.backend_duration.observe(elapsed, trace_id);
        if let Some(kind) = BackendErrorKind::of_result(res) {
            self.backend_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Data messages counted in `dir`.
    pub fn messages(&self, dir: Direction) -> u64 {
        self.messages[dir as usize].load(Ordering::Relaxed)
    }

    /// Payload bytes counted in `dir`.
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes[dir as usize].load(Ordering::Relaxed)
    }

    /// Backend errors of `kind`.
    pub fn backend_errors(&self, kind: BackendErrorKind) -> u64 {
        self.backend_errors[kind as usize].load(Ordering::Relaxed)
    }

    /// Backend request retries.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Keep-alive requests.
    pub fn keep_alives(&self) -> u64 {
        self.keep_alives.load(Ordering::Relaxed)
    }

    /// The backend request duration histogram.
    pub fn backend_duration(&self) -> &Histogram {
        &self.backend_duration
    }
}

/// Reads the NATS connection state for `wsgate_nats_state`.
pub type NatsStateFn = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The gateway's metric state beyond the counters its other parts already keep.
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
    nats_state: RwLock<Option<NatsStateFn>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters of route `name`, created on first use. Call once per connection and keep
    /// the handle: this takes a lock.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        // A poisoned lock only means a panic mid-insert; the map is still consistent.
        let mut m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = m.get(name) {
            return r.clone();
        }
        let r = Arc::new(RouteMetrics::default());
        m.insert(name.to_owned(), r.clone());
        r
    }

    /// Every route with counters, by name.
    pub fn routes(&self) -> Vec<(String, Arc<RouteMetrics>)> {
        let m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Sets the source of `wsgate_nats_state` (the NATS bridge's connection state, e.g.
    /// `1` connected, `0` not). Called at every scrape; must be cheap and must not block.
    pub fn set_nats_state_fn(&self, f: impl Fn() -> i64 + Send + Sync + 'static) {
        let mut slot = self.nats_state.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(Arc::new(f));
    }

    /// The NATS state, when a source is set.
    pub fn nats_state(&self) -> Option<i64> {
        let f = self.nats_state.read().unwrap_or_else(|e| e.into_inner()).clone();
        f.map(|f| f())
    }
}

/// Where the route table comes from, with the status its loader keeps: the
/// `wsgate_config_*` families are read from it at scrape time.
#[derive(Debug, Clone, Copy)]
pub enum ConfigSource<'a> {
    /// Fixed at startup (`--backend`), or set by an embedding program.
    Static,
    /// A routes file, polled for changes.
    File(&'a ReloadStatus),
    /// Snapshots from the controller's control API.
    Control(&'a ControlStatus),
}

impl ConfigSource<'_> {
    /// The `source` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::File(_) => "file",
            Self::Control(_) => "control",
        }
    }

    /// Generation of the table in use: 1 for the startup table plus one per applied reload
    /// (a routes file), or the number of snapshots applied (the controller; 0 before the
    /// first). Always 1 for a static table.
    pub fn generation(self) -> u64 {
        match self {
            Self::Static => 1,
            Self::File(s) => s.generation(),
            Self::Control(s) => s.updates(),
        }
    }

    /// Whether the source is healthy: the controller's last answer was good, the routes
    /// file as last read is valid and in use. A static table always is.
    pub fn is_up(self) -> bool {
        match self {
            Self::Static => true,
            Self::File(s) => s.is_up(),
            Self::Control(s) => s.is_up(),
        }
    }

    /// Failed reloads of the routes file, or failed control API requests and rejected
    /// snapshots.
    pub fn failures(self) -> u64 {
        match self {
            Self::Static => 0,
            Self::File(s) => s.reloads_failed(),
            Self::Control(s) => s.failures(),
        }
    }

    /// The last time the source was read successfully with its content in use; `None` for a
    /// static table and before the first success.
    pub fn last_success(self) -> Option<SystemTime> {
        match self {
            Self::Static => None,
            Self::File(s) => s.last_success(),
            Self::Control(s) => s.last_success(),
        }
    }
}

/// Type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter (samples end in `_total`).
    Counter,
    /// Value that goes up and down.
    Gauge,
    /// Bucketed distribution (`_bucket`, `_sum`, `_count`).
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A text exposition being written. Families are written whole, one after the other:
/// [`Exposition::family`] then its samples.
#[derive(Debug)]
pub struct Exposition {
    out: String,
    format: Format,
    family: String,
    kind: Kind,
}

impl Exposition {
    /// An empty exposition.
    pub fn new(format: Format) -> Self {
        Self {
            out: String::with_capacity(4096),
            format,
            family: String::new(),
            kind: Kind::Gauge,
        }
    }

    /// Starts a family. `name` is the family name without `_total` (for a counter) and ends
    /// with `_<unit>` when `unit` is given; `help` must be one line.
    pub fn family(&mut self, name: &str, kind: Kind, unit: Option<&str>, help: &str) {
        self.family.clear();
        self.family.push_str(name);
        self.kind = kind;
        // The Prometheus format names a counter family after its `_total` samples.
        let shown = match (self.format, kind) {
            (Format::Prometheus, Kind::Counter) => format!("{name}_total"),
            _ => name.to_owned(),
        };
        let _ = writeln!(self.out, "# HELP {shown} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {shown} {}", kind.as_str());
        // Histograms keep their unit in the name only: some OpenMetrics parsers refuse `# UNIT`
        // on them.
        if let (Format::OpenMetrics, Some(unit), Kind::Counter | Kind::Gauge) = (self.format, unit, kind) {
            let _ = writeln!(self.out, "# UNIT {shown} {unit}");
        }
    }

    /// One counter sample of the current family.
    pub fn counter(&mut self, labels: &[(&str, &str)], value: u64) {
        debug_assert_eq!(self.kind, Kind::Counter);
        self.sample_head("_total", labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// One gauge sample of the current family.
    pub fn gauge(&mut self, labels: &[(&str, &str)], value: i64) {
        debug_assert_eq!(self.kind, Kind::Gauge);
        self.sample_head("", labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// One gauge sample of the current family with a fractional value (e.g. a timestamp).
    pub fn gauge_f64(&mut self, labels: &[(&str, &str)], value: f64) {
        debug_assert_eq!(self.kind, Kind::Gauge);
        self.sample_head("", labels, None);
        let _ = writeln!(self.out, " {}", float(value));
    }

    /// The samples of one histogram of the current family.
    pub fn histogram(&mut self, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        debug_assert_eq!(self.kind, Kind::Histogram);
        for (i, &count) in h.cumulative.iter().enumerate() {
            let le = DURATION_BUCKETS.get(i).map_or_else(|| "+Inf".to_owned(), |b| float(*b));
            self.sample_head("_bucket", labels, Some(&le));
            let _ = write!(self.out, " {count}");
            if let (Format::OpenMetrics, Some(ex)) = (self.format, &h.exemplars[i]) {
                let _ = write!(
                    self.out,
                    " # {{trace_id=\"{:032x}\"}} {} {}",
                    ex.trace_id,
                    float(ex.value),
                    float(ex.timestamp)
                );
            }
            self.out.push('\n');
        }
        self.sample_head("_sum", labels, None);
        let _ = writeln!(self.out, " {}", float(h.sum));
        self.sample_head("_count", labels, None);
        let _ = writeln!(self.out, " {}", h.count());
    }

    fn sample_head(&mut self, suffix: &str, labels: &[(&str, &str)], le: Option<&str>) {
        self.out.push_str(&self.family);
        self.out.push_str(suffix);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        let all = labels.iter().copied().chain(le.map(|v| ("le", v)));
        for (k, v) in all {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_into(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// The finished text (with `# EOF` for OpenMetrics).
    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// A float as OpenMetrics wants it: always with a decimal point or exponent, `+Inf`/`-Inf`/`NaN`.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v:?}")
    }
}

fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    escape_label_into(&mut s, v);
    s
}

/// Renders every gateway metric; `source` is where the route table comes from.
pub fn render(gw: &Gateway, source: ConfigSource<'_>, format: Format) -> String {
    let mut e = Exposition::new(format);
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);

    e.family("wsgate_build_info", Kind::Gauge, None, "wsgate build information.");
    e.gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1);

    let mut open = gw.route_connections();
    open.sort();
    e.family(
        "wsgate_open_connections",
        Kind::Gauge,
        None,
        "WebSocket connections open now (handshakes in progress included), by route.",
    );
    for (route, n) in &open {
        e.gauge(&[("route", route)], i64::try_from(*n).unwrap_or(i64::MAX));
    }

    let s = &gw.stats;
    e.family(
        "wsgate_handshakes",
        Kind::Counter,
        None,
        "WebSocket handshakes by outcome.",
    );
    for (outcome, v) in [
        ("accepted", &s.handshakes_accepted),
        ("rejected", &s.handshakes_rejected),
        ("failed", &s.handshakes_failed),
        ("over_limit", &s.handshakes_over_limit),
    ] {
        e.counter(&[("outcome", outcome)], get(v));
    }
    e.family(
        "wsgate_http_requests",
        Kind::Counter,
        None,
        "Plain HTTP requests passed through.",
    );
    e.counter(&[], get(&s.http_requests));

    let routes = gw.metrics.routes();
    e.family(
        "wsgate_messages",
        Kind::Counter,
        None,
        "WebSocket data messages (text and binary) by route and direction.",
    );
    for (route, m) in &routes {
        for dir in Direction::ALL {
            e.counter(&[("route", route), ("direction", dir.label())], m.messages(dir));
        }
    }
    e.family(
        "wsgate_message_bytes",
        Kind::Counter,
        Some("bytes"),
        "Payload bytes of WebSocket data messages by route and direction.",
    );
    for (route, m) in &routes {
        for dir in Direction::ALL {
            e.counter(&[("route", route), ("direction", dir.label())], m.bytes(dir));
        }
    }
    e.family(
        "wsgate_backend_request_duration_seconds",
        Kind::Histogram,
        Some("seconds"),
        "Duration of backend requests (WebSocket-over-HTTP), by route.",
    );
    for (route, m) in &routes {
        e.histogram(&[("route", route)], &m.backend_duration().snapshot());
    }
    e.family(
        "wsgate_backend_errors",
        Kind::Counter,
        None,
        "Failed backend requests by route and kind.",
    );
    for (route, m) in &routes {
        for kind in BackendErrorKind::ALL {
            e.counter(&[("route", route), ("kind", kind.label())], m.backend_errors(kind));
        }
    }
    e.family(
        "wsgate_backend_retries",
        Kind::Counter,
        None,
        "Backend request retries by route.",
    );
    for (route, m) in &routes {
        e.counter(&[("route", route)], m.retries());
    }
    e.family(
        "wsgate_keepalives",
        Kind::Counter,
        None,
        "Keep-alive requests sent to backends, by route.",
    );
    for (route, m) in &routes {
        e.counter(&[("route", route)], m.keep_alives());
    }

    let r = &gw.registry.stats;
    e.family(
        "wsgate_publishes",
        Kind::Counter,
        None,
        "Publish items handled (local and from NATS).",
    );
    e.counter(&[], get(&r.published));
    e.family(
        "wsgate_deliveries",
        Kind::Counter,
        None,
        "Published messages queued to connections.",
    );
    e.counter(&[], get(&r.delivered));
    e.family(
        "wsgate_deliveries_filtered",
        Kind::Counter,
        None,
        "Deliveries skipped by subscription filters.",
    );
    e.counter(&[], get(&r.filtered));
    e.family(
        "wsgate_slow_consumer_drops",
        Kind::Counter,
        None,
        "Connections closed because they did not keep up with deliveries.",
    );
    e.counter(&[], get(&r.slow_consumer_drops));
    e.family(
        "wsgate_publish_backlog_full",
        Kind::Counter,
        None,
        "Publishes that found a worker's delivery queue full (--publish-backlog) and delivered on the publishing thread.",
    );
    e.counter(&[], get(&r.publish_backlog_full));
    e.family(
        "wsgate_subscriptions",
        Kind::Gauge,
        None,
        "Channel subscriptions of local connections.",
    );
    e.gauge(&[], i64::try_from(gw.registry.subscription_count()).unwrap_or(i64::MAX));

    if let Some(state) = gw.metrics.nats_state() {
        e.family(
            "wsgate_nats_state",
            Kind::Gauge,
            None,
            "NATS connection state (1 connected, 0 not).",
        );
        e.gauge(&[], state);
    }
    encode_config(&mut e, gw.table.load().version(), source);
    e.finish()
}

/// The `wsgate_config_*` families, for the table at `version` from `source`.
fn encode_config(e: &mut Exposition, version: u64, source: ConfigSource<'_>) {
    e.family(
        "wsgate_config_info",
        Kind::Gauge,
        None,
        "The route table in use: its exact version (as /readyz shows it) and where it comes from.",
    );
    e.gauge(&[("version", &version.to_string()), ("source", source.label())], 1);
    e.family(
        "wsgate_config_version",
        Kind::Gauge,
        None,
        "Generation of the route table in use: 1 for the first (the startup table, or the controller's first snapshot), plus one per applied reload or snapshot.",
    );
    e.gauge(&[], i64::try_from(source.generation()).unwrap_or(i64::MAX));
    e.family(
        "wsgate_config_source_up",
        Kind::Gauge,
        None,
        "1 while the route source is healthy (controller answering, routes file valid), 0 while the last good table is kept.",
    );
    e.gauge(&[], i64::from(source.is_up()));
    e.family(
        "wsgate_config_reload_failures",
        Kind::Counter,
        None,
        "Routes file reloads rejected or unreadable, or control API requests failed and snapshots rejected.",
    );
    e.counter(&[], source.failures());
    e.family(
        "wsgate_config_last_success_timestamp_seconds",
        Kind::Gauge,
        Some("seconds"),
        "Unix time the route source was last read successfully with its content in use.",
    );
    if let Some(at) = source.last_success() {
        let secs = at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        e.gauge_f64(&[], secs);
    }
}

/// Writes the controller's families (`wsgate_controller_*`); `reconcile_durations` adds
/// `wsgate_controller_reconcile_duration_seconds` when the controller keeps one.
pub fn encode_controller(e: &mut Exposition, s: &MetricsSnapshot, reconcile_durations: Option<&Histogram>) {
    let counters = [
        ("wsgate_controller_reconciles", "Reconciles run.", s.reconciles),
        (
            "wsgate_controller_reconcile_errors",
            "Reconciles that failed.",
            s.reconcile_errors,
        ),
        (
            "wsgate_controller_status_writes",
            "Status patches written.",
            s.status_writes,
        ),
        ("wsgate_controller_events", "Kubernetes Events published.", s.events),
        (
            "wsgate_controller_snapshots_served",
            "Snapshots sent to gateways.",
            s.snapshots_served,
        ),
        (
            "wsgate_controller_snapshots_unchanged",
            "Snapshot long polls that ended without a change.",
            s.snapshots_unchanged,
        ),
        (
            "wsgate_controller_auth_failures",
            "Control API requests refused for authentication or authorization.",
            s.auth_failures,
        ),
        (
            "wsgate_controller_leader_acquisitions",
            "Times this instance became the leader.",
            s.leader_acquisitions,
        ),
    ];
    for (name, help, v) in counters {
        e.family(name, Kind::Counter, None, help);
        e.counter(&[], v);
    }
    e.family(
        "wsgate_controller_leader",
        Kind::Gauge,
        None,
        "1 while this instance holds the Lease.",
    );
    e.gauge(&[], i64::from(s.leader));
    if let Some(h) = reconcile_durations {
        e.family(
            "wsgate_controller_reconcile_duration_seconds",
            Kind::Histogram,
            Some("seconds"),
            "Duration of reconciles.",
        );
        e.histogram(&[], &h.snapshot());
    }
}

/// The `GET /metrics` response, in the format the `Accept` header asks for.
pub fn response(gw: &Gateway, source: ConfigSource<'_>, request_headers: &HeaderMap) -> Response<ResponseBody> {
    let format = Format::negotiate(request_headers.get(header::ACCEPT));
    let mut r = Response::new(full_body(render(gw, source, format).into()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    r
}

/// `405` for other methods on `/metrics`.
pub fn method_not_allowed() -> Response<ResponseBody> {
    let mut r = text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_counts(h: &HistogramSnapshot) -> Vec<u64> {
        h.cumulative.to_vec()
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_is_seconds() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(300), None); // <= 0.0005
        h.observe(Duration::from_millis(3), None); // <= 0.005
        h.observe(Duration::from_secs(20), None); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count(), 3);
        let c = le_counts(&s);
        assert_eq!(c[0], 1);
        assert_eq!(c[2], 1, "0.0025 bucket");
        assert_eq!(c[3], 2, "0.005 bucket");
        assert_eq!(c[SLOTS - 2], 2, "10s bucket");
        assert_eq!(c[SLOTS - 1], 3, "+Inf");
        assert!((s.sum - 20.0033).abs() < 1e-9, "sum {}", s.sum);
        assert!(s.exemplars.iter().all(Option::is_none));
    }

    #[test]
    fn traced_observation_becomes_its_buckets_exemplar() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(7), Some(0xabc));
        let s = h.snapshot();
        let ex = s.exemplars[4].expect("0.01 bucket exemplar");
        assert_eq!(ex.trace_id, 0xabc);
        assert!((ex.value - 0.007).abs() < 1e-12);
    }

    #[test]
    fn bucket_boundary_is_inclusive() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(1), None);
        assert_eq!(h.snapshot().cumulative[1], 1, "le=0.001 includes 1ms");
        assert_eq!(h.snapshot().cumulative[0], 0);
    }

    #[test]
    fn request_counters_tell_retries_from_keep_alives() {
        let m = RouteMetrics::default();
        let req = |body: &'static [u8], attempt| BackendRequest {
            body: bytes::Bytes::from_static(body),
            meta: Arc::from(Vec::new()),
            replayed: 0,
            events: 0,
            attempt,
            grip: false,
        };
        m.record_request_sent(&req(b"", 0));
        m.record_request_sent(&req(b"", 1));
        m.record_request_sent(&req(b"TEXT 1\r\na\r\n", 0));
        m.record_request_sent(&req(b"TEXT 1\r\na\r\n", 2));
        assert_eq!(m.keep_alives(), 1);
        assert_eq!(m.retries(), 2);
    }

    #[test]
    fn error_kinds_cover_status_and_transport() {
        let ok = |status: u16| {
            Ok(BackendResponse {
                status: StatusCode::from_u16(status).expect("status"),
                headers: HeaderMap::new(),
                body: bytes::Bytes::new(),
            })
        };
        assert_eq!(BackendErrorKind::of_result(&ok(200)), None);
        assert_eq!(BackendErrorKind::of_result(&ok(503)), Some(BackendErrorKind::Status));
        assert_eq!(
            BackendErrorKind::of_result(&Err(BackendError::TooLarge { limit: 1 })),
            Some(BackendErrorKind::TooLarge)
        );
        let m = RouteMetrics::default();
        m.record_backend(Duration::from_millis(1), &Err(BackendError::Timeout), None);
        m.record_backend(Duration::from_millis(1), &ok(200), None);
        assert_eq!(m.backend_errors(BackendErrorKind::Timeout), 1);
        assert_eq!(m.backend_errors(BackendErrorKind::Status), 0);
        assert_eq!(m.backend_duration().snapshot().count(), 2);
    }

    #[test]
    fn exposition_formats_differ_in_names_units_exemplars_and_eof() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(2), Some(1));
        let snap = h.snapshot();
        for format in [Format::OpenMetrics, Format::Prometheus] {
            let mut e = Exposition::new(format);
            e.family("x_bytes", Kind::Counter, Some("bytes"), "Help with \\ and \"q\".");
            e.counter(&[("route", "a\"b\\c\nd")], 7);
            e.family("x_seconds", Kind::Histogram, Some("seconds"), "H.");
            e.histogram(&[], &snap);
            let text = e.finish();
            assert!(text.contains(r#"x_bytes_total{route="a\"b\\c\nd"} 7"#), "{text}");
            assert!(text.contains(r#"x_seconds_bucket{le="0.0025"} 1"#), "{text}");
            assert!(text.contains(r#"x_seconds_bucket{le="+Inf"} 1"#), "{text}");
            match format {
                Format::OpenMetrics => {
                    assert!(
                        text.contains("# TYPE x_bytes counter\n# UNIT x_bytes bytes\n"),
                        "{text}"
                    );
                    assert!(!text.contains("# UNIT x_seconds"), "{text}");
                    assert!(
                        text.contains(r#"# {trace_id="00000000000000000000000000000001"} 0.002 "#),
                        "{text}"
                    );
                    assert!(text.ends_with("# EOF\n"));
                }
                Format::Prometheus => {
                    assert!(text.contains("# TYPE x_bytes_total counter\n"), "{text}");
                    assert!(!text.contains("# UNIT") && !text.contains("trace_id") && !text.contains("# EOF"));
                }
            }
        }
    }

    #[test]
    fn negotiation_follows_accept() {
        let om = HeaderValue::from_static(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
        );
        assert_eq!(Format::negotiate(Some(&om)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some(&HeaderValue::from_static("text/plain"))),
            Format::Prometheus
        );
        assert_eq!(Format::negotiate(None), Format::Prometheus);
    }

    #[test]
    fn nats_state_is_read_through_the_callback() {
        let m = Metrics::new();
        assert_eq!(m.nats_state(), None);
        m.set_nats_state_fn(|| 1);
        assert_eq!(m.nats_state(), Some(1));
    }

    fn config_text(version: u64, source: ConfigSource<'_>) -> String {
        let mut e = Exposition::new(Format::Prometheus);
        encode_config(&mut e, version, source);
        e.finish()
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.rsplit_once(' ').filter(|(name, _)| *name == series).map(|(_, v)| v))
    }

    #[test]
    fn a_static_table_is_generation_one_and_always_up() {
        let text = config_text(1, ConfigSource::Static);
        assert_eq!(
            sample(&text, r#"wsgate_config_info{version="1",source="static"}"#),
            Some("1")
        );
        assert_eq!(sample(&text, "wsgate_config_version"), Some("1"));
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("1"));
        assert_eq!(sample(&text, "wsgate_config_reload_failures_total"), Some("0"));
        assert!(text.contains("# TYPE wsgate_config_last_success_timestamp_seconds gauge\n"));
        assert_eq!(sample(&text, "wsgate_config_last_success_timestamp_seconds"), None);
    }

    #[test]
    fn a_snapshot_version_above_i64_max_is_exact_in_the_info_label() {
        let control = ControlStatus::new();
        let version = 10_458_507_545_456_166_140_u64;
        assert!(version > i64::MAX as u64);
        let text = config_text(version, ConfigSource::Control(&control));
        assert_eq!(sample(&text, "wsgate_config_version"), Some("0"), "no snapshot yet");
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("0"));
        assert_eq!(sample(&text, "wsgate_config_last_success_timestamp_seconds"), None);

        let before = unix_now();
        control.record_ok(Some(version), &[]);
        control.record_ok(Some(version - 1), &[]);
        control.record_ok(None, &[]);
        let text = config_text(version, ConfigSource::Control(&control));
        assert_eq!(
            sample(
                &text,
                r#"wsgate_config_info{version="10458507545456166140",source="control"}"#
            ),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            sample(&text, "wsgate_config_version"),
            Some("2"),
            "two snapshots applied"
        );
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("1"));
        let at: f64 = sample(&text, "wsgate_config_last_success_timestamp_seconds")
            .expect("last success")
            .parse()
            .expect("a number");
        assert!(at >= before.floor() && at <= unix_now() + 1.0, "{at} vs {before}");

        control.record_error(&crate::config::control::ControlError::Request("refused".into()), false);
        control.record_error(&crate::config::control::ControlError::Request("refused".into()), false);
        let text = config_text(version, ConfigSource::Control(&control));
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("0"));
        assert_eq!(sample(&text, "wsgate_config_reload_failures_total"), Some("2"));
        assert_eq!(
            sample(&text, "wsgate_config_version"),
            Some("2"),
            "the table in use stays"
        );
    }

    #[test]
    fn a_rejected_routes_file_counts_a_failure_and_is_down_until_fixed() {
        let reload = ReloadStatus::new(1);
        let text = config_text(1, ConfigSource::File(&reload));
        assert_eq!(
            sample(&text, r#"wsgate_config_info{version="1",source="file"}"#),
            Some("1")
        );
        assert_eq!(sample(&text, "wsgate_config_version"), Some("1"));
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("1"));
        reload.record_failure(&crate::config::ConfigError::single("routes", "expected a list"));
        let text = config_text(1, ConfigSource::File(&reload));
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("0"));
        assert_eq!(sample(&text, "wsgate_config_reload_failures_total"), Some("1"));
        reload.record_ok(2);
        let text = config_text(2, ConfigSource::File(&reload));
        assert_eq!(sample(&text, "wsgate_config_version"), Some("2"));
        assert_eq!(sample(&text, "wsgate_config_source_up"), Some("1"));
        assert!(sample(&text, "wsgate_config_last_success_timestamp_seconds").is_some());
    }

    #[test]
    fn float_gauges_and_the_unit_line_parse_in_both_formats() {
        for format in [Format::OpenMetrics, Format::Prometheus] {
            let mut e = Exposition::new(format);
            e.family("x_timestamp_seconds", Kind::Gauge, Some("seconds"), "T.");
            e.gauge_f64(&[], 1_700_000_000.25);
            let text = e.finish();
            assert!(text.contains("x_timestamp_seconds 1700000000.25\n"), "{text}");
            assert_eq!(
                text.contains("# UNIT x_timestamp_seconds seconds\n"),
                format == Format::OpenMetrics,
                "{text}"
            );
        }
    }

    #[test]
    fn route_handles_are_shared() {
        let m = Metrics::new();
        let a = m.route("r");
        a.record_message(Direction::BackendToClient, 5);
        let b = m.route("r");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(b.messages(Direction::BackendToClient), 1);
        assert_eq!(b.bytes(Direction::BackendToClient), 5);
        assert_eq!(b.messages(Direction::ClientToBackend), 0);
    }
}
