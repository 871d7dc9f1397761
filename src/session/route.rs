//! Client → server: cut the client's stream into requests, decide each request's
//! node, and forward the raw frames there.
//!
//! The unit of routing is a *request*: a simple Query (or FunctionCall), or an
//! extended-protocol batch from its first message to its Sync. A batch goes to
//! one node as a whole, so Bind/Execute never reach a node that did not get
//! their Parse, and the client sees exactly one ReadyForQuery per Sync. The
//! batch is judged on the messages already received: if its Sync has not
//! arrived yet the batch might still write, so it goes to the primary.
//!
//! Responses must reach the client in request order, so a request for another
//! node waits ([`Step::Blocked`]) until every in-flight request has been
//! answered; requests for the node already in use are pipelined. The session's
//! transaction state is predicted when a request is sent (BEGIN/COMMIT) and
//! corrected from ReadyForQuery, which always arrives before a request is routed
//! elsewhere.
//!
//! Work that needs I/O before a request can be sent (connecting to a node,
//! replaying settings, preparing a statement, a `pg_proc` lookup, waiting for a
//! primary) is returned as a [`Step`] for the relay loop to await; the request is
//! then routed again from scratch.

use std::sync::Arc;

use super::client_view::StmtSource;
use super::statements::{Needs, mentions_execute};
use super::{Session, SessionError};
use crate::config::{NodeId, UnknownFunctions};
use crate::protocol::frame::{cstr, peek_frame};
use crate::protocol::tag;
use crate::router::chooser;
use crate::router::classify::{Access, Classification};
use crate::router::normalize::{self, Hint};
use crate::router::policy::{self, Decision};

/// What the relay loop must do after client data was processed.
#[derive(Debug)]
pub(crate) enum Step {
    /// Every complete request was forwarded; wait for more input.
    Idle,
    /// The next request waits until in-flight requests are answered.
    Blocked,
    /// The client sent Terminate.
    Terminate,
    /// Connect to / bring up to date this node, with these statements prepared.
    Prepare {
        /// Node id.
        node: NodeId,
        /// Statements the request uses.
        needs: Needs,
    },
    /// No primary is known; wait for one.
    NeedPrimary,
    /// Look these functions up in `pg_proc` before routing.
    Lookup(Vec<String>),
    /// Look these relations up (unlogged?) before routing.
    LookupRelations(Vec<crate::router::relations::RelationName>),
    /// Learn a fresh primary WAL position (read-your-writes) before routing.
    FetchLsn,
    /// Ask the primary connection for the session's transaction defaults (from
    /// startup options, ALTER ROLE/DATABASE … SET) before its first standby read.
    ProbeDefaults,
    /// Move the read-only transaction just begun on a standby to the primary:
    /// its next statement is a `SET TRANSACTION` only the primary can take.
    MoveTxToPrimary,
    /// Have this admin command run where it is decided (the leading
    /// pgpilot under coordination, Patroni for `PROMOTE NODE` in Patroni
    /// mode) and keep its outcome for the answer.
    AdminElsewhere(crate::admin::AdminCommand),
    /// Wait until one of `nodes` has replayed `target`, or `deadline`.
    WaitReplay {
        /// Standbys that may serve the read.
        nodes: Vec<NodeId>,
        /// WAL position the read must see.
        target: u64,
        /// Give up (read on the primary) then.
        deadline: tokio::time::Instant,
    },
}

/// Fallbacks a failure leaves for the next request, each taken once: the
/// next request that would use it is routed safely and the flag is cleared.
/// Independent of each other (different failures, different requests).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct NextRequest {
    /// Preparing a statement on the standby failed, or a standby refused a
    /// read: the next read goes to the primary.
    pub(super) avoid_standby: bool,
    /// The last `pg_proc` lookup failed: the next request's unknown functions
    /// are judged volatile.
    pub(super) functions_volatile: bool,
    /// The last unlogged-relation lookup failed: the next read that names
    /// relations goes to the primary.
    pub(super) relations_to_primary: bool,
}

/// A request's route, or why it cannot be sent yet.
type Planned = Result<NodeId, Step>;

/// Where the extended-protocol batch being forwarded goes, until its Sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A node's server connection.
    Node(NodeId),
    /// No node: pgpilot answers the batch itself (its own commands, or a
    /// batch refused inside a failed transaction).
    Local,
}

/// The classification of a FunctionCall message (it runs a function by OID: assume
/// it writes and leaves state).
pub(super) fn function_call_class() -> Arc<Classification> {
    Arc::new(Classification {
        access: Access::Write,
        sticky_primary: false,
        statements: 1,
        ..Classification::empty()
    })
}

/// `name`, `query` of a Parse body.
pub(super) fn parse_fields(body: &[u8]) -> (&[u8], &[u8]) {
    let (name, rest) = cstr(body).unwrap_or_default();
    let query = cstr(rest).map(|(q, _)| q).unwrap_or_default();
    (name, query)
}

/// The SQL of a Query message (`frame` whole), without its terminating NUL.
/// Tolerates a malformed, empty body (PostgreSQL reports it).
pub(super) fn query_sql(frame: &[u8]) -> &[u8] {
    let body = frame.get(5..).unwrap_or_default();
    body.strip_suffix(&[0]).unwrap_or(body)
}

/// Statement name of a Bind body.
pub(super) fn bind_statement(body: &[u8]) -> &[u8] {
    let rest = cstr(body).map(|(_, r)| r).unwrap_or_default();
    cstr(rest).map(|(s, _)| s).unwrap_or_default()
}

/// The prepared statement a Bind, or a Describe of a statement, uses.
fn used_statement(t: u8, body: &[u8]) -> Option<&[u8]> {
    match t {
        tag::BIND => Some(bind_statement(body)),
        tag::DESCRIBE => body
            .split_first()
            .filter(|(k, _)| **k == b'S')
            .and_then(|(_, n)| cstr(n).map(|(n, _)| n)),
        _ => None,
    }
}

impl Session {
    /// Route and forward every complete request in the client buffer.
    pub(super) fn on_client_data(&mut self) -> Result<Step, SessionError> {
        let buf = std::mem::take(&mut self.cbuf);
        let mut pos = 0;
        // Frames [start, pos) not yet written, all for `node`.
        let mut span: Option<(NodeId, usize)> = None;
        let result = self.route_frames(&buf, &mut pos, &mut span);
        let flushed = self.flush_span(&buf, span, pos);
        // What arrives of a batch still open was not there when it was routed.
        self.batch_unseen = matches!(self.batch, Some(Target::Node(_)));
        self.cbuf = buf;
        bytes::Buf::advance(&mut self.cbuf, pos);
        if !self.cbuf.is_empty() {
            // Room for the rest of a partial frame, or for what follows
            // requests that wait. An empty buffer gets none: the relay
            // gives it back while the session is idle.
            let need = crate::protocol::frame::missing_bytes(&self.cbuf);
            self.cbuf.reserve(need.max(4096));
        }
        let step = result?;
        flushed?;
        Ok(step)
    }

    /// `frame`, at `pos` in `buf`, is a message of a batch routed before it
    /// arrived, about to go to `node`: if it uses a statement the connection
    /// lacks, send what makes it present first
    /// ([`Session::supply_statement`]), after the messages before it (`span`).
    /// True: `frame` must wait until the statement's shape is checked.
    #[cold]
    #[inline(never)]
    fn supply_unseen(
        &mut self,
        node: NodeId,
        frame: &[u8],
        buf: &[u8],
        pos: usize,
        span: &mut Option<(NodeId, usize)>,
    ) -> Result<bool, SessionError> {
        if self.shape_wait {
            return Ok(true);
        }
        if let Some(name) = used_statement(frame[0], &frame[5..])
            && let Some(msgs) = self.supply_statement(node, name)?
        {
            self.flush_span(buf, *span, pos)?;
            *span = None;
            self.link_mut(node)?.send(&msgs)?;
        }
        Ok(self.shape_wait)
    }

    pub(super) fn flush_span(
        &mut self,
        buf: &[u8],
        span: Option<(NodeId, usize)>,
        end: usize,
    ) -> Result<(), SessionError> {
        match span {
            Some((node, start)) if end > start => self.link_mut(node)?.send(&buf[start..end]),
            _ => Ok(()),
        }
    }

    fn route_frames(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        span: &mut Option<(NodeId, usize)>,
    ) -> Result<Step, SessionError> {
        let max = self.cfg.max_message_size;
        while let Some(f) = peek_frame(&buf[*pos..], max)? {
            let frame = &buf[*pos..*pos + f.wire_len];
            let node = match f.tag {
                tag::TERMINATE => return Ok(Step::Terminate),
                tag::COPY_DATA => self.active,
                tag::COPY_DONE | tag::COPY_FAIL => {
                    let node = self.active;
                    self.link_mut(node)?.copy_in = false;
                    node
                }
                tag::QUERY if self.batch.is_none() && self.tx.client_aborted() => {
                    if self.links.iter().flatten().any(|l| l.busy()) {
                        return Ok(Step::Blocked);
                    }
                    match self.aborted_tx_query(query_sql(frame)) {
                        None => match self.plan_simple(f.tag, frame)? {
                            Ok(n) => n,
                            Err(step) => return Ok(step),
                        },
                        Some(super::answered_here::AbortedTx::Refuse) => {
                            self.refuse_in_aborted_tx(true)?;
                            *pos += f.wire_len;
                            continue;
                        }
                        Some(super::answered_here::AbortedTx::RollBack) => {
                            // The client's COMMIT ends an aborted transaction:
                            // the primary gets ROLLBACK (answered "ROLLBACK").
                            let node = self.route.tx_node.unwrap_or(self.active);
                            self.flush_span(buf, *span, *pos)?;
                            *span = None;
                            let rollback = super::client_view::query_message(b"ROLLBACK");
                            self.track_simple(node, tag::QUERY, &rollback)?;
                            self.set_active(node);
                            self.link_mut(node)?.send(&rollback)?;
                            *pos += f.wire_len;
                            continue;
                        }
                    }
                }
                tag::QUERY if self.batch.is_none() => {
                    if let Some(cmd) = super::answered_here::parse_own_command(query_sql(frame)) {
                        if self.links.iter().flatten().any(|l| l.busy()) {
                            return Ok(Step::Blocked);
                        }
                        if self.own_command_wants_lsn() {
                            return Ok(Step::FetchLsn);
                        }
                        if let Some(step) = self.own_command_step(&cmd) {
                            return Ok(step);
                        }
                        self.answer_own_query(&cmd)?;
                        *pos += f.wire_len;
                        continue;
                    }
                    if self.moves_untouched_tx(frame) {
                        if self.links.iter().flatten().any(|l| l.busy()) {
                            return Ok(Step::Blocked);
                        }
                        return Ok(Step::MoveTxToPrimary);
                    }
                    match self.plan_simple(f.tag, frame)? {
                        Ok(n) => {
                            self.arm_retry(n, frame, true);
                            n
                        }
                        Err(step) => return Ok(step),
                    }
                }
                tag::QUERY | tag::FUNCTION_CALL => {
                    let planned = match self.batch {
                        // A Query inside an open batch goes with the batch.
                        Some(Target::Node(n)) => Ok(n),
                        // No server connection to send it to: a batch pgpilot
                        // answers itself takes only extended-protocol messages.
                        Some(Target::Local) => return Err(SessionError::UnexpectedMessage(f.tag)),
                        None => self.plan_simple(f.tag, frame)?,
                    };
                    match planned {
                        Ok(n) => n,
                        Err(step) => return Ok(step),
                    }
                }
                tag::PARSE
                | tag::BIND
                | tag::DESCRIBE
                | tag::EXECUTE
                | tag::CLOSE
                | tag::FLUSH
                | tag::SYNC => {
                    let target = match self.batch {
                        Some(t) => t,
                        None if self.tx.client_aborted()
                            && !self.batch_ends_aborted_tx(f.tag, &frame[5..]) =>
                        {
                            if self.links.iter().flatten().any(|l| l.busy()) {
                                return Ok(Step::Blocked);
                            }
                            self.batch = Some(Target::Local);
                            self.start_refused_batch()?;
                            Target::Local
                        }
                        None if self.starts_own_batch(f.tag, &frame[5..]) => {
                            if self.links.iter().flatten().any(|l| l.busy()) {
                                return Ok(Step::Blocked);
                            }
                            if self.own_command_wants_lsn() {
                                return Ok(Step::FetchLsn);
                            }
                            self.batch = Some(Target::Local);
                            Target::Local
                        }
                        None if self.batch_moves_untouched_tx(&buf[*pos..]) => {
                            if self.links.iter().flatten().any(|l| l.busy()) {
                                return Ok(Step::Blocked);
                            }
                            return Ok(Step::MoveTxToPrimary);
                        }
                        None => match self.plan_batch(&buf[*pos..])? {
                            Ok(n) => {
                                self.arm_retry(n, &buf[*pos..], false);
                                self.batch = Some(Target::Node(n));
                                self.batch_unseen = false;
                                self.read_your_writes_request_sent();
                                Target::Node(n)
                            }
                            Err(step) => return Ok(step),
                        },
                    };
                    let Target::Node(node) = target else {
                        if let Some(step) = self.own_execute_step(f.tag, frame) {
                            return Ok(step);
                        }
                        self.own_extended(f.tag, frame)?;
                        *pos += f.wire_len;
                        continue;
                    };
                    if self.client_view.any_broken && self.uses_broken(f.tag, frame) {
                        self.fail_broken_use(node, buf, *pos, span)?;
                        *pos += f.wire_len;
                        continue;
                    }
                    if self.batch_unseen && self.supply_unseen(node, frame, buf, *pos, span)? {
                        // The statement just supplied is being described.
                        return Ok(Step::Blocked);
                    }
                    self.track_extended(node, f.tag, frame)?;
                    node
                }
                other => return Err(SessionError::UnexpectedMessage(other)),
            };
            if f.tag == tag::QUERY || f.tag == tag::FUNCTION_CALL {
                self.track_simple(node, f.tag, frame)?;
            }
            match *span {
                Some((n, _)) if n == node => {}
                _ => {
                    self.flush_span(buf, *span, *pos)?;
                    *span = Some((node, *pos));
                    self.set_active(node);
                }
            }
            *pos += f.wire_len;
        }
        Ok(Step::Idle)
    }

    /// The node for a simple Query or FunctionCall (not inside a batch).
    fn plan_simple(&mut self, t: u8, frame: &[u8]) -> Result<Planned, SessionError> {
        if t == tag::FUNCTION_CALL {
            return Ok(self.decide_and_check(&function_call_class(), None, &Needs::none()));
        }
        let sql = query_sql(frame);
        let (class, hint) = self.classify(sql);
        let mut needs = Needs {
            purge_others: mentions_execute(sql),
            ..Needs::none()
        };
        if class.lists_statements {
            self.need_all_statements(&mut needs);
        }
        let mut force_write = false;
        let mut hint = hint;
        if let Some(name) = &class.execute {
            match self.client_view.stmts.get(name.as_bytes()) {
                Some(st) => {
                    force_write = st.class.access == Access::Write;
                    hint = hint.or(st.hint);
                    needs.add(name.as_bytes());
                }
                None => force_write = true,
            }
        }
        if super::sql_prepare::on_primary(&class) {
            hint = Some(Hint::Primary);
        }
        Ok(self.decide_judged(class, hint, force_write, &needs))
    }

    /// Judge the functions `class` calls (unless a standby hint vouches for
    /// them: it overrides the judgement of functions, never the statement),
    /// treat it as a write if that or `force_write` says so, then decide.
    fn decide_judged(
        &mut self,
        class: Arc<Classification>,
        hint: Option<Hint>,
        mut force_write: bool,
        needs: &Needs,
    ) -> Planned {
        if hint != Some(Hint::Standby) {
            force_write |= self.judge_functions(&class)?;
        }
        // A standby hint cannot make a standby serve an unlogged relation.
        if !force_write {
            force_write |= self.judge_relations(&class)?;
        }
        let class = if force_write && class.access == Access::Read {
            let mut c = (*class).clone();
            c.access = Access::Write;
            Arc::new(c)
        } else {
            class
        };
        self.decide_and_check(&class, hint, needs)
    }

    /// The node for an extended-protocol batch starting at the front of `rest`,
    /// judged on every message of the batch already received.
    #[inline(never)]
    fn plan_batch(&mut self, rest: &[u8]) -> Result<Planned, SessionError> {
        let max = self.cfg.max_message_size;
        let mut classes: Vec<Arc<Classification>> = Vec::new();
        let mut parsed = std::collections::VecDeque::new();
        let mut defined: Vec<&[u8]> = Vec::new();
        let mut needs = Needs::none();
        let mut hint = None;
        let mut complete = false;
        let mut unknown_statement = false;
        let mut p = 0;
        while let Some(f) = peek_frame(&rest[p..], max)? {
            let body = &rest[p + 5..p + f.wire_len];
            match f.tag {
                tag::PARSE => {
                    let (name, query) = parse_fields(body);
                    let (class, h) = self.classify(query);
                    hint = hint.or(h);
                    parsed.push_back((class.clone(), h));
                    classes.push(class);
                    if !name.is_empty()
                        && !self.client_view.stmts.contains_key(name)
                        && !defined.contains(&name)
                    {
                        // Another session's statement of that name may be on
                        // the connection: it is closed first.
                        needs.add(name);
                    }
                    defined.push(name);
                }
                tag::BIND | tag::DESCRIBE => {
                    let name = used_statement(f.tag, body);
                    if let Some(name) = name.filter(|n| !defined.contains(n)) {
                        match self.client_view.stmts.get(name) {
                            Some(st) => {
                                if f.tag == tag::BIND {
                                    classes.push(st.class.clone());
                                    hint = hint.or(st.hint);
                                }
                                needs.add(name);
                            }
                            None => {
                                unknown_statement |= f.tag == tag::BIND;
                                // Another session's statement of that name may
                                // be on the connection: it is closed first.
                                needs.add(name);
                            }
                        }
                    }
                }
                tag::SYNC => {
                    complete = true;
                    break;
                }
                tag::EXECUTE | tag::CLOSE | tag::FLUSH => {}
                _ => break,
            }
            p += f.wire_len;
        }
        // The batch's Parses, classified once: `track_extended` reuses them.
        self.parsed_ahead = parsed;
        // What follows may name any statement: nothing of another session's
        // may be on the connection it runs on. (The session's own are supplied
        // as their Binds arrive, `supply_statement`.)
        needs.purge_others = !complete;
        if classes.iter().any(|c| c.lists_statements) {
            self.need_all_statements(&mut needs);
        }
        let prepares = classes.iter().any(|c| super::sql_prepare::on_primary(c));
        let class = match classes.len() {
            // Close / Describe / Sync only: nothing runs; stay where the session is.
            0 if complete => {
                let node = self
                    .route
                    .tx_node
                    .filter(|_| self.tx.in_block())
                    .unwrap_or(self.active);
                return Ok(self.check_ready(node, &needs).map(|()| node));
            }
            1 => classes
                .pop()
                .unwrap_or_else(|| Arc::new(Classification::empty())),
            _ => Arc::new(merge(&classes)),
        };
        // A batch whose Sync has not arrived is judged on its beginning alone,
        // and whatever follows goes where it went: never balance it (inside a
        // transaction a write simply stays on the transaction's node).
        let force_write = unknown_statement || !complete;
        if prepares {
            hint = Some(Hint::Primary);
        }
        Ok(self.decide_judged(class, hint, force_write, &needs))
    }

    /// Whether an extended batch starting with this message rolls the aborted
    /// transaction back (ROLLBACK or ROLLBACK TO SAVEPOINT), so it may proceed.
    #[cold]
    #[inline(never)]
    fn batch_ends_aborted_tx(&self, t: u8, body: &[u8]) -> bool {
        let query: &[u8] = match t {
            tag::PARSE => parse_fields(body).1,
            tag::BIND => match self.client_view.stmts.get(bind_statement(body)) {
                Some(st) => match &st.source {
                    StmtSource::Parse(f) => parse_fields(&f[5..]).1,
                    StmtSource::Sql(_) => return false,
                },
                None => return false,
            },
            _ => return false,
        };
        self.aborted_tx_query_is_rollback(query)
    }

    /// Classify statement text (raw bytes as sent), through the session's
    /// memo and the cache.
    pub(super) fn classify(&mut self, sql: &[u8]) -> (Arc<Classification>, Option<Hint>) {
        let ctx = &self.ctx;
        let class = ctx
            .classify_cache
            .classify_remembering(Some(&mut self.memo), sql, || ctx.classifier.load_full());
        with_hint(class, sql)
    }

    /// [`Session::classify`] without the session's memo (for `&self` callers,
    /// off the hot path).
    pub(super) fn classify_unremembered(&self, sql: &[u8]) -> (Arc<Classification>, Option<Hint>) {
        let ctx = &self.ctx;
        let class = ctx
            .classify_cache
            .classify(sql, || ctx.classifier.load_full());
        with_hint(class, sql)
    }

    /// Whether unknown functions called by a read make it a write: `Ok(true)` if
    /// some is volatile, or a lookup step when the answer is not cached yet.
    fn judge_functions(&mut self, class: &Classification) -> Result<bool, Step> {
        if class.access == Access::Write || class.unknown_functions.is_empty() {
            return Ok(false);
        }
        if std::mem::take(&mut self.next.functions_volatile) {
            return Ok(true);
        }
        match self.cfg.routing.unknown_functions {
            UnknownFunctions::Read => Ok(false),
            UnknownFunctions::Write => Ok(true),
            UnknownFunctions::Lookup => match self
                .ctx
                .catalog
                .cached(&self.database, &class.unknown_functions)
            {
                Some(volatile) => Ok(volatile),
                None => Err(Step::Lookup(class.unknown_functions.clone())),
            },
        }
    }

    /// Apply the routing policy, then check the node can take the request now.
    fn decide_and_check(
        &mut self,
        class: &Arc<Classification>,
        hint: Option<Hint>,
        needs: &Needs,
    ) -> Planned {
        let snapshot = self.ctx.cluster.snapshot();
        self.refresh_standby(&snapshot);
        let mut route = self.route.clone();
        route.sticky_primary |= self.client_view.overflowed;
        if std::mem::take(&mut self.next.avoid_standby) {
            route.standby = None;
        }
        let node = match policy::decide(
            &self.policy,
            &route,
            class,
            hint,
            self.tx.in_block(),
            snapshot.primary,
        ) {
            Decision::Node(n) => n,
            Decision::NoPrimary => return Err(Step::NeedPrimary),
        };
        tracing::trace!(
            %node,
            access = ?class.access,
            tx = ?class.tx,
            in_tx = self.tx.in_block(),
            standby = ?route.standby,
            "routed"
        );
        self.check_ready(node, needs)?;
        let in_tx_here = self.tx.in_block() && self.route.tx_node == Some(node);
        if Some(node) != snapshot.primary && !self.defaults_probed {
            return Err(Step::ProbeDefaults);
        }
        let node = if Some(node) != snapshot.primary && !in_tx_here {
            let caught_up = self.read_your_writes_node(node, &snapshot)?;
            if caught_up != node {
                self.check_ready(caught_up, needs)?;
            }
            caught_up
        } else {
            node
        };
        self.pending_class = Some(class.clone());
        self.retry.off_primary = snapshot.primary.is_some_and(|p| p != node);
        Ok(node)
    }

    /// Keep the session's standby while it stays usable. The first read picks one
    /// by weight (lag-aware weights come from the cluster snapshot); when the
    /// chosen one stops qualifying (down, over a delay threshold), reads move to
    /// another standby by weight (`prefer_lower_delay_standby`, the default) or
    /// to the primary.
    fn refresh_standby(&mut self, snapshot: &crate::cluster::ClusterSnapshot) {
        if !self.policy.load_balance {
            self.route.standby = None;
            return;
        }
        let include_primary = self.cfg.routing.primary_in_read_pool;
        if let Some(s) = self.route.standby
            && chooser::still_usable(snapshot, s, include_primary)
            && !self.shunned(s)
        {
            return;
        }
        if self.route.tx_node.is_some() && self.tx.in_block() {
            return;
        }
        let first_pick = !self.standby_picked;
        self.standby_picked = true;
        if !first_pick && !snapshot.lag_policy.prefer_lower_delay_standby {
            self.route.standby = None;
            return;
        }
        let weights: Vec<f64> = chooser::read_weights(snapshot, include_primary)
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if self.shunned(NodeId::new(i)) {
                    0.0
                } else {
                    *w
                }
            })
            .collect();
        self.route.standby = chooser::pick(&weights, rand::random::<f64>()).map(NodeId::new);
    }

    /// Whether `node` can take a request now: no other node has one in flight, and
    /// the connection exists, is healthy and carries the session's state.
    fn check_ready(&mut self, node: NodeId, needs: &Needs) -> Result<(), Step> {
        let with_sql;
        let needs = match self.sql_statements_needed(node, needs) {
            Some(n) => {
                with_sql = n;
                &with_sql
            }
            None => needs,
        };
        let others_busy = self
            .links
            .iter()
            .enumerate()
            .any(|(i, l)| i != node.index() && l.as_ref().is_some_and(|l| l.busy()));
        let busy_here = self.links[node.index()].as_ref().is_some_and(|l| l.busy());
        if others_busy || (self.tx.uncertain && busy_here) {
            return Err(Step::Blocked);
        }
        let prepare = || Step::Prepare {
            node,
            needs: needs.clone(),
        };
        if self.links[node.index()].is_none() {
            // Transaction pooling: a connection given back a moment ago is
            // taken now, without an I/O step (nothing to replay on it).
            self.adopt_recent_connection(node);
        }
        self.recognise_statements(node, needs);
        let Some(link) = &self.links[node.index()] else {
            return Err(prepare());
        };
        let stale = link.applied < self.client_view.log_end()
            || !link.pending_close.is_empty()
            || self.statements_stale(node, needs)
            || (node != self.active && !busy_here && !link.conn.is_healthy_idle());
        match (stale, busy_here) {
            (false, _) => Ok(()),
            (true, true) => Err(Step::Blocked),
            (true, false) => Err(prepare()),
        }
    }
}

/// One classification for several statements of a batch: a read only if all are.
fn merge(classes: &[Arc<Classification>]) -> Classification {
    let mut m = Classification::empty();
    for c in classes {
        if c.access == Access::Write {
            m.access = Access::Write;
        }
        m.session_state |= c.session_state;
        m.sticky_primary |= c.sticky_primary;
        m.parse_failed |= c.parse_failed;
        m.exclusive_database |= c.exclusive_database;
        if c.sets_read_only_default.is_some() {
            m.sets_read_only_default = c.sets_read_only_default;
        }
        if m.tx.is_none() {
            m.tx = c.tx.clone();
        }
        m.statements += c.statements;
        m.unknown_functions
            .extend(c.unknown_functions.iter().cloned());
        m.relations.extend(c.relations.iter().cloned());
        m.catalog_change |= c.catalog_change;
        m.lists_statements |= c.lists_statements;
    }
    m.unknown_functions.sort_unstable();
    m.unknown_functions.dedup();
    m.relations.sort_unstable();
    m.relations.dedup();
    m
}

/// A classification with the statement's `/* pgpilot:… */` hint; text that is
/// not UTF-8 (a client encoding pgpilot does not parse) goes to the primary.
fn with_hint(
    class: Option<Arc<Classification>>,
    sql: &[u8],
) -> (Arc<Classification>, Option<Hint>) {
    match class {
        Some(class) => (class, normalize::hint(sql)),
        None => {
            let mut c = Classification::empty();
            c.access = Access::Write;
            c.statements = 1;
            c.parse_failed = true;
            (Arc::new(c), None)
        }
    }
}
