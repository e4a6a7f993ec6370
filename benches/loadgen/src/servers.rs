//! The baselines and the backend:
//!
//! * `echo-server`: a plain tokio-tungstenite echo server with default settings: the limit of
//!   the WebSocket leg.
//! * `backend`: a fast WebSocket-over-HTTP backend (hyper). It answers `OPEN` with `OPEN`
//!   (on `/fanout/<channel>` also with `Sec-WebSocket-Extensions: grip` and a `subscribe`
//!   control message), echoes `TEXT`/`BINARY`/`CLOSE` on other paths, and answers any other
//!   request with a small `200`.
//!
//! Both print `ready ADDR` on stdout once bound and exit after `--max-time` seconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .await;
    })
    .await
}

fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let is_events = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(EVENTS.as_bytes()));
    if req.method() != hyper::Method::POST || !is_events {
        return Ok(response(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")));
    }
    let channel = req.uri().path().strip_prefix("/fanout/").map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(response(StatusCode::BAD_REQUEST, "text/plain", Bytes::new())),
    };
    match answer(&body, channel.as_deref()) {
        Ok((out, opened)) => {
            let mut r = response(StatusCode::OK, EVENTS, out);
            if opened && channel.is_some() {
                r.headers_mut().insert(
                    "sec-websocket-extensions",
                    hyper::header::HeaderValue::from_static("grip"),
                );
            }
            Ok(r)
        }
        Err(()) => Ok(response(StatusCode::BAD_REQUEST, "text/plain", Bytes::new())),
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
    fn malformed_bodies_are_refused() {
        assert!(answer(b"TEXT 5\r\nhi\r\n", None).is_err());
        assert!(answer(b"TEXT zz\r\nhi\r\n", None).is_err());
        assert!(answer(b"OPEN", None).is_err());
        assert_eq!(answer(b"CLOSE 2\r\n\x03\xe8\r\n", None).unwrap().0.len(), 13);
    }
}
