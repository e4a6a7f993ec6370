//! The control API server: gateways long-poll their snapshots here.
//!
//! `GET /v1/snapshot?namespace=NS&pod=POD&version=V` with `Authorization: Bearer TOKEN`:
//!
//! 1. The token is checked with a `TokenReview` for the audience `wsgate-control`. The user must
//!    be `system:serviceaccount:NS:SA`. When the review carries the pod claim
//!    (`authentication.kubernetes.io/pod-name`, and `pod-uid`; bound tokens on Kubernetes 1.20
//!    have them) it must name `POD`; otherwise (legacy Secret-based tokens) the pod must run as
//!    that ServiceAccount.
//! 2. The pod is read from the API: its labels decide which routes apply. Labels sent by the
//!    client are never used.
//! 3. If the pod's snapshot version differs from `V` (or `V` is absent) it is returned at once;
//!    otherwise the request waits up to the poll window for a change and answers `304`.
//!
//! `--insecure-skip-auth` skips step 1 (the pod is still read from the API): for local testing
//! only.
//!
//! Also served: `/healthz` (process up) and `/readyz` (caches synced).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::crd::WebSocketRoute;
use super::evaluate::RouteKey;
use super::metrics::ControllerMetrics;
use super::snapshot::Compiled;
use crate::config::control::{SNAPSHOT_PATH, Snapshot};

/// The `TokenReview` extra key with the pod name of a bound token.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The `TokenReview` extra key with the pod UID of a bound token.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How requests are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Bearer token checked by `TokenReview` for this audience.
    TokenReview {
        /// Required audience (`wsgate-control`).
        audience: String,
    },
    /// No authentication (local testing only).
    InsecureSkipAuth,
}

/// Settings of the control API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// How long a poll waits for a change before `304`.
    pub poll_timeout: Duration,
    /// Authentication.
    pub auth: AuthMode,
    /// A gateway that stops polling counts as serving its routes this long after its last poll.
    pub gateway_grace: Duration,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// No or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials that may not read this pod's snapshot.
    #[error("{0}")]
    Forbidden(String),
    /// The API server could not be asked.
    #[error("{0}")]
    Upstream(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Upstream(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What the controller sends to the reconciler when a route's gateway count changes.
#[derive(Debug, Clone)]
pub struct Triggers {
    /// Reconcile one route.
    pub one: mpsc::Sender<ObjectRef<WebSocketRoute>>,
    /// Reconcile every route (used when `one` is full).
    pub all: mpsc::Sender<()>,
}

impl Triggers {
    /// Asks for `key` to be reconciled; falls back to "all" when the queue is full. Never
    /// blocks; a full "all" queue already holds a pending request.
    pub fn route(&self, key: &RouteKey) {
        let object = ObjectRef::new(&key.name).within(&key.namespace);
        if self.one.try_send(object).is_err() {
            self.everything();
        }
    }

    /// Asks for every route to be reconciled.
    pub fn everything(&self) {
        let _ = self.all.try_send(());
    }
}

#[derive(Debug)]
struct GatewayEntry {
    routes: BTreeSet<RouteKey>,
    active: usize,
    last_seen: Instant,
}

/// Which gateways (pods) poll this controller and which routes each was last sent.
#[derive(Debug)]
pub struct GatewayTracker {
    entries: Mutex<HashMap<(String, String), GatewayEntry>>,
    triggers: Triggers,
    grace: Duration,
}

impl GatewayTracker {
    /// A tracker that reports count changes through `triggers`.
    pub fn new(triggers: Triggers, grace: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            triggers,
            grace,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), GatewayEntry>> {
        // Entries are replaced whole; a panic elsewhere cannot leave one half-written.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many gateways serve `key`.
    pub fn count(&self, key: &RouteKey) -> u32 {
        let n = self.lock().values().filter(|e| e.routes.contains(key)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Gateways known now.
    pub fn gateways(&self) -> usize {
        self.lock().len()
    }

    fn begin(&self, id: &(String, String)) {
        let mut entries = self.lock();
        let entry = entries.entry(id.clone()).or_insert_with(|| GatewayEntry {
            routes: BTreeSet::new(),
            active: 0,
            last_seen: Instant::now(),
        });
        entry.active += 1;
        entry.last_seen = Instant::now();
    }

    fn end(&self, id: &(String, String)) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.active = entry.active.saturating_sub(1);
            entry.last_seen = Instant::now();
        }
    }

    fn served(&self, id: &(String, String), routes: BTreeSet<RouteKey>) {
        let changed: Vec<RouteKey> = {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(id) else { return };
            let changed = entry.routes.symmetric_difference(&routes).cloned().collect();
            entry.routes = routes;
            changed
        };
        for key in &changed {
            self.triggers.route(key);
        }
    }

    /// Forgets gateways idle (no poll open) for longer than the grace period.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut gone = BTreeSet::new();
        self.lock().retain(|_, e| {
            let keep = e.active > 0 || now.duration_since(e.last_seen) < self.grace;
            if !keep {
                gone.extend(e.routes.iter().cloned());
            }
            keep
        });
        for key in &gone {
            self.triggers.route(key);
        }
    }
}

/// Ends a poll in the tracker however the request ends (answer, timeout, or the client going
/// away and hyper dropping the future).
struct PollGuard<'a> {
    tracker: &'a GatewayTracker,
    id: (String, String),
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.tracker.end(&self.id);
    }
}

/// Shared state of the control API.
pub struct ControlApi {
    client: kube::Client,
    compiled: watch::Receiver<Arc<Compiled>>,
    config: ApiConfig,
    tracker: Arc<GatewayTracker>,
    metrics: Arc<ControllerMetrics>,
}

impl std::fmt::Debug for ControlApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlApi")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ControlApi {
    /// The API over the compiled routes in `compiled`.
    pub fn new(
        client: kube::Client,
        compiled: watch::Receiver<Arc<Compiled>>,
        config: ApiConfig,
        tracker: Arc<GatewayTracker>,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        Self {
            client,
            compiled,
            config,
            tracker,
            metrics,
        }
    }
}

/// Serves the control API until `cancel` fires. Open long polls end with the connections.
pub async fn serve(listener: TcpListener, api: Arc<ControlApi>, cancel: CancellationToken) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "control API accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let api = api.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(handle(&api, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = cancel.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

async fn handle(api: &ControlApi, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&http::Method::GET, "/readyz") => {
            if api.compiled.borrow().ready {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "caches not synced\n")
            }
        }
        (&http::Method::GET, SNAPSHOT_PATH) => match snapshot(api, &req).await {
            Ok(Some(snapshot)) => {
                ControllerMetrics::inc(&api.metrics.snapshots_served);
                match serde_json::to_vec(&snapshot) {
                    Ok(body) => respond(StatusCode::OK, "application/json", body),
                    Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
                }
            }
            Ok(None) => {
                ControllerMetrics::inc(&api.metrics.snapshots_unchanged);
                respond(StatusCode::NOT_MODIFIED, "text/plain", Bytes::new())
            }
            Err(error) => {
                if matches!(error, ApiError::Unauthorized(_) | ApiError::Forbidden(_)) {
                    ControllerMetrics::inc(&api.metrics.auth_failures);
                }
                tracing::info!(%error, "snapshot request refused");
                respond(error.status(), "text/plain", format!("{error}\n"))
            }
        },
        (&http::Method::GET, "/metrics") => {
            let format = crate::metrics::Format::negotiate(req.headers().get(header::ACCEPT));
            let mut exposition = crate::metrics::Exposition::new(format);
            crate::metrics::encode_controller(
                &mut exposition,
                &api.metrics.snapshot(),
                Some(&api.metrics.reconcile_duration),
            );
            api.metrics.admissions.encode(&mut exposition);
            respond(StatusCode::OK, format.content_type(), exposition.finish())
        }
        (_, SNAPSHOT_PATH | "/healthz" | "/readyz" | "/metrics") => {
            respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n")
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The query of a snapshot request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotQuery {
    namespace: String,
    pod: String,
    version: Option<u64>,
}

fn parse_query(query: Option<&str>) -> Result<SnapshotQuery, ApiError> {
    let mut namespace = None;
    let mut pod = None;
    let mut version = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| ApiError::BadRequest(format!("bad escape in {key}")))?;
        match key {
            "namespace" => namespace = Some(value),
            "pod" => pod = Some(value),
            "version" => {
                version = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| ApiError::BadRequest(format!("version must be an integer (got {value:?})")))?,
                );
            }
            _ => {}
        }
    }
    let valid = |s: &String| !s.is_empty() && s.len() <= 253 && !s.contains('/');
    let namespace = namespace
        .filter(valid)
        .ok_or_else(|| ApiError::BadRequest("namespace is required".into()))?;
    let pod = pod
        .filter(valid)
        .ok_or_else(|| ApiError::BadRequest("pod is required".into()))?;
    Ok(SnapshotQuery {
        namespace,
        pod,
        version,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Who a token belongs to, as the API server says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Caller {
    namespace: String,
    service_account: String,
    pod_name: Option<String>,
    pod_uid: Option<String>,
}

async fn review(client: &kube::Client, token: &str, audience: &str) -> Result<Caller, ApiError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let result = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| ApiError::Upstream(format!("TokenReview failed: {e}")))?;
    let status = result.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ApiError::Unauthorized(format!(
            "token not accepted: {}",
            status.error.as_deref().unwrap_or("not authenticated")
        )));
    }
    if let Some(audiences) = &status.audiences
        && !audiences.is_empty()
        && !audiences.iter().any(|a| a == audience)
    {
        return Err(ApiError::Unauthorized(format!("token is not for audience {audience}")));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let mut parts = username
        .strip_prefix("system:serviceaccount:")
        .map(|rest| rest.splitn(2, ':'));
    let (namespace, service_account) = match parts.as_mut().map(|p| (p.next(), p.next())) {
        Some((Some(ns), Some(sa))) if !ns.is_empty() && !sa.is_empty() => (ns.to_owned(), sa.to_owned()),
        _ => {
            return Err(ApiError::Forbidden(format!(
                "{username:?} is not a ServiceAccount of a gateway pod"
            )));
        }
    };
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    Ok(Caller {
        namespace,
        service_account,
        pod_name: first(EXTRA_POD_NAME),
        pod_uid: first(EXTRA_POD_UID),
    })
}

/// Authenticates, authorizes and reads the pod's labels.
async fn identify(
    api: &ControlApi,
    req: &Request<Incoming>,
    query: &SnapshotQuery,
) -> Result<BTreeMap<String, String>, ApiError> {
    let caller = match &api.config.auth {
        AuthMode::InsecureSkipAuth => None,
        AuthMode::TokenReview { audience } => {
            let token = bearer(req).ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
            let caller = review(&api.client, token, audience).await?;
            if caller.namespace != query.namespace {
                return Err(ApiError::Forbidden(format!(
                    "ServiceAccount {}/{} may not read snapshots of namespace {}",
                    caller.namespace, caller.service_account, query.namespace
                )));
            }
            if let Some(pod) = &caller.pod_name
                && *pod != query.pod
            {
                return Err(ApiError::Forbidden(format!(
                    "the token belongs to pod {pod}, not {}",
                    query.pod
                )));
            }
            Some(caller)
        }
    };
    let pods: Api<Pod> = Api::namespaced(api.client.clone(), &query.namespace);
    let pod = pods
        .get_opt(&query.pod)
        .await
        .map_err(|e| ApiError::Upstream(format!("reading pod {}/{}: {e}", query.namespace, query.pod)))?
        .ok_or_else(|| ApiError::Forbidden(format!("pod {}/{} not found", query.namespace, query.pod)))?;
    if let Some(caller) = caller {
        match &caller.pod_name {
            Some(_) => {
                if let Some(uid) = &caller.pod_uid
                    && pod.metadata.uid.as_ref() != Some(uid)
                {
                    return Err(ApiError::Forbidden(format!(
                        "the token was issued to an earlier pod named {}",
                        query.pod
                    )));
                }
            }
            None => {
                // A token without the pod claim (legacy Secret-based): the pod must run as the
                // token's ServiceAccount.
                let pod_sa = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".to_owned());
                if pod_sa != caller.service_account {
                    return Err(ApiError::Forbidden(format!(
                        "pod {}/{} runs as ServiceAccount {pod_sa}, not {}",
                        query.namespace, query.pod, caller.service_account
                    )));
                }
            }
        }
    }
    Ok(pod.metadata.labels.unwrap_or_default())
}

/// `Ok(Some)`: a new snapshot; `Ok(None)`: unchanged within the poll window.
async fn snapshot(api: &ControlApi, req: &Request<Incoming>) -> Result<Option<Snapshot>, ApiError> {
    let query = parse_query(req.uri().query())?;
    let labels = identify(api, req, &query).await?;
    let id = (query.namespace.clone(), query.pod.clone());
    api.tracker.begin(&id);
    let _guard = PollGuard {
        tracker: &api.tracker,
        id: id.clone(),
    };
    let deadline = Instant::now() + api.config.poll_timeout;
    let mut compiled = api.compiled.clone();
    loop {
        let current = compiled.borrow_and_update().clone();
        if current.ready {
            let snapshot = current.snapshot_for(&query.namespace, &labels);
            let keys = snapshot
                .routes
                .iter()
                .map(|r| RouteKey::new(&r.namespace, &r.name))
                .collect();
            api.tracker.served(&id, keys);
            if query.version != Some(snapshot.version) {
                return Ok(Some(snapshot));
            }
        }
        tokio::select! {
            changed = compiled.changed() => {
                if changed.is_err() {
                    return Err(ApiError::Upstream("controller shutting down".into()));
                }
            }
            () = tokio::time::sleep_until(deadline) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_need_namespace_and_pod_and_an_integer_version() {
        assert_eq!(
            parse_query(Some("namespace=ns&pod=gw-1&version=42")),
            Ok(SnapshotQuery {
                namespace: "ns".into(),
                pod: "gw-1".into(),
                version: Some(42)
            })
        );
        assert_eq!(
            parse_query(Some("namespace=ns&pod=a%2Db")).map(|q| q.pod),
            Ok("a-b".into())
        );
        assert!(matches!(parse_query(Some("pod=x")), Err(ApiError::BadRequest(_))));
        assert!(matches!(
            parse_query(Some("namespace=a&pod=b&version=x")),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_query(Some("namespace=a&pod=b%2Fc")),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_query(Some("namespace=a&pod=%zz")),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(parse_query(None), Err(ApiError::BadRequest(_))));
    }

    #[tokio::test]
    async fn the_tracker_counts_gateways_and_reports_changes() {
        let (one_tx, mut one_rx) = mpsc::channel(8);
        let (all_tx, _all_rx) = mpsc::channel(1);
        let tracker = GatewayTracker::new(
            Triggers {
                one: one_tx,
                all: all_tx,
            },
            Duration::ZERO,
        );
        let id = ("ns".to_owned(), "gw".to_owned());
        let key = RouteKey::new("ns", "chat");
        tracker.begin(&id);
        tracker.served(&id, [key.clone()].into());
        assert_eq!(tracker.count(&key), 1);
        assert_eq!(one_rx.try_recv().expect("changed").name, "chat");
        tracker.served(&id, [key.clone()].into());
        assert!(one_rx.try_recv().is_err(), "no change, no trigger");
        tracker.sweep();
        assert_eq!(tracker.count(&key), 1, "a gateway with an open poll stays");
        tracker.end(&id);
        tracker.sweep();
        assert_eq!(tracker.count(&key), 0);
        assert_eq!(one_rx.try_recv().expect("changed").name, "chat");
    }
}
