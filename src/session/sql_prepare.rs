//! SQL-level `PREPARE` as on one server.
//!
//! A statement the client prepares with SQL `PREPARE` is visible to any SQL
//! of its session, not only to `EXECUTE`: `DEALLOCATE`, `EXPLAIN EXECUTE`,
//! `CREATE TABLE … AS EXECUTE`, a PL/pgSQL `EXECUTE 'EXECUTE q'`, the
//! `pg_prepared_statements` view. pgpilot cannot see most of these uses, so
//! one node holds every SQL-prepared statement of the session: the primary.
//!
//! * `PREPARE` and `DEALLOCATE` run on the primary (outside a transaction;
//!   inside one, on the transaction's node), so a statement that cannot be
//!   prepared fails at once, with PostgreSQL's error;
//! * a request sent to the primary first has the primary's connection make
//!   the SQL-prepared statements it lacks (one prepared inside a transaction
//!   on a standby, or before a failover or a reconnection);
//! * other nodes get a statement lazily, when an `EXECUTE` of it (or an
//!   `EXPLAIN EXECUTE`) runs there, as protocol-level statements do
//!   ([`super::statements`]); `DEALLOCATE` closes it there afterwards;
//! * reads of `pg_prepared_statements` go to the primary (the classifier
//!   counts the view as the primary's).

use super::Session;
use super::client_view::{Stmt, StmtSource};
use super::statements::Needs;
use crate::config::NodeId;
use crate::router::classify::Classification;

/// Whether the statement string prepares or deallocates an SQL statement: it
/// runs on the primary.
pub(super) fn on_primary(class: &Classification) -> bool {
    class.prepare.is_some() || class.deallocate.is_some()
}

impl Session {
    /// `needs` with the session's SQL-prepared statements the connection to
    /// `node` lacks, if `node` is the primary and it lacks some.
    #[inline]
    pub(super) fn sql_statements_needed(&self, node: NodeId, needs: &Needs) -> Option<Needs> {
        if self.client_view.sql_names.is_empty() {
            return None;
        }
        self.missing_sql_statements(node, needs)
    }

    #[cold]
    #[inline(never)]
    fn missing_sql_statements(&self, node: NodeId, needs: &Needs) -> Option<Needs> {
        if self.ctx.cluster.snapshot().primary != Some(node) {
            return None;
        }
        let link = self.links[node.index()].as_ref();
        let mut missing = self.client_view.sql_names.iter().filter(|n| {
            matches!(
                self.client_view.stmts.get(*n),
                Some(Stmt {
                    source: StmtSource::Sql(_),
                    ..
                })
            ) && !link.is_some_and(|l| l.statements.contains(*n))
        });
        let first = missing.next()?;
        let mut all = needs.clone();
        all.add(first);
        for n in missing {
            all.add(n);
        }
        Some(all)
    }
}
