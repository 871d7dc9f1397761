//! Choosing the standby to promote, and promoting it by `failover.mode`.
//!
//! The candidate is the in-service standby with the highest WAL position —
//! `max(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())`, asked fresh at
//! failover time, not taken from the last replication check — ties going to
//! the lowest node id; nodes with `no_failover = true` and held nodes are
//! never candidates. Every standby receives a prefix of the same WAL, so the
//! most advanced one holds every commit any standby acknowledged: with
//! synchronous replication, every acknowledged commit. `pg_promote` replays
//! everything received before it ends recovery.
//!
//! With `failover.max_lag_bytes` set, the candidate must be within that many
//! bytes of the failed primary's last known position (Patroni's
//! `maximum_lag_on_failover`), or the failover waits and says why.
//!
//! Promotion, by mode:
//! * `pg_promote`: `SELECT pg_promote(wait => true, wait_seconds => N)` as
//!   the `[monitor]` role, which needs superuser or `GRANT EXECUTE ON
//!   FUNCTION pg_promote(boolean, integer) TO <monitor role>`;
//! * `trigger_file`: create the candidate's `backends[].trigger_file`
//!   (PostgreSQL ≤ 15 `promote_trigger_file`, checked by the startup
//!   process every few seconds; pgpilot must share the node's file system);
//! * `command`: `failover.command` with pgpool's placeholders (`%d` the old
//!   primary, `%m`/`%H`/`%R` the candidate).

use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use super::Cluster;
use super::health::describe;
use super::hooks::{self, HookNodes};
use super::monitor_conn::MonitorConn;
use super::replication::{format_lsn, parse_lsn};
use crate::config::{Config, FailoverMode};

/// Where one standby stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Node id.
    pub node: usize,
    /// `max(receive, replay)`: what it will have replayed once promoted.
    pub lsn: u64,
    /// `pg_last_wal_replay_lsn()`.
    pub replay: u64,
}

/// Run one simple query on `node` as the monitor role (new connection,
/// closed after), within `limit`; returns the rows' text columns.
pub(super) async fn monitor_query(
    cfg: &Config,
    node: usize,
    sql: &str,
    limit: Duration,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let backend = cfg
        .backends
        .get(node)
        .ok_or_else(|| format!("no node {node}"))?;
    let work = async {
        let conn = MonitorConn::open(backend, &cfg.monitor, "pgpilot-failover")
            .await
            .map_err(|e| describe(&e))?;
        let msgs = conn
            .client()
            .simple_query(sql)
            .await
            .map_err(|e| describe(&e));
        conn.close().await;
        let rows = msgs?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect();
        Ok(rows)
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("node {node}: no answer within {limit:?}")))
}

/// The position of standby `node`, asked now; an error if it is not in
/// recovery or does not answer.
pub async fn position(cfg: &Config, node: usize, limit: Duration) -> Result<Position, String> {
    let sql = "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()";
    let rows = monitor_query(cfg, node, sql, limit).await?;
    let row = rows.first().ok_or("no row")?;
    if row.first().cloned().flatten().as_deref() != Some("t") {
        return Err(format!("node {node} is not in recovery"));
    }
    let lsn = |i: usize| row.get(i).cloned().flatten().as_deref().and_then(parse_lsn);
    let replay = lsn(2).unwrap_or(0);
    Ok(Position {
        node,
        lsn: lsn(1).unwrap_or(0).max(replay),
        replay,
    })
}

/// The standby to promote in place of `old` (see the module docs), or why
/// there is none.
pub async fn choose_candidate(
    cluster: &Cluster,
    cfg: &Config,
    old: Option<usize>,
) -> Result<Position, String> {
    let snap = cluster.snapshot();
    let eligible: Vec<usize> = snap
        .nodes
        .iter()
        .filter(|n| {
            Some(n.id) != old
                && n.status.is_usable()
                && n.role == super::Role::Standby
                && !cfg.backends.get(n.id).is_some_and(|b| b.no_failover)
                && !cluster.is_held(n.id)
        })
        .map(|n| n.id)
        .collect();
    if eligible.is_empty() {
        return Err(
            "no candidate: no standby is in service (candidates must be up, not no_failover, not detached)"
                .into(),
        );
    }
    let limit = cfg.health_check.timeout;
    let asks: Vec<_> = eligible
        .iter()
        .map(|&n| {
            let cfg = cfg.clone();
            tokio::spawn(async move { position(&cfg, n, limit).await })
        })
        .collect();
    let mut best: Option<Position> = None;
    let mut errors = Vec::new();
    for (n, ask) in eligible.iter().zip(asks) {
        match ask.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(p) => {
                tracing::info!(node = n, lsn = %format_lsn(p.lsn), "failover candidate position");
                // Highest LSN; on a tie the lower id (asked in id order).
                if best.is_none_or(|b| p.lsn > b.lsn) {
                    best = Some(p);
                }
            }
            Err(e) => errors.push(format!("node {n}: {e}")),
        }
    }
    let best = best.ok_or_else(|| format!("no candidate answered: {}", errors.join("; ")))?;
    let max_lag = cfg.failover.max_lag_bytes;
    if max_lag > 0
        && let Some(reference) = old.and_then(|o| cluster.last_primary_lsn(o))
    {
        let behind = reference.saturating_sub(best.lsn);
        if behind > max_lag {
            return Err(format!(
                "refused: the most advanced standby, node {}, is at {}, {behind} bytes behind the failed primary's last known position {} (failover.max_lag_bytes = {max_lag}); waiting (PROMOTE NODE {} forces it)",
                best.node,
                format_lsn(best.lsn),
                format_lsn(reference),
                best.node
            ));
        }
    }
    Ok(best)
}

/// Promote `candidate` by `failover.mode`. `old` is the primary it
/// replaces (for the command's placeholders).
pub async fn promote(cfg: &Config, candidate: usize, old: Option<usize>) -> Result<String, String> {
    let f = &cfg.failover;
    match f.mode {
        FailoverMode::PgPromote => {
            let secs = f.promote_timeout.as_secs().clamp(1, i32::MAX as u64);
            let sql = format!("SELECT pg_promote(wait => true, wait_seconds => {secs})");
            let limit = f.promote_timeout + Duration::from_secs(5);
            let rows = monitor_query(cfg, candidate, &sql, limit).await?;
            match rows
                .first()
                .and_then(|r| r.first())
                .cloned()
                .flatten()
                .as_deref()
            {
                Some("t") => Ok(format!("node {candidate} promoted (pg_promote)")),
                other => Err(format!(
                    "pg_promote on node {candidate} returned {other:?}: not promoted within {secs}s"
                )),
            }
        }
        FailoverMode::TriggerFile => {
            let path = cfg
                .backends
                .get(candidate)
                .and_then(|b| b.trigger_path())
                .ok_or_else(|| format!("backends[{candidate}].trigger_file is not set"))?;
            let p = path.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            Ok(format!("created trigger file {}", path.display()))
        }
        FailoverMode::Command => {
            let nodes = HookNodes {
                failed: old,
                new_primary: Some(candidate),
                old_primary: old,
            };
            let line = hooks::expand(&f.command, cfg, nodes);
            hooks::run("failover_command", &line, f.promote_timeout).await
        }
        FailoverMode::None => Err("failover.mode = \"none\": pgpilot promotes nothing".into()),
    }
}
