//! One server connection held by a session (at most one per node), and the
//! bookkeeping of its response stream.
//!
//! Server bytes are forwarded as they arrive; the few messages pgpilot decodes
//! (ReadyForQuery, ErrorResponse, ParameterStatus, ParseComplete) settle what the
//! session recorded when it sent the request: a setting is logged only when its
//! request ends without an error, a prepared statement is forgotten when its
//! Parse fails.

use std::collections::{HashSet, VecDeque};

use std::time::Instant;

use crate::net::Stream;

use super::SessionError;
use super::client_view::Effects;
use super::retry::Watch;
use crate::backend::conn::Unnamed;
use crate::backend::pool::PooledConn;
use crate::metrics::{ErrorSeverity, Metrics};
use crate::net::Outbox;
use crate::protocol::TxStatus;
use crate::protocol::frame::{BackendEvent, BackendScanner, Scanned};
use crate::protocol::shape::Shape;
use crate::router::classify::TxControl;

/// Something the response stream settled, for the session to apply.
#[derive(Debug)]
pub(crate) enum Done {
    /// The effects of a request.
    Effects {
        /// What the request changes in the session's state.
        effects: Box<Effects>,
        /// Whether it took effect: its batch succeeded, and a COMMIT did
        /// not turn into a rollback.
        succeeded: bool,
    },
    /// A client Parse of this statement name failed or was skipped.
    ParseFailed(Vec<u8>),
    /// The server reported a new parameter value.
    ParamChanged,
    /// A client's Describe of statement `name` was answered: what the client
    /// now knows of its shape.
    Described {
        /// Statement name.
        name: Vec<u8>,
        /// Its shape.
        shape: Shape,
    },
    /// pgpilot's own Describe of statement `name`, parsed again in front of
    /// a message that uses it, was answered (`got`), or skipped by an error
    /// (`None`); the client was told `expected`.
    ShapeChecked {
        /// Statement name.
        name: Vec<u8>,
        /// The shape the client knows.
        expected: Shape,
        /// The shape here, if the Describe was answered.
        got: Option<Shape>,
    },
    /// Every request in flight is answered; the first was sent at `since`
    /// (the query-duration metric).
    Answered {
        /// When the first of them was sent.
        since: Instant,
    },
    /// A request ended with this transaction status; `drained` when nothing else is
    /// outstanding on the connection.
    Ready {
        /// Status byte of the ReadyForQuery.
        status: TxStatus,
        /// No other request is in flight on this connection.
        drained: bool,
        /// The request reported an error.
        failed: bool,
    },
}

/// Whole server messages [`Link::scan`] found at the front of the
/// connection's buffer, not yet forwarded.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// Their length in bytes.
    len: usize,
    /// Answers to pgpilot's own messages among them, cut (or replaced).
    cuts: Option<Vec<Cut>>,
    /// They may tell the client that a transaction committed: a
    /// ReadyForQuery `I`, or a CommandComplete outside a transaction block
    /// or of a COMMIT (more than exactly the commits, never fewer).
    pub(crate) tells_commit: bool,
}

/// What reading a response stream needs beyond the link: the metrics, and
/// the PIDs clients know sessions by (pgpilot's, from BackendKeyData) for the
/// server PID a NotificationResponse names.
pub(crate) struct Relaying<'a> {
    /// The registry of counters.
    pub(crate) metrics: &'a Metrics,
    /// The session's own PID.
    pub(crate) own_pid: i32,
    /// Every session's, by the server connections they hold.
    pub(crate) sessions: &'a crate::context::registry::SessionRegistry,
}

/// A client Parse sent on a connection, awaiting its ParseComplete.
#[derive(Debug)]
pub(crate) struct PendingParse {
    /// Number of the request (Sync) it belongs to.
    pub(crate) request: u64,
    /// Statement name (empty: the unnamed statement).
    pub(crate) name: Vec<u8>,
    /// The Parse frame (the session's record of the statement).
    pub(crate) frame: bytes::Bytes,
    /// Sent by a session that had changed no setting (see
    /// [`HeldStatements`](crate::backend::statements::HeldStatements)).
    pub(crate) shareable: bool,
    /// pgpilot's own, put in front of a message that uses the statement
    /// ([`Session::supply_statement`](super::Session)): its ParseComplete is
    /// not forwarded, and its failure leaves the session's record alone.
    pub(crate) injected: bool,
}

/// A Close sent on a connection, awaiting its CloseComplete.
#[derive(Debug)]
pub(crate) struct PendingClose {
    /// Number of the request (Sync) it belongs to.
    pub(crate) request: u64,
    /// The statement's name; `None` for a portal.
    pub(crate) statement: Option<Vec<u8>>,
    /// pgpilot's own (see [`PendingParse::injected`]): its CloseComplete is
    /// not forwarded.
    pub(crate) injected: bool,
    /// pgpilot's marker in front of the message it sent to fail in place of
    /// a use of a [broken](super::client_view::Stmt::broken) statement: the error
    /// that follows its CloseComplete is replaced by PostgreSQL's `0A000`.
    pub(crate) marks_shape_error: bool,
}

/// A Describe of a statement sent on a connection, awaiting its answer.
#[derive(Debug)]
pub(crate) struct PendingDescribe {
    /// Number of the request (Sync) it belongs to.
    pub(crate) request: u64,
    /// Statement name.
    pub(crate) name: Vec<u8>,
    /// pgpilot's own check of a statement it parsed again, against the shape
    /// the client knows: its answer is not forwarded. `None`: the client's.
    pub(crate) check: Option<Shape>,
}

/// A session's connection to one node: the pooled server connection and the
/// session's bookkeeping of it. Reads of the bookkeeping go through `Deref`
/// (`link.outstanding`); code that also borrows `conn` names `link.st`.
pub(crate) struct Link {
    /// The pooled server connection (socket, read buffer, parameters).
    pub(crate) conn: PooledConn,
    /// The session's bookkeeping of the connection. Boxed and recycled: under
    /// transaction pooling a link is made and unmade at every transaction;
    /// the box of a link given up waits in its thread's [`SPARE`] for the
    /// next link made there ([`Link::new`], [`Link::into_conn`]), so an idle
    /// session keeps none.
    pub(crate) st: Box<LinkState>,
}

/// The most bookkeeping boxes a runtime thread keeps for its next links:
/// more than the links its sessions hold at once in the common case (the
/// pool's cap per node), few enough to be no memory worth counting.
const SPARE_MAX: usize = 64;

thread_local! {
    /// Bookkeeping boxes of links given up on this thread, for the next
    /// links made here (shared by the thread's sessions, as PgBouncer
    /// shares its buffers: an idle session holds none). Boxes, not values:
    /// a link holds its box, which moves in and out without a copy.
    #[allow(clippy::vec_box)]
    static SPARE: std::cell::RefCell<Vec<Box<LinkState>>> = const {
        std::cell::RefCell::new(Vec::new())
    };
}

impl std::ops::Deref for Link {
    type Target = LinkState;
    fn deref(&self) -> &LinkState {
        &self.st
    }
}

impl std::ops::DerefMut for Link {
    fn deref_mut(&mut self) -> &mut LinkState {
        &mut self.st
    }
}

/// What a session knows of the server connection it holds: where the response
/// stream is, what is in flight, which of its statements the server holds.
pub(crate) struct LinkState {
    /// Position in the server's message stream.
    pub(crate) scanner: BackendScanner,
    /// Bytes for the server its socket has not taken yet.
    pub(crate) out: Outbox,
    /// Requests sent (Query, Sync, FunctionCall) whose ReadyForQuery has not come.
    pub(crate) outstanding: usize,
    /// Extended-protocol messages sent since the last Sync.
    pub(crate) in_batch: bool,
    /// Requests sent so far; request `k` ends with the `k`-th ReadyForQuery.
    pub(crate) sent: u64,
    /// ReadyForQuery messages received so far.
    pub(crate) received: u64,
    /// The request being answered has reported an error: its effects do not apply.
    batch_error: bool,
    /// The request being answered completed a command tagged `ROLLBACK` (a
    /// COMMIT of a failed transaction is answered so): a COMMIT's effects do
    /// not apply.
    rolled_back: bool,
    /// Client Parses awaiting ParseComplete.
    pub(crate) parses: VecDeque<PendingParse>,
    /// Closes awaiting CloseComplete.
    pub(crate) closes: VecDeque<PendingClose>,
    /// Describes of statements awaiting their answer.
    pub(crate) describes: VecDeque<PendingDescribe>,
    /// A shape-error marker's CloseComplete came: the next error is replaced.
    shape_error_next: bool,
    /// Effects awaiting the end of their request: (request number, effects).
    pub(crate) effects: VecDeque<(u64, Box<Effects>)>,
    /// The session's prepared statements that exist on this connection as the
    /// session made them.
    pub(crate) statements: HashSet<Vec<u8>>,
    /// Statements the session forgot that still exist here (closed before next use).
    pub(crate) pending_close: Vec<Vec<u8>>,
    /// The unnamed prepared statement the server holds, whoever made it (this
    /// session, or one that used the connection before). `statements` has the
    /// empty name only while it is the session's own current one.
    pub(crate) unnamed: Unnamed,
    /// How much of the session's settings log this connection has applied.
    pub(crate) applied: u64,
    /// The server sent FATAL: it is about to close the connection.
    pub(crate) saw_fatal: bool,
    /// The server is in COPY FROM STDIN mode (CopyInResponse seen, the client's
    /// CopyDone/CopyFail not yet forwarded): it ignores Syncs until then.
    pub(crate) copy_in: bool,
    /// Syncs forwarded since the last Execute or Query. If that Execute turns out
    /// to start a COPY FROM STDIN, the server ignored them (no ReadyForQuery).
    pub(crate) syncs_since_execute: usize,
    /// When the first request now in flight was sent (query duration metric).
    started: Option<Instant>,
    /// Whether an armed request's response is being watched for a refusal
    /// ([`super::retry`]).
    pub(crate) watch: Watch,
    /// What the watch holds back from the client (reused).
    pub(crate) held: Vec<u8>,
    /// Read wake-ups of the connection's socket (forgotten when the box
    /// serves a new connection, or a step did I/O on it).
    pub(crate) reads: crate::net::ReadWatch,
}

impl LinkState {
    fn new(unnamed: Unnamed) -> LinkState {
        LinkState {
            scanner: BackendScanner::default(),
            out: Outbox::default(),
            outstanding: 0,
            in_batch: false,
            sent: 0,
            received: 0,
            batch_error: false,
            rolled_back: false,
            parses: VecDeque::new(),
            closes: VecDeque::new(),
            describes: VecDeque::new(),
            shape_error_next: false,
            effects: VecDeque::new(),
            statements: HashSet::new(),
            pending_close: Vec::new(),
            unnamed,
            applied: 0,
            saw_fatal: false,
            copy_in: false,
            syncs_since_execute: 0,
            started: None,
            watch: Watch::Off,
            held: Vec::new(),
            reads: Default::default(),
        }
    }

    /// Make a recycled box as [`LinkState::new`] would, keeping the
    /// collections' memory. Every field is named: a new one must be reset here.
    fn reset(&mut self, unnamed: Unnamed) {
        let LinkState {
            scanner,
            out,
            outstanding,
            in_batch,
            sent,
            received,
            batch_error,
            rolled_back,
            parses,
            closes,
            describes,
            shape_error_next,
            effects,
            statements,
            pending_close,
            unnamed: held_unnamed,
            applied,
            saw_fatal,
            copy_in,
            syncs_since_execute,
            started,
            watch,
            held,
            reads,
        } = self;
        *scanner = BackendScanner::default();
        *out = Outbox::default();
        *outstanding = 0;
        *in_batch = false;
        *sent = 0;
        *received = 0;
        *batch_error = false;
        *rolled_back = false;
        parses.clear();
        closes.clear();
        describes.clear();
        *shape_error_next = false;
        effects.clear();
        statements.clear();
        pending_close.clear();
        *held_unnamed = unnamed;
        *applied = 0;
        *saw_fatal = false;
        *copy_in = false;
        *syncs_since_execute = 0;
        *started = None;
        *watch = Watch::Off;
        held.clear();
        reads.forget();
    }
}

impl Link {
    /// Wrap a freshly acquired connection (it has applied none of the
    /// session's log), in a bookkeeping box of the thread's spares if there
    /// is one.
    pub(crate) fn new(mut conn: PooledConn) -> Link {
        let unnamed = std::mem::take(&mut conn.unnamed);
        let st = match SPARE.with_borrow_mut(Vec::pop) {
            Some(mut st) => {
                st.reset(unnamed);
                st
            }
            None => Box::new(LinkState::new(unnamed)),
        };
        Link { conn, st }
    }

    /// The connection, to give back to the pool (knowing what unnamed
    /// statement it holds); the bookkeeping's box goes to the thread's spares.
    pub(crate) fn into_conn(self) -> PooledConn {
        let Link { mut conn, mut st } = self;
        conn.unnamed = std::mem::take(&mut st.unnamed);
        // The task's waker goes: a spare box must not keep a session's task
        // (and its memory) alive.
        st.reads.release();
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARE_MAX {
                spare.push(st);
            }
        });
        conn
    }

    /// The client starts a request on this connection at `now` (timed until
    /// idle again).
    pub(crate) fn begin_request(&mut self, now: Instant) {
        if self.st.started.is_none() && !self.busy() {
            self.st.started = Some(now);
        }
    }

    /// A request is in flight (its answer has not fully arrived).
    pub(crate) fn busy(&self) -> bool {
        self.st.outstanding > 0 || self.st.in_batch || !self.st.out.is_empty()
    }

    /// Safe to give back to the pool: idle, nothing in flight or half-read.
    pub(crate) fn reusable(&self) -> bool {
        !self.busy()
            && self.conn.status == TxStatus::Idle
            && self.st.scanner.at_boundary()
            && self.conn.buf.is_empty()
            && !self.st.saw_fatal
    }

    /// Send `bytes` to the server (queued if its socket is full).
    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let node = self.conn.node;
        self.st
            .out
            .send(&mut self.conn.stream, bytes)
            .map_err(|_| SessionError::BackendLost { node })
    }

    /// Scan what the server sent and settle bookkeeping into `done`; the
    /// whole messages found are forwarded by [`Self::forward`], which the
    /// session calls once it has recorded what they acknowledge (see
    /// [`Chunk::tells_commit`]). `patch_idle` rewrites a ReadyForQuery `I` to
    /// that status byte (a read balanced off the transaction's node must not
    /// tell the client its transaction ended).
    pub(crate) fn scan(
        &mut self,
        events: &mut Vec<Scanned>,
        done: &mut Vec<Done>,
        patch_idle: Option<u8>,
        cx: &Relaying<'_>,
    ) -> Result<Chunk, SessionError> {
        let metrics = cx.metrics;
        let node = self.conn.node;
        let n = self.st.scanner.scan(&self.conn.buf, events).map_err(|e| {
            tracing::warn!(%node, error = %e, "unframeable data from server");
            SessionError::BackendLost { node }
        })?;
        // Answers to pgpilot's own messages, cut from what the client gets
        // (or replaced by the bytes given).
        let mut cuts: Option<Vec<Cut>> = None;
        let mut tells_commit = false;
        for ev in events.drain(..) {
            match ev.event {
                BackendEvent::ReadyForQuery(s) => {
                    tells_commit |= s == b'I';
                    if let Some(p) = patch_idle.filter(|_| s == b'I' && ev.end > ev.start + 5) {
                        // An error here fails the client's transaction too.
                        self.conn.buf[ev.start + 5] = if self.st.batch_error {
                            TxStatus::Failed.as_byte()
                        } else {
                            p
                        };
                    }
                    self.on_ready(TxStatus::from_byte(s), done);
                    if self.st.outstanding == 0
                        && let Some(t) = self.st.started.take()
                    {
                        done.push(Done::Answered { since: t });
                    }
                }
                BackendEvent::CommandComplete => {
                    let tag = self
                        .conn
                        .buf
                        .get(ev.start + 5..ev.end.saturating_sub(1))
                        .unwrap_or_default();
                    metrics.command_completed(node, tag);
                    self.st.rolled_back |= tag == b"ROLLBACK";
                    // Outside a transaction block (the status as of the last
                    // ReadyForQuery, updated in stream order) PostgreSQL
                    // commits a simple query's last statement before its
                    // CommandComplete; a COMMIT's tag says so itself.
                    tells_commit |=
                        self.conn.status == TxStatus::Idle || tag.starts_with(b"COMMIT");
                }
                BackendEvent::Error { fatal, sqlstate } => {
                    if std::mem::take(&mut self.st.shape_error_next) {
                        cuts.get_or_insert_default()
                            .push((ev.start, ev.end, shape_error()));
                        self.on_error(fatal, SHAPE_ERROR_SQLSTATE, done, metrics);
                    } else {
                        self.on_error(fatal, &sqlstate, done, metrics);
                    }
                }
                BackendEvent::ParameterDescription => {
                    if self.st.describes.front().is_some_and(|d| d.check.is_some()) {
                        cuts.get_or_insert_default().push((ev.start, ev.end, &[]));
                    }
                }
                BackendEvent::StatementDescribed(shape) => {
                    if let Some(d) = self.st.describes.pop_front() {
                        self.described(d, shape, done, &mut cuts, (ev.start, ev.end));
                    }
                }
                BackendEvent::ParseComplete => {
                    if let Some(p) = self.st.parses.pop_front() {
                        if p.injected {
                            cuts.get_or_insert_default().push((ev.start, ev.end, &[]));
                        }
                        if !p.name.is_empty() {
                            self.conn.held.made(&p.name, p.frame, p.shareable, None);
                        }
                    }
                }
                BackendEvent::CloseComplete => {
                    if let Some(c) = self.st.closes.pop_front() {
                        if c.injected {
                            cuts.get_or_insert_default().push((ev.start, ev.end, &[]));
                        }
                        self.st.shape_error_next |= c.marks_shape_error;
                        if let Some(name) = c.statement {
                            self.conn.held.closed(&name);
                        }
                    }
                }
                BackendEvent::ParameterStatus(k, v) => {
                    self.conn.set_param(k, v);
                    done.push(Done::ParamChanged);
                }
                BackendEvent::CopyStarted(crate::protocol::tag::COPY_IN_RESPONSE) => {
                    self.on_copy_in();
                }
                BackendEvent::CopyStarted(_) => {}
                BackendEvent::Notification(pid) => self.notified_by(pid, ev.start, cx),
            }
        }
        Ok(Chunk {
            len: n,
            cuts,
            tells_commit,
        })
    }

    /// Forward to the client, in one write, what [`Self::scan`] found (or
    /// hold it while the request is watched for a standby's refusal).
    pub(crate) fn forward(
        &mut self,
        client: &mut Stream,
        to_client: &mut Outbox,
        chunk: Chunk,
    ) -> Result<(), SessionError> {
        let n = chunk.len;
        if self.st.watch != Watch::Off {
            if chunk.cuts.is_none() {
                self.forward_watched(client, to_client, n)?;
                bytes::Buf::advance(&mut self.conn.buf, n);
                return Ok(());
            }
            // pgpilot's own messages are in the answer: no retry.
            self.st.watch = Watch::Off;
            to_client
                .send(client, &self.st.held)
                .map_err(SessionError::ClientIo)?;
            self.st.held.clear();
        }
        if let Some(cuts) = chunk.cuts {
            forward_cut(client, to_client, &self.conn.buf[..n], &cuts)?;
            bytes::Buf::advance(&mut self.conn.buf, n);
        } else if n > 0 {
            to_client
                .send(client, &self.conn.buf[..n])
                .map_err(SessionError::ClientIo)?;
            bytes::Buf::advance(&mut self.conn.buf, n);
        }
        Ok(())
    }

    /// The request being answered reported an error (rare: kept out of the
    /// scan loop's code).
    #[cold]
    #[inline(never)]
    fn on_error(
        &mut self,
        fatal: bool,
        sqlstate: &[u8; 5],
        done: &mut Vec<Done>,
        metrics: &Metrics,
    ) {
        let node = self.conn.node;
        metrics.server_error(sqlstate);
        let severity = if fatal {
            ErrorSeverity::Fatal
        } else {
            ErrorSeverity::Error
        };
        metrics.node_error(node, severity);
        self.st.saw_fatal |= fatal;
        self.st.batch_error = true;
        // The server skips the rest of the request: its Parses never complete.
        let current = self.st.received + 1;
        while self.st.parses.front().is_some_and(|p| p.request == current) {
            if let Some(p) = self.st.parses.pop_front() {
                self.parse_failed(p, done);
            }
        }
        // Its Closes are skipped too: their statements stay as they were.
        while self.st.closes.front().is_some_and(|c| c.request == current) {
            self.st.closes.pop_front();
        }
        self.skip_describes(current, done);
    }

    /// The Describes of requests up to `request` were skipped (an error) or
    /// can no longer be answered: pgpilot's own checks end unanswered.
    fn skip_describes(&mut self, request: u64, done: &mut Vec<Done>) {
        while self
            .st
            .describes
            .front()
            .is_some_and(|d| d.request <= request)
        {
            if let Some(PendingDescribe {
                name,
                check: Some(expected),
                ..
            }) = self.st.describes.pop_front()
            {
                done.push(Done::ShapeChecked {
                    name,
                    expected,
                    got: None,
                });
            }
        }
    }

    /// A Describe of a statement was answered with `shape` (its RowDescription
    /// or NoData lies at `at`).
    #[cold]
    #[inline(never)]
    fn described(
        &mut self,
        d: PendingDescribe,
        shape: Shape,
        done: &mut Vec<Done>,
        cuts: &mut Option<Vec<Cut>>,
        at: (usize, usize),
    ) {
        if !d.name.is_empty() {
            self.conn.held.described(&d.name, shape);
        }
        match d.check {
            Some(expected) => {
                cuts.get_or_insert_default().push((at.0, at.1, &[]));
                done.push(Done::ShapeChecked {
                    name: d.name,
                    expected,
                    got: Some(shape),
                });
            }
            None => done.push(Done::Described {
                name: d.name,
                shape,
            }),
        }
    }

    /// A NotificationResponse at `at` names server process `pid`: where that
    /// process serves a session, the client gets that session's pgpilot PID
    /// (what its BackendKeyData said), so an application recognises its own
    /// notifications.
    #[cold]
    #[inline(never)]
    fn notified_by(&mut self, pid: i32, at: usize, cx: &Relaying<'_>) {
        let client = if pid == self.conn.cancel_key.pid {
            Some(cx.own_pid)
        } else {
            cx.sessions.client_pid_of(self.conn.node, pid)
        };
        if let Some(c) = client
            && let Some(field) = self.conn.buf.get_mut(at + 5..at + 9)
        {
            field.copy_from_slice(&c.to_be_bytes());
        }
    }

    /// The server entered COPY FROM STDIN mode.
    #[cold]
    #[inline(never)]
    fn on_copy_in(&mut self) {
        // Syncs the client sent after the COPY's Execute are ignored by the
        // server while it reads COPY data: no ReadyForQuery for them.
        let ignored = std::mem::take(&mut self.st.syncs_since_execute);
        self.st.outstanding = self.st.outstanding.saturating_sub(ignored);
        self.st.sent -= ignored as u64;
        self.st.copy_in = true;
    }

    /// A Parse failed or was skipped: its statement does not exist here (a
    /// failed unnamed Parse has also dropped the unnamed statement it would
    /// have replaced). A client's Parse tells the session; pgpilot's own only
    /// leaves this connection without the session's statement.
    fn parse_failed(&mut self, p: PendingParse, done: &mut Vec<Done>) {
        if p.name.is_empty() {
            self.st.unnamed = Unnamed::Unknown;
        }
        if p.injected {
            self.st.statements.remove(&p.name);
        } else {
            done.push(Done::ParseFailed(p.name));
        }
    }

    fn on_ready(&mut self, status: TxStatus, done: &mut Vec<Done>) {
        self.st.outstanding = self.st.outstanding.saturating_sub(1);
        self.st.received += 1;
        self.conn.status = status;
        let failed = std::mem::take(&mut self.st.batch_error);
        let ok = !failed;
        let rolled_back = std::mem::take(&mut self.st.rolled_back);
        while self
            .effects
            .front()
            .is_some_and(|(k, _)| *k <= self.st.received)
        {
            if let Some((_, e)) = self.st.effects.pop_front() {
                let commit = matches!(e.class.tx, Some(TxControl::Commit));
                done.push(Done::Effects {
                    effects: e,
                    succeeded: ok && !(commit && rolled_back),
                });
            }
        }
        while self
            .parses
            .front()
            .is_some_and(|p| p.request <= self.st.received)
        {
            if let Some(p) = self.st.parses.pop_front() {
                self.parse_failed(p, done);
            }
        }
        while self
            .closes
            .front()
            .is_some_and(|c| c.request <= self.st.received)
        {
            self.st.closes.pop_front();
        }
        self.st.shape_error_next = false;
        let received = self.st.received;
        self.skip_describes(received, done);
        done.push(Done::Ready {
            status,
            drained: self.st.outstanding == 0,
            failed,
        });
    }
}

/// A range of the server's bytes the client does not get, and what it gets
/// instead (usually nothing).
type Cut = (usize, usize, &'static [u8]);

/// SQLSTATE of PostgreSQL's error for a cached statement whose result changed.
const SHAPE_ERROR_SQLSTATE: &[u8; 5] = b"0A000";

/// The ErrorResponse PostgreSQL sends when a cached statement's result type
/// would change (`RevalidateCachedQuery`).
fn shape_error() -> &'static [u8] {
    static ERROR: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut body = Vec::new();
        for (code, value) in [
            (b'S', &b"ERROR"[..]),
            (b'V', b"ERROR"),
            (b'C', SHAPE_ERROR_SQLSTATE),
            (b'M', b"cached plan must not change result type"),
            (b'R', b"RevalidateCachedQuery"),
        ] {
            body.push(code);
            body.extend_from_slice(value);
            body.push(0);
        }
        body.push(0);
        let mut msg = vec![crate::protocol::tag::ERROR_RESPONSE];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(&body);
        msg
    });
    &ERROR
}

/// Forward `bytes` to the client without the ranges `cuts` (answers to
/// messages pgpilot put in the client's stream), or with their replacements,
/// in one write.
#[cold]
#[inline(never)]
fn forward_cut(
    client: &mut Stream,
    to_client: &mut Outbox,
    bytes: &[u8],
    cuts: &[Cut],
) -> Result<(), SessionError> {
    let mut kept = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for &(start, end, instead) in cuts {
        kept.extend_from_slice(&bytes[from..start]);
        kept.extend_from_slice(instead);
        from = end;
    }
    kept.extend_from_slice(&bytes[from..]);
    if kept.is_empty() {
        return Ok(());
    }
    to_client
        .send(client, &kept)
        .map_err(SessionError::ClientIo)
}
