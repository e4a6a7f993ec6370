//! Logs and traces.
//!
//! - **Logs**: one `tracing` subscriber with a text or JSON formatter whose filter can be
//!   changed at runtime ([`LogHandle`], `PUT /log-level` on the admin listener).
//! - **Traces**: when an OTLP endpoint is configured ([`TraceConfig::from_env`], standard
//!   `OTEL_*` variables), a [`Tracing`] pipeline exports spans over OTLP (HTTP/protobuf or
//!   gRPC) and its layer turns the spans of target [`SPAN_TARGET`] into OpenTelemetry spans.
//!   Without an endpoint there is no OpenTelemetry layer at all, [`is_enabled`] is false and
//!   the data plane creates no spans: a connection checks one relaxed atomic when it starts,
//!   and each backend request one `Option`.
//! - **Per-message spans**: `backend.request`, the one span per message exchange, is made
//!   with the SDK tracer directly ([`RequestSpan`]) rather than through a `tracing` span: it
//!   skips the subscriber's span registry, field visiting and per-layer filtering.
//! - **Propagation**: the incoming W3C `traceparent` of a handshake (or pass-through request)
//!   is the parent of the gateway's spans; every backend request carries the `traceparent` of
//!   its own span ([`RequestSpan::inject`], [`inject`]), replacing the client's.
//!
//! # Spans
//!
//! | name | kind | parent | attributes |
//! |---|---|---|---|
//! | `ws.connection` | server | the client's `traceparent` | `wsgate.route`, `url.path`, `wsgate.connection_id`, `wsgate.close_code`, `wsgate.client_messages`, `wsgate.backend_messages` |
//! | `ws.handshake` | internal | `ws.connection` | `wsgate.route`, `wsgate.connection_id`, `wsgate.outcome`, `http.response.status_code` |
//! | `backend.request` | client | `ws.handshake` (OPEN) or `ws.connection` (later requests) | `wsgate.events`, `wsgate.bytes`, `wsgate.attempt`, `http.response.status_code`, `error.type` |
//! | `http.proxy` | server | the client's `traceparent` | `wsgate.route`, `http.request.method`, `url.path`, `http.response.status_code`, `error.type` |
//! | `publish` | server | the publisher's `traceparent` | `wsgate.items`, `wsgate.deliveries` |
//! | `controller.reconcile` | internal | none | `k8s.resource.kind`, `k8s.namespace.name`, `k8s.resource.name`, `error.type` |
//!
//! A connection's whole life is one trace: the backend's spans for its requests join it.
//!
//! # Secrets
//!
//! No span or log line made here carries header values: attributes are counts, statuses,
//! route names and the URL path (never the query).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, Tracer as SdkTracer};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

use crate::server::{ResponseBody, text_response};
use crate::session::{BackendError, BackendRequest, BackendResponse};

/// Target of every span meant for OpenTelemetry. The OTLP layer sees only this target, and
/// the log formatter never sees it.
pub const SPAN_TARGET: &str = "wsgate::otel";

/// Default `service.name`.
pub const DEFAULT_SERVICE_NAME: &str = "wsgate";

/// Default export timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`).
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest `PUT /log-level` body.
const MAX_FILTER_BODY: usize = 4096;

/// Largest OTLP response body read.
const MAX_EXPORT_RESPONSE: usize = 4 << 20;

/// Layers handed out by running pipelines ([`Tracing::layer`]) and not yet shut down.
static ENABLED: AtomicUsize = AtomicUsize::new(0);

/// True once an OpenTelemetry layer exists in this process: only then does the data plane
/// create spans and inject `traceparent`. One relaxed load.
#[inline]
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) > 0
}

/// What went wrong setting up logs or traces.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` (or related) variable has a value that cannot be used.
    #[error("{name}={value:?}: {reason}")]
    InvalidVar {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// OTLP export needs a tokio runtime and none is running on this thread.
    #[error("OTLP export needs a tokio runtime: {0}")]
    NoRuntime(String),
    /// Flushing or shutting down the span pipeline failed.
    #[error("span export: {0}")]
    Export(String),
    /// A log filter does not parse.
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter {
        /// The filter text.
        filter: String,
        /// The parser's message.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized,
    /// The log filter could not be swapped.
    #[error("log filter reload: {0}")]
    Reload(String),
}

// ---- configuration -------------------------------------------------------------------------

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`), usually port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`, the default), usually port 4318.
    HttpProtobuf,
}

/// Head sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// `always_on`.
    AlwaysOn,
    /// `always_off`.
    AlwaysOff,
    /// `traceidratio` with the ratio.
    TraceIdRatio(f64),
    /// `parentbased_always_on` (the default).
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio` with the ratio.
    ParentBasedTraceIdRatio(f64),
}

impl Sampler {
    fn to_sdk(self) -> opentelemetry_sdk::trace::Sampler {
        use opentelemetry_sdk::trace::Sampler as S;
        match self {
            Self::AlwaysOn => S::AlwaysOn,
            Self::AlwaysOff => S::AlwaysOff,
            Self::TraceIdRatio(r) => S::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => S::ParentBased(Box::new(S::AlwaysOn)),
            Self::ParentBasedAlwaysOff => S::ParentBased(Box::new(S::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(r) => S::ParentBased(Box::new(S::TraceIdRatioBased(r))),
        }
    }
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// Full URL spans are sent to (for HTTP, including `/v1/traces`).
    pub endpoint: String,
    /// Transport.
    pub protocol: Protocol,
    /// `service.name`.
    pub service_name: String,
    /// Head sampler.
    pub sampler: Sampler,
    /// Further resource attributes (`OTEL_RESOURCE_ATTRIBUTES`, pod name and namespace).
    pub resource: Vec<(String, String)>,
    /// Export request timeout.
    pub timeout: Duration,
}

/// Variables [`TraceConfig::from_vars`] reads.
pub mod vars {
    /// Base endpoint; `/v1/traces` is appended for HTTP.
    pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Traces endpoint, used as is.
    pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    /// `grpc` or `http/protobuf`.
    pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    /// Traces-only protocol.
    pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
    /// Export timeout in milliseconds.
    pub const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
    /// Traces-only export timeout in milliseconds.
    pub const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
    /// `service.name`.
    pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
    /// `key=value,...` resource attributes (values percent-encoded).
    pub const RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
    /// Sampler name.
    pub const SAMPLER: &str = "OTEL_TRACES_SAMPLER";
    /// Sampler argument (ratio).
    pub const SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    /// `true` turns tracing off.
    pub const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
    /// `otlp` (default) or `none`.
    pub const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
    /// Kubernetes pod name (downward API) → `k8s.pod.name`.
    pub const POD_NAME: &str = "POD_NAME";
    /// Kubernetes namespace (downward API) → `k8s.namespace.name`.
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
}

impl TraceConfig {
    /// Export to `endpoint` (the full traces URL) with the defaults: service `wsgate`,
    /// `parentbased_always_on`, no extra resource attributes.
    pub fn new(endpoint: impl Into<String>, protocol: Protocol) -> Self {
        Self {
            endpoint: endpoint.into(),
            protocol,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            sampler: Sampler::ParentBasedAlwaysOn,
            resource: Vec::new(),
            timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }

    /// The configuration the process environment asks for; `None` when tracing is off (no
    /// endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`).
    ///
    /// # Errors
    ///
    /// [`TelemetryError::InvalidVar`] for an unusable value.
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`TraceConfig::from_env`], reading variables through `get` (tests pass a map).
    ///
    /// # Errors
    ///
    /// [`TelemetryError::InvalidVar`] for an unusable value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        let var = |name: &str| get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if var(vars::SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match var(vars::TRACES_EXPORTER) {
            None => {}
            Some(v) if v.eq_ignore_ascii_case("otlp") => {}
            Some(v) if v.eq_ignore_ascii_case("none") => return Ok(None),
            Some(value) => {
                return Err(TelemetryError::InvalidVar {
                    name: vars::TRACES_EXPORTER,
                    value,
                    reason: "only `otlp` and `none` are supported",
                });
            }
        }
        let (pname, pvalue) = match var(vars::TRACES_PROTOCOL) {
            Some(v) => (vars::TRACES_PROTOCOL, Some(v)),
            None => (vars::PROTOCOL, var(vars::PROTOCOL)),
        };
        let protocol = match pvalue.as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                return Err(TelemetryError::InvalidVar {
                    name: pname,
                    value: other.to_owned(),
                    reason: "expected `grpc` or `http/protobuf`",
                });
            }
        };
        let (ename, endpoint) = if let Some(e) = var(vars::TRACES_ENDPOINT) {
            (vars::TRACES_ENDPOINT, e)
        } else if let Some(e) = var(vars::ENDPOINT) {
            let e = match protocol {
                Protocol::Grpc => e,
                Protocol::HttpProtobuf => format!("{}/v1/traces", e.trim_end_matches('/')),
            };
            (vars::ENDPOINT, e)
        } else {
            return Ok(None);
        };
        let uri: Uri = endpoint.parse().map_err(|_| TelemetryError::InvalidVar {
            name: ename,
            value: endpoint.clone(),
            reason: "not a URL",
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(TelemetryError::InvalidVar {
                name: ename,
                value: endpoint,
                reason: "expected an http:// or https:// URL with a host",
            });
        }
        let timeout = match var(vars::TRACES_TIMEOUT)
            .map(|v| (vars::TRACES_TIMEOUT, v))
            .or_else(|| var(vars::TIMEOUT).map(|v| (vars::TIMEOUT, v)))
        {
            None => DEFAULT_EXPORT_TIMEOUT,
            Some((name, v)) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(TelemetryError::InvalidVar {
                        name,
                        value: v,
                        reason: "expected a positive number of milliseconds",
                    });
                }
            },
        };
        let mut resource = match var(vars::RESOURCE_ATTRIBUTES) {
            Some(v) => parse_resource_attributes(&v).ok_or(TelemetryError::InvalidVar {
                name: vars::RESOURCE_ATTRIBUTES,
                value: v.clone(),
                reason: "expected key=value pairs separated by commas",
            })?,
            None => Vec::new(),
        };
        for (var_name, key) in [
            (vars::POD_NAME, "k8s.pod.name"),
            (vars::POD_NAMESPACE, "k8s.namespace.name"),
        ] {
            if let Some(v) = var(var_name)
                && !resource.iter().any(|(k, _)| k == key)
            {
                resource.push((key.to_owned(), v));
            }
        }
        let service_name = var(vars::SERVICE_NAME)
            .or_else(|| {
                resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        resource.retain(|(k, _)| k != "service.name");
        let sampler = parse_sampler(var(vars::SAMPLER), var(vars::SAMPLER_ARG))?;
        Ok(Some(Self {
            endpoint,
            protocol,
            service_name,
            sampler,
            resource,
            timeout,
        }))
    }
}

fn parse_sampler(name: Option<String>, arg: Option<String>) -> Result<Sampler, TelemetryError> {
    let ratio = || -> Result<f64, TelemetryError> {
        match &arg {
            None => Ok(1.0),
            Some(a) => match a.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(TelemetryError::InvalidVar {
                    name: vars::SAMPLER_ARG,
                    value: a.clone(),
                    reason: "expected a ratio between 0 and 1",
                }),
            },
        }
    };
    Ok(match name.as_deref() {
        None | Some("parentbased_always_on") => Sampler::ParentBasedAlwaysOn,
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::TraceIdRatio(ratio()?),
        Some("parentbased_always_off") => Sampler::ParentBasedAlwaysOff,
        Some("parentbased_traceidratio") => Sampler::ParentBasedTraceIdRatio(ratio()?),
        Some(other) => {
            return Err(TelemetryError::InvalidVar {
                name: vars::SAMPLER,
                value: other.to_owned(),
                reason: "expected always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio",
            });
        }
    })
}

/// `k=v,k2=v2` with percent-encoded values (W3C Baggage octets); `None` when malformed.
fn parse_resource_attributes(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        let k = k.trim();
        if k.is_empty() {
            return None;
        }
        out.push((k.to_owned(), percent_decode(v.trim())?));
    }
    Some(out)
}

/// `%XX` sequences decoded; `None` for a malformed sequence or a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---- the span pipeline ---------------------------------------------------------------------

/// A running span pipeline: tracer provider, batch processor and OTLP exporter.
///
/// Export requests run on the tokio runtime that was current when it started, so
/// [`Tracing::force_flush`] and [`Tracing::shutdown`] block the calling thread until that
/// runtime has sent them: call them from a blocking context (`spawn_blocking`), never from a
/// current-thread runtime's own thread.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Layers made by [`Tracing::layer`]; [`Tracing::shutdown`] takes them off [`ENABLED`].
    layers: AtomicUsize,
}

impl Tracing {
    /// Builds the exporter and the provider. Must run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`TelemetryError::NoRuntime`] outside a runtime, [`TelemetryError::Exporter`] when the
    /// exporter cannot be built.
    pub fn start(cfg: &TraceConfig) -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| TelemetryError::NoRuntime(e.to_string()))?;
        let processor = match cfg.protocol {
            Protocol::HttpProtobuf => {
                let exporter = crate::telemetry_otlp::OtlpHttpExporter::new(
                    ExportClient::new(runtime, cfg.timeout),
                    &cfg.endpoint,
                    cfg.timeout,
                )
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?
                .with_headers(crate::telemetry_otlp::headers_from_env());
                BatchSpanProcessor::builder(exporter).build()
            }
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(cfg.endpoint.clone())
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                    .with_timeout(cfg.timeout);
                if cfg.endpoint.starts_with("https://") {
                    b = b.with_tls_config(
                        opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_enabled_roots(),
                    );
                }
                let exporter = b.build().map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                BatchSpanProcessor::builder(exporter).build()
            }
        };
        let mut attrs: Vec<KeyValue> = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
        attrs.extend(
            cfg.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), Value::from(v.clone()))),
        );
        let resource = Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .with_attributes(attrs)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(cfg.sampler.to_sdk())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("wsgate");
        Ok(Self {
            provider,
            tracer,
            layers: AtomicUsize::new(0),
        })
    }

    /// The layer turning [`SPAN_TARGET`] spans into OpenTelemetry spans. Adding it to a
    /// subscriber turns span creation on in the data plane ([`is_enabled`]).
    pub fn layer<S>(&self) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        self.layers.fetch_add(1, Ordering::Relaxed);
        ENABLED.fetch_add(1, Ordering::Relaxed);
        let otel = tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(Targets::new().with_target(SPAN_TARGET, LevelFilter::TRACE))
            .boxed();
        // Sees nothing (its filter refuses every callsite); found by downcasting.
        let marker = TracerLayer {
            tracer: self.tracer.clone(),
        }
        .with_filter(filter_fn(|_| false))
        .boxed();
        Box::new(vec![otel, marker])
    }

    /// Exports every finished span now (blocking).
    ///
    /// # Errors
    ///
    /// [`TelemetryError::Export`] when the export failed.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        self.provider
            .force_flush()
            .map_err(|e| TelemetryError::Export(e.to_string()))
    }

    /// Flushes and stops the pipeline (blocking); once no other pipeline has a layer out, the
    /// data plane stops creating spans.
    ///
    /// # Errors
    ///
    /// [`TelemetryError::Export`] when the final export failed.
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        let n = self.layers.swap(0, Ordering::Relaxed);
        ENABLED.fetch_sub(n, Ordering::Relaxed);
        self.provider
            .shutdown()
            .map_err(|e| TelemetryError::Export(e.to_string()))
    }
}

type ExportConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// OTLP/HTTP client: the batch processor calls it from its own thread, so each request is
/// spawned onto the gateway's runtime and awaited through its join handle. Each request is
/// bounded by the export timeout and its response body by `MAX_EXPORT_RESPONSE`.
#[derive(Debug)]
pub(crate) struct ExportClient {
    client: Client<ExportConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl ExportClient {
    /// A client running its requests on `runtime`, each bounded by `timeout`.
    pub(crate) fn new(runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
            Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
            // ring supports the default protocol versions; fall back to the process default.
            Err(_) => rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            runtime,
            timeout,
        }
    }
}

impl HttpClient for ExportClient {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let resp = client.request(request.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_EXPORT_RESPONSE).collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(HttpError::from("OTLP export timed out")),
            }
        });
        Box::pin(async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Box::new(e) as HttpError),
            }
        })
    }
}

// ---- logs ----------------------------------------------------------------------------------

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line, event fields flattened.
    Json,
}

type ReloadFn = dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync;

/// Changes the log filter of a running subscriber.
#[derive(Clone)]
pub struct LogHandle {
    reload: Arc<ReloadFn>,
    current: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle").field("current", &self.current()).finish()
    }
}

impl LogHandle {
    /// Replaces the filter with `directives` (EnvFilter syntax, e.g. `info,wsgate=debug`).
    ///
    /// # Errors
    ///
    /// [`TelemetryError::Filter`] when the directives do not parse (the filter is unchanged).
    pub fn set(&self, directives: &str) -> Result<(), TelemetryError> {
        let filter = parse_filter(directives)?;
        (self.reload)(filter).map_err(TelemetryError::Reload)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = directives.to_owned();
        Ok(())
    }

    /// The directives in force.
    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn parse_filter(directives: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map_err(|e| TelemetryError::Filter {
            filter: directives.to_owned(),
            reason: e.to_string(),
        })
}

/// A subscriber writing `format` lines to `writer` under the reloadable `filter`, plus the
/// OpenTelemetry layer when `tracing` is given. Install it with
/// [`tracing::dispatcher::set_global_default`] or, in tests, [`tracing::dispatcher::set_default`].
///
/// # Errors
///
/// [`TelemetryError::Filter`] for a bad filter.
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
    tracing: Option<&Tracing>,
) -> Result<(tracing::Dispatch, LogHandle), TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let (filter_layer, handle) = reload::Layer::<EnvFilter, Registry>::new(parse_filter(filter)?);
    // The log formatter never sees OpenTelemetry spans: they would cost it a field
    // formatting per backend request.
    let fmt_filter = filter_layer.and(filter_fn(|m| m.target() != SPAN_TARGET));
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(writer)
            .with_filter(fmt_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_writer(writer)
            .with_filter(fmt_filter)
            .boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt_layer];
    if let Some(t) = tracing {
        layers.push(t.layer());
    }
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layers));
    let log_handle = LogHandle {
        reload: Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
        current: Arc::new(Mutex::new(filter.to_owned())),
    };
    Ok((dispatch, log_handle))
}

/// Installs the process-wide subscriber (logs to stdout), bridges the `log` crate, and
/// registers its [`LogHandle`] for `PUT /log-level`.
///
/// # Errors
///
/// [`TelemetryError::Filter`] for a bad filter, [`TelemetryError::AlreadyInitialized`] when
/// a global subscriber exists.
pub fn init(format: LogFormat, filter: &str, tracing: Option<&Tracing>) -> Result<LogHandle, TelemetryError> {
    let (dispatch, handle) = subscriber(format, filter, std::io::stdout, tracing)?;
    dispatch.try_init().map_err(|_| TelemetryError::AlreadyInitialized)?;
    set_log_handle(handle.clone());
    Ok(handle)
}

static LOG_HANDLE: Mutex<Option<LogHandle>> = Mutex::new(None);

/// Makes `handle` the one `PUT /log-level` changes.
pub fn set_log_handle(handle: LogHandle) {
    *LOG_HANDLE.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
}

/// The handle `PUT /log-level` changes, if one is registered.
pub fn log_handle() -> Option<LogHandle> {
    LOG_HANDLE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `GET /log-level`: the filter in force.
pub fn get_log_level() -> Response<ResponseBody> {
    match log_handle() {
        Some(h) => text_response(StatusCode::OK, format!("{}\n", h.current())),
        None => text_response(StatusCode::NOT_FOUND, "no reloadable log filter\n"),
    }
}

/// `PUT /log-level` with an EnvFilter string as body: `200` with the new filter, `400` when
/// it does not parse, `404` without a reloadable subscriber, `413` for a body over 4 KiB.
pub async fn put_log_level(req: Request<Incoming>) -> Response<ResponseBody> {
    let Some(handle) = log_handle() else {
        return text_response(StatusCode::NOT_FOUND, "no reloadable log filter\n");
    };
    let body = match Limited::new(req.into_body(), MAX_FILTER_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return text_response(StatusCode::PAYLOAD_TOO_LARGE, "filter over 4096 bytes\n");
        }
        Err(_) => return text_response(StatusCode::BAD_REQUEST, "unreadable body\n"),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return text_response(StatusCode::BAD_REQUEST, "filter is not UTF-8\n");
    };
    let directives = text.trim();
    if directives.is_empty() {
        return text_response(StatusCode::BAD_REQUEST, "empty filter\n");
    }
    match handle.set(directives) {
        Ok(()) => {
            tracing::info!(filter = directives, "log filter changed");
            text_response(StatusCode::OK, format!("{directives}\n"))
        }
        Err(e) => text_response(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

// ---- spans ---------------------------------------------------------------------------------

/// Span attributes are recorded as `i64`: the OpenTelemetry layer turns `u64` fields into
/// strings.
fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// Makes the W3C trace context in `headers` (if valid) the parent of `span`.
fn adopt_remote_parent(span: &Span, headers: &HeaderMap) {
    let cx = propagator().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer sees the span: then there is nothing to link.
        let _ = span.set_parent(cx);
    }
}

/// Writes the W3C trace context of `span` (`traceparent`, `tracestate`) into `headers`,
/// replacing any the client sent. Nothing happens for a span OpenTelemetry does not see.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    inject_span_context(cx.span().span_context(), headers);
}

/// Writes `traceparent` (and `tracestate`, or removes the client's) for `sc`, if valid.
fn inject_span_context(sc: &SpanContext, headers: &mut HeaderMap) {
    if !sc.is_valid() {
        return;
    }
    if let Ok(v) = HeaderValue::from_bytes(&traceparent_value(sc)) {
        headers.insert(TRACEPARENT, v);
    }
    let state = sc.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(v) if !state.is_empty() => {
            headers.insert(TRACESTATE, v);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
}

/// The W3C `traceparent` value of `sc`. Formatted by hand: this runs once per backend request.
fn traceparent_value(sc: &SpanContext) -> [u8; 55] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 55];
    let mut at = 0;
    let mut put = |bytes: &[u8], sep: bool| {
        for b in bytes {
            buf[at] = HEX[usize::from(b >> 4)];
            buf[at + 1] = HEX[usize::from(b & 0x0f)];
            at += 2;
        }
        if sep {
            buf[at] = b'-';
            at += 1;
        }
    };
    put(&[0], true);
    put(&sc.trace_id().to_bytes(), true);
    put(&sc.span_id().to_bytes(), true);
    put(&[sc.trace_flags().to_u8()], false);
    buf
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

fn sampled(sc: &SpanContext) -> Option<u128> {
    (sc.is_valid() && sc.is_sampled()).then(|| u128::from_be_bytes(sc.trace_id().to_bytes()))
}

/// The trace id of a sampled span, for exemplars.
pub fn sampled_trace_id(span: &Span) -> Option<u128> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    sampled(cx.span().span_context())
}

/// The tracer of the pipeline whose layer is in the current subscriber.
fn current_tracer() -> Option<SdkTracer> {
    tracing::dispatcher::get_default(|d| d.downcast_ref::<TracerLayer>().map(|t| t.tracer.clone()))
}

/// Where `backend.request` spans hang: the OpenTelemetry context of a connection's handshake
/// or connection span, and the tracer that makes them. Empty when tracing is off.
#[derive(Clone, Default)]
pub struct SpanParent {
    otel: Option<(SdkTracer, opentelemetry::Context)>,
}

impl std::fmt::Debug for SpanParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanParent")
            .field("traced", &self.otel.is_some())
            .finish()
    }
}

impl SpanParent {
    /// No parent: backend requests are not traced.
    pub fn none() -> Self {
        Self::default()
    }

    fn of(span: &Span, tracer: Option<&SdkTracer>) -> Self {
        let Some(tracer) = tracer else { return Self::none() };
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return Self::none();
        }
        Self {
            otel: Some((tracer.clone(), cx)),
        }
    }
}

/// The `backend.request` span of one backend request, made directly with the SDK tracer (no
/// `tracing` span: this is the per-message span, and the direct path costs a fraction). Ends
/// when finished or dropped.
pub struct RequestSpan(Option<opentelemetry_sdk::trace::Span>);

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RequestSpan").field(&self.0.is_some()).finish()
    }
}

impl RequestSpan {
    /// Starts the span under `parent` (nothing when `parent` is empty) with the request's
    /// event count, body size and retry attempt.
    #[inline]
    pub fn start(parent: &SpanParent, req: &BackendRequest) -> Self {
        let Some((tracer, cx)) = &parent.otel else {
            return Self(None);
        };
        let builder = tracer
            .span_builder("backend.request")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("wsgate.events", int(req.events)),
                KeyValue::new("wsgate.bytes", int(req.body.len())),
                KeyValue::new("wsgate.attempt", i64::from(req.attempt)),
            ]);
        Self(Some(tracer.build_with_context(builder, cx)))
    }

    /// True when the span exists (tracing is on and the request is traced).
    #[inline]
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// Writes the span's `traceparent` (and `tracestate` when it has one) as HTTP/1.1 header
    /// lines; nothing for an empty or invalid span.
    pub fn write_http1(&self, out: &mut bytes::BytesMut) {
        let Some(span) = &self.0 else { return };
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(&traceparent_value(sc));
        out.extend_from_slice(b"\r\n");
        let state = sc.trace_state().header();
        if !state.is_empty() && HeaderValue::from_str(&state).is_ok() {
            out.extend_from_slice(b"tracestate: ");
            out.extend_from_slice(state.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Writes the span's `traceparent` into a backend request's headers.
    #[inline]
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(span) = &self.0 {
            inject_span_context(span.span_context(), headers);
        }
    }

    /// Records the outcome, ends the span and returns its trace id when sampled (for the
    /// latency exemplar).
    pub fn finish(self, res: &Result<BackendResponse, BackendError>) -> Option<u128> {
        let mut span = self.0?;
        match res {
            Ok(r) => {
                span.set_attribute(KeyValue::new("http.response.status_code", i64::from(r.status.as_u16())));
                if !r.status.is_success() {
                    span.set_attribute(KeyValue::new("error.type", r.status.as_str().to_owned()));
                    span.set_status(Status::error("backend answered with an error status"));
                }
            }
            Err(e) => {
                let kind = crate::metrics::BackendErrorKind::of(e).label();
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(kind));
            }
        }
        let trace_id = sampled(span.span_context());
        span.end();
        trace_id
    }
}

/// Marks a pipeline's layer in a subscriber so the data plane can find its tracer.
struct TracerLayer {
    tracer: SdkTracer,
}

impl<S: tracing::Subscriber> Layer<S> for TracerLayer {}

/// How a handshake ended, for the `wsgate.outcome` attribute (and the handshake metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// `101`.
    Accepted,
    /// The backend refused the connection.
    Rejected,
    /// The backend was unreachable or answered badly (`502`/`504`).
    Failed,
    /// A connection limit refused it (`503`).
    OverLimit,
    /// The client left before its `101`.
    ClientGone,
}

impl HandshakeOutcome {
    /// The attribute value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::OverLimit => "over_limit",
            Self::ClientGone => "client_gone",
        }
    }
}

/// The spans of one WebSocket connection: `ws.connection` for its whole life and its child
/// `ws.handshake` until the `101` (or the refusal). Both are disabled (free) when tracing is
/// off.
#[derive(Debug)]
pub struct ConnectionSpans {
    /// `ws.connection`: parent of the backend requests after the handshake.
    pub connection: Span,
    /// `ws.handshake`: parent of the OPEN requests; disabled once the handshake ended.
    pub handshake: Span,
    tracer: Option<SdkTracer>,
}

impl ConnectionSpans {
    /// Starts both spans, with the handshake request's `traceparent` (if any) as parent.
    pub fn start(route: &str, path: &str, headers: &HeaderMap) -> Self {
        if !is_enabled() {
            return Self::disabled();
        }
        let connection = tracing::info_span!(
            target: SPAN_TARGET,
            "ws.connection",
            otel.kind = "server",
            wsgate.route = route,
            url.path = path,
            wsgate.connection_id = Empty,
            wsgate.close_code = Empty,
            wsgate.client_messages = Empty,
            wsgate.backend_messages = Empty,
        );
        adopt_remote_parent(&connection, headers);
        let handshake = tracing::info_span!(
            target: SPAN_TARGET,
            parent: &connection,
            "ws.handshake",
            wsgate.route = route,
            wsgate.connection_id = Empty,
            wsgate.outcome = Empty,
            http.response.status_code = Empty,
            otel.status_code = Empty,
        );
        Self {
            connection,
            handshake,
            tracer: current_tracer(),
        }
    }

    /// Spans that record nothing.
    pub fn disabled() -> Self {
        Self {
            connection: Span::none(),
            handshake: Span::none(),
            tracer: None,
        }
    }

    /// Parent for the backend requests of the handshake (OPEN).
    pub fn handshake_parent(&self) -> SpanParent {
        SpanParent::of(&self.handshake, self.tracer.as_ref())
    }

    /// Parent for the backend requests after the handshake.
    pub fn connection_parent(&self) -> SpanParent {
        SpanParent::of(&self.connection, self.tracer.as_ref())
    }

    /// Records the Connection-Id on both spans.
    pub fn set_connection_id(&self, id: &str) {
        self.connection.record("wsgate.connection_id", id);
        self.handshake.record("wsgate.connection_id", id);
    }

    /// Records how the handshake ended and ends its span.
    pub fn finish_handshake(&mut self, outcome: HandshakeOutcome, status: StatusCode) {
        self.handshake.record("wsgate.outcome", outcome.label());
        self.handshake
            .record("http.response.status_code", i64::from(status.as_u16()));
        if outcome == HandshakeOutcome::Failed {
            self.handshake.record("otel.status_code", "ERROR");
        }
        self.handshake = Span::none();
    }

    /// Records the end of the connection on `ws.connection` (the span ends when dropped).
    pub fn finish_connection(&self, close_code: Option<u16>, client_messages: u64, backend_messages: u64) {
        if let Some(code) = close_code {
            self.connection.record("wsgate.close_code", i64::from(code));
        }
        self.connection.record("wsgate.client_messages", int(client_messages));
        self.connection.record("wsgate.backend_messages", int(backend_messages));
    }
}

/// An `http.proxy` span for a plain HTTP pass-through request (child of its `traceparent`);
/// disabled when tracing is off. Inject it into the backend request with [`inject`].
pub fn proxy_span(route: &str, method: &Method, uri: &Uri, headers: &HeaderMap) -> Span {
    if !is_enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "http.proxy",
        otel.kind = "server",
        wsgate.route = route,
        http.request.method = method.as_str(),
        url.path = uri.path(),
        http.response.status_code = Empty,
        error.type = Empty,
        otel.status_code = Empty,
    );
    adopt_remote_parent(&span, headers);
    span
}

/// Records the status a pass-through request ended with (from the backend or the gateway).
pub fn record_proxy_status(span: &Span, status: StatusCode, error: Option<&'static str>) {
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if let Some(e) = error {
        span.record("error.type", e);
        span.record("otel.status_code", "ERROR");
    }
}

/// A `publish` span for a publish request (child of its `traceparent`); disabled when tracing
/// is off. Run the handler inside it and call [`record_publish`] once the items are delivered.
pub fn publish_span(headers: &HeaderMap) -> Span {
    if !is_enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "publish",
        otel.kind = "server",
        wsgate.items = Empty,
        wsgate.deliveries = Empty,
    );
    adopt_remote_parent(&span, headers);
    span
}

/// Records item and delivery counts on `span` (a [`publish_span`]).
pub fn record_publish(span: &Span, items: usize, deliveries: usize) {
    span.record("wsgate.items", int(items));
    span.record("wsgate.deliveries", int(deliveries));
}

/// A `controller.reconcile` span for one object; disabled when tracing is off. Instrument
/// the reconcile future with it and record `error.type` on failure.
pub fn reconcile_span(kind: &str, namespace: &str, name: &str) -> Span {
    if !is_enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: SPAN_TARGET,
        "controller.reconcile",
        k8s.resource.kind = kind,
        k8s.namespace.name = namespace,
        k8s.resource.name = name,
        error.type = Empty,
        otel.status_code = Empty,
    )
}

/// Header names never written to logs; a `Debug` of client headers must go through
/// [`redacted_headers`].
pub const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "cookie",
    "grip-sig",
    "proxy-authorization",
    "set-cookie",
];

/// A copy of `headers` with secret values replaced by `<redacted>`, for debug logs.
pub fn redacted_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in SECRET_HEADERS {
        if out.contains_key(name) {
            let n = out.get_all(name).iter().count();
            out.remove(name);
            for _ in 0..n {
                out.append(
                    header::HeaderName::from_static(name),
                    header::HeaderValue::from_static("<redacted>"),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<Option<TraceConfig>, TelemetryError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        TraceConfig::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn off_without_endpoint_or_when_disabled() {
        assert_eq!(from(&[]), Ok(None));
        assert_eq!(from(&[(vars::SERVICE_NAME, "x")]), Ok(None));
        assert_eq!(
            from(&[(vars::ENDPOINT, "http://c:4318"), (vars::SDK_DISABLED, "true")]),
            Ok(None)
        );
        assert_eq!(
            from(&[(vars::ENDPOINT, "http://c:4318"), (vars::TRACES_EXPORTER, "none")]),
            Ok(None)
        );
        assert_eq!(from(&[(vars::ENDPOINT, "  ")]), Ok(None));
    }

    #[test]
    fn http_endpoint_gets_the_traces_path_grpc_does_not() {
        let c = from(&[(vars::ENDPOINT, "http://collector:4318/")])
            .expect("ok")
            .expect("on");
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        let c = from(&[(vars::ENDPOINT, "http://collector:4317"), (vars::PROTOCOL, "grpc")])
            .expect("ok")
            .expect("on");
        assert_eq!(c.endpoint, "http://collector:4317");
        assert_eq!(c.protocol, Protocol::Grpc);
        let c = from(&[
            (vars::ENDPOINT, "http://ignored:1"),
            (vars::TRACES_ENDPOINT, "https://t:443/custom"),
        ])
        .expect("ok")
        .expect("on");
        assert_eq!(c.endpoint, "https://t:443/custom");
    }

    #[test]
    fn resource_service_name_and_pod_attributes() {
        let c = from(&[
            (vars::ENDPOINT, "http://c:4318"),
            (
                vars::RESOURCE_ATTRIBUTES,
                "deployment.environment=prod, team=a%2Cb,service.name=fromattrs",
            ),
            (vars::POD_NAME, "wsgate-0"),
            (vars::POD_NAMESPACE, "edge"),
        ])
        .expect("ok")
        .expect("on");
        assert_eq!(c.service_name, "fromattrs");
        assert_eq!(
            c.resource,
            vec![
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "a,b".to_owned()),
                ("k8s.pod.name".to_owned(), "wsgate-0".to_owned()),
                ("k8s.namespace.name".to_owned(), "edge".to_owned()),
            ]
        );
        let c = from(&[
            (vars::ENDPOINT, "http://c:4318"),
            (vars::SERVICE_NAME, "gw"),
            (vars::RESOURCE_ATTRIBUTES, "k8s.pod.name=explicit"),
            (vars::POD_NAME, "ignored"),
        ])
        .expect("ok")
        .expect("on");
        assert_eq!(c.service_name, "gw");
        assert_eq!(c.resource, vec![("k8s.pod.name".to_owned(), "explicit".to_owned())]);
    }

    #[test]
    fn samplers() {
        let s = |name: &str, arg: Option<&str>| {
            let mut v = vec![(vars::ENDPOINT, "http://c:4318"), (vars::SAMPLER, name)];
            if let Some(a) = arg {
                v.push((vars::SAMPLER_ARG, a));
            }
            from(&v).map(|c| c.expect("on").sampler)
        };
        assert_eq!(s("always_on", None), Ok(Sampler::AlwaysOn));
        assert_eq!(
            s("parentbased_traceidratio", Some("0.25")),
            Ok(Sampler::ParentBasedTraceIdRatio(0.25))
        );
        assert_eq!(s("traceidratio", None), Ok(Sampler::TraceIdRatio(1.0)));
        assert!(matches!(
            s("traceidratio", Some("2")),
            Err(TelemetryError::InvalidVar {
                name: vars::SAMPLER_ARG,
                ..
            })
        ));
        assert!(matches!(
            s("jaeger_remote", None),
            Err(TelemetryError::InvalidVar {
                name: vars::SAMPLER,
                ..
            })
        ));
        let c = from(&[(vars::ENDPOINT, "http://c:4318")]).expect("ok").expect("on");
        assert_eq!(c.sampler, Sampler::ParentBasedAlwaysOn);
        assert_eq!(c.service_name, DEFAULT_SERVICE_NAME);
        assert_eq!(c.timeout, DEFAULT_EXPORT_TIMEOUT);
    }

    #[test]
    fn bad_values_are_named() {
        assert!(matches!(
            from(&[(vars::ENDPOINT, "collector:4318")]),
            Err(TelemetryError::InvalidVar {
                name: vars::ENDPOINT,
                ..
            })
        ));
        assert!(matches!(
            from(&[(vars::ENDPOINT, "http://c:4318"), (vars::PROTOCOL, "http/json")]),
            Err(TelemetryError::InvalidVar {
                name: vars::PROTOCOL,
                ..
            })
        ));
        assert!(matches!(
            from(&[(vars::ENDPOINT, "http://c:4318"), (vars::TIMEOUT, "soon")]),
            Err(TelemetryError::InvalidVar {
                name: vars::TIMEOUT,
                ..
            })
        ));
        assert!(matches!(
            from(&[
                (vars::ENDPOINT, "http://c:4318"),
                (vars::RESOURCE_ATTRIBUTES, "novalue")
            ]),
            Err(TelemetryError::InvalidVar {
                name: vars::RESOURCE_ATTRIBUTES,
                ..
            })
        ));
        assert!(matches!(
            from(&[(vars::ENDPOINT, "http://c:4318"), (vars::RESOURCE_ATTRIBUTES, "k=%zz")]),
            Err(TelemetryError::InvalidVar { .. })
        ));
        let c = from(&[(vars::ENDPOINT, "http://c:4318"), (vars::TRACES_TIMEOUT, "2500")])
            .expect("ok")
            .expect("on");
        assert_eq!(c.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn the_pipeline_needs_a_runtime() {
        let cfg = TraceConfig::new("http://127.0.0.1:4318/v1/traces", Protocol::HttpProtobuf);
        assert!(matches!(Tracing::start(&cfg), Err(TelemetryError::NoRuntime(_))));
    }

    #[tokio::test]
    async fn both_transports_build_without_connecting() {
        for (endpoint, protocol) in [
            ("http://127.0.0.1:9/v1/traces", Protocol::HttpProtobuf),
            ("http://127.0.0.1:9", Protocol::Grpc),
            ("https://collector.invalid:4317", Protocol::Grpc),
        ] {
            let t = Tracing::start(&TraceConfig::new(endpoint, protocol)).expect("pipeline");
            // Nothing was recorded, so shutting down exports nothing and cannot fail on the
            // unreachable endpoint.
            tokio::task::spawn_blocking(move || t.provider.shutdown())
                .await
                .expect("join")
                .expect("shutdown");
        }
    }

    #[test]
    fn redaction_keeps_names_and_hides_values() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer s3cret".parse().expect("value"));
        h.append("cookie", "a=1".parse().expect("value"));
        h.append("cookie", "b=2".parse().expect("value"));
        h.insert("x-ok", "visible".parse().expect("value"));
        let r = redacted_headers(&h);
        let text = format!("{r:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("a=1") && !text.contains("b=2"),
            "{text}"
        );
        assert!(text.contains("visible"));
        assert_eq!(r.get_all("cookie").iter().count(), 2);
    }

    #[test]
    fn log_handle_swaps_the_filter_and_refuses_garbage() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let (dispatch, handle) = subscriber(LogFormat::Json, "warn", move || w.clone(), None).expect("subscriber");
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(marker = "one", "hidden at warn");
            handle.set("info").expect("valid filter");
            tracing::info!(marker = "two", "shown at info");
            assert!(matches!(handle.set("info,[bad"), Err(TelemetryError::Filter { .. })));
            tracing::info!(marker = "three", "still info");
        });
        let out = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
        assert!(!out.contains("\"one\""), "{out}");
        assert!(out.contains("\"two\"") && out.contains("\"three\""), "{out}");
        assert_eq!(handle.current(), "info");
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
            assert!(v.get("marker").is_some(), "fields are flattened: {line}");
        }
    }
}
