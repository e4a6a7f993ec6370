//! The compiled route: what the data plane uses. Built from a [`RouteSpec`] by
//! [`Route::compile`], which is where every rule about a route is checked.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};

use super::duration::DurationSpec;
use super::error::{ConfigError, FieldError, RouteError};
use super::model::{
    BackendSpec, ForwardedForSpec, GripSpec, HeadersSpec, KeepAliveSpec, LimitsSpec, MatchSpec, MetaSpec, RetriesSpec,
    RouteEntry, RouteSpec, SigningKeySpec, TimeoutsSpec,
};
use crate::protocol::sig::SigningKey;

/// Largest accepted `limits.maxMessageBytes` and `limits.maxBatchBytes` (64 MiB).
pub const MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest accepted value of the other byte limits (1 GiB): a sanity bound against typos.
pub const MAX_BUFFER_BYTES: u64 = 1024 * 1024 * 1024;
/// Largest accepted `retries.attempts`.
pub const MAX_RETRY_ATTEMPTS: u32 = 100;
/// Shortest non-zero keep-alive floor, client ping interval and idle timeout.
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(1);

/// A validated route, ready for the data plane. Shared as `Arc<Route>` by the
/// [`RouteTable`](super::RouteTable); immutable once built.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name (logs, metrics, the connection API).
    pub name: String,
    /// Which requests the route serves.
    pub matcher: RouteMatch,
    /// Where requests go.
    pub backend: Backend,
    /// Header replay rules.
    pub headers: HeaderRules,
    /// `Set-Meta-*` names the backend may set (lowercase); `None`: any.
    pub meta_allowed: Option<HashSet<String>>,
    /// Keep-alive and liveness.
    pub keep_alive: KeepAlive,
    /// GRIP settings.
    pub grip: Grip,
    /// Size, rate and connection limits.
    pub limits: Limits,
    /// Backend timeouts.
    pub timeouts: Timeouts,
    /// Backend retries.
    pub retries: Retries,
}

/// The hosts and path prefixes a route serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// Host patterns; empty means any host.
    pub hostnames: Vec<HostMatch>,
    /// Path prefixes, each `/` or starting with `/` without a trailing `/`; never empty.
    pub path_prefixes: Vec<String>,
}

/// One host pattern, lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostMatch {
    /// Exactly this host.
    Exact(String),
    /// Any host ending with this suffix (which starts with `.`) and having at least one more
    /// label: `*.example.com` is `Wildcard(".example.com")` and matches `a.example.com` and
    /// `a.b.example.com`, not `example.com`.
    Wildcard(String),
}

impl HostMatch {
    /// Whether a normalized host (lowercase, no port, no trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(exact) => host == exact,
            HostMatch::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(host) => f.write_str(host),
            HostMatch::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// Where a route's WebSocket-over-HTTP requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port.
    pub authority: Authority,
    /// Prefix put before every request path: `""` or `/base` (no trailing `/`).
    pub base_path: String,
    /// Replacement for the matched path prefix.
    pub path_rewrite: Option<String>,
    /// `Host` header to send instead of the client's.
    pub host_override: Option<HeaderValue>,
    /// Extra CA certificates (PEM) trusted for an `https` backend.
    pub ca_pem: Option<Arc<[u8]>>,
}

impl Backend {
    /// The backend URI for a client request target (`/path?query`) that matched
    /// `matched_prefix`: the prefix is replaced by the path rewrite (if any), then the base path
    /// is put in front; the query is kept.
    ///
    /// With prefix `/ws`, rewrite `/` and base `/base`: `/ws/chat?x=1` →
    /// `http://authority/base/chat?x=1`, and `/ws` → `http://authority/base/`.
    ///
    /// # Errors
    ///
    /// [`RouteError`] when the target is not a path, does not start with the prefix (on a
    /// segment boundary), or the result is not a valid URI.
    pub fn uri_for(&self, matched_prefix: &str, path_and_query: &str) -> Result<Uri, RouteError> {
        if !path_and_query.starts_with('/') {
            return Err(RouteError::NotAPath(path_and_query.to_owned()));
        }
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        let path: Cow<'_, str> = match &self.path_rewrite {
            None => path.into(),
            Some(rewrite) => {
                let rest = strip_path_prefix(path, matched_prefix).ok_or_else(|| RouteError::PrefixMismatch {
                    prefix: matched_prefix.to_owned(),
                    path: path.to_owned(),
                })?;
                if rest.is_empty() {
                    rewrite.as_str().into()
                } else {
                    format!("{}{rest}", rewrite.trim_end_matches('/')).into()
                }
            }
        };
        let full = format!("{}{path}{query}", self.base_path);
        let path_and_query = PathAndQuery::from_str(&full).map_err(|e| RouteError::InvalidUri {
            path_and_query: full.clone(),
            reason: e.to_string(),
        })?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| RouteError::InvalidUri {
                path_and_query: full,
                reason: e.to_string(),
            })
    }
}

/// The part of `path` after `prefix`, if `prefix` matches on a segment boundary: `""` or a
/// string starting with `/`. Prefix `/` (or any prefix ending in `/`) keeps the slash.
fn strip_path_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() || prefix == "/" {
        return path.starts_with('/').then_some(path);
    }
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Whether `prefix` (normalized: `/` or no trailing slash) matches `path` on a segment
/// boundary: `/ws` matches `/ws` and `/ws/x`, not `/wsx`.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    strip_path_prefix(path, prefix).is_some()
}

/// Which client handshake headers are replayed to the backend, and what is added.
///
/// The protocol's fixed exclusions (hop-by-hop, `Meta-*`, ...) are applied by the transport;
/// these are the route's own rules on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRules {
    /// If set, only these headers are replayed.
    pub allow: Option<HashSet<HeaderName>>,
    /// Never replayed.
    pub deny: HashSet<HeaderName>,
    /// Added to every backend request.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Client headers removed from every backend request.
    pub remove: HashSet<HeaderName>,
    /// `X-Forwarded-For` handling.
    pub forwarded_for: ForwardedFor,
}

impl HeaderRules {
    /// Whether the route lets the client header `name` through (allow, deny and remove lists).
    pub fn replays(&self, name: &HeaderName) -> bool {
        !self.deny.contains(name)
            && !self.remove.contains(name)
            && self.allow.as_ref().is_none_or(|allow| allow.contains(name))
    }
}

impl Default for HeaderRules {
    fn default() -> Self {
        Self {
            allow: None,
            deny: HashSet::new(),
            add: Vec::new(),
            remove: HashSet::new(),
            forwarded_for: ForwardedFor::Append,
        }
    }
}

/// What happens to `X-Forwarded-For` on backend requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardedFor {
    /// The client's address is appended to the value the client sent.
    #[default]
    Append,
    /// Only the client's address is sent.
    Replace,
    /// No `X-Forwarded-For` is sent.
    Drop,
}

/// Keep-alive and liveness settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Floor for the backend's `Keep-Alive-Interval`.
    pub min_interval: Duration,
    /// Ping clients idle this long; `None`: never.
    pub client_ping_interval: Option<Duration>,
    /// A client silent this long is dead; `None`: never.
    pub client_idle_timeout: Option<Duration>,
    /// Relay client pings to the backend as `PING` events instead of answering them.
    pub relay_pings: bool,
}

/// GRIP settings.
#[derive(Debug, Clone)]
pub struct Grip {
    /// Offer GRIP to the backend.
    pub enabled: bool,
    /// Signs `Grip-Sig` when set.
    pub signing_key: Option<SigningKey>,
    /// `iss` claim of `Grip-Sig`.
    pub issuer: String,
    /// Subscriptions allowed per connection (at least 1).
    pub max_subscriptions: usize,
}

/// Size, rate and connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest client message (1009 above it).
    pub max_message_bytes: usize,
    /// Content bytes batched into one backend request. Caps batching only: a single larger
    /// message is still sent, alone.
    pub max_batch_bytes: usize,
    /// Largest backend response body.
    pub max_response_bytes: usize,
    /// Largest body passed through on a rejected handshake.
    pub max_reject_body_bytes: usize,
    /// Bytes queued toward one client.
    pub outbound_queue_bytes: usize,
    /// Client messages per second per connection; `None`: unlimited.
    pub messages_per_second: Option<u32>,
    /// Concurrent connections on the route; `None`: unlimited.
    pub max_connections: Option<usize>,
}

/// Backend timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect (TCP and TLS).
    pub connect: Duration,
    /// A whole request, body included.
    pub request: Duration,
    /// Wait for the answering close.
    pub close: Duration,
}

/// Backend retry policy for failures before the request body was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries {
    /// Tries in total (at least 1).
    pub attempts: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Longest delay between tries.
    pub max_backoff: Duration,
}

/// Resolves `signingKey.secretRef` (Kubernetes only). The controller implements it over the
/// Secrets it has read; the routes-file loader has none.
pub trait SecretResolver {
    /// The bytes of `key` in Secret `name` of `namespace`.
    ///
    /// # Errors
    ///
    /// A human-readable reason (Secret or key missing, ...).
    fn resolve(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String>;
}

/// Everything outside the spec that compiling a route may need.
pub struct CompileContext<'a> {
    /// Namespace of the route: default for `backend.service.namespace`, and where
    /// `secretRef`s are looked up.
    pub namespace: &'a str,
    /// Environment lookup for `signingKey.env` (the process environment by default; tests
    /// pass a map so they never mutate the environment).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Secret resolver for `signingKey.secretRef`; `None` outside Kubernetes.
    pub secrets: Option<&'a dyn SecretResolver>,
    /// Directory that relative `signingKey.file` paths are relative to (the routes file's).
    pub base_dir: Option<&'a Path>,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Default for CompileContext<'_> {
    fn default() -> Self {
        Self {
            namespace: "default",
            env: &process_env,
            secrets: None,
            base_dir: None,
        }
    }
}

impl std::fmt::Debug for CompileContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompileContext")
            .field("namespace", &self.namespace)
            .field("secrets", &self.secrets.is_some())
            .field("base_dir", &self.base_dir)
            .finish_non_exhaustive()
    }
}

/// Collects problems, each under the current path.
struct Problems {
    errors: Vec<FieldError>,
}

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }
}

impl Route {
    /// Validates and compiles a spec under `name`. Problems come back all together, with
    /// paths relative to the spec (`backend.url`, `limits.maxMessageBytes`; `name` for the
    /// name), ready to be [prefixed](FieldError::prefixed) by the caller (`routes[1]`,
    /// `spec`).
    ///
    /// # Errors
    ///
    /// Every problem found, at least one.
    pub fn compile(name: &str, spec: &RouteSpec, ctx: &CompileContext<'_>) -> Result<Route, Vec<FieldError>> {
        let mut p = Problems { errors: Vec::new() };
        check_route_name(name, &mut p);
        let matcher = compile_match(&spec.matcher, &mut p);
        let backend = compile_backend(&spec.backend, ctx, &mut p);
        let headers = compile_headers(&spec.headers, &mut p);
        let meta_allowed = compile_meta(&spec.meta, &mut p);
        let keep_alive = compile_keep_alive(&spec.keep_alive, &mut p);
        let grip = compile_grip(&spec.grip, ctx, &mut p);
        let limits = compile_limits(&spec.limits, &mut p);
        let timeouts = compile_timeouts(&spec.timeouts, &mut p);
        let retries = compile_retries(&spec.retries, &mut p);
        match backend {
            Some(backend) if p.errors.is_empty() => Ok(Route {
                name: name.to_owned(),
                matcher,
                backend,
                headers,
                meta_allowed,
                keep_alive,
                grip,
                limits,
                timeouts,
                retries,
            }),
            _ => Err(p.errors),
        }
    }

    /// Compiles a routes-file entry: the name must also be a DNS label.
    ///
    /// # Errors
    ///
    /// Every problem found, paths relative to the entry.
    pub fn compile_entry(entry: &RouteEntry, ctx: &CompileContext<'_>) -> Result<Route, Vec<FieldError>> {
        let mut name_errors = Vec::new();
        if let Err(message) = check_dns_label(&entry.name) {
            name_errors.push(FieldError::new("name", message));
        }
        match Route::compile(&entry.name, &entry.spec, ctx) {
            Ok(route) if name_errors.is_empty() => Ok(route),
            Ok(_) => Err(name_errors),
            Err(errors) => {
                // `compile` may have complained about the name too; keep the stricter message.
                let mut all = name_errors;
                let has_name_error = !all.is_empty();
                all.extend(errors.into_iter().filter(|e| !(has_name_error && e.path == "name")));
                Err(all)
            }
        }
    }

    /// The route behind `--backend URL`: name `default`, any host, every path, all defaults.
    ///
    /// # Errors
    ///
    /// The URL's problems, under `backend.url`.
    pub fn catch_all(backend_url: &str) -> Result<Route, ConfigError> {
        let spec = RouteSpec {
            matcher: MatchSpec::default(),
            backend: BackendSpec {
                url: Some(backend_url.to_owned()),
                ..BackendSpec::default()
            },
            workload_selector: Default::default(),
            headers: HeadersSpec::default(),
            meta: MetaSpec::default(),
            keep_alive: KeepAliveSpec::default(),
            grip: GripSpec::default(),
            limits: LimitsSpec::default(),
            timeouts: TimeoutsSpec::default(),
            retries: RetriesSpec::default(),
        };
        Route::compile("default", &spec, &CompileContext::default()).map_err(ConfigError::new)
    }
}

/// Compiles a routes-file entry with the default context (process environment, no Secrets).
impl TryFrom<&RouteEntry> for Route {
    type Error = ConfigError;

    fn try_from(entry: &RouteEntry) -> Result<Route, ConfigError> {
        Route::compile_entry(entry, &CompileContext::default()).map_err(ConfigError::new)
    }
}

fn check_route_name(name: &str, p: &mut Problems) {
    if name.is_empty() {
        p.push("name", "must not be empty");
    } else if name.len() > 253 {
        p.push("name", "must be at most 253 characters");
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        p.push("name", format!("must be printable ASCII without spaces (got {name:?})"));
    }
}

/// A DNS label (RFC 1123): 1-63 of `a-z`, `0-9`, `-`, starting and ending alphanumeric.
fn check_dns_label(label: &str) -> Result<(), String> {
    let valid = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (got {label:?})"
        ))
    }
}

/// Whether `name` (lowercase) is a DNS name: labels of `a-z0-9-`, 1-63 each, 253 in total.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Parses a configured host pattern.
pub(crate) fn parse_host_pattern(raw: &str) -> Result<HostMatch, String> {
    let lower = raw.to_ascii_lowercase();
    let host = lower.strip_suffix('.').unwrap_or(&lower);
    if host == "*" {
        return Err("\"*\" is not a host name; leave hostnames empty to match any host".to_owned());
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        if is_dns_name(suffix) {
            return Ok(HostMatch::Wildcard(format!(".{suffix}")));
        }
    } else if host.contains('*') {
        return Err(format!(
            "a wildcard must be the whole first label, as in \"*.example.com\" (got {raw:?})"
        ));
    } else if host.contains(':') {
        return Err(format!("must be a host name without a port (got {raw:?})"));
    } else if is_dns_name(host) {
        return Ok(HostMatch::Exact(host.to_owned()));
    }
    Err(format!(
        "must be a DNS name (letters, digits, '-' and '.') or \"*.\" followed by one (got {raw:?})"
    ))
}

/// Normalizes a configured path prefix: must start with `/`; a trailing `/` is dropped
/// (`/ws/` means `/ws`).
pub(crate) fn parse_path_prefix(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(format!("must start with '/' (got {raw:?})"));
    }
    if raw.contains(['?', '#']) {
        return Err(format!("must be a path without '?' or '#' (got {raw:?})"));
    }
    if PathAndQuery::from_str(raw).is_err() {
        return Err(format!("contains characters not allowed in a URL path (got {raw:?})"));
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

fn compile_match(spec: &MatchSpec, p: &mut Problems) -> RouteMatch {
    let mut hostnames = Vec::new();
    for (i, raw) in spec.hostnames.iter().enumerate() {
        match parse_host_pattern(raw) {
            Ok(host) if !hostnames.contains(&host) => hostnames.push(host),
            Ok(_) => {}
            Err(message) => p.push(format!("match.hostnames[{i}]"), message),
        }
    }
    let mut path_prefixes = Vec::new();
    for (i, raw) in spec.path_prefixes.iter().enumerate() {
        match parse_path_prefix(raw) {
            Ok(prefix) if !path_prefixes.contains(&prefix) => path_prefixes.push(prefix),
            Ok(_) => {}
            Err(message) => p.push(format!("match.pathPrefixes[{i}]"), message),
        }
    }
    if spec.path_prefixes.is_empty() {
        path_prefixes.push("/".to_owned());
    }
    RouteMatch {
        hostnames,
        path_prefixes,
    }
}

fn compile_backend(spec: &BackendSpec, ctx: &CompileContext<'_>, p: &mut Problems) -> Option<Backend> {
    let path_rewrite = spec.path_rewrite.as_deref().and_then(|raw| {
        let ok = raw.starts_with('/') && !raw.contains(['?', '#']) && PathAndQuery::from_str(raw).is_ok();
        if ok {
            Some(raw.to_owned())
        } else {
            p.push(
                "backend.pathRewrite",
                format!("must be a path starting with '/' (got {raw:?})"),
            );
            None
        }
    });
    let host_override = spec.host_override.as_deref().and_then(|raw| {
        let valid = !raw.is_empty() && Authority::from_str(raw).is_ok_and(|a| !a.as_str().contains('@'));
        match HeaderValue::from_str(raw) {
            Ok(value) if valid => Some(value),
            _ => {
                p.push(
                    "backend.hostOverride",
                    format!("must be a host name with an optional port (got {raw:?})"),
                );
                None
            }
        }
    });

    let kinds = [spec.url.is_some(), spec.service.is_some(), spec.port.is_some()];
    let set = kinds.iter().filter(|k| **k).count();
    if set != 1 {
        let message = if set == 0 {
            "one of url, service or port is required"
        } else {
            "exactly one of url, service or port may be set"
        };
        p.push("backend", message);
        return None;
    }
    let (scheme, authority, base_path) = if let Some(url) = &spec.url {
        parse_backend_url(url).map_err(|m| p.push("backend.url", m)).ok()?
    } else if let Some(service) = &spec.service {
        let mut ok = true;
        if let Err(m) = check_dns_label(&service.name) {
            p.push("backend.service.name", m);
            ok = false;
        }
        let namespace = service.namespace.as_deref().unwrap_or(ctx.namespace);
        if let Err(m) = check_dns_label(namespace) {
            p.push("backend.service.namespace", m);
            ok = false;
        }
        if service.port == 0 {
            p.push("backend.service.port", "must be between 1 and 65535 (got 0)");
            ok = false;
        }
        if !ok {
            return None;
        }
        let authority = format!("{}.{namespace}.svc:{}", service.name, service.port);
        let authority = Authority::from_str(&authority)
            .map_err(|e| p.push("backend.service", format!("invalid service address {authority:?}: {e}")))
            .ok()?;
        (Scheme::HTTP, authority, String::new())
    } else {
        let port = spec.port.unwrap_or(0);
        if port == 0 {
            p.push("backend.port", "must be between 1 and 65535 (got 0)");
            return None;
        }
        let authority = Authority::from_str(&format!("127.0.0.1:{port}"))
            .map_err(|e| p.push("backend.port", e.to_string()))
            .ok()?;
        (Scheme::HTTP, authority, String::new())
    };
    let ca_pem = spec.ca_file.as_deref().and_then(|file| {
        if scheme != Scheme::HTTPS {
            p.push("backend.caFile", "only applies to https backends");
            return None;
        }
        match read_key_file(file, ctx.base_dir) {
            Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => Some(Arc::from(pem)),
            Ok(_) => {
                p.push("backend.caFile", format!("{file}: no PEM certificate in it"));
                None
            }
            Err(m) => {
                p.push("backend.caFile", m);
                None
            }
        }
    });
    Some(Backend {
        scheme,
        authority,
        base_path,
        path_rewrite,
        host_override,
        ca_pem,
    })
}

/// Parses a backend URL into scheme, authority and base path.
fn parse_backend_url(raw: &str) -> Result<(Scheme, Authority, String), String> {
    if raw.contains('#') {
        return Err(format!("must not have a fragment (got {raw:?})"));
    }
    let uri = Uri::from_str(raw).map_err(|e| format!("not a valid URL ({e}): {raw:?}"))?;
    let Some(scheme) = uri.scheme_str() else {
        return Err(format!(
            "must be an absolute URL such as http://host:port (got {raw:?})"
        ));
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => Scheme::HTTP,
        "https" | "wss" => Scheme::HTTPS,
        _ => return Err(format!("scheme must be http, https, ws or wss (got {scheme:?})")),
    };
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!("must have a host (got {raw:?})"));
    };
    if authority.as_str().contains('@') {
        return Err("must not contain credentials (user:password@)".to_owned());
    }
    if authority.host().is_empty() {
        return Err(format!("must have a host (got {raw:?})"));
    }
    if authority.port_u16() == Some(0) {
        return Err("port must be between 1 and 65535 (got 0)".to_owned());
    }
    if uri.query().is_some() {
        return Err(format!("must not have a query (got {raw:?})"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

/// Headers a route may not add: the gateway sets them itself or they are hop-by-hop.
fn reserved_for_add(name: &HeaderName) -> Option<&'static str> {
    let s = name.as_str();
    match s {
        "host" => Some("use backend.hostOverride instead"),
        "x-forwarded-for" => Some("use headers.forwardedFor instead"),
        "connection"
        | "keep-alive"
        | "upgrade"
        | "transfer-encoding"
        | "te"
        | "trailer"
        | "content-length"
        | "content-type"
        | "accept"
        | "connection-id"
        | "sec-websocket-extensions"
        | "grip-sig"
        | "content-bytes-replayed" => Some("the gateway sets it"),
        _ if s.starts_with("proxy-") => Some("hop-by-hop headers cannot be added"),
        _ if s.starts_with("meta-") => Some("Meta-* headers carry bound metadata only"),
        _ => None,
    }
}

fn parse_header_name(raw: &str, path: &str, p: &mut Problems) -> Option<HeaderName> {
    match HeaderName::from_bytes(raw.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            p.push(path, format!("invalid header name {raw:?}"));
            None
        }
    }
}

fn header_set(list: &[String], path: &str, p: &mut Problems) -> HashSet<HeaderName> {
    list.iter()
        .enumerate()
        .filter_map(|(i, raw)| parse_header_name(raw, &format!("{path}[{i}]"), p))
        .collect()
}

fn compile_headers(spec: &HeadersSpec, p: &mut Problems) -> HeaderRules {
    let allow = header_set(&spec.replay_allow, "headers.replayAllow", p);
    let deny = header_set(&spec.replay_deny, "headers.replayDeny", p);
    let remove = header_set(&spec.remove, "headers.remove", p);
    let mut add = Vec::new();
    for (i, header) in spec.add.iter().enumerate() {
        let path = format!("headers.add[{i}]");
        let name = parse_header_name(&header.name, &format!("{path}.name"), p);
        if let Some(reason) = name.as_ref().and_then(reserved_for_add) {
            p.push(
                format!("{path}.name"),
                format!("{} cannot be added: {reason}", header.name),
            );
            continue;
        }
        let value = match HeaderValue::from_str(&header.value) {
            Ok(value) => Some(value),
            Err(_) => {
                p.push(
                    format!("{path}.value"),
                    "invalid header value (control characters and non-ASCII text are not allowed)",
                );
                None
            }
        };
        if let (Some(name), Some(value)) = (name, value) {
            add.push((name, value));
        }
    }
    let forwarded_for = match spec.forwarded_for {
        ForwardedForSpec::Append => ForwardedFor::Append,
        ForwardedForSpec::Replace => ForwardedFor::Replace,
        ForwardedForSpec::Drop => ForwardedFor::Drop,
    };
    HeaderRules {
        allow: (!spec.replay_allow.is_empty()).then_some(allow),
        deny,
        add,
        remove,
        forwarded_for,
    }
}

fn compile_meta(spec: &MetaSpec, p: &mut Problems) -> Option<HashSet<String>> {
    if spec.allowed.is_empty() {
        return None;
    }
    let mut allowed = HashSet::new();
    for (i, raw) in spec.allowed.iter().enumerate() {
        let lower = raw.to_ascii_lowercase();
        let path = format!("meta.allowed[{i}]");
        if lower.starts_with("set-meta-") || lower.starts_with("meta-") {
            p.push(
                path,
                format!("give the name without the Set-Meta-/Meta- prefix (got {raw:?})"),
            );
        } else if lower.is_empty() || HeaderName::from_bytes(format!("meta-{lower}").as_bytes()).is_err() {
            p.push(path, format!("must be a header-name token (got {raw:?})"));
        } else {
            allowed.insert(lower);
        }
    }
    Some(allowed)
}

fn optional(d: DurationSpec) -> Option<Duration> {
    (!d.is_zero()).then(|| d.get())
}

fn compile_keep_alive(spec: &KeepAliveSpec, p: &mut Problems) -> KeepAlive {
    if spec.min_interval.get() < MIN_KEEPALIVE {
        p.push(
            "keepAlive.minInterval",
            format!(
                "must be at least 1s; Keep-Alive-Interval is in whole seconds (got {})",
                spec.min_interval
            ),
        );
    }
    let ping = optional(spec.client_ping_interval);
    let idle = optional(spec.client_idle_timeout);
    if ping.is_some_and(|d| d < MIN_KEEPALIVE) {
        p.push(
            "keepAlive.clientPingInterval",
            format!("must be 0s (off) or at least 1s (got {})", spec.client_ping_interval),
        );
    }
    if idle.is_some_and(|d| d < MIN_KEEPALIVE) {
        p.push(
            "keepAlive.clientIdleTimeout",
            format!("must be 0s (off) or at least 1s (got {})", spec.client_idle_timeout),
        );
    }
    if let (Some(ping), Some(idle)) = (ping, idle)
        && idle <= ping
    {
        p.push(
            "keepAlive.clientIdleTimeout",
            format!(
                "must be longer than clientPingInterval ({}), or idle but healthy clients are cut off (got {})",
                spec.client_ping_interval, spec.client_idle_timeout
            ),
        );
    }
    KeepAlive {
        min_interval: spec.min_interval.get(),
        client_ping_interval: ping,
        client_idle_timeout: idle,
        relay_pings: spec.relay_pings,
    }
}

fn compile_grip(spec: &GripSpec, ctx: &CompileContext<'_>, p: &mut Problems) -> Grip {
    if spec.issuer.is_empty() {
        p.push("grip.issuer", "must not be empty");
    }
    if spec.max_subscriptions == 0 {
        p.push("grip.maxSubscriptions", "must be at least 1 (got 0)");
    }
    let signing_key = spec
        .signing_key
        .as_ref()
        .and_then(|key| resolve_signing_key(key, ctx, p));
    Grip {
        enabled: spec.enabled,
        signing_key,
        issuer: spec.issuer.clone(),
        max_subscriptions: usize::try_from(spec.max_subscriptions).unwrap_or(usize::MAX),
    }
}

fn resolve_signing_key(spec: &SigningKeySpec, ctx: &CompileContext<'_>, p: &mut Problems) -> Option<SigningKey> {
    const PATH: &str = "grip.signingKey";
    let set = [
        spec.value.is_some(),
        spec.env.is_some(),
        spec.file.is_some(),
        spec.secret_ref.is_some(),
    ]
    .into_iter()
    .filter(|s| *s)
    .count();
    if set != 1 {
        p.push(PATH, "exactly one of value, env, file or secretRef must be set");
        return None;
    }
    // Text sources (value, env) follow the GRIP convention: `base64:` + base64 means bytes.
    let from_text = |text: String| {
        SigningKey::from_config_value(&text).map_err(|_| "the text after \"base64:\" is not valid base64".to_owned())
    };
    let (field, key) = if let Some(value) = &spec.value {
        ("value", from_text(value.clone()))
    } else if let Some(var) = &spec.env {
        let key = if var.is_empty() {
            Err("must name an environment variable".to_owned())
        } else {
            (ctx.env)(var)
                .ok_or_else(|| format!("environment variable {var} is not set"))
                .and_then(from_text)
        };
        ("env", key)
    } else if let Some(file) = &spec.file {
        ("file", read_key_file(file, ctx.base_dir).map(SigningKey::new))
    } else if let Some(secret) = &spec.secret_ref {
        let key = match ctx.secrets {
            None => Err("secretRef is only available in Kubernetes".to_owned()),
            Some(resolver) => resolver
                .resolve(ctx.namespace, &secret.name, &secret.key)
                .map(SigningKey::new)
                .map_err(|e| format!("Secret {}/{} key {}: {e}", ctx.namespace, secret.name, secret.key)),
        };
        ("secretRef", key)
    } else {
        // `set == 1` above: one branch was taken.
        return None;
    };
    match key {
        Ok(key) if key.is_empty() => {
            p.push(format!("{PATH}.{field}"), "the key is empty");
            None
        }
        Ok(key) => Some(key),
        Err(message) => {
            p.push(format!("{PATH}.{field}"), message);
            None
        }
    }
}

fn read_key_file(file: &str, base_dir: Option<&Path>) -> Result<Vec<u8>, String> {
    if file.is_empty() {
        return Err("must name a file".to_owned());
    }
    let path = match base_dir {
        Some(dir) if Path::new(file).is_relative() => dir.join(file),
        _ => PathBuf::from(file),
    };
    let mut bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

fn byte_limit(value: u64, min: u64, max: u64, path: &str, p: &mut Problems) -> usize {
    if value < min || value > max {
        p.push(path, format!("must be between {min} and {max} (got {value})"));
    }
    // Saturates on 32-bit targets; the range check above has already reported such values.
    usize::try_from(value).unwrap_or(usize::MAX)
}

fn compile_limits(spec: &LimitsSpec, p: &mut Problems) -> Limits {
    Limits {
        max_message_bytes: byte_limit(
            spec.max_message_bytes,
            1,
            MAX_MESSAGE_BYTES,
            "limits.maxMessageBytes",
            p,
        ),
        max_batch_bytes: byte_limit(spec.max_batch_bytes, 1, MAX_MESSAGE_BYTES, "limits.maxBatchBytes", p),
        max_response_bytes: byte_limit(
            spec.max_response_bytes,
            1,
            MAX_BUFFER_BYTES,
            "limits.maxResponseBytes",
            p,
        ),
        max_reject_body_bytes: byte_limit(
            spec.max_reject_body_bytes,
            0,
            MAX_BUFFER_BYTES,
            "limits.maxRejectBodyBytes",
            p,
        ),
        outbound_queue_bytes: byte_limit(
            spec.outbound_queue_bytes,
            1,
            MAX_BUFFER_BYTES,
            "limits.outboundQueueBytes",
            p,
        ),
        messages_per_second: (spec.messages_per_second != 0).then_some(spec.messages_per_second),
        max_connections: (spec.max_connections != 0)
            .then(|| usize::try_from(spec.max_connections).unwrap_or(usize::MAX)),
    }
}

fn compile_timeouts(spec: &TimeoutsSpec, p: &mut Problems) -> Timeouts {
    if spec.connect.is_zero() {
        p.push("timeouts.connect", "must be greater than 0s");
    }
    if spec.request.is_zero() {
        p.push("timeouts.request", "must be greater than 0s");
    }
    if spec.close.is_zero() {
        p.push("timeouts.close", "must be greater than 0s");
    }
    Timeouts {
        connect: spec.connect.get(),
        request: spec.request.get(),
        close: spec.close.get(),
    }
}

fn compile_retries(spec: &RetriesSpec, p: &mut Problems) -> Retries {
    if spec.attempts == 0 || spec.attempts > MAX_RETRY_ATTEMPTS {
        p.push(
            "retries.attempts",
            format!(
                "must be between 1 and {MAX_RETRY_ATTEMPTS} (tries in total, got {})",
                spec.attempts
            ),
        );
    }
    if spec.initial_backoff.is_zero() {
        p.push("retries.initialBackoff", "must be greater than 0s");
    }
    if spec.initial_backoff > spec.max_backoff {
        p.push(
            "retries.maxBackoff",
            format!(
                "must not be shorter than initialBackoff ({}; got {})",
                spec.initial_backoff, spec.max_backoff
            ),
        );
    }
    Retries {
        attempts: spec.attempts,
        initial_backoff: spec.initial_backoff.get(),
        max_backoff: spec.max_backoff.get(),
    }
}
