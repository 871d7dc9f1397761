//! Socket helpers shared by the client and server sides.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Why a bounded write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
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
pub async fn write_all_timeout(
    stream: &mut TcpStream,
    mut bytes: &[u8],
    limit: Duration,
) -> Result<(), WriteError> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    if bytes.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(limit, stream.write_all(bytes)).await {
        Ok(r) => r.map_err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout),
    }
}

/// Write as much of `bytes` as the socket accepts without blocking; returns how
/// many bytes were written.
pub fn write_now(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<usize> {
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
pub struct Outbox {
    /// Bytes accepted for sending but not yet written.
    pending: bytes::BytesMut,
    /// When the queue last stopped making progress (for the write timeout).
    stalled_since: Option<tokio::time::Instant>,
}

impl Outbox {
    /// Send `bytes` after whatever is queued; writes immediately when possible.
    pub fn send(&mut self, stream: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
        if self.pending.is_empty() {
            let n = write_now(stream, bytes)?;
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

    /// Write queued bytes the socket accepts now.
    pub fn flush(&mut self, stream: &TcpStream) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = write_now(stream, &self.pending)?;
        if n > 0 {
            bytes::Buf::advance(&mut self.pending, n);
            self.stalled_since = (!self.pending.is_empty()).then(tokio::time::Instant::now);
        }
        Ok(())
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Since when the queue has been stuck, if it is non-empty.
    pub fn stalled_since(&self) -> Option<tokio::time::Instant> {
        self.stalled_since.filter(|_| !self.pending.is_empty())
    }

    /// Drain the queue with a blocking write bounded by `limit` (used before closing).
    pub async fn drain(
        &mut self,
        stream: &mut TcpStream,
        limit: Duration,
    ) -> Result<(), WriteError> {
        let pending = std::mem::take(&mut self.pending);
        write_all_timeout(stream, &pending, limit).await
    }
}
