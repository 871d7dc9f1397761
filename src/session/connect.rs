//! The session's server connections: opening them (the primary's at login, a
//! standby's at the first read routed there) and bringing each up to the
//! session's state before it is used — settings replayed, forgotten statements
//! closed, the statements a request uses prepared ([`super::statements`]), the
//! transaction defaults read. A standby that cannot serve the session is shunned for a while; the
//! request is then routed again and reads go elsewhere.

use bytes::BytesMut;

use super::link::Link;
use super::statements::Needs;
use super::{SHUN, SHUN_REFUSED, Session, SessionError, client_view};
use crate::backend::BackendError;
use crate::backend::conn::Unnamed;
use crate::backend::pool::AcquireSettings;
use crate::config::{NodeId, PoolMode};

impl Session {
    /// The error for "no primary", with the cluster layer's reason when it
    /// has one: Patroni mode's, or, coordinating through etcd, that this
    /// instance has no live lease (it refuses writes rather than guess the
    /// primary, see `cluster::coordination`).
    pub(super) fn no_primary(&self) -> BackendError {
        let cluster = &self.ctx.cluster;
        let etcd = || cluster.coordination().and_then(|h| h.no_primary_reason());
        match cluster.no_primary_reason().or_else(etcd) {
            Some(why) => BackendError::NoPrimaryBecause(why),
            None => BackendError::NoPrimary,
        }
    }

    /// Open the session's connection to the current primary. During a
    /// failover (or when the primary's connection is refused and the
    /// failover starts) wait up to `failover.client_wait_timeout` for the
    /// new one instead of failing the login.
    pub(super) async fn connect_primary(&mut self) -> Result<(), BackendError> {
        let (wait, failover) = (
            self.cfg.pool.acquire_timeout,
            self.cfg.failover.client_wait_timeout,
        );
        let mut retried = false;
        loop {
            let node = self
                .ctx
                .cluster
                .wait_primary_for(wait, failover)
                .await
                .ok_or_else(|| self.no_primary())?;
            match self.open_link(node).await {
                Ok(link) => {
                    self.install_link(node, Some(link));
                    self.set_active(node);
                    return Ok(());
                }
                Err(e)
                    if !retried
                        && e.is_connection_failure()
                        && self.ctx.cluster.session_lost(node).await =>
                {
                    retried = true;
                }
                Err(e) => {
                    if retried && e.is_connection_failure() {
                        self.ctx.cluster.report_session_error(node);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A new (or pooled) connection to `node` for this session's user and database.
    pub(super) async fn open_link(&self, node: NodeId) -> Result<Link, BackendError> {
        let key = self.pool_key(node);
        let b = &self.cfg.backends[node.index()];
        let settings = AcquireSettings {
            host: &b.host,
            port: b.port,
            password: super::cfg_password(&self.cfg, &self.user),
            scram_keys: self.scram_keys.as_deref(),
            md5_stored: self.md5_stored.as_deref(),
            max_per_node: self.cfg.pool.max_connections_per_node,
            acquire_timeout: self.cfg.pool.acquire_timeout,
            connect_timeout: self.cfg.timeouts.connect,
            auth_timeout: self.cfg.timeouts.auth,
            tls: self.cfg.backend_tls_client.as_deref(),
        };
        // Callers report a connection failure to the cluster (once each).
        let conn = self.ctx.pool.acquire(key, &settings).await?;
        Ok(Link::new(conn))
    }

    /// Connect to `node` if needed, and bring its connection up to the session's
    /// state: replay settings it has not seen, close statements the session
    /// forgot, prepare the statements in `needs`. A standby that cannot be used is
    /// shunned for a while and the request is routed again (reads then go
    /// elsewhere); failing to reach the primary ends the session.
    pub(super) async fn prepare_node(
        &mut self,
        node: NodeId,
        needs: Needs,
    ) -> Result<(), SessionError> {
        let primary = self.ctx.cluster.snapshot().primary;
        let must_use =
            Some(node) == primary || (self.tx.in_block() && self.route.tx_node == Some(node));
        let fresh = match &self.links[node.index()] {
            Some(l) => !l.busy() && node != self.active && !l.conn.is_healthy_idle(),
            None => true,
        };
        if fresh {
            if self.links[node.index()].is_some() {
                if self.lost_link_ends_session(node, primary) {
                    return Err(self.end_with_lost_link(node));
                }
                tracing::debug!(%node, "idle server connection went away; reconnecting");
                self.install_link(node, None);
            }
            match self.open_link(node).await {
                Ok(l) => self.install_link(node, Some(l)),
                Err(e) if !must_use => {
                    // A standby that refuses the login (a database or role created
                    // on the primary that it has not replayed yet) or cannot be
                    // reached: this session reads elsewhere for a while.
                    tracing::info!(%node, error = %e, "standby unusable for this session; reads go elsewhere");
                    let (pause, report) = if e.is_connection_failure() {
                        (SHUN, true)
                    } else {
                        (SHUN_REFUSED, false)
                    };
                    self.shun(node, pause, report);
                    return Ok(());
                }
                Err(e) => {
                    if e.is_connection_failure() {
                        self.ctx.cluster.report_session_error(node);
                    }
                    return Err(e.into());
                }
            }
        }
        let limit = self.cfg.timeouts.reset;
        let Some(link) = self.links[node.index()].as_mut() else {
            return Ok(());
        };
        // 1. Settings and closes: failure means this connection's state differs.
        let mut msgs = BytesMut::new();
        let mut rfqs = 0;
        let mut discards = false;
        let replayed = !self.client_view.log_since(link.applied).is_empty();
        for q in self.client_view.log_since(link.applied) {
            msgs.extend_from_slice(q);
            rfqs += 1;
            discards |= crate::router::session_cmd::is_discard_all(
                std::str::from_utf8(super::route::query_sql(q)).unwrap_or(""),
            );
        }
        let closes = std::mem::take(&mut link.pending_close);
        if !closes.is_empty() {
            for name in &closes {
                client_view::close_statement_message(&mut msgs, name);
            }
            client_view::sync_message(&mut msgs);
            rfqs += 1;
        }
        if rfqs > 0 {
            let errors = link.conn.exchange_discarding(&msgs, rfqs, limit).await?;
            // A Close never fails, whatever else did.
            for name in &closes {
                link.conn.held.closed(name);
            }
            link.applied = self.client_view.log_end();
            if replayed {
                // Settings are replayed as simple Queries, which drop the
                // server's unnamed statement.
                link.unnamed = Unnamed::Absent;
            }
            if discards {
                link.statements.clear();
                link.conn.held.clear();
            }
            if let Some(e) = errors.first() {
                tracing::warn!(%node, error = %e.message, "replaying the session's settings failed; the session stays on the primary");
                self.client_view.overflowed = true;
            }
        }
        // 2. Statements the request uses.
        self.prepare_statements(node, &needs, must_use).await
    }

    /// The session's idle connection to `node` ended (terminated by an
    /// administrator, `idle_session_timeout`, a server restart): whether the
    /// client's session ends with it, as it would with PostgreSQL, because it
    /// may have lost something pgpilot cannot restore on another connection.
    /// Under session pooling that is the primary's connection (the session's
    /// own since login: temporary tables, locks, LISTEN live there) or one
    /// with an open transaction; a standby's connection carries nothing but
    /// settings and statements pgpilot replays. Under transaction pooling, a
    /// session with no session state outside a transaction has nothing to
    /// lose.
    fn lost_link_ends_session(&self, node: NodeId, primary: Option<NodeId>) -> bool {
        let tx_here =
            (self.tx.in_block() || self.tx.client_aborted()) && self.route.tx_node == Some(node);
        match self.cfg.pool.mode {
            PoolMode::Session => tx_here || primary == Some(node),
            PoolMode::Transaction => {
                tx_here
                    || self.dirty
                    || self.route.sticky_primary
                    || self.client_view.overflowed
                    || !self.client_view.pending_tx.is_empty()
            }
        }
    }

    /// End the session for its lost connection to `node`: the client gets
    /// what the server said before closing it (its FATAL, e.g. `57P01
    /// terminating connection due to administrator command`), or else 08006,
    /// then its connection is closed.
    #[cold]
    #[inline(never)]
    fn end_with_lost_link(&mut self, node: NodeId) -> SessionError {
        tracing::info!(%node, user = %self.user, "the session's server connection ended; ending the session");
        if let Some(link) = self.links[node.index()].as_mut() {
            // What the server sent before it closed, read without waiting.
            let conn = &mut link.conn.conn;
            while let Ok(1..) = conn.stream.try_read_buf(&mut conn.buf) {}
        }
        // Forwarded as it came; without a FATAL among it, the client gets
        // 08006 when the session ends.
        match self.on_backend_data(node) {
            Ok(()) => SessionError::BackendLost { node },
            Err(e) => e,
        }
    }

    /// Move the transaction begun on a standby, which has run nothing but its
    /// BEGIN (so it has no snapshot yet), to the primary: ROLLBACK there,
    /// the same BEGIN here, both answered to pgpilot alone. Without a primary
    /// the transaction stays (its next statement gets the standby's error).
    pub(super) async fn move_untouched_tx_to_primary(&mut self) -> Result<(), SessionError> {
        let (Some(begin), Some(standby)) = (self.untouched_tx_begin.take(), self.route.tx_node)
        else {
            return Ok(());
        };
        let Some(primary) = self.ctx.cluster.snapshot().primary else {
            return Ok(());
        };
        let limit = self.cfg.timeouts.reset;
        if let Some(link) = self.links[standby.index()].as_mut() {
            let rollback = client_view::query_message(b"ROLLBACK");
            link.conn.exchange_discarding(&rollback, 1, limit).await?;
            link.unnamed = Unnamed::Absent;
        }
        self.prepare_node(primary, Needs::none()).await?;
        let link = self.link_mut(primary)?;
        let errors = link.conn.exchange_discarding(&begin, 1, limit).await?;
        link.unnamed = Unnamed::Absent;
        if let Some(e) = errors.first() {
            // The client believes it is in a transaction that now exists nowhere.
            tracing::warn!(error = %e.message, "BEGIN failed on the primary");
            return Err(SessionError::BackendLost { node: primary });
        }
        tracing::debug!(
            %standby,
            %primary,
            "read-only transaction moved to the primary for SET TRANSACTION"
        );
        self.route.tx_node = Some(primary);
        self.set_active(primary);
        Ok(())
    }

    /// Read the session's transaction defaults on its primary connection: a
    /// serializable default keeps the session on the primary (a hot standby cannot
    /// run serializable transactions), a read-only default makes its transactions
    /// read-only (standby). Startup options and `ALTER ROLE/DATABASE … SET` set
    /// these without any statement pgpilot could see.
    pub(super) async fn probe_defaults(&mut self) -> Result<(), SessionError> {
        let primary = self.ctx.cluster.snapshot().primary;
        if let Some(p) = primary
            && self.links[p.index()].is_none()
        {
            // Transaction pooling gave it back between transactions.
            self.prepare_node(p, Needs::none()).await?;
        }
        self.defaults_probed = true;
        let Some(link) = primary.and_then(|p| self.links[p.index()].as_mut()) else {
            return Ok(());
        };
        let sql = "SELECT current_setting('default_transaction_isolation'), \
                   current_setting('default_transaction_read_only')";
        let row = link.conn.query_row(sql, self.cfg.timeouts.reset).await;
        // A simple Query: the server's unnamed statement is gone.
        link.unnamed = Unnamed::Absent;
        match row {
            Ok(row) => {
                let value = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
                if value(0) == "serializable" {
                    self.route.sticky_primary = true;
                }
                if value(1) == "on" {
                    self.route.read_only_default = true;
                }
                Ok(())
            }
            Err(e) if e.is_connection_failure() => Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "reading transaction defaults failed; staying on the primary");
                self.route.sticky_primary = true;
                Ok(())
            }
        }
    }

    /// Hold `link` as the session's connection to `node` (or drop it), and say so
    /// in the session registry (SHOW POOL_POOLS).
    pub(super) fn install_link(&mut self, node: NodeId, mut link: Option<Link>) {
        if let Some(l) = &mut link {
            l.reads.forget();
        }
        match &link {
            Some(l) => self
                .registration
                .hold(node, l.conn.cancel_key.pid, l.conn.opened_ms),
            None => self.registration.release(node),
        }
        let serving = link.is_some() && node == self.active;
        self.links[node.index()] = link;
        if serving {
            // A new connection for the active node (transaction pooling took
            // the last one back): cancels go to it from now on.
            self.serving_now(node);
        }
    }

    /// Leave standby `node` alone for `pause`: reads go to another node.
    /// `report`: the failure was connection-level (the cluster probes the node).
    pub(super) fn shun(&mut self, node: NodeId, pause: std::time::Duration, report: bool) {
        // Allocated at the first shun: most sessions never shun a node.
        if self.shunned_until.is_empty() {
            self.shunned_until = vec![None; self.links.len()];
        }
        self.shunned_until[node.index()] = Some(tokio::time::Instant::now() + pause);
        if self.route.standby == Some(node) {
            self.route.standby = None;
        }
        self.install_link(node, None);
        if report {
            self.ctx.cluster.report_session_error(node);
        }
    }

    /// Whether this session currently avoids node `node`.
    pub(super) fn shunned(&self, node: NodeId) -> bool {
        self.shunned_until
            .get(node.index())
            .copied()
            .flatten()
            .is_some_and(|t| tokio::time::Instant::now() < t)
    }
}
