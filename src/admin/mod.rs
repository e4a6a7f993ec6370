//! The admin listener: `/healthz`, `/readyz`, `/metrics` (and, with GRIP, the publish and
//! connection APIs).
//!
//! `/readyz` answers `503` only while the gateway cannot serve (draining, listener not bound,
//! no routes from the controller yet). A degraded dependency keeps it `200`, because traffic
//! must keep flowing on what the gateway has, but the body says so, one `degraded: ...` per
//! problem: NATS down (publishes stay local), the controller unreachable or failing, or the
//! routes file rejected (the last good routes stay in use):
//!
//! ```text
//! ready (routes version 10458507545456166140); degraded: control API unreachable since 2025-06-01T12:00:00Z: control API request failed: ...
//! ```

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

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
use crate::metrics::ConfigSource;
use crate::server::{Gateway, ResponseBody, text_response};

/// Longest problem description `/readyz` shows; longer ones are cut (logs have them whole).
const MAX_REASON_CHARS: usize = 400;

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

    /// Where the route table comes from, with its status: the controller when routes come
    /// from it, else the routes file, else a static table.
    pub fn config_source(&self) -> ConfigSource<'_> {
        match (&self.control, &self.reload) {
            (Some(control), _) => ConfigSource::Control(control),
            (None, Some(reload)) => ConfigSource::File(reload),
            (None, None) => ConfigSource::Static,
        }
    }

    /// Why the gateway is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<Cow<'static, str>> {
        if self.gateway.draining.load(Ordering::SeqCst) {
            return Some(Cow::Borrowed("draining"));
        }
        if !self.listening.load(Ordering::SeqCst) {
            return Some(Cow::Borrowed("listener not bound"));
        }
        // Routes from the controller: ready once the first snapshot arrived. Afterwards the
        // gateway stays ready on its last good snapshot while the controller is away.
        if let Some(control) = self.control.as_ref().filter(|c| !c.is_synced()) {
            const WAITING: &str = "waiting for the first route snapshot from the controller";
            return Some(match control.last_error() {
                Some(error) => Cow::Owned(format!("{WAITING} (last error: {})", one_line(&error))),
                None => Cow::Borrowed(WAITING),
            });
        }
        None
    }

    /// What is degraded while the gateway stays ready, one description per problem (empty
    /// when nothing is): NATS not connected, the controller unreachable or failing (or
    /// routes of its snapshot left out), the routes file rejected or unreadable. Error texts
    /// are put on one line, cut to a few hundred characters, and URL credentials are
    /// removed.
    pub fn degraded_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(nats) = self.hub.nats().and_then(|b| b.degraded_reason()) {
            reasons.push(nats.to_owned());
        }
        match self.config_source() {
            ConfigSource::Control(control) if !control.is_up() => {
                let what = if control.is_connected() {
                    "control API failing"
                } else {
                    "control API unreachable"
                };
                reasons.push(failure(what, control.failing_since(), control.last_error()));
            }
            ConfigSource::Control(control) => {
                if let Some(left_out) = control.routes_left_out() {
                    reasons.push(format!("control API snapshot incomplete: {}", one_line(&left_out)));
                }
            }
            ConfigSource::File(reload) if !reload.is_up() => {
                reasons.push(failure(
                    "routes file failing",
                    reload.failing_since(),
                    reload.last_error(),
                ));
            }
            ConfigSource::File(_) | ConfigSource::Static => {}
        }
        reasons
    }

    /// The `/readyz` answer: `200` with the routes version and any degradation, or `503`
    /// with the reason.
    pub fn readiness(&self) -> (StatusCode, String) {
        if let Some(reason) = self.not_ready_reason() {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"));
        }
        let version = self.gateway.table.load().version();
        let mut body = format!("ready (routes version {version})");
        for reason in self.degraded_reasons() {
            body.push_str("; degraded: ");
            body.push_str(&reason);
        }
        body.push('\n');
        (StatusCode::OK, body)
    }
}

/// `WHAT since TIME: ERROR`, for a source that has been failing.
fn failure(what: &str, since: Option<SystemTime>, error: Option<String>) -> String {
    let mut text = what.to_owned();
    if let Some(since) = since {
        text.push_str(" since ");
        text.push_str(&rfc3339(since));
    }
    if let Some(error) = error {
        text.push_str(": ");
        text.push_str(&one_line(&error));
    }
    text
}

/// A UTC time as `2025-06-01T12:00:00Z` (whole seconds).
fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// An error text fit for a one-line readiness body: line breaks become `; `, other control
/// characters spaces, credentials in URLs (`scheme://user:password@`) are replaced, and the
/// text is cut after [`MAX_REASON_CHARS`] characters.
fn one_line(text: &str) -> String {
    let text = redact_url_credentials(text.trim());
    let mut out = String::with_capacity(text.len().min(MAX_REASON_CHARS + 3));
    for (count, c) in text.chars().enumerate() {
        if count == MAX_REASON_CHARS {
            out.push_str("...");
            break;
        }
        match c {
            '\n' => out.push_str("; "),
            '\r' => {}
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Replaces the user information of every `scheme://user[:password]@host` in `text` with
/// `<redacted>`.
fn redact_url_credentials(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#', quote or whitespace.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                out.push_str("<redacted>");
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
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
        (&Method::GET, "/readyz") => {
            let (status, body) = st.readiness();
            text_response(status, body)
        }
        (&Method::GET, "/metrics") => crate::metrics::response(&st.gateway, st.config_source(), req.headers()),
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use arc_swap::ArcSwap;

    use super::*;
    use crate::config::control::{ControlError, ControlStatus};
    use crate::config::{ConfigError, RouteTable};
    use crate::server::GatewaySettings;

    fn state(version: u64) -> AdminState {
        let table = Arc::new(ArcSwap::from_pointee(
            RouteTable::new(Vec::new(), version).expect("empty table"),
        ));
        let state = AdminState::new(Arc::new(Gateway::new(table, GatewaySettings::default())));
        state.listening.store(true, Ordering::SeqCst);
        state
    }

    #[tokio::test]
    async fn a_static_table_is_ready_without_degradation() {
        let st = state(1);
        assert!(matches!(st.config_source(), ConfigSource::Static));
        assert_eq!(
            st.readiness(),
            (StatusCode::OK, "ready (routes version 1)\n".to_owned())
        );
        st.gateway.draining.store(true, Ordering::SeqCst);
        assert_eq!(
            st.readiness(),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n".to_owned())
        );
    }

    #[tokio::test]
    async fn an_unreachable_controller_degrades_but_keeps_readiness() {
        let version = u64::MAX - 7;
        let control = Arc::new(ControlStatus::new());
        let st = AdminState {
            control: Some(control.clone()),
            ..state(version)
        };
        let refused = ControlError::Request("tcp connect error: Connection refused (os error 111)".into());
        control.record_error(&refused, false);
        let (status, body) = st.readiness();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "not ready: waiting for the first route snapshot from the controller (last error: control API \
             request failed: tcp connect error: Connection refused (os error 111))\n"
        );

        control.record_ok(Some(version), &[]);
        assert_eq!(
            st.readiness(),
            (StatusCode::OK, format!("ready (routes version {version})\n"))
        );

        control.record_error(&refused, false);
        let since = control.failing_since().expect("failing since");
        control.record_error(&refused, false);
        assert_eq!(
            control.failing_since(),
            Some(since),
            "the first failure of the run counts"
        );
        let (status, body) = st.readiness();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!(
                "ready (routes version {version}); degraded: control API unreachable since {}: control API \
                 request failed: tcp connect error: Connection refused (os error 111)\n",
                rfc3339(since)
            )
        );

        // Answering with an error status: reachable, but still failing.
        control.record_error(
            &ControlError::Status {
                status: 403,
                body: "forbidden".into(),
            },
            true,
        );
        let (_, body) = st.readiness();
        assert!(
            body.contains("; degraded: control API failing since ")
                && body.ends_with(": control API answered 403: forbidden\n"),
            "{body}"
        );

        // Back: nothing to report, the failure run is over.
        control.record_ok(None, &[]);
        assert_eq!(
            st.readiness(),
            (StatusCode::OK, format!("ready (routes version {version})\n"))
        );
        assert_eq!(control.failing_since(), None);
    }

    #[tokio::test]
    async fn routes_left_out_of_a_snapshot_are_reported_until_the_next_snapshot() {
        let control = Arc::new(ControlStatus::new());
        let st = AdminState {
            control: Some(control.clone()),
            ..state(3)
        };
        let left_out = crate::config::FieldError::new("ns/broken.grip.signingKey.secretRef", "not delivered");
        control.record_ok(Some(3), std::slice::from_ref(&left_out));
        control.record_ok(None, &[]);
        let (status, body) = st.readiness();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            "ready (routes version 3); degraded: control API snapshot incomplete: routes left out: \
             ns/broken.grip.signingKey.secretRef: not delivered\n"
        );
        control.record_ok(Some(4), &[]);
        assert!(!st.readiness().1.contains("degraded"));
    }

    #[tokio::test]
    async fn a_rejected_routes_file_is_reported_on_one_line() {
        let reload = Arc::new(ReloadStatus::new(2));
        let st = AdminState {
            reload: Some(reload.clone()),
            ..state(2)
        };
        assert!(matches!(st.config_source(), ConfigSource::File(_)));
        let error = ConfigError::new(vec![
            crate::config::FieldError::new("routes[0].backend.url", "must not contain credentials (user:password@)"),
            crate::config::FieldError::new("routes[1].limits.maxMesageBytes", "unknown field"),
        ]);
        reload.record_failure(&error);
        let since = reload.failing_since().expect("failing since");
        let (status, body) = st.readiness();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!(
                "ready (routes version 2); degraded: routes file failing since {}: routes[0].backend.url: must not \
                 contain credentials (user:password@); routes[1].limits.maxMesageBytes: unknown field\n",
                rfc3339(since)
            )
        );
        reload.record_ok(3);
        assert!(!st.readiness().1.contains("degraded"));
    }

    #[test]
    fn one_line_flattens_cuts_and_redacts() {
        assert_eq!(one_line("a\r\nb\tc\n"), "a; b c");
        assert_eq!(
            one_line("cannot reach http://user:s3cret@ctl:8081/v1 or \"wss://tok@h\""),
            "cannot reach http://<redacted>@ctl:8081/v1 or \"wss://<redacted>@h\""
        );
        assert_eq!(one_line("see https://example.com/a@b"), "see https://example.com/a@b");
        let long = "x".repeat(MAX_REASON_CHARS + 50);
        let cut = one_line(&long);
        assert_eq!(cut.chars().count(), MAX_REASON_CHARS + 3);
        assert!(cut.ends_with("..."));
        assert_eq!(
            one_line(&"é".repeat(MAX_REASON_CHARS + 1)).chars().count(),
            MAX_REASON_CHARS + 3
        );
    }

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_748_779_200_999)),
            "2025-06-01T12:00:00Z"
        );
    }
}
