//! Counters of the controller: plain atomics, read with [`ControllerMetrics::snapshot`] (the
//! Prometheus export maps them to `wsgate_controller_*` families).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The controller's counters. One per controller instance (tests run several in a process).
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    /// Reconciles run (leader or not).
    pub reconciles: AtomicU64,
    /// Reconciles that failed (they are retried).
    pub reconcile_errors: AtomicU64,
    /// Status patches written.
    pub status_writes: AtomicU64,
    /// Kubernetes Events published.
    pub events: AtomicU64,
    /// Snapshots sent to gateways (200 answers).
    pub snapshots_served: AtomicU64,
    /// Long polls that ended without a change (304 answers).
    pub snapshots_unchanged: AtomicU64,
    /// Control-API requests refused for authentication or authorization.
    pub auth_failures: AtomicU64,
    /// Times this instance became the leader.
    pub leader_acquisitions: AtomicU64,
    /// Whether this instance holds the Lease now.
    pub leader: AtomicBool,
    /// How long reconciles take (`wsgate_controller_reconcile_duration_seconds`).
    pub reconcile_duration: crate::metrics::Histogram,
}

/// The counters' values at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// See [`ControllerMetrics::reconciles`].
    pub reconciles: u64,
    /// See [`ControllerMetrics::reconcile_errors`].
    pub reconcile_errors: u64,
    /// See [`ControllerMetrics::status_writes`].
    pub status_writes: u64,
    /// See [`ControllerMetrics::events`].
    pub events: u64,
    /// See [`ControllerMetrics::snapshots_served`].
    pub snapshots_served: u64,
    /// See [`ControllerMetrics::snapshots_unchanged`].
    pub snapshots_unchanged: u64,
    /// See [`ControllerMetrics::auth_failures`].
    pub auth_failures: u64,
    /// See [`ControllerMetrics::leader_acquisitions`].
    pub leader_acquisitions: u64,
    /// See [`ControllerMetrics::leader`].
    pub leader: bool,
}

impl ControllerMetrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            reconciles: get(&self.reconciles),
            reconcile_errors: get(&self.reconcile_errors),
            status_writes: get(&self.status_writes),
            events: get(&self.events),
            snapshots_served: get(&self.snapshots_served),
            snapshots_unchanged: get(&self.snapshots_unchanged),
            auth_failures: get(&self.auth_failures),
            leader_acquisitions: get(&self.leader_acquisitions),
            leader: self.leader.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
