//! Socket helpers shared by the client and server sides: bounded writes,
//! the per-direction outbox, the readiness watch, and [`Stream`], a
//! connection that is plain TCP or TLS.

use std::time::Duration;

mod cert;
mod pg_tls;
mod stream;
pub(crate) use cert::{common_name, end_point_hash};
// Public: tokio-postgres over rustls, for embedders and the tests.
pub use pg_tls::{Io, PgTls, PgTlsConnect, PgTlsStream};
pub(crate) use stream::Stream;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Why a bounded write failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// The peer is gone or the socket failed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
    /// No progress within the limit.
    #[error("write timed out")]
    Timeout,
}

/// Write all of `bytes`, failing if the peer does not take them within `limit`.
///
/// The common case (the socket buffer has room) completes with non-blocking
/// writes and never touches the timer wheel; only a write that would block pays
/// for a timeout.
pub(crate) async fn write_all_timeout<S: Transport + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), WriteError> {
    let n = stream.write_now(bytes)?;
    let bytes = &bytes[n..];
    if bytes.is_empty() && !stream.backlog() {
        return Ok(());
    }
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r.map_err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout),
    }
}

/// The most one read into a buffer without room takes: what the client
/// buffer of a session that was idle gets when bytes arrive (one TLS
/// record's worth, as a read of a TLS stream hands out at most).
const LAZY_READ: usize = 16 * 1024;

/// Read into `buf`, which may hold no memory: an idle session keeps no read
/// buffer (as PgBouncer's sbuf gives its buffer back between packets). A
/// buffer without room is read into on the stack first and then given just
/// the room those bytes take; a buffer with room is read into directly.
pub(crate) fn poll_read_lazy<R: tokio::io::AsyncRead + Unpin>(
    r: std::pin::Pin<&mut R>,
    cx: &mut std::task::Context<'_>,
    buf: &mut bytes::BytesMut,
) -> std::task::Poll<std::io::Result<usize>> {
    if buf.capacity() > buf.len() {
        return tokio_util::io::poll_read_buf(r, cx, buf);
    }
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); LAZY_READ];
    let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
    std::task::ready!(r.poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    std::task::Poll::Ready(Ok(read.filled().len()))
}

/// What an [`Outbox`] writes to: a socket, or a [`Stream`] that may hold
/// TLS records of its own.
pub(crate) trait Transport {
    /// Write as much of `bytes` as is accepted without blocking.
    fn write_now(&mut self, bytes: &[u8]) -> std::io::Result<usize>;
    /// Write what the transport itself holds (TLS records), without blocking.
    fn flush_backlog(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether the transport itself holds bytes to write.
    fn backlog(&self) -> bool {
        false
    }
}

impl Transport for TcpStream {
    #[inline]
    fn write_now(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        write_now(self, bytes)
    }
}

impl Transport for Stream {
    #[inline]
    fn write_now(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        Stream::write_now(self, bytes)
    }
    #[inline]
    fn flush_backlog(&mut self) -> std::io::Result<()> {
        Stream::flush_backlog(self)
    }
    #[inline]
    fn backlog(&self) -> bool {
        Stream::backlog(self)
    }
}

/// Write as much of `bytes` as the socket accepts without blocking; returns how
/// many bytes were written.
pub(crate) fn write_now(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match stream.try_write(&bytes[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// An outgoing byte queue for one socket: bytes the socket would not take yet.
///
/// The relay never blocks on a write: it queues what the peer cannot take and
/// keeps reading the other direction, so neither side can deadlock the other.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Bytes accepted for sending but not yet written.
    pending: bytes::BytesMut,
    /// When the queue last stopped making progress (for the write timeout).
    stalled_since: Option<tokio::time::Instant>,
}

impl Outbox {
    /// Send `bytes` after whatever is queued; writes immediately when possible.
    pub(crate) fn send(
        &mut self,
        stream: &mut impl Transport,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        if self.pending.is_empty() {
            let n = stream.write_now(bytes)?;
            if n < bytes.len() {
                self.pending.extend_from_slice(&bytes[n..]);
                self.stalled_since = Some(tokio::time::Instant::now());
            }
            Ok(())
        } else {
            self.pending.extend_from_slice(bytes);
            self.flush(stream)
        }
    }

    /// Write queued bytes (and what the transport holds) that the socket
    /// accepts now.
    pub(crate) fn flush(&mut self, stream: &mut impl Transport) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return stream.flush_backlog();
        }
        let n = stream.write_now(&self.pending)?;
        if n > 0 {
            bytes::Buf::advance(&mut self.pending, n);
            self.stalled_since = (!self.pending.is_empty()).then(tokio::time::Instant::now);
            if self.pending.is_empty() {
                // An empty queue keeps no memory (a stall is rare; the
                // next one allocates again).
                self.pending = bytes::BytesMut::new();
            }
        }
        Ok(())
    }

    /// Bytes waiting.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Since when the queue has been stuck, if it is non-empty.
    pub(crate) fn stalled_since(&self) -> Option<tokio::time::Instant> {
        self.stalled_since.filter(|_| !self.pending.is_empty())
    }

    /// Drain the queue with a blocking write bounded by `limit` (used before closing).
    pub(crate) async fn drain<S: Transport + tokio::io::AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        limit: Duration,
    ) -> Result<(), WriteError> {
        let pending = std::mem::take(&mut self.pending);
        write_all_timeout(stream, &pending, limit).await
    }
}

/// Read wake-ups of one socket, tracked so that a wait need not poll a
/// socket whose last poll registered for readiness and has not been woken
/// since: nothing can have arrived on it.
///
/// A relay turn waits on the client and on a server connection; most turns
/// are woken by one of them, and polling the other again only re-registers
/// the same waker (tokio keeps one reader waker per socket until it fires).
/// The watch hands the socket a waker of its own, which records that this
/// socket fired before waking the task.
///
/// Sound only while nothing else polls the socket's read side: whoever does
/// replaces the watch's waker, so the owner calls [`ReadWatch::forget`]
/// after any such use.
pub(crate) struct ReadWatch {
    /// Shared with the waker the socket holds.
    inner: std::sync::Arc<WatchInner>,
    /// That waker (built once: the socket keeps it while it stays the same).
    waker: std::task::Waker,
    /// The last poll returned `Pending`, so the socket holds `waker`.
    armed: bool,
    /// The task waker last given to `inner.task` (compared, to hand it over
    /// only when it changes).
    task: std::task::Waker,
}

/// What a [`ReadWatch`]'s waker shares with the watch.
struct WatchInner {
    /// The socket fired since the watch last polled it.
    woken: std::sync::atomic::AtomicBool,
    /// The task to wake when it does. Woken by reference, never taken: it
    /// stays valid however wake-ups and polls interleave across threads
    /// (replaced only when the task's waker changes).
    task: std::sync::Mutex<std::task::Waker>,
}

impl std::task::Wake for WatchInner {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.wake_task();
    }
}

impl WatchInner {
    /// A wake-up's second half, after setting `woken`. A poll of the watch
    /// may come in between (on another thread); the task must stay
    /// registered whatever the order.
    fn wake_task(&self) {
        // (Nothing panics while holding the lock; a poisoned one is still sound.)
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        task.wake_by_ref();
    }
}

impl Default for ReadWatch {
    fn default() -> Self {
        let inner = std::sync::Arc::new(WatchInner {
            woken: std::sync::atomic::AtomicBool::new(false),
            task: std::sync::Mutex::new(std::task::Waker::noop().clone()),
        });
        ReadWatch {
            waker: std::task::Waker::from(inner.clone()),
            inner,
            armed: false,
            task: std::task::Waker::noop().clone(),
        }
    }
}

impl ReadWatch {
    /// Run `read` (a poll of the socket's read side) with the watch's waker,
    /// unless the socket is known to have nothing: then `Pending` at once.
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        read: impl FnOnce(&mut std::task::Context<'_>) -> std::task::Poll<T>,
    ) -> std::task::Poll<T> {
        use std::sync::atomic::Ordering;
        // Hand the task waker over first (the socket may fire as soon as it
        // is polled), unless the watch has it already.
        if !self.task.will_wake(cx.waker()) {
            let mut task = self.inner.task.lock().unwrap_or_else(|e| e.into_inner());
            task.clone_from(cx.waker());
            drop(task);
            self.task.clone_from(cx.waker());
        }
        let fired = self.inner.woken.load(Ordering::Acquire);
        if self.armed && !fired {
            return std::task::Poll::Pending;
        }
        // Consume the flag (a swap, so it also synchronises with the latest
        // wake-up: the poll below sees the readiness that caused it). A
        // wake-up after this sets it again.
        if fired {
            self.inner.woken.swap(false, Ordering::AcqRel);
        }
        let r = read(&mut std::task::Context::from_waker(&self.waker));
        self.armed = r.is_pending();
        r
    }

    /// Something else may have polled the socket (or it is a new one): poll
    /// it next time.
    pub(crate) fn forget(&mut self) {
        self.armed = false;
    }

    /// Let go of the task's waker (the watch is kept for another socket):
    /// a wake-up from the old socket then wakes nobody and only makes the
    /// next poll look, as after [`ReadWatch::forget`], which this implies.
    pub(crate) fn release(&mut self) {
        let noop = std::task::Waker::noop();
        let mut task = self.inner.task.lock().unwrap_or_else(|e| e.into_inner());
        task.clone_from(noop);
        drop(task);
        self.task.clone_from(noop);
        self.armed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;
    use tokio::io::AsyncWriteExt;

    /// One poll of `b` through `watch`: its result, and whether the socket
    /// itself was polled.
    async fn poll_once(
        watch: &mut ReadWatch,
        b: &mut TcpStream,
        buf: &mut bytes::BytesMut,
    ) -> (Poll<usize>, bool) {
        std::future::poll_fn(|cx| {
            let mut polled = false;
            let r = watch.poll(cx, |cx| {
                polled = true;
                tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *b), cx, buf)
            });
            Poll::Ready((r.map(|r| r.unwrap()), polled))
        })
        .await
    }

    /// A watch skips the socket only between a `Pending` poll and the
    /// socket's next wake-up, and polls it again after `forget`.
    #[tokio::test]
    async fn read_watch_skips_only_a_quiet_registered_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut a = TcpStream::connect(addr).await.unwrap();
        let (mut b, _) = listener.accept().await.unwrap();
        let mut watch = ReadWatch::default();
        let mut buf = bytes::BytesMut::with_capacity(64);
        // Nothing there: the socket is polled and registers.
        assert_eq!(
            poll_once(&mut watch, &mut b, &mut buf).await,
            (Poll::Pending, true)
        );
        // Still nothing: skipped.
        assert_eq!(
            poll_once(&mut watch, &mut b, &mut buf).await,
            (Poll::Pending, false)
        );
        // Data arrives: the socket's wake-up makes the next wait poll it.
        a.write_all(b"hello").await.unwrap();
        let n = std::future::poll_fn(|cx| {
            watch.poll(cx, |cx| {
                tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut b), cx, &mut buf)
            })
        })
        .await
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(&buf[..], b"hello");
        // After a read the socket is polled again (to register).
        assert_eq!(
            poll_once(&mut watch, &mut b, &mut buf).await,
            (Poll::Pending, true)
        );
        assert_eq!(
            poll_once(&mut watch, &mut b, &mut buf).await,
            (Poll::Pending, false)
        );
        // forget(): polled although registered and quiet.
        watch.forget();
        assert_eq!(
            poll_once(&mut watch, &mut b, &mut buf).await,
            (Poll::Pending, true)
        );
        // The peer closing wakes it too: end of stream.
        drop(a);
        let n = std::future::poll_fn(|cx| {
            watch.poll(cx, |cx| {
                tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut b), cx, &mut buf)
            })
        })
        .await
        .unwrap();
        assert_eq!(n, 0);
    }

    /// Counts the wake-ups of a task.
    struct CountingTask(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingTask {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The interleaving that once lost a wake-up, played in order on one
    /// thread: a wake-up sets the flag, the task polls (consuming it and
    /// re-arming), and only then does the wake-up wake the task. A later
    /// readiness must still wake the task. (With a waker slot that a wake-up
    /// empties, the second half took the registration the poll had just
    /// made, and the last readiness woke nobody.)
    #[test]
    fn a_wake_up_split_by_a_poll_leaves_the_task_registered() {
        let counter = std::sync::Arc::new(CountingTask(Default::default()));
        let task = std::task::Waker::from(counter.clone());
        let mut cx = std::task::Context::from_waker(&task);
        let mut watch = ReadWatch::default();
        // What the socket holds after a Pending read.
        let mut socket: Option<std::task::Waker> = None;
        let mut pending_read = |cx: &mut std::task::Context<'_>| {
            socket = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        assert!(watch.poll(&mut cx, &mut pending_read).is_pending());
        // Readiness, first half of the wake-up.
        watch
            .inner
            .woken
            .store(true, std::sync::atomic::Ordering::Release);
        // The task polls in between: the socket is polled again, still empty.
        assert!(watch.poll(&mut cx, &mut pending_read).is_pending());
        // The wake-up's second half.
        watch.inner.wake_task();
        assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The task polls after that wake: nothing new, the socket is not polled.
        let mut polled = false;
        assert!(
            watch
                .poll(&mut cx, |_| {
                    polled = true;
                    Poll::<()>::Pending
                })
                .is_pending()
        );
        assert!(!polled);
        // New data: the socket wakes the waker it holds; the task must hear it.
        socket.take().unwrap().wake();
        assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        let mut polled = false;
        assert!(
            watch
                .poll(&mut cx, |_| {
                    polled = true;
                    Poll::Ready(())
                })
                .is_ready()
        );
        assert!(polled);
    }

    /// Ping-pong through a watched socket on a multi-threaded runtime, with
    /// a second watched socket the echo task also waits on (as the relay
    /// waits on client and server): wake-ups and polls then interleave
    /// across threads, and a lost wake-up shows as a stall.
    #[test]
    fn read_watch_loses_no_wake_up_across_threads() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut a = TcpStream::connect(addr).await.unwrap();
            let (mut b, _) = listener.accept().await.unwrap();
            let mut c = TcpStream::connect(addr).await.unwrap();
            let (mut d, _) = listener.accept().await.unwrap();
            const ROUNDS: usize = 20_000;
            let echo = tokio::spawn(async move {
                let (mut wb, mut wd) = (ReadWatch::default(), ReadWatch::default());
                let (mut bb, mut bd) = (bytes::BytesMut::new(), bytes::BytesMut::new());
                let mut echoed = 0;
                while echoed < ROUNDS {
                    let from_b = std::future::poll_fn(|cx| {
                        if let Poll::Ready(r) = wb.poll(cx, |cx| {
                            tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut b), cx, &mut bb)
                        }) {
                            return Poll::Ready((true, r.unwrap()));
                        }
                        wd.poll(cx, |cx| {
                            tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut d), cx, &mut bd)
                        })
                        .map(|r| (false, r.unwrap()))
                    })
                    .await;
                    if from_b.0 {
                        b.write_all(&bb).await.unwrap();
                        echoed += bb.len();
                        bb.clear();
                    } else {
                        d.write_all(&bd).await.unwrap();
                        bd.clear();
                    }
                }
            });
            // A second client keeps the other socket waking now and then.
            let noise = tokio::spawn(async move {
                let mut byte = [0u8; 1];
                for _ in 0..ROUNDS / 10 {
                    if c.write_all(b"n").await.is_err() {
                        break;
                    }
                    if tokio::io::AsyncReadExt::read(&mut c, &mut byte)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            let pingpong = async {
                let mut byte = [0u8; 1];
                for _ in 0..ROUNDS {
                    a.write_all(b"x").await.unwrap();
                    tokio::io::AsyncReadExt::read_exact(&mut a, &mut byte)
                        .await
                        .unwrap();
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), pingpong)
                .await
                .expect("a round trip stalled: a wake-up was lost");
            echo.await.unwrap();
            noise.abort();
        });
    }
}
