//! The control API: the snapshot wire format, and the gateway-side client that long-polls the
//! controller and swaps the route table.
//!
//! ```text
//! gateway ──GET /v1/snapshot?namespace=NS&pod=POD&version=V──▶ controller
//!         Authorization: Bearer <projected ServiceAccount token, audience wsgate-control>
//!         ◀── 200 {version, routes}   a snapshot whose version differs from V (at once)
//!         ◀── 304                     nothing changed within the poll window (~30 s)
//! ```
//!
//! The controller compiles, per gateway pod, the `WebSocketRoute`s that apply to it into a
//! [`Snapshot`]: each route's [`RouteSpec`] (the same model a routes file holds), its name and
//! namespace, and the key material of only the Secrets that route uses. The gateway compiles the
//! snapshot with [`Route::compile`] (the same validation as every other source), builds a
//! [`RouteTable`] whose version is the snapshot's, and stores it into the gateway's `ArcSwap`:
//! new connections see the new routes at once, open connections keep the `Arc<Route>` they
//! started with.
//!
//! When the controller is away the gateway keeps its last good table and retries with capped,
//! jittered exponential backoff; [`ControlStatus`] reports the state for `/readyz` and metrics.
//!
//! Route names in the table are `namespace/name`, so routes of different namespaces never
//! collide.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::error::FieldError;
use super::model::RouteSpec;
use super::route::{CompileContext, Route, SecretResolver};
use super::table::RouteTable;

/// Path of the snapshot endpoint.
pub const SNAPSHOT_PATH: &str = "/v1/snapshot";
/// The audience gateway tokens must be issued for.
pub const TOKEN_AUDIENCE: &str = "wsgate-control";
/// Default path of the projected ServiceAccount token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/wsgate/token";
/// Environment variable with the gateway pod's namespace (downward API).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Environment variable with the gateway pod's name (downward API).
pub const ENV_POD_NAME: &str = "POD_NAME";
/// Largest snapshot body the gateway accepts.
pub const MAX_SNAPSHOT_BYTES: usize = 32 * 1024 * 1024;

/// The routes one gateway serves, at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Content version: equal versions mean equal routes (see [`Snapshot::content_version`]).
    pub version: u64,
    /// The routes, sorted by namespace and name.
    pub routes: Vec<SnapshotRoute>,
}

/// One route of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRoute {
    /// Namespace of the `WebSocketRoute`.
    pub namespace: String,
    /// Name of the `WebSocketRoute`.
    pub name: String,
    /// Its spec.
    pub spec: RouteSpec,
    /// The backend base URL the controller resolved (informational).
    pub backend_url: String,
    /// Key material of the Secret keys this route references (and only those).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretMaterial>,
}

impl SnapshotRoute {
    /// The route's name in the gateway's table: `namespace/name`.
    pub fn route_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The value of one key of a Secret in the route's namespace.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretMaterial {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
    /// The value, standard base64.
    pub value: String,
}

impl SecretMaterial {
    /// Material for raw bytes.
    pub fn new(name: impl Into<String>, key: impl Into<String>, value: &[u8]) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
            value: base64::engine::general_purpose::STANDARD.encode(value),
        }
    }
}

impl std::fmt::Debug for SecretMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretMaterial")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl Snapshot {
    /// A snapshot of `routes`, versioned by content.
    pub fn new(mut routes: Vec<SnapshotRoute>) -> Self {
        routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let version = Self::content_version(&routes);
        Self { version, routes }
    }

    /// The first 8 bytes of the SHA-256 of the routes' JSON: equal for equal content, so a
    /// gateway that moves to another controller replica doesn't refetch what it has. Never 0.
    pub fn content_version(routes: &[SnapshotRoute]) -> u64 {
        let json = serde_json::to_vec(routes).unwrap_or_default();
        let digest = Sha256::digest(&json);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first).max(1)
    }

    /// Compiles the routes into a table of this snapshot's version. A route that does not
    /// compile is left out and reported (the controller validated it, so this means the two
    /// disagree, e.g. different versions); a table that cannot be built at all is an error.
    ///
    /// # Errors
    ///
    /// [`ControlError::Table`] when the routes overlap or names repeat.
    pub fn compile(&self) -> Result<(RouteTable, Vec<FieldError>), ControlError> {
        let mut routes = Vec::with_capacity(self.routes.len());
        let mut skipped = Vec::new();
        for route in &self.routes {
            let resolver = SnapshotSecrets { route };
            let ctx = CompileContext {
                namespace: &route.namespace,
                env: &|_| None,
                secrets: Some(&resolver),
                base_dir: None,
            };
            let name = route.route_name();
            match Route::compile(&name, &route.spec, &ctx) {
                Ok(compiled) => routes.push(compiled),
                Err(errors) => skipped.extend(errors.into_iter().map(|e| e.prefixed(&name))),
            }
        }
        let table = RouteTable::new(routes, self.version).map_err(|e| ControlError::Table(e.to_string()))?;
        Ok((table, skipped))
    }
}

/// Reads `secretRef`s from the key material the snapshot carries for one route.
struct SnapshotSecrets<'a> {
    route: &'a SnapshotRoute,
}

impl SecretResolver for SnapshotSecrets<'_> {
    fn resolve(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String> {
        if namespace != self.route.namespace {
            return Err(format!("Secret namespace {namespace} is not the route's"));
        }
        let material = self
            .route
            .secrets
            .iter()
            .find(|m| m.name == name && m.key == key)
            .ok_or_else(|| "not delivered by the controller".to_owned())?;
        base64::engine::general_purpose::STANDARD
            .decode(&material.value)
            .map_err(|_| "the controller sent invalid base64".to_owned())
    }
}

/// What went wrong talking to the controller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The control URL is unusable.
    #[error("invalid control URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The gateway's identity is missing from the environment.
    #[error("{0} is not set (expose it with the downward API)")]
    MissingEnv(&'static str),
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The request failed (connect, timeout, body).
    #[error("control API request failed: {0}")]
    Request(String),
    /// The controller answered with an error status.
    #[error("control API answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The body is not a snapshot.
    #[error("invalid snapshot: {0}")]
    Decode(String),
    /// The snapshot's routes cannot form a table.
    #[error("snapshot rejected: {0}")]
    Table(String),
}

/// Where and as whom the gateway fetches its snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlClientConfig {
    /// Base URL of the controller's control API (`http://wsgate-controller.wsgate-system:8081`).
    pub url: String,
    /// The gateway pod's namespace.
    pub namespace: String,
    /// The gateway pod's name.
    pub pod: String,
    /// File with the bearer token (re-read on every request: projected tokens rotate);
    /// `None` sends no token (for a controller started with `--insecure-skip-auth`).
    pub token_file: Option<PathBuf>,
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Limit of one request, long poll included (must exceed the controller's poll window).
    pub request_timeout: Duration,
}

impl ControlClientConfig {
    /// A configuration with default timings.
    pub fn new(url: impl Into<String>, namespace: impl Into<String>, pod: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: namespace.into(),
            pod: pod.into(),
            token_file: Some(PathBuf::from(DEFAULT_TOKEN_FILE)),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(45),
        }
    }

    /// The URL of one snapshot request.
    fn request_uri(&self, version: Option<u64>) -> Result<http::Uri, ControlError> {
        let base = self.url.trim_end_matches('/');
        let mut uri = format!(
            "{base}{SNAPSHOT_PATH}?namespace={}&pod={}",
            query_escape(&self.namespace),
            query_escape(&self.pod)
        );
        if let Some(version) = version {
            uri.push_str(&format!("&version={version}"));
        }
        let parsed: http::Uri = uri.parse().map_err(|e: http::uri::InvalidUri| ControlError::Url {
            url: self.url.clone(),
            reason: e.to_string(),
        })?;
        if parsed.scheme_str() != Some("http") || parsed.authority().is_none() {
            return Err(ControlError::Url {
                url: self.url.clone(),
                reason: "must be http://host:port".to_owned(),
            });
        }
        Ok(parsed)
    }

    /// Checks the URL and identity (for startup: exit 64 on error).
    ///
    /// # Errors
    ///
    /// The URL is not `http://host[:port]`, or namespace/pod are empty.
    pub fn validate(&self) -> Result<(), ControlError> {
        if self.namespace.is_empty() {
            return Err(ControlError::MissingEnv(ENV_POD_NAMESPACE));
        }
        if self.pod.is_empty() {
            return Err(ControlError::MissingEnv(ENV_POD_NAME));
        }
        self.request_uri(None).map(|_| ())
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `wsgate gateway` flags of the control-API client.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlClientArgs {
    /// Fetch routes from the wsgate controller's control API at this URL
    /// (`http://wsgate-controller.wsgate-system:8081`) instead of flags or a routes file.
    #[arg(long = "control-url", env = "WSGATE_CONTROL_URL")]
    pub control_url: Option<String>,
    /// Projected ServiceAccount token (audience `wsgate-control`) sent to the controller.
    #[arg(long = "control-token-file", env = "WSGATE_CONTROL_TOKEN_FILE", default_value = DEFAULT_TOKEN_FILE)]
    pub control_token_file: PathBuf,
    /// Send no token (only for a controller started with `--insecure-skip-auth`).
    #[arg(long = "control-no-token")]
    pub control_no_token: bool,
}

impl ControlClientArgs {
    /// The client configuration, with the pod identity from `POD_NAMESPACE` and `POD_NAME`;
    /// `None` when `--control-url` is not given.
    ///
    /// # Errors
    ///
    /// A missing identity variable or an unusable URL.
    pub fn to_config(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<ControlClientConfig>, ControlError> {
        let Some(url) = &self.control_url else {
            return Ok(None);
        };
        let namespace = env(ENV_POD_NAMESPACE).ok_or(ControlError::MissingEnv(ENV_POD_NAMESPACE))?;
        let pod = env(ENV_POD_NAME).ok_or(ControlError::MissingEnv(ENV_POD_NAME))?;
        let mut config = ControlClientConfig::new(url.clone(), namespace, pod);
        config.token_file = (!self.control_no_token).then(|| self.control_token_file.clone());
        config.validate()?;
        Ok(Some(config))
    }
}

/// What the control-API client reports: for `/readyz` and metrics.
#[derive(Debug)]
pub struct ControlStatus {
    connected: AtomicBool,
    up: AtomicBool,
    synced: AtomicBool,
    version: AtomicU64,
    updates: AtomicU64,
    failures: AtomicU64,
    /// Unix time in milliseconds of the last good answer (0: none yet).
    last_success_ms: AtomicU64,
    trouble: Mutex<Trouble>,
    changed: tokio::sync::watch::Sender<u64>,
}

/// What is wrong, if anything.
#[derive(Debug, Default)]
struct Trouble {
    /// Why the last exchange failed, while failing.
    last_error: Option<String>,
    /// When the current run of failures started.
    failing_since: Option<SystemTime>,
    /// The routes of the snapshot in use that were left out, if any.
    left_out: Option<String>,
}

impl Default for ControlStatus {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            up: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            version: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
            trouble: Mutex::new(Trouble::default()),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl ControlStatus {
    /// A status before the first contact.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the last request reached the controller and was answered (with anything,
    /// an error status included).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Whether the last exchange with the controller went well: a snapshot that was applied,
    /// or "unchanged". `false` before the first answer, while the controller is unreachable,
    /// answers with an error, or sends a snapshot that is rejected.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether a snapshot has been applied since start (the gateway has its routes; it stays
    /// so while the controller is away).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Version of the table in use, if a snapshot was applied.
    pub fn version(&self) -> Option<u64> {
        self.is_synced().then(|| self.version.load(Ordering::SeqCst))
    }

    /// Snapshots applied. This is also the generation of the table in use: 1 for the first
    /// snapshot, plus one per later one (0 before the first).
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::SeqCst)
    }

    /// Failed requests or rejected snapshots.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// The last problem: why the last exchange failed, or else the routes left out of the
    /// snapshot in use ([`ControlStatus::routes_left_out`]); `None` when all is well.
    pub fn last_error(&self) -> Option<String> {
        let trouble = self.trouble();
        trouble.last_error.clone().or_else(|| trouble.left_out.clone())
    }

    /// The routes of the snapshot in use that did not compile and were left out
    /// (`routes left out: ns/name.field: problem; ...`), if any.
    pub fn routes_left_out(&self) -> Option<String> {
        self.trouble().left_out.clone()
    }

    /// When the current run of failed exchanges started, while there is one.
    pub fn failing_since(&self) -> Option<SystemTime> {
        self.trouble().failing_since
    }

    /// The time of the last good answer of the controller (a snapshot applied, or
    /// "unchanged"), if there was one.
    pub fn last_success(&self) -> Option<SystemTime> {
        match self.last_success_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// A receiver that changes whenever the status does (value: a change counter).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn trouble(&self) -> std::sync::MutexGuard<'_, Trouble> {
        // A poisoned lock only means a panic while writing two plain fields.
        self.trouble.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a failed exchange; `connected` when the controller did answer (an error
    /// status, or a snapshot that was rejected).
    pub(crate) fn record_error(&self, error: &ControlError, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.up.store(false, Ordering::SeqCst);
        self.failures.fetch_add(1, Ordering::SeqCst);
        {
            let mut trouble = self.trouble();
            trouble.last_error = Some(error.to_string());
            trouble.failing_since.get_or_insert_with(SystemTime::now);
        }
        self.bump();
    }

    /// Records a good answer: `applied` is the version of a snapshot just applied (`None`
    /// for "unchanged"), `skipped` the routes of it that were left out.
    pub(crate) fn record_ok(&self, applied: Option<u64>, skipped: &[FieldError]) {
        self.connected.store(true, Ordering::SeqCst);
        if let Some(version) = applied {
            self.version.store(version, Ordering::SeqCst);
            self.synced.store(true, Ordering::SeqCst);
            self.updates.fetch_add(1, Ordering::SeqCst);
        }
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        self.last_success_ms.store(ms, Ordering::SeqCst);
        {
            let mut trouble = self.trouble();
            trouble.last_error = None;
            trouble.failing_since = None;
            // An "unchanged" answer keeps the list of the snapshot in use.
            if applied.is_some() {
                trouble.left_out = (!skipped.is_empty()).then(|| {
                    let list: Vec<String> = skipped.iter().map(ToString::to_string).collect();
                    format!("routes left out: {}", list.join("; "))
                });
            }
        }
        self.up.store(true, Ordering::SeqCst);
        self.bump();
    }
}

/// One answer of the controller.
enum Poll {
    Changed(Snapshot),
    Unchanged,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn poll_once(
    client: &HttpClient,
    config: &ControlClientConfig,
    version: Option<u64>,
) -> Result<Poll, ControlError> {
    let uri = config.request_uri(version)?;
    let mut request = Request::get(uri);
    if let Some(path) = &config.token_file {
        let token = tokio::fs::read_to_string(path).await.map_err(|e| ControlError::Token {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()));
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| ControlError::Request(e.to_string()))?;
    let response = tokio::time::timeout(config.request_timeout, async {
        let response = client
            .request(request)
            .await
            .map_err(|e| ControlError::Request(error_chain(&e)))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_SNAPSHOT_BYTES)
            .collect()
            .await
            .map_err(|e| ControlError::Request(format!("reading the body: {e}")))?
            .to_bytes();
        Ok::<_, ControlError>((parts.status, body))
    })
    .await
    .map_err(|_| ControlError::Request(format!("no answer within {:?}", config.request_timeout)))??;
    match response {
        (StatusCode::OK, body) => serde_json::from_slice(&body)
            .map(Poll::Changed)
            .map_err(|e| ControlError::Decode(e.to_string())),
        (StatusCode::NOT_MODIFIED, _) => Ok(Poll::Unchanged),
        (status, body) => Err(ControlError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_owned(),
        }),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The delay before retry `attempt` (0-based): exponential from `initial`, capped at `max`,
/// with "equal jitter" (half fixed, half random) so gateways don't retry in lockstep.
fn backoff_delay(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.min(16)).min(max);
    let half = exp / 2;
    let jitter = rand::random_range(0.0..=1.0f64);
    half + half.mul_f64(jitter)
}

/// Long-polls the controller until `cancel` fires, swapping each new snapshot's table into
/// `table`. Never returns early: errors are recorded in `status` and retried.
///
/// Cancel safety: dropping or cancelling mid-request loses nothing; the table in use stays.
pub async fn run_control_client(
    config: ControlClientConfig,
    table: Arc<ArcSwap<RouteTable>>,
    status: Arc<ControlStatus>,
    cancel: CancellationToken,
) {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build_http();
    let mut version: Option<u64> = None;
    let mut attempt: u32 = 0;
    tracing::info!(url = %config.url, namespace = %config.namespace, pod = %config.pod, "control API client started");
    loop {
        let result = tokio::select! {
            r = poll_once(&client, &config, version) => r,
            () = cancel.cancelled() => return,
        };
        match result {
            Ok(Poll::Unchanged) => {
                attempt = 0;
                status.record_ok(None, &[]);
            }
            Ok(Poll::Changed(snapshot)) => {
                attempt = 0;
                let routes = snapshot.routes.len();
                match snapshot.compile() {
                    Ok((new_table, skipped)) => {
                        for problem in &skipped {
                            tracing::warn!(%problem, "route from the controller left out");
                        }
                        table.store(Arc::new(new_table));
                        version = Some(snapshot.version);
                        status.record_ok(Some(snapshot.version), &skipped);
                        tracing::info!(
                            version = snapshot.version,
                            routes,
                            "route table updated from the controller"
                        );
                    }
                    Err(error) => {
                        // Keep serving the last good table; wait for the next version rather
                        // than refetching the same bad one in a loop.
                        version = Some(snapshot.version);
                        tracing::warn!(%error, version = snapshot.version, "snapshot rejected; keeping the current routes");
                        status.record_error(&error, true);
                    }
                }
            }
            Err(error) => {
                let connected = matches!(error, ControlError::Status { .. });
                status.record_error(&error, connected);
                let delay = backoff_delay(config.initial_backoff, config.max_backoff, attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "control API unavailable; keeping the current routes");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ns: &str, name: &str, yaml: &str) -> SnapshotRoute {
        SnapshotRoute {
            namespace: ns.into(),
            name: name.into(),
            spec: serde_yaml::from_str(yaml).expect("spec"),
            backend_url: String::new(),
            secrets: Vec::new(),
        }
    }

    #[test]
    fn versions_follow_content_not_order() {
        let a = route("ns", "a", "backend: {port: 1}\nmatch: {pathPrefixes: [/a]}");
        let b = route("ns", "b", "backend: {port: 2}\nmatch: {pathPrefixes: [/b]}");
        let s1 = Snapshot::new(vec![a.clone(), b.clone()]);
        let s2 = Snapshot::new(vec![b.clone(), a.clone()]);
        assert_eq!(s1, s2);
        let mut b2 = b;
        b2.spec.backend.port = Some(3);
        assert_ne!(Snapshot::new(vec![a, b2]).version, s1.version);
        assert_ne!(Snapshot::new(vec![]).version, 0);
    }

    #[test]
    fn compile_names_routes_by_namespace_and_resolves_delivered_secrets() {
        let mut r = route(
            "ns",
            "chat",
            "backend: {port: 8080}\ngrip: {signingKey: {secretRef: {name: grip, key: key}}}",
        );
        r.secrets.push(SecretMaterial::new("grip", "key", b"s3cret"));
        let other = route(
            "other",
            "chat",
            "backend: {port: 1}\nmatch: {hostnames: [x.example.com]}",
        );
        let missing = route(
            "ns",
            "broken",
            "backend: {port: 9}\nmatch: {pathPrefixes: [/b]}\ngrip: {signingKey: {secretRef: {name: x, key: y}}}",
        );
        let snapshot = Snapshot::new(vec![r, other, missing]);
        let (table, skipped) = snapshot.compile().expect("table");
        assert_eq!(table.version(), snapshot.version);
        let names: Vec<&str> = table.routes().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ns/chat", "other/chat"]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            skipped[0].to_string(),
            "ns/broken.grip.signingKey.secretRef: Secret ns/x key y: not delivered by the controller"
        );
        let chat = table.get("ns/chat").expect("route");
        assert!(chat.grip.signing_key.is_some());
    }

    #[test]
    fn overlapping_routes_reject_the_whole_snapshot() {
        let a = route("a", "r", "backend: {port: 1}");
        let b = route("b", "r", "backend: {port: 2}");
        let err = Snapshot::new(vec![a, b]).compile().unwrap_err();
        assert!(
            matches!(err, ControlError::Table(ref m) if m.contains("already matched")),
            "{err}"
        );
    }

    #[test]
    fn debug_redacts_key_material() {
        let m = SecretMaterial::new("grip", "key", b"s3cret");
        let text = format!("{m:?}");
        assert!(!text.contains(&m.value) && text.contains("redacted"), "{text}");
    }

    #[test]
    fn request_uris_escape_identity_and_require_http() {
        let mut c = ControlClientConfig::new("http://ctl:8081/", "ns", "pod-1");
        assert_eq!(
            c.request_uri(Some(7)).expect("uri").to_string(),
            "http://ctl:8081/v1/snapshot?namespace=ns&pod=pod-1&version=7"
        );
        c.pod = "a b&c".into();
        assert!(c.request_uri(None).expect("uri").to_string().ends_with("pod=a%20b%26c"));
        c.url = "https://ctl".into();
        assert!(matches!(c.validate(), Err(ControlError::Url { .. })));
        c.url = "http://ctl".into();
        c.namespace.clear();
        assert_eq!(c.validate(), Err(ControlError::MissingEnv(ENV_POD_NAMESPACE)));
    }

    #[test]
    fn args_read_identity_from_the_given_environment() {
        let args = ControlClientArgs {
            control_url: Some("http://ctl:8081".into()),
            control_token_file: PathBuf::from("/t"),
            control_no_token: false,
        };
        let env = |name: &str| match name {
            ENV_POD_NAMESPACE => Some("ns".to_owned()),
            ENV_POD_NAME => Some("gw-1".to_owned()),
            _ => None,
        };
        let config = args.to_config(&env).expect("ok").expect("some");
        assert_eq!((config.namespace.as_str(), config.pod.as_str()), ("ns", "gw-1"));
        assert_eq!(config.token_file, Some(PathBuf::from("/t")));
        assert_eq!(
            args.to_config(&|_| None),
            Err(ControlError::MissingEnv(ENV_POD_NAMESPACE))
        );
        let none = ControlClientArgs {
            control_url: None,
            ..args
        };
        assert_eq!(none.to_config(&env), Ok(None));
    }

    #[test]
    fn status_tracks_health_failure_runs_and_left_out_routes() {
        let s = ControlStatus::new();
        assert!(!s.is_up() && !s.is_connected() && s.last_success().is_none());
        let refused = ControlError::Request("connection refused".into());
        s.record_error(&refused, false);
        let since = s.failing_since().expect("failing");
        s.record_error(
            &ControlError::Status {
                status: 500,
                body: "oops".into(),
            },
            true,
        );
        assert_eq!(s.failing_since(), Some(since), "one run of failures");
        assert!(s.is_connected() && !s.is_up());
        assert_eq!(s.failures(), 2);
        assert_eq!(s.last_error().as_deref(), Some("control API answered 500: oops"));

        let skipped = [FieldError::new("ns/a.backend", "bad")];
        s.record_ok(Some(9), &skipped);
        assert!(s.is_up() && s.failing_since().is_none() && s.last_success().is_some());
        assert_eq!(
            s.routes_left_out().as_deref(),
            Some("routes left out: ns/a.backend: bad")
        );
        assert_eq!(s.last_error(), s.routes_left_out());
        assert_eq!((s.version(), s.updates()), (Some(9), 1));

        // A failure shows its own error; "unchanged" afterwards brings back the left-out list
        // of the snapshot still in use.
        s.record_error(&refused, false);
        assert_eq!(
            s.last_error().as_deref(),
            Some("control API request failed: connection refused")
        );
        s.record_ok(None, &[]);
        assert_eq!(s.last_error().as_deref(), Some("routes left out: ns/a.backend: bad"));
        s.record_ok(Some(10), &[]);
        assert_eq!((s.last_error(), s.updates()), (None, 2));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..40 {
            let d = backoff_delay(initial, max, attempt);
            let exp = initial.saturating_mul(1 << attempt.min(16)).min(max);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?} vs {exp:?}");
        }
    }
}
