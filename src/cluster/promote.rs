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

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use super::Cluster;
use super::error::NodeQueryError;
use super::hooks::{self, HookError, HookNodes};
use super::monitor_conn::MonitorConn;
use super::replication::{format_lsn, parse_lsn};
use crate::config::{Config, FailoverMode, NodeId};

/// Why a standby cannot be promoted, or its promotion failed. The texts
/// become a failover's detail (`SHOW PGPILOT_FAILOVER`) and log lines.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PromoteError {
    /// Asking the node failed.
    #[error(transparent)]
    Query(#[from] NodeQueryError),
    /// The node is not a standby (any more).
    #[error("node {node} is not in recovery")]
    NotInRecovery {
        /// The node.
        node: NodeId,
    },
    /// A task asking one candidate panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    /// No standby is eligible at all.
    #[error(
        "no candidate: no standby is in service (candidates must be up, not no_failover, not detached)"
    )]
    NoStandby,
    /// Every eligible standby failed to say where it stands.
    #[error("no candidate answered: {}", join_errors(.errors))]
    NoneAnswered {
        /// Each standby asked, with its error.
        errors: Vec<(NodeId, PromoteError)>,
    },
    /// `failover.max_lag_bytes` refuses the most advanced standby.
    #[error(
        "refused: the most advanced standby, node {node}, is at {}, {behind} bytes behind the failed primary's last known position {} (failover.max_lag_bytes = {max_lag}); waiting (PROMOTE NODE {node} forces it)",
        format_lsn(*.lsn),
        format_lsn(*.reference)
    )]
    TooFarBehind {
        /// The best standby.
        node: NodeId,
        /// Its position.
        lsn: u64,
        /// The failed primary's last known position.
        reference: u64,
        /// `reference - lsn`.
        behind: u64,
        /// `failover.max_lag_bytes`.
        max_lag: u64,
    },
    /// `pg_promote` answered, but not `true`.
    #[error("pg_promote on node {node} returned {answer:?}: not promoted within {secs}s")]
    NotPromoted {
        /// The candidate.
        node: NodeId,
        /// Its answer (`None`: no row or NULL).
        answer: Option<String>,
        /// The `wait_seconds` given.
        secs: u64,
    },
    /// `failover.mode = "trigger_file"` without the node's file configured.
    #[error("backends[{node}].trigger_file is not set")]
    NoTriggerFile {
        /// The candidate.
        node: NodeId,
    },
    /// The trigger file could not be created.
    #[error("cannot create {}: {source}", .path.display())]
    TriggerFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `failover.command` failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// `failover.mode = "none"` or `"patroni"`.
    #[error("failover.mode = \"none\" or \"patroni\": pgpilot promotes nothing")]
    Disabled,
}

fn join_errors(errors: &[(NodeId, PromoteError)]) -> String {
    errors
        .iter()
        .map(|(n, e)| format!("node {n}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Where one standby stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// Node id.
    pub(crate) node: NodeId,
    /// `max(receive, replay)`: what it will have replayed once promoted.
    pub(crate) lsn: u64,
    /// `pg_last_wal_replay_lsn()`.
    pub(crate) replay: u64,
}

/// Run one simple query on `node` as the monitor role (new connection,
/// closed after), within `limit`; returns the rows' text columns.
pub(super) async fn monitor_query(
    cfg: &Config,
    node: NodeId,
    sql: &str,
    limit: Duration,
) -> Result<Vec<Vec<Option<String>>>, NodeQueryError> {
    let backend = cfg
        .backends
        .get(node.index())
        .ok_or(NodeQueryError::NoSuchNode { node })?;
    let work = async {
        let conn = MonitorConn::open(backend, &cfg.monitor, "pgpilot-failover")
            .await
            .map_err(|source| NodeQueryError::Connect { node, source })?;
        let msgs = conn
            .client()
            .simple_query(sql)
            .await
            .map_err(|source| NodeQueryError::Query { node, source });
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
        .unwrap_or(Err(NodeQueryError::Timeout { node, limit }))
}

/// The position of standby `node`, asked now; an error if it is not in
/// recovery or does not answer.
pub(crate) async fn position(
    cfg: &Config,
    node: NodeId,
    limit: Duration,
) -> Result<Position, PromoteError> {
    let sql = "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()";
    let rows = monitor_query(cfg, node, sql, limit).await?;
    let row = rows.first().ok_or(NodeQueryError::NoRow { node })?;
    if row.first().cloned().flatten().as_deref() != Some("t") {
        return Err(PromoteError::NotInRecovery { node });
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
pub(crate) async fn choose_candidate(
    cluster: &Cluster,
    cfg: &Config,
    old: Option<NodeId>,
) -> Result<Position, PromoteError> {
    let snap = cluster.snapshot();
    let eligible: Vec<NodeId> = snap
        .nodes
        .iter()
        .filter(|n| {
            Some(n.id) != old
                && n.status.is_usable()
                && n.role == super::Role::Standby
                && !cfg
                    .backends
                    .get(n.id.index())
                    .is_some_and(|b| b.no_failover)
                && !cluster.is_held(n.id)
        })
        .map(|n| n.id)
        .collect();
    if eligible.is_empty() {
        return Err(PromoteError::NoStandby);
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
        match ask.await.unwrap_or_else(|e| Err(e.into())) {
            Ok(p) => {
                tracing::info!(node = %n, lsn = %format_lsn(p.lsn), "failover candidate position");
                // Highest LSN; on a tie the lower id (asked in id order).
                if best.is_none_or(|b| p.lsn > b.lsn) {
                    best = Some(p);
                }
            }
            Err(e) => errors.push((*n, e)),
        }
    }
    let best = best.ok_or(PromoteError::NoneAnswered { errors })?;
    let max_lag = cfg.failover.max_lag_bytes;
    if max_lag > 0
        && let Some(reference) = old.and_then(|o| cluster.last_primary_lsn(o))
    {
        let behind = reference.saturating_sub(best.lsn);
        if behind > max_lag {
            return Err(PromoteError::TooFarBehind {
                node: best.node,
                lsn: best.lsn,
                reference,
                behind,
                max_lag,
            });
        }
    }
    Ok(best)
}

/// Promote `candidate` by `failover.mode`. `old` is the primary it
/// replaces (for the command's placeholders).
pub(crate) async fn promote(
    cfg: &Config,
    candidate: NodeId,
    old: Option<NodeId>,
) -> Result<String, PromoteError> {
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
                other => Err(PromoteError::NotPromoted {
                    node: candidate,
                    answer: other.map(str::to_string),
                    secs,
                }),
            }
        }
        FailoverMode::TriggerFile => {
            let path = cfg
                .backends
                .get(candidate.index())
                .and_then(|b| b.trigger_path())
                .ok_or(PromoteError::NoTriggerFile { node: candidate })?;
            let p = path.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)
            })
            .await?
            .map_err(|source| PromoteError::TriggerFile {
                path: path.clone(),
                source,
            })?;
            Ok(format!("created trigger file {}", path.display()))
        }
        FailoverMode::Command => {
            let nodes = HookNodes {
                failed: old,
                new_primary: Some(candidate),
                old_primary: old,
            };
            let line = hooks::expand(&f.command, cfg, nodes);
            let env = hooks::tls_env(cfg);
            Ok(hooks::run("failover_command", &line, f.promote_timeout, &env).await?)
        }
        // Patroni mode never gets here (nothing decides); refused anyway.
        FailoverMode::None | FailoverMode::Patroni => Err(PromoteError::Disabled),
    }
}
