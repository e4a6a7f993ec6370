//! The webhook's HTTPS server: `POST /inject` (AdmissionReview in and out), `GET /healthz`.
//!
//! HTTP/1.1 and HTTP/2 (ALPN) over rustls, the certificate from a
//! [`CertStore`](super::CertStore). The work per request is a JSON decode, a pure decision and a
//! JSON encode: well under a millisecond for an ordinary pod, far from the webhook's
//! `timeoutSeconds`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::inject::Injector;

/// Path of the admission endpoint (the webhook configuration's `clientConfig.service.path`).
pub const INJECT_PATH: &str = "/inject";
/// Path of the liveness endpoint.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Largest AdmissionReview body accepted (the API server caps objects at 3 MiB; a review
/// carries the object once for CREATE).
pub const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;
/// Most concurrent connections (the API server keeps a few, pooled).
const MAX_CONNECTIONS: usize = 512;
/// Time for a TLS handshake and for request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections get this long to finish after cancellation.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

async fn handle(req: Request<Incoming>, injector: Arc<Injector>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let response = match (req.method(), path) {
        (&Method::POST, INJECT_PATH) => {
            let started = tokio::time::Instant::now();
            match Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect().await {
                Ok(body) => match injector.handle(&body.to_bytes()) {
                    Ok(json) => {
                        tracing::debug!(elapsed = ?started.elapsed(), "admission review answered");
                        respond(StatusCode::OK, "application/json", json)
                    }
                    Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", e.to_string()),
                },
                Err(e) => {
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    respond(status, "text/plain; charset=utf-8", format!("reading the body: {e}"))
                }
            }
        }
        (&Method::GET, HEALTHZ_PATH) => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        (_, INJECT_PATH | HEALTHZ_PATH) => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    };
    Ok(response)
}

/// Serves admission reviews on `listener` until `cancel` fires, then lets open connections
/// finish their requests (up to 5 s).
///
/// Dropping the future stops accepting and aborts the open connections.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injector: Arc<Injector>,
    cancel: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owns the connection tasks: dropping it aborts them.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // Cancel-safe: a permit or an accept dropped by `select!` loses nothing.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = cancel.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let injector = injector.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let service = service_fn(move |req| handle(req, injector.clone()));
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "webhook connection ended");
                    }
                }
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
    let drained = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), drained).await;
}
