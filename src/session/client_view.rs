//! What a client has told "the server" that must hold on every node the session
//! uses: session settings, prepared statements, and the routing state that
//! follows from them.
//!
//! A session may hold one connection per node. PostgreSQL keeps settings and
//! prepared statements per connection, so pgpilot keeps the session's view here
//! and brings each connection up to it before using it:
//!
//! * **Settings** (`SET`, `RESET`, `DISCARD`, `SET SESSION CHARACTERISTICS` …) that
//!   succeeded are appended, in order, to a log; a connection replays the entries
//!   it has not seen before its next statement. A `SET` inside a transaction block
//!   is logged only when the transaction commits; `SET LOCAL` never is.
//! * **Prepared statements** (protocol Parse and SQL `PREPARE`) are remembered with
//!   their classification and the bytes that created them, and are prepared on
//!   another node only when something executes them there. SQL `PREPARE` runs
//!   on the primary, whose connection always holds every SQL-prepared
//!   statement of the session ([`super::sql_prepare`]).
//!
//! Effects are applied when the server confirms them (at the ReadyForQuery that
//! ends the request, if no error came first), never on the client's word alone.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::shape::Shape;
use crate::protocol::tag;
use crate::router::classify::{Classification, TxControl};
use crate::router::normalize::Hint;
use crate::router::session_cmd;

/// The most settings a session may log; past it the session stays on the primary
/// (its state could no longer be replayed faithfully elsewhere).
pub(crate) const MAX_LOG: usize = 10_000;

/// How a prepared statement is created on a node that lacks it.
#[derive(Debug, Clone)]
pub(crate) enum StmtSource {
    /// The client's Parse message, whole, as it arrived.
    Parse(Bytes),
    /// A Query message carrying the client's SQL `PREPARE`.
    Sql(Bytes),
}

/// A prepared statement of the session.
#[derive(Debug, Clone)]
pub(crate) struct Stmt {
    /// How to create it elsewhere.
    pub(crate) source: StmtSource,
    /// What executing it needs (routes Bind and `EXECUTE`).
    pub(crate) class: Arc<Classification>,
    /// A routing hint in its text, which applies to every execution.
    pub(crate) hint: Option<Hint>,
    /// What the client was told of it by its first Describe: checked where
    /// pgpilot parses it again.
    pub(crate) shape: Option<Shape>,
    /// Parsed again elsewhere, it no longer has that shape: every use fails as
    /// PostgreSQL's cached statement would (`0A000`), until the client closes
    /// or parses it again.
    pub(crate) broken: bool,
}

impl Stmt {
    /// A statement as the client just made it (no shape known yet).
    pub(crate) fn new(source: StmtSource, class: Arc<Classification>, hint: Option<Hint>) -> Stmt {
        Stmt {
            source,
            class,
            hint,
            shape: None,
            broken: false,
        }
    }
}

/// What a request does to the session once the server confirms it.
#[derive(Debug)]
pub(crate) struct Effects {
    /// The request's classification.
    pub(crate) class: Arc<Classification>,
    /// A Query message that replays the request's setting on other connections
    /// (`None` if there is nothing to replay).
    pub(crate) replay: Option<Bytes>,
    /// The request was sent inside a transaction block (settings wait for COMMIT).
    pub(crate) in_tx_block: bool,
    /// The Query message of an SQL `PREPARE`, to create the statement elsewhere.
    pub(crate) sql_prepare: Option<Bytes>,
    /// `SET pgpilot.route`: `Some(true)` = primary only, `Some(false)` = automatic.
    pub(crate) route: Option<bool>,
    /// `DISCARD ALL`: prepared statements are gone too.
    pub(crate) discard_all: bool,
    /// `SAVEPOINT` / `ROLLBACK TO` / `RELEASE`: which settings of the open
    /// transaction survive.
    pub(crate) savepoint: Option<session_cmd::SavepointOp>,
}

/// A setting made inside the open transaction block, or a savepoint marker.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    /// A setting (Query message), logged if the transaction commits.
    Setting(Bytes),
    /// A savepoint: `ROLLBACK TO` it drops the settings made after it.
    Savepoint(String),
}

/// The session-wide state replayed on, or tracked per, connection.
#[derive(Debug, Default)]
pub(crate) struct ClientView {
    /// Prepared statements by name (the unnamed one under the empty name).
    pub(crate) stmts: HashMap<Vec<u8>, Stmt>,
    /// Names of the SQL-prepared ones among them (a superset: a name is
    /// checked against `stmts` before use).
    pub(crate) sql_names: Vec<Vec<u8>>,
    /// Settings to replay, oldest first: Query messages. `log_base` is the sequence
    /// number of `log[0]`; a connection has applied all entries below its own mark.
    pub(crate) log: Vec<Bytes>,
    /// Sequence number of `log[0]` (grows when `DISCARD ALL`/`RESET ALL` voids the past).
    pub(crate) log_base: u64,
    /// Settings made inside the open transaction block (with savepoint markers),
    /// logged if it commits.
    pub(crate) pending_tx: Vec<Pending>,
    /// The log overflowed or a setting could not be replayed: stay on the primary.
    pub(crate) overflowed: bool,
    /// Some statement may be [`Stmt::broken`] (a cheap test before a lookup).
    pub(crate) any_broken: bool,
}

impl ClientView {
    /// Sequence number the next log entry gets (a connection at this mark is current).
    pub(crate) fn log_end(&self) -> u64 {
        self.log_base + self.log.len() as u64
    }

    /// The entries a connection at mark `applied` has not seen.
    pub(crate) fn log_since(&self, applied: u64) -> &[Bytes] {
        let from = applied.saturating_sub(self.log_base) as usize;
        self.log.get(from..).unwrap_or_default()
    }

    /// Append a confirmed setting. `DISCARD ALL`/`RESET ALL` void the earlier entries.
    pub(crate) fn log_setting(&mut self, query: Bytes, resets_all: bool) {
        if resets_all {
            self.log_base = self.log_end();
            self.log.clear();
        }
        if self.log.len() >= MAX_LOG {
            self.overflowed = true;
            return;
        }
        self.log.push(query);
    }

    /// The effects to record for a request, or `None` if it has none.
    /// `sql` is the statement text, `frame` the Query message that carried it (for
    /// extended-protocol statements, `None`: a Query is built from `sql`).
    pub(crate) fn effects_for(
        class: &Arc<Classification>,
        sql: &[u8],
        frame: Option<&[u8]>,
        in_tx_block: bool,
    ) -> Option<Box<Effects>> {
        let commits = matches!(class.tx, Some(TxControl::Commit));
        let savepoint = matches!(class.tx, Some(TxControl::Savepoint));
        let interesting = class.session_state
            || class.prepare.is_some()
            || class.deallocate.is_some()
            || class.sets_read_only_default.is_some()
            || commits
            || savepoint;
        if !interesting {
            return None;
        }
        let text = std::str::from_utf8(sql).unwrap_or("");
        let query = || match frame {
            Some(f) => Bytes::copy_from_slice(f),
            None => query_message(sql),
        };
        // Only a single statement can be replayed faithfully; a string mixing a
        // setting with other statements pins the session to the primary instead
        // (see `pins_primary`).
        let replay = (class.session_state
            && class.statements == 1
            && class.deallocate.is_none()
            && !session_cmd::is_transaction_scoped_set(text))
        .then(query);
        Some(Box::new(Effects {
            class: class.clone(),
            replay,
            in_tx_block,
            sql_prepare: class.prepare.as_ref().map(|_| query()),
            route: session_cmd::route_setting(text),
            discard_all: session_cmd::is_discard_all(text),
            savepoint: savepoint.then(|| session_cmd::savepoint_op(text)).flatten(),
        }))
    }

    /// Apply a confirmed savepoint command to the open transaction's settings.
    pub(crate) fn savepoint(&mut self, op: &session_cmd::SavepointOp) {
        use session_cmd::SavepointOp::*;
        let find = |name: &str, p: &[Pending]| {
            p.iter()
                .rposition(|x| matches!(x, Pending::Savepoint(n) if n == name))
        };
        match op {
            Set(name) => self.pending_tx.push(Pending::Savepoint(name.clone())),
            RollbackTo(name) => {
                if let Some(i) = find(name, &self.pending_tx) {
                    self.pending_tx.truncate(i + 1);
                }
            }
            Release(name) => {
                if let Some(i) = find(name, &self.pending_tx) {
                    let kept: Vec<Pending> = self
                        .pending_tx
                        .drain(i..)
                        .filter(|x| matches!(x, Pending::Setting(_)))
                        .collect();
                    self.pending_tx.extend(kept);
                }
            }
        }
    }

    /// The settings of a committed transaction, in order.
    pub(crate) fn take_committed(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.pending_tx)
            .into_iter()
            .filter_map(|p| match p {
                Pending::Setting(q) => Some(q),
                Pending::Savepoint(_) => None,
            })
            .collect()
    }

    /// A statement string whose session effects cannot be replayed elsewhere: it
    /// pins the session to the primary when it succeeds.
    pub(crate) fn pins_primary(class: &Classification) -> bool {
        class.sticky_primary || (class.session_state && class.statements > 1)
    }
}

/// A Query message for `sql` (bytes as given: no re-encoding).
pub(crate) fn query_message(sql: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(sql.len() + 6);
    b.put_u8(tag::QUERY);
    b.put_i32((sql.len() + 5) as i32);
    b.put_slice(sql);
    b.put_u8(0);
    b.freeze()
}

/// Append a Describe of prepared statement `name`.
pub(crate) fn describe_statement_message(out: &mut BytesMut, name: &[u8]) {
    out.put_u8(tag::DESCRIBE);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name);
    out.put_u8(0);
}

/// Append a Close of prepared statement `name`.
pub(crate) fn close_statement_message(out: &mut BytesMut, name: &[u8]) {
    out.put_u8(tag::CLOSE);
    out.put_i32((name.len() + 6) as i32);
    out.put_u8(b'S');
    out.put_slice(name);
    out.put_u8(0);
}

/// Append a Flush.
pub(crate) fn flush_message(out: &mut BytesMut) {
    out.put_u8(tag::FLUSH);
    out.put_i32(4);
}

/// The Sync message.
pub(crate) fn sync_message(out: &mut BytesMut) {
    out.put_u8(tag::SYNC);
    out.put_i32(4);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_replays_from_a_mark_and_resets_void_the_past() {
        let mut s = ClientView::default();
        s.log_setting(query_message(b"SET a = 1"), false);
        s.log_setting(query_message(b"SET b = 2"), false);
        assert_eq!(s.log_since(0).len(), 2);
        assert_eq!(s.log_since(1).len(), 1);
        assert_eq!(s.log_since(2).len(), 0);
        s.log_setting(query_message(b"RESET ALL"), true);
        assert_eq!(s.log_base, 2);
        assert_eq!(s.log_end(), 3);
        // A connection that saw nothing replays only the reset.
        assert_eq!(s.log_since(0).len(), 1);
        assert_eq!(&s.log_since(0)[0][5..], b"RESET ALL\0");
    }

    #[test]
    fn savepoints_decide_which_settings_commit() {
        use session_cmd::SavepointOp::*;
        let mut s = ClientView::default();
        let set = |q: &[u8]| Pending::Setting(query_message(q));
        s.pending_tx.push(set(b"SET a = 1"));
        s.savepoint(&Set("x".into()));
        s.pending_tx.push(set(b"SET b = 2"));
        s.savepoint(&RollbackTo("x".into()));
        s.pending_tx.push(set(b"SET c = 3"));
        s.savepoint(&Release("x".into()));
        let kept: Vec<_> = s.take_committed().iter().map(|q| q[5..].to_vec()).collect();
        assert_eq!(kept, vec![b"SET a = 1\0".to_vec(), b"SET c = 3\0".to_vec()]);
    }

    #[test]
    fn query_messages_carry_the_bytes_verbatim() {
        let q = query_message(&[0xff, b'x']);
        assert_eq!(&q[..], &[b'Q', 0, 0, 0, 7, 0xff, b'x', 0]);
        let mut b = BytesMut::new();
        close_statement_message(&mut b, b"s1");
        sync_message(&mut b);
        assert_eq!(&b[..], b"C\0\0\0\x08Ss1\0S\0\0\0\x04");
    }
}
