//! Leader election with a `coordination.k8s.io/v1` Lease (the client-go algorithm, simplified).
//!
//! Every replica runs [`run_leader_election`]. The holder renews the Lease every
//! `retry_period`; another replica takes it over once it has seen the same Lease record
//! unchanged for `lease_duration` (measured on its own clock, so clock skew between nodes does
//! not matter), or at once when the holder released it on shutdown. Updates carry the
//! `resourceVersion` they read, so two replicas racing for the Lease cannot both win: the loser
//! gets `409 Conflict`. A leader that cannot renew for `renew_deadline` steps down by itself.
//!
//! Only the leader writes status; every replica keeps its caches and serves the control API.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lease settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal (whole seconds in the Lease).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// Time between tries to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults of client-go: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// The Lease record last seen, and when it was first seen in this form.
#[derive(Debug)]
struct Observed {
    record: (Option<String>, Option<Timestamp>, Option<String>),
    since: Instant,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// One try: `Ok(true)` when this replica holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(config.duration_seconds()),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (
        holder.clone(),
        spec.renew_time.as_ref().map(|t| t.0),
        lease.metadata.resource_version.clone(),
    );
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record,
            since: Instant::now(),
        });
    }
    let mine = holder.as_deref() == Some(config.identity.as_str());
    if !mine && holder.is_some() {
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(config.lease_duration, Duration::from_secs);
        let since = observed.as_ref().map_or_else(Instant::now, |o| o.since);
        if since.elapsed() < duration {
            return Ok(false);
        }
    }
    let mut new_spec = spec.clone();
    new_spec.holder_identity = Some(config.identity.clone());
    new_spec.lease_duration_seconds = Some(config.duration_seconds());
    new_spec.renew_time = Some(now_micro());
    if !mine {
        new_spec.acquire_time = Some(now_micro());
        new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    lease.spec = Some(new_spec);
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up so another replica can take it at once.
async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now_micro());
    api.replace(&config.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// Runs the election until `cancel` fires, publishing leadership on `leader`; releases the
/// Lease on the way out if held. `on_acquire` runs each time leadership is gained.
pub async fn run_leader_election(
    client: kube::Client,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    on_acquire: impl Fn() + Send,
    cancel: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed = None;
    let mut last_renewal: Option<Instant> = None;
    loop {
        let result = tokio::select! {
            r = try_acquire_or_renew(&api, &config, &mut observed) => r,
            () = cancel.cancelled() => break,
        };
        let is_leader = match result {
            Ok(true) => {
                last_renewal = Some(Instant::now());
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(%error, lease = %config.name, "leader election: Lease request failed");
                // Keep leading until the renew deadline passes without a renewal.
                *leader.borrow() && last_renewal.is_some_and(|t| t.elapsed() < config.renew_deadline)
            }
        };
        let was_leader = *leader.borrow();
        if is_leader != was_leader {
            tracing::info!(identity = %config.identity, leader = is_leader, "leadership changed");
            leader.send_replace(is_leader);
            if is_leader {
                on_acquire();
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.retry_period) => {}
            () = cancel.cancelled() => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(error) = release(&api, &config).await {
            tracing::warn!(%error, "leader election: could not release the Lease");
        }
    }
}
