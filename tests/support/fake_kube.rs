//! An in-process fake Kubernetes API server for controller tests.
//!
//! It speaks the real HTTP API (paths, verbs, content types, `Status` errors, watch streams) for
//! the resources wsgate touches, so a `kube::Client` talks to it unchanged:
//!
//! | resource | group/version | notes |
//! |---|---|---|
//! | websocketroutes | wsgate.io/v1alpha1 | validated, pruned and defaulted by the *generated* CRD schema; status subresource; generation |
//! | services, secrets, pods | v1 | (Secret `stringData` is folded into `data`) |
//! | events | events.k8s.io/v1, v1 | |
//! | leases | coordination.k8s.io/v1 | |
//! | tokenreviews | authentication.k8s.io/v1 | create only; tokens configured by the test |
//!
//! Verbs: list (with `resourceVersion`), watch (`?watch=true&resourceVersion=N`, JSON lines,
//! `BOOKMARK`s with `allowWatchBookmarks`, an `ERROR` event with `410 Gone` for a version older
//! than the last [`FakeKube::compact`], `timeoutSeconds`), get, create, update (`409` on a stale
//! `resourceVersion`), merge patch, server-side apply (`application/apply-patch+yaml`, field
//! managers, conflicts without `force`, list-map merge of `x-kubernetes-list-type: map` lists,
//! removal of fields a manager stops applying), delete with finalizers (`deletionTimestamp`,
//! removal once the last finalizer goes). On resources with a status subresource, writes to
//! the main resource ignore `status` and status writes change only `status`; `generation`
//! increases only when something other than `metadata` and `status` changes.
//!
//! Simplifications (documented, not hidden): no RBAC or admission; strategic merge patch is
//! treated as a JSON merge patch (builtins only; CRDs answer 415 like a real server); label and
//! field selectors are refused with 400 rather than ignored; only "Apply" operations record
//! field ownership; lists are not paginated.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One kind of object the fake serves.
#[derive(Debug, Clone, Copy)]
struct Resource {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status_subresource: bool,
    generation: bool,
    /// Validated against the generated WebSocketRoute CRD schema.
    crd: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        group: "wsgate.io",
        version: "v1alpha1",
        plural: "websocketroutes",
        kind: "WebSocketRoute",
        namespaced: true,
        status_subresource: true,
        generation: true,
        crd: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status_subresource: true,
        generation: false,
        crd: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status_subresource: false,
        generation: false,
        crd: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        status_subresource: true,
        generation: false,
        crd: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        generation: false,
        crd: false,
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        generation: false,
        crd: false,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        generation: false,
        crd: false,
    },
    Resource {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "tokenreviews",
        kind: "TokenReview",
        namespaced: false,
        status_subresource: false,
        generation: false,
        crd: false,
    },
];

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Storage identity: events of both groups are separate stores here.
    fn id(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

/// Who a token belongs to, as a TokenReview reports it.
#[derive(Debug, Clone)]
pub struct TokenUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// Audiences the token was issued for.
    pub audiences: Vec<String>,
}

impl TokenUser {
    /// A bound ServiceAccount token of `namespace/sa` for `pod` (with `uid`), audience
    /// `audience`: what kubelet projects into a pod on 1.20+.
    pub fn pod(namespace: &str, sa: &str, pod: &str, pod_uid: &str, audience: &str) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert("authentication.kubernetes.io/pod-name".to_owned(), vec![pod.to_owned()]);
        extra.insert(
            "authentication.kubernetes.io/pod-uid".to_owned(),
            vec![pod_uid.to_owned()],
        );
        Self {
            username: format!("system:serviceaccount:{namespace}:{sa}"),
            uid: format!("uid-{namespace}-{sa}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
            ],
            extra,
            audiences: vec![audience.to_owned()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ObjKey {
    res: String,
    ns: String,
    name: String,
}

#[derive(Debug, Clone)]
struct LogEntry {
    rv: u64,
    res: String,
    ns: String,
    kind: &'static str,
    object: Value,
}

/// A field path for server-side apply: object keys and list-map element keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum PathElem {
    Field(String),
    Key(String),
}

type FieldPath = Vec<PathElem>;

struct State {
    rv: u64,
    uid: u64,
    clock_offset: i64,
    objects: BTreeMap<ObjKey, Value>,
    log: Vec<LogEntry>,
    compacted: u64,
    /// (object, subresource) → manager → fields it applied last.
    owners: HashMap<(ObjKey, String), BTreeMap<String, BTreeSet<FieldPath>>>,
    tokens: HashMap<String, TokenUser>,
    route_schema: Value,
    requests: Vec<String>,
    token_reviews: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    kill: watch::Sender<u64>,
    bookmarks: watch::Sender<u64>,
}

/// A running fake API server on 127.0.0.1.
pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// The WebSocketRoute CRD's openAPIV3Schema, from the generated CRD YAML.
fn route_schema() -> Value {
    let crd: Value = serde_yaml::from_str(&wsgate::controller::crd_yaml()).expect("generated CRD parses");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

impl FakeKube {
    /// Starts the server.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake kube");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                uid: 0,
                clock_offset: 0,
                objects: BTreeMap::new(),
                log: Vec::new(),
                compacted: 0,
                owners: HashMap::new(),
                tokens: HashMap::new(),
                route_schema: route_schema(),
                requests: Vec::new(),
                token_reviews: 0,
            }),
            changed: watch::Sender::new(100),
            kill: watch::Sender::new(0),
            bookmarks: watch::Sender::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        Self { addr, shared, stop }
    }

    /// A client for this server.
    pub fn client(&self) -> kube::Client {
        client_for(self.addr)
    }

    /// A client on its own port, and the token that partitions it from the server: once
    /// cancelled, its connections are cut and new ones refused (a network partition, or a
    /// crashed process whose requests stop arriving).
    pub async fn partitionable_client(&self) -> (kube::Client, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake kube");
        let addr = listener.local_addr().expect("addr");
        let cut = self.stop.child_token();
        tokio::spawn(serve(listener, self.shared.clone(), cut.clone()));
        (client_for(addr), cut)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("fake kube state")
    }

    /// Accepts `token` as belonging to `user`.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.state().tokens.insert(token.to_owned(), user);
    }

    /// Creates the pod `name` (service account `gateway`, `labels`) in `namespace` and returns
    /// a token bound to it for the control API's audience, as a gateway sidecar's would be.
    pub async fn gateway_pod_token(&self, namespace: &str, name: &str, labels: Value) -> String {
        use k8s_openapi::api::core::v1::Pod;
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"serviceAccountName": "gateway", "containers": [{"name": "gw", "image": "wsgate"}]}
        }))
        .expect("pod");
        let pod = kube::Api::<Pod>::namespaced(self.client(), namespace)
            .create(&kube::api::PostParams::default(), &pod)
            .await
            .expect("create pod");
        let token = format!("token-{name}-{}", uuid::Uuid::new_v4());
        self.add_token(
            &token,
            TokenUser::pod(
                namespace,
                "gateway",
                name,
                pod.metadata.uid.as_deref().expect("uid"),
                wsgate::config::control::TOKEN_AUDIENCE,
            ),
        );
        token
    }

    /// Moves the server's clock (creation timestamps) forward.
    pub fn advance_clock(&self, seconds: i64) {
        self.state().clock_offset += seconds;
    }

    /// Forgets the event history: watches resuming from an older version get `410 Gone`.
    pub fn compact(&self) {
        let mut state = self.state();
        state.compacted = state.rv;
        state.log.clear();
    }

    /// Ends every open watch (as an API server restart or a load balancer would).
    pub fn close_watches(&self) {
        self.shared.kill.send_modify(|n| *n += 1);
    }

    /// Sends a BOOKMARK on every watch that asked for bookmarks.
    pub fn send_bookmarks(&self) {
        self.shared.bookmarks.send_modify(|n| *n += 1);
    }

    /// The stored object, if any (`res` is `group/plural`, e.g. `wsgate.io/websocketroutes`,
    /// `/secrets`).
    pub fn get(&self, res: &str, ns: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&ObjKey {
                res: res.to_owned(),
                ns: ns.to_owned(),
                name: name.to_owned(),
            })
            .cloned()
    }

    /// Every stored object of `res`.
    pub fn list(&self, res: &str) -> Vec<Value> {
        self.state()
            .objects
            .iter()
            .filter(|(k, _)| k.res == res)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Requests seen, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    /// TokenReviews answered.
    pub fn token_reviews(&self) -> u64 {
        self.state().token_reviews
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

fn client_for(addr: SocketAddr) -> kube::Client {
    let url: http::Uri = format!("http://{addr}").parse().expect("url");
    kube::Client::try_from(kube::Config::new(url)).expect("client")
}

/// Accepts connections until `stop`; cancelling `stop` also cuts open connections.
async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            () = stop.cancelled() => return,
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// A streaming body fed by a channel (watch responses).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A failure `Status` object, as the API server sends it.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn not_found(res: &Resource, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{}.{} \"{name}\" not found", res.plural, res.group).replace(". \"", " \""),
        );
        if res.group.is_empty() {
            e.message = format!("{} \"{name}\" not found", res.plural);
        }
        e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural}));
        e
    }

    fn conflict(res: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                if res.group.is_empty() {
                    res.plural.to_owned()
                } else {
                    format!("{}.{}", res.plural, res.group)
                }
            ),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn to_value(&self) -> Value {
        let mut v = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }

    fn response(&self) -> Response<Body> {
        json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.to_value(),
        )
    }
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(x) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a request goes.
struct Target {
    res: Resource,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some(*s)),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let res = RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
        .copied()
        .ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            )
        })?;
    let status = match sub {
        None => false,
        Some("status") if res.status_subresource => true,
        Some(s) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("no subresource {s} on {}", res.plural),
            ));
        }
    };
    if res.namespaced && name.is_some() && ns.is_none() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "a namespaced object needs a namespace in the path",
        ));
    }
    Ok(Target { res, ns, name, status })
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let query = parse_query(parts.uri.query());
    shared.state.lock().expect("state").requests.push(format!(
        "{} {}",
        parts.method,
        parts.uri.path_and_query().map_or("", |p| p.as_str())
    ));
    let target = match route(parts.uri.path()) {
        Ok(t) => t,
        Err(e) => return e.response(),
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return ApiError::bad_request("unreadable body").response(),
    };
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let result = match (&parts.method, &target.name) {
        (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch_response(&shared, &target, &query);
        }
        (&Method::GET, None) => list(&shared, &target, &query),
        (&Method::GET, Some(name)) => get(&shared, &target, name),
        (&Method::POST, None) => create(&shared, &target, &body),
        (&Method::PUT, Some(name)) => update(&shared, &target, name, &body),
        (&Method::PATCH, Some(name)) => patch(&shared, &target, name, &content_type, &query, &body),
        (&Method::DELETE, Some(name)) => delete(&shared, &target, name),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{} is not supported here", parts.method),
        )),
    };
    match result {
        Ok((status, value)) => json_response(status, &value),
        Err(e) => e.response(),
    }
}

type Answer = Result<(StatusCode, Value), ApiError>;

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn now_rfc3339(state: &State) -> String {
    let now = k8s_openapi::jiff::Timestamp::now().as_second() + state.clock_offset;
    k8s_openapi::jiff::Timestamp::from_second(now)
        .expect("time")
        .to_string()
}

fn key_of(target: &Target, name: &str) -> ObjKey {
    ObjKey {
        res: target.res.id(),
        ns: target.ns.clone().unwrap_or_default(),
        name: name.to_owned(),
    }
}

impl Shared {
    /// Stores (or removes) an object with a new resourceVersion and logs the event.
    fn commit(&self, state: &mut State, key: &ObjKey, kind: &'static str, mut object: Value) -> Value {
        state.rv += 1;
        object["metadata"]["resourceVersion"] = Value::String(state.rv.to_string());
        if kind == "DELETED" {
            state.objects.remove(key);
            state.owners.retain(|(k, _), _| k != key);
        } else {
            state.objects.insert(key.clone(), object.clone());
        }
        state.log.push(LogEntry {
            rv: state.rv,
            res: key.res.clone(),
            ns: key.ns.clone(),
            kind,
            object: object.clone(),
        });
        self.changed.send_replace(state.rv);
        object
    }
}

fn selectors_unsupported(query: &HashMap<String, String>) -> Result<(), ApiError> {
    for key in ["labelSelector", "fieldSelector"] {
        if query.get(key).is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::bad_request(format!(
                "{key} is not supported by the fake API server"
            )));
        }
    }
    Ok(())
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Answer {
    selectors_unsupported(query)?;
    let state = shared.state.lock().expect("state");
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|(k, _)| k.res == target.res.id() && target.ns.as_ref().is_none_or(|ns| *ns == k.ns))
        .map(|(_, v)| v.clone())
        .collect();
    Ok((
        StatusCode::OK,
        json!({
            "kind": format!("{}List", target.res.kind),
            "apiVersion": target.res.api_version(),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items
        }),
    ))
}

fn get(shared: &Shared, target: &Target, name: &str) -> Answer {
    let state = shared.state.lock().expect("state");
    state
        .objects
        .get(&key_of(target, name))
        .cloned()
        .map(|v| (StatusCode::OK, v))
        .ok_or_else(|| ApiError::not_found(&target.res, name))
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Checks apiVersion, kind and namespace of a written object.
fn check_identity(target: &Target, object: &mut Value) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let res = &target.res;
    if let Some(av) = object.get("apiVersion").and_then(Value::as_str)
        && av != res.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "apiVersion {av} does not match {}",
            res.api_version()
        )));
    }
    if let Some(kind) = object.get("kind").and_then(Value::as_str)
        && kind != res.kind
    {
        return Err(ApiError::bad_request(format!(
            "kind {kind} does not match {}",
            res.kind
        )));
    }
    object["apiVersion"] = Value::String(res.api_version());
    object["kind"] = Value::String(res.kind.to_owned());
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    if res.namespaced {
        let ns = target.ns.clone().unwrap_or_default();
        match object["metadata"].get("namespace").and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => object["metadata"]["namespace"] = Value::String(ns),
        }
    }
    Ok(())
}

/// Folds Secret `stringData` into `data`, as the API server does.
fn normalize(res: &Resource, object: &mut Value) {
    if res.plural == "secrets"
        && let Some(Value::Object(string_data)) = object.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        use base64::Engine as _;
        let data = object["data"].as_object().cloned().unwrap_or_default();
        let mut data = data;
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(k, Value::String(base64::engine::general_purpose::STANDARD.encode(text)));
        }
        object["data"] = Value::Object(data);
    }
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    v
}

fn validate_crd(state: &State, target: &Target, object: &mut Value, name: &str) -> Result<(), ApiError> {
    if !target.res.crd {
        return Ok(());
    }
    let schema = state.route_schema.clone();
    let mut causes = Vec::new();
    for part in ["spec", "status"] {
        let sub = &schema["properties"][part];
        match object.get_mut(part) {
            Some(value) => check_value(value, sub, part, &mut causes),
            None if schema["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == part)) =>
            {
                causes.push((part.to_owned(), "Required value".to_owned(), "FieldValueRequired"));
            }
            None => {}
        }
    }
    // Unknown top-level fields are pruned.
    if let Some(o) = object.as_object_mut() {
        o.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "spec" | "status"));
    }
    if causes.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = causes.iter().map(|(f, m, _)| format!("{f}: {m}")).collect();
    let message = if list.len() == 1 {
        format!("{} \"{name}\" is invalid: {}", target.res.qualified_kind(), list[0])
    } else {
        format!(
            "{} \"{name}\" is invalid: [{}]",
            target.res.qualified_kind(),
            list.join(", ")
        )
    };
    let mut e = ApiError::new(422, "Invalid", message);
    e.details = Some(json!({
        "name": name, "group": target.res.group, "kind": target.res.kind,
        "causes": causes.iter().map(|(f, m, r)| json!({"reason": r, "message": m, "field": f})).collect::<Vec<_>>()
    }));
    Err(e)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Prunes unknown fields and non-nullable nulls, applies defaults, and validates `value`
/// against a structural schema, collecting Kubernetes-style causes.
fn check_value(value: &mut Value, schema: &Value, path: &str, causes: &mut Vec<(String, String, &'static str)>) {
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let actual = type_name(value);
    let type_ok = match ty {
        "" => true,
        "number" => actual == "integer" || actual == "number",
        t => t == actual,
    };
    if !type_ok {
        causes.push((
            path.to_owned(),
            format!("Invalid value: \"{actual}\": {path} in body must be of type {ty}: \"{actual}\""),
            "FieldValueTypeInvalid",
        ));
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            // Prune: unknown fields, and nulls where not nullable.
            map.retain(|k, v| {
                let sub = props.and_then(|p| p.get(k)).or(additional);
                match sub {
                    None => preserve,
                    Some(s) => !(v.is_null() && s.get("nullable") != Some(&Value::Bool(true))),
                }
            });
            // Defaults.
            if let Some(props) = props {
                for (k, s) in props {
                    if !map.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                }
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let sub = props.and_then(|p| p.get(&k)).or(additional);
                if let (Some(sub), Some(v)) = (sub, map.get_mut(&k)) {
                    if v.is_null() {
                        continue;
                    }
                    let child = if props.is_some_and(|p| p.contains_key(&k)) {
                        format!("{path}.{k}")
                    } else {
                        format!("{path}[{k}]")
                    };
                    check_value(v, sub, &child, causes);
                }
            }
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        causes.push((format!("{path}.{r}"), "Required value".to_owned(), "FieldValueRequired"));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                causes.push((
                    path.to_owned(),
                    format!("Too many: {}: must have at most {max} items", items.len()),
                    "FieldValueTooMany",
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check_value(item, item_schema, &format!("{path}[{i}]"), causes);
                }
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let k: Vec<String> = keys.iter().map(|key| item[*key].to_string()).collect();
                    if !seen.insert(k.clone()) {
                        causes.push((
                            format!("{path}[{i}]"),
                            format!("Duplicate value: {}", k.join(",")),
                            "FieldValueDuplicate",
                        ));
                    }
                }
            }
        }
        Value::String(s) => {
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
                && !allowed.iter().any(|a| a.as_str() == Some(s.as_str()))
            {
                let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                causes.push((
                    path.to_owned(),
                    format!("Unsupported value: \"{s}\": supported values: {}", list.join(", ")),
                    "FieldValueNotSupported",
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                let re = regex::Regex::new(pattern).expect("schema pattern compiles");
                if !re.is_match(s) {
                    causes.push((
                        path.to_owned(),
                        format!("Invalid value: \"{s}\": {path} in body should match '{pattern}'"),
                        "FieldValueInvalid",
                    ));
                }
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && s.chars().count() as u64 > max
            {
                causes.push((
                    path.to_owned(),
                    format!("Too long: may not be longer than {max}"),
                    "FieldValueTooLong",
                ));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && (s.chars().count() as u64) < min
            {
                causes.push((
                    path.to_owned(),
                    format!("Invalid value: \"{s}\": {path} in body should be at least {min} chars long"),
                    "FieldValueInvalid",
                ));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                causes.push((
                    path.to_owned(),
                    format!("Invalid value: {n}: {path} in body should be greater than or equal to {min}"),
                    "FieldValueInvalid",
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                causes.push((
                    path.to_owned(),
                    format!("Invalid value: {n}: {path} in body should be less than or equal to {max}"),
                    "FieldValueInvalid",
                ));
            }
        }
        _ => {}
    }
}

fn create(shared: &Shared, target: &Target, body: &[u8]) -> Answer {
    let mut object = parse_body(body)?;
    check_identity(target, &mut object)?;
    let mut state = shared.state.lock().expect("state");
    if target.res.plural == "tokenreviews" {
        state.token_reviews += 1;
        return Ok((StatusCode::CREATED, token_review(&state, object)));
    }
    let mut name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
    if name.is_empty()
        && let Some(prefix) = object["metadata"]["generateName"].as_str()
    {
        state.uid += 1;
        name = format!("{prefix}{:05x}", state.uid);
        object["metadata"]["name"] = Value::String(name.clone());
    }
    if !is_dns_subdomain(&name) {
        return Err(invalid_name(target, &name));
    }
    let key = key_of(target, &name);
    if state.objects.contains_key(&key) {
        let mut e = ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", target.res.plural),
        );
        e.details = Some(json!({"name": name, "group": target.res.group, "kind": target.res.plural}));
        return Err(e);
    }
    normalize(&target.res, &mut object);
    if target.res.status_subresource
        && let Some(o) = object.as_object_mut()
    {
        o.remove("status");
    }
    validate_crd(&state, target, &mut object, &name)?;
    state.uid += 1;
    let uid = format!("00000000-0000-0000-0000-{:012x}", state.uid);
    let now = now_rfc3339(&state);
    let meta = &mut object["metadata"];
    meta["uid"] = Value::String(uid);
    meta["creationTimestamp"] = Value::String(now);
    if let Some(m) = meta.as_object_mut() {
        m.remove("deletionTimestamp");
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    if target.res.generation {
        meta["generation"] = json!(1);
    }
    let stored = shared.commit(&mut state, &key, "ADDED", object);
    Ok((StatusCode::CREATED, stored))
}

fn invalid_name(target: &Target, name: &str) -> ApiError {
    let mut e = ApiError::new(
        422,
        "Invalid",
        format!(
            "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            target.res.qualified_kind()
        ),
    );
    e.details = Some(
        json!({"name": name, "kind": target.res.kind, "causes": [{"reason": "FieldValueInvalid", "field": "metadata.name"}]}),
    );
    e
}

fn token_review(state: &State, mut review: Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let status = match state.tokens.get(token) {
        None => json!({"authenticated": false, "error": "invalid bearer token", "user": {}}),
        Some(user) => {
            let granted: Vec<&String> = if wanted.is_empty() {
                user.audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| user.audiences.contains(a)).collect()
            };
            if granted.is_empty() {
                json!({"authenticated": false, "user": {}, "error": format!("token audiences {:?} is invalid for the target audiences {:?}", user.audiences, wanted)})
            } else {
                json!({
                    "authenticated": true,
                    "audiences": granted,
                    "user": {"username": user.username, "uid": user.uid, "groups": user.groups, "extra": user.extra}
                })
            }
        }
    };
    review["status"] = status;
    review["metadata"] = json!({"creationTimestamp": null});
    review
}

/// Finishes a write of an existing object: immutable metadata kept, status or spec kept as
/// the subresource rules say, generation bumped on spec changes, finalizers honoured.
/// Returns the stored (or deleted) object, or the unchanged one for a no-op.
fn finish_write(
    shared: &Shared,
    state: &mut State,
    target: &Target,
    key: &ObjKey,
    old: &Value,
    mut new: Value,
    name: &str,
) -> Answer {
    normalize(&target.res, &mut new);
    if target.res.status_subresource {
        if target.status {
            // Only status changes.
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        } else {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
    }
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "generation",
        "namespace",
        "name",
    ] {
        match old["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    validate_crd(state, target, &mut new, name)?;
    if target.res.generation && spec_part(&new) != spec_part(old) {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        new["metadata"]["generation"] = json!(g);
    }
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if new == *old {
        return Ok((StatusCode::OK, new));
    }
    let deleting = new["metadata"].get("deletionTimestamp").is_some();
    let finalizers_empty = new["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
    if deleting && finalizers_empty {
        let stored = shared.commit(state, key, "DELETED", new);
        return Ok((StatusCode::OK, stored));
    }
    let stored = shared.commit(state, key, "MODIFIED", new);
    Ok((StatusCode::OK, stored))
}

fn update(shared: &Shared, target: &Target, name: &str, body: &[u8]) -> Answer {
    let mut object = parse_body(body)?;
    check_identity(target, &mut object)?;
    if object["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let mut state = shared.state.lock().expect("state");
    let key = key_of(target, name);
    let old = state
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&target.res, name))?;
    if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
        && !rv.is_empty()
        && Some(rv) != old["metadata"]["resourceVersion"].as_str()
    {
        return Err(ApiError::conflict(&target.res, name));
    }
    finish_write(shared, &mut state, target, &key, &old, object, name)
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Answer {
    match content_type {
        "application/merge-patch+json" => {}
        "application/strategic-merge-patch+json" if !target.res.crd => {}
        "application/apply-patch+yaml" => return apply(shared, target, name, query, body),
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/apply-patch+yaml (got {other})"
                ),
            ));
        }
    }
    let patch = parse_body(body)?;
    let mut state = shared.state.lock().expect("state");
    let key = key_of(target, name);
    let old = state
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&target.res, name))?;
    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
        && Some(rv) != old["metadata"]["resourceVersion"].as_str()
    {
        return Err(ApiError::conflict(&target.res, name));
    }
    let mut new = old.clone();
    merge_patch(&mut new, &patch);
    check_identity(target, &mut new)?;
    finish_write(shared, &mut state, target, &key, &old, new, name)
}

// ---------------------------------------------------------------------------------------------
// Server-side apply

fn list_map_keys(schema: Option<&Value>) -> Option<Vec<String>> {
    let s = schema?;
    (s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map")).then(|| {
        s["x-kubernetes-list-map-keys"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    })
}

fn element_key(item: &Value, keys: &[String]) -> String {
    keys.iter().map(|k| item[k].to_string()).collect::<Vec<_>>().join(",")
}

fn child_schema<'a>(schema: Option<&'a Value>, field: &str) -> Option<&'a Value> {
    let s = schema?;
    s.get("properties")
        .and_then(|p| p.get(field))
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

/// The leaf fields of an applied configuration.
fn field_set(value: &Value, schema: Option<&Value>, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(PathElem::Field(k.clone()));
                field_set(v, child_schema(schema, k), prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => match list_map_keys(schema) {
            Some(keys) => {
                let item_schema = schema.and_then(|s| s.get("items"));
                for item in items {
                    prefix.push(PathElem::Key(element_key(item, &keys)));
                    field_set(item, item_schema, prefix, out);
                    prefix.pop();
                }
            }
            None => {
                out.insert(prefix.clone());
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

fn value_at<'a>(value: &'a Value, path: &[PathElem], schema: Option<&Value>) -> Option<&'a Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(value);
    };
    match first {
        PathElem::Field(k) => value_at(value.get(k)?, rest, child_schema(schema, k)),
        PathElem::Key(key) => {
            let keys = list_map_keys(schema)?;
            let item = value.as_array()?.iter().find(|i| element_key(i, &keys) == *key)?;
            value_at(item, rest, schema.and_then(|s| s.get("items")))
        }
    }
}

fn remove_at(value: &mut Value, path: &[PathElem], schema: Option<&Value>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match first {
        PathElem::Field(k) => {
            if rest.is_empty() {
                if let Some(o) = value.as_object_mut() {
                    o.remove(k);
                }
            } else if let Some(child) = value.get_mut(k) {
                remove_at(child, rest, child_schema(schema, k));
            }
        }
        PathElem::Key(key) => {
            let Some(keys) = list_map_keys(schema) else { return };
            let item_schema = schema.and_then(|s| s.get("items"));
            if let Some(items) = value.as_array_mut() {
                if let Some(item) = items.iter_mut().find(|i| element_key(i, &keys) == *key) {
                    remove_at(item, rest, item_schema);
                }
                items.retain(|i| !i.as_object().is_some_and(Map::is_empty));
            }
        }
    }
}

fn merge_apply(live: &mut Value, applied: &Value, schema: Option<&Value>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                let sub = child_schema(schema, k);
                match l.get_mut(k) {
                    Some(lv)
                        if (lv.is_object() && v.is_object()) || (lv.is_array() && list_map_keys(sub).is_some()) =>
                    {
                        merge_apply(lv, v, sub);
                    }
                    _ => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => {
            let Some(keys) = list_map_keys(schema) else {
                *l = a.clone();
                return;
            };
            let item_schema = schema.and_then(|s| s.get("items"));
            for item in a {
                let key = element_key(item, &keys);
                match l.iter_mut().find(|x| element_key(x, &keys) == key) {
                    Some(existing) => merge_apply(existing, item, item_schema),
                    None => l.push(item.clone()),
                }
            }
        }
        (live, applied) => *live = applied.clone(),
    }
}

fn render(path: &FieldPath) -> String {
    path.iter()
        .map(|e| match e {
            PathElem::Field(f) => format!(".{f}"),
            PathElem::Key(k) => format!("[{k}]"),
        })
        .collect()
}

fn apply(shared: &Shared, target: &Target, name: &str, query: &HashMap<String, String>, body: &[u8]) -> Answer {
    let manager = query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            )
        })?;
    let force = query.get("force").is_some_and(|f| f == "true");
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("apply body is not UTF-8"))?;
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?;
    let mut applied: Value =
        serde_json::to_value(yaml).map_err(|e| ApiError::bad_request(format!("invalid apply body: {e}")))?;
    check_identity(target, &mut applied)?;
    if applied["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let mut state = shared.state.lock().expect("state");
    let schema = target.res.crd.then(|| state.route_schema.clone());
    let key = key_of(target, name);
    let sub = if target.status { "status" } else { "" }.to_owned();
    // The part of the object this apply manages.
    let mut scope = Map::new();
    for (k, v) in applied.as_object().cloned().unwrap_or_default() {
        let managed = if target.status {
            k == "status"
        } else {
            match k.as_str() {
                "apiVersion" | "kind" => false,
                "status" => !target.res.status_subresource,
                "metadata" => false,
                _ => true,
            }
        };
        if managed {
            scope.insert(k, v);
        }
    }
    if !target.status {
        for m in ["labels", "annotations", "finalizers"] {
            if let Some(v) = applied["metadata"].get(m) {
                scope.entry("metadata").or_insert_with(|| json!({}))[m] = v.clone();
            }
        }
    }
    let scope = Value::Object(scope);
    let mut new_set = BTreeSet::new();
    field_set(&scope, schema.as_ref(), &mut Vec::new(), &mut new_set);

    let old = match state.objects.get(&key).cloned() {
        Some(o) => o,
        None if target.status => return Err(ApiError::not_found(&target.res, name)),
        None => {
            // Apply creates.
            drop(state);
            let created = create(shared, target, &serde_json::to_vec(&applied).unwrap_or_default())?;
            let mut state = shared.state.lock().expect("state");
            state.owners.entry((key, sub)).or_default().insert(manager, new_set);
            return Ok((StatusCode::CREATED, created.1));
        }
    };
    let owners = state.owners.entry((key.clone(), sub.clone())).or_default().clone();
    if !force {
        let mut conflicts = Vec::new();
        for (other, fields) in owners.iter().filter(|(m, _)| **m != manager) {
            for path in new_set.intersection(fields) {
                if value_at(&old, path, schema.as_ref()) != value_at(&scope, path, schema.as_ref()) {
                    conflicts.push(format!("conflict with \"{other}\": {}", render(path)));
                }
            }
        }
        if !conflicts.is_empty() {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join("; ")
                ),
            ));
        }
    }
    let previously = owners.get(&manager).cloned().unwrap_or_default();
    let mut new = old.clone();
    for path in previously.difference(&new_set) {
        let owned_by_other = owners.iter().any(|(m, f)| *m != manager && f.contains(path));
        if !owned_by_other {
            remove_at(&mut new, path, schema.as_ref());
        }
    }
    merge_apply(&mut new, &scope, schema.as_ref());
    let answer = finish_write(shared, &mut state, target, &key, &old, new, name)?;
    let owners = state.owners.entry((key, sub)).or_default();
    for (m, fields) in owners.iter_mut() {
        if *m != manager {
            fields.retain(|f| !new_set.contains(f));
        }
    }
    owners.insert(manager, new_set);
    Ok(answer)
}

fn delete(shared: &Shared, target: &Target, name: &str) -> Answer {
    let mut state = shared.state.lock().expect("state");
    let key = key_of(target, name);
    let old = state
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&target.res, name))?;
    let finalizers = old["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
    if finalizers {
        if old["metadata"].get("deletionTimestamp").is_some() {
            return Ok((StatusCode::OK, old));
        }
        let mut new = old.clone();
        new["metadata"]["deletionTimestamp"] = Value::String(now_rfc3339(&state));
        new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if target.res.generation {
            new["metadata"]["generation"] = json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        let stored = shared.commit(&mut state, &key, "MODIFIED", new);
        return Ok((StatusCode::OK, stored));
    }
    let stored = shared.commit(&mut state, &key, "DELETED", old);
    Ok((StatusCode::OK, stored))
}

// ---------------------------------------------------------------------------------------------
// Watch

fn watch_response(shared: &Arc<Shared>, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    if let Err(e) = selectors_unsupported(query) {
        return e.response();
    }
    let start: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse() {
            Ok(v) => Some(v),
            Err(_) => return ApiError::bad_request(format!("invalid resourceVersion {rv:?}")).response(),
        },
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    let res = target.res;
    let ns = target.ns.clone();
    tokio::spawn(async move {
        let mut changed = shared.changed.subscribe();
        let mut kill = shared.kill.subscribe();
        let mut marks = shared.bookmarks.subscribe();
        kill.borrow_and_update();
        marks.borrow_and_update();
        let deadline = tokio::time::Instant::now() + timeout;
        let line = |kind: &str, object: &Value| Bytes::from(format!("{}\n", json!({"type": kind, "object": object})));
        // Initial state for "any version" watches: synthetic ADDED events.
        let mut cursor = match start {
            Some(rv) => rv,
            None => {
                let (rv, initial) = {
                    let state = shared.state.lock().expect("state");
                    let items: Vec<Value> = state
                        .objects
                        .iter()
                        .filter(|(k, _)| k.res == res.id() && ns.as_ref().is_none_or(|n| *n == k.ns))
                        .map(|(_, v)| v.clone())
                        .collect();
                    (state.rv, items)
                };
                for object in initial {
                    if tx.send(line("ADDED", &object)).await.is_err() {
                        return;
                    }
                }
                rv
            }
        };
        let bookmark = |rv: u64| {
            line(
                "BOOKMARK",
                &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": {"resourceVersion": rv.to_string()}}),
            )
        };
        let mut want_bookmark = false;
        loop {
            changed.borrow_and_update();
            let batch = {
                let state = shared.state.lock().expect("state");
                if cursor < state.compacted {
                    None
                } else {
                    let from = state.log.partition_point(|e| e.rv <= cursor);
                    let events: Vec<LogEntry> = state.log[from..]
                        .iter()
                        .filter(|e| e.res == res.id() && ns.as_ref().is_none_or(|n| *n == e.ns))
                        .cloned()
                        .collect();
                    Some((events, state.rv))
                }
            };
            let Some((events, upto)) = batch else {
                let status = ApiError::new(410, "Expired", format!("too old resource version: {cursor}")).to_value();
                let _ = tx.send(line("ERROR", &status)).await;
                return;
            };
            for e in events {
                cursor = e.rv;
                if tx.send(line(e.kind, &e.object)).await.is_err() {
                    return;
                }
            }
            if want_bookmark && bookmarks {
                // Every event of this resource up to `upto` has been sent.
                cursor = upto;
                if tx.send(bookmark(upto)).await.is_err() {
                    return;
                }
            }
            want_bookmark = false;
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = kill.changed() => return,
                _ = marks.changed() => want_bookmark = true,
                () = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(bookmark(cursor)).await;
                    }
                    return;
                }
                () = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(ChannelBody { rx }.boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
