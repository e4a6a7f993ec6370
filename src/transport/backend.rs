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

/// Pooled backend clients, one per connect timeout (routes may differ).
#[derive(Clone)]
pub struct BackendPool {
    clients: Arc<Mutex<HashMap<Duration, Client<Connector, ProxyBody>>>>,
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
    /// `max_idle_per_host` per backend.
    pub fn new(idle_timeout: Duration, max_idle_per_host: usize) -> Self {
        Self {
            clients: Arc::new(Mutex::new(HashMap::new())),
            idle_timeout,
            max_idle_per_host,
        }
    }

    /// The client for a connect timeout (created once, then shared).
    pub fn client(&self, connect_timeout: Duration) -> Client<Connector, ProxyBody> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(connect_timeout)
            .or_insert_with(|| {
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(connect_timeout));
                http.set_nodelay(true);
                http.enforce_http(false);
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        b.with_root_certificates(rustls::RootCertStore {
                            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                        })
                        .with_no_client_auth()
                    });
                let connector = match tls {
                    Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(tls)
                        .https_or_http()
                        .enable_http1()
                        .wrap_connector(http),
                    Err(e) => {
                        // ring supports the default protocol versions; this cannot fail in practice.
                        tracing::error!(cause = %e, "TLS setup failed; https backends unavailable");
                        hyper_rustls::HttpsConnectorBuilder::new()
                            .with_tls_config(
                                rustls::ClientConfig::builder()
                                    .with_root_certificates(rustls::RootCertStore::empty())
                                    .with_no_client_auth(),
                            )
                            .https_or_http()
                            .enable_http1()
                            .wrap_connector(HttpConnector::new())
                    }
                };
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(self.idle_timeout)
                    .pool_max_idle_per_host(self.max_idle_per_host)
                    .build(connector)
            })
            .clone()
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
fn is_gateway_owned(name: &HeaderName) -> bool {
    let n = name.as_str();
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

/// Everything about the client's handshake that is replayed on each backend request.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// Backend URI.
    pub uri: Uri,
    /// Replayed and added headers (without per-request ones).
    pub headers: HeaderMap,
    /// The route (for signing and timeouts).
    pub route: Arc<Route>,
}

/// The client's side of the connection, as the gateway saw it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Client socket address.
    pub peer: SocketAddr,
    /// `https` when the client listener is TLS.
    pub tls: bool,
}

impl RequestTemplate {
    /// Builds the replayed headers from the client's handshake headers (PROTOCOL.md section 2).
    pub fn new(
        route: Arc<Route>,
        uri: Uri,
        client_headers: &HeaderMap,
        client: &ClientInfo,
        connection_id: Option<&str>,
        websocket: bool,
    ) -> Self {
        let listed = connection_listed(client_headers);
        let rules = &route.headers;
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 8);
        for (name, value) in client_headers {
            if is_hop_by_hop(name)
                || listed.contains(name)
                || (websocket && is_gateway_owned(name))
                || (!websocket && (name.as_str().starts_with("meta-") || name == "grip-sig"))
                || name == header::HOST
                || name == "x-forwarded-for"
                || !rules.replays(name)
            {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        // Host: the client's, unless the route overrides it.
        let host = route
            .backend
            .host_override
            .clone()
            .or_else(|| client_headers.get(header::HOST).cloned());
        if let Some(h) = &host {
            headers.insert(header::HOST, h.clone());
        }
        let peer_ip = client.peer.ip().to_string();
        let xff = match rules.forwarded_for {
            ForwardedFor::Append => {
                let prior: Vec<&str> = client_headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if prior.is_empty() {
                    Some(peer_ip)
                } else {
                    Some(format!("{}, {peer_ip}", prior.join(", ")))
                }
            }
            ForwardedFor::Replace => Some(peer_ip),
            ForwardedFor::Drop => None,
        };
        if let Some(v) = xff.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if client.tls { "https" } else { "http" }),
        );
        if let Some(h) = client_headers.get(header::HOST) {
            headers.insert("x-forwarded-host", h.clone());
        }
        if websocket {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(EVENTS_MEDIA_TYPE));
            headers.insert(header::ACCEPT, HeaderValue::from_static(EVENTS_MEDIA_TYPE));
            if let Some(id) = connection_id.and_then(|c| HeaderValue::from_str(c).ok()) {
                headers.insert("connection-id", id);
            }
        }
        for name in &rules.remove {
            headers.remove(name);
        }
        for (name, value) in &rules.add {
            headers.append(name.clone(), value.clone());
        }
        Self { uri, headers, route }
    }

    /// The HTTP request for one session request.
    pub fn build(&self, req: &BackendRequest, now_unix: u64) -> Request<ProxyBody> {
        let mut headers = self.headers.clone();
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
