//! Admin logins while no primary can be reached (a failover in progress, a
//! primary down or refusing connections): an admin user logs in at once, with
//! no server connection, so `SHOW POOL_NODES` and the other admin commands
//! answer exactly when an operator needs them. The session takes a server
//! connection at its first request that needs one, waiting for a primary as
//! any session does.
//!
//! Without a server, the login's ParameterStatus messages come from the last
//! primary connection pgpilot opened (its server-wide values), overridden by
//! what the client's startup packet asked for (`context::server_params`).

use super::Session;
use crate::backend::BackendError;

impl Session {
    /// Open the primary connection at login. An admin user who cannot have
    /// one now (no primary, a failover in progress, the primary unreachable)
    /// logs in without it instead of waiting: `Ok(false)`.
    pub(super) async fn attach_at_login(&mut self) -> Result<bool, BackendError> {
        if !self.cfg.is_admin(&self.user) {
            return self.connect_primary().await.map(|()| true);
        }
        let cluster = &self.ctx.cluster;
        let primary = cluster.snapshot().primary;
        let Some(node) = primary.filter(|_| !cluster.failover_in_progress()) else {
            self.no_primary_login = true;
            return Ok(false);
        };
        match self.open_link(node).await {
            Ok(link) => {
                self.install_link(node, Some(link));
                self.set_active(node);
                Ok(true)
            }
            Err(e) if e.is_connection_failure() => {
                tracing::info!(user = %self.user, %node, error = %e, "admin login without a primary connection");
                // An early health probe decides whether the primary is down.
                self.ctx.cluster.report_session_error(node);
                self.no_primary_login = true;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
