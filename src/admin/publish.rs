//! `POST /publish` and `POST /publish/` (PROTOCOL.md section 6), Pushpin-compatible, plus the
//! request plumbing the connection API shares: authentication, bounded body reading and plain
//! responses.
//!
//! | outcome | status | body |
//! |---|---|---|
//! | published | `200` | `Published\n`, or `{"message":"Published"}` for `Accept: application/json` |
//! | bad body | `400` | the [`PublishError`](crate::protocol::publish::PublishError) reason and `\n` |
//! | not authenticated | `401` | the reason; `WWW-Authenticate: Bearer` |
//! | other method | `405` | `Allow: POST` |
//! | body over the limit | `413` | |

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::AdminState;
use super::auth::AuthError;
use crate::protocol::publish::parse_publish;
use crate::server::{ResponseBody, text_response};

/// Default limit of a publish (and connection API) request body, as Pushpin's.
pub const DEFAULT_MAX_PUBLISH_BODY: usize = 1_000_000;

/// After a body went over the limit, at most this many more bytes are read and thrown away so
/// the client sees the `413` instead of a connection reset.
const MAX_DISCARD_BYTES: usize = 1 << 20;

/// How long discarding the rest of an oversized body may take.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Handles `/publish` and `/publish/`, whatever the method.
pub async fn handle(st: &AdminState, req: Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::POST {
        return method_not_allowed("POST");
    }
    if let Err(refusal) = authenticate(st, req.headers()) {
        return refusal.into_response();
    }
    let wants_json = accepts_json(req.headers());
    // One span per publish (an incoming traceparent is its parent), with the delivery count.
    let span = crate::telemetry::publish_span(req.headers());
    let body = match read_body(req, st.max_publish_body).await {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let publish = match parse_publish(&body) {
        Ok(p) => p,
        Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let delivered = {
        use tracing::Instrument;
        st.hub.publish(&publish.items).instrument(span.clone()).await
    };
    crate::telemetry::record_publish(&span, publish.items.len(), delivered);
    tracing::debug!(items = publish.items.len(), delivered, "published");
    if wants_json {
        json_response(StatusCode::OK, r#"{"message":"Published"}"#)
    } else {
        text_response(StatusCode::OK, "Published\n")
    }
}

/// Whether the request's `Accept` lists `application/json`.
fn accepts_json(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|range| {
                range
                    .split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            })
        })
    })
}

/// Why an admin API request was refused before its body was looked at.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// `401`: authentication is configured and the request did not pass it.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthError),
    /// `413`: the body is over the limit.
    #[error("body is over {0} bytes")]
    TooLarge(usize),
    /// `400`: the body could not be read.
    #[error("could not read the body: {0}")]
    Unreadable(String),
}

impl Refusal {
    /// The response for this refusal: its `Display` and a newline as a text body.
    pub(crate) fn into_response(self) -> Response<ResponseBody> {
        let status = match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unreadable(_) => StatusCode::BAD_REQUEST,
        };
        let mut resp = text_response(status, format!("{self}\n"));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Checks the configured authentication.
pub(crate) fn authenticate(st: &AdminState, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(auth) = &st.auth else {
        return Ok(());
    };
    auth.check(headers).map_err(|e| {
        tracing::debug!(cause = %e, "admin request not authenticated");
        Refusal::Unauthorized(e)
    })
}

/// Reads a request body of at most `limit` bytes. Never holds more than `limit` bytes: a
/// declared `Content-Length` over the limit is refused before reading, and a streamed body is
/// cut at the limit.
pub(crate) async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard(req.into_body()).await;
        return Err(Refusal::TooLarge(limit));
    }
    let mut incoming = req.into_body();
    let mut body = Limited::new(&mut incoming, limit);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Err(e) if e.is::<LengthLimitError>() => {
                drop(buf);
                discard(incoming).await;
                return Err(Refusal::TooLarge(limit));
            }
            Err(e) => return Err(Refusal::Unreadable(e.to_string())),
        }
    }
    Ok(buf.freeze())
}

/// Reads and drops what is left of a refused body, within [`MAX_DISCARD_BYTES`] and
/// [`DISCARD_TIMEOUT`], so the refusal reaches a client that is still sending.
async fn discard(body: Incoming) {
    let mut body = Limited::new(body, MAX_DISCARD_BYTES);
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async { while let Some(Ok(_)) = body.frame().await {} }).await;
}

/// `405` with `Allow: allow`.
pub(crate) fn method_not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut resp = text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// A response with a JSON body.
pub(crate) fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = text_response(status, body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT, HeaderValue::from_str(v).expect("header value"));
        }
        h
    }

    #[test]
    fn accept_json() {
        assert!(accepts_json(&accept(&["application/json"])));
        assert!(accepts_json(&accept(&["text/html, Application/JSON;q=0.9"])));
        assert!(accepts_json(&accept(&["text/plain", "application/json"])));
        assert!(!accepts_json(&accept(&[])));
        assert!(!accepts_json(&accept(&["*/*"])));
        assert!(!accepts_json(&accept(&["application/jsonx"])));
    }
}
