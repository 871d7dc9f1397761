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

use tokio::net::TcpStream;

use super::SessionError;
use super::state::Effects;
use crate::backend::conn::Unnamed;
use crate::backend::pool::PooledConn;
use crate::metrics::{ErrorSeverity, Metrics};
use crate::net::Outbox;
use crate::protocol::TxStatus;
use crate::protocol::frame::{BackendEvent, BackendScanner, Scanned};
use crate::router::classify::TxControl;

/// Something the response stream settled, for the session to apply.
#[derive(Debug)]
pub enum Done {
    /// The effects of a request, and whether it succeeded.
    Effects(Box<Effects>, bool),
    /// A client Parse of this statement name failed or was skipped.
    ParseFailed(Vec<u8>),
    /// The server reported a new parameter value.
    ParamChanged,
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

/// A client Parse sent on a connection, awaiting its ParseComplete.
#[derive(Debug)]
pub struct PendingParse {
    /// Number of the request (Sync) it belongs to.
    pub request: u64,
    /// Statement name (empty: the unnamed statement).
    pub name: Vec<u8>,
    /// The Parse frame (the session's record of the statement).
    pub frame: bytes::Bytes,
    /// Sent by a session that had changed no setting (see
    /// [`HeldStatements`](crate::backend::statements::HeldStatements)).
    pub shareable: bool,
    /// pgpilot's own, put in front of a message that uses the statement
    /// ([`Session::supply_statement`](super::Session)): its ParseComplete is
    /// not forwarded, and its failure leaves the session's record alone.
    pub injected: bool,
}

/// A Close sent on a connection, awaiting its CloseComplete.
#[derive(Debug)]
pub struct PendingClose {
    /// Number of the request (Sync) it belongs to.
    pub request: u64,
    /// The statement's name; `None` for a portal.
    pub statement: Option<Vec<u8>>,
    /// pgpilot's own (see [`PendingParse::injected`]): its CloseComplete is
    /// not forwarded.
    pub injected: bool,
}

/// A session's connection to one node.
pub struct Link {
    /// The pooled server connection (socket, read buffer, parameters).
    pub conn: PooledConn,
    /// Position in the server's message stream.
    pub scanner: BackendScanner,
    /// Bytes for the server its socket has not taken yet.
    pub out: Outbox,
    /// Requests sent (Query, Sync, FunctionCall) whose ReadyForQuery has not come.
    pub outstanding: usize,
    /// Extended-protocol messages sent since the last Sync.
    pub in_batch: bool,
    /// Requests sent so far; request `k` ends with the `k`-th ReadyForQuery.
    pub sent: u64,
    /// ReadyForQuery messages received so far.
    pub received: u64,
    /// The request being answered has reported an error: its effects do not apply.
    batch_error: bool,
    /// The request being answered completed a command tagged `ROLLBACK` (a
    /// COMMIT of a failed transaction is answered so): a COMMIT's effects do
    /// not apply.
    rolled_back: bool,
    /// Client Parses awaiting ParseComplete.
    pub parses: VecDeque<PendingParse>,
    /// Closes awaiting CloseComplete.
    pub closes: VecDeque<PendingClose>,
    /// Effects awaiting the end of their request: (request number, effects).
    pub effects: VecDeque<(u64, Box<Effects>)>,
    /// The session's prepared statements that exist on this connection as the
    /// session made them.
    pub statements: HashSet<Vec<u8>>,
    /// Statements the session forgot that still exist here (closed before next use).
    pub pending_close: Vec<Vec<u8>>,
    /// The unnamed prepared statement the server holds, whoever made it (this
    /// session, or one that used the connection before). `statements` has the
    /// empty name only while it is the session's own current one.
    pub unnamed: Unnamed,
    /// How much of the session's settings log this connection has applied.
    pub applied: u64,
    /// The server sent FATAL: it is about to close the connection.
    pub saw_fatal: bool,
    /// The server is in COPY FROM STDIN mode (CopyInResponse seen, the client's
    /// CopyDone/CopyFail not yet forwarded): it ignores Syncs until then.
    pub copy_in: bool,
    /// Syncs forwarded since the last Execute or Query. If that Execute turns out
    /// to start a COPY FROM STDIN, the server ignored them (no ReadyForQuery).
    pub syncs_since_execute: usize,
    /// When the first request now in flight was sent (query duration metric).
    started: Option<Instant>,
}

impl Link {
    /// Wrap a freshly acquired connection (it has applied none of the session's
    /// log). Boxed: a link moves into and out of the session at every
    /// transaction under transaction pooling, and it is several hundred bytes.
    pub fn new(mut conn: PooledConn) -> Box<Link> {
        let unnamed = std::mem::take(&mut conn.unnamed);
        Box::new(Link {
            conn,
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
            effects: VecDeque::new(),
            statements: HashSet::new(),
            pending_close: Vec::new(),
            unnamed,
            applied: 0,
            saw_fatal: false,
            copy_in: false,
            syncs_since_execute: 0,
            started: None,
        })
    }

    /// The client starts a request on this connection at `now` (timed until
    /// idle again).
    pub fn begin_request(&mut self, now: Instant) {
        if self.started.is_none() && !self.busy() {
            self.started = Some(now);
        }
    }

    /// A request is in flight (its answer has not fully arrived).
    pub fn busy(&self) -> bool {
        self.outstanding > 0 || self.in_batch || !self.out.is_empty()
    }

    /// Safe to give back to the pool: idle, nothing in flight or half-read.
    pub fn reusable(&self) -> bool {
        !self.busy()
            && self.conn.status == TxStatus::Idle
            && self.scanner.at_boundary()
            && self.conn.buf.is_empty()
            && !self.saw_fatal
    }

    /// Send `bytes` to the server (queued if its socket is full).
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let node = self.conn.node;
        self.out
            .send(&self.conn.stream, bytes)
            .map_err(|_| SessionError::BackendLost { node })
    }

    /// Scan what the server sent, settle bookkeeping into `done`, and forward it to
    /// the client in one write. `patch_idle` rewrites a ReadyForQuery `I` to that
    /// status byte (a read balanced off the transaction's node must not tell the
    /// client its transaction ended).
    pub fn on_data(
        &mut self,
        client: &TcpStream,
        to_client: &mut Outbox,
        events: &mut Vec<Scanned>,
        done: &mut Vec<Done>,
        patch_idle: Option<u8>,
        metrics: &Metrics,
    ) -> Result<(), SessionError> {
        let node = self.conn.node;
        let n = self.scanner.scan(&self.conn.buf, events).map_err(|e| {
            tracing::warn!(node, error = %e, "unframeable data from server");
            SessionError::BackendLost { node }
        })?;
        // Answers to pgpilot's own messages, cut from what the client gets.
        let mut cuts: Option<Vec<(usize, usize)>> = None;
        for ev in events.drain(..) {
            match ev.event {
                BackendEvent::ReadyForQuery(s) => {
                    if let Some(p) = patch_idle.filter(|_| s == b'I' && ev.end > ev.start + 5) {
                        // An error here fails the client's transaction too.
                        self.conn.buf[ev.start + 5] = if self.batch_error {
                            TxStatus::Failed.as_byte()
                        } else {
                            p
                        };
                    }
                    self.on_ready(TxStatus::from_byte(s), done);
                    if self.outstanding == 0
                        && let Some(t) = self.started.take()
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
                    self.rolled_back |= tag == b"ROLLBACK";
                }
                BackendEvent::Error { fatal, sqlstate } => {
                    self.on_error(fatal, &sqlstate, done, metrics);
                }
                BackendEvent::ParseComplete => {
                    if let Some(p) = self.parses.pop_front() {
                        if p.injected {
                            cuts.get_or_insert_default().push((ev.start, ev.end));
                        }
                        if !p.name.is_empty() {
                            self.conn.held.made(&p.name, p.frame, p.shareable);
                        }
                    }
                }
                BackendEvent::CloseComplete => {
                    if let Some(c) = self.closes.pop_front() {
                        if c.injected {
                            cuts.get_or_insert_default().push((ev.start, ev.end));
                        }
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
            }
        }
        if let Some(cuts) = cuts {
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
        self.saw_fatal |= fatal;
        self.batch_error = true;
        // The server skips the rest of the request: its Parses never complete.
        let current = self.received + 1;
        while self.parses.front().is_some_and(|p| p.request == current) {
            if let Some(p) = self.parses.pop_front() {
                self.parse_failed(p, done);
            }
        }
        // Its Closes are skipped too: their statements stay as they were.
        while self.closes.front().is_some_and(|c| c.request == current) {
            self.closes.pop_front();
        }
    }

    /// The server entered COPY FROM STDIN mode.
    #[cold]
    #[inline(never)]
    fn on_copy_in(&mut self) {
        // Syncs the client sent after the COPY's Execute are ignored by the
        // server while it reads COPY data: no ReadyForQuery for them.
        let ignored = std::mem::take(&mut self.syncs_since_execute);
        self.outstanding = self.outstanding.saturating_sub(ignored);
        self.sent -= ignored as u64;
        self.copy_in = true;
    }

    /// A Parse failed or was skipped: its statement does not exist here (a
    /// failed unnamed Parse has also dropped the unnamed statement it would
    /// have replaced). A client's Parse tells the session; pgpilot's own only
    /// leaves this connection without the session's statement.
    fn parse_failed(&mut self, p: PendingParse, done: &mut Vec<Done>) {
        if p.name.is_empty() {
            self.unnamed = Unnamed::Unknown;
        }
        if p.injected {
            self.statements.remove(&p.name);
        } else {
            done.push(Done::ParseFailed(p.name));
        }
    }

    fn on_ready(&mut self, status: TxStatus, done: &mut Vec<Done>) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.received += 1;
        self.conn.status = status;
        let failed = std::mem::take(&mut self.batch_error);
        let ok = !failed;
        let rolled_back = std::mem::take(&mut self.rolled_back);
        while self
            .effects
            .front()
            .is_some_and(|(k, _)| *k <= self.received)
        {
            if let Some((_, e)) = self.effects.pop_front() {
                let commit = matches!(e.class.tx, Some(TxControl::Commit));
                done.push(Done::Effects(e, ok && !(commit && rolled_back)));
            }
        }
        while self
            .parses
            .front()
            .is_some_and(|p| p.request <= self.received)
        {
            if let Some(p) = self.parses.pop_front() {
                self.parse_failed(p, done);
            }
        }
        while self
            .closes
            .front()
            .is_some_and(|c| c.request <= self.received)
        {
            self.closes.pop_front();
        }
        done.push(Done::Ready {
            status,
            drained: self.outstanding == 0,
            failed,
        });
    }
}

/// Forward `bytes` to the client without the ranges `cuts` (answers to
/// messages pgpilot put in the client's stream), in one write.
#[cold]
#[inline(never)]
fn forward_cut(
    client: &TcpStream,
    to_client: &mut Outbox,
    bytes: &[u8],
    cuts: &[(usize, usize)],
) -> Result<(), SessionError> {
    let mut kept = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for &(start, end) in cuts {
        kept.extend_from_slice(&bytes[from..start]);
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
