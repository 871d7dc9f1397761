//! `failover.promote_at_start`: pgpilot starts, finds no primary, but
//! standbys that were streaming from one (the primary died while pgpilot
//! was down, or both went down and only the standbys came back).
//!
//! By default nothing is promoted, as before: pgpilot cannot tell a dead
//! primary from one still booting or cut off from it alone. With
//! `promote_at_start = true`, once `search_primary_timeout` has passed since
//! start with no primary ever seen, and no node claims to be one (a fenced
//! or false primary is left to an operator), and at least one in-service
//! standby shows it received WAL by streaming (`pg_last_wal_receive_lsn()`
//! is set), a failover that replaces nobody starts: the coordinator
//! promotes the most advanced standby as in any failover
//! ([`super::promote::choose_candidate`]) and the other standbys follow it.
//! This is checked once a second until a primary is seen or the failover
//! starts; it never runs again after that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::promote::monitor_query;
use super::{Cluster, PgStatus, Role};
use crate::config::{Config, FailoverMode, NodeId};

/// How often the start-up situation is looked at.
const PERIOD: Duration = Duration::from_secs(1);

/// Watch the start (see the module docs) until a primary is seen, the
/// failover started, or shutdown.
pub(crate) async fn promote_at_start(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = shutdown.changed() => return,
        }
        let cfg = config.load_full();
        let snap = cluster.snapshot();
        let report = cluster.failover_report();
        if snap.primary.is_some() || report.current.is_some() || report.last.is_some() {
            return;
        }
        let f = &cfg.failover;
        if !f.promote_at_start
            || matches!(f.mode, FailoverMode::None | FailoverMode::Patroni)
            || started.elapsed() < f.search_primary_timeout
        {
            continue;
        }
        if snap
            .nodes
            .iter()
            .any(|n| n.pg_status == PgStatus::Up && n.role == Role::Primary)
        {
            continue;
        }
        let standbys: Vec<NodeId> = snap
            .nodes
            .iter()
            .filter(|n| n.role == Role::Standby && n.status.is_usable())
            .map(|n| n.id)
            .collect();
        let mut streamed = Vec::new();
        for &n in &standbys {
            let sql = "SELECT pg_last_wal_receive_lsn() IS NOT NULL";
            if let Ok(rows) = monitor_query(&cfg, n, sql, cfg.health_check.timeout).await
                && rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .as_deref()
                    == Some("t")
            {
                streamed.push(n);
            }
        }
        if streamed.is_empty() {
            continue;
        }
        let reason = format!(
            "no primary since start ({:?}, failover.search_primary_timeout) while standbys {streamed:?} were streaming from one; failover.promote_at_start promotes the most advanced",
            started.elapsed()
        );
        if cluster.failover_at_start(reason) {
            return;
        }
    }
}
