//! Plain HTTP pass-through to `http://` backends inside the client connection's own task.
//!
//! The service future that hyper's server connection polls checks out an idle backend socket
//! (or connects one), writes the request head and streams the request body itself, and parses
//! the response head with `httparse`; the response body handed back to hyper reads the backend
//! socket directly in `poll_frame`. The backend socket's readiness therefore wakes the client
//! connection's task: no dispatcher task, no channel, no per-request pool bookkeeping beyond a
//! checkout and a checkin. A socket goes back to the pool only when its response ended cleanly
//! on a reusable connection; a response dropped early closes it.
//!
//! Request bodies keep their framing: a known length is sent as `Content-Length`, an unknown
//! one with chunked encoding. The body is sent while the response head is awaited and, if the
//! backend answers before it has read the whole body, while the response body streams (full
//! duplex). A request without a body that meets a reused socket closed before any response
//! byte goes once more on a new connection, as the in-task events client does.
//!
//! Cancel safety: dropping the service future or the response body at any point closes the
//! backend socket; nothing is returned to the pool half-used.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tracing::Span;

use super::{ResponseBody, text_response};
use crate::session::BackendError;
use crate::transport::backend::RequestTemplate;
use crate::transport::h1::{self, ChunkDecoder, Failure, Framing, H1Pool};

/// Request body bytes gathered before they are written (one vectored write).
const GATHER_BYTES: usize = 64 * 1024;
/// Most buffers in one vectored write.
const MAX_SEGMENTS: usize = 8;
/// Bytes asked of the kernel per read of a response.
const READ_CHUNK: usize = 64 * 1024;

/// Why a streamed pass-through response body ended early.
#[derive(Debug, thiserror::Error)]
enum PassError {
    /// Reading the backend socket failed.
    #[error("reading the backend response body: {0}")]
    Read(#[source] io::Error),
    /// The backend closed the connection before the body's end.
    #[error("backend closed the connection mid-body")]
    ClosedMidBody,
    /// The backend's chunked encoding was malformed.
    #[error("invalid chunked response body: {0}")]
    Chunked(&'static str),
    /// The client's request body failed while it was still being sent.
    #[error("client request body failed: {0}")]
    RequestBody(String),
}

/// True when [`forward`] can carry this request: an `http://` backend and nothing that needs
/// the general client (protocol upgrades, `CONNECT`).
pub(super) fn can_forward(req: &Request<Incoming>, template: &RequestTemplate) -> bool {
    template.uri.scheme() == Some(&http::uri::Scheme::HTTP)
        && template.uri.authority().is_some()
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(header::UPGRADE)
}

/// How the request body is framed towards the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqFraming {
    /// No body and no `Content-Length`.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Proxies `req` to the route's `http://` backend (see the module docs). Statuses: the
/// backend's, or `502 backend unavailable` / `504 backend timed out`.
pub(super) async fn forward(
    gw: &super::Gateway,
    req: Request<Incoming>,
    template: RequestTemplate,
    span: &Span,
) -> Response<ResponseBody> {
    let route = &template.route;
    let Some(authority) = template.uri.authority().cloned() else {
        // `can_forward` checked it.
        return text_response(StatusCode::BAD_GATEWAY, "backend unavailable\n");
    };
    let (parts, body) = req.into_parts();
    let head_request = parts.method == Method::HEAD;
    let empty = body.is_end_stream();
    let framing = if empty {
        if parts.headers.contains_key(header::CONTENT_LENGTH) {
            ReqFraming::Length(0)
        } else {
            ReqFraming::None
        }
    } else {
        match body.size_hint().exact() {
            Some(n) => ReqFraming::Length(n),
            None => ReqFraming::Chunked,
        }
    };
    // The proxy span's trace context replaces the client's (empty when tracing is off).
    let mut trace = HeaderMap::new();
    crate::telemetry::inject(span, &mut trace);
    let head = request_head(&parts.method, &template, &trace, framing);
    // An empty body is never polled: a retried request resends only its head.
    let body = (!empty).then_some(body);
    let pool = gw.pool.h1.clone();
    let exchange = exchange(&pool, authority.as_str(), head, body, route.timeouts.connect);
    let (conn, resp) = match tokio::time::timeout(route.timeouts.request, exchange).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(cause = %e, "pass-through request failed");
            crate::telemetry::record_proxy_status(span, StatusCode::BAD_GATEWAY, Some("failed"));
            return text_response(StatusCode::BAD_GATEWAY, "backend unavailable\n");
        }
        Err(_) => {
            crate::telemetry::record_proxy_status(span, StatusCode::GATEWAY_TIMEOUT, Some("timeout"));
            return text_response(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n");
        }
    };
    crate::telemetry::record_proxy_status(span, resp.status, None);
    let h1::Head {
        status,
        mut headers,
        framing,
        keep_alive,
        ..
    } = resp;
    let framing = if head_request { Framing::Length(0) } else { framing };
    if framing == Framing::Chunked {
        // Transfer-Encoding wins over a Content-Length (RFC 9112 6.3); hyper frames the body
        // for the client again.
        headers.remove(header::CONTENT_LENGTH);
    }
    super::proxy::strip_hop_by_hop(&mut headers);
    let body = BackendBody::new(conn, framing, keep_alive, pool, authority);
    let mut out = Response::new(body.into_response_body());
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// Sends the request and reads the response head: on a pooled socket first, then (or when the
/// pooled one turned out closed before answering a request without a body) on a new one.
async fn exchange(
    pool: &Arc<H1Pool>,
    authority: &str,
    head: Bytes,
    body: Option<Incoming>,
    connect_timeout: std::time::Duration,
) -> Result<(Conn, h1::Head), BackendError> {
    let retryable = body.is_none();
    let mut body = body;
    if let Some((stream, buf)) = pool.checkout(authority) {
        let sender = Sender::new(head.clone(), body.take());
        let mut conn = Conn::new(stream, buf, sender, pool.head_limits());
        match std::future::poll_fn(|cx| conn.poll_head(cx, retryable)).await {
            Ok(h) => return Ok((conn, h)),
            Err(Failure::Stale) => {}
            Err(Failure::Error(e)) => return Err(e),
        }
    }
    let stream = h1::connect(authority, connect_timeout).await?;
    let mut conn = Conn::new(stream, BytesMut::new(), Sender::new(head, body), pool.head_limits());
    match std::future::poll_fn(|cx| conn.poll_head(cx, false)).await {
        Ok(h) => Ok((conn, h)),
        Err(Failure::Stale) => Err(BackendError::Failed(
            "backend closed the connection before responding".into(),
        )),
        Err(Failure::Error(e)) => Err(e),
    }
}

/// The request head: request line, the template's headers (`trace` replacing the client's
/// trace context when it is not empty) and the request body's framing header.
fn request_head(method: &Method, template: &RequestTemplate, trace: &HeaderMap, framing: ReqFraming) -> Bytes {
    use crate::transport::backend::put_header;
    let path = template.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = BytesMut::with_capacity(path.len() + 640);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    template.write_http1_headers(&mut out, !trace.is_empty());
    for (name, value) in trace {
        put_header(&mut out, name.as_str(), value.as_bytes());
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => put_header(&mut out, "content-length", n.to_string().as_bytes()),
        ReqFraming::Chunked => put_header(&mut out, "transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// Why sending the request stopped.
enum SendError {
    /// Writing to the backend failed.
    Write(io::Error),
    /// The client's request body failed.
    Body(hyper::Error),
}

/// Writes the request head and streams the request body (chunk-encoding it when asked).
struct Sender {
    /// Bytes to write, in order.
    pending: VecDeque<Bytes>,
    /// Bytes in `pending`.
    queued: usize,
    /// The client's body until it has ended.
    body: Option<Incoming>,
    chunked: bool,
}

impl Sender {
    fn new(head: Bytes, body: Option<Incoming>) -> Self {
        let chunked = body.as_ref().is_some_and(|b| b.size_hint().exact().is_none());
        let mut pending = VecDeque::with_capacity(if body.is_some() { MAX_SEGMENTS } else { 1 });
        let queued = head.len();
        pending.push_back(head);
        Self {
            pending,
            queued,
            body,
            chunked,
        }
    }

    fn push(&mut self, b: Bytes) {
        self.queued += b.len();
        self.pending.push_back(b);
    }

    fn push_data(&mut self, data: Bytes) {
        if self.chunked {
            let mut size = BytesMut::with_capacity(20);
            size.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            self.push(size.freeze());
            self.push(data);
            self.push(Bytes::from_static(b"\r\n"));
        } else {
            self.push(data);
        }
    }

    /// Drives the request to the backend: `Ready(Ok)` once everything was written.
    fn poll_send(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<Result<(), SendError>> {
        loop {
            // Gather what the client's body has ready, so it goes out in one write.
            while let Some(body) = self.body.as_mut()
                && self.queued < GATHER_BYTES
                && self.pending.len() + 3 <= MAX_SEGMENTS
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are not forwarded.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            self.push_data(data);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(SendError::Body(e))),
                    Poll::Ready(None) => {
                        if self.chunked {
                            self.push(Bytes::from_static(b"0\r\n\r\n"));
                        }
                        self.body = None;
                    }
                    Poll::Pending => break,
                }
            }
            if self.pending.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let mut slices = [IoSlice::new(&[]); MAX_SEGMENTS];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(self.pending.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let written = match Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(SendError::Write(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Write(e))),
                Poll::Pending => return Poll::Pending,
            };
            self.advance(written);
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.pending.front_mut() else { return };
            if front.len() <= n {
                n -= front.len();
                self.pending.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// One backend connection during an exchange.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// The request, while it is still being sent.
    sender: Option<Sender>,
    /// The request was sent completely (else the connection cannot be reused).
    sent: bool,
    /// Any response byte was read.
    seen: bool,
    /// Why sending stopped early, for the error message if no response follows.
    send_error: Option<io::Error>,
    /// Limits on the response head.
    head_limits: h1::HeadLimits,
}

impl Conn {
    /// `buf`: the read buffer the pool kept with the socket (empty), or a new one.
    fn new(stream: TcpStream, buf: BytesMut, sender: Sender, head_limits: h1::HeadLimits) -> Self {
        Self {
            stream,
            buf,
            sender: Some(sender),
            sent: false,
            seen: false,
            send_error: None,
            head_limits,
        }
    }

    /// Drives the sender, if any. A write failure stops sending (the response may still come);
    /// a failure of the client's body is returned.
    fn poll_sender(&mut self, cx: &mut Context<'_>) -> Result<(), SendError> {
        let Some(sender) = self.sender.as_mut() else {
            return Ok(());
        };
        match sender.poll_send(cx, &mut self.stream) {
            Poll::Ready(Ok(())) => {
                self.sender = None;
                self.sent = true;
                Ok(())
            }
            Poll::Ready(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Poll::Pending => Ok(()),
        }
    }

    /// Reads what the socket has into `buf`; `Ok(0)` at the end of the stream. (Through
    /// `AsyncRead`, which takes a short read as "drained": the next wait costs no `recv` that
    /// would only say `EAGAIN`, and an idle pooled socket passes its open check for free.)
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK.min(self.buf.capacity().max(4096)));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }

    /// Sends the request and reads up to the final response head. `stale_ok`: a connection
    /// closed before any response byte is reported as [`Failure::Stale`] (a reused socket
    /// and a request whose whole content is its head).
    fn poll_head(&mut self, cx: &mut Context<'_>, stale_ok: bool) -> Poll<Result<h1::Head, Failure>> {
        loop {
            match self.poll_sender(cx) {
                Ok(()) => {}
                Err(SendError::Write(e)) => {
                    if stale_ok && !self.seen && h1::is_closed(&e) {
                        return Poll::Ready(Err(Failure::Stale));
                    }
                    // The backend may have answered before closing: keep reading.
                    self.send_error = Some(e);
                }
                Err(SendError::Body(e)) => {
                    return Poll::Ready(Err(failed("reading the client's request body", e)));
                }
            }
            if !self.buf.is_empty() {
                match h1::parse_head(&mut self.buf, self.head_limits)? {
                    Some(head) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        return Poll::Ready(Err(failed(
                            "invalid response",
                            "101 Switching Protocols to a request without an upgrade",
                        )));
                    }
                    Some(head) if head.status.is_informational() => continue,
                    Some(head) => return Poll::Ready(Ok(head)),
                    None => {}
                }
            }
            match ready!(self.poll_read(cx)) {
                Ok(0) if stale_ok && !self.seen => return Poll::Ready(Err(Failure::Stale)),
                Ok(0) => {
                    let why = match &self.send_error {
                        Some(e) => format!("connection closed before the response head (after a write error: {e})"),
                        None => "connection closed before the response head".to_owned(),
                    };
                    return Poll::Ready(Err(failed("reading the response", why)));
                }
                Ok(_) => self.seen = true,
                Err(e) if stale_ok && !self.seen && h1::is_closed(&e) => return Poll::Ready(Err(Failure::Stale)),
                Err(e) => return Poll::Ready(Err(failed("reading the response", e))),
            }
        }
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Error(BackendError::Failed(format!("{what}: {e}")))
}

/// How much of the response body is left.
enum Remaining {
    Length(u64),
    Chunked(ChunkDecoder),
    UntilClose,
}

/// A response body read straight from the backend socket by whoever polls it (hyper's server
/// connection task); the socket goes back to the pool at a clean end.
struct BackendBody {
    /// `None` once the body has ended (or failed).
    conn: Option<Conn>,
    remaining: Remaining,
    keep_alive: bool,
    pool: Arc<H1Pool>,
    authority: Authority,
}

impl BackendBody {
    fn new(conn: Conn, framing: Framing, keep_alive: bool, pool: Arc<H1Pool>, authority: Authority) -> Self {
        let remaining = match framing {
            Framing::Length(n) => Remaining::Length(n),
            Framing::Chunked => Remaining::Chunked(ChunkDecoder::default()),
            Framing::UntilClose => Remaining::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            remaining,
            keep_alive,
            pool,
            authority,
        };
        if matches!(body.remaining, Remaining::Length(0)) {
            body.finish();
        }
        body
    }

    fn into_response_body(self) -> ResponseBody {
        if self.conn.is_none() {
            return crate::transport::backend::full_body(Bytes::new());
        }
        self.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed_unsync()
    }

    /// The body ended cleanly: the connection goes back to the pool if it can carry another
    /// request (the request was sent completely, nothing unread, no close requested).
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let reusable = self.keep_alive
            && conn.sent
            && conn.sender.is_none()
            && conn.buf.is_empty()
            && !matches!(self.remaining, Remaining::UntilClose);
        if reusable {
            self.pool.checkin(self.authority.as_str(), conn.stream, conn.buf);
        }
    }

    fn fail(&mut self, e: PassError) -> Poll<Option<Result<Frame<Bytes>, PassError>>> {
        tracing::debug!(cause = %e, "pass-through response body failed");
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = PassError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, PassError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        // The backend answered before it had the whole request body: keep sending it.
        match conn.poll_sender(cx) {
            Ok(()) | Err(SendError::Write(_)) => {}
            Err(SendError::Body(e)) => return this.fail(PassError::RequestBody(e.to_string())),
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.remaining {
                Remaining::Length(left) => {
                    if !conn.buf.is_empty() {
                        let take = usize::try_from(*left).unwrap_or(usize::MAX).min(conn.buf.len());
                        let data = conn.buf.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Remaining::Chunked(decoder) => {
                    let mut out = BytesMut::new();
                    let done = match decoder.decode(&mut conn.buf, &mut out) {
                        Ok(done) => done,
                        Err(e) => return this.fail(PassError::Chunked(e)),
                    };
                    if done {
                        this.finish();
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                    if done {
                        return Poll::Ready(None);
                    }
                }
                Remaining::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_read(cx)) {
                Ok(0) if matches!(this.remaining, Remaining::UntilClose) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(PassError::ClosedMidBody),
                Ok(_) => {}
                Err(e) => return this.fail(PassError::Read(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.remaining) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Remaining::Length(n)) => SizeHint::with_exact(*n),
            (Some(_), _) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: Method, headers: &[(&str, &str)], trace: &[(&str, &str)], framing: ReqFraming) -> String {
        let yaml = "routes:\n  - name: r\n    backend: {url: http://backend:8080/a}\n";
        let route = std::sync::Arc::new(crate::config::parse_routes_yaml(yaml).expect("routes").remove(0));
        let to_map = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (n, v) in pairs {
                map.append(
                    http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                    http::HeaderValue::from_str(v).expect("value"),
                );
            }
            map
        };
        let client = crate::transport::backend::ClientInfo {
            peer: "192.0.2.1:4000".parse().expect("addr"),
            tls: false,
        };
        let template =
            RequestTemplate::new(route, "/", "/b?x=1&y", &to_map(headers), &client, None, false).expect("template");
        String::from_utf8(request_head(&method, &template, &to_map(trace), framing).to_vec()).expect("utf-8")
    }

    #[test]
    fn request_heads_carry_the_body_framing_and_a_host() {
        let h = head(Method::GET, &[("accept", "*/*")], &[], ReqFraming::None);
        assert!(h.starts_with("GET /a/b?x=1&y HTTP/1.1\r\n"), "{h}");
        assert!(
            h.contains("\r\nhost: backend:8080\r\n"),
            "the backend's authority without a client Host: {h}"
        );
        assert!(h.contains("\r\naccept: */*\r\n") && h.ends_with("\r\n\r\n"), "{h}");
        assert!(!h.contains("content-length") && !h.contains("transfer-encoding"), "{h}");
        // The client's own framing headers are replaced by the body's real framing.
        let h = head(
            Method::POST,
            &[("host", "front"), ("content-length", "99"), ("x-a", "1"), ("x-a", "2")],
            &[],
            ReqFraming::Length(7),
        );
        assert!(
            h.starts_with("POST /a/b?x=1&y HTTP/1.1\r\nx-a: 1\r\nx-a: 2\r\nhost: front\r\n"),
            "{h}"
        );
        assert!(h.ends_with("content-length: 7\r\n\r\n") && !h.contains("99"), "{h}");
        let h = head(
            Method::PUT,
            &[("host", "front"), ("transfer-encoding", "gzip")],
            &[],
            ReqFraming::Chunked,
        );
        assert!(
            h.ends_with("\r\ntransfer-encoding: chunked\r\n\r\n") && !h.contains("gzip"),
            "{h}"
        );
        let h = head(Method::DELETE, &[("host", "front")], &[], ReqFraming::Length(0));
        assert!(h.ends_with("\r\ncontent-length: 0\r\n\r\n"), "{h}");
        // A traced request carries the proxy span's trace context, not the client's.
        let h = head(
            Method::GET,
            &[("traceparent", "00-11111111111111111111111111111111-2222222222222222-01")],
            &[("traceparent", "00-33333333333333333333333333333333-4444444444444444-01")],
            ReqFraming::None,
        );
        assert!(h.contains("traceparent: 00-3333") && !h.contains("00-1111"), "{h}");
    }
}
