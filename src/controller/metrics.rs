//! Counters of the controller: plain atomics, read with [`ControllerMetrics::snapshot`] (the
//! Prometheus export maps them to `wsgate_controller_*` families), and the injection webhook's
//! decisions ([`AdmissionMetrics`], `wsgate_webhook_admissions_total`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::metrics::{Exposition, Kind};

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
    /// The injection webhook's decisions: share this with the webhook's
    /// [`Injector`](crate::controller::webhook::Injector) so `/metrics` shows them.
    pub admissions: Arc<AdmissionMetrics>,
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

/// One kind of admission decision of the injection webhook: the `decision` and `reason`
/// labels of `wsgate_webhook_admissions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Admission {
    /// The sidecar was injected as a native sidecar (an init container with
    /// `restartPolicy: Always`).
    InjectedNative,
    /// The sidecar was injected as a regular container.
    InjectedContainer,
    /// Not a pod CREATE: admitted unchanged.
    SkippedNotAPodCreate,
    /// The namespace is excluded: admitted unchanged.
    SkippedExcludedNamespace,
    /// The pod is labelled `wsgate.io/inject=disabled`: admitted unchanged.
    SkippedOptedOut,
    /// The pod already has the sidecar: admitted unchanged.
    SkippedAlreadyInjected,
    /// The pod uses the node's network: admitted unchanged, with a warning.
    SkippedHostNetwork,
    /// Refused: the pod has no spec.
    DeniedNoSpec,
    /// Refused: a `wsgate.io/*` annotation is invalid.
    DeniedInvalidAnnotations,
    /// Refused: the pod cannot get a sidecar as asked (port or name clash, native sidecars on
    /// an old API server, no route source).
    DeniedInvalidPod,
    /// The request body is not an `AdmissionReview` with a request (answered `400`).
    ErrorBadReview,
    /// The pod in the request cannot be read (admitted unchanged, with a warning).
    ErrorUnreadablePod,
    /// The patch cannot be encoded (admitted unchanged).
    ErrorPatchEncoding,
}

impl Admission {
    /// Every decision, in exposition order.
    pub const ALL: [Admission; 13] = [
        Self::InjectedNative,
        Self::InjectedContainer,
        Self::SkippedNotAPodCreate,
        Self::SkippedExcludedNamespace,
        Self::SkippedOptedOut,
        Self::SkippedAlreadyInjected,
        Self::SkippedHostNetwork,
        Self::DeniedNoSpec,
        Self::DeniedInvalidAnnotations,
        Self::DeniedInvalidPod,
        Self::ErrorBadReview,
        Self::ErrorUnreadablePod,
        Self::ErrorPatchEncoding,
    ];

    /// The `decision` label: `injected`, `skipped`, `denied` or `error`.
    pub fn decision(self) -> &'static str {
        match self {
            Self::InjectedNative | Self::InjectedContainer => "injected",
            Self::SkippedNotAPodCreate
            | Self::SkippedExcludedNamespace
            | Self::SkippedOptedOut
            | Self::SkippedAlreadyInjected
            | Self::SkippedHostNetwork => "skipped",
            Self::DeniedNoSpec | Self::DeniedInvalidAnnotations | Self::DeniedInvalidPod => "denied",
            Self::ErrorBadReview | Self::ErrorUnreadablePod | Self::ErrorPatchEncoding => "error",
        }
    }

    /// The `reason` label (for `injected`, the sidecar mode).
    pub fn reason(self) -> &'static str {
        match self {
            Self::InjectedNative => "native",
            Self::InjectedContainer => "container",
            Self::SkippedNotAPodCreate => "not_a_pod_create",
            Self::SkippedExcludedNamespace => "excluded_namespace",
            Self::SkippedOptedOut => "opted_out",
            Self::SkippedAlreadyInjected => "already_injected",
            Self::SkippedHostNetwork => "host_network",
            Self::DeniedNoSpec => "no_spec",
            Self::DeniedInvalidAnnotations => "invalid_annotations",
            Self::DeniedInvalidPod => "invalid_pod",
            Self::ErrorBadReview => "bad_review",
            Self::ErrorUnreadablePod => "unreadable_pod",
            Self::ErrorPatchEncoding => "patch_encoding",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of the injection webhook's decisions, one per [`Admission`]: a fixed set of series,
/// all exported from the start (zeros included) so rates work from the first scrape.
#[derive(Debug, Default)]
pub struct AdmissionMetrics {
    counts: [AtomicU64; Admission::ALL.len()],
}

impl AdmissionMetrics {
    /// Counts one decision.
    pub fn record(&self, admission: Admission) {
        self.counts[admission.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Decisions of this kind so far.
    pub fn get(&self, admission: Admission) -> u64 {
        self.counts[admission.index()].load(Ordering::Relaxed)
    }

    /// Decisions with this `decision` label so far (`injected`, `skipped`, `denied`, `error`).
    pub fn total(&self, decision: &str) -> u64 {
        Admission::ALL
            .iter()
            .filter(|a| a.decision() == decision)
            .map(|a| self.get(*a))
            .sum()
    }

    /// Writes `wsgate_webhook_admissions_total{decision, reason}`, every series.
    pub fn encode(&self, e: &mut Exposition) {
        e.family(
            "wsgate_webhook_admissions",
            Kind::Counter,
            None,
            "Admission requests answered by the injection webhook, by decision and reason.",
        );
        for admission in Admission::ALL {
            e.counter(
                &[("decision", admission.decision()), ("reason", admission.reason())],
                self.get(admission),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Format;

    #[test]
    fn indices_follow_the_list() {
        for (i, a) in Admission::ALL.iter().enumerate() {
            assert_eq!(a.index(), i, "{a:?}");
        }
    }

    #[test]
    fn every_series_is_exported_with_its_count() {
        let m = AdmissionMetrics::default();
        m.record(Admission::InjectedNative);
        m.record(Admission::InjectedNative);
        m.record(Admission::DeniedInvalidPod);
        let mut e = Exposition::new(Format::Prometheus);
        m.encode(&mut e);
        let text = e.finish();
        assert!(
            text.contains("# TYPE wsgate_webhook_admissions_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("wsgate_webhook_admissions_total{decision=\"injected\",reason=\"native\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("wsgate_webhook_admissions_total{decision=\"denied\",reason=\"invalid_pod\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("wsgate_webhook_admissions_total{decision=\"skipped\",reason=\"opted_out\"} 0\n"),
            "{text}"
        );
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, Admission::ALL.len());
        assert_eq!((m.total("injected"), m.total("denied"), m.total("skipped")), (2, 1, 0));
    }
}
