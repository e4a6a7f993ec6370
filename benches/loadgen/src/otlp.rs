//! `otlp-sink`: a stand-in OpenTelemetry collector for the tracing-cost scenario.
//!
//! It accepts OTLP/HTTP protobuf exports (`POST /v1/traces`), answers each with `200` and an
//! empty `ExportTraceServiceResponse` (an empty protobuf body is that message with every field
//! unset), and counts requests, body bytes and spans (per span name), so the benchmark can
//! prove that spans were exported. `GET /stats` returns the counts as one JSON object; the
//! same object is printed on stdout when `--max-time` ends the sink.
//!
//! The body is walked as protobuf just deep enough to count spans:
//! `ExportTraceServiceRequest.resource_spans (1)` → `ResourceSpans.scope_spans (2)` →
//! `ScopeSpans.spans (2)` → `Span.name (5)`. A body that does not parse is still answered
//! `200` and counted as undecodable.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::args::Args;
use crate::servers::{accept_loop, bind};
use crate::stats::Json;

/// Largest export body read (the SDK's batches are far smaller).
const MAX_EXPORT_BODY: usize = 64 << 20;

/// Distinct span names tracked; later new names are counted under `(other)`.
const MAX_NAMES: usize = 64;

/// What the sink has received.
#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    bytes: AtomicU64,
    spans: AtomicU64,
    undecodable: AtomicU64,
    names: Mutex<BTreeMap<String, u64>>,
}

impl Counts {
    fn json(&self) -> String {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_name = Json::new();
        for (name, n) in names.iter() {
            by_name = by_name.num(&escape_key(name), *n as f64);
        }
        Json::new()
            .num("requests", self.requests.load(Ordering::Relaxed) as f64)
            .num("bytes", self.bytes.load(Ordering::Relaxed) as f64)
            .num("spans", self.spans.load(Ordering::Relaxed) as f64)
            .num("undecodable", self.undecodable.load(Ordering::Relaxed) as f64)
            .raw("names", &by_name.end())
            .end()
    }

    fn record(&self, body: &[u8]) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut names = Vec::new();
        match span_names(body, &mut names) {
            Some(()) => {
                self.spans.fetch_add(names.len() as u64, Ordering::Relaxed);
                let mut map = self.names.lock().unwrap_or_else(|e| e.into_inner());
                for name in names {
                    let name = String::from_utf8_lossy(name);
                    let key = if map.contains_key(name.as_ref()) || map.len() < MAX_NAMES {
                        name.into_owned()
                    } else {
                        "(other)".to_owned()
                    };
                    *map.entry(key).or_insert(0) += 1;
                }
            }
            None => {
                self.undecodable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A span name as a JSON object key: the writer does not escape keys, so quotes, backslashes
/// and control characters are replaced.
fn escape_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '"' || c == '\\' || (c as u32) < 0x20 {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Runs the sink.
pub async fn sink(a: &Args) -> Result<()> {
    let (listener, max_time) = bind(a).await?;
    let counts = Arc::new(Counts::default());
    let served = counts.clone();
    accept_loop(listener, max_time, move |stream| {
        let counts = served.clone();
        async move {
            let svc = service_fn(move |req| handle(req, counts.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    })
    .await?;
    println!("{}", counts.json());
    Ok(())
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(req: Request<Incoming>, counts: Arc<Counts>) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/traces") => {
            let body = match Limited::new(req.into_body(), MAX_EXPORT_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", Bytes::new())),
            };
            counts.record(&body);
            // An empty ExportTraceServiceResponse: no partial_success, i.e. all accepted.
            Ok(reply(StatusCode::OK, "application/x-protobuf", Bytes::new()))
        }
        (&Method::GET, "/stats") => Ok(reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(counts.json() + "\n"),
        )),
        _ => Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        )),
    }
}

// ---- a minimal protobuf walk -----------------------------------------------------------------

/// One field of a protobuf message: its number and, for length-delimited fields, the bytes.
enum Field<'a> {
    Len(u64, &'a [u8]),
    Other,
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    // Bounded: a varint has at most 10 bytes.
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Every field of `msg`, or `None` when it is not valid protobuf.
fn fields(msg: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    // Bounded: every iteration consumes at least one byte.
    while pos < msg.len() {
        let key = varint(msg, &mut pos)?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(msg, &mut pos)?;
                out.push(Field::Other);
            }
            1 | 5 => {
                pos = pos.checked_add(if wire == 1 { 8 } else { 4 })?;
                if pos > msg.len() {
                    return None;
                }
                out.push(Field::Other);
            }
            2 => {
                let len = usize::try_from(varint(msg, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                out.push(Field::Len(number, msg.get(pos..end)?));
                pos = end;
            }
            // Groups (3, 4) are not used by OTLP; anything else is not protobuf.
            _ => return None,
        }
    }
    Some(out)
}

/// The length-delimited fields numbered `number` in `msg`.
fn submessages(msg: &[u8], number: u64) -> Option<Vec<&[u8]>> {
    Some(
        fields(msg)?
            .into_iter()
            .filter_map(|f| match f {
                Field::Len(n, b) if n == number => Some(b),
                _ => None,
            })
            .collect(),
    )
}

/// Appends the name of every span in an `ExportTraceServiceRequest` to `out`; `None` when the
/// body is not one.
fn span_names<'a>(body: &'a [u8], out: &mut Vec<&'a [u8]>) -> Option<()> {
    // resource_spans, scope_spans, spans.
    const PATH: [u64; 3] = [1, 2, 2];
    let mut level: Vec<&[u8]> = vec![body];
    for number in PATH {
        let mut next = Vec::new();
        for m in level {
            next.extend(submessages(m, number)?);
        }
        level = next;
    }
    for span in level {
        let name = submessages(span, 5)?.last().copied().unwrap_or_default();
        out.push(name);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![u8::try_from(number << 3 | 2).unwrap()];
        let mut n = payload.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                v.push(b);
                break;
            }
            v.push(b | 0x80);
        }
        v.extend_from_slice(payload);
        v
    }

    fn span(name: &str) -> Vec<u8> {
        // trace_id (1), span_id (2), name (5), kind (6, varint), start time (7, fixed64).
        let mut s = len_field(1, &[7; 16]);
        s.extend(len_field(2, &[9; 8]));
        s.extend(len_field(5, name.as_bytes()));
        s.extend([6 << 3, 3]);
        s.push(7 << 3 | 1);
        s.extend([1; 8]);
        s
    }

    fn request(scopes: &[&[&str]]) -> Vec<u8> {
        let mut rs = len_field(1, &len_field(1, b"resource attrs"));
        for spans in scopes {
            let mut scope = len_field(1, &len_field(1, b"wsgate"));
            for name in *spans {
                scope.extend(len_field(2, &span(name)));
            }
            rs.extend(len_field(2, &scope));
        }
        len_field(1, &rs)
    }

    #[test]
    fn counts_spans_by_name() {
        let c = Counts::default();
        c.record(&request(&[&["backend.request", "backend.request"], &["ws.connection"]]));
        c.record(&request(&[&["backend.request"]]));
        c.record(b"");
        assert_eq!(c.requests.load(Ordering::Relaxed), 3);
        assert_eq!(c.spans.load(Ordering::Relaxed), 4);
        assert_eq!(c.undecodable.load(Ordering::Relaxed), 0);
        let j = c.json();
        assert!(j.contains(r#""names":{"backend.request":3,"ws.connection":1}"#), "{j}");
        assert!(j.starts_with(r#"{"requests":3,"bytes":"#), "{j}");
    }

    #[test]
    fn garbage_is_undecodable_not_a_panic() {
        let c = Counts::default();
        let good = request(&[&["a"]]);
        for cut in 1..good.len() {
            c.record(&good[..cut]);
        }
        c.record(&[0xff; 20]);
        c.record(&[0x0b]); // wire type 3 (group)
        assert_eq!(c.spans.load(Ordering::Relaxed), 0);
        // Every cut (len - 1 of them) and both garbage bodies.
        assert_eq!(c.undecodable.load(Ordering::Relaxed), good.len() as u64 + 1);
    }

    #[test]
    fn long_varints_are_refused() {
        let mut pos = 0;
        assert_eq!(varint(&[0x80; 11], &mut pos), None);
        pos = 0;
        assert_eq!(varint(&[0xac, 0x02], &mut pos), Some(300));
    }

    #[test]
    fn keys_are_sanitized() {
        assert_eq!(escape_key("a\"b\\c\n"), "a_b_c_");
    }
}
