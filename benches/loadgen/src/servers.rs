//! The baselines and the backend:
//!
//! * `echo-server`: a plain tokio-tungstenite echo server with default settings: the limit of
//!   the WebSocket leg.
//! * `backend`: a fast WebSocket-over-HTTP backend. It answers `OPEN` with `OPEN`
//!   (on `/fanout/<channel>` also with `Sec-WebSocket-Extensions: grip` and a `subscribe`
//!   control message), echoes `TEXT`/`BINARY`/`CLOSE` on other paths, and answers any other
//!   request with a small `200`. A minimal HTTP/1.1 server (keep-alive, pipelining,
//!   `Content-Length` and chunked request bodies; each batch of requests read together is
//!   answered with one write): the backend sits in the chains the gateway is compared with,
//!   so it should cost as little per request as the direct echo server does per message.
//!
//! Both print `ready ADDR` on stdout once bound and exit after `--max-time` seconds.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::args::Args;

const EVENTS: &str = "application/websocket-events";
const MAX_BODY: usize = 2 << 20;

/// Binds `--listen` (loopback only) with a deep accept queue and prints `ready ADDR`; returns
/// the listener and `--max-time`.
pub(crate) async fn bind(a: &Args) -> Result<(TcpListener, Duration)> {
    let listen: SocketAddr = a.get("listen", "127.0.0.1:0".parse()?)?;
    let max_time = a.secs("max-time", 1200.0)?;
    a.finish()?;
    if !listen.ip().is_loopback() {
        bail!("--listen must be on 127.0.0.0/8");
    }
    // A deep accept queue (as Pushpin's condure has: 1024; tokio's `bind` gives 128), so that
    // bursts of connects are not dropped and retried after the 1 s SYN timeout.
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    let l = sock.listen(4096)?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("ready {}\n", l.local_addr()?).as_bytes()).await?;
    out.flush().await?;
    Ok((l, max_time))
}

/// Accepts until `max_time` has passed, handing each connection to `serve`.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, max_time: Duration, serve: F) -> Result<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let end = tokio::time::sleep(max_time);
    tokio::pin!(end);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut end => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream));
    }
}

/// Runs the tokio-tungstenite echo server.
pub async fn echo_server(a: &Args) -> Result<()> {
    let (listener, max_time) = bind(a).await?;
    accept_loop(listener, max_time, |stream| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        let (w, r) = ws.split();
        // `forward` feeds every ready message and flushes when the input has no more ready,
        // so pipelined messages are written together. Pings are answered by tungstenite.
        let _ = r
            .try_filter(|m| std::future::ready(m.is_text() || m.is_binary()))
            .forward(w)
            .await;
    })
    .await
}

/// Runs the WebSocket-over-HTTP backend.
pub async fn backend(a: &Args) -> Result<()> {
    let (listener, max_time) = bind(a).await?;
    accept_loop(listener, max_time, |stream| async move {
        if let Err(e) = serve_h1(stream).await {
            // Peers that reset or close mid-request are normal at the end of a run.
            if e.kind() == std::io::ErrorKind::InvalidData {
                eprintln!("backend: {e}");
            }
        }
    })
    .await
}

const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 64;

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// One request, parsed far enough to answer it.
struct Req {
    /// Bytes of the head.
    head: usize,
    events: bool,
    /// `/fanout/<channel>`.
    channel: Option<String>,
    body: Framing,
    keep_alive: bool,
}

enum Framing {
    Length(usize),
    Chunked,
}

fn parse_request(buf: &[u8]) -> std::io::Result<Option<Req>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(invalid("request head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("bad request: {e}"))),
    };
    let http11 = req.version == Some(1);
    let mut keep_alive = http11;
    let mut events = false;
    let mut body = Framing::Length(0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-type") {
            events = h.value.starts_with(EVENTS.as_bytes());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
            if n > MAX_BODY {
                return Err(invalid("request body too large"));
            }
            body = Framing::Length(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(invalid("unsupported transfer-encoding"));
            }
            body = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let events = events && req.method == Some("POST");
    let channel = req
        .path
        .and_then(|p| p.strip_prefix("/fanout/"))
        .map(|c| c.split('?').next().unwrap_or(c).to_owned());
    Ok(Some(Req {
        head,
        events,
        channel,
        body,
        keep_alive,
    }))
}

/// Decodes a complete chunked body at the front of `buf`: `(body, bytes used)`, or `None`
/// when more bytes are needed. Trailers are skipped.
fn dechunk(buf: &[u8]) -> std::io::Result<Option<(Vec<u8>, usize)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[pos..pos + eol];
        let hex = line.split(|b| *b == b';').next().unwrap_or(line).trim_ascii();
        let size = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| invalid("bad chunk size"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailer lines up to an empty line.
            loop {
                let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((out, pos)));
                }
            }
        }
        if out.len() + size > MAX_BODY {
            return Err(invalid("request body too large"));
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

fn put_response(out: &mut Vec<u8>, status: &str, content_type: &str, grip: bool, body: &[u8], close: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(content_type.as_bytes());
    if grip {
        out.extend_from_slice(b"\r\nsec-websocket-extensions: grip");
    }
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(format!("\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
}

/// Serves one connection: every complete request in the buffer is answered, the answers go
/// out in one write, then the socket is read again.
async fn serve_h1(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = BytesMut::with_capacity(8 << 10);
    let mut out = Vec::with_capacity(8 << 10);
    loop {
        let mut close = false;
        while !close {
            let Some(req) = parse_request(&buf)? else { break };
            let (body, used) = match req.body {
                Framing::Length(n) if buf.len() >= req.head + n => (None, req.head + n),
                Framing::Length(_) => break,
                Framing::Chunked => match dechunk(&buf[req.head..])? {
                    Some((body, n)) => (Some(body), req.head + n),
                    None => break,
                },
            };
            let body = body.as_deref().unwrap_or(&buf[req.head..used]);
            close = !req.keep_alive;
            if !req.events {
                put_response(&mut out, "200 OK", "text/plain", false, b"ok\n", close);
            } else {
                match answer(body, req.channel.as_deref()) {
                    Ok((events, opened)) => {
                        let grip = opened && req.channel.is_some();
                        put_response(&mut out, "200 OK", EVENTS, grip, &events, close);
                    }
                    Err(()) => {
                        close = true;
                        put_response(&mut out, "400 Bad Request", "text/plain", false, b"", true);
                    }
                }
            }
            let _ = buf.split_to(used);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            return Ok(());
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8 << 10);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// The response body for a request body: `(events, whether it carried OPEN)`.
fn answer(body: &[u8], grip_channel: Option<&str>) -> Result<(Bytes, bool), ()> {
    let mut out = BytesMut::with_capacity(body.len() + 64);
    let mut opened = false;
    let mut pos = 0;
    // Bounded: every iteration consumes at least one line.
    while pos < body.len() {
        let rest = body.get(pos..).ok_or(())?;
        let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or(())?;
        let line = rest.get(..eol).ok_or(())?;
        let (name, size) = match line.iter().position(|&b| b == b' ') {
            Some(sp) => {
                let hex = std::str::from_utf8(line.get(sp + 1..).ok_or(())?).map_err(|_| ())?;
                (
                    line.get(..sp).ok_or(())?,
                    usize::from_str_radix(hex, 16).map_err(|_| ())?,
                )
            }
            None => (line, 0),
        };
        let event_len = if line.len() == name.len() {
            eol + 2
        } else {
            eol + 2 + size + 2
        };
        let event = rest.get(..event_len).ok_or(())?;
        match name {
            b"OPEN" => {
                opened = true;
                out.put_slice(b"OPEN\r\n");
                if let Some(ch) = grip_channel {
                    let c = format!(r#"c:{{"type":"subscribe","channel":"{ch}"}}"#);
                    out.put_slice(format!("TEXT {:x}\r\n{c}\r\n", c.len()).as_bytes());
                }
            }
            // Echo on plain routes; subscribers on GRIP routes send nothing worth echoing.
            b"TEXT" | b"BINARY" if grip_channel.is_none() => out.put_slice(event),
            b"CLOSE" => out.put_slice(event),
            _ => {}
        }
        pos += event_len;
    }
    Ok((out.freeze(), opened))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_text_and_answers_open() {
        let (out, opened) = answer(b"OPEN\r\nTEXT 2\r\nhi\r\nPING\r\n", None).unwrap();
        assert!(opened);
        assert_eq!(&out[..], b"OPEN\r\nTEXT 2\r\nhi\r\n");
    }

    #[test]
    fn grip_open_subscribes() {
        let (out, _) = answer(b"OPEN\r\n", Some("bench")).unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            s,
            "OPEN\r\nTEXT 28\r\nc:{\"type\":\"subscribe\",\"channel\":\"bench\"}\r\n"
        );
    }

    #[test]
    fn requests_parse_with_their_framing() {
        let r = parse_request(b"POST /fanout/news?x=1 HTTP/1.1\r\nContent-Type: application/websocket-events\r\nContent-Length: 6\r\n\r\nOPEN\r\n")
            .unwrap()
            .unwrap();
        assert!(r.events && r.keep_alive);
        assert_eq!(r.channel.as_deref(), Some("news"));
        assert!(matches!(r.body, Framing::Length(6)));
        let r = parse_request(b"GET /http HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.events && !r.keep_alive && r.channel.is_none());
        assert!(
            parse_request(b"GET /http HTTP/1.1\r\nHost: x").unwrap().is_none(),
            "partial"
        );
        assert!(parse_request(b"GET /http HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let (body, used) = dechunk(b"6\r\nOPEN\r\n\r\n0\r\n\r\nNEXT").unwrap().unwrap();
        assert_eq!((&body[..], used), (&b"OPEN\r\n"[..], 16));
        assert!(dechunk(b"6\r\nOPEN").unwrap().is_none());
        assert!(dechunk(b"zz\r\n").is_err());
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert!(answer(b"TEXT 5\r\nhi\r\n", None).is_err());
        assert!(answer(b"TEXT zz\r\nhi\r\n", None).is_err());
        assert!(answer(b"OPEN", None).is_err());
        assert_eq!(answer(b"CLOSE 2\r\n\x03\xe8\r\n", None).unwrap().0.len(), 13);
    }
}
