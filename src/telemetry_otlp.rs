//! A lean OTLP/HTTP protobuf span exporter.
//!
//! [`OtlpHttpExporter`] encodes each batch of finished spans straight into the protobuf wire
//! bytes of `opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest` and `POST`s
//! them with `Content-Type: application/x-protobuf`. The bytes are the ones
//! `opentelemetry-otlp`'s HTTP exporter sends (its `opentelemetry-proto` transform followed by
//! a prost encode, same fields in the same order) but without the intermediate proto structs:
//! no `String` or `Vec` per span, attribute or event, one buffer per batch. The resource is
//! encoded once, when the SDK hands it over ([`SpanExporter::set_resource`]).
//!
//! # Encoding
//!
//! Nested messages are written with their length prefix reserved up front (a guess of its
//! varint size per message type) and patched once the message is complete; a wrong guess
//! moves the message body by the difference. Fields holding their proto3 default are
//! skipped, as prost does; message fields the transform always sets (`resource`, `scope`,
//! `status`, `KeyValue.value`) are always written, even empty.
//!
//! # Transport
//!
//! Requests go through an [`opentelemetry_http::HttpClient`] (the gateway passes its own,
//! which runs them on the gateway's runtime with the export timeout and a bounded response
//! body). A non-2xx status is an export error naming the status. Like `opentelemetry-otlp`,
//! transport errors and the statuses 429, 502, 503 and 504 are retried (at most three times,
//! 100 ms doubling up to 1.6 s, or the server's `Retry-After`) while the export timeout
//! allows. A partial success reported by the collector is logged.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use opentelemetry::trace::{SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, Value};
use opentelemetry_http::HttpClient;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// `Content-Type` of an OTLP/HTTP protobuf request.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";

/// Variables [`headers_from_env`] reads (the traces one wins).
pub mod vars {
    /// Extra request headers for every signal: `key=value,...`, values percent-encoded.
    pub const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    /// Extra request headers for traces only.
    pub const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
}

/// Capacity of the first request buffer; later ones start at the size of the previous body.
const MIN_BUFFER: usize = 4096;

/// Largest capacity carried over from one export to the next.
const MAX_BUFFER_HINT: usize = 4 << 20;

/// Why an [`OtlpHttpExporter`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtlpHttpError {
    /// The endpoint is not an `http://` or `https://` URL with a host.
    #[error("OTLP endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// When a failed request is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RetryPolicy {
    /// Retries after the first attempt.
    max_retries: u32,
    /// Delay before the first retry; doubles after each.
    initial_delay: Duration,
    /// Largest delay between two attempts (a `Retry-After` may ask for more).
    max_delay: Duration,
}

/// `opentelemetry-otlp`'s default policy.
const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    max_retries: 3,
    initial_delay: Duration::from_millis(100),
    max_delay: Duration::from_millis(1600),
};

/// An OTLP/HTTP protobuf [`SpanExporter`] over the HTTP client `C`; see the
/// [module docs](self).
#[derive(Debug)]
pub struct OtlpHttpExporter<C> {
    client: C,
    endpoint: Uri,
    headers: HeaderMap,
    /// Deadline of one export, retries included.
    timeout: Duration,
    resource: EncodedResource,
    retry: RetryPolicy,
    shut_down: AtomicBool,
    /// Size of the previous request body: the capacity of the next buffer.
    buffer_hint: AtomicUsize,
}

impl<C: HttpClient> OtlpHttpExporter<C> {
    /// An exporter posting to `endpoint` (the full traces URL, e.g.
    /// `http://collector:4318/v1/traces`) through `client`, giving up on a batch once
    /// `timeout` has passed (retries included; `client` should time out single requests).
    ///
    /// # Errors
    ///
    /// [`OtlpHttpError::InvalidEndpoint`] when `endpoint` is not an `http://` or `https://`
    /// URL with a host.
    pub fn new(client: C, endpoint: &str, timeout: Duration) -> Result<Self, OtlpHttpError> {
        let invalid = |reason| OtlpHttpError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let uri: Uri = endpoint.parse().map_err(|_| invalid("not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(invalid("expected an http:// or https:// URL with a host"));
        }
        Ok(Self {
            client,
            endpoint: uri,
            headers: HeaderMap::new(),
            timeout,
            resource: EncodedResource::default(),
            retry: DEFAULT_RETRY,
            shut_down: AtomicBool::new(false),
            buffer_hint: AtomicUsize::new(MIN_BUFFER),
        })
    }

    /// Sends `headers` with every request (e.g. [`headers_from_env`]); a `Content-Type` among
    /// them is replaced by [`PROTOBUF_CONTENT_TYPE`].
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// The request for one attempt.
    fn request(&self, body: Bytes) -> Request<Bytes> {
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        *req.headers_mut() = self.headers.clone();
        req.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF_CONTENT_TYPE));
        req
    }

    /// Posts `body`, retrying as the [module docs](self) say.
    async fn send(&self, body: Bytes) -> OTelSdkResult {
        let started = Instant::now();
        let mut delay = self.retry.initial_delay;
        let mut retries = 0;
        loop {
            let (message, retry_after) = match self.client.send_bytes(self.request(body.clone())).await {
                Ok(resp) if resp.status().is_success() => {
                    if let Some((rejected, message)) = partial_success(resp.body()) {
                        tracing::warn!(
                            rejected_spans = rejected,
                            error_message = %message,
                            "OTLP collector accepted part of a span batch"
                        );
                    }
                    return Ok(());
                }
                Ok(resp) => {
                    let message = format!(
                        "OTLP export to {} failed with HTTP status {}",
                        self.endpoint,
                        resp.status()
                    );
                    if !is_retryable(resp.status()) {
                        return Err(OTelSdkError::InternalFailure(message));
                    }
                    let retry_after = resp
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    (message, retry_after)
                }
                Err(e) => (format!("OTLP export to {} failed: {e}", self.endpoint), None),
            };
            let wait = retry_after.map_or(delay, |r| r.max(delay));
            if retries >= self.retry.max_retries || started.elapsed().saturating_add(wait) >= self.timeout {
                return Err(OTelSdkError::InternalFailure(message));
            }
            pause(wait).await;
            retries += 1;
            delay = delay.saturating_mul(2).min(self.retry.max_delay);
        }
    }
}

impl<C: HttpClient> SpanExporter for OtlpHttpExporter<C> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.shut_down.load(Ordering::Acquire) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(self.buffer_hint.load(Ordering::Relaxed));
        encode_export_request(&self.resource, &batch, &mut buf);
        drop(batch);
        let hint = buf
            .len()
            .saturating_add(buf.len() / 8)
            .clamp(MIN_BUFFER, MAX_BUFFER_HINT);
        self.buffer_hint.store(hint, Ordering::Relaxed);
        self.send(Bytes::from(buf)).await
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = EncodedResource::new(resource);
    }
}

/// 429 and the gateway statuses 502, 503 and 504 are worth another attempt.
fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// Waits `d`: on the tokio timer inside a runtime, by blocking the thread outside one (the
/// SDK's batch processor drives exports on its own thread with a plain executor).
async fn pause(d: Duration) {
    if d.is_zero() {
        return;
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::time::sleep(d).await;
    } else {
        std::thread::sleep(d);
    }
}

// ---- headers -------------------------------------------------------------------------------

/// The extra headers the environment asks for ([`vars::TRACES_HEADERS`], else
/// [`vars::HEADERS`]), parsed by [`parse_headers`]; empty when neither is set.
pub fn headers_from_env() -> HeaderMap {
    std::env::var(vars::TRACES_HEADERS)
        .or_else(|_| std::env::var(vars::HEADERS))
        .map(|v| parse_headers(&v))
        .unwrap_or_default()
}

/// Parses `key=value,key2=value2` with percent-encoded values (a value that does not decode
/// is taken as is), as `opentelemetry-otlp` does. Pairs with an empty key or value, or that
/// are not a valid header, are skipped; a repeated key keeps its last value.
pub fn parse_headers(s: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for pair in s.split(',').map(str::trim) {
        let Some((k, v)) = pair.split_once('=') else { continue };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() {
            continue;
        }
        let value = crate::telemetry::percent_decode(v).unwrap_or_else(|| v.to_owned());
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&value)) {
            out.insert(name, value);
        }
    }
    out
}

// ---- protobuf wire format ------------------------------------------------------------------

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// The one-byte key of field `field` (< 16) with wire type `wire`.
const fn key(field: u8, wire: u8) -> u8 {
    (field << 3) | wire
}

// ExportTraceServiceRequest
const REQUEST_RESOURCE_SPANS: u8 = key(1, LEN);
// ResourceSpans
const RS_RESOURCE: u8 = key(1, LEN);
const RS_SCOPE_SPANS: u8 = key(2, LEN);
const RS_SCHEMA_URL: u8 = key(3, LEN);
// Resource
const RESOURCE_ATTRIBUTES: u8 = key(1, LEN);
// ScopeSpans
const SS_SCOPE: u8 = key(1, LEN);
const SS_SPANS: u8 = key(2, LEN);
const SS_SCHEMA_URL: u8 = key(3, LEN);
// InstrumentationScope
const SCOPE_NAME: u8 = key(1, LEN);
const SCOPE_VERSION: u8 = key(2, LEN);
const SCOPE_ATTRIBUTES: u8 = key(3, LEN);
// Span
const SPAN_TRACE_ID: u8 = key(1, LEN);
const SPAN_SPAN_ID: u8 = key(2, LEN);
const SPAN_TRACE_STATE: u8 = key(3, LEN);
const SPAN_PARENT_SPAN_ID: u8 = key(4, LEN);
const SPAN_NAME: u8 = key(5, LEN);
const SPAN_KIND: u8 = key(6, VARINT);
const SPAN_START: u8 = key(7, I64);
const SPAN_END: u8 = key(8, I64);
const SPAN_ATTRIBUTES: u8 = key(9, LEN);
const SPAN_DROPPED_ATTRIBUTES: u8 = key(10, VARINT);
const SPAN_EVENTS: u8 = key(11, LEN);
const SPAN_DROPPED_EVENTS: u8 = key(12, VARINT);
const SPAN_LINKS: u8 = key(13, LEN);
const SPAN_DROPPED_LINKS: u8 = key(14, VARINT);
const SPAN_STATUS: u8 = key(15, LEN);
/// Field 16 (`flags`, fixed32): the two-byte varint of `16 << 3 | 5` (133).
const SPAN_FLAGS: [u8; 2] = [0x85, 0x01];
// Span.Event
const EVENT_TIME: u8 = key(1, I64);
const EVENT_NAME: u8 = key(2, LEN);
const EVENT_ATTRIBUTES: u8 = key(3, LEN);
const EVENT_DROPPED_ATTRIBUTES: u8 = key(4, VARINT);
// Span.Link
const LINK_TRACE_ID: u8 = key(1, LEN);
const LINK_SPAN_ID: u8 = key(2, LEN);
const LINK_TRACE_STATE: u8 = key(3, LEN);
const LINK_ATTRIBUTES: u8 = key(4, LEN);
const LINK_DROPPED_ATTRIBUTES: u8 = key(5, VARINT);
const LINK_FLAGS: u8 = key(6, I32);
// Status
const STATUS_MESSAGE: u8 = key(2, LEN);
const STATUS_CODE: u8 = key(3, VARINT);
// KeyValue
const KV_KEY: u8 = key(1, LEN);
const KV_VALUE: u8 = key(2, LEN);
// AnyValue
const ANY_STRING: u8 = key(1, LEN);
const ANY_BOOL: u8 = key(2, VARINT);
const ANY_INT: u8 = key(3, VARINT);
const ANY_DOUBLE: u8 = key(4, I64);
const ANY_ARRAY: u8 = key(5, LEN);
// ArrayValue
const ARRAY_VALUES: u8 = key(1, LEN);

/// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// `SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`.
const FLAG_IS_REMOTE: u32 = 0x200;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of the varint encoding of `v`.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// A length-delimited field, always written (even empty).
fn put_len(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A string field, skipped when empty.
fn put_str(out: &mut Vec<u8>, key: u8, s: &str) {
    if !s.is_empty() {
        put_len(out, key, s.as_bytes());
    }
}

/// A varint field, skipped when zero.
fn put_uint(out: &mut Vec<u8>, key: u8, v: u64) {
    if v != 0 {
        out.push(key);
        put_varint(out, v);
    }
}

/// A fixed64 field, skipped when zero.
fn put_fixed64(out: &mut Vec<u8>, key: u8, v: u64) {
    if v != 0 {
        out.push(key);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A nested message being written: where its length prefix goes and how many bytes were
/// reserved for it.
struct Nested {
    len_at: usize,
    reserved: usize,
}

/// Starts message field `key`, reserving `reserved` bytes for its length.
fn open(out: &mut Vec<u8>, key: u8, reserved: usize) -> Nested {
    out.push(key);
    let len_at = out.len();
    out.resize(len_at + reserved, 0);
    Nested { len_at, reserved }
}

/// Ends `n`: writes its length, moving the body when its varint is not the reserved size.
fn close(out: &mut Vec<u8>, n: Nested) {
    let body_at = n.len_at + n.reserved;
    let len = out.len() - body_at;
    let need = varint_len(len as u64);
    if need > n.reserved {
        let more = need - n.reserved;
        out.resize(out.len() + more, 0);
        out.copy_within(body_at..body_at + len, body_at + more);
    } else if need < n.reserved {
        let less = n.reserved - need;
        out.copy_within(body_at.., body_at - less);
        out.truncate(out.len() - less);
    }
    // `need` bytes are free at `len_at`, and the varint of `len` is `need` bytes long.
    let mut v = len as u64;
    let mut at = n.len_at;
    while v >= 0x80 {
        out[at] = (v as u8) | 0x80;
        v >>= 7;
        at += 1;
    }
    out[at] = v as u8;
}

// ---- OTLP messages -------------------------------------------------------------------------

/// The `resource` and `schema_url` fields of a `ResourceSpans`, encoded once per resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedResource {
    /// Field 1 (`Resource`), key and length included.
    resource: Vec<u8>,
    /// Field 3 (`schema_url`), empty when there is none.
    schema_url: Vec<u8>,
}

impl Default for EncodedResource {
    /// No attributes and no schema URL (what the transform sends before `set_resource`).
    fn default() -> Self {
        Self {
            resource: vec![RS_RESOURCE, 0],
            schema_url: Vec::new(),
        }
    }
}

impl EncodedResource {
    /// Encodes `resource`'s attributes (in its iteration order) and schema URL.
    pub fn new(resource: &Resource) -> Self {
        let mut out = Vec::new();
        let n = open(&mut out, RS_RESOURCE, 2);
        for (k, v) in resource.iter() {
            put_key_value(&mut out, RESOURCE_ATTRIBUTES, k.as_str(), v);
        }
        close(&mut out, n);
        let mut schema_url = Vec::new();
        put_str(
            &mut schema_url,
            RS_SCHEMA_URL,
            resource.schema_url().unwrap_or_default(),
        );
        Self {
            resource: out,
            schema_url,
        }
    }
}

/// Appends to `out` the protobuf encoding of an `ExportTraceServiceRequest` holding `spans`
/// under `resource`: one `ResourceSpans`, one `ScopeSpans` per distinct instrumentation scope
/// (in order of first appearance, spans in batch order), exactly as `opentelemetry-proto`'s
/// `group_spans_by_resource_and_scope` followed by a prost encode.
pub fn encode_export_request(resource: &EncodedResource, spans: &[SpanData], out: &mut Vec<u8>) {
    // Each span's scope, as an index into `scopes`.
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    let mut scope_of: Vec<usize> = Vec::with_capacity(spans.len());
    let mut last = 0;
    for span in spans {
        let scope = &span.instrumentation_scope;
        if !scopes.get(last).is_some_and(|s| same_scope(s, scope)) {
            last = match scopes.iter().position(|s| same_scope(s, scope)) {
                Some(i) => i,
                None => {
                    scopes.push(scope);
                    scopes.len() - 1
                }
            };
        }
        scope_of.push(last);
    }
    let rs = open(out, REQUEST_RESOURCE_SPANS, 3);
    out.extend_from_slice(&resource.resource);
    for (i, scope) in scopes.iter().enumerate() {
        let ss = open(out, RS_SCOPE_SPANS, 3);
        let sc = open(out, SS_SCOPE, 1);
        put_str(out, SCOPE_NAME, scope.name());
        put_str(out, SCOPE_VERSION, scope.version().unwrap_or_default());
        for kv in scope.attributes() {
            put_key_value(out, SCOPE_ATTRIBUTES, kv.key.as_str(), &kv.value);
        }
        close(out, sc);
        for (span, _) in spans.iter().zip(&scope_of).filter(|(_, s)| **s == i) {
            put_span(out, span);
        }
        put_str(out, SS_SCHEMA_URL, scope.schema_url().unwrap_or_default());
        close(out, ss);
    }
    out.extend_from_slice(&resource.schema_url);
    close(out, rs);
}

/// Scope equality as the SDK defines it (attributes in any order), checking the common case
/// (an identical clone) without the SDK's sorting allocations.
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    (a.name() == b.name()
        && a.version() == b.version()
        && a.schema_url() == b.schema_url()
        && a.attributes().eq(b.attributes()))
        || a == b
}

fn put_span(out: &mut Vec<u8>, span: &SpanData) {
    let n = open(out, SS_SPANS, 2);
    let cx = &span.span_context;
    put_len(out, SPAN_TRACE_ID, &cx.trace_id().to_bytes());
    put_len(out, SPAN_SPAN_ID, &cx.span_id().to_bytes());
    put_trace_state(out, SPAN_TRACE_STATE, cx.trace_state());
    if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        put_len(out, SPAN_PARENT_SPAN_ID, &span.parent_span_id.to_bytes());
    }
    put_str(out, SPAN_NAME, &span.name);
    put_uint(out, SPAN_KIND, kind_code(&span.span_kind));
    put_fixed64(out, SPAN_START, unix_nanos(span.start_time));
    put_fixed64(out, SPAN_END, unix_nanos(span.end_time));
    for kv in &span.attributes {
        put_key_value(out, SPAN_ATTRIBUTES, kv.key.as_str(), &kv.value);
    }
    put_uint(out, SPAN_DROPPED_ATTRIBUTES, u64::from(span.dropped_attributes_count));
    for event in span.events.iter() {
        let e = open(out, SPAN_EVENTS, 1);
        put_fixed64(out, EVENT_TIME, unix_nanos(event.timestamp));
        put_str(out, EVENT_NAME, &event.name);
        for kv in &event.attributes {
            put_key_value(out, EVENT_ATTRIBUTES, kv.key.as_str(), &kv.value);
        }
        put_uint(out, EVENT_DROPPED_ATTRIBUTES, u64::from(event.dropped_attributes_count));
        close(out, e);
    }
    put_uint(out, SPAN_DROPPED_EVENTS, u64::from(span.events.dropped_count));
    for link in span.links.iter() {
        let l = open(out, SPAN_LINKS, 1);
        let lcx = &link.span_context;
        put_len(out, LINK_TRACE_ID, &lcx.trace_id().to_bytes());
        put_len(out, LINK_SPAN_ID, &lcx.span_id().to_bytes());
        put_trace_state(out, LINK_TRACE_STATE, lcx.trace_state());
        for kv in &link.attributes {
            put_key_value(out, LINK_ATTRIBUTES, kv.key.as_str(), &kv.value);
        }
        put_uint(out, LINK_DROPPED_ATTRIBUTES, u64::from(link.dropped_attributes_count));
        // Never zero: the has-is-remote bit is always set.
        out.push(LINK_FLAGS);
        out.extend_from_slice(&span_flags(lcx.is_remote(), lcx.trace_flags().to_u8()).to_le_bytes());
        close(out, l);
    }
    put_uint(out, SPAN_DROPPED_LINKS, u64::from(span.links.dropped_count));
    let s = open(out, SPAN_STATUS, 1);
    let code = match &span.status {
        Status::Unset => 0,
        Status::Ok => 1,
        Status::Error { description } => {
            put_str(out, STATUS_MESSAGE, description);
            2
        }
    };
    put_uint(out, STATUS_CODE, code);
    close(out, s);
    out.extend_from_slice(&SPAN_FLAGS);
    out.extend_from_slice(&span_flags(span.parent_span_is_remote, cx.trace_flags().to_u8()).to_le_bytes());
    close(out, n);
}

/// The OTLP `flags` of a span or link: the W3C trace flags plus the is-remote bits.
fn span_flags(is_remote: bool, trace_flags: u8) -> u32 {
    let mut flags = u32::from(trace_flags) | FLAG_HAS_IS_REMOTE;
    if is_remote {
        flags |= FLAG_IS_REMOTE;
    }
    flags
}

/// `Span.SpanKind` number.
fn kind_code(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// Nanoseconds since the Unix epoch; 0 before it.
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The W3C `tracestate` header of `state` as a string field (skipped when empty), written
/// without building the header string.
fn put_trace_state(out: &mut Vec<u8>, key: u8, state: &TraceState) {
    let mut len = 0;
    let mut members = 0;
    for (k, v) in state {
        len += k.len() + 1 + v.len();
        members += 1;
    }
    if members == 0 {
        return;
    }
    len += members - 1;
    out.push(key);
    put_varint(out, len as u64);
    for (i, (k, v)) in state.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
    }
}

/// A `KeyValue` message as field `field_key`.
fn put_key_value(out: &mut Vec<u8>, field_key: u8, k: &str, v: &Value) {
    let n = open(out, field_key, 1);
    put_str(out, KV_KEY, k);
    put_any_value(out, KV_VALUE, v);
    close(out, n);
}

/// An `AnyValue` message as field `field_key`. A value kind this encoder does not know (the
/// enums are non-exhaustive) becomes an empty `AnyValue`.
fn put_any_value(out: &mut Vec<u8>, field_key: u8, v: &Value) {
    match v {
        Value::Bool(b) => put_any_bool(out, field_key, *b),
        Value::I64(i) => put_any_int(out, field_key, *i),
        Value::F64(f) => put_any_double(out, field_key, *f),
        Value::String(s) => put_any_str(out, field_key, s.as_str()),
        Value::Array(a) => {
            let n = open(out, field_key, 1);
            let arr = open(out, ANY_ARRAY, 1);
            match a {
                Array::Bool(vs) => vs.iter().for_each(|b| put_any_bool(out, ARRAY_VALUES, *b)),
                Array::I64(vs) => vs.iter().for_each(|i| put_any_int(out, ARRAY_VALUES, *i)),
                Array::F64(vs) => vs.iter().for_each(|f| put_any_double(out, ARRAY_VALUES, *f)),
                Array::String(vs) => vs.iter().for_each(|s| put_any_str(out, ARRAY_VALUES, s.as_str())),
                _ => {}
            }
            close(out, arr);
            close(out, n);
        }
        _ => out.extend_from_slice(&[field_key, 0]),
    }
}

// A oneof member is written even when it holds its type's default.

fn put_any_bool(out: &mut Vec<u8>, field_key: u8, b: bool) {
    out.extend_from_slice(&[field_key, 2, ANY_BOOL, u8::from(b)]);
}

fn put_any_int(out: &mut Vec<u8>, field_key: u8, i: i64) {
    // int64 is the two's complement as a 64-bit varint.
    let v = i as u64;
    out.push(field_key);
    put_varint(out, 1 + varint_len(v) as u64);
    out.push(ANY_INT);
    put_varint(out, v);
}

fn put_any_double(out: &mut Vec<u8>, field_key: u8, f: f64) {
    out.extend_from_slice(&[field_key, 9, ANY_DOUBLE]);
    out.extend_from_slice(&f.to_le_bytes());
}

fn put_any_str(out: &mut Vec<u8>, field_key: u8, s: &str) {
    let n = open(out, field_key, 1);
    put_len(out, ANY_STRING, s.as_bytes());
    close(out, n);
}

// ---- the response --------------------------------------------------------------------------

/// `(rejected_spans, error_message)` of an `ExportTraceServiceResponse` body that reports a
/// partial success; `None` for a full success or a body that does not decode.
fn partial_success(body: &[u8]) -> Option<(i64, String)> {
    let mut rejected = 0;
    let mut message = String::new();
    let mut found = false;
    let mut outer = Reader(body);
    while let Some((field, value)) = outer.field()? {
        if let (1, Field::Len(inner)) = (field, value) {
            found = true;
            let mut r = Reader(inner);
            while let Some((field, value)) = r.field()? {
                match (field, value) {
                    (1, Field::Varint(v)) => rejected = v as i64,
                    (2, Field::Len(b)) => message = String::from_utf8_lossy(b).into_owned(),
                    _ => {}
                }
            }
        }
    }
    (found && (rejected != 0 || !message.is_empty())).then_some((rejected, message))
}

/// One field value read by [`Reader`].
enum Field<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

/// A protobuf field reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// The next field: `Some(None)` at the end, `None` when malformed.
    fn field(&mut self) -> Option<Option<(u64, Field<'a>)>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let k = self.varint()?;
        let value = match (k & 7) as u8 {
            VARINT => Field::Varint(self.varint()?),
            I64 => self.take(8).map(|_| Field::Fixed)?,
            LEN => {
                let n = usize::try_from(self.varint()?).ok()?;
                Field::Len(self.take(n)?)
            }
            I32 => self.take(4).map(|_| Field::Fixed)?,
            _ => return None,
        };
        Some(Some((k >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http::Response;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value as ProtoValue;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use proptest::prelude::*;
    use prost::Message as _;
    use tokio::net::TcpListener;

    use super::*;
    use crate::telemetry::ExportClient;

    fn at(nanos: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(nanos)
    }

    fn context(trace: u128, span: u64, sampled: bool, remote: bool, state: &str) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = if state.is_empty() {
            TraceState::NONE
        } else {
            state.parse().expect("test tracestate")
        };
        SpanContext::new(TraceId::from(trace), SpanId::from(span), flags, remote, state)
    }

    fn span(name: &'static str, scope: &InstrumentationScope, span_id: u64) -> SpanData {
        SpanData {
            span_context: context(0x0af7651916cd43dd8448eb211c80319c, span_id, true, false, ""),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(name),
            start_time: at(1_700_000_000_000_000_001),
            end_time: at(1_700_000_000_250_000_000),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        }
    }

    fn every_value_kind() -> Vec<KeyValue> {
        vec![
            KeyValue::new("s", "text"),
            KeyValue::new("s.empty", ""),
            KeyValue::new("s.owned", String::from("owned ü")),
            KeyValue::new("b.true", true),
            KeyValue::new("b.false", false),
            KeyValue::new("i.zero", 0i64),
            KeyValue::new("i.neg", -42i64),
            KeyValue::new("i.max", i64::MAX),
            KeyValue::new("i.min", i64::MIN),
            KeyValue::new("f", 1.5f64),
            KeyValue::new("f.zero", 0.0f64),
            KeyValue::new("f.neg", -2.25e300f64),
            KeyValue::new("a.bool", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("a.int", Value::Array(Array::I64(vec![0, -1, 1 << 40]))),
            KeyValue::new("a.f64", Value::Array(Array::F64(vec![0.5, 0.0]))),
            KeyValue::new("a.str", Value::Array(Array::String(vec!["x".into(), "".into()]))),
            KeyValue::new("a.empty", Value::Array(Array::I64(Vec::new()))),
            KeyValue::new("", "empty key"),
        ]
    }

    fn scopes() -> (InstrumentationScope, InstrumentationScope, InstrumentationScope) {
        let plain = InstrumentationScope::builder("wsgate").build();
        let full = InstrumentationScope::builder("lib")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.21.0")
            .with_attributes([KeyValue::new("x", 1i64), KeyValue::new("y", "z")])
            .build();
        // Equal to `full` for the SDK (attribute order does not count): same group.
        let full_reordered = InstrumentationScope::builder("lib")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.21.0")
            .with_attributes([KeyValue::new("y", "z"), KeyValue::new("x", 1i64)])
            .build();
        (plain, full, full_reordered)
    }

    /// Spans covering every field: all attribute kinds, events, links, statuses, local and
    /// remote parents, trace states, dropped counts, several interleaved scopes.
    fn rich_batch() -> Vec<SpanData> {
        let (plain, full, full_reordered) = scopes();
        let mut conn = span("ws.connection", &plain, 1);
        conn.span_kind = SpanKind::Server;
        conn.parent_span_id = SpanId::from(0x00f067aa0ba902b7);
        conn.parent_span_is_remote = true;
        conn.span_context = context(7, 1, true, false, "vendor=abc,other=x:y");
        conn.attributes = every_value_kind();
        conn.dropped_attributes_count = 3;
        conn.status = Status::error("backend answered with an error status");
        conn.events.events = vec![
            Event::new(
                "first",
                at(1_700_000_000_100_000_000),
                vec![KeyValue::new("n", 1i64)],
                2,
            ),
            Event::new("", UNIX_EPOCH, Vec::new(), 0),
        ];
        conn.events.dropped_count = 5;
        conn.links.links = vec![
            Link::new(
                context(0x1234, 0x5678, true, true, "k=v"),
                vec![KeyValue::new("link.attr", "v")],
                4,
            ),
            Link::new(context(1, 2, false, false, ""), Vec::new(), 0),
        ];
        conn.links.dropped_count = 6;

        let mut req = span("backend.request", &full, 2);
        req.span_kind = SpanKind::Client;
        req.parent_span_id = SpanId::from(1);
        req.status = Status::Ok;
        req.attributes = vec![KeyValue::new("wsgate.events", 3i64)];

        let mut produce = span("publish", &plain, 3);
        produce.span_kind = SpanKind::Producer;
        produce.span_context = context(9, 3, false, false, "");
        produce.status = Status::error("");

        let mut consume = span("", &full_reordered, 4);
        consume.span_kind = SpanKind::Consumer;
        consume.start_time = UNIX_EPOCH;
        consume.end_time = UNIX_EPOCH - Duration::from_secs(1);

        let other = span("other", &InstrumentationScope::builder("third").build(), 5);
        vec![conn, req, produce, consume, other]
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_service_name("wsgate")
            .with_schema_url(
                [
                    KeyValue::new("service.version", "0.1.0"),
                    KeyValue::new("k8s.pod.name", "wsgate-0"),
                    KeyValue::new("host.cpus", 2i64),
                ],
                "https://opentelemetry.io/schemas/1.20.0",
            )
            .build()
    }

    /// What `opentelemetry-otlp` would send for `spans` under `resource`.
    fn reference(spans: &[SpanData], resource: Option<&Resource>) -> ExportTraceServiceRequest {
        let attrs = resource.map(ResourceAttributesWithSchema::from).unwrap_or_default();
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans.to_vec(), &attrs),
        }
    }

    fn encode(spans: &[SpanData], resource: Option<&Resource>) -> Vec<u8> {
        let encoded = resource.map(EncodedResource::new).unwrap_or_default();
        let mut out = Vec::new();
        encode_export_request(&encoded, spans, &mut out);
        out
    }

    fn assert_matches_reference(spans: &[SpanData], resource: Option<&Resource>) -> ExportTraceServiceRequest {
        let ours = encode(spans, resource);
        let expected = reference(spans, resource);
        let decoded = ExportTraceServiceRequest::decode(&ours[..]).expect("our bytes decode");
        assert_eq!(decoded, expected);
        assert_eq!(ours, expected.encode_to_vec(), "byte-for-byte equal to prost");
        decoded
    }

    #[test]
    fn a_rich_batch_matches_the_otlp_transform_byte_for_byte() {
        let batch = rich_batch();
        let decoded = assert_matches_reference(&batch, Some(&resource()));

        // The semantics, independently of the reference.
        assert_eq!(decoded.resource_spans.len(), 1);
        let rs = &decoded.resource_spans[0];
        assert_eq!(rs.schema_url, "https://opentelemetry.io/schemas/1.20.0");
        let res = rs.resource.as_ref().expect("resource");
        assert!(res.attributes.iter().any(|kv| kv.key == "service.name"
            && kv.value.as_ref().and_then(|v| v.value.clone()) == Some(ProtoValue::StringValue("wsgate".into()))));
        let groups: Vec<(&str, usize)> = rs
            .scope_spans
            .iter()
            .map(|ss| (ss.scope.as_ref().expect("scope").name.as_str(), ss.spans.len()))
            .collect();
        assert_eq!(groups, [("wsgate", 2), ("lib", 2), ("third", 1)]);
        let lib = &rs.scope_spans[1];
        assert_eq!(lib.schema_url, "https://opentelemetry.io/schemas/1.21.0");
        let scope = lib.scope.as_ref().expect("scope");
        assert_eq!(scope.version, "1.2.3");
        assert_eq!(scope.attributes[0].key, "x", "the first span's scope is the group's");

        let conn = &rs.scope_spans[0].spans[0];
        assert_eq!(conn.trace_id, 7u128.to_be_bytes());
        assert_eq!(conn.span_id, 1u64.to_be_bytes());
        assert_eq!(conn.parent_span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert_eq!(conn.trace_state, "vendor=abc,other=x:y");
        assert_eq!(conn.flags, 0x301, "sampled, has-is-remote, is-remote");
        assert_eq!(conn.kind, 2);
        assert_eq!(conn.start_time_unix_nano, 1_700_000_000_000_000_001);
        assert_eq!(conn.attributes.len(), every_value_kind().len());
        assert_eq!(
            conn.attributes[6].value.as_ref().and_then(|v| v.value.clone()),
            Some(ProtoValue::IntValue(-42))
        );
        assert_eq!(
            (
                conn.dropped_attributes_count,
                conn.dropped_events_count,
                conn.dropped_links_count
            ),
            (3, 5, 6)
        );
        assert_eq!(conn.events[0].dropped_attributes_count, 2);
        assert_eq!(conn.links[0].flags, 0x301);
        assert_eq!(conn.links[0].trace_state, "k=v");
        assert_eq!(conn.links[1].flags, 0x100);
        let status = conn.status.as_ref().expect("status");
        assert_eq!(
            (status.code, status.message.as_str()),
            (2, "backend answered with an error status")
        );

        let req = &rs.scope_spans[1].spans[0];
        assert!(req.parent_span_id == 1u64.to_be_bytes() && req.flags == 0x101 && req.kind == 3);
        assert_eq!(req.status.as_ref().map(|s| s.code), Some(1));
        let produce = &rs.scope_spans[0].spans[1];
        assert!(produce.parent_span_id.is_empty() && produce.flags == 0x100 && produce.kind == 4);
        let consume = &rs.scope_spans[1].spans[1];
        assert_eq!(
            (consume.start_time_unix_nano, consume.end_time_unix_nano, consume.kind),
            (0, 0, 5)
        );
    }

    #[test]
    fn without_a_resource_the_request_matches_the_transform_default() {
        let (plain, ..) = scopes();
        assert_matches_reference(&[span("one", &plain, 1)], None);
        // A resource with neither attributes nor schema URL encodes the same way.
        let empty = Resource::builder_empty().build();
        assert_eq!(EncodedResource::new(&empty), EncodedResource::default());
        assert_matches_reference(&[], Some(&empty));
    }

    #[test]
    fn length_prefixes_of_every_size_are_patched() {
        let (plain, ..) = scopes();
        // Attribute values around the 1-, 2- and 3-byte varint boundaries: span lengths below
        // the 2 reserved bytes, at them and above them; scope and resource lengths both ways.
        let mut batch = Vec::new();
        for (i, size) in [0usize, 100, 127, 128, 300, 16_383, 16_384, 20_000, 2_100_000]
            .into_iter()
            .enumerate()
        {
            let mut s = span("big", &plain, i as u64 + 1);
            s.attributes = vec![KeyValue::new("v", "x".repeat(size))];
            s.events.events = vec![Event::new(
                "e",
                at(1),
                vec![KeyValue::new("v", "y".repeat(size / 2))],
                0,
            )];
            batch.push(s);
            assert_matches_reference(&batch[i..], Some(&resource()));
        }
        assert_matches_reference(&batch, Some(&resource()));
        let mut s = span("", &plain, 1);
        s.span_context = context(0, 0, false, false, "");
        s.start_time = UNIX_EPOCH;
        s.end_time = UNIX_EPOCH;
        assert_matches_reference(&[s], None);
    }

    #[test]
    fn varint_lengths() {
        for (v, n) in [(0u64, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (u64::MAX, 10)] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!((varint_len(v), out.len()), (n, n), "{v}");
        }
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::I64),
            any::<f64>()
                .prop_filter("NaN != NaN", |f| !f.is_nan())
                .prop_map(Value::F64),
            ".{0,200}".prop_map(Value::from),
            proptest::collection::vec(any::<i64>(), 0..40).prop_map(|v| Value::Array(Array::I64(v))),
            proptest::collection::vec(".{0,20}", 0..10)
                .prop_map(|v| Value::Array(Array::String(v.into_iter().map(Into::into).collect()))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_attributes_match_the_transform(
            attrs in proptest::collection::vec(("[a-z.]{0,12}", any_value()), 0..30),
            name in ".{0,40}",
            dropped in any::<u32>(),
            start in any::<u64>(),
        ) {
            let (plain, ..) = scopes();
            let mut s = span("x", &plain, 1);
            s.name = Cow::Owned(name);
            s.attributes = attrs.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect();
            s.dropped_attributes_count = dropped;
            s.start_time = at(start);
            // One resource for both: its attribute order is a hash map's.
            let res = resource();
            let ours = encode(std::slice::from_ref(&s), Some(&res));
            prop_assert_eq!(ours, reference(&[s], Some(&res)).encode_to_vec());
        }
    }

    #[test]
    fn headers_parse_like_opentelemetry_otlp() {
        let h = parse_headers(" api-key = s3cr%2Ct ,x-empty=, =v, no-equals, bad name=v, x-raw=50%zz,api-key2=a=b");
        assert_eq!(h.get("api-key").map(HeaderValue::as_bytes), Some(&b"s3cr,t"[..]));
        assert_eq!(h.get("x-raw").map(HeaderValue::as_bytes), Some(&b"50%zz"[..]));
        assert_eq!(h.get("api-key2").map(HeaderValue::as_bytes), Some(&b"a=b"[..]));
        assert_eq!(h.len(), 3, "{h:?}");
        assert!(parse_headers("").is_empty());
    }

    #[test]
    fn partial_successes_are_read_from_the_response() {
        let body =
            |p: Option<ExportTracePartialSuccess>| ExportTraceServiceResponse { partial_success: p }.encode_to_vec();
        assert_eq!(partial_success(&body(None)), None);
        assert_eq!(partial_success(&body(Some(ExportTracePartialSuccess::default()))), None);
        let p = ExportTracePartialSuccess {
            rejected_spans: 7,
            error_message: "too old".into(),
        };
        assert_eq!(partial_success(&body(Some(p))), Some((7, "too old".to_owned())));
        assert_eq!(partial_success(b"\x0a\x05\x08"), None, "truncated");
        assert_eq!(partial_success(b"not protobuf at all"), None);
    }

    #[tokio::test]
    async fn endpoints_must_be_http_urls() {
        let client = || ExportClient::new(tokio::runtime::Handle::current(), Duration::from_secs(1));
        for bad in ["collector:4318", "ftp://c/v1/traces", "/v1/traces", "http://"] {
            let e = OtlpHttpExporter::new(client(), bad, Duration::from_secs(1))
                .map(|_| ())
                .unwrap_err();
            assert!(
                matches!(&e, OtlpHttpError::InvalidEndpoint { endpoint, .. } if endpoint == bad),
                "{e}"
            );
        }
        assert!(OtlpHttpExporter::new(client(), "https://c:4318/v1/traces", Duration::from_secs(1)).is_ok());
    }

    /// What a [`Receiver`] saw of one request.
    struct Seen {
        method: Method,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    }

    /// An OTLP/HTTP receiver on 127.0.0.1 answering with `statuses` in turn (the last one
    /// repeats).
    struct Receiver {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Receiver {
        async fn start(statuses: &[u16]) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let statuses = Arc::new(statuses.to_vec());
            let seen2 = seen.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (seen, statuses) = (seen2.clone(), statuses.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let (seen, statuses) = (seen.clone(), statuses.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                let mut seen = seen.lock().expect("lock");
                                let status = statuses[seen.len().min(statuses.len() - 1)];
                                seen.push(Seen {
                                    method: parts.method,
                                    path: parts.uri.path().to_owned(),
                                    headers: parts.headers,
                                    body,
                                });
                                let mut resp = Response::new(Full::new(Bytes::from(
                                    ExportTraceServiceResponse::default().encode_to_vec(),
                                )));
                                *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                                Ok::<_, Infallible>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            Self { addr, seen }
        }

        fn exporter(&self) -> OtlpHttpExporter<ExportClient> {
            let timeout = Duration::from_secs(10);
            let client = ExportClient::new(tokio::runtime::Handle::current(), timeout);
            let mut e = OtlpHttpExporter::new(client, &format!("http://{}/v1/traces", self.addr), timeout)
                .expect("exporter")
                .with_headers(parse_headers("x-api-key=k1,content-type=text/plain"));
            e.retry.initial_delay = Duration::ZERO;
            e
        }
    }

    #[tokio::test]
    async fn an_export_posts_the_encoded_batch() {
        let rx = Receiver::start(&[200]).await;
        let mut exporter = rx.exporter();
        let res = resource();
        exporter.set_resource(&res);
        let batch = rich_batch();
        exporter.export(batch.clone()).await.expect("export");
        exporter.export(Vec::new()).await.expect("empty batch");
        let seen = rx.seen.lock().expect("lock");
        assert_eq!(seen.len(), 1, "an empty batch sends nothing");
        let req = &seen[0];
        assert_eq!((&req.method, req.path.as_str()), (&Method::POST, "/v1/traces"));
        assert_eq!(
            req.headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes),
            Some(PROTOBUF_CONTENT_TYPE.as_bytes())
        );
        assert_eq!(
            req.headers.get("x-api-key").map(HeaderValue::as_bytes),
            Some(&b"k1"[..])
        );
        let decoded = ExportTraceServiceRequest::decode(req.body.clone()).expect("decodes");
        assert_eq!(decoded, reference(&batch, Some(&res)));
    }

    #[tokio::test]
    async fn an_error_status_fails_the_export_and_only_some_are_retried() {
        let (plain, ..) = scopes();
        let batch = vec![span("one", &plain, 1)];

        let rx = Receiver::start(&[500]).await;
        let err = rx.exporter().export(batch.clone()).await.expect_err("500 fails");
        assert!(err.to_string().contains("500"), "{err}");
        assert_eq!(rx.seen.lock().expect("lock").len(), 1, "500 is not retried");

        let rx = Receiver::start(&[503, 429, 200]).await;
        rx.exporter().export(batch.clone()).await.expect("retried until 200");
        {
            let seen = rx.seen.lock().expect("lock");
            assert_eq!(seen.len(), 3);
            assert!(seen.iter().all(|s| s.body == seen[0].body), "the same body every time");
        }

        let rx = Receiver::start(&[503]).await;
        let err = rx.exporter().export(batch).await.expect_err("503 forever fails");
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(rx.seen.lock().expect("lock").len(), 4, "one attempt and three retries");
    }

    #[tokio::test]
    async fn an_unreachable_collector_is_an_error_and_shutdown_stops_exports() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let timeout = Duration::from_secs(5);
        let client = ExportClient::new(tokio::runtime::Handle::current(), timeout);
        let mut exporter =
            OtlpHttpExporter::new(client, &format!("http://{addr}/v1/traces"), timeout).expect("exporter");
        exporter.retry.initial_delay = Duration::ZERO;
        let (plain, ..) = scopes();
        let err = exporter
            .export(vec![span("one", &plain, 1)])
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");

        exporter.shutdown().expect("first shutdown");
        assert!(matches!(exporter.shutdown(), Err(OTelSdkError::AlreadyShutdown)));
        assert!(matches!(
            exporter.export(vec![span("one", &plain, 1)]).await,
            Err(OTelSdkError::AlreadyShutdown)
        ));
    }
}
