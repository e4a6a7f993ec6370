//! A minimal HTTP/1.1 client for `http://` backends, run inside the connection's own task.
//!
//! Every events request is a `POST` with a known body and every response is read whole, so
//! the exchange needs no dispatcher task, no channel and no per-request header map: the
//! request head is written from a pre-serialized header block, the response is parsed with
//! `httparse`, and the socket's readiness wakes the WebSocket connection's task directly.
//! Idle sockets wait in a process-wide LIFO pool, so a few hundred backend connections serve
//! any number of WebSocket connections (an idle WebSocket connection holds none).
//!
//! `https://` backends go through the pooled hyper client in [`super::backend`].

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::session::{BackendError, BackendResponse};

/// Upper bound of [`HeadLimits::max_headers`] (the parser's header slots live on the stack).
pub const MAX_HEADERS_CAP: usize = 256;

/// Limits on a backend's response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Largest response head (status line and headers), in bytes.
    pub max_bytes: usize,
    /// Most response headers (at most [`MAX_HEADERS_CAP`]).
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
            max_headers: 100,
        }
    }
}
/// Bodies up to this size are copied behind the head so the request is one `write`.
const COALESCE_BODY: usize = 16 * 1024;

struct Idle {
    stream: TcpStream,
    /// The connection's read buffer, kept for its next response (empty; not held when large).
    buf: BytesMut,
    since: Instant,
}

/// Largest read buffer an idle connection keeps for its next response.
const KEEP_BUF: usize = 16 * 1024;

/// FNV-1a: keys are backend addresses from the configuration (no flooding concern), and this
/// lookup runs twice per backend request.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type IdleMap = HashMap<Box<str>, Vec<Idle>, std::hash::BuildHasherDefault<Fnv>>;

/// Idle keep-alive connections to `http://` backends, by `host:port`, kept per worker thread
/// (one shard per data-plane worker, one for every other thread: [`crate::worker::current`]). A
/// socket is registered with the reactor of the runtime that opened it; keeping idle sockets
/// per thread keeps each one on its own worker's reactor.
pub struct H1Pool {
    shards: Box<[Mutex<IdleMap>]>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    head: HeadLimits,
    reaper: std::sync::Once,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("idle_timeout", &self.idle_timeout)
            .field("max_idle_per_host", &self.max_idle_per_host)
            .finish_non_exhaustive()
    }
}

/// Limits of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeLimits {
    /// Connect timeout for a new backend connection.
    pub connect: Duration,
    /// Largest body of an accepted response (`200` with the events media type).
    pub max_body: usize,
    /// Largest body kept from any other response (the rest is discarded with the connection).
    pub max_reject_body: usize,
}

impl H1Pool {
    /// A pool keeping idle connections for `idle_timeout`, at most `max_idle_per_host` per
    /// backend address and shard; responses must fit `head`. `workers` data-plane threads get
    /// a shard each; every other thread shares one more.
    pub fn new(idle_timeout: Duration, max_idle_per_host: usize, head: HeadLimits, workers: usize) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..=workers).map(|_| Mutex::new(IdleMap::default())).collect(),
            idle_timeout,
            max_idle_per_host,
            head: HeadLimits {
                max_bytes: head.max_bytes,
                max_headers: head.max_headers.clamp(1, MAX_HEADERS_CAP),
            },
            reaper: std::sync::Once::new(),
        })
    }

    /// The limits on response heads.
    pub fn head_limits(&self) -> HeadLimits {
        self.head
    }

    /// Idle connections currently held (all backends, all shards).
    pub fn idle_count(&self) -> usize {
        (0..self.shards.len())
            .map(|i| lock(&self.shards[i]).values().map(Vec::len).sum::<usize>())
            .sum()
    }

    /// This thread's shard.
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleMap> {
        let i = crate::worker::current() % self.shards.len();
        lock(&self.shards[i])
    }

    /// The most recently used idle connection to `authority` that still looks open, with the
    /// read buffer it was checked in with (reused when nothing refers to its bytes any more).
    pub(crate) fn checkout(&self, authority: &str) -> Option<(TcpStream, BytesMut)> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut map = self.lock();
                let list = map.get_mut(authority)?;
                let idle = list.pop()?;
                if list.is_empty() {
                    map.remove(authority);
                }
                idle
            };
            if now.duration_since(idle.since) >= self.idle_timeout {
                continue;
            }
            if looks_open(&idle.stream) {
                return Some((idle.stream, idle.buf));
            }
        }
    }

    /// Keeps `stream` for the next request to `authority`, with `buf` (emptied) when small.
    pub(crate) fn checkin(self: &Arc<Self>, authority: &str, stream: TcpStream, mut buf: BytesMut) {
        if self.max_idle_per_host == 0 || self.idle_timeout.is_zero() {
            return;
        }
        self.reaper.call_once(|| spawn_reaper(Arc::downgrade(self)));
        let mut map = self.lock();
        let list = match map.get_mut(authority) {
            Some(l) => l,
            None => map.entry(authority.into()).or_default(),
        };
        if list.len() < self.max_idle_per_host {
            buf.clear();
            if buf.capacity() > KEEP_BUF {
                buf = BytesMut::new();
            }
            list.push(Idle {
                stream,
                buf,
                since: Instant::now(),
            });
        }
    }

    /// Drops connections idle for longer than the idle timeout.
    fn reap(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            lock(shard).retain(|_, list| {
                list.retain(|i| now.duration_since(i.since) < self.idle_timeout);
                !list.is_empty()
            });
        }
    }

    /// Sends `head` (the complete request head, a small body already behind it: [`coalesce`])
    /// and then `body` to `authority`, and reads the whole response within `limits`. A reused connection that turns out closed before any response
    /// byte arrived is replaced by a new one once (the request never reached a backend that
    /// answered it).
    pub async fn exchange(
        self: Arc<Self>,
        authority: &str,
        head: BytesMut,
        body: Bytes,
        limits: ExchangeLimits,
    ) -> Result<BackendResponse, BackendError> {
        let request = Request {
            first: head,
            second: body,
        };
        if let Some((stream, buf)) = self.checkout(authority) {
            match roundtrip(stream, buf, &request, &limits, self.head).await {
                Ok((resp, keep)) => {
                    if let Some((s, buf)) = keep {
                        self.checkin(authority, s, buf);
                    }
                    return Ok(resp);
                }
                Err(Failure::Stale) => {}
                Err(Failure::Error(e)) => return Err(e),
            }
        }
        let stream = connect(authority, limits.connect).await?;
        match roundtrip(stream, BytesMut::new(), &request, &limits, self.head).await {
            Ok((resp, keep)) => {
                if let Some((s, buf)) = keep {
                    self.checkin(authority, s, buf);
                }
                Ok(resp)
            }
            Err(Failure::Stale) => Err(BackendError::Failed(
                "backend closed the connection before responding".into(),
            )),
            Err(Failure::Error(e)) => Err(e),
        }
    }
}

fn lock(shard: &Mutex<IdleMap>) -> std::sync::MutexGuard<'_, IdleMap> {
    // A poisoned lock only means a thread panicked while holding it; the map stays valid.
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_reaper(pool: Weak<H1Pool>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let every = match pool.upgrade() {
            Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
            None => return,
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match pool.upgrade() {
                Some(p) => p.reap(),
                None => return,
            }
        }
    });
}

/// False when an idle socket is known to be closed (or has unexpected bytes waiting). Costs
/// no system call unless the socket was reported readable since its last use.
fn looks_open(stream: &TcpStream) -> bool {
    use std::task::{Context, Poll};
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

pub(crate) async fn connect(authority: &str, timeout: Duration) -> Result<TcpStream, BackendError> {
    let target = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(target.as_str())).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(BackendError::Connect(format!("tcp connect error: {e}"))),
        Err(_) => return Err(BackendError::Connect(format!("tcp connect to {target} timed out"))),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A request ready to write: the head (with a small body behind it, see [`coalesce`]; not
/// frozen into `Bytes`, which would allocate), then what is left of the body.
struct Request {
    first: BytesMut,
    second: Bytes,
}

/// Copies `body` behind `head` when it is small enough to go out in the same write; returns
/// what is left to send after the head (empty when copied).
pub(crate) fn coalesce(head: &mut BytesMut, body: &Bytes) -> Bytes {
    if body.len() <= COALESCE_BODY {
        head.extend_from_slice(body);
        Bytes::new()
    } else {
        body.clone()
    }
}

pub(crate) enum Failure {
    /// The connection was closed before any response byte: the request can go again.
    Stale,
    Error(BackendError),
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Self::Error(e)
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Error(BackendError::Failed(format!("{what}: {e}")))
}

/// One request and its response on `stream`, read into `buf`; returns the stream and the
/// buffer when the stream can be reused.
async fn roundtrip(
    mut stream: TcpStream,
    mut buf: BytesMut,
    req: &Request,
    limits: &ExchangeLimits,
    head_limits: HeadLimits,
) -> Result<(BackendResponse, Option<(TcpStream, BytesMut)>), Failure> {
    let written = async {
        stream.write_all(&req.first).await?;
        if !req.second.is_empty() {
            stream.write_all(&req.second).await?;
        }
        Ok::<(), io::Error>(())
    }
    .await;
    if let Err(e) = written {
        return Err(if is_closed(&e) {
            Failure::Stale
        } else {
            failed("writing the request", e)
        });
    }
    // Status line and headers, skipping interim (1xx) responses.
    let (status, headers, framing, keep_alive) = loop {
        let parsed = parse_head(&mut buf, head_limits)?;
        match parsed {
            Some(head) if head.status.is_informational() => continue,
            Some(head) => break (head.status, head.headers, head.framing, head.keep_alive),
            None => {}
        }
        let seen = !buf.is_empty();
        match read_more(&mut stream, &mut buf).await {
            Ok(0) if !seen => return Err(Failure::Stale),
            Ok(0) => return Err(failed("reading the response", "connection closed mid-response")),
            Ok(_) => {}
            Err(e) if !seen && is_closed(&e) => return Err(Failure::Stale),
            Err(e) => return Err(failed("reading the response", e)),
        }
    };
    let accepted = crate::session::is_accepted(status, &headers);
    let (cap, over_is_error) = if accepted {
        (limits.max_body, true)
    } else {
        (limits.max_reject_body, false)
    };
    let (body, complete) = read_body(&mut stream, &mut buf, framing, cap, over_is_error).await?;
    let reusable = complete && keep_alive && buf.is_empty() && !matches!(framing, Framing::UntilClose);
    Ok((
        BackendResponse { status, headers, body },
        reusable.then_some((stream, buf)),
    ))
}

pub(crate) fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(buf.capacity().clamp(4096, 64 * 1024));
    }
    stream.read_buf(buf).await
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head.
pub(crate) struct Head {
    /// Status.
    pub status: StatusCode,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Body framing.
    pub framing: Framing,
    /// The connection may carry another request afterwards.
    pub keep_alive: bool,
}

/// Where a complete head at the front of `buf` ends (just past its empty line).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf.get(from..)?.iter().position(|&b| b == b'\n') {
        let nl = from + i;
        match buf.get(nl + 1..)? {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            [b'\r'] | [] => return None,
            _ => from = nl + 1,
        }
    }
    None
}

/// Parses a complete response head at the front of `buf` and takes it out of `buf` (`None`:
/// need more bytes). Header values share the head's bytes (no copy per header).
pub(crate) fn parse_head(buf: &mut BytesMut, limits: HeadLimits) -> Result<Option<Head>, Failure> {
    let too_large = || failed("reading the response", "response head too large");
    // Left uninitialised: httparse writes the entries it fills (initialising all 256 cost
    // about a thousand instructions per response).
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let raw = &mut raw[..limits.max_headers.clamp(1, MAX_HEADERS_CAP)];
    let config = httparse::ParserConfig::default();
    let Some(end) = head_end(buf) else {
        if buf.len() >= limits.max_bytes {
            return Err(too_large());
        }
        // Incomplete; but a response that is already invalid fails now.
        let mut resp = httparse::Response::new(&mut []);
        return match config.parse_response_with_uninit_headers(&mut resp, buf, raw) {
            Err(e) => Err(failed("invalid response from the backend", e)),
            Ok(_) => Ok(None),
        };
    };
    if end > limits.max_bytes {
        return Err(too_large());
    }
    let head = buf.split_to(end).freeze();
    let mut resp = httparse::Response::new(&mut []);
    match config.parse_response_with_uninit_headers(&mut resp, &head, raw) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(failed("invalid response from the backend", "malformed head")),
        Err(e) => return Err(failed("invalid response from the backend", e)),
    }
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|e| failed("invalid response status", e))?;
    let http11 = resp.version == Some(1);
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = http11;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| failed("invalid response header", e))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value))
            .map_err(|e| failed("invalid response header value", e))?;
        if name == http::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| failed("invalid response", "bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(failed("invalid response", "conflicting content-length headers"));
            }
            length = Some(n);
        } else if name == http::header::TRANSFER_ENCODING {
            chunked = h
                .value
                .split(|b| *b == b',')
                .next_back()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            if !chunked {
                // A non-chunked transfer coding: the body runs to the end of the connection.
                keep_alive = false;
            }
        } else if name == http::header::CONNECTION {
            for token in h.value.split(|b| *b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    keep_alive = true;
                }
            }
        }
        headers.append(name, value);
    }
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED || status.is_informational()
    {
        Framing::Length(0)
    } else if chunked {
        // Transfer-Encoding wins over Content-Length (RFC 9112 6.3); such a message must not
        // be reused.
        if length.is_some() {
            keep_alive = false;
        }
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// Reads the body. Past `cap` bytes: an error when `over_is_error`, else the body is cut
/// there and reported incomplete (the connection is then not reused).
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    framing: Framing,
    cap: usize,
    over_is_error: bool,
) -> Result<(Bytes, bool), Failure> {
    let too_large = || Failure::Error(BackendError::TooLarge { limit: cap });
    match framing {
        Framing::Length(n) => {
            let want = usize::try_from(n).unwrap_or(usize::MAX);
            if want > cap && over_is_error {
                return Err(too_large());
            }
            let take = want.min(cap);
            if buf.capacity() < take {
                buf.reserve(take - buf.len());
            }
            while buf.len() < take {
                match stream.read_buf(buf).await {
                    Ok(0) => return Err(failed("reading the response body", "connection closed mid-body")),
                    Ok(_) => {}
                    Err(e) => return Err(failed("reading the response body", e)),
                }
            }
            let body = buf.split_to(take).freeze();
            Ok((body, take == want))
        }
        Framing::UntilClose => loop {
            if buf.len() > cap {
                if over_is_error {
                    return Err(too_large());
                }
                buf.truncate(cap);
                return Ok((buf.split().freeze(), false));
            }
            match read_more(stream, buf).await {
                Ok(0) => return Ok((buf.split().freeze(), true)),
                Ok(_) => {}
                Err(e) => return Err(failed("reading the response body", e)),
            }
        },
        Framing::Chunked => {
            let mut body = BytesMut::new();
            let mut decoder = ChunkDecoder::default();
            loop {
                match decoder.decode(buf, &mut body) {
                    Ok(true) => return Ok((body.freeze(), true)),
                    Ok(false) => {}
                    Err(e) => return Err(failed("invalid chunked response body", e)),
                }
                if body.len() > cap {
                    if over_is_error {
                        return Err(too_large());
                    }
                    body.truncate(cap);
                    return Ok((body.freeze(), false));
                }
                match read_more(stream, buf).await {
                    Ok(0) => return Err(failed("reading the response body", "connection closed mid-body")),
                    Ok(_) => {}
                    Err(e) => return Err(failed("reading the response body", e)),
                }
            }
        }
    }
}

/// Incremental `Transfer-Encoding: chunked` decoder.
#[derive(Debug, Default)]
pub(crate) struct ChunkDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// Longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE: usize = 8 * 1024;

impl ChunkDecoder {
    /// Moves decoded data from `input` to `out`; `Ok(true)` once the body is complete.
    pub(crate) fn decode(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<bool, &'static str> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size => {
                    let Some(line) = take_line(input)? else {
                        return Ok(false);
                    };
                    let hex = line.split(|b| *b == b';').next().unwrap_or(&[]).trim_ascii();
                    if hex.is_empty() || hex.len() > 16 {
                        return Err("bad chunk size");
                    }
                    let mut n: u64 = 0;
                    for &c in hex {
                        let d = (c as char).to_digit(16).ok_or("bad chunk size")?;
                        n = n
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(d)))
                            .ok_or("bad chunk size")?;
                    }
                    self.state = if n == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(n)
                    };
                }
                ChunkState::Data(left) => {
                    if input.is_empty() {
                        return Ok(false);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input.advance(n);
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    let Some(line) = take_line(input)? else {
                        return Ok(false);
                    };
                    if !line.is_empty() {
                        return Err("missing CRLF after chunk data");
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(input)? else {
                        return Ok(false);
                    };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

/// Takes one CRLF-terminated line (without the CRLF) from the front of `input`.
fn take_line(input: &mut BytesMut) -> Result<Option<Bytes>, &'static str> {
    match input.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let line = input.split_to(i).freeze();
            input.advance(2);
            Ok(Some(line))
        }
        None if input.len() > MAX_CHUNK_LINE => Err("chunk line too long"),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_connections_keep_a_small_read_buffer_for_their_next_response() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let pool = H1Pool::new(Duration::from_secs(60), 4, HeadLimits::default(), 0);
        let mut peers = Vec::new();
        for (capacity, kept) in [(4096, true), (KEEP_BUF + 1, false)] {
            let (stream, peer) = tokio::join!(TcpStream::connect(&addr), listener.accept());
            peers.push(peer.expect("accept"));
            let mut buf = BytesMut::with_capacity(capacity);
            buf.extend_from_slice(b"left over");
            pool.checkin(&addr, stream.expect("connect"), buf);
            let (_, buf) = pool.checkout(&addr).expect("the idle connection");
            assert!(buf.is_empty(), "emptied");
            assert_eq!(
                buf.capacity() >= capacity,
                kept,
                "buffer of {capacity} bytes kept: {kept}"
            );
        }
    }

    fn decode_all(parts: &[&[u8]]) -> Result<(Vec<u8>, bool), &'static str> {
        let mut d = ChunkDecoder::default();
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut done = false;
        for p in parts {
            input.extend_from_slice(p);
            done = d.decode(&mut input, &mut out)?;
        }
        Ok((out.to_vec(), done))
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..wire.len() {
            let (body, done) = decode_all(&[&wire[..split], &wire[split..]]).expect("valid");
            assert!(done, "split {split}");
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.", "split {split}");
        }
    }

    #[test]
    fn chunked_errors_are_reported() {
        assert_eq!(decode_all(&[b"zz\r\n"]), Err("bad chunk size"));
        assert_eq!(decode_all(&[b"2\r\nabX\r\n"]), Err("missing CRLF after chunk data"));
        assert_eq!(decode_all(&[b"11111111111111111\r\n"]), Err("bad chunk size"));
        assert_eq!(decode_all(&[&[b'1'; MAX_CHUNK_LINE + 1]]), Err("chunk line too long"));
        assert_eq!(decode_all(&[b"3\r\nab"]), Ok((b"ab".to_vec(), false)));
    }

    #[test]
    fn heads_parse_framing_and_keep_alive() {
        let limits = |max_headers| HeadLimits {
            max_bytes: 1024,
            max_headers,
        };
        let parse = |s: &[u8], max: usize| parse_head(&mut BytesMut::from(s), limits(max));
        let h = |s: &[u8]| match parse(s, 100) {
            Ok(Some(h)) => (h.status.as_u16(), h.framing, h.keep_alive),
            Ok(None) => panic!("partial"),
            Err(_) => panic!("error"),
        };
        assert_eq!(
            h(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (200, Framing::Length(5), true)
        );
        assert_eq!(
            h(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"),
            (200, Framing::Length(5), false)
        );
        assert_eq!(
            h(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (200, Framing::Length(5), false)
        );
        assert_eq!(
            h(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n"),
            (200, Framing::Length(5), true)
        );
        assert_eq!(
            h(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (200, Framing::Chunked, true)
        );
        assert_eq!(
            h(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            (200, Framing::Chunked, false)
        );
        assert_eq!(h(b"HTTP/1.1 200 OK\r\n\r\n"), (200, Framing::UntilClose, true));
        assert_eq!(h(b"HTTP/1.1 204 No Content\r\n\r\n"), (204, Framing::Length(0), true));
        assert_eq!(h(b"HTTP/1.1 100 Continue\r\n\r\n").0, 100);
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", 100), Ok(None)));
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\n\r", 100), Ok(None)));
        assert!(
            parse(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                100
            )
            .is_err()
        );
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 100).is_err());
        assert!(parse(b"garbage\r\n\r\n", 100).is_err());
        assert!(
            parse(b"garbage\r\n", 100).is_err(),
            "invalid before the head is complete"
        );
        // Bare LF line ends, and what follows the head stays in the buffer.
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\nX-A: 1\n\nbody"[..]);
        let head = parse_head(&mut buf, limits(100)).ok().flatten().expect("complete");
        assert_eq!(head.headers.get("x-a").map(HeaderValue::as_bytes), Some(&b"1"[..]));
        assert_eq!(&buf[..], b"body");
        // The header count limit.
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..5 {
            many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&many, 5), Ok(Some(_))));
        assert!(parse(&many, 4).is_err(), "more headers than allowed");
        // The size limit, on complete and incomplete heads; a body may follow in the buffer.
        let long = format!("HTTP/1.1 200 OK\r\nX-A: {}\r\n", "a".repeat(1024));
        assert!(parse(format!("{long}\r\n").as_bytes(), 100).is_err());
        assert!(parse(long.as_bytes(), 100).is_err());
        let big_body = format!("HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n{}", "b".repeat(4000));
        assert!(matches!(parse(big_body.as_bytes(), 100), Ok(Some(_))));
    }
}
