//! The client's byte stream after the HTTP upgrade: a plain TCP socket, or TLS over one.
//!
//! Both offer the same readiness interface as [`TcpStream`] (`readable`, `try_read_buf`,
//! `writable`, `try_write`, `shutdown`), so the WebSocket driver reads only when data is there
//! and holds no buffer of its own while a connection is idle.
//!
//! TLS is rustls's [`ServerConnection`] driven directly against the socket (`read_tls`,
//! `process_new_packets`, `reader()`, `writer()`, `write_tls`), not through an `AsyncRead`
//! wrapper: an idle TLS connection keeps only what rustls itself keeps (its record deframer
//! buffer, about 4 KiB, and the connection keys). Decrypted plaintext the handshake layer
//! already buffered is delivered first: [`ClientIo::readable`] returns at once while rustls
//! holds plaintext, whatever the socket's readiness says.
//!
//! Encrypted records wait in rustls until the socket takes them (at most rustls's outgoing
//! buffer limit, 64 KiB); [`ClientIo::wants_write`] tells the driver to keep waiting for
//! [`ClientIo::writable`], which writes them out.
//!
//! Every method but `shutdown` takes `&self`, as [`TcpStream`]'s do, so `readable()` and
//! `writable()` can wait in the same `select!`. The TLS state sits behind a mutex that is never
//! held across an `.await` and only the connection's own task takes, so it is never contended.

use std::io::{self, BufRead, IoSlice, Read, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::ServerConnection;
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// Bytes reserved in an empty read buffer before reading into it.
const READ_RESERVE: usize = 4096;

/// The socket of an upgraded client connection.
#[derive(Debug)]
pub enum ClientIo {
    /// Plain TCP (`ws://`).
    Plain(TcpStream),
    /// TLS over TCP (`wss://`).
    Tls(Box<TlsIo>),
}

/// What [`ClientIo::poll_io`] found.
#[derive(Debug)]
pub enum IoEvent {
    /// Bytes appended to the buffer (`Ok(0)`: end of stream).
    Read(io::Result<usize>),
    /// The socket can take writes.
    Writable(io::Result<()>),
}

/// Bytes read on the stack while the connection's read buffer is empty.
const IDLE_READ: usize = 2048;

fn poll_read_plain(tcp: &mut TcpStream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    let tcp = std::pin::Pin::new(tcp);
    if buf.is_empty() && buf.capacity() < IDLE_READ {
        let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ];
        let mut rb = ReadBuf::uninit(&mut tmp);
        std::task::ready!(tcp.poll_read(cx, &mut rb))?;
        let got = rb.filled();
        buf.extend_from_slice(got);
        return Poll::Ready(Ok(got.len()));
    }
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_RESERVE);
    }
    tokio_util::io::poll_read_buf(tcp, cx, buf)
}

/// A TLS session over its socket (boxed in [`ClientIo::Tls`]: rustls's state is large).
pub struct TlsIo {
    tcp: TcpStream,
    state: Mutex<TlsState>,
    close_timeout: Duration,
}

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("tcp", &self.tcp)
            .field("close_timeout", &self.close_timeout)
            .finish_non_exhaustive()
    }
}

struct TlsState {
    conn: ServerConnection,
    /// A socket write failed: the records still pending are abandoned, never retried (a
    /// retry would fail the same way, and a driver waiting to write them would spin).
    write_failed: bool,
}

/// `std::io` over the non-blocking socket: `WouldBlock` when it is not ready.
struct Socket<'a>(&'a TcpStream);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn write_failed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "an earlier write to the client failed")
}

/// Writes pending TLS records until none is left (`Ok`) or the socket would block (the
/// `WouldBlock` error, which also clears the socket's write readiness).
fn flush_records(tcp: &TcpStream, st: &mut TlsState) -> io::Result<()> {
    if st.write_failed {
        return Err(write_failed_error());
    }
    while st.conn.wants_write() {
        match st.conn.write_tls(&mut Socket(tcp)) {
            Ok(0) => {
                st.write_failed = true;
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(_) => {}
            Err(e) if would_block(&e) => return Err(e),
            Err(e) => {
                st.write_failed = true;
                return Err(e);
            }
        }
    }
    Ok(())
}

impl ClientIo {
    /// A plain TCP client.
    pub fn plain(tcp: TcpStream) -> Self {
        Self::Plain(tcp)
    }

    /// A TLS client whose handshake is complete. `conn` may hold plaintext and records that
    /// the handshake layer already read, and records still to be written; both are carried
    /// over. `close_timeout` bounds how long [`shutdown`](Self::shutdown) waits for the
    /// socket to take the last records and the `close_notify` alert.
    pub fn tls(tcp: TcpStream, conn: ServerConnection, close_timeout: Duration) -> Self {
        Self::Tls(Box::new(TlsIo {
            tcp,
            state: Mutex::new(TlsState {
                conn,
                write_failed: false,
            }),
            close_timeout,
        }))
    }

    /// Waits for whichever the driver wants: input (read into `buf` at once) or room to
    /// write. Reading goes through `poll_read`, which tells tokio the socket is drained after
    /// a short read, so the next wait costs no `read` system call that would only find
    /// nothing; while the connection is idle a stack buffer takes the first bytes, so `buf`
    /// stays unallocated until data arrives.
    ///
    /// `IoEvent::Read(Err(WouldBlock))` is a spurious wake-up: poll again.
    pub fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        want_read: bool,
        want_write: bool,
        buf: &mut BytesMut,
    ) -> Poll<IoEvent> {
        match self {
            Self::Plain(tcp) => {
                if want_write && let Poll::Ready(r) = tcp.poll_write_ready(cx) {
                    return Poll::Ready(IoEvent::Writable(r));
                }
                if want_read {
                    return poll_read_plain(tcp, cx, buf).map(IoEvent::Read);
                }
                Poll::Pending
            }
            Self::Tls(t) => {
                if want_write && let Poll::Ready(r) = t.poll_writable(cx) {
                    return Poll::Ready(IoEvent::Writable(r));
                }
                if want_read && (t.has_input() || t.tcp.poll_read_ready(cx).is_ready()) {
                    return Poll::Ready(IoEvent::Read(t.try_read_buf(buf)));
                }
                Poll::Pending
            }
        }
    }

    /// True for a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// Waits until [`try_read_buf`](Self::try_read_buf) may return data, end of stream or an
    /// error. May return when it then reports `WouldBlock` (a partial TLS record, a spurious
    /// wake-up). Returns at once while decrypted plaintext is buffered.
    ///
    /// Cancel safe: no state lives in the future.
    ///
    /// # Errors
    ///
    /// The socket's readiness error.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.readable().await,
            Self::Tls(t) => {
                if t.has_input() {
                    return Ok(());
                }
                t.tcp.readable().await
            }
        }
    }

    /// Reads what is available into `buf`'s spare capacity (reserving some when there is
    /// none), without waiting: `Ok(0)` at end of stream (for TLS also a TCP end without
    /// `close_notify`), `WouldBlock` when nothing is there yet.
    ///
    /// # Errors
    ///
    /// `WouldBlock`, a socket error, or `InvalidData` for a TLS protocol violation (rustls
    /// then queues an alert: see [`wants_write`](Self::wants_write)).
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.try_read_buf(buf),
            Self::Tls(t) => t.try_read_buf(buf),
        }
    }

    /// Waits until [`try_write`](Self::try_write) may accept bytes. For TLS, writes the
    /// pending records to the socket first, as the socket takes them.
    ///
    /// Cancel safe: records not yet written stay queued in rustls.
    ///
    /// # Errors
    ///
    /// The socket's readiness or write error; for TLS also after an earlier failed write.
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.writable().await,
            Self::Tls(t) => t.writable().await,
        }
    }

    /// Writes some of `buf` without waiting and returns how many bytes were taken. For TLS,
    /// taken bytes are encrypted and written as far as the socket allows; the rest of their
    /// records stays queued (see [`wants_write`](Self::wants_write)).
    ///
    /// # Errors
    ///
    /// `WouldBlock` when nothing can be taken now, or the socket's write error.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.try_write(buf),
            Self::Tls(t) => t.try_write(buf),
        }
    }

    /// True while TLS records are queued for the socket: keep waiting for
    /// [`writable`](Self::writable) (which writes them) even with nothing else to send.
    /// Always false for plain TCP, and after a failed write.
    pub fn wants_write(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Tls(t) => {
                let st = t.lock();
                !st.write_failed && st.conn.wants_write()
            }
        }
    }

    /// Ends the write side. For TLS, first sends `close_notify` and the records still queued,
    /// waiting at most the close timeout given to [`tls`](Self::tls) for the socket to take
    /// them.
    ///
    /// # Errors
    ///
    /// The socket's shutdown error (a TLS flush that fails or times out is not reported: the
    /// connection is ending either way).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.shutdown().await,
            Self::Tls(t) => t.shutdown().await,
        }
    }
}

impl TlsIo {
    fn lock(&self) -> MutexGuard<'_, TlsState> {
        // Nothing panics while the lock is held; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plaintext is buffered, or the session has something to report (close, error).
    fn has_input(&self) -> bool {
        let mut st = self.lock();
        match st.conn.process_new_packets() {
            Ok(io) => io.plaintext_bytes_to_read() > 0 || io.peer_has_closed(),
            // `try_read_buf` reports it.
            Err(_) => true,
        }
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut st = self.lock();
        let conn = &mut st.conn;
        loop {
            // Plaintext rustls holds comes first, then records from the socket.
            match conn.reader().fill_buf() {
                Ok([]) => return Ok(0),
                Ok(chunk) => {
                    if buf.capacity() == buf.len() {
                        buf.reserve(READ_RESERVE);
                    }
                    let n = chunk.len().min(buf.capacity() - buf.len());
                    buf.extend_from_slice(&chunk[..n]);
                    conn.reader().consume(n);
                    return Ok(n);
                }
                Err(e) if would_block(&e) => {}
                // A TCP end without close_notify: the WebSocket layer decides whether the
                // stream ended cleanly (a close frame), as it does for plain TCP.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // `Ok(0)` (end of stream) is recorded by rustls and reported by the reader above.
            conn.read_tls(&mut Socket(&self.tcp))?;
            conn.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }

    /// [`Self::writable`] as a poll: writes queued records as the socket takes them.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            {
                let st = self.lock();
                if st.write_failed {
                    return Poll::Ready(Err(write_failed_error()));
                }
                if !st.conn.wants_write() {
                    break;
                }
            }
            if let Err(e) = std::task::ready!(self.tcp.poll_write_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            match flush_records(&self.tcp, &mut self.lock()) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if would_block(&e) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.tcp.poll_write_ready(cx)
    }

    async fn writable(&self) -> io::Result<()> {
        loop {
            {
                let st = self.lock();
                if st.write_failed {
                    return Err(write_failed_error());
                }
                if !st.conn.wants_write() {
                    break;
                }
            }
            self.tcp.writable().await?;
            match flush_records(&self.tcp, &mut self.lock()) {
                Ok(()) => return Ok(()),
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.tcp.writable().await
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.lock();
        match flush_records(&self.tcp, &mut st) {
            Ok(()) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(e),
        }
        if buf.is_empty() {
            return Ok(0);
        }
        // Takes as much as fits under rustls's outgoing buffer limit. An error means the
        // session failed (e.g. on a bad record from the peer): it sends nothing more.
        let n = match st.conn.writer().write(buf) {
            Ok(n) => n,
            Err(e) => {
                st.write_failed = true;
                return Err(e);
            }
        };
        if n == 0 {
            return Err(if st.conn.wants_write() {
                // Full until the socket takes records; its readiness was cleared above.
                io::ErrorKind::WouldBlock.into()
            } else {
                io::Error::new(io::ErrorKind::WriteZero, "the TLS session takes no more data")
            });
        }
        match flush_records(&self.tcp, &mut st) {
            Ok(()) => Ok(n),
            Err(e) if would_block(&e) => Ok(n),
            Err(e) => Err(e),
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        let Self {
            tcp,
            state,
            close_timeout,
        } = self;
        let st = state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !st.write_failed {
            st.conn.send_close_notify();
            let deadline = tokio::time::Instant::now() + *close_timeout;
            loop {
                match flush_records(tcp, st) {
                    Err(e) if would_block(&e) => {}
                    Ok(()) | Err(_) => break,
                }
                match tokio::time::timeout_at(deadline, tcp.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
        tcp.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream as ClientTls;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server config for `localhost` (sending `tickets` TLS 1.3 session tickets after the
    /// handshake) and a client config trusting it.
    fn configs(tickets: usize) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let der: CertificateDer<'static> = cert.der().clone();
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .expect("server config");
        server.send_tls13_tickets = tickets;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A TLS pair over loopback: the server side as a `ClientIo`, the client as a stream.
    /// Without session tickets, so that nothing unsolicited waits in the client's socket.
    async fn tls_pair() -> (ClientIo, ClientTls<TcpStream>) {
        tls_pair_with(0).await
    }

    async fn tls_pair_with(tickets: usize) -> (ClientIo, ClientTls<TcpStream>) {
        let (server_config, client_config) = configs(tickets);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tokio_rustls::TlsConnector::from(client_config)
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("client handshake")
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_rustls::TlsAcceptor::from(server_config)
                .accept(tcp)
                .await
                .expect("server handshake")
        };
        let (client, server) = tokio::time::timeout(DEADLINE, async { tokio::join!(connect, accept) })
            .await
            .expect("handshake timed out");
        let (tcp, conn) = server.into_inner();
        (ClientIo::tls(tcp, conn, Duration::from_secs(2)), client)
    }

    /// Reads from `io` until `want` bytes arrived.
    async fn read_exactly(io: &ClientIo, want: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        tokio::time::timeout(DEADLINE, async {
            while buf.len() < want {
                io.readable().await.expect("readable");
                match io.try_read_buf(&mut buf) {
                    Ok(0) => panic!("end of stream after {} bytes", buf.len()),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        })
        .await
        .expect("read timed out");
        buf
    }

    /// Writes all of `data`, then every queued record.
    async fn write_all(io: &ClientIo, mut data: &[u8]) {
        tokio::time::timeout(DEADLINE, async {
            while !data.is_empty() || io.wants_write() {
                io.writable().await.expect("writable");
                if data.is_empty() {
                    continue;
                }
                match io.try_write(data) {
                    Ok(n) => data = &data[n..],
                    Err(e) if would_block(&e) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
        })
        .await
        .expect("write timed out");
    }

    #[tokio::test]
    async fn tls_round_trip_in_both_directions() {
        // With tickets: records the handshake left queued are written before the data.
        let (io, mut client) = tls_pair_with(2).await;
        assert!(io.is_tls());
        client.write_all(b"hello from the client").await.expect("client write");
        client.flush().await.expect("flush");
        assert_eq!(&read_exactly(&io, 21).await[..], b"hello from the client");

        // 300 KB: more than rustls queues at once, so the socket's backpressure is exercised.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 300_000];
            client.read_exact(&mut got).await.expect("client read");
            got
        });
        write_all(&io, &data).await;
        assert!(!io.wants_write());
        let got = tokio::time::timeout(DEADLINE, reader)
            .await
            .expect("reader")
            .expect("join");
        assert!(got == data, "the client got different bytes");
    }

    #[tokio::test]
    async fn records_queued_behind_a_full_socket_go_out_through_writable() {
        let (io, mut client) = tls_pair().await;
        // The client doesn't read: write until the socket and rustls's queue are full.
        let chunk = vec![7u8; 64 * 1024];
        let mut accepted = 0usize;
        tokio::time::timeout(DEADLINE, async {
            loop {
                match io.try_write(&chunk) {
                    Ok(n) => accepted += n,
                    Err(e) if would_block(&e) => break,
                    Err(e) => panic!("write: {e}"),
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the socket never filled");
        assert!(io.wants_write(), "accepted bytes wait in rustls as records");
        assert!(
            io.writable().now_or_never().is_none(),
            "not writable while the peer reads nothing"
        );
        // Once the peer reads, driving `writable` while `wants_write` delivers every byte taken.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; accepted];
            client.read_exact(&mut got).await.expect("client read");
            got.iter().all(|&b| b == 7)
        });
        tokio::time::timeout(DEADLINE, async {
            while io.wants_write() {
                io.writable().await.expect("writable");
            }
        })
        .await
        .expect("records never went out");
        assert!(
            tokio::time::timeout(DEADLINE, reader)
                .await
                .expect("reader")
                .expect("join")
        );
    }

    #[tokio::test]
    async fn readable_returns_at_once_while_plaintext_is_buffered() {
        let (io, mut client) = tls_pair().await;
        client.write_all(b"hello world").await.expect("client write");
        client.flush().await.expect("flush");
        // A buffer with room for 5 bytes takes "hello"; " world" stays decrypted in rustls.
        let mut buf = BytesMut::with_capacity(5);
        tokio::time::timeout(DEADLINE, async {
            loop {
                io.readable().await.expect("readable");
                match io.try_read_buf(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if would_block(&e) => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        })
        .await
        .expect("read timed out");
        assert_eq!(&buf[..], b"hello");
        let ClientIo::Tls(t) = &io else { panic!("not TLS") };
        // The socket itself has nothing more: clear its readiness.
        let e = t.tcp.try_read(&mut [0u8; 16]).expect_err("socket drained");
        assert!(would_block(&e), "{e}");
        assert!(t.tcp.readable().now_or_never().is_none(), "the socket is not readable");
        assert!(
            matches!(io.readable().now_or_never(), Some(Ok(()))),
            "buffered plaintext makes the connection readable"
        );
        let mut rest = BytesMut::with_capacity(64);
        assert_eq!(io.try_read_buf(&mut rest).expect("read"), 6);
        assert_eq!(&rest[..], b" world");
        let e = io.try_read_buf(&mut rest).expect_err("nothing left");
        assert!(would_block(&e), "{e}");
    }

    #[tokio::test]
    async fn plaintext_buffered_before_the_handover_is_delivered() {
        let (server_config, client_config) = configs(0);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut tls = tokio_rustls::TlsConnector::from(client_config)
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("client handshake");
            tls.write_all(b"first|second").await.expect("write");
            tls.flush().await.expect("flush");
            tls
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut server = tokio_rustls::TlsAcceptor::from(server_config)
            .accept(tcp)
            .await
            .expect("server handshake");
        // The handshake layer reads "first|" and leaves the rest decrypted inside rustls.
        let mut first = [0u8; 6];
        server.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"first|");
        let _client = client.await.expect("client");
        let (tcp, conn) = server.into_inner();
        let io = ClientIo::tls(tcp, conn, Duration::from_secs(1));
        assert_eq!(&read_exactly(&io, 6).await[..], b"second");
    }

    #[tokio::test]
    async fn shutdown_sends_close_notify_and_a_client_close_reads_as_end() {
        let (mut io, mut client) = tls_pair().await;
        io.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        // A clean TLS end: close_notify, then EOF.
        let n = tokio::time::timeout(DEADLINE, client.read_to_end(&mut rest))
            .await
            .expect("timed out")
            .expect("clean close_notify");
        assert_eq!(n, 0);

        let (io, mut client) = tls_pair().await;
        client.write_all(b"bye").await.expect("write");
        client.shutdown().await.expect("client close_notify");
        assert_eq!(&read_exactly(&io, 3).await[..], b"bye");
        let mut buf = BytesMut::new();
        let n = tokio::time::timeout(DEADLINE, async {
            loop {
                io.readable().await.expect("readable");
                match io.try_read_buf(&mut buf) {
                    Err(e) if would_block(&e) => {}
                    other => break other,
                }
            }
        })
        .await
        .expect("timed out")
        .expect("end of stream");
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn a_tcp_end_without_close_notify_reads_as_end() {
        let (io, client) = tls_pair().await;
        let (tcp, _) = client.into_inner();
        drop(tcp);
        let mut buf = BytesMut::new();
        let r = tokio::time::timeout(DEADLINE, async {
            loop {
                io.readable().await.expect("readable");
                match io.try_read_buf(&mut buf) {
                    Err(e) if would_block(&e) => {}
                    other => break other,
                }
            }
        })
        .await
        .expect("timed out");
        assert_eq!(r.expect("end"), 0);
    }

    #[tokio::test]
    async fn garbage_records_are_an_error_and_a_failed_write_is_not_retried() {
        let (io, client) = tls_pair().await;
        let (mut tcp, _) = client.into_inner();
        // An application-data record that doesn't decrypt.
        tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5])
            .await
            .expect("write");
        let mut buf = BytesMut::new();
        let e = tokio::time::timeout(DEADLINE, async {
            loop {
                io.readable().await.expect("readable");
                match io.try_read_buf(&mut buf) {
                    Err(e) if would_block(&e) => {}
                    Err(e) => break e,
                    Ok(n) => panic!("read {n} bytes from garbage"),
                }
            }
        })
        .await
        .expect("timed out");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // rustls queued an alert for the peer.
        assert!(io.wants_write());
        tokio::time::timeout(DEADLINE, io.writable())
            .await
            .expect("timed out")
            .expect("alert written");
        assert!(!io.wants_write());
        let mut alert = [0u8; 64];
        let n = tcp.read(&mut alert).await.expect("read alert");
        // TLS 1.3 sends the alert encrypted, as an application-data record.
        assert!(
            n >= 7 && matches!(alert[0], 0x15 | 0x17),
            "an alert record: {:?}",
            &alert[..n]
        );

        // The failed session takes nothing more, and wants no more writes.
        let e = io.try_write(b"x").expect_err("session failed");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(!io.wants_write());
        assert!(io.writable().now_or_never().is_some_and(|r| r.is_err()));
    }

    #[tokio::test]
    async fn a_failed_socket_write_is_not_retried() {
        let (io, client) = tls_pair().await;
        drop(client);
        // The first writes may still land in the kernel's buffer; the peer's reset fails one.
        let failed = tokio::time::timeout(DEADLINE, async {
            loop {
                match io.try_write(&[0u8; 4096]) {
                    Ok(_) => {}
                    Err(e) if would_block(&e) => {
                        let _ = io.writable().await;
                    }
                    Err(e) => break e,
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the write never failed");
        assert!(!would_block(&failed), "{failed}");
        assert!(!io.wants_write(), "records that can't be written are abandoned");
        assert!(io.try_write(b"x").is_err());
        assert!(io.writable().now_or_never().is_some_and(|r| r.is_err()));
    }

    #[tokio::test]
    async fn plain_tcp_passes_through() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut io = ClientIo::plain(tcp);
        assert!(!io.is_tls());
        client.write_all(b"ping").await.expect("write");
        assert_eq!(&read_exactly(&io, 4).await[..], b"ping");
        write_all(&io, b"pong").await;
        assert!(!io.wants_write());
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"pong");
        io.shutdown().await.expect("shutdown");
        assert_eq!(client.read(&mut got).await.expect("eof"), 0);
    }
}
