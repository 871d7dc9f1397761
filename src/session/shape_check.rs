//! Keeping a statement's shape where pgpilot parses it again.
//!
//! A client that described a prepared statement decodes its rows with the
//! types it was told. PostgreSQL keeps a protocol-level statement's result
//! fixed: after a schema change that would alter it, every use of the cached
//! statement fails with `0A000 cached plan must not change result type` (the
//! client then prepares it again). pgpilot parses a session's statements again
//! on other connections (another node, another pooled connection, after a
//! failover), where the same text may now have another result. So:
//!
//! * the answer to the client's first Describe of a statement is remembered
//!   as its [`Shape`] ([`Session::on_described`]);
//! * wherever pgpilot parses a statement with a known shape again, it
//!   describes it in the same exchange (or, in front of a message of a batch
//!   already under way, in the same stream, and the batch's next messages
//!   wait for the answer) and compares ([`Session::on_shape_checked`]);
//! * a statement whose shape differs is *broken* for the session: each Bind
//!   or Describe of it is replaced by a message that fails on the server at
//!   that very position (so the server skips the rest of the batch and aborts
//!   the transaction, as for PostgreSQL's error), preceded by a marker whose
//!   answer tells the link to replace that failure with PostgreSQL's `0A000`
//!   ([`Session::fail_broken_use`]). Closing or parsing the name again ends
//!   it, as it does for PostgreSQL.
//!
//! A statement the client never described has no shape to keep: it is parsed
//! again without a check (its rows are those of the new parse, as its
//! description would have been).

use bytes::{BufMut, BytesMut};

use super::link::PendingClose;
use super::{Session, SessionError};
use crate::config::NodeId;
use crate::protocol::frame::cstr;
use crate::protocol::shape::Shape;
use crate::protocol::tag;

/// A portal name no client uses: the marker Close closes nothing.
const MARKER_PORTAL: &[u8] = b"\x7fpgpilot shape marker";

/// A statement name no client uses: describing it fails at once (26000),
/// which is the failure the marker announces.
const ABSENT_STATEMENT: &[u8] = b"\x7fpgpilot shape changed";

impl Session {
    /// The client's Describe of `name` was answered with `shape`: the first
    /// such answer is what the client knows of the statement.
    pub(super) fn on_described(&mut self, name: &[u8], shape: Shape) {
        if let Some(st) = self.client_view.stmts.get_mut(name) {
            st.shape.get_or_insert(shape);
        }
    }

    /// pgpilot's Describe of `name`, parsed again mid-batch, was answered
    /// (`got`, `None` if an error skipped it): the batch may go on, the
    /// statement broken if its shape is not the one the client knows.
    pub(super) fn on_shape_checked(&mut self, name: &[u8], expected: Shape, got: Option<Shape>) {
        self.shape_wait = false;
        self.recheck = true;
        if got.is_some_and(|g| g != expected) {
            self.mark_broken(name);
        }
    }

    /// Statement `name` no longer has the shape the client knows.
    pub(super) fn mark_broken(&mut self, name: &[u8]) {
        if let Some(st) = self.client_view.stmts.get_mut(name) {
            tracing::debug!(statement = %String::from_utf8_lossy(name), "statement's result changed: its uses fail with 0A000");
            st.broken = true;
            self.client_view.any_broken = true;
        }
    }

    /// Whether statement `name` is broken for the session.
    pub(super) fn is_broken(&self, name: &[u8]) -> bool {
        self.client_view.any_broken && self.client_view.stmts.get(name).is_some_and(|s| s.broken)
    }

    /// Whether this message (a Bind, or a Describe of a statement) uses a
    /// broken statement.
    pub(super) fn uses_broken(&self, t: u8, frame: &[u8]) -> bool {
        let body = &frame[5..];
        let name = match t {
            tag::BIND => super::route::bind_statement(body),
            tag::DESCRIBE if body.first() == Some(&b'S') => {
                cstr(&body[1..]).map(|(n, _)| n).unwrap_or_default()
            }
            _ => return false,
        };
        self.is_broken(name)
    }

    /// Send, in place of a use of a broken statement at `pos` in `buf` (after
    /// the messages before it, `span`), a marker Close and a Describe that
    /// fails: the client gets PostgreSQL's `0A000` at that position, and the
    /// server skips the rest of the batch.
    #[cold]
    #[inline(never)]
    pub(super) fn fail_broken_use(
        &mut self,
        node: NodeId,
        buf: &[u8],
        pos: usize,
        span: &mut Option<(NodeId, usize)>,
    ) -> Result<(), SessionError> {
        self.flush_span(buf, *span, pos)?;
        *span = None;
        self.set_active(node);
        let now = self.clock.now();
        let mut out = BytesMut::new();
        out.put_u8(tag::CLOSE);
        out.put_i32((4 + 1 + MARKER_PORTAL.len() + 1) as i32);
        out.put_u8(b'P');
        out.put_slice(MARKER_PORTAL);
        out.put_u8(0);
        super::client_view::describe_statement_message(&mut out, ABSENT_STATEMENT);
        let link = self.link_mut(node)?;
        link.begin_request(now);
        let request = link.sent + 1;
        link.closes.push_back(PendingClose {
            request,
            statement: None,
            injected: true,
            marks_shape_error: true,
        });
        link.in_batch = true;
        link.send(&out)
    }
}
