//! The backend side: a pooled HTTP/1.1 client (plain or rustls), request building with the
//! header replay rules of PROTOCOL.md section 2, timeouts and response reading within limits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{ForwardedFor, Route};
use crate::protocol::sig;
use crate::session::{BackendError, BackendRequest, BackendResponse};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Media type of WebSocket-over-HTTP bodies.
pub const EVENTS_MEDIA_TYPE: &str = "application/websocket-events";

/// A body type the backend client accepts: a full buffer for events, or a streamed body for
/// plain HTTP pass-through.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// What distinguishes backend clients: connect timeout and extra CA certificates.
type ClientKey = (Duration, Option<Arc<[u8]>>);

/// Pooled backend clients, one per connect timeout and CA bundle (routes may differ).
#[derive(Clone)]
pub struct BackendPool {
    clients: Arc<Mutex<HashMap<ClientKey, Client<Connector, ProxyBody>>>>,
    /// Idle connections of the in-task HTTP/1.1 client (`http://` backends).
    pub h1: Arc<super::h1::H1Pool>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool").finish_non_exhaustive()
    }
}

impl BackendPool {
    /// A pool keeping idle backend connections for `idle_timeout`, at most
    /// `max_idle_per_host` per backend (and, for `http://` backends, per data-plane worker of
    /// `workers`); response heads of `http://` backends must fit `head`.
    pub fn new(idle_timeout: Duration, max_idle_per_host: usize, head: super::h1::HeadLimits, workers: usize) -> Self {
        Self {
            clients: Arc::new(Mutex::new(HashMap::new())),
            h1: super::h1::H1Pool::new(idle_timeout, max_idle_per_host, head, workers),
            idle_timeout,
            max_idle_per_host,
        }
    }

    /// The client for a route's backend settings (connect timeout, extra CAs), created once
    /// and then shared by every connection with the same settings.
    pub fn client_for(&self, route: &Route) -> Client<Connector, ProxyBody> {
        self.client(route.timeouts.connect, route.backend.ca_pem.clone())
    }

    /// The client for a connect timeout and optional extra CA certificates (PEM).
    pub fn client(&self, connect_timeout: Duration, ca_pem: Option<Arc<[u8]>>) -> Client<Connector, ProxyBody> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((connect_timeout, ca_pem.clone()))
            .or_insert_with(|| {
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(connect_timeout));
                http.set_nodelay(true);
                http.enforce_http(false);
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls_config(ca_pem.as_deref()))
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(self.idle_timeout)
                    .pool_max_idle_per_host(self.max_idle_per_host)
                    .build(connector)
            })
            .clone()
    }
}

/// TLS settings for backends: the public web roots plus the route's extra CAs.
fn tls_config(ca_pem: Option<&[u8]>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = ca_pem {
        let mut reader = std::io::BufReader::new(pem);
        for cert in rustls_pemfile::certs(&mut reader).flatten() {
            if let Err(e) = roots.add(cert) {
                tracing::warn!(cause = %e, "ignoring an unusable CA certificate");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        // ring supports the default protocol versions; fall back to the process default.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    }
}

/// True for hop-by-hop headers, which never cross the gateway.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "upgrade" | "transfer-encoding" | "te" | "trailer"
    ) || name.as_str().starts_with("proxy-")
}

/// Headers the gateway owns on backend requests: never replayed from the client.
fn is_gateway_owned(n: &str) -> bool {
    matches!(
        n,
        "content-length"
            | "content-type"
            | "accept"
            | "connection-id"
            | "sec-websocket-extensions"
            | "grip-sig"
            | "content-bytes-replayed"
            | "x-forwarded-proto"
            | "x-forwarded-host"
    ) || n.starts_with("meta-")
        || n.starts_with("set-meta-")
}

/// A header name with `_` read as `-`.
fn dashed(name: &HeaderName) -> std::borrow::Cow<'_, str> {
    let n = name.as_str();
    if n.contains('_') {
        std::borrow::Cow::Owned(n.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(n)
    }
}

/// Names listed in the client's `Connection` header are hop-by-hop too (RFC 9110 7.6.1).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// The client's side of the connection, as the gateway saw it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Client socket address.
    pub peer: SocketAddr,
    /// `https` when the client listener is TLS.
    pub tls: bool,
}

/// Everything about the client's handshake that is replayed on each backend request.
///
/// The client's headers are kept after the protocol's fixed exclusions; the route's rules
/// (allow/deny, remove, add, `X-Forwarded-For` mode, host override) are applied when a request
/// is built, so [`RequestTemplate::rebind`] can move an open connection to an edited route.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// Backend URI.
    pub uri: Uri,
    /// The route (for header rules, signing and timeouts).
    pub route: Arc<Route>,
    /// Client headers that survive the fixed protocol exclusions.
    client: Vec<(HeaderName, HeaderValue)>,
    host: Option<HeaderValue>,
    /// `X-Forwarded-For` for the `append` mode: the client's values, then its address.
    xff_appended: HeaderValue,
    /// The client's address, for the `replace` mode.
    peer_ip: HeaderValue,
    tls: bool,
    connection_id: Option<HeaderValue>,
    websocket: bool,
    /// Matched route prefix and the client's path and query, to rebuild the URI on rebind.
    prefix: String,
    path_and_query: String,
}

impl RequestTemplate {
    /// Keeps what is replayable from the client's handshake headers (PROTOCOL.md section 2).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: Arc<Route>,
        prefix: &str,
        path_and_query: &str,
        client_headers: &HeaderMap,
        client: &ClientInfo,
        connection_id: Option<&str>,
        websocket: bool,
    ) -> Result<Self, crate::config::RouteError> {
        let uri = route.backend.uri_for(prefix, path_and_query)?;
        let listed = connection_listed(client_headers);
        let replayed: Vec<(&HeaderName, &HeaderValue)> = client_headers
            .iter()
            .filter(|(name, _)| {
                // CGI-style servers (WSGI, PHP, Rack) read `Meta_User` as `Meta-User`: the
                // reserved names are matched with `_` taken as `-`.
                let dashed = dashed(name);
                let n: &str = &dashed;
                !(is_hop_by_hop(name)
                    || listed.contains(name)
                    || (websocket && is_gateway_owned(n))
                    || (!websocket && (n.starts_with("meta-") || n.starts_with("set-meta-") || n == "grip-sig"))
                    || n == "host"
                    || n == "x-forwarded-for")
            })
            .collect();
        // Header values parsed by hyper are slices of its read buffer: keeping them would keep
        // that whole buffer alive for the connection's lifetime. Copy them into one compact
        // allocation instead.
        let mut blob = bytes::BytesMut::with_capacity(replayed.iter().map(|(_, v)| v.len()).sum());
        for (_, v) in &replayed {
            blob.extend_from_slice(v.as_bytes());
        }
        let blob = blob.freeze();
        let mut kept = Vec::with_capacity(replayed.len());
        let mut at = 0;
        for (name, v) in replayed {
            let slice = blob.slice(at..at + v.len());
            at += v.len();
            let value = HeaderValue::from_maybe_shared(slice).unwrap_or_else(|_| v.clone());
            kept.push((name.clone(), value));
        }
        let prior: Vec<&str> = client_headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        // Made once: both forms are the same for every request of the connection.
        let ip = client.peer.ip().to_string();
        let peer_ip = HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let xff_appended = if prior.is_empty() {
            peer_ip.clone()
        } else {
            HeaderValue::from_str(&format!("{}, {ip}", prior.join(", "))).unwrap_or_else(|_| peer_ip.clone())
        };
        Ok(Self {
            uri,
            route,
            client: kept,
            host: client_headers
                .get(header::HOST)
                .and_then(|h| HeaderValue::from_bytes(h.as_bytes()).ok()),
            xff_appended,
            peer_ip,
            tls: client.tls,
            connection_id: connection_id.and_then(|c| HeaderValue::from_str(c).ok()),
            websocket,
            prefix: prefix.to_owned(),
            path_and_query: path_and_query.to_owned(),
        })
    }

    /// Moves the connection to a new version of its route (header rules, backend, signing
    /// key). Keeps the old route if the new one cannot serve this path.
    pub fn rebind(&mut self, route: Arc<Route>) -> bool {
        match route.backend.uri_for(&self.prefix, &self.path_and_query) {
            Ok(uri) => {
                self.uri = uri;
                self.route = route;
                true
            }
            Err(_) => false,
        }
    }

    /// Every header a backend request gets from the template, in order, under the route's
    /// rules: the replayed client headers, `Host` (the route's override, the client's, or the
    /// backend's authority), the forwarding headers, the protocol's own headers for WebSocket
    /// requests, then the route's added headers. Client headers the gateway writes itself are
    /// left out; with `skip_trace_context` so are the client's `traceparent`/`tracestate` (a
    /// traced request carries its span's). The one place these rules live: [`Self::headers`]
    /// and [`Self::http1_head`] both use it.
    fn for_each_header(&self, skip_trace_context: bool, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
        const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
        const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
        const CONNECTION_ID: HeaderName = HeaderName::from_static("connection-id");
        let rules = &self.route.headers;
        let removed = |name: &HeaderName| !rules.remove.is_empty() && rules.remove.contains(name);
        for (name, value) in &self.client {
            let ours = *name == X_FORWARDED_PROTO || (self.host.is_some() && *name == X_FORWARDED_HOST);
            let trace = skip_trace_context && (name == "traceparent" || name == "tracestate");
            if !ours && !trace && rules.replays(name) {
                f(name, value);
            }
        }
        match self.route.backend.host_override.as_ref().or(self.host.as_ref()) {
            Some(h) if !removed(&header::HOST) => f(&header::HOST, h),
            _ => {
                if let Some(a) = self
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                {
                    f(&header::HOST, &a);
                }
            }
        }
        if !removed(&X_FORWARDED_FOR) {
            match rules.forwarded_for {
                ForwardedFor::Append => f(&X_FORWARDED_FOR, &self.xff_appended),
                ForwardedFor::Replace => f(&X_FORWARDED_FOR, &self.peer_ip),
                ForwardedFor::Drop => {}
            }
        }
        let emit = |f: &mut dyn FnMut(&HeaderName, &HeaderValue), name: &HeaderName, value: &HeaderValue| {
            if !removed(name) {
                f(name, value);
            }
        };
        let proto = HeaderValue::from_static(if self.tls { "https" } else { "http" });
        emit(&mut f, &X_FORWARDED_PROTO, &proto);
        if let Some(h) = &self.host {
            emit(&mut f, &X_FORWARDED_HOST, h);
        }
        if self.websocket {
            let media = HeaderValue::from_static(EVENTS_MEDIA_TYPE);
            emit(&mut f, &header::CONTENT_TYPE, &media);
            emit(&mut f, &header::ACCEPT, &media);
            if let Some(id) = &self.connection_id {
                emit(&mut f, &CONNECTION_ID, id);
            }
        }
        for (name, value) in &rules.add {
            f(name, value);
        }
    }

    /// The headers of a backend request as a header map (the hyper client's requests and
    /// plain HTTP pass-through); see [`Self::for_each_header`].
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(self.client.len() + 10);
        self.for_each_header(false, |name, value| {
            headers.append(name.clone(), value.clone());
        });
        headers
    }

    /// The template's headers ([`Self::for_each_header`]) as HTTP/1.1 header lines, without
    /// framing headers: the in-task clients write those for the body they send.
    pub fn write_http1_headers(&self, out: &mut bytes::BytesMut, skip_trace_context: bool) {
        self.for_each_header(skip_trace_context, |name, value| {
            if *name != header::CONTENT_LENGTH && *name != header::TRANSFER_ENCODING {
                put_header(out, name.as_str(), value.as_bytes());
            }
        });
    }

    /// The complete HTTP/1.1 head of the `POST` for one session request (for the in-task
    /// client): [`Self::headers`] plus the request's own headers; with a recording span its
    /// `traceparent` replaces the client's.
    pub fn http1_head(
        &self,
        req: &BackendRequest,
        now_unix: u64,
        span: &crate::telemetry::RequestSpan,
    ) -> bytes::BytesMut {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = bytes::BytesMut::with_capacity(640 + path.len() + req.body.len().min(16 * 1024));
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        // A traced request carries the span's trace context instead of the client's.
        let traced = span.is_recording();
        self.write_http1_headers(&mut out, traced);
        if traced {
            span.write_http1(&mut out);
        }
        for (name, value) in req.meta.iter() {
            put_header(&mut out, name.as_str(), value.as_bytes());
        }
        let mut num = itoa_buf();
        if req.replayed > 0 {
            put_header(&mut out, "content-bytes-replayed", fmt_usize(&mut num, req.replayed));
        }
        if req.grip {
            put_header(&mut out, "sec-websocket-extensions", b"grip");
        }
        if let Some(key) = &self.route.grip.signing_key {
            let sig = sig::sign(key, &self.route.grip.issuer, now_unix);
            put_header(&mut out, "grip-sig", sig.as_bytes());
        }
        put_header(&mut out, "content-length", fmt_usize(&mut num, req.body.len()));
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The HTTP request for one session request.
    pub fn build(&self, req: &BackendRequest, now_unix: u64) -> Request<ProxyBody> {
        let mut headers = self.headers();
        for (name, value) in req.meta.iter() {
            headers.append(name.clone(), value.clone());
        }
        if req.replayed > 0 {
            headers.insert("content-bytes-replayed", HeaderValue::from(req.replayed));
        }
        if req.grip {
            headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static("grip"));
        }
        if let Some(key) = &self.route.grip.signing_key
            && let Ok(v) = HeaderValue::from_str(&sig::sign(key, &self.route.grip.issuer, now_unix))
        {
            headers.insert("grip-sig", v);
        }
        let mut request = Request::new(full_body(req.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = headers;
        request
    }
}

/// Writes one `name: value` header line.
pub(crate) fn put_header(out: &mut bytes::BytesMut, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// Decimal digits of `n`, written at the end of `buf`.
fn fmt_usize(buf: &mut [u8; 20], mut n: usize) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A boxed full body.
pub fn full_body(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// Sends one events request and reads the whole response within the limits.
///
/// Accepted responses may carry `max_body` bytes; a rejection's body is cut at `max_reject_body`
/// (the client still sees it, truncated).
pub async fn send_events(
    client: &Client<Connector, ProxyBody>,
    request: Request<ProxyBody>,
    timeout: Duration,
    max_body: usize,
    max_reject_body: usize,
) -> Result<BackendResponse, BackendError> {
    let fut = async {
        let resp = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                BackendError::Connect(error_chain(&e))
            } else {
                BackendError::Failed(error_chain(&e))
            }
        })?;
        let (parts, body) = resp.into_parts();
        let accepted = crate::session::is_accepted(parts.status, &parts.headers);
        let body = if accepted {
            Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        BackendError::TooLarge { limit: max_body }
                    } else {
                        BackendError::Failed(e.to_string())
                    }
                })?
                .to_bytes()
        } else {
            read_capped(body, max_reject_body).await
        };
        Ok(BackendResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout),
    }
}

/// Reads at most `cap` bytes of a body, dropping the rest (and the connection).
async fn read_capped(mut body: hyper::body::Incoming, cap: usize) -> Bytes {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= cap {
                break;
            }
        }
    }
    out.freeze()
}

/// `error: cause: cause` for logs and close reasons.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(headers_yaml: &str, host_override: &str) -> Arc<Route> {
        let yaml = format!(
            "routes:\n  - name: r\n    backend: {{url: http://127.0.0.1:9/base{host_override}}}\n    headers: {headers_yaml}\n"
        );
        let mut routes = crate::config::parse_routes_yaml(&yaml).expect("valid routes");
        Arc::new(routes.remove(0))
    }

    fn client_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "chat.example.com"),
            ("cookie", "a=1"),
            ("authorization", "Bearer x"),
            ("x-custom", "one"),
            ("x-custom", "two"),
            ("x-forwarded-for", "10.0.0.1"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("content-length", "5"),
            ("meta-user", "forged"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    /// Header lines of an HTTP/1.1 head, sorted (order across names is not significant).
    fn lines(head: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(head).expect("ascii head");
        let mut v: Vec<String> = text
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    /// The in-task client's head carries exactly the headers the hyper path sends.
    #[test]
    fn http1_head_matches_the_header_map_path() {
        let cases = [
            ("{}", ""),
            (
                "{replayDeny: [Authorization], add: [{name: X-Env, value: prod}], remove: [Cookie, X-Forwarded-Proto], forwardedFor: append}",
                "",
            ),
            (
                "{forwardedFor: replace, remove: [Host]}",
                ", hostOverride: backend.internal",
            ),
            (
                "{forwardedFor: drop, replayAllow: [X-Custom]}",
                ", hostOverride: backend.internal",
            ),
        ];
        for (rules, host) in cases {
            let template = RequestTemplate::new(
                route(rules, host),
                "/",
                "/chat?x=1",
                &client_headers(),
                &ClientInfo {
                    peer: "192.0.2.7:5000".parse().expect("addr"),
                    tls: true,
                },
                Some("c1"),
                true,
            )
            .expect("template");
            let req = BackendRequest {
                body: Bytes::from_static(b"TEXT 2\r\nhi\r\n"),
                meta: Arc::from(vec![(
                    HeaderName::from_static("meta-user"),
                    HeaderValue::from_static("alice"),
                )]),
                replayed: 3,
                events: 1,
                attempt: 0,
                grip: true,
            };
            let span = crate::telemetry::RequestSpan::start(&crate::telemetry::SpanParent::none(), &req);
            let head = template.http1_head(&req, 1_700_000_000, &span);
            let built = template.build(&req, 1_700_000_000);
            let mut want: Vec<String> = built
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().expect("ascii")))
                .collect();
            if !built.headers().contains_key(header::HOST) {
                want.push("host: 127.0.0.1:9".into());
            }
            want.push(format!("content-length: {}", req.body.len()));
            want.sort();
            let text = String::from_utf8_lossy(&head).into_owned();
            assert!(text.starts_with("POST /base/chat?x=1 HTTP/1.1\r\n"), "{text}");
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            assert_eq!(lines(&head), want, "rules {rules}");
        }
    }
}
