//! HTTP/1.1 client connections (hyper's low-level API: one connection, requests in turn).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::ws::{self, Target};

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    target: Target,
    src: Option<Ipv4Addr>,
    send: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Connects from `src` to `target`.
    pub async fn open(target: &Target, src: Option<Ipv4Addr>) -> Result<Self> {
        let send = handshake(target, src).await?;
        Ok(Self {
            target: target.clone(),
            src,
            send,
        })
    }

    /// Sends one request and reads the whole response: `(status, body length)`. Reconnects
    /// once if the server had closed the connection.
    pub async fn request(&mut self, method: &hyper::Method, body: Bytes, timeout: Duration) -> Result<(u16, usize)> {
        if self.send.is_closed() || self.send.ready().await.is_err() {
            self.send = handshake(&self.target, self.src).await?;
        }
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(&self.target.path)
            .header(hyper::header::HOST, &self.target.host);
        if !body.is_empty() {
            b = b.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = b.body(Full::new(body)).context("build request")?;
        let fut = async {
            let resp = self.send.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body.len()))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow!("request timed out after {timeout:?}"))?
            .map_err(Into::into)
    }
}

async fn handshake(target: &Target, src: Option<Ipv4Addr>) -> Result<SendRequest<Full<Bytes>>> {
    let stream = ws::tcp_connect(target.addr, src).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}
