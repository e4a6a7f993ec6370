//! Observability end to end: OTLP span export into an in-test OTLP/HTTP receiver, W3C
//! `traceparent` propagation to the backend, `/metrics` after a known workload (parsed as
//! OpenMetrics and Prometheus text), secret-free debug logs, and runtime log level changes.
//!
//! Tests that install a `tracing` subscriber use a current-thread runtime and
//! `tracing::dispatcher::set_default`, so the gateway's tasks (all on the test thread) log and
//! trace into it without touching the process-wide subscriber or any environment variable.

#[path = "support/scenarios.rs"]
mod scenarios;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue, PrometheusType, PrometheusValue};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use prost::Message as _;
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use wsgate::telemetry::{self, LogFormat, Protocol, TraceConfig, Tracing};

// ---------------------------------------------------------------------------------------------
// An OTLP/HTTP receiver
// ---------------------------------------------------------------------------------------------

/// Spans received on `POST /v1/traces` (protobuf), with their resource attributes.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ProtoSpan>>>,
    resources: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let resources = Arc::new(Mutex::new(Vec::new()));
        let (s2, r2) = (spans.clone(), resources.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s3, r3) = (s2.clone(), r2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s4, r4) = (s3.clone(), r3.clone());
                        async move {
                            let ok = req.method() == http::Method::POST
                                && req.uri().path() == "/v1/traces"
                                && req
                                    .headers()
                                    .get("content-type")
                                    .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let status = match ExportTraceServiceRequest::decode(body) {
                                Ok(export) if ok => {
                                    for rs in export.resource_spans {
                                        let attrs = rs
                                            .resource
                                            .map(|r| {
                                                r.attributes
                                                    .into_iter()
                                                    .filter_map(|kv| match kv.value.and_then(|v| v.value) {
                                                        Some(AnyValue::StringValue(s)) => Some((kv.key, s)),
                                                        _ => None,
                                                    })
                                                    .collect()
                                            })
                                            .unwrap_or_default();
                                        r4.lock().expect("lock").push(attrs);
                                        for ss in rs.scope_spans {
                                            s4.lock().expect("lock").extend(ss.spans);
                                        }
                                    }
                                    StatusCode::OK
                                }
                                _ => StatusCode::BAD_REQUEST,
                            };
                            let mut resp = Response::new(Full::new(Bytes::from(
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )));
                            *resp.status_mut() = status;
                            resp.headers_mut()
                                .insert("content-type", http::HeaderValue::from_static("application/x-protobuf"));
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, spans, resources }
    }

    fn spans(&self) -> Vec<ProtoSpan> {
        self.spans.lock().expect("lock").clone()
    }
}

/// Flushes the pipeline from a blocking thread: the export itself runs on this test's runtime.
async fn flush(tracing: &Arc<Tracing>) {
    let t = tracing.clone();
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .expect("flush task")
        .expect("flush");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(s: &'a ProtoSpan, key: &str) -> Option<&'a AnyValue> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn attr_str(s: &ProtoSpan, key: &str) -> String {
    match attr(s, key) {
        Some(AnyValue::StringValue(v)) => v.clone(),
        other => panic!("span {} attribute {key}: expected a string, got {other:?}", s.name),
    }
}

fn attr_int(s: &ProtoSpan, key: &str) -> i64 {
    match attr(s, key) {
        Some(AnyValue::IntValue(v)) => *v,
        other => panic!("span {} attribute {key}: expected an int, got {other:?}", s.name),
    }
}

fn one<'a>(spans: &'a [ProtoSpan], name: &str) -> &'a ProtoSpan {
    let found: Vec<&ProtoSpan> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "exactly one {name} span; got {:#?}", names(spans));
    found[0]
}

fn names(spans: &[ProtoSpan]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// `(trace id, parent span id)` of a `traceparent` value.
fn parse_traceparent(v: &str) -> (String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v:?}");
    assert_eq!(parts[0], "00", "traceparent version");
    (parts[1].to_owned(), parts[2].to_owned())
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

const SPAN_KIND_INTERNAL: i32 = 1;
const SPAN_KIND_SERVER: i32 = 2;
const SPAN_KIND_CLIENT: i32 = 3;

#[tokio::test(flavor = "current_thread")]
async fn spans_follow_the_connection_and_the_backend_joins_the_trace() {
    let collector = Collector::start().await;
    let mut cfg = TraceConfig::new(format!("http://{}/v1/traces", collector.addr), Protocol::HttpProtobuf);
    cfg.service_name = "wsgate-test".into();
    cfg.resource = vec![("k8s.pod.name".into(), "wsgate-0".into())];
    let tracing = Arc::new(Tracing::start(&cfg).expect("tracer"));
    let (dispatch, _logs) =
        telemetry::subscriber(LogFormat::Text, "off", std::io::sink, Some(&tracing)).expect("subscriber");
    let _guard = tracing::dispatcher::set_default(&dispatch);
    assert!(telemetry::is_enabled());

    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;

    // A WebSocket exchange whose handshake continues the client's trace.
    let mut req = gw.ws_url("/chat").into_client_request().expect("request");
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01");
    req.headers_mut()
        .insert("traceparent", traceparent.parse().expect("header"));
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut client = Client { ws };
    client.send_text("hello").await;
    client.expect_text("hello").await;
    client.send(WsMessage::Close(None)).await;
    client.expect_close().await;
    gw.gw.wait_idle().await;

    // A pass-through request continues its own trace.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let (status, _, _) = http_request(
        gw.addr,
        "GET",
        "/plain?x=1",
        &[("traceparent", &format!("00-{other_trace}-b7ad6b7169203331-01"))],
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    flush(&tracing).await;
    let spans = collector.spans();

    // ws.connection: child of the client's span, in the client's trace.
    let conn = one(&spans, "ws.connection");
    assert_eq!(
        hex(&conn.trace_id),
        TRACE_ID,
        "the handshake continues the incoming trace"
    );
    assert_eq!(hex(&conn.parent_span_id), CLIENT_SPAN_ID);
    assert_eq!(conn.kind, SPAN_KIND_SERVER);
    assert_eq!(attr_str(conn, "wsgate.route"), "default");
    assert_eq!(attr_str(conn, "url.path"), "/chat");
    let requests = backend.requests();
    let conn_id = requests[0].connection_id();
    assert_eq!(attr_str(conn, "wsgate.connection_id"), conn_id);
    assert_eq!(attr_int(conn, "wsgate.close_code"), 1005);
    assert_eq!(attr_int(conn, "wsgate.client_messages"), 1);
    assert_eq!(attr_int(conn, "wsgate.backend_messages"), 1);

    // ws.handshake: child of ws.connection.
    let hs = one(&spans, "ws.handshake");
    assert_eq!(hex(&hs.trace_id), TRACE_ID);
    assert_eq!(hs.parent_span_id, conn.span_id);
    assert_eq!(hs.kind, SPAN_KIND_INTERNAL);
    assert_eq!(attr_str(hs, "wsgate.outcome"), "accepted");
    assert_eq!(attr_int(hs, "http.response.status_code"), 101);
    assert_eq!(attr_str(hs, "wsgate.connection_id"), conn_id);

    // One backend.request per request the backend saw, each carrying its own span's context.
    let backend_spans: Vec<&ProtoSpan> = spans
        .iter()
        .filter(|s| s.name == "backend.request" && hex(&s.trace_id) == TRACE_ID)
        .collect();
    let ws_requests: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.header("connection-id").is_some())
        .collect();
    assert_eq!(ws_requests.len(), 3, "OPEN, TEXT, CLOSE");
    assert_eq!(backend_spans.len(), ws_requests.len(), "{:#?}", names(&spans));
    for (i, r) in ws_requests.iter().enumerate() {
        let tp = r.header("traceparent").expect("traceparent on every backend request");
        let (trace, parent) = parse_traceparent(tp);
        assert_eq!(trace, TRACE_ID, "the backend joins the client's trace");
        let span = backend_spans
            .iter()
            .find(|s| hex(&s.span_id) == parent)
            .unwrap_or_else(|| panic!("request {i}: traceparent {tp} names no backend.request span"));
        assert_eq!(span.kind, SPAN_KIND_CLIENT);
        assert_eq!(attr_int(span, "wsgate.bytes"), r.body.len() as i64);
        assert_eq!(attr_int(span, "wsgate.events"), r.events().len() as i64);
        assert_eq!(attr_int(span, "wsgate.attempt"), 0);
        assert_eq!(attr_int(span, "http.response.status_code"), 200);
        // OPEN belongs to the handshake; later requests to the connection.
        let want_parent = if i == 0 { &hs.span_id } else { &conn.span_id };
        assert_eq!(&span.parent_span_id, want_parent, "request {i} parent");
    }

    // http.proxy: child of the pass-through request's traceparent, and its context reaches the
    // backend in place of the client's.
    let proxy = one(&spans, "http.proxy");
    assert_eq!(hex(&proxy.trace_id), other_trace);
    assert_eq!(hex(&proxy.parent_span_id), "b7ad6b7169203331");
    assert_eq!(attr_str(proxy, "http.request.method"), "GET");
    assert_eq!(attr_str(proxy, "url.path"), "/plain");
    assert_eq!(attr_int(proxy, "http.response.status_code"), 200);
    let plain = requests
        .iter()
        .find(|r| r.uri.path() == "/plain")
        .expect("pass-through reached the backend");
    let (trace, parent) = parse_traceparent(plain.header("traceparent").expect("traceparent"));
    assert_eq!(trace, other_trace);
    assert_eq!(parent, hex(&proxy.span_id));

    // Resource: service name, version and the pod.
    let res = collector.resources.lock().expect("lock")[0].clone();
    assert_eq!(res.get("service.name").map(String::as_str), Some("wsgate-test"));
    assert_eq!(res.get("k8s.pod.name").map(String::as_str), Some("wsgate-0"));
    assert_eq!(
        res.get("service.version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );

    // The latency histogram carries the trace id as exemplar (OpenMetrics only).
    let (status, headers, body) = http_request(
        gw.admin,
        "GET",
        "/metrics",
        &[("accept", "application/openmetrics-text; version=1.0.0")],
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], wsgate::metrics::OPENMETRICS_CONTENT_TYPE);
    let text = String::from_utf8(body.to_vec()).expect("utf8");
    let om = parse_om(&text);
    let hist = &om.families["wsgate_backend_request_duration_seconds"];
    let exemplar_traces: Vec<String> = hist
        .iter_samples()
        .filter_map(|s| match &s.value {
            OpenMetricsValue::Histogram(h) => Some(h.buckets.clone()),
            _ => None,
        })
        .flatten()
        .filter_map(|b| b.exemplar.and_then(|e| e.labels.get("trace_id").cloned()))
        .collect();
    assert!(
        exemplar_traces.iter().any(|t| t == TRACE_ID),
        "exemplars {exemplar_traces:?} in\n{text}"
    );

    let t = tracing.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}

#[tokio::test(flavor = "current_thread")]
async fn rejected_and_over_limit_handshakes_record_their_outcome() {
    let collector = Collector::start().await;
    let tracing = Arc::new(
        Tracing::start(&TraceConfig::new(
            format!("http://{}/v1/traces", collector.addr),
            Protocol::HttpProtobuf,
        ))
        .expect("tracer"),
    );
    let (dispatch, _logs) =
        telemetry::subscriber(LogFormat::Text, "off", std::io::sink, Some(&tracing)).expect("subscriber");
    let _guard = tracing::dispatcher::set_default(&dispatch);
    let backend = Backend::start(|r| {
        if r.uri.path() == "/deny" {
            Reply::status(403, "no")
        } else {
            echo_reply(r)
        }
    })
    .await;
    let yaml = format!(
        "routes:\n  - name: capped\n    backend: {{url: \"{}\"}}\n    limits: {{maxConnections: 1}}\n",
        backend.url()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let (status, _, _) = http_request(gw.addr, "GET", "/deny", &upgrade_headers(), b"").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let _first = gw.connect("/ok").await;
    let (status, _, _) = http_request(gw.addr, "GET", "/ok", &upgrade_headers(), b"").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    flush(&tracing).await;
    let spans = collector.spans();
    let outcomes: Vec<(String, i64)> = spans
        .iter()
        .filter(|s| s.name == "ws.handshake")
        .map(|s| (attr_str(s, "wsgate.outcome"), attr_int(s, "http.response.status_code")))
        .collect();
    assert!(outcomes.contains(&("rejected".into(), 403)), "{outcomes:?}");
    assert!(outcomes.contains(&("over_limit".into(), 503)), "{outcomes:?}");
    assert!(outcomes.contains(&("accepted".into(), 101)), "{outcomes:?}");
    let denied_open = spans
        .iter()
        .find(|s| {
            s.name == "backend.request" && matches!(attr(s, "http.response.status_code"), Some(AnyValue::IntValue(403)))
        })
        .expect("the refused OPEN has a span");
    assert_eq!(attr_str(denied_open, "error.type"), "403");
    let t = tracing.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

fn parse_om(text: &str) -> MetricsExposition<OpenMetricsType, OpenMetricsValue> {
    openmetrics_parser::openmetrics::parse_openmetrics(text)
        .unwrap_or_else(|e| panic!("invalid OpenMetrics exposition: {e:?}\n{text}"))
}

fn parse_prom(text: &str) -> MetricsExposition<PrometheusType, PrometheusValue> {
    openmetrics_parser::prometheus::parse_prometheus(text)
        .unwrap_or_else(|e| panic!("invalid Prometheus exposition: {e:?}\n{text}"))
}

/// The value of one OpenMetrics counter or gauge sample.
fn om_value(e: &MetricsExposition<OpenMetricsType, OpenMetricsValue>, family: &str, labels: &[(&str, &str)]) -> f64 {
    let f = e.families.get(family).unwrap_or_else(|| panic!("no family {family}"));
    let want: HashMap<&str, &str> = labels.iter().copied().collect();
    let names = f.get_label_names();
    for s in f.iter_samples() {
        let ls = s.get_labelset().expect("labels");
        if names.len() == want.len() && want.iter().all(|(k, v)| ls.get_label_value(k) == Some(*v)) {
            return match &s.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Gauge(g) => g.as_f64(),
                other => panic!("{family}: unexpected value {other:?}"),
            };
        }
    }
    panic!("{family}{labels:?}: no such sample")
}

fn om_histogram(
    e: &MetricsExposition<OpenMetricsType, OpenMetricsValue>,
    family: &str,
    route: &str,
) -> openmetrics_parser::HistogramValue {
    let f = &e.families[family];
    f.iter_samples()
        .find(|s| s.get_labelset().expect("labels").get_label_value("route") == Some(route))
        .and_then(|s| match &s.value {
            OpenMetricsValue::Histogram(h) => Some(h.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{family}{{route={route}}}: no histogram"))
}

/// A sample's family, labels and value.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

async fn scrape(gw: &TestGateway, accept: &str) -> (http::HeaderMap, String) {
    let (status, headers, body) = http_request(gw.admin, "GET", "/metrics", &[("accept", accept)], b"").await;
    assert_eq!(status, StatusCode::OK);
    (headers, String::from_utf8(body.to_vec()).expect("utf8"))
}

#[tokio::test]
async fn metrics_count_a_known_workload_exactly() {
    const CONNECTIONS: usize = 3;
    const MESSAGES: usize = 4;
    let backend = Backend::start(|r| {
        if r.uri.path() == "/reject" {
            Reply::status(403, "go away")
        } else {
            echo_reply(r)
        }
    })
    .await;
    let gw = TestGateway::start(&backend.url()).await;

    let mut sent_bytes = 0usize;
    for c in 0..CONNECTIONS {
        let mut client = gw.connect("/echo").await;
        for m in 0..MESSAGES {
            // One at a time, so that each message is its own backend request.
            let text = format!("conn {c} message {m}{}", "x".repeat(c * 10 + m));
            sent_bytes += text.len();
            client.send_text(&text).await;
            client.expect_text(&text).await;
        }
        if c == 0 {
            client
                .send(WsMessage::Binary(Bytes::from_static(b"\x00\x01\x02")))
                .await;
            match client.next_data().await {
                WsMessage::Binary(b) => assert_eq!(&b[..], b"\x00\x01\x02"),
                other => panic!("expected the binary echo, got {other:?}"),
            }
            sent_bytes += 3;
        }
        client.send(WsMessage::Close(None)).await;
        client.expect_close().await;
    }
    let (status, _, _) = http_request(gw.addr, "GET", "/reject", &upgrade_headers(), b"").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    gw.gw.wait_idle().await;
    let backend_requests = backend.requests().len();

    let (headers, om_text) = scrape(&gw, "application/openmetrics-text;version=1.0.0,text/plain;q=0.5").await;
    assert_eq!(headers["content-type"], wsgate::metrics::OPENMETRICS_CONTENT_TYPE);
    let om = parse_om(&om_text);
    let data_messages = (CONNECTIONS * MESSAGES + 1) as f64;
    let checks: &[Expected] = &[
        ("wsgate_handshakes", &[("outcome", "accepted")], CONNECTIONS as f64),
        ("wsgate_handshakes", &[("outcome", "rejected")], 1.0),
        ("wsgate_handshakes", &[("outcome", "failed")], 0.0),
        ("wsgate_handshakes", &[("outcome", "over_limit")], 0.0),
        (
            "wsgate_messages",
            &[("route", "default"), ("direction", "client_to_backend")],
            data_messages,
        ),
        (
            "wsgate_messages",
            &[("route", "default"), ("direction", "backend_to_client")],
            data_messages,
        ),
        (
            "wsgate_message_bytes",
            &[("route", "default"), ("direction", "client_to_backend")],
            sent_bytes as f64,
        ),
        (
            "wsgate_message_bytes",
            &[("route", "default"), ("direction", "backend_to_client")],
            sent_bytes as f64,
        ),
        (
            "wsgate_backend_errors",
            &[("route", "default"), ("kind", "status")],
            1.0,
        ),
        (
            "wsgate_backend_errors",
            &[("route", "default"), ("kind", "connect")],
            0.0,
        ),
        (
            "wsgate_backend_errors",
            &[("route", "default"), ("kind", "timeout")],
            0.0,
        ),
        ("wsgate_backend_retries", &[("route", "default")], 0.0),
        ("wsgate_keepalives", &[("route", "default")], 0.0),
        ("wsgate_open_connections", &[("route", "default")], 0.0),
        ("wsgate_http_requests", &[], 0.0),
        ("wsgate_publishes", &[], 0.0),
        ("wsgate_deliveries", &[], 0.0),
        ("wsgate_slow_consumer_drops", &[], 0.0),
        ("wsgate_subscriptions", &[], 0.0),
        // A static table (no routes file, no controller): generation 1, always up.
        ("wsgate_config_version", &[], 1.0),
        ("wsgate_config_info", &[("version", "1"), ("source", "static")], 1.0),
        ("wsgate_config_source_up", &[], 1.0),
        ("wsgate_config_reload_failures", &[], 0.0),
        ("wsgate_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0),
    ];
    for (family, labels, want) in checks {
        assert_eq!(om_value(&om, family, labels), *want, "{family}{labels:?}\n{om_text}");
    }
    // Every request the backend saw was timed: OPEN + one per message + CLOSE per connection,
    // and the refused OPEN.
    assert_eq!(backend_requests, CONNECTIONS * (MESSAGES + 2) + 1 + 1);
    let hist = om_histogram(&om, "wsgate_backend_request_duration_seconds", "default");
    assert_eq!(hist.count, Some(backend_requests as u64));
    let inf = hist
        .buckets
        .iter()
        .find(|b| b.upper_bound.is_infinite())
        .expect("+Inf bucket");
    assert_eq!(inf.count.as_f64(), backend_requests as f64);
    assert!(hist.sum.expect("sum").as_f64() > 0.0);
    assert!(
        hist.buckets.iter().all(|b| b.exemplar.is_none()),
        "no exemplars without tracing"
    );
    assert!(!om.families.contains_key("wsgate_nats_state"), "no NATS source set");

    // The same numbers in the Prometheus text format, which also parses.
    let (headers, prom_text) = scrape(&gw, "text/plain").await;
    assert_eq!(headers["content-type"], wsgate::metrics::PROMETHEUS_CONTENT_TYPE);
    let prom = parse_prom(&prom_text);
    let accepted = prom.families["wsgate_handshakes_total"]
        .iter_samples()
        .find(|s| s.get_labelset().expect("labels").get_label_value("outcome") == Some("accepted"))
        .map(|s| match &s.value {
            PrometheusValue::Counter(c) => c.value.as_f64(),
            other => panic!("unexpected {other:?}"),
        })
        .expect("accepted sample");
    assert_eq!(accepted, CONNECTIONS as f64);
    assert!(!prom_text.contains("# EOF") && !prom_text.contains("# UNIT"));

    // The NATS state appears once the bridge registers its source.
    gw.gw.metrics.set_nats_state_fn(|| 1);
    let (_, om_text) = scrape(&gw, "application/openmetrics-text").await;
    assert_eq!(om_value(&parse_om(&om_text), "wsgate_nats_state", &[]), 1.0);

    let (status, headers, _) = http_request(gw.admin, "POST", "/metrics", &[], b"").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET");
}

#[tokio::test]
async fn open_connections_gauge_counts_live_connections() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut a = gw.connect("/a").await;
    let _b = gw.connect("/b").await;
    let (_, text) = scrape(&gw, "application/openmetrics-text").await;
    assert_eq!(
        om_value(&parse_om(&text), "wsgate_open_connections", &[("route", "default")]),
        2.0
    );
    a.send(WsMessage::Close(None)).await;
    a.expect_close().await;
    eventually("one connection left", || async {
        gw.gw.stats.open_connections.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let (_, text) = scrape(&gw, "application/openmetrics-text").await;
    assert_eq!(
        om_value(&parse_om(&text), "wsgate_open_connections", &[("route", "default")]),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// A log sink tests can read back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    fn json_lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
            .collect()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn debug_logs_never_contain_secrets() {
    const SIGNING_KEY: &str = "grip-signing-key-8c1f3a";
    const BEARER: &str = "bearer-token-5d2e9b";
    const COOKIE: &str = "session-cookie-77a0c4";
    const FORGED_SIG: &str = "forged-grip-sig-31b6f0";
    let logs = Captured::default();
    let sink = logs.clone();
    let (dispatch, _handle) =
        telemetry::subscriber(LogFormat::Json, "debug", move || sink.clone(), None).expect("subscriber");
    let _guard = tracing::dispatcher::set_default(&dispatch);

    let backend = Backend::echo().await;
    let yaml = format!(
        "routes:\n  - name: signed\n    backend: {{url: \"{}\"}}\n    grip:\n      signingKey: {{value: \"{SIGNING_KEY}\"}}\n",
        backend.url()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let mut req = gw.ws_url("/room").into_client_request().expect("request");
    let h = req.headers_mut();
    h.insert("authorization", format!("Bearer {BEARER}").parse().expect("header"));
    h.insert("cookie", format!("sid={COOKIE}").parse().expect("header"));
    h.insert("grip-sig", FORGED_SIG.parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("handshake");
    let mut client = Client { ws };
    client.send_text("hi").await;
    client.expect_text("hi").await;
    client.send(WsMessage::Close(None)).await;
    client.expect_close().await;
    gw.gw.wait_idle().await;
    // A pass-through request that fails (a debug line with the error) with the same headers.
    let dead = TestGateway::start("http://127.0.0.1:1").await;
    let (status, _, _) = http_request(
        dead.addr,
        "GET",
        "/x",
        &[
            ("authorization", &format!("Bearer {BEARER}")),
            ("cookie", &format!("sid={COOKIE}")),
        ],
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    let signed = backend
        .requests()
        .iter()
        .find_map(|r| r.header("grip-sig").map(str::to_owned))
        .expect("the backend got a Grip-Sig");
    let text = logs.text();
    let lines = logs.json_lines();
    // The capture works: the connection's open (debug) and close (info) lines are there, with
    // what the close line promises.
    let conn_id = backend.requests()[0].connection_id();
    let find = |msg: &str| {
        lines
            .iter()
            .find(|l| l["message"] == msg && l["conn_id"] == conn_id.as_str())
            .unwrap_or_else(|| panic!("no {msg:?} line for {conn_id} in\n{text}"))
            .clone()
    };
    let open = find("connection open");
    assert_eq!(open["level"], "DEBUG");
    assert_eq!(open["route"], "signed");
    let closed = find("connection closed");
    assert_eq!(closed["level"], "INFO");
    assert_eq!(closed["close_code"], 1005);
    assert_eq!(closed["client_messages"], 1);
    assert_eq!(closed["backend_messages"], 1);
    assert!(closed["duration_ms"].is_u64(), "{closed}");
    assert!(text.contains("pass-through request failed"), "{text}");
    for secret in [SIGNING_KEY, BEARER, COOKIE, FORGED_SIG, signed.as_str()] {
        assert!(!text.contains(secret), "secret {secret:?} logged:\n{text}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn log_level_changes_at_runtime_through_the_admin_listener() {
    let logs = Captured::default();
    let sink = logs.clone();
    let (dispatch, handle) =
        telemetry::subscriber(LogFormat::Json, "warn", move || sink.clone(), None).expect("subscriber");
    telemetry::set_log_handle(handle.clone());
    let _guard = tracing::dispatcher::set_default(&dispatch);
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;

    let (status, _, body) = http_request(gw.admin, "GET", "/log-level", &[], b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"warn\n"[..]));
    let mut c = gw.connect("/quiet").await;
    c.send(WsMessage::Close(None)).await;
    c.expect_close().await;
    gw.gw.wait_idle().await;
    assert!(!logs.text().contains("connection open"), "debug is off at warn");

    let (status, _, body) = http_request(gw.admin, "PUT", "/log-level", &[], b"warn,wsgate=debug\n").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(handle.current(), "warn,wsgate=debug");
    let mut c = gw.connect("/loud").await;
    c.send(WsMessage::Close(None)).await;
    c.expect_close().await;
    gw.gw.wait_idle().await;
    assert!(
        logs.json_lines().iter().any(|l| l["message"] == "connection open"),
        "{}",
        logs.text()
    );

    for bad in [&b"warn,[oops"[..], b"", b"\xff"] {
        let (status, _, _) = http_request(gw.admin, "PUT", "/log-level", &[], bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(handle.current(), "warn,wsgate=debug", "a bad filter changes nothing");
    let (status, _, _) = http_request(gw.admin, "PUT", "/log-level", &[], &[b'a'; 5000]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn the_dashboard_queries_only_exported_metrics() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut c = gw.connect("/d").await;
    c.send_text("x").await;
    c.expect_text("x").await;
    gw.gw.metrics.set_nats_state_fn(|| 0);
    let (_, gateway_text) = scrape(&gw, "text/plain").await;
    let mut controller = wsgate::metrics::Exposition::new(wsgate::metrics::Format::Prometheus);
    wsgate::metrics::encode_controller(
        &mut controller,
        &Default::default(),
        Some(&wsgate::metrics::Histogram::new()),
    );
    let controller_text = controller.finish();
    let exported: std::collections::HashSet<String> = parse_prom(&gateway_text)
        .families
        .into_iter()
        .chain(parse_prom(&controller_text).families)
        .flat_map(|(name, f)| {
            let base = name.clone();
            let kind = f.family_type.clone();
            let mut names = vec![base.clone()];
            if kind == PrometheusType::Histogram {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{base}{s}")));
            }
            names
        })
        .collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/wsgate/dashboards/wsgate.json"
    ))
    .expect("dashboard file");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert_eq!(json["uid"], "wsgate-overview");
    let re = regex::Regex::new(r"wsgate_[a-z_]+").expect("regex");
    let used: std::collections::BTreeSet<&str> = re.find_iter(&dashboard).map(|m| m.as_str()).collect();
    assert!(used.len() > 15, "{used:?}");
    for name in used {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which is not exported"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_publish_has_its_own_span_with_item_and_delivery_counts() {
    let collector = Collector::start().await;
    let cfg = TraceConfig::new(format!("http://{}/v1/traces", collector.addr), Protocol::HttpProtobuf);
    let tracing = Arc::new(Tracing::start(&cfg).expect("tracer"));
    let (dispatch, _logs) =
        telemetry::subscriber(LogFormat::Text, "off", std::io::sink, Some(&tracing)).expect("subscriber");
    let _guard = tracing::dispatcher::set_default(&dispatch);

    let backend = grip_subscriber_backend("news").await;
    let gw = TestGateway::start(&backend.url()).await;
    let mut client = gw.connect("/").await;
    let publisher_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = br#"{"items":[{"channel":"news","formats":{"ws-message":{"content":"extra"}}},{"channel":"nobody","formats":{"ws-message":{"content":"x"}}}]}"#;
    let (status, _, _) = http_request(
        gw.admin,
        "POST",
        "/publish/",
        &[
            ("content-type", "application/json"),
            ("traceparent", &format!("00-{publisher_trace}-00f067aa0ba902b7-01")),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    client.expect_text("extra").await;

    flush(&tracing).await;
    let spans = collector.spans();
    let publish = one(&spans, "publish");
    assert_eq!(
        hex(&publish.trace_id),
        publisher_trace,
        "the publisher's trace is continued"
    );
    assert_eq!(attr_int(publish, "wsgate.items"), 2);
    assert_eq!(
        attr_int(publish, "wsgate.deliveries"),
        1,
        "one subscriber of news, none of nobody"
    );

    let t = tracing.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}

#[tokio::test(flavor = "current_thread")]
async fn controller_reconciles_are_traced() {
    let collector = Collector::start().await;
    let cfg = TraceConfig::new(format!("http://{}/v1/traces", collector.addr), Protocol::HttpProtobuf);
    let tracing = Arc::new(Tracing::start(&cfg).expect("tracer"));
    let (dispatch, _logs) =
        telemetry::subscriber(LogFormat::Text, "off", std::io::sink, Some(&tracing)).expect("subscriber");
    let _guard = tracing::dispatcher::set_default(&dispatch);

    let cluster = scenarios::Cluster::fake().await;
    let mut ctl = scenarios::RunningController::start(cluster.controller_client.clone(), "ctl-0").await;
    ctl.wait_leader(true).await;
    scenarios::created_route_is_accepted(&cluster).await;
    ctl.stop().await;

    flush(&tracing).await;
    let spans = collector.spans();
    let reconciles: Vec<&ProtoSpan> = spans
        .iter()
        .filter(|s| s.name == "controller.reconcile" && attr_str(s, "k8s.resource.name") == "chat")
        .collect();
    assert!(
        !reconciles.is_empty(),
        "no reconcile span for the route in {:?}",
        names(&spans)
    );
    let r = reconciles[0];
    assert_eq!(attr_str(r, "k8s.resource.kind"), "WebSocketRoute");
    assert_eq!(attr_str(r, "k8s.namespace.name"), cluster.ns);

    let t = tracing.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}
