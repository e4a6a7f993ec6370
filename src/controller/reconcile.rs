//! The reconciler: a kube-rs [`Controller`] over `WebSocketRoute`, fed by the same reflector
//! caches the snapshot compiler reads.
//!
//! ```text
//! watch routes ──reflect──▶ route cache ──┬──▶ Controller ──reconcile──▶ status (SSA, leader only)
//! watch Services ─reflect─▶ Service cache ┤      ▲   ▲ reconcile_on: gateway counts changed
//! watch Secrets ──reflect─▶ Secret cache ─┤      │   └ reconcile_all_on: route set changed, leadership gained
//!                                         └──▶ world changed ──▶ snapshot compiler ──▶ control API
//! ```
//!
//! Triggers: a route's own spec change (generation); a change of a Service or Secret it
//! references; any change of the set of routes (conflicts are global: a new, changed or deleted
//! route can flip another's `Accepted`); a change in how many gateways serve it; gaining
//! leadership. Status is written only when it differs from what the object has, so
//! "reconcile everything" costs API calls only for routes whose status really changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerRunConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::{WatchStreamExt, predicates, reflector};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::api::GatewayTracker;
use super::crd::{
    CONDITION_ACCEPTED, CONDITION_RESOLVED_REFS, FIELD_MANAGER, WebSocketRoute, WebSocketRouteStatus, reason,
};
use super::evaluate::{RefLookup, RefProblem, RouteKey, Validator, Verdict, check_refs};
use super::metrics::ControllerMetrics;
use super::snapshot::{StoreLookup, route_inputs};

/// What can fail in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The route has no namespace (the CRD is namespaced, so the cache is inconsistent).
    #[error("route {0} has no namespace")]
    NoNamespace(String),
}

impl ReconcileError {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::NoNamespace(_) => "no_namespace",
        }
    }
}

/// Everything a reconcile reads.
pub(crate) struct Context {
    pub(crate) client: kube::Client,
    pub(crate) routes: Store<WebSocketRoute>,
    pub(crate) lookup: StoreLookup,
    pub(crate) validator: Arc<Validator>,
    pub(crate) leader: watch::Receiver<bool>,
    pub(crate) tracker: Arc<GatewayTracker>,
    pub(crate) metrics: Arc<ControllerMetrics>,
    pub(crate) recorder: Recorder,
    pub(crate) resync: Duration,
}

const MAX_MESSAGE: usize = 32_768;

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

fn condition(
    old: Option<&WebSocketRouteStatus>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let previous = old.and_then(|s| s.condition(type_));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: truncate(message),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status a route should have. `lastTransitionTime`s are carried over from `old` unless
/// the condition's status changes, so an unchanged route gets an identical status.
pub fn desired_status(
    old: Option<&WebSocketRouteStatus>,
    generation: Option<i64>,
    verdict: Option<&Verdict>,
    lookup: &dyn RefLookup,
    gateways: u32,
    now: Timestamp,
) -> WebSocketRouteStatus {
    let cond = |type_: &str, status: &str, reason: &str, message: String| {
        condition(old, type_, status, reason, message, generation, now)
    };
    let (accepted, validated) = match verdict {
        Some(Verdict::Accepted(v)) => (
            cond(
                CONDITION_ACCEPTED,
                "True",
                reason::ACCEPTED,
                "The route is valid and not in conflict with another route.".to_owned(),
            ),
            Some(v),
        ),
        Some(Verdict::Conflicted {
            winner,
            claim,
            validated,
        }) => (
            cond(
                CONDITION_ACCEPTED,
                "False",
                reason::CONFLICTED,
                format!("{claim} is already served by the older route {winner} for the same workloads"),
            ),
            Some(validated),
        ),
        Some(Verdict::Invalid(errors)) => {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            (
                cond(CONDITION_ACCEPTED, "False", reason::INVALID, list.join("; ")),
                None,
            )
        }
        None => (
            cond(
                CONDITION_ACCEPTED,
                "Unknown",
                "Pending",
                "The route is being deleted.".to_owned(),
            ),
            None,
        ),
    };
    let resolved = match validated {
        None => cond(
            CONDITION_RESOLVED_REFS,
            "Unknown",
            reason::INVALID,
            "References are checked once the spec is valid.".to_owned(),
        ),
        Some(v) => match check_refs(v, lookup) {
            Ok(()) => cond(
                CONDITION_RESOLVED_REFS,
                "True",
                reason::RESOLVED_REFS,
                "All references resolved.".to_owned(),
            ),
            Err(RefProblem::BackendNotFound(m)) => cond(CONDITION_RESOLVED_REFS, "False", reason::BACKEND_NOT_FOUND, m),
            Err(RefProblem::SecretNotFound(m)) => cond(CONDITION_RESOLVED_REFS, "False", reason::SECRET_NOT_FOUND, m),
        },
    };
    WebSocketRouteStatus {
        observed_generation: generation,
        conditions: vec![accepted, resolved],
        backend: validated.map(|v| v.backend_url.clone()),
        gateways,
    }
}

/// Problems in `new` that `old` did not have (same type, False, with this reason and message):
/// each becomes a Warning Event.
fn new_problems<'a>(old: Option<&WebSocketRouteStatus>, new: &'a WebSocketRouteStatus) -> Vec<&'a Condition> {
    new.conditions
        .iter()
        .filter(|c| c.status == "False")
        .filter(|c| {
            old.and_then(|o| o.condition(&c.type_))
                .is_none_or(|p| p.status != c.status || p.reason != c.reason || p.message != c.message)
        })
        .collect()
}

pub(crate) async fn reconcile(route: Arc<WebSocketRoute>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    use tracing::Instrument;
    let span = crate::telemetry::reconcile_span(
        "WebSocketRoute",
        route.namespace().as_deref().unwrap_or(""),
        &route.name_any(),
    );
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    let result = reconcile_route(route, ctx).instrument(span.clone()).await;
    metrics.reconcile_duration.observe(started.elapsed(), None);
    if let Err(e) = &result {
        span.record("error.type", e.to_string());
        span.record("otel.status_code", "ERROR");
    }
    result
}

async fn reconcile_route(route: Arc<WebSocketRoute>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ControllerMetrics::inc(&ctx.metrics.reconciles);
    if !*ctx.leader.borrow() {
        // Followers keep their caches warm and serve snapshots; only the leader writes.
        return Ok(Action::await_change());
    }
    let name = route.name_any();
    let namespace = route
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let key = RouteKey::new(&namespace, &name);
    let all = ctx.routes.state();
    let verdicts = ctx.validator.evaluate(&route_inputs(&all));
    let desired = desired_status(
        route.status.as_ref(),
        route.metadata.generation,
        verdicts.get(&key),
        &ctx.lookup,
        ctx.tracker.count(&key),
        Timestamp::now(),
    );
    if route.status.as_ref() == Some(&desired) {
        return Ok(Action::requeue(ctx.resync));
    }
    let api: Api<WebSocketRoute> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": WebSocketRoute::api_version(&()),
        "kind": WebSocketRoute::kind(&()),
        "status": desired,
    });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    ControllerMetrics::inc(&ctx.metrics.status_writes);
    tracing::info!(route = %key, accepted = %desired.conditions[0].reason, refs = %desired.conditions[1].reason, gateways = desired.gateways, "status updated");
    let reference = route.object_ref(&());
    for problem in new_problems(route.status.as_ref(), &desired) {
        let event = Event {
            type_: EventType::Warning,
            reason: problem.reason.clone(),
            note: Some(problem.message.chars().take(1000).collect()),
            action: if problem.type_ == CONDITION_ACCEPTED {
                "Validate".to_owned()
            } else {
                "ResolveRefs".to_owned()
            },
            secondary: None,
        };
        match ctx.recorder.publish(&event, &reference).await {
            Ok(()) => ControllerMetrics::inc(&ctx.metrics.events),
            Err(error) => tracing::warn!(%error, route = %key, "could not publish an Event"),
        }
    }
    Ok(Action::requeue(ctx.resync))
}

pub(crate) fn error_policy(route: Arc<WebSocketRoute>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ControllerMetrics::inc(&ctx.metrics.reconcile_errors);
    tracing::warn!(route = %route.name_any(), %error, kind = error.metric_label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Whether `route` points its backend at Service `namespace/name`.
fn references_service(route: &WebSocketRoute, namespace: &str, name: &str) -> bool {
    let route_ns = route.namespace().unwrap_or_default();
    route
        .spec
        .route
        .backend
        .service
        .as_ref()
        .is_some_and(|s| s.name == name && s.namespace.as_deref().unwrap_or(&route_ns) == namespace)
}

/// Whether `route` reads a key of Secret `namespace/name`.
fn references_secret(route: &WebSocketRoute, namespace: &str, name: &str) -> bool {
    route.namespace().as_deref() == Some(namespace)
        && route
            .spec
            .route
            .grip
            .signing_key
            .as_ref()
            .and_then(|k| k.secret_ref.as_ref())
            .is_some_and(|r| r.name == name)
}

/// A stream over an mpsc receiver.
fn receiver_stream<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

/// [`Wiring::synced`] bit of the route cache.
pub(crate) const SYNCED_ROUTES: u8 = 1;
/// [`Wiring::synced`] bit of the Service cache.
pub(crate) const SYNCED_SERVICES: u8 = 2;
/// [`Wiring::synced`] bit of the Secret cache.
pub(crate) const SYNCED_SECRETS: u8 = 4;
/// All caches synced.
pub(crate) const SYNCED_ALL: u8 = SYNCED_ROUTES | SYNCED_SERVICES | SYNCED_SECRETS;

/// Signature of a route as far as other routes and snapshots care (status writes don't change it).
type RouteSignature = (Option<String>, Option<i64>, bool);

fn signature(route: &WebSocketRoute) -> RouteSignature {
    (
        route.metadata.uid.clone(),
        route.metadata.generation,
        route.metadata.deletion_timestamp.is_some(),
    )
}

/// The caches and the trigger channels the controller runs on.
pub(crate) struct Wiring {
    pub(crate) client: kube::Client,
    pub(crate) routes: Store<WebSocketRoute>,
    pub(crate) services: Store<Service>,
    pub(crate) secrets: Store<Secret>,
    pub(crate) world: watch::Sender<u64>,
    /// Bits of the caches that have listed once: [`SYNCED_ROUTES`] | [`SYNCED_SERVICES`] |
    /// [`SYNCED_SECRETS`]. (`Store::wait_until_ready` wakes only one waiter, and the
    /// `Controller` is already waiting on the route store.)
    pub(crate) synced: watch::Sender<u8>,
    pub(crate) all_rx: mpsc::Receiver<()>,
    pub(crate) all_tx: mpsc::Sender<()>,
    pub(crate) one_rx: mpsc::Receiver<ObjectRef<WebSocketRoute>>,
    route_writer: reflector::store::Writer<WebSocketRoute>,
    service_writer: reflector::store::Writer<Service>,
    secret_writer: reflector::store::Writer<Secret>,
}

impl Wiring {
    pub(crate) fn new(
        client: kube::Client,
        all: (mpsc::Sender<()>, mpsc::Receiver<()>),
        one_rx: mpsc::Receiver<ObjectRef<WebSocketRoute>>,
    ) -> Self {
        let (routes, route_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        Self {
            client,
            routes,
            services,
            secrets,
            world: watch::Sender::new(0),
            synced: watch::Sender::new(0),
            all_tx: all.0,
            all_rx: all.1,
            one_rx,
            route_writer,
            service_writer,
            secret_writer,
        }
    }

    /// The controller's future: drives the three watches (and so the caches) and reconciles.
    /// Runs until dropped.
    pub(crate) fn run(self, ctx: Arc<Context>) -> impl std::future::Future<Output = ()> + Send {
        let wc = watcher::Config::default();
        let world = self.world.clone();
        let synced = self.synced.clone();
        let all_tx = self.all_tx.clone();
        let mut seen: HashMap<RouteKey, RouteSignature> = HashMap::new();
        let mut listing: Option<HashMap<RouteKey, RouteSignature>> = None;
        let routes = watcher::watcher(Api::<WebSocketRoute>::all(self.client.clone()), wc.clone())
            .default_backoff()
            .reflect(self.route_writer)
            .inspect(move |event| {
                let changed = match event {
                    Ok(WatchEvent::Init) => {
                        listing = Some(HashMap::new());
                        false
                    }
                    Ok(WatchEvent::InitApply(route)) => {
                        if let Some(listing) = listing.as_mut() {
                            listing.insert(route_key(route), signature(route));
                        }
                        false
                    }
                    Ok(WatchEvent::InitDone) => {
                        // A relist may hide deletions: recheck everything.
                        seen = listing.take().unwrap_or_default();
                        synced.send_modify(|bits| *bits |= SYNCED_ROUTES);
                        true
                    }
                    Ok(WatchEvent::Apply(route)) => {
                        seen.insert(route_key(route), signature(route)) != Some(signature(route))
                    }
                    Ok(WatchEvent::Delete(route)) => {
                        seen.remove(&route_key(route));
                        true
                    }
                    Err(_) => false,
                };
                if changed {
                    world.send_modify(|n| *n = n.wrapping_add(1));
                    let _ = all_tx.try_send(());
                }
            })
            .touched_objects()
            .predicate_filter(predicates::generation, Default::default());

        let services = watcher::watcher(Api::<Service>::all(self.client.clone()), wc.clone())
            .default_backoff()
            .reflect(self.service_writer)
            .inspect(bump_on_change(self.world.clone(), self.synced.clone(), SYNCED_SERVICES))
            .touched_objects();
        let secrets = watcher::watcher(Api::<Secret>::all(self.client.clone()), wc)
            .default_backoff()
            .reflect(self.secret_writer)
            .inspect(bump_on_change(self.world.clone(), self.synced.clone(), SYNCED_SECRETS))
            .touched_objects();
        let by_service = self.routes.clone();
        let by_secret = self.routes.clone();
        let controller = Controller::for_stream(routes, self.routes.clone())
            .with_config(ControllerRunConfig::default().debounce(Duration::from_millis(20)))
            .watches_stream(services, move |service: Service| {
                let (ns, name) = (service.namespace().unwrap_or_default(), service.name_any());
                by_service
                    .state()
                    .iter()
                    .filter(|r| references_service(r, &ns, &name))
                    .map(|r| ObjectRef::from_obj(r.as_ref()))
                    .collect::<Vec<_>>()
            })
            .watches_stream(secrets, move |secret: Secret| {
                let (ns, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
                by_secret
                    .state()
                    .iter()
                    .filter(|r| references_secret(r, &ns, &name))
                    .map(|r| ObjectRef::from_obj(r.as_ref()))
                    .collect::<Vec<_>>()
            })
            .reconcile_all_on(receiver_stream(self.all_rx))
            .reconcile_on(receiver_stream(self.one_rx));
        controller
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "controller event");
                }
            })
    }
}

/// Signals `world` on every change of a cache (and when a relist completes), and sets `bit` in
/// `synced` once it has listed.
fn bump_on_change<K>(
    world: watch::Sender<u64>,
    synced: watch::Sender<u8>,
    bit: u8,
) -> impl FnMut(&watcher::Result<WatchEvent<K>>) {
    move |event| {
        if matches!(event, Ok(WatchEvent::InitDone)) {
            synced.send_modify(|bits| *bits |= bit);
        }
        if matches!(
            event,
            Ok(WatchEvent::Apply(_) | WatchEvent::Delete(_) | WatchEvent::InitDone)
        ) {
            world.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

fn route_key(route: &WebSocketRoute) -> RouteKey {
    RouteKey::new(route.namespace().unwrap_or_default(), route.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::evaluate::validate;

    struct NoRefs;
    impl RefLookup for NoRefs {
        fn service_ports(&self, _: &str, _: &str) -> Option<Vec<u16>> {
            None
        }
        fn secret_value(&self, _: &str, _: &str, _: &str) -> Result<Vec<u8>, String> {
            Err("missing".into())
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("ts")
    }

    #[test]
    fn status_keeps_transition_times_until_a_condition_flips() {
        let spec = serde_yaml::from_str("backend: {service: {name: chat, port: 80}}").expect("spec");
        let validated = Arc::new(validate(&RouteKey::new("ns", "r"), &spec).expect("valid"));
        let verdict = Verdict::Accepted(validated.clone());
        let first = desired_status(None, Some(1), Some(&verdict), &NoRefs, 0, ts(100));
        assert_eq!(first.conditions[0].status, "True");
        assert_eq!(first.conditions[1].reason, reason::BACKEND_NOT_FOUND);
        assert_eq!(first.conditions[1].message, "Service ns/chat not found");
        assert_eq!(first.backend.as_deref(), Some("http://chat.ns.svc:80"));
        let again = desired_status(Some(&first), Some(1), Some(&verdict), &NoRefs, 0, ts(200));
        assert_eq!(again, first, "nothing changed, nothing to write");
        let conflicted = Verdict::Conflicted {
            winner: RouteKey::new("ns", "old"),
            claim: "any host with path prefix \"/\"".into(),
            validated,
        };
        let third = desired_status(Some(&first), Some(2), Some(&conflicted), &NoRefs, 3, ts(300));
        assert_eq!(third.conditions[0].reason, reason::CONFLICTED);
        assert_eq!(third.conditions[0].last_transition_time, Time(ts(300)));
        assert_eq!(third.conditions[1].last_transition_time, Time(ts(100)));
        assert_eq!(third.conditions[0].observed_generation, Some(2));
        assert_eq!(third.gateways, 3);
        assert!(third.conditions[0].message.contains("older route ns/old"));
        let problems: Vec<&str> = new_problems(Some(&first), &third)
            .iter()
            .map(|c| c.reason.as_str())
            .collect();
        assert_eq!(problems, [reason::CONFLICTED]);
        let problems: Vec<&str> = new_problems(None, &first).iter().map(|c| c.reason.as_str()).collect();
        assert_eq!(problems, [reason::BACKEND_NOT_FOUND]);
    }

    #[test]
    fn invalid_specs_explain_every_field() {
        let errors = vec![
            crate::config::FieldError::new("spec.backend", "exactly one of url, service or port may be set"),
            crate::config::FieldError::new("spec.limits.maxMessageBytes", "must be between 1 and 67108864 (got 0)"),
        ];
        let status = desired_status(None, Some(4), Some(&Verdict::Invalid(errors)), &NoRefs, 0, ts(1));
        assert_eq!(status.conditions[0].reason, reason::INVALID);
        assert_eq!(
            status.conditions[0].message,
            "spec.backend: exactly one of url, service or port may be set; spec.limits.maxMessageBytes: must be between 1 and 67108864 (got 0)"
        );
        assert_eq!(status.conditions[1].status, "Unknown");
        assert_eq!(status.backend, None);
        assert_eq!(truncate("é".repeat(MAX_MESSAGE)).len(), MAX_MESSAGE - 1);
    }
}
