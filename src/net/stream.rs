//! A connection that is plain TCP or TLS over TCP, driven the same way.
//!
//! The relay polls sockets by hand with non-blocking reads and writes; a TLS
//! connection keeps that shape: the handshake is done by tokio-rustls, then
//! its rustls state is driven over the socket's `try_read`/`try_write`
//! inside the same polls. Plaintext pays one enum branch.
//!
//! Two rules keep TLS from losing a wake-up:
//! - a read first hands out plaintext rustls has already decrypted, and
//!   waits on the socket only when there is none;
//! - TLS records rustls holds (written while the socket was full, or
//!   produced by a read, e.g. a KeyUpdate answer) are its *backlog*: the
//!   owner waits for writability while [`Stream::backlog`] is true, and
//!   every write flushes it first.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most plaintext handed out by one read (one TLS record's worth).
const READ_CHUNK: usize = 16 * 1024;

/// A client or server connection.
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: rustls state is large).
    Tls(Box<TlsIo>),
    /// Taken apart by a failed upgrade: every operation fails.
    Closed,
}

/// A socket and its rustls state, after the handshake.
pub(crate) struct TlsIo {
    tcp: TcpStream,
    conn: rustls::Connection,
}

/// `std::io` over a tokio socket's non-blocking calls.
struct TryIo<'a>(&'a TcpStream);

impl Read for TryIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for TryIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl TlsIo {
    /// Wrap a socket whose handshake is done.
    pub(crate) fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> TlsIo {
        TlsIo {
            tcp,
            conn: conn.into(),
        }
    }

    /// Write held TLS records until they are all out (`Ok(true)`) or the
    /// socket is full (`Ok(false)`).
    fn flush_tls(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut TryIo(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Read TLS records the socket has and decrypt them. `WouldBlock` when
    /// it has none; `Ok(0)` at end of stream.
    fn read_tls(&mut self) -> io::Result<usize> {
        let n = self.conn.read_tls(&mut TryIo(&self.tcp))?;
        if let Err(e) = self.conn.process_new_packets() {
            // Send the alert rustls prepared, if the socket takes it.
            let _ = self.flush_tls();
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        // Handshake-level answers (KeyUpdate): out now, or held as backlog.
        self.flush_tls()?;
        Ok(n)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let room = buf.initialize_unfilled_to(buf.remaining().min(READ_CHUNK));
            match self.conn.reader().read(room) {
                Ok(n) => {
                    // 0: the peer closed with close_notify.
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if would_block(&e) => {}
                // Closed without close_notify: an end of stream all the same
                // (as PostgreSQL takes it).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            match self.read_tls() {
                Ok(_) => {}
                Err(e) if would_block(&e) => {
                    ready!(self.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Accept as much plaintext as the backlog allows, without blocking.
    fn write_now(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if !self.flush_tls()? {
            return Ok(0);
        }
        let n = self.conn.writer().write(bytes)?;
        self.flush_tls()?;
        Ok(n)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.flush_tls()? {
            ready!(self.tcp.poll_write_ready(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_flush(cx))?;
        let n = self.conn.writer().write(bytes)?;
        self.flush_tls()?;
        Poll::Ready(Ok(n))
    }
}

impl Stream {
    /// The socket underneath.
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(t) => Some(&t.tcp),
            Stream::Closed => None,
        }
    }

    /// Whether the connection is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The rustls state of a TLS connection.
    pub(crate) fn tls(&self) -> Option<&rustls::Connection> {
        match self {
            Stream::Tls(t) => Some(&t.conn),
            _ => None,
        }
    }

    /// The peer's address.
    pub(crate) fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp().ok_or_else(closed)?.peer_addr()
    }

    /// Upgrade a plain stream with a TLS server handshake. On failure the
    /// stream is left [`Stream::Closed`].
    pub(crate) async fn accept_tls(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let Stream::Plain(tcp) = std::mem::replace(self, Stream::Closed) else {
            return Err(closed());
        };
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        let (tcp, conn) = tls.into_inner();
        *self = Stream::Tls(Box::new(TlsIo::new(tcp, conn)));
        Ok(())
    }

    /// Upgrade a plain stream with a TLS client handshake. On failure the
    /// stream is left [`Stream::Closed`].
    pub(crate) async fn connect_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let Stream::Plain(tcp) = std::mem::replace(self, Stream::Closed) else {
            return Err(closed());
        };
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let (tcp, conn) = tls.into_inner();
        *self = Stream::Tls(Box::new(TlsIo::new(tcp, conn)));
        Ok(())
    }

    /// TLS records wait to be written: wait for writability and flush.
    #[inline]
    pub(crate) fn backlog(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.conn.wants_write(),
            Stream::Closed => false,
        }
    }

    /// Ready when the socket can take bytes.
    #[inline]
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_write_ready(cx),
            Stream::Tls(t) => t.tcp.poll_write_ready(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    /// Write as much as the connection accepts without blocking (for TLS:
    /// plaintext taken by rustls once held records are out).
    #[inline]
    pub(crate) fn write_now(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => super::write_now(s, bytes),
            Stream::Tls(t) => t.write_now(bytes),
            Stream::Closed => Err(closed()),
        }
    }

    /// Read what is there without waiting (`WouldBlock` if nothing). Polls
    /// the socket with a waker that is never woken: a read watch on it must
    /// be forgotten after.
    pub(crate) fn try_read_buf(&mut self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        if let Stream::Plain(s) = self {
            return s.try_read_buf(buf);
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(self), &mut cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Write held TLS records the socket takes now.
    #[inline]
    pub(crate) fn flush_backlog(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.flush_tls().map(drop),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            Stream::Tls(t) => f.debug_tuple("Tls").field(&t.tcp).finish(),
            Stream::Closed => f.write_str("Closed"),
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => t.poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => t.poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => t.poll_flush(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => {
                t.conn.send_close_notify();
                ready!(t.poll_flush(cx))?;
                Pin::new(&mut t.tcp).poll_shutdown(cx)
            }
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Outbox, ReadWatch};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    /// A connected TLS pair over loopback: (client side, server side).
    async fn tls_pair() -> (Stream, Stream) {
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert: CertificateDer<'static> = params.self_signed(&key).unwrap().der().clone();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, mut b) = (Stream::Plain(a.unwrap()), Stream::Plain(b.unwrap().0));
        let name = ServerName::try_from("localhost").unwrap();
        let (ra, rb) = tokio::join!(
            a.connect_tls(Arc::new(client), name),
            b.accept_tls(Arc::new(server))
        );
        ra.unwrap();
        rb.unwrap();
        (a, b)
    }

    /// Read through `watch` until `buf` holds `n` bytes.
    async fn read_to(s: &mut Stream, watch: &mut ReadWatch, buf: &mut bytes::BytesMut, n: usize) {
        while buf.len() < n {
            let r = std::future::poll_fn(|cx| {
                watch.poll(cx, |cx| {
                    tokio_util::io::poll_read_buf(Pin::new(&mut *s), cx, buf)
                })
            })
            .await
            .unwrap();
            assert!(r > 0, "end of stream after {} of {n} bytes", buf.len());
        }
    }

    /// Send `bytes` the relay's way: an outbox, flushed when the socket is
    /// writable while anything (queued bytes or TLS records) waits.
    async fn send_all(s: &mut Stream, out: &mut Outbox, bytes: &[u8]) {
        out.send(s, bytes).unwrap();
        while !out.is_empty() || s.backlog() {
            std::future::poll_fn(|cx| s.poll_write_ready(cx))
                .await
                .unwrap();
            out.flush(s).unwrap();
        }
    }

    /// Bulk data past the socket buffers (TLS records held as backlog while
    /// the reader is slow), then ping-pong through read watches on a
    /// multi-threaded runtime: a lost wake-up or a record left unflushed
    /// shows as a stall.
    #[test]
    fn tls_streams_flush_their_backlog_and_lose_no_wake_up() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut client, mut server) = tls_pair().await;
            const BULK: usize = 8 << 20;
            const ROUNDS: usize = 5_000;
            let echo = tokio::spawn(async move {
                let (mut watch, mut out) = (ReadWatch::default(), Outbox::default());
                let mut buf = bytes::BytesMut::new();
                let chunk: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
                send_all(&mut server, &mut out, &chunk).await;
                for _ in 0..ROUNDS {
                    read_to(&mut server, &mut watch, &mut buf, 1).await;
                    let byte = buf.split_to(1);
                    send_all(&mut server, &mut out, &byte).await;
                }
            });
            let work = async {
                let (mut watch, mut out) = (ReadWatch::default(), Outbox::default());
                let mut buf = bytes::BytesMut::new();
                // A slow reader: the sender's socket fills first.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                read_to(&mut client, &mut watch, &mut buf, BULK).await;
                assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                buf.clear();
                for i in 0..ROUNDS {
                    send_all(&mut client, &mut out, &[i as u8]).await;
                    read_to(&mut client, &mut watch, &mut buf, 1).await;
                    assert_eq!(buf.split_to(1)[0], i as u8);
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), work)
                .await
                .expect("a TLS transfer stalled: a wake-up or a record was lost");
            echo.await.unwrap();
        });
    }
}
