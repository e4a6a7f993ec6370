//! The admin listener: `/healthz`, `/readyz` (and, with GRIP, the publish and connection APIs).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod auth;
pub mod client;
pub mod connections;
pub mod publish;

use crate::config::ReloadStatus;
use crate::server::{Gateway, ResponseBody, text_response};

/// What the admin endpoints report on.
#[derive(Debug)]
pub struct AdminState {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// Set once the client listener is bound and serving.
    pub listening: AtomicBool,
    /// Routes-file reload status, when a file is used.
    pub reload: Option<Arc<ReloadStatus>>,
    /// Where publishes and connection-API calls go.
    pub hub: crate::grip::Hub,
    /// Authentication required by the publish and connection APIs; `None` = open.
    pub auth: Option<auth::Auth>,
    /// Largest publish / connection-API request body in bytes
    /// ([`publish::DEFAULT_MAX_PUBLISH_BODY`] by default).
    pub max_publish_body: usize,
    /// Control-API client status, when routes come from the controller.
    pub control: Option<Arc<crate::config::control::ControlStatus>>,
}

impl AdminState {
    /// Admin state for a gateway with defaults: not yet listening, no reload or control
    /// status, a local hub, no auth, the default publish body limit.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self {
            hub: crate::grip::Hub::new(gateway.registry.clone()),
            gateway,
            listening: AtomicBool::new(false),
            reload: None,
            auth: None,
            max_publish_body: publish::DEFAULT_MAX_PUBLISH_BODY,
            control: None,
        }
    }

    /// Why the gateway is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.gateway.draining.load(Ordering::SeqCst) {
            return Some("draining");
        }
        if !self.listening.load(Ordering::SeqCst) {
            return Some("listener not bound");
        }
        // Routes from the controller: ready once the first snapshot arrived. Afterwards the
        // gateway stays ready on its last good snapshot while the controller is away.
        if self.control.as_ref().is_some_and(|c| !c.is_synced()) {
            return Some("waiting for the first route snapshot from the controller");
        }
        None
    }
}

/// Serves the admin API until `stop` fires.
pub async fn run(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let st = state.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(route(&st, req).await) }
        });
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route(st: &AdminState, req: Request<Incoming>) -> Response<ResponseBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match st.not_ready_reason() {
            None => {
                let version = st.gateway.table.load().version();
                // NATS down: still ready (local delivery works), but say so.
                match st.hub.nats().and_then(|b| b.degraded_reason()) {
                    Some(d) => text_response(
                        StatusCode::OK,
                        format!("ready (routes version {version}); degraded: {d}\n"),
                    ),
                    None => text_response(StatusCode::OK, format!("ready (routes version {version})\n")),
                }
            }
            Some(r) => text_response(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")),
        },
        (&Method::GET, "/metrics") => crate::metrics::response(&st.gateway, req.headers()),
        (_, "/metrics") => crate::metrics::method_not_allowed(),
        (&Method::GET, "/log-level") => crate::telemetry::get_log_level(),
        (&Method::PUT, "/log-level") => match publish::authenticate(st, req.headers()) {
            Ok(()) => crate::telemetry::put_log_level(req).await,
            Err(refusal) => refusal.into_response(),
        },
        (_, "/publish" | "/publish/") => publish::handle(st, req).await,
        (_, path) if path.starts_with(connections::PREFIX) => connections::handle(st, req).await,
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}
