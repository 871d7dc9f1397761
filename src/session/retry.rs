//! The safety net for reads a standby refuses: a balanced read answered with
//! an error only recovery causes is run again on the primary, unseen by the
//! client.
//!
//! The unlogged-relation lookup ([`super::unlogged`]) predicts most refusals;
//! others it cannot (a function reading an unlogged table, `pg_current_wal_lsn()`
//! and other recovery-only functions). A request is *armed* when it is sent to
//! a standby and may safely run twice: a single read statement outside a
//! transaction, leaving no session state, alone on its connection — a simple
//! Query of one statement, or one extended batch (at most an unnamed Parse,
//! Bind, Describe, one Execute, Sync) received whole. Its bytes are kept (in a
//! buffer reused from request to request).
//!
//! The link then *watches* the response: the messages that may precede a
//! refusal (ParseComplete, BindComplete, ParameterDescription, NoData, and
//! RowDescription: a function runs, and may be refused, after it) are held
//! back; the first other message ends the watch and everything held goes
//! on. An ErrorResponse with SQLSTATE `0A000` (unlogged relations, serializable
//! mode in a hot standby), `25006` (read-only transaction, during recovery) or
//! `55000` (recovery is in progress) is held with the rest of the response up
//! to its ReadyForQuery. Then, if nothing else was sent on the connection
//! meanwhile and the session is still outside a transaction, the held answer
//! is dropped, the statement shape is marked primary-only
//! ([`crate::router::classify::Learned`]) and the request goes back in front of
//! the client's unrouted input, to be routed to the primary. Otherwise the
//! held answer reaches the client as it came. Nothing of the statement's result
//! has reached the client at that point (the refusal came before any row), and a statement that failed on a standby had no
//! effect there.

use std::sync::Arc;

use super::link::Link;
use super::{Session, SessionError};
use crate::config::NodeId;
use crate::net::Outbox;
use crate::protocol::frame::{ErrorFields, peek_frame};
use crate::protocol::tag;
use crate::router::classify::{Access, Classification};

/// SQLSTATEs a hot standby answers reads with that the primary would not.
const REFUSALS: &[&str] = &["0A000", "25006", "55000"];

/// The rest of a read up to this size is joined to what a watch held, so
/// both go in one write.
const MAX_JOINED: usize = 8 * 1024;

/// Where a link is in watching an armed request's response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watch {
    /// Not watching: the response flows to the client.
    #[default]
    Off,
    /// Holding the messages that may precede a refusal.
    Watching,
    /// A refusal came: holding the rest of the response up to ReadyForQuery.
    Refusing,
    /// The whole refused response is held; the session decides.
    Refused,
}

/// The session's armed request (see the module docs).
#[derive(Debug, Default)]
pub(super) struct RetryNet {
    /// The armed request's bytes, as the client sent them.
    frames: Vec<u8>,
    /// The node it went to and its classification, while armed.
    armed: Option<(NodeId, Arc<Classification>)>,
    /// The request just routed goes to a node other than the primary (set
    /// with the routing decision, from the snapshot it used).
    pub(super) off_primary: bool,
}

impl Session {
    /// A request is about to be sent to `node`, starting at the front of
    /// `rest` (a simple Query if `simple`, else an extended batch): arm the
    /// safety net if it may run again on the primary.
    pub(super) fn arm_retry(&mut self, node: NodeId, rest: &[u8], simple: bool) {
        self.retry.armed = None;
        let Some(class) = self.pending_class.as_ref() else {
            return;
        };
        let eligible = class.access == Access::Read
            && class.statements == 1
            && class.tx.is_none()
            && !class.session_state
            && !class.sticky_primary
            && class.prepare.is_none()
            && class.execute.is_none()
            && class.deallocate.is_none()
            && !self.tx.in_block()
            && self.retry.off_primary
            && self.links[node.index()].as_ref().is_some_and(|l| !l.busy());
        if !eligible {
            return;
        }
        let len = if simple {
            peek_frame(rest, self.cfg.max_message_size)
                .ok()
                .flatten()
                .map(|f| f.wire_len)
        } else {
            self.single_read_batch(rest)
        };
        let (Some(len), Some(link)) = (len, self.links[node.index()].as_mut()) else {
            return;
        };
        let class = class.clone();
        self.retry.frames.clear();
        self.retry.frames.extend_from_slice(&rest[..len]);
        self.retry.armed = Some((node, class));
        link.st.watch = Watch::Watching;
        link.st.held.clear();
    }

    /// The length of the extended batch at the front of `rest` if it is one
    /// statement run once, received whole: at most an unnamed Parse, Binds
    /// and Describes, one Execute, then Sync.
    fn single_read_batch(&self, rest: &[u8]) -> Option<usize> {
        let mut p = 0;
        let mut executes = 0;
        loop {
            let f = peek_frame(&rest[p..], self.cfg.max_message_size).ok()??;
            let body = &rest[p + 5..p + f.wire_len];
            p += f.wire_len;
            match f.tag {
                tag::PARSE if body.first() == Some(&0) => {}
                tag::BIND | tag::DESCRIBE => {}
                tag::EXECUTE => executes += 1,
                tag::SYNC => return (executes == 1).then_some(p),
                _ => return None,
            }
        }
    }

    /// `node`'s link holds a refused response: run the request again on the
    /// primary if that is still safe, else give the client the response.
    pub(super) fn on_refused(&mut self, node: NodeId) -> Result<(), SessionError> {
        let armed = self.retry.armed.take();
        let link = self.link_mut(node)?;
        link.st.watch = Watch::Off;
        let mut held = std::mem::take(&mut link.st.held);
        let alone = !link.busy();
        let retry = alone && !self.tx.in_block() && armed.as_ref().is_some_and(|(n, _)| *n == node);
        if let (true, Some((_, class))) = (retry, armed) {
            class.primary_only.set();
            self.ctx.metrics.refusal_retried();
            tracing::debug!(%node, "a standby refused a read; running it on the primary");
            let mut cbuf =
                bytes::BytesMut::with_capacity(self.retry.frames.len() + self.cbuf.len());
            cbuf.extend_from_slice(&self.retry.frames);
            cbuf.extend_from_slice(&self.cbuf);
            self.cbuf = cbuf;
            self.next.avoid_standby = true;
            self.recheck = true;
        } else {
            self.to_client
                .send(&self.client, &held)
                .map_err(SessionError::ClientIo)?;
        }
        held.clear();
        self.link_mut(node)?.st.held = held;
        Ok(())
    }
}

impl Link {
    /// Forward the first `n` bytes of the server's buffer (whole messages)
    /// while an armed request's response is watched (see the module docs).
    #[cold]
    #[inline(never)]
    pub(super) fn forward_watched(
        &mut self,
        client: &tokio::net::TcpStream,
        to_client: &mut Outbox,
        n: usize,
    ) -> Result<(), SessionError> {
        let Link { conn, st } = self;
        let bytes = &conn.buf[..n];
        let mut i = 0;
        // Whole messages only: a message split across reads ends the watch.
        // Already framed by the link's scanner: no size limit to apply here.
        while let Ok(Some(f)) = peek_frame(&bytes[i..], usize::MAX) {
            let frame = &bytes[i..i + f.wire_len];
            match (st.watch, f.tag) {
                (Watch::Watching, b'1' | b'2' | b't' | b'n' | b'T') => {
                    st.held.extend_from_slice(frame)
                }
                (Watch::Watching, b'E') if refusal(&frame[5..]) => {
                    st.held.extend_from_slice(frame);
                    st.watch = Watch::Refusing;
                }
                (Watch::Refusing, t) => {
                    st.held.extend_from_slice(frame);
                    if t == b'Z' {
                        i += frame.len();
                        if i == n {
                            st.watch = Watch::Refused;
                            return Ok(());
                        }
                        // More than the refused request answered: it cannot
                        // run again out of turn.
                        break;
                    }
                }
                _ => break,
            }
            i += frame.len();
        }
        if i == n && st.watch != Watch::Off {
            return Ok(());
        }
        // The watch ends: what was held, then the rest (in one write unless
        // the rest is large: it is not copied then).
        st.watch = Watch::Off;
        let rest = &bytes[i..];
        let sent = if st.held.is_empty() {
            to_client.send(client, rest)
        } else if rest.len() <= MAX_JOINED {
            st.held.extend_from_slice(rest);
            to_client.send(client, &st.held)
        } else {
            to_client
                .send(client, &st.held)
                .and_then(|()| to_client.send(client, rest))
        };
        st.held.clear();
        sent.map_err(SessionError::ClientIo)
    }
}

/// An ErrorResponse (body) a standby sends only because it is in recovery.
fn refusal(body: &[u8]) -> bool {
    let e = ErrorFields::parse(body);
    e.severity == "ERROR" && REFUSALS.contains(&e.code.as_str())
}
