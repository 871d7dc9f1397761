//! Making a server connection hold the prepared statements a request uses.
//!
//! A session keeps its own record of every statement it prepared (the client's
//! Parse frames, [`super::client_view`]); a server connection knows which statements
//! its server holds, whoever made them
//! ([`HeldStatements`](crate::backend::statements::HeldStatements)). Before a
//! request runs on a connection, each name it uses must be the session's own
//! statement there, or absent when the session has none under that name:
//!
//! * a statement already there as the session made it counts as there
//!   ([`Session::recognise_statements`]): no Parse;
//! * otherwise whatever the server holds under the name is closed and the
//!   session's record parsed again ([`Session::prepare_statements`]), all in
//!   one exchange answered to pgpilot alone;
//! * a request that may name statements pgpilot cannot see (SQL mentioning
//!   EXECUTE, a batch routed before its Sync) first has every statement of
//!   other sessions closed on its connection;
//! * a Bind or Describe arriving in a later read of a batch already routed
//!   gets the session's statement put in front of it, in the same stream
//!   ([`Session::supply_statement`]);
//! * a connection over `pool.max_prepared_statements` has its least recently
//!   used statements closed.
//!
//! So one client never runs another's statement, and named statements do not
//! pin a session to its connection under transaction pooling.

use bytes::{Bytes, BytesMut};

use super::client_view::{self, StmtSource};
use super::{Session, SessionError};
use crate::backend::conn::Unnamed;
use crate::config::NodeId;
use crate::protocol::shape::Shape;

/// What a request needs of the connection it runs on, statement-wise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    /// Names the request uses (Bind, Describe, EXECUTE) or makes (a Parse of
    /// a name the session has not prepared): under each, the connection must
    /// hold the session's own statement, or none if the session has none.
    pub(crate) names: Vec<Vec<u8>>,
    /// The request may reach statements by names pgpilot did not see: every
    /// statement of another session on the connection is closed first.
    pub(crate) purge_others: bool,
}

impl Needs {
    /// Needs of a request that names no statement.
    pub(crate) fn none() -> Needs {
        Needs::default()
    }

    /// Add `name` once.
    pub(crate) fn add(&mut self, name: &[u8]) {
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_vec());
        }
    }
}

/// Whether SQL text may name a prepared statement (`EXECUTE`, `EXPLAIN
/// EXECUTE`, `CREATE TABLE … AS EXECUTE` …): any mention of the word counts.
pub(crate) fn mentions_execute(sql: &[u8]) -> bool {
    // Look for the rare 'x' (every simple Query passes here), then around it.
    memchr::memchr2_iter(b'x', b'X', sql).any(|i| {
        i >= 1
            && sql
                .get(i - 1..i + 6)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"execute"))
    })
}

impl Session {
    /// A request lists the prepared statements of the connection it runs on
    /// (`pg_prepared_statements`): it needs all of the session's, and none
    /// of another session's.
    pub(super) fn need_all_statements(&self, needs: &mut Needs) {
        needs.purge_others = true;
        for name in self.client_view.stmts.keys().filter(|n| !n.is_empty()) {
            needs.add(name);
        }
    }

    /// Count the needed statements the connection to `node` already holds as
    /// this session made them (or as an identical Parse from another session
    /// in the same clean context) as there: no Parse needed. The unnamed one
    /// only by identity ([`Session::recognise_unnamed`]).
    pub(super) fn recognise_statements(&mut self, node: NodeId, needs: &Needs) {
        if needs.names.is_empty() {
            return;
        }
        if needs.names.iter().any(|n| n.is_empty()) {
            self.recognise_unnamed(node);
        }
        let clean = !self.dirty;
        let Some(link) = self.links[node.index()].as_mut() else {
            return;
        };
        let mut reused = 0;
        for name in &needs.names {
            if name.is_empty() || link.statements.contains(name) {
                continue;
            }
            if let Some(client_view::Stmt {
                source: StmtSource::Parse(own),
                shape,
                ..
            }) = self.client_view.stmts.get(name)
                && link.conn.held.is(name, own, clean, *shape)
            {
                link.statements.insert(name.clone());
                reused += 1;
            }
        }
        if reused > 0 {
            self.ctx.metrics.prepared_statements("reused", reused);
        }
    }

    /// Whether the connection to `node` must be brought up to date,
    /// statement-wise, before the request runs there.
    pub(super) fn statements_stale(&self, node: NodeId, needs: &Needs) -> bool {
        let Some(link) = &self.links[node.index()] else {
            return true;
        };
        let held = &link.conn.held;
        let missing = |n: &Vec<u8>| {
            !link.statements.contains(n)
                // A broken statement's uses never reach the server.
                && !self.is_broken(n)
                && (self.client_view.stmts.contains_key(n)
                    || if n.is_empty() {
                        link.unnamed != Unnamed::Absent
                    } else {
                        held.contains(n)
                    })
        };
        needs.names.iter().any(missing)
            || (needs.purge_others && held.has_others(&link.statements))
            || (held.len() > self.cfg.pool.max_prepared_statements
                && !held
                    .excess(self.cfg.pool.max_prepared_statements, &needs.names)
                    .is_empty())
    }

    /// Bring the connection to `node` to what `needs` says, in one exchange:
    /// first close what stands in the way (other sessions' statements under a
    /// needed name, all of them when `purge_others`, the least recently used
    /// past the cap), then parse the session's records again. `must_use`: the
    /// request runs here even if that fails (the server reports its own
    /// error); otherwise a failure sends it elsewhere.
    pub(super) async fn prepare_statements(
        &mut self,
        node: NodeId,
        needs: &Needs,
        must_use: bool,
    ) -> Result<(), SessionError> {
        // The connection may be one just taken from the pool.
        self.recognise_statements(node, needs);
        let limit = self.cfg.timeouts.reset;
        let cap = self.cfg.pool.max_prepared_statements;
        let clean = !self.dirty;
        let Some(link) = self.links[node.index()].as_mut() else {
            return Ok(());
        };
        let mut closes: Vec<Vec<u8>> = Vec::new();
        if needs.purge_others {
            closes.extend(link.conn.held.others(&link.statements));
        }
        let in_the_way = closes.len();
        let evicted = link.conn.held.excess(cap, &needs.names);
        for name in &evicted {
            if !closes.contains(name) {
                closes.push(name.clone());
            }
        }
        let evicted = closes.len() - in_the_way;
        let mut msgs = BytesMut::new();
        let mut rfqs = 0;
        let mut parses = false;
        let mut made: Vec<(Vec<u8>, Option<Bytes>)> = Vec::new();
        // Statements described after their Parse: name, the shape the client knows.
        let mut checks: Vec<(Vec<u8>, Shape)> = Vec::new();
        let mut unnamed = None;
        for name in &needs.names {
            if link.statements.contains(name)
                || self.client_view.stmts.get(name).is_some_and(|s| s.broken)
            {
                continue;
            }
            let held_here = !name.is_empty() && link.conn.held.contains(name);
            if held_here && !closes.contains(name) {
                closes.push(name.clone());
            }
            match self.client_view.stmts.get(name).map(|s| &s.source) {
                Some(StmtSource::Parse(f)) => {
                    msgs.extend_from_slice(f);
                    if let Some(shape) = self.client_view.stmts.get(name).and_then(|s| s.shape) {
                        client_view::describe_statement_message(&mut msgs, name);
                        checks.push((name.clone(), shape));
                    }
                    parses = true;
                    if name.is_empty() {
                        unnamed = Some(Unnamed::Parsed(f.clone()));
                    }
                    made.push((name.clone(), Some(f.clone())));
                }
                Some(StmtSource::Sql(q)) => {
                    msgs.extend_from_slice(q);
                    rfqs += 1;
                    made.push((name.clone(), None));
                }
                None if name.is_empty() && link.unnamed != Unnamed::Absent => {
                    // The request uses an unnamed statement the session has not
                    // made: close the one left here (another session's), so the
                    // server reports it missing rather than running it.
                    client_view::close_statement_message(&mut msgs, b"");
                    parses = true;
                    unnamed = Some(Unnamed::Absent);
                }
                None => {}
            }
        }
        let mut out = BytesMut::new();
        for name in &closes {
            client_view::close_statement_message(&mut out, name);
        }
        if !closes.is_empty() {
            client_view::sync_message(&mut out);
            rfqs += 1;
        }
        if parses {
            client_view::sync_message(&mut msgs);
            rfqs += 1;
        }
        if rfqs == 0 {
            return Ok(());
        }
        out.extend_from_slice(&msgs);
        let mut shapes = Vec::new();
        let errors = link
            .conn
            .exchange_describing(&out, rfqs, limit, &mut shapes)
            .await?;
        let ok = errors.is_empty();
        // Where a statement's result is no longer what the client was told,
        // its uses fail as PostgreSQL's cached statement would.
        let mut broken = Vec::new();
        if ok {
            for ((name, expected), got) in checks.iter().zip(&shapes) {
                if got != expected {
                    broken.push(name.clone());
                }
            }
        }
        // A Close never fails (a missing statement is no error, an aborted
        // transaction does not refuse it) and ours come first, so whatever
        // failed after them, they are done.
        for name in &closes {
            link.statements.remove(name);
            link.conn.held.closed(name);
        }
        link.unnamed = match unnamed {
            Some(u) if ok => u,
            Some(_) => Unnamed::Unknown,
            None => std::mem::take(&mut link.unnamed),
        };
        for (name, frame) in &made {
            match frame {
                _ if name.is_empty() => {}
                Some(f) if ok => {
                    let shape = checks
                        .iter()
                        .position(|(n, _)| n == name)
                        .and_then(|i| shapes.get(i).copied());
                    link.conn.held.made(name, f.clone(), clean, shape)
                }
                _ => link.conn.held.unknown(name),
            }
        }
        let reparsed = made
            .iter()
            .filter(|(n, f)| !n.is_empty() && f.is_some())
            .count();
        let names = made.into_iter().map(|(n, _)| n);
        if ok || must_use {
            // On failure, the server reports its own error when the request runs.
            link.statements.extend(names);
        } else {
            // E.g. a table created on the primary has not reached this standby.
            tracing::debug!(%node, error = %errors[0].message, "statement not preparable here; using the primary");
            self.next.avoid_standby = true;
        }
        for name in &broken {
            self.mark_broken(name);
        }
        let metrics = &self.ctx.metrics;
        metrics.prepared_statements("prepared", reparsed);
        metrics.prepared_statements("closed", closes.len() - evicted);
        metrics.prepared_statements("evicted", evicted);
        Ok(())
    }

    /// A Bind or Describe of statement `name` goes to `node` in a batch that
    /// was routed before it arrived (a later read of the batch), so nothing
    /// made sure the connection holds the session's statement of that name.
    /// Where it does not, returns the messages to send first, in the same
    /// stream: a Close of whatever else holds the name, then the session's
    /// own Parse (or the Close alone when the session has no such statement,
    /// so the server reports it missing rather than running another's).
    /// Their answers are pgpilot's ([`Link::on_data`](super::link::Link)
    /// cuts them); if the Parse fails there, the client gets that error for
    /// its batch, as for a Parse of its own.
    pub(super) fn supply_statement(
        &mut self,
        node: NodeId,
        name: &[u8],
    ) -> Result<Option<BytesMut>, SessionError> {
        let shape = self.client_view.stmts.get(name).and_then(|s| s.shape);
        let own = match self.client_view.stmts.get(name).map(|s| &s.source) {
            Some(StmtSource::Parse(f)) => Some(f.clone()),
            // An SQL PREPARE keeps the session on its connections.
            Some(StmtSource::Sql(_)) => return Ok(None),
            None => None,
        };
        // Already there as the session made it (or an identical Parse is).
        let needs = Needs {
            names: vec![name.to_vec()],
            ..Needs::none()
        };
        self.recognise_statements(node, &needs);
        let clean = !self.dirty;
        let link = self.link_mut(node)?;
        if link.statements.contains(name) {
            return Ok(None);
        }
        let held = if name.is_empty() {
            link.unnamed != Unnamed::Absent
        } else {
            link.conn.held.contains(name)
        };
        let request = link.sent + 1;
        let mut out = BytesMut::new();
        // An unnamed Parse replaces whatever was there: no Close needed.
        if held && (own.is_none() || !name.is_empty()) {
            client_view::close_statement_message(&mut out, name);
            if name.is_empty() {
                link.unnamed = Unnamed::Absent;
            } else {
                link.conn.held.unknown(name);
            }
            link.closes.push_back(super::link::PendingClose {
                request,
                statement: Some(name.to_vec()),
                injected: true,
                marks_shape_error: false,
            });
        }
        if let Some(f) = own {
            out.extend_from_slice(&f);
            if let Some(expected) = shape {
                // The message waits for this answer (Flush: now, not at Sync).
                client_view::describe_statement_message(&mut out, name);
                client_view::flush_message(&mut out);
                link.describes.push_back(super::link::PendingDescribe {
                    request,
                    name: name.to_vec(),
                    check: Some(expected),
                });
            }
            if name.is_empty() {
                link.unnamed = Unnamed::Parsed(f.clone());
            }
            link.statements.insert(name.to_vec());
            link.parses.push_back(super::link::PendingParse {
                request,
                name: name.to_vec(),
                frame: f,
                shareable: clean,
                injected: true,
            });
            self.ctx.metrics.prepared_statements("prepared", 1);
            self.shape_wait = shape.is_some();
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_is_found_in_any_case_and_position() {
        assert!(mentions_execute(b"EXECUTE s1(1)"));
        assert!(mentions_execute(b"explain execute s1"));
        assert!(mentions_execute(b"create table t as eXeCuTe s1"));
        assert!(!mentions_execute(b"select 1"));
        assert!(!mentions_execute(b"select exec, e, ute from t"));
        assert!(!mentions_execute(b"execut"));
        assert!(!mentions_execute(b"xecute"));
        assert!(mentions_execute(b"EXECUTE"));
        assert!(mentions_execute(b"select 1;execute"));
    }
}
