//! Replication checks (pgpool's `sr_check`): one task, one round per
//! `sr_check.period`, every reachable node asked concurrently, each within
//! `sr_check.timeout`.
//!
//! Every node gets the same round trip, two prepared statements pipelined:
//! `pg_is_in_recovery()`, `pg_current_wal_lsn()` (primary) or
//! `pg_last_wal_receive_lsn()` / `pg_last_wal_replay_lsn()` /
//! `pg_last_xact_replay_timestamp()` / `pg_is_wal_replay_paused()` (standby),
//! the timeline, the WAL receiver's state; then `pg_stat_replication` (only the
//! chosen primary's rows are used). Connections are kept between rounds (one
//! per node, reopened after any error or timeout) with both statements
//! prepared once, so a round costs a node no parsing or planning.
//!
//! Lag for a standby:
//! * bytes: primary LSN − standby replay LSN (clamped at 0);
//! * seconds: 0 when the byte lag is 0; otherwise the larger of
//!   `pg_stat_replication.replay_lag` (matched by application name) and the
//!   age of the oldest primary LSN sample, kept by pgpilot each round, that the
//!   standby has not replayed yet. The second estimate keeps growing while
//!   replay is paused or the WAL receiver is stuck (replay_lag then freezes at
//!   its last value), and unlike `now() − pg_last_xact_replay_timestamp()` it
//!   does not report an idle primary as lag. Its resolution is one period.
//!
//! The monitor role needs `pg_monitor` (or superuser) to see
//! `pg_stat_replication` and `pg_stat_wal_receiver` in full.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::health::describe;
use super::monitor_conn::MonitorConn;
use super::state_machine::Admission;
use super::{Cluster, PgStatus};
use crate::config::{Backend, Config};
pub(crate) use crate::protocol::lsn::format_lsn;
pub use crate::protocol::lsn::parse_lsn;

/// A node's own state; every column as text (so one parser reads them).
/// One scan of `pg_stat_wal_receiver`, joined to a single row.
const NODE_QUERY: &str = "\
SELECT pg_is_in_recovery()::text, \
 (CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END)::text, \
 pg_last_wal_receive_lsn()::text, \
 pg_last_wal_replay_lsn()::text, \
 extract(epoch FROM pg_last_xact_replay_timestamp())::text, \
 (CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END)::text, \
 CASE WHEN pg_is_in_recovery() THEN r.received_tli::text \
      ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
 r.status::text, r.sender_host::text, r.sender_port::text, r.conninfo::text, \
 current_setting('cluster_name') \
 FROM (SELECT) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true";

/// The node's walsenders (only the chosen primary's rows are used).
const REPLICATION_QUERY: &str = "\
SELECT application_name::text, state::text, sync_state::text, \
 extract(epoch FROM replay_lag)::text FROM pg_stat_replication";

/// What one node answered in a round.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct NodeSample {
    /// `pg_is_in_recovery()`.
    pub(crate) in_recovery: bool,
    /// Primary: `pg_current_wal_lsn()`.
    pub(crate) current_lsn: Option<u64>,
    /// Standby: `pg_last_wal_receive_lsn()`.
    pub(crate) receive_lsn: Option<u64>,
    /// Standby: `pg_last_wal_replay_lsn()`.
    pub(crate) replay_lsn: Option<u64>,
    /// Standby: `pg_last_xact_replay_timestamp()`.
    pub(crate) last_replay_at: Option<SystemTime>,
    /// Standby: `pg_is_wal_replay_paused()`.
    pub(crate) replay_paused: Option<bool>,
    /// Primary: current timeline; standby: the WAL receiver's received timeline.
    pub(crate) timeline: Option<u32>,
    /// Standby: `pg_stat_wal_receiver.status` (`streaming` …).
    pub(crate) receiver_status: Option<String>,
    /// Standby: where the WAL receiver is connected (`sender_host`, `sender_port`).
    pub(crate) sender: Option<(String, u16)>,
    /// Standby: the application name its WAL receiver reports to the primary
    /// (`application_name` in its conninfo, else `cluster_name`).
    pub(crate) receiver_application_name: Option<String>,
    /// `pg_stat_replication` rows (meaningful on the primary).
    pub(crate) replication: Vec<ReplicationRow>,
}

/// One row of the primary's `pg_stat_replication`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ReplicationRow {
    /// `application_name`.
    pub(crate) application_name: String,
    /// `state`.
    pub(crate) state: String,
    /// `sync_state`.
    pub(crate) sync_state: String,
    /// `replay_lag` in seconds (NULL when caught up and idle).
    pub(crate) replay_lag: Option<f64>,
}

/// Why asking one node failed. Its text becomes the node's replication
/// `issue` in `SHOW PGPILOT_NODES`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SrCheckError {
    /// Connecting, or preparing the queries, failed.
    #[error("{}", describe(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// The queries failed.
    #[error("{}", describe(.0))]
    Query(#[source] tokio_postgres::Error),
    /// The node query returned no row.
    #[error("replication check returned no row")]
    NoRow,
    /// `pg_is_in_recovery()` was neither true nor false.
    #[error("unexpected pg_is_in_recovery() value {value:?}")]
    Recovery {
        /// What came back.
        value: Option<String>,
    },
    /// No answer within `sr_check.timeout`.
    #[error("no answer within {limit:?}")]
    Timeout {
        /// `sr_check.timeout`.
        limit: Duration,
    },
    /// The check's task panicked or was cancelled.
    #[error("check task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The result of asking one node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NodeCheck {
    /// Not asked: the latest health check could not reach it.
    Skipped,
    /// Asked; the query or connection failed (the [`SrCheckError`]'s text:
    /// a check result is plain data, kept in the state and compared).
    Failed(String),
    /// Answered.
    Sample(NodeSample),
}

/// A whole round, indexed by node id.
#[derive(Debug, Clone)]
pub(crate) struct SrRound {
    /// When the round's answers were collected.
    pub(crate) at: Instant,
    /// Per node.
    pub(crate) checks: Vec<NodeCheck>,
}

impl Cluster {
    /// Apply a round: lag, weights, auto_failback; probe nodes whose role
    /// looks different from what pgpilot believes.
    fn record_replication(&self, round: SrRound, config: &Config) {
        let adm = Admission::from(config);
        let mut recheck = Vec::new();
        self.update(|o| recheck = o.apply_replication(&round, adm, SystemTime::now()));
        for node in recheck {
            self.request_probe(node);
        }
    }

    /// Replication checks are off: forget lag, use configured weights.
    fn clear_replication(&self, config: &Config) {
        let adm = Admission::from(config);
        self.update(|o| o.clear_replication(adm));
    }
}

/// A kept connection with both queries prepared on it: a round then costs
/// the node no parsing or planning (planning the `pg_stat_replication` view
/// costs more than running it).
struct SrConn {
    conn: MonitorConn,
    node: tokio_postgres::Statement,
    replication: tokio_postgres::Statement,
}

impl SrConn {
    async fn open(backend: &Backend, cfg: &Config) -> Result<SrConn, tokio_postgres::Error> {
        let conn = MonitorConn::open(backend, &cfg.monitor, "pgpilot-sr-check").await?;
        let (node, replication) = tokio::try_join!(
            conn.client().prepare(NODE_QUERY),
            conn.client().prepare(REPLICATION_QUERY)
        )?;
        Ok(SrConn {
            conn,
            node,
            replication,
        })
    }
}

/// Ask one node, reusing `conn` when it is there; returns the connection to
/// keep (none after a failure) and the result.
async fn check_node(
    conn: Option<SrConn>,
    backend: Backend,
    cfg: Arc<Config>,
) -> (Option<SrConn>, NodeCheck) {
    let work = async {
        let conn = match conn {
            Some(c) if c.conn.serves(&backend) => c,
            _ => SrConn::open(&backend, &cfg)
                .await
                .map_err(SrCheckError::Connect)?,
        };
        // Both in one pipelined round trip.
        let client = conn.conn.client();
        let (node, replication) = tokio::try_join!(
            client.query(&conn.node, &[]),
            client.query(&conn.replication, &[])
        )
        .map_err(SrCheckError::Query)?;
        let first = node.first().ok_or(SrCheckError::NoRow)?;
        let mut sample = parse_node_row(first)?;
        sample.replication = replication.iter().map(parse_replication_row).collect();
        Ok::<_, SrCheckError>((conn, sample))
    };
    let limit = cfg.sr_check.timeout;
    match tokio::time::timeout(limit, work).await {
        Ok(Ok((conn, sample))) => (Some(conn), NodeCheck::Sample(sample)),
        Ok(Err(e)) => (None, NodeCheck::Failed(e.to_string())),
        Err(_) => (
            None,
            NodeCheck::Failed(SrCheckError::Timeout { limit }.to_string()),
        ),
    }
}

/// Run replication checks until shutdown.
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns: Vec<Option<SrConn>> = Vec::new();
    let mut was_off = false;
    loop {
        let cfg = config.load_full();
        let period = cfg.sr_check.period;
        let started = tokio::time::Instant::now();
        if period.is_zero() {
            if !was_off {
                tracing::info!("replication checks are off (sr_check.period = 0)");
                conns.clear();
                cluster.clear_replication(&cfg);
                was_off = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        was_off = false;
        conns.resize_with(cfg.backends.len(), || None);
        let snap = cluster.snapshot();
        let mut tasks = Vec::with_capacity(cfg.backends.len());
        for (node, backend) in cfg.backends.iter().enumerate() {
            let reachable = snap
                .nodes
                .get(node)
                .is_some_and(|n| n.pg_status == PgStatus::Up);
            if !reachable {
                conns[node] = None;
                tasks.push(None);
                continue;
            }
            let conn = conns[node].take();
            tasks.push(Some(tokio::spawn(check_node(
                conn,
                backend.clone(),
                cfg.clone(),
            ))));
        }
        let mut checks = Vec::with_capacity(tasks.len());
        for (node, t) in tasks.into_iter().enumerate() {
            let check = match t {
                None => NodeCheck::Skipped,
                Some(t) => match t.await {
                    Ok((conn, check)) => {
                        conns[node] = conn;
                        check
                    }
                    Err(e) => NodeCheck::Failed(SrCheckError::Task(e).to_string()),
                },
            };
            if let NodeCheck::Failed(e) = &check {
                tracing::debug!(node, error = %e, "replication check failed");
            }
            checks.push(check);
        }
        cluster.record_replication(
            SrRound {
                at: Instant::now(),
                checks,
            },
            &cfg,
        );
        tokio::select! {
            _ = tokio::time::sleep_until(started + period) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Column `i` of a row of text columns.
fn text(r: &tokio_postgres::Row, i: usize) -> Option<&str> {
    r.try_get(i).ok().flatten()
}

/// A boolean cast to text.
fn truth(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A [`NODE_QUERY`] row, column by column.
fn parse_node_row(r: &tokio_postgres::Row) -> Result<NodeSample, SrCheckError> {
    let col = |i| text(r, i);
    let in_recovery = match col(0).and_then(truth) {
        Some(v) => v,
        None => {
            return Err(SrCheckError::Recovery {
                value: col(0).map(str::to_string),
            });
        }
    };
    let timeline = col(6).and_then(|t| {
        if in_recovery {
            t.parse().ok()
        } else {
            walfile_timeline(t)
        }
    });
    let sender = match (col(8), col(9).and_then(|p| p.parse().ok())) {
        (Some(h), Some(p)) => Some((h.to_string(), p)),
        _ => None,
    };
    let receiver_application_name = col(10)
        .and_then(conninfo_application_name)
        .or_else(|| col(11).filter(|c| !c.is_empty()).map(str::to_string));
    Ok(NodeSample {
        in_recovery,
        current_lsn: col(1).and_then(parse_lsn),
        receive_lsn: col(2).and_then(parse_lsn),
        replay_lsn: col(3).and_then(parse_lsn),
        last_replay_at: col(4)
            .and_then(|e| e.parse::<f64>().ok())
            .filter(|e| e.is_finite() && *e >= 0.0)
            .map(|e| UNIX_EPOCH + Duration::from_secs_f64(e)),
        replay_paused: col(5).and_then(truth),
        timeline,
        receiver_status: col(7).map(str::to_string),
        sender,
        receiver_application_name: in_recovery.then_some(receiver_application_name).flatten(),
        replication: Vec::new(),
    })
}

/// A [`REPLICATION_QUERY`] row, column by column.
fn parse_replication_row(r: &tokio_postgres::Row) -> ReplicationRow {
    let col = |i| text(r, i);
    ReplicationRow {
        application_name: col(0).unwrap_or_default().to_string(),
        state: col(1).unwrap_or_default().to_string(),
        sync_state: col(2).unwrap_or_default().to_string(),
        replay_lag: col(3).and_then(|v| v.parse().ok()),
    }
}

/// The timeline of a WAL file name (its first 8 hex digits).
fn walfile_timeline(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// The value of `key` in a libpq conninfo string as shown in
/// `pg_stat_wal_receiver.conninfo` (values may be quoted).
fn conninfo_value(conninfo: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut from = 0;
    let start = loop {
        let at = from + conninfo[from..].find(&pat)?;
        let at_word = at == 0 || conninfo[..at].ends_with(char::is_whitespace);
        if at_word {
            break at + pat.len();
        }
        from = at + pat.len();
    };
    let rest = &conninfo[start..];
    let value = if let Some(q) = rest.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = q.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '\'' => break,
                c => out.push(c),
            }
        }
        out
    } else {
        rest.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    (!value.is_empty()).then_some(value)
}

/// The name a WAL receiver reports to the primary: `application_name`, else
/// the `fallback_application_name` PostgreSQL set (its `cluster_name`).
fn conninfo_application_name(conninfo: &str) -> Option<String> {
    conninfo_value(conninfo, "application_name")
        .or_else(|| conninfo_value(conninfo, "fallback_application_name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_and_application_name_are_extracted() {
        assert_eq!(walfile_timeline("000000020000000000000003"), Some(2));
        assert_eq!(walfile_timeline("0000"), None);
        let ci = "user=postgres passfile=/x channel_binding=prefer dbname=replication host=127.0.0.1 port=5432 application_name=node1 fallback_application_name=walreceiver sslmode=prefer";
        assert_eq!(conninfo_application_name(ci).as_deref(), Some("node1"));
        assert_eq!(
            conninfo_application_name("host=h application_name='a b\\'c' port=1").as_deref(),
            Some("a b'c")
        );
        assert_eq!(conninfo_application_name("host=h port=1"), None);
        assert_eq!(
            conninfo_application_name("host=h fallback_application_name=node2").as_deref(),
            Some("node2")
        );
    }
}
