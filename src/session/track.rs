//! What the session records as it sends a request: the statements each
//! connection holds (named, and the unnamed one whoever made it), the
//! transaction it opens or ends, the effects to apply when the request
//! completes, and per-node statement counts. [`super::route`] decides where a
//! request goes; this module remembers what sending it did.

use super::client_view::{ClientView, StmtSource};
use super::route::{bind_statement, function_call_class, parse_fields, query_sql};
use super::{Session, SessionError};
use crate::backend::conn::Unnamed;
use crate::config::NodeId;
use crate::protocol::frame::cstr;
use crate::protocol::tag;
use crate::router::classify::{Access, Classification, TxControl};

impl Session {
    /// The connection to `node` holds the session's own current unnamed
    /// statement (it gave the connection back and took it again): no re-parse.
    /// Identity, not equal bytes: the same text parsed by another session could
    /// mean something else (a search_path set by its role, a changed table).
    /// The record is shared, not copied, so its address identifies it (and
    /// cannot be reused while the connection still refers to it).
    pub(super) fn recognise_unnamed(&mut self, node: NodeId) {
        let Some(StmtSource::Parse(own)) = self.client_view.stmts.get(&b""[..]).map(|s| &s.source)
        else {
            return;
        };
        if let Some(l) = self.links[node.index()].as_mut()
            && matches!(&l.unnamed, Unnamed::Parsed(b) if b.as_ptr() == own.as_ptr() && b.len() == own.len())
        {
            l.statements.insert(Vec::new());
        }
    }

    /// Bookkeeping for a Query or FunctionCall sent to `node`.
    pub(super) fn track_simple(
        &mut self,
        node: NodeId,
        t: u8,
        frame: &[u8],
    ) -> Result<(), SessionError> {
        let class = match self.pending_class.take() {
            Some(c) => c,
            None if t == tag::FUNCTION_CALL => function_call_class(),
            None => self.classify(query_sql(frame)).0,
        };
        if class.exclusive_database {
            self.free_databases(query_sql(frame));
        }
        let effects = if t == tag::QUERY {
            ClientView::effects_for(&class, query_sql(frame), Some(frame), self.tx.in_block())
        } else {
            self.dirty = true;
            None
        };
        self.read_your_writes_request_sent();
        let now = self.clock.now();
        let link = self.link_mut(node)?;
        link.begin_request(now);
        link.outstanding += 1;
        link.sent += 1;
        link.syncs_since_execute = 0;
        if t == tag::QUERY {
            // A simple Query drops the server's unnamed statement.
            link.unnamed = Unnamed::Absent;
        }
        if let Some(e) = effects {
            let k = link.sent;
            link.effects.push_back((k, e));
        }
        self.note_sent(node, &class);
        if t == tag::QUERY {
            self.note_untouched_tx_begin(node, &class, || bytes::Bytes::copy_from_slice(frame));
        }
        Ok(())
    }

    /// After a lone BEGIN was sent to a standby, remember it (a Query
    /// message to run on the primary) in case the transaction's first
    /// statement is a `SET TRANSACTION` only the primary can take
    /// ([`Session::moves_untouched_tx`]).
    fn note_untouched_tx_begin(
        &mut self,
        node: NodeId,
        class: &Classification,
        begin: impl FnOnce() -> bytes::Bytes,
    ) {
        if matches!(class.tx, Some(TxControl::Begin { .. }))
            && class.statements == 1
            && self.tx.in_block()
            && self.route.tx_node == Some(node)
            && self.ctx.cluster.snapshot().primary != Some(node)
        {
            self.untouched_tx_begin = Some(begin());
        }
    }

    /// Whether this Query is a `SET TRANSACTION` a standby cannot take, sent
    /// as the first statement of a transaction begun on a standby: PostgreSQL
    /// on the primary would accept it, so the transaction moves there.
    pub(super) fn moves_untouched_tx(&self, frame: &[u8]) -> bool {
        self.untouched_tx_begin.is_some()
            && self.tx.in_block()
            && std::str::from_utf8(query_sql(frame))
                .is_ok_and(crate::router::session_cmd::tx_mode_needs_primary)
    }

    /// The same for an extended-protocol batch starting at the front of
    /// `rest`: whether one of its Binds runs such a `SET TRANSACTION` (parsed
    /// in the batch or before).
    #[inline(never)]
    pub(super) fn batch_moves_untouched_tx(&self, rest: &[u8]) -> bool {
        if self.untouched_tx_begin.is_none() || !self.tx.in_block() {
            return false;
        }
        let max = self.cfg.max_message_size;
        let mut parsed: Vec<(&[u8], &[u8])> = Vec::new();
        let mut p = 0;
        while let Ok(Some(f)) = crate::protocol::frame::peek_frame(&rest[p..], max) {
            let body = &rest[p + 5..p + f.wire_len];
            let sql = match f.tag {
                tag::PARSE => {
                    parsed.push(parse_fields(body));
                    None
                }
                tag::BIND => {
                    let name = bind_statement(body);
                    match parsed.iter().rev().find(|(n, _)| *n == name) {
                        Some((_, q)) => Some(*q),
                        None => match self.client_view.stmts.get(name).map(|s| &s.source) {
                            Some(StmtSource::Parse(f)) => Some(parse_fields(&f[5..]).1),
                            _ => None,
                        },
                    }
                }
                tag::SYNC => break,
                _ => None,
            };
            if sql
                .and_then(|q| std::str::from_utf8(q).ok())
                .is_some_and(crate::router::session_cmd::tx_mode_needs_primary)
            {
                return true;
            }
            p += f.wire_len;
        }
        false
    }

    /// Bookkeeping for one extended-protocol message sent to `node`.
    #[inline(never)]
    pub(super) fn track_extended(
        &mut self,
        node: NodeId,
        t: u8,
        frame: &[u8],
    ) -> Result<(), SessionError> {
        let body = &frame[5..];
        self.pending_class = None;
        let now = self.clock.now();
        self.link_mut(node)?.begin_request(now);
        match t {
            tag::PARSE => {
                let (name, query) = parse_fields(body);
                // Classified already when the batch was routed, unless this Parse
                // arrived after that.
                let (class, hint) = match self.parsed_ahead.pop_front() {
                    Some(c) => c,
                    None => self.classify(query),
                };
                let source = bytes::Bytes::copy_from_slice(frame);
                if name.is_empty() {
                    for l in self.links.iter_mut().flatten() {
                        l.statements.remove(name);
                    }
                    self.link_mut(node)?.unnamed = Unnamed::Parsed(source.clone());
                }
                // Usable by other sessions only if made
                // before any setting changed (see backend::statements).
                let shareable = !self.dirty;
                let frame = source.clone();
                let stmt = super::client_view::Stmt::new(StmtSource::Parse(source), class, hint);
                self.client_view.stmts.insert(name.to_vec(), stmt);
                let link = self.link_mut(node)?;
                link.statements.insert(name.to_vec());
                let request = link.sent + 1;
                link.parses.push_back(super::link::PendingParse {
                    request,
                    name: name.to_vec(),
                    frame,
                    shareable,
                    injected: false,
                });
            }
            tag::BIND => {
                let name = bind_statement(body);
                if let Some(st) = self.client_view.stmts.get(name) {
                    let class = st.class.clone();
                    let effects = match &st.source {
                        StmtSource::Parse(f) => {
                            let (_, query) = parse_fields(&f[5..]);
                            ClientView::effects_for(&class, query, None, self.tx.in_block())
                        }
                        StmtSource::Sql(_) => None,
                    };
                    // A BEGIN through the extended protocol is replayed on
                    // the primary as a Query of the same text.
                    let begin = match &st.source {
                        StmtSource::Parse(f)
                            if matches!(class.tx, Some(TxControl::Begin { .. })) =>
                        {
                            Some(f.clone())
                        }
                        _ => None,
                    };
                    let exclusive = match &st.source {
                        StmtSource::Parse(f) if class.exclusive_database => Some(f.clone()),
                        _ => None,
                    };
                    if let Some(f) = exclusive {
                        self.free_databases(parse_fields(&f[5..]).1);
                    }
                    let link = self.link_mut(node)?;
                    if let Some(e) = effects {
                        let k = link.sent + 1;
                        link.effects.push_back((k, e));
                    }
                    self.note_sent(node, &class);
                    if let Some(parse) = begin {
                        self.note_untouched_tx_begin(node, &class, || {
                            super::client_view::query_message(parse_fields(&parse[5..]).1)
                        });
                    }
                }
            }
            tag::CLOSE => {
                let statement = match body.split_first() {
                    Some((b'S', rest)) => {
                        let name = cstr(rest).map(|(n, _)| n).unwrap_or_default();
                        self.forget_statement(node, name);
                        self.answered_here.stmts.remove(name);
                        Some(name.to_vec())
                    }
                    _ => None,
                };
                let link = self.link_mut(node)?;
                if let Some(name) = &statement
                    && link.conn.held.contains(name)
                {
                    // Gone once its CloseComplete comes; until then, maybe not.
                    link.conn.held.unknown(name);
                }
                let request = link.sent + 1;
                link.closes.push_back(super::link::PendingClose {
                    request,
                    statement,
                    injected: false,
                    marks_shape_error: false,
                });
            }
            tag::DESCRIBE if body.first() == Some(&b'S') => {
                // Its answer tells the client the statement's shape.
                let name = cstr(&body[1..]).map(|(n, _)| n).unwrap_or_default();
                let link = self.link_mut(node)?;
                let request = link.sent + 1;
                link.describes.push_back(super::link::PendingDescribe {
                    request,
                    name: name.to_vec(),
                    check: None,
                });
            }
            tag::EXECUTE => self.link_mut(node)?.syncs_since_execute = 0,
            tag::SYNC => {
                let link = self.link_mut(node)?;
                if !link.copy_in {
                    // (Ignored by a server reading COPY data: no ReadyForQuery.)
                    link.outstanding += 1;
                    link.sent += 1;
                    link.syncs_since_execute += 1;
                }
                link.in_batch = false;
                self.batch = None;
                self.parsed_ahead.clear();
                return Ok(());
            }
            _ => {}
        }
        self.link_mut(node)?.in_batch = true;
        Ok(())
    }

    /// `sql` is about to be sent and fails while other sessions use a
    /// database it names (`DROP DATABASE d` …): pgpilot's idle pooled
    /// connections to it, on every node, are not such sessions for the
    /// client, so they are closed first. Connections other clients use stay
    /// (PostgreSQL's error is theirs to cause).
    #[cold]
    #[inline(never)]
    fn free_databases(&mut self, sql: &[u8]) {
        let Ok(text) = std::str::from_utf8(sql) else {
            return;
        };
        for database in crate::router::database_cmd::exclusive_databases(text) {
            let closed = self
                .ctx
                .pool
                .close_idle_database(&database, std::time::Instant::now());
            tracing::debug!(
                database,
                closed,
                "closed idle connections before a statement that needs the database alone"
            );
            self.retiring.push(database);
        }
    }

    /// The statements that retired databases ended (or never will: the
    /// session ends): their connections may be pooled again.
    #[cold]
    #[inline(never)]
    pub(super) fn end_retiring(&mut self) {
        for database in self.retiring.drain(..) {
            self.ctx.pool.end_retiring(&database);
        }
    }

    /// Routing state after a statement of class `class` was sent to `node`.
    pub(super) fn note_sent(&mut self, node: NodeId, class: &Classification) {
        // Whatever runs now, the transaction has run more than its BEGIN.
        self.untouched_tx_begin = None;
        self.catalog_may_change(class);
        let kind = if class.tx.is_some() {
            "transaction"
        } else if class.session_state {
            "session"
        } else if class.access == Access::Read {
            "read"
        } else {
            "write"
        };
        self.ctx.metrics.statement_routed(node, kind);
        if ClientView::pins_primary(class) {
            self.route.sticky_primary = true;
        }
        self.dirty |= class.session_state
            || class.sticky_primary
            || class.prepare.is_some()
            || class.parse_failed;
        match class.tx {
            Some(TxControl::Begin { .. }) if !self.tx.in_block() => {
                self.tx.begin();
                self.route.tx_node = Some(node);
                self.route.tx_wrote = false;
            }
            Some(TxControl::Commit | TxControl::Rollback | TxControl::PrepareTransaction) => {
                self.tx.end_sent();
                self.route.tx_node = None;
                self.route.tx_wrote = false;
            }
            _ => {}
        }
        if class.tx.is_some() && class.statements > 1 {
            // "COMMIT; BEGIN" and the like: trust only the server's ReadyForQuery.
            self.tx.uncertain = true;
        }
        if self.tx.in_block() && class.access == Access::Write {
            self.route.tx_wrote = true;
        }
        if class.access == Access::Write {
            self.read_your_writes.write_pending = true;
        }
        self.registration
            .set_state(crate::context::registry::SessionActivity::Active);
    }

    /// The client closed statement `name` (or DEALLOCATE'd it) on `node`: forget
    /// it, and close it later on the other connections that have it.
    pub(super) fn forget_statement(&mut self, node: NodeId, name: &[u8]) {
        self.client_view.stmts.remove(name);
        if !self.client_view.sql_names.is_empty() {
            self.client_view.sql_names.retain(|n| n != name);
        }
        if name.is_empty()
            && let Some(l) = self.links[node.index()].as_mut()
        {
            l.unnamed = Unnamed::Absent;
        }
        for (i, l) in NodeId::all(self.links.len()).zip(self.links.iter_mut()) {
            if let Some(l) = l
                && l.statements.remove(name)
                && i != node
                && !name.is_empty()
            {
                l.pending_close.push(name.to_vec());
            }
        }
    }

    /// DEALLOCATE ALL / DISCARD ALL ran on `node`: every statement is gone there.
    pub(super) fn forget_all_statements(&mut self, node: NodeId) {
        self.client_view.stmts.clear();
        self.client_view.sql_names.clear();
        if let Some(l) = self.links[node.index()].as_mut() {
            l.conn.held.clear();
        }
        for (i, l) in NodeId::all(self.links.len()).zip(self.links.iter_mut()) {
            if let Some(l) = l {
                let names = std::mem::take(&mut l.statements);
                if i != node {
                    l.pending_close
                        .extend(names.into_iter().filter(|n| !n.is_empty()));
                }
            }
        }
    }
}
