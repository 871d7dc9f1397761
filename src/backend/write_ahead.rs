//! Writing a queued session's request on the connection handed to it
//! ([`Ahead`]): decided when the waiter is taken out of the queue, under
//! the node's lock, so a waiter that gave up before never has its request
//! written; one gone after costs the connection.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Grant, Pool, PooledConn, Waiter};
use crate::net::Stream;

/// A queued session's request (its own copy of [`Ahead`]).
pub(super) struct Request {
    /// The whole request.
    pub(super) bytes: bytes::Bytes,
    /// See [`Ahead::max_held`].
    pub(super) max_held: usize,
}

/// A request a session leaves with its place in the queue, for the session
/// that hands it a connection to write there first. Only a request that
/// nothing must precede on any connection of its key: no settings to replay,
/// no statement to prepare or close (the pool checks the connection's own
/// statements against `max_held`), routed to the node as its primary.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ahead<'a> {
    /// The request: whole messages, to be written exactly once.
    pub(crate) request: &'a [u8],
    /// Written only on a connection holding at most this many prepared
    /// statements (`pool.max_prepared_statements`: past it, some are closed
    /// before any request).
    pub(crate) max_held: usize,
}

impl Pool {
    /// Hand `conn` to `w`, taken out of the queue: write its request first
    /// if it left one and nothing must precede it on this connection.
    pub(super) fn deliver(&self, w: Waiter, mut conn: PooledConn, now: Instant) {
        if let Some(req) = &w.ahead
            && self.may_write_ahead(&conn, req)
        {
            conn.written_ahead = write_ahead(&conn, &req.bytes);
            if !conn.written_ahead.is_empty()
                && let Some(np) = self.nodes.get(conn.key.node.index())
            {
                np.written_ahead_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        match w.tx.send(Grant::Conn(conn)) {
            Ok(()) => {}
            Err(Grant::Conn(unsent)) if !unsent.written_ahead.is_empty() => {
                // Gone after it was taken out of the queue, with its request
                // already on the way to the server: the answer would reach
                // no one and could not be told from the next user's, so the
                // connection is closed (its slot goes to the next waiter).
                tracing::debug!(
                    node = %unsent.key.node,
                    pid = unsent.cancel_key.pid,
                    "closing a connection whose waiter left after its request was written"
                );
                drop(unsent);
            }
            // It gave up just now: the next waiter, or idle.
            Err(Grant::Conn(unsent)) => self.put_idle(unsent, now),
            Err(Grant::Slot(_)) => unreachable!("a connection was sent"),
        }
    }

    /// Whether `req` may be written on `conn` before its session runs: a
    /// plain TCP connection (a TLS one holds records its user must flush)
    /// with nothing read and not past the waiter's statement cap, to a node
    /// that is still the primary (the request was routed to it as such).
    fn may_write_ahead(&self, conn: &PooledConn, req: &Request) -> bool {
        matches!(conn.stream, Stream::Plain(_))
            && conn.buf.is_empty()
            && conn.written_ahead.is_empty()
            && conn.held.len() <= req.max_held
            && self
                .cluster
                .as_ref()
                .is_none_or(|c| c.snapshot().primary == Some(conn.key.node))
    }
}

/// Write as much of `request` as the socket of `conn` takes now; what was
/// written (nothing if the socket is full or broken: its user finds out).
fn write_ahead(conn: &PooledConn, request: &bytes::Bytes) -> bytes::Bytes {
    let Stream::Plain(tcp) = &conn.stream else {
        return bytes::Bytes::new();
    };
    match crate::net::write_now(tcp, request) {
        Ok(n) => request.slice(..n),
        Err(_) => bytes::Bytes::new(),
    }
}
