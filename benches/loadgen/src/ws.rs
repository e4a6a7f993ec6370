//! A minimal WebSocket client for load generation: connect from a chosen 127.0.0.x source
//! address, send the upgrade request, and encode/parse frames with no per-message allocation.
//! It is deliberately small so the generator spends its CPU on the sockets, not on a library.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A `ws://` or `http://` URL on a loopback address.
#[derive(Debug, Clone)]
pub struct Target {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query.
    pub path: String,
}

impl Target {
    /// Parses `ws://127.0.0.1:8080/path` (or `http://`). Only 127.0.0.0/8 is accepted: the
    /// benchmark never leaves the machine.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("{url}: expected ws:// or http://"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddrV4 = hostport
            .parse()
            .with_context(|| format!("{url}: expected an IPv4 address with a port"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: only 127.0.0.0/8 is allowed");
        }
        Ok(Self {
            addr: SocketAddr::V4(addr),
            host: hostport.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Source address number `i` of the spread: 127.0.0.2 .. 127.0.0.(1 + count).
pub fn source_ip(i: usize, count: usize) -> Ipv4Addr {
    let n = (i % count.clamp(1, 250)) as u8;
    Ipv4Addr::new(127, 0, 0, 2 + n)
}

/// A TCP connection from `src` (port chosen by the kernel) to `addr`, with `TCP_NODELAY`.
pub async fn tcp_connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
            .with_context(|| format!("bind {ip}"))?;
    }
    let s = sock.connect(addr).await.with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// An open WebSocket connection: the socket and bytes read past the handshake.
#[derive(Debug)]
pub struct WsConn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes received and not yet parsed.
    pub rbuf: BytesMut,
}

/// Connects and completes the opening handshake (any `101` is accepted; the accept key is not
/// checked, the servers under test are trusted).
pub async fn connect(t: &Target, src: Option<Ipv4Addr>, timeout: Duration) -> Result<WsConn> {
    tokio::time::timeout(timeout, async {
        let mut stream = tcp_connect(t.addr, src).await?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            t.path, t.host
        );
        stream.write_all(req.as_bytes()).await?;
        let mut rbuf = BytesMut::with_capacity(1024);
        // Bounded: the head must fit 16 KiB, and the whole exchange the timeout.
        let end = loop {
            if let Some(i) = find(&rbuf, b"\r\n\r\n") {
                break i + 4;
            }
            if rbuf.len() > 16 * 1024 {
                bail!("handshake response head over 16 KiB");
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                bail!("connection closed during the handshake");
            }
        };
        if !rbuf.starts_with(b"HTTP/1.1 101") {
            let line = rbuf[..].split(|&b| b == b'\r').next().unwrap_or_default();
            bail!("handshake refused: {}", String::from_utf8_lossy(line));
        }
        rbuf.advance(end);
        Ok(WsConn { stream, rbuf })
    })
    .await
    .map_err(|_| anyhow!("handshake timed out after {timeout:?}"))?
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Appends one masked client frame (FIN set).
pub fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(14 + payload.len());
    out.extend_from_slice(&[0x80 | opcode]);
    let len = payload.len();
    if len < 126 {
        out.extend_from_slice(&[0x80 | len as u8]);
    } else if len <= 0xFFFF {
        out.extend_from_slice(&[0x80 | 126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[0x80 | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

/// One server frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: &'a [u8],
}

/// Parses the frame at the start of `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)` when
/// more bytes are needed.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        bail!("server frames must not be masked");
    }
    let (len, hdr) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let n = u64::from_be_bytes(a);
                (usize::try_from(n).map_err(|_| anyhow!("frame too large"))?, 10)
            }
            None => return Ok(None),
        },
        n => (usize::from(n), 2),
    };
    if len > 64 << 20 {
        bail!("frame of {len} bytes is over the generator's 64 MiB limit");
    }
    match buf.get(hdr..hdr + len) {
        Some(payload) => Ok(Some((
            Frame {
                fin: b0 & 0x80 != 0,
                opcode: b0 & 0x0F,
                payload,
            },
            hdr + len,
        ))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_frames_of_each_length_form() {
        for len in [0usize, 5, 125, 126, 1000, 70_000] {
            let payload = vec![b'a'; len];
            let mut buf = Vec::new();
            buf.push(0x81);
            if len < 126 {
                buf.push(len as u8);
            } else if len <= 0xFFFF {
                buf.push(126);
                buf.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                buf.push(127);
                buf.extend_from_slice(&(len as u64).to_be_bytes());
            }
            buf.extend_from_slice(&payload);
            let (f, n) = parse_frame(&buf).unwrap().unwrap();
            assert_eq!(n, buf.len());
            assert_eq!(f.payload.len(), len);
            assert_eq!(f.opcode, OP_TEXT);
            assert!(f.fin);
            assert!(parse_frame(&buf[..buf.len() - 1]).unwrap().is_none() || len == 0);
        }
    }

    #[test]
    fn masked_frame_round_trips() {
        let mut out = BytesMut::new();
        put_frame(&mut out, OP_TEXT, b"hello");
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 5);
        let unmasked: Vec<u8> = out[6..].iter().enumerate().map(|(i, b)| b ^ out[2 + i % 4]).collect();
        assert_eq!(unmasked, b"hello");
    }

    #[test]
    fn targets_must_be_loopback() {
        assert!(Target::parse("ws://10.0.0.1:80/").is_err());
        let t = Target::parse("ws://127.0.0.1:8080/a?b").unwrap();
        assert_eq!(t.path, "/a?b");
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(source_ip(0, 10), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(11, 10), Ipv4Addr::new(127, 0, 0, 3));
    }
}
