//! Reads a hot standby refuses: those naming unlogged relations
//! ([`crate::router::relations`]) go to the primary, judged before routing from
//! the relation cache (a lookup step when an answer is missing), and the
//! cache is kept honest by forgetting a database's answers around every
//! statement that may change its catalog.

use super::route::Step;
use super::{Session, SessionError};
use crate::router::classify::{Access, Classification};
use crate::router::policy::BalanceInTransaction;
use crate::router::relations::{RelationName, Verdict};

impl Session {
    /// Whether a read must run on the primary because of the relations it
    /// names: `Ok(true)` if one is unlogged (or the lookup just failed), or a
    /// lookup step when an answer is missing. No lookup is made for a request
    /// that cannot be balanced anyway.
    pub(super) fn judge_relations(&mut self, class: &Classification) -> Result<bool, Step> {
        if class.access == Access::Write {
            return Ok(false);
        }
        if class.primary_only.get() {
            return Ok(true);
        }
        if class.relations.is_empty()
            || !self.cfg.routing.check_unlogged_tables
            || !self.may_balance()
        {
            return Ok(false);
        }
        if std::mem::take(&mut self.next.relations_to_primary) {
            return Ok(true);
        }
        let now = self.clock.now();
        let ttl = self.cfg.routing.unlogged_cache_ttl;
        match self
            .ctx
            .relations
            .cached(&self.database, &class.relations, now, ttl)
        {
            Verdict::Unlogged => Ok(true),
            Verdict::Logged => Ok(false),
            Verdict::Unknown => Err(Step::LookupRelations(class.relations.clone())),
        }
    }

    /// Whether a read outside a forced route could go to a standby at all.
    fn may_balance(&self) -> bool {
        let tx_stays =
            self.tx.in_block() && self.policy.in_transaction == BalanceInTransaction::Off;
        self.policy.load_balance
            && !self.route.sticky_primary
            && !self.route.forced_primary
            && !tx_stays
    }

    /// Look `names` up on the primary (a routing step). On failure the next
    /// request is judged to need the primary.
    pub(super) async fn look_up_relations(
        &mut self,
        names: Vec<RelationName>,
    ) -> Result<(), SessionError> {
        let snapshot = self.ctx.cluster.snapshot();
        let primary = snapshot.primary.unwrap_or(self.active);
        let catalog = super::catalog_io::PrimaryCatalog {
            primary: &self.cfg.backends[primary.index()],
            monitor: &self.cfg.monitor,
        };
        let ttl = self.cfg.routing.unlogged_cache_ttl;
        if let Err(e) = self
            .ctx
            .relations
            .look_up(&self.database, &names, &catalog, ttl)
            .await
        {
            tracing::warn!(error = %e, "unlogged-relation lookup failed; routing to the primary");
            self.next.relations_to_primary = true;
        }
        Ok(())
    }

    /// A request that may change the catalog is being sent: forget the
    /// database's relation answers now, and again when the session is next
    /// idle (others see a DDL in a transaction only when it commits).
    pub(super) fn catalog_may_change(&mut self, class: &Classification) {
        if class.catalog_change {
            self.ctx.relations.invalidate(&self.database);
            self.catalog_changed = true;
        }
    }

    /// The session is idle: a catalog change it made is committed (or gone).
    pub(super) fn catalog_settled(&mut self) {
        if std::mem::take(&mut self.catalog_changed) {
            self.ctx.relations.invalidate(&self.database);
        }
    }
}
