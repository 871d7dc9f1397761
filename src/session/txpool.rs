//! Transaction pooling (`pool.mode = "transaction"`): between transactions a
//! session gives its server connections back to the pool, so the next request
//! (its own or another client's) takes whichever idle connection is warmest.
//!
//! Only a session with nothing to lose does so. Anything that leaves state on
//! a server connection — a setting, an SQL-level PREPARE, a temporary table,
//! LISTEN, an advisory lock, a WITH HOLD cursor, a statement pgpilot could not
//! parse, a FunctionCall — marks the session dirty, and a dirty session keeps
//! its connections to the end, exactly as in session pooling. So a released
//! connection carries nothing of the session's but protocol-level prepared
//! statements, which the next sessions use only where they are identical to
//! their own and close otherwise ([`super::statements`]); it needs no reset.

use super::Session;
use crate::config::{NodeId, PoolMode};

impl Session {
    /// In transaction pooling, give every server connection back if the
    /// session is between transactions and holds no session state.
    pub(super) fn release_between_transactions(&mut self) {
        if self.cfg.pool.mode != PoolMode::Transaction || !self.may_release() {
            return;
        }
        for node in NodeId::all(self.links.len()) {
            if let Some(link) = self.links[node.index()].take() {
                self.install_link(node, None);
                self.ctx.pool.put_idle(link.into_conn(), self.clock.now());
            }
        }
        // A cancel must never reach a connection now serving someone else.
        self.cancel.set(None);
        self.registration.clear_backend();
    }

    /// Between transactions, nothing in flight, no session state anywhere.
    fn may_release(&self) -> bool {
        !self.tx.in_block()
            && !self.tx.client_aborted()
            && !self.tx.uncertain
            && self.batch.is_none()
            && !self.dirty
            && !self.client_view.overflowed
            && self.client_view.pending_tx.is_empty()
            && !self.route.sticky_primary
            && !self.route.forced_primary
            && self.links.iter().any(Option::is_some)
            && self.links.iter().flatten().all(|l| {
                // Prepared statements may stay: the connection's next user
                // finds its own there or closes them first (never runs another's).
                l.reusable() && l.pending_close.is_empty()
            })
    }

    /// Take an idle connection to `node` given back a moment ago, if there is
    /// one (transaction pooling only; otherwise the request's I/O step opens or
    /// waits for a connection).
    pub(super) fn adopt_recent_connection(&mut self, node: NodeId) {
        if self.cfg.pool.mode != PoolMode::Transaction {
            return;
        }
        let now = self.clock.now();
        if let Some(conn) = self.ctx.pool.take_recent(self.pool_key(node), now) {
            // An equal key: take its copy of the parameters, which the pool
            // shares (see `PoolKey`), so later lookups compare pointers.
            if !std::sync::Arc::ptr_eq(&self.pool_key(node).startup, &conn.key.startup) {
                self.pool_keys[node.index()] = conn.key.clone().into();
            }
            self.install_link(node, Some(super::link::Link::new(conn)));
        }
    }

    /// Whether the session holds no server connection because it gave them
    /// back, or logged in without one ([`super::no_primary_login`]).
    pub(super) fn released(&self) -> bool {
        (self.cfg.pool.mode == PoolMode::Transaction || self.no_primary_login)
            && self.links.iter().all(Option::is_none)
    }
}
