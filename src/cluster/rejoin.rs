//! Rejoining a fenced old primary (or a diverged standby) as a standby of
//! the current primary: `REJOIN NODE n`, and `failover.auto_rejoin`.
//!
//! By `failover.rejoin`:
//! * `pg_rewind` (the node's `data_directory` on pgpilot's host; tools run
//!   as the directory's owner, see [`super::pgbin`]): check `wal_log_hints`
//!   or data checksums (pg_rewind needs one); check that no acknowledged
//!   write would be lost (below); stop the node if it runs (`pg_ctl stop -m
//!   fast`); create its slot on the primary when the cluster uses slots;
//!   `pg_rewind --source-server=<primary>`; put back its own configuration
//!   files (pg_rewind copies the primary's: port, paths…); write
//!   `standby.signal`, `primary_conninfo` and `primary_slot_name`; start it;
//!   wait until it streams from the primary;
//! * `command`: run `failover.rejoin_command` (pgpool's placeholders, `%d`
//!   the node, `%m %H %r %R` the primary), then wait until it streams.
//!
//! Then the node is no longer fenced: it is held as a standby that must show
//! it streams, and the usual replication evidence admits it for reads. Any
//! failure leaves it fenced (or diverged) with the reason in `SHOW
//! PGPILOT_NODES`, progress too. A rejoin runs for one node at a time per
//! node, never during a failover or switchover, never for the primary.
//!
//! `auto_rejoin`: every [`AUTO_PERIOD`], a fenced (or diverged) node that is
//! reachable again, or (pg_rewind) stopped with its data directory here, is
//! rejoined without an operator; after a failure or refusal the next try
//! waits from [`AUTO_RETRY_FIRST`], doubling up to [`AUTO_RETRY_MAX`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::error::{CommandError, NodeQueryError};
use super::events::Event;
use super::follow::{FollowError, conninfo_for, ensure_slot, wait_streaming};
use super::hooks::{self, HookError, HookNodes};
use super::pgbin::{DataDir, PgBinError};
use super::promote::monitor_query;
use super::replication::{format_lsn, parse_lsn};
use super::state_machine::HoldKind;
use super::timeline::{self, Fit, History};
use standby_conf::{restore_files, save_files, slot_name};

mod standby_conf;
use super::{Cluster, PgStatus};
use crate::config::{Config, NodeId, RejoinMode};

/// How often `auto_rejoin` looks for fenced nodes.
pub(crate) const AUTO_PERIOD: Duration = Duration::from_secs(2);
/// First pause after an automatic rejoin failed or was refused.
pub(crate) const AUTO_RETRY_FIRST: Duration = Duration::from_secs(30);
/// Longest such pause.
pub(crate) const AUTO_RETRY_MAX: Duration = Duration::from_secs(600);

/// Why a rejoin did not happen. The text follows "rejoin failed:" or
/// "rejoin refused:" in the node's `held_out`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RejoinError {
    /// Safety: the node may hold the only copy of acknowledged writes.
    #[error("{0}")]
    Unsafe(String),
    /// pg_rewind cannot work on this node (no wal_log_hints, no checksums).
    #[error(
        "pg_rewind needs wal_log_hints = on or data checksums, and node {node} has neither ({source_of_truth}); set wal_log_hints = on (takes effect at the next restart) or rebuild it with pg_basebackup"
    )]
    NoHints {
        /// The node.
        node: NodeId,
        /// Where this was read.
        source_of_truth: &'static str,
    },
    /// The directory at `data_directory` on pgpilot's host is not the node's.
    #[error("{0}")]
    OtherNode(String),
    /// The node has no `data_directory`.
    #[error(
        "backends[{node}].data_directory is not set: pg_rewind needs the node's data directory"
    )]
    NoDataDir {
        /// The node.
        node: NodeId,
    },
    /// `rejoin = "command"` and the node cannot be asked.
    #[error(
        "node {node} does not answer, so pgpilot cannot check that it holds no acknowledged write the primary lacks; start it (it stays fenced), then rejoin it"
    )]
    Unreachable {
        /// The node.
        node: NodeId,
    },
    /// An operator changed the node meanwhile (ATTACH NODE).
    #[error("node {node} is no longer fenced or diverged; rejoin abandoned")]
    Abandoned {
        /// The node.
        node: NodeId,
    },
    /// Its WAL still went past the fork after the rejoin.
    #[error(
        "node {node} streams, but its WAL on timeline {timeline} still reaches {} past the primary's fork",
        format_lsn(*.lsn)
    )]
    StillDiverged {
        /// The node.
        node: NodeId,
        /// Its timeline.
        timeline: u32,
        /// How far its WAL reaches.
        lsn: u64,
    },
    /// The primary changed meanwhile.
    #[error("the primary changed during the rejoin")]
    PrimaryChanged,
    /// A tool failed.
    #[error(transparent)]
    Tool(#[from] PgBinError),
    /// A query failed.
    #[error(transparent)]
    Query(#[from] NodeQueryError),
    /// Following (slot, streaming) failed.
    #[error(transparent)]
    Follow(#[from] FollowError),
    /// `rejoin_command` failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// Reading or writing the node's configuration files failed.
    #[error("{what}: {source}")]
    Files {
        /// Which file and step.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl RejoinError {
    /// A refusal (the node is not touched), not a failure on the way.
    fn refused(&self) -> bool {
        matches!(
            self,
            RejoinError::Unsafe(_)
                | RejoinError::NoHints { .. }
                | RejoinError::NoDataDir { .. }
                | RejoinError::OtherNode(_)
                | RejoinError::Unreachable { .. }
        )
    }
}

/// `REJOIN NODE n`: check it may start, then run it in the background.
pub(crate) fn start(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    node: NodeId,
) -> Result<String, CommandError> {
    let cfg = config.load_full();
    let kind = startable(&cluster, &cfg, node)?;
    claim(&cluster, node)?;
    let mode = cfg.failover.rejoin;
    tokio::spawn(run(cluster, cfg, node, kind));
    Ok(format!(
        "rejoin of node {node} started ({}); SHOW PGPILOT_NODES shows its progress",
        mode.as_str()
    ))
}

/// The node's hold when a rejoin may start now, or why not.
fn startable(cluster: &Cluster, cfg: &Config, node: NodeId) -> Result<HoldKind, CommandError> {
    if node.index() >= cfg.backends.len() {
        return Err(CommandError::NoSuchNode { node });
    }
    if cfg.failover.rejoin == RejoinMode::Off {
        return Err(CommandError::RejoinOff { node });
    }
    if cluster.patroni().is_some() {
        return Err(CommandError::Patroni {
            message: "Patroni rejoins its own members (pg_rewind, reinit); pgpilot rejoins nothing in Patroni mode".into(),
        });
    }
    if !cluster.may_decide() {
        return Err(CommandError::Coordination {
            message: "REJOIN NODE runs on the leading pgpilot (SHOW PGPILOT_PEERS names it)".into(),
        });
    }
    if let Some(t) = cluster.failover_report().current {
        return Err(CommandError::Busy { kind: t.kind });
    }
    if cluster.snapshot().primary.is_none() {
        return Err(CommandError::NoPrimary);
    }
    match cluster.holds().get(node.index()).copied().flatten() {
        Some(k @ (HoldKind::Fenced | HoldKind::Diverged)) => Ok(k),
        _ => Err(CommandError::NotRejoinable { node }),
    }
}

/// Mark `node` as being rejoined (one rejoin per node at a time).
fn claim(cluster: &Cluster, node: NodeId) -> Result<(), CommandError> {
    let mut set = cluster.rejoining.lock().unwrap_or_else(|e| e.into_inner());
    if !set.insert(node) {
        return Err(CommandError::RejoinRunning { node });
    }
    Ok(())
}

/// Run one rejoin to its end and record the outcome; true on success.
async fn run(cluster: Arc<Cluster>, cfg: Arc<Config>, node: NodeId, kind: HoldKind) -> bool {
    let primary = cluster.snapshot().primary;
    let result = match primary {
        Some(p) => match cfg.failover.rejoin {
            RejoinMode::PgRewind => by_rewind(&cluster, &cfg, node, p).await,
            RejoinMode::Command => by_command(&cluster, &cfg, node, p).await,
            RejoinMode::Off => Err(RejoinError::Abandoned { node }),
        },
        None => Err(RejoinError::PrimaryChanged),
    };
    let ok = match (result, primary) {
        (Ok(()), Some(p)) if cluster.snapshot().primary == Some(p) => {
            tracing::warn!(%node, primary = %p, "node rejoined as a standby");
            cluster.rejoined(
                node,
                format!(
                    "rejoined as a standby of node {p}; in service once seen streaming from it"
                ),
            );
            true
        }
        (Ok(()), _) => fail(&cluster, node, kind, RejoinError::PrimaryChanged),
        (Err(e), _) => fail(&cluster, node, kind, e),
    };
    cluster
        .rejoining
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&node);
    ok
}

/// Record a failed or refused rejoin: the node stays held, with the reason.
fn fail(cluster: &Cluster, node: NodeId, kind: HoldKind, e: RejoinError) -> bool {
    let what = if e.refused() { "refused" } else { "failed" };
    let held = match kind {
        HoldKind::Diverged => "cannot follow: diverged",
        _ => "fenced: old primary",
    };
    tracing::error!(%node, error = %e, "rejoin {what}");
    cluster.count(Event::RejoinFailed);
    cluster.rejoin_progress(
        node,
        format!(
            "{held}; rejoin {what}: {e}; REJOIN NODE {node} tries again, or rebuild it and ATTACH NODE {node}"
        ),
    );
    false
}

/// Show a step; an error when an operator took the node over meanwhile.
fn step(cluster: &Cluster, node: NodeId, mode: &str, what: &str) -> Result<(), RejoinError> {
    tracing::warn!(%node, "rejoin ({mode}): {what}");
    if cluster.rejoin_progress(node, format!("rejoining ({mode}): {what}")) {
        Ok(())
    } else {
        Err(RejoinError::Abandoned { node })
    }
}

/// Make sure the directory found at the node's `data_directory` on
/// pgpilot's host is that node's, not another node's that happens to use the
/// same path (pgpilot running on one database host, the node on another):
/// rewinding the wrong directory would destroy a healthy node. A running
/// node must report that directory itself; a stopped one must be on an
/// address of this host, and the port in the directory's configuration (if
/// set) must be the node's.
async fn same_node(cfg: &Config, node: NodeId, dir: &DataDir) -> Result<(), RejoinError> {
    let b = &cfg.backends[node.index()];
    let canonical = |p: &str| std::fs::canonicalize(p).ok();
    let sql = "SELECT current_setting('data_directory')";
    if let Ok(rows) = monitor_query(cfg, node, sql, cfg.health_check.timeout).await {
        let theirs = rows.first().and_then(|r| r.first().cloned().flatten());
        return match theirs {
            Some(t) if canonical(&t).is_some() && canonical(&t) == canonical(&dir.arg()) => Ok(()),
            other => Err(RejoinError::OtherNode(format!(
                "node {node} reports data_directory {other:?}, not {} on pgpilot's host: pg_rewind needs the node's own directory (use rejoin = \"command\" for nodes on other hosts)",
                dir.arg()
            ))),
        };
    }
    let local = tokio::net::lookup_host((b.host.as_str(), 0))
        .await
        .map(|addrs| {
            addrs
                .into_iter()
                .any(|a| std::net::UdpSocket::bind((a.ip(), 0)).is_ok())
        })
        .unwrap_or(false);
    if !local {
        return Err(RejoinError::OtherNode(format!(
            "node {node} ({}) is not on pgpilot's host, so {} here is not its data directory: use rejoin = \"command\"",
            b.host,
            dir.arg()
        )));
    }
    match dir.configured_port() {
        Some(port) if port != b.port => Err(RejoinError::OtherNode(format!(
            "{} is configured for port {port}, node {node} listens on {}: not its data directory",
            dir.arg(),
            b.port
        ))),
        _ => Ok(()),
    }
}

/// Where the node's WAL stands, for the safety check.
#[derive(Debug)]
struct NodeWal {
    /// Its timeline and how far its WAL reaches (`None`: unknown, it stopped
    /// without a clean shutdown).
    end: Option<(u32, u64)>,
    /// It had synchronous replication configured.
    synchronous: bool,
    /// wal_log_hints or data checksums.
    hints: bool,
    /// It runs (answers queries).
    running: bool,
}

/// Ask the running `node` where its WAL stands.
async fn ask_running(cfg: &Config, node: NodeId, h: &History) -> Result<NodeWal, NodeQueryError> {
    let sql = "SELECT pg_is_in_recovery()::text, \
               CASE WHEN pg_is_in_recovery() THEN NULL ELSE ('x' || substr(pg_walfile_name(\
               pg_current_wal_lsn()), 1, 8))::bit(32)::int::text END, \
               CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
               current_setting('synchronous_standby_names'), \
               current_setting('wal_log_hints'), current_setting('data_checksums')";
    let rows = monitor_query(cfg, node, sql, cfg.health_check.timeout).await?;
    let row = rows.first().ok_or(NodeQueryError::NoRow { node })?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let end = if col(0) == "true" {
        match timeline::standby_fit(cfg, node, h).await? {
            Fit::Follows => Some((h.timeline, 0)),
            Fit::Diverged { timeline, lsn, .. } => Some((timeline, lsn)),
        }
    } else {
        col(1).parse().ok().zip(parse_lsn(&col(2)))
    };
    Ok(NodeWal {
        end,
        synchronous: !col(3).trim().is_empty(),
        hints: col(4) == "on" || col(5) == "on",
        running: true,
    })
}

/// Read where the stopped node's WAL stands from its data directory.
async fn read_stopped(dir: &DataDir, last_seen: Option<u64>) -> Result<NodeWal, RejoinError> {
    let f = dir.controldata().await?;
    let get = |k: &str| {
        f.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let tli = get("Latest checkpoint's TimeLineID").parse().unwrap_or(0);
    let clean = matches!(
        get("Database cluster state"),
        "shut down" | "shut down in recovery"
    );
    let lsn = [
        parse_lsn(get("Latest checkpoint location")),
        parse_lsn(get("Minimum recovery ending location")),
        last_seen,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    let hints = get("wal_log_hints setting") == "on" || get("Data page checksum version") != "0";
    Ok(NodeWal {
        end: clean.then_some((tli, lsn)),
        synchronous: synchronous_in_files(dir),
        hints,
        running: false,
    })
}

/// Whether `synchronous_standby_names` is set in the directory's
/// postgresql.conf or postgresql.auto.conf (the last setting wins; include
/// files are not followed).
fn synchronous_in_files(dir: &DataDir) -> bool {
    let mut value = String::new();
    for name in ["postgresql.conf", "postgresql.auto.conf"] {
        let text = std::fs::read_to_string(dir.path.join(name)).unwrap_or_default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            if let Some((k, v)) = line.split_once('=')
                && k.trim() == "synchronous_standby_names"
            {
                value = v.trim().trim_matches('\'').trim().to_string();
            }
        }
    }
    !value.is_empty()
}

/// The safety rule, decided here: a rejoin discards the node's WAL past the
/// point where the primary's timeline forked from it. With asynchronous
/// replication that WAL holds only transactions already lost at the
/// failover (acknowledged without any standby having them: the documented
/// price of asynchronous replication), so discarding it loses nothing the
/// cluster still had. With synchronous replication, every acknowledged
/// commit reached a standby before the client heard of it, but not
/// necessarily the standby that was promoted (it may have been down, or
/// forced with PROMOTE NODE): WAL past the fork may then hold acknowledged
/// commits that exist nowhere else. So with synchronous replication
/// configured on the node, a node whose WAL goes past the fork, or whose
/// end of WAL is unknown (it stopped without a clean shutdown), is not
/// rejoined: it stays fenced, untouched, for an operator to compare and
/// salvage before rebuilding it.
fn check_safety(
    node: NodeId,
    w: &NodeWal,
    h: &History,
    primary: NodeId,
) -> Result<(), RejoinError> {
    let fit = w.end.map(|(tli, lsn)| (h.fit(tli, lsn), tli, lsn));
    match (w.synchronous, fit) {
        (_, Some((Fit::Follows, _, _))) => Ok(()),
        (false, fit) => {
            let past = fit.map_or("an unknown amount".into(), |(_, tli, lsn)| {
                format!("WAL up to {} on timeline {tli}", format_lsn(lsn))
            });
            tracing::warn!(%node,
                "rejoin discards {past} past the fork of node {primary}'s timeline {} (asynchronous replication: transactions there were lost at the failover)",
                h.timeline
            );
            Ok(())
        }
        (true, None) => Err(RejoinError::Unsafe(format!(
            "node {node} has synchronous replication configured and stopped without a clean shutdown: its WAL may reach past the fork of node {primary}'s timeline {} and hold acknowledged writes the primary lacks; compare and salvage them, then rebuild it by hand and ATTACH NODE {node}",
            h.timeline
        ))),
        (true, Some((_, tli, lsn))) => Err(RejoinError::Unsafe(format!(
            "node {node} has synchronous replication configured and its WAL on timeline {tli} reaches {}, past where node {primary}'s timeline {} forked from it{}: it may hold acknowledged writes the primary lacks; compare and salvage them, then rebuild it by hand and ATTACH NODE {node}",
            format_lsn(lsn),
            h.timeline,
            h.switch_point(tli)
                .map(|s| format!(" (at {})", format_lsn(s)))
                .unwrap_or_default()
        ))),
    }
}

/// The `pg_rewind` mode (see the module docs).
async fn by_rewind(
    cluster: &Cluster,
    cfg: &Config,
    node: NodeId,
    primary: NodeId,
) -> Result<(), RejoinError> {
    const MODE: &str = "pg_rewind";
    let f = &cfg.failover;
    let b = &cfg.backends[node.index()];
    if b.data_directory.is_empty() {
        return Err(RejoinError::NoDataDir { node });
    }
    step(cluster, node, MODE, "checking it")?;
    let dir = DataDir::open(&b.data_directory, &f.pg_bindir)?;
    same_node(cfg, node, &dir).await?;
    let h = timeline::history(cfg, primary).await?;
    let w = match ask_running(cfg, node, &h).await {
        Ok(w) => w,
        Err(e) if dir.running().await? => return Err(e.into()),
        Err(_) => read_stopped(&dir, cluster.last_primary_lsn(node)).await?,
    };
    if !w.hints {
        let source_of_truth = if w.running {
            "SHOW wal_log_hints, data_checksums"
        } else {
            "pg_controldata"
        };
        return Err(RejoinError::NoHints {
            node,
            source_of_truth,
        });
    }
    check_safety(node, &w, &h, primary)?;
    // What it streams with: the primary's own primary_conninfo (left from
    // when it was a standby: replication user, passfile, sslmode …) pointed
    // at the primary, and a slot when the cluster uses them.
    let sql = "SELECT current_setting('primary_conninfo'), current_setting('primary_slot_name')";
    let rows = monitor_query(cfg, primary, sql, cfg.health_check.timeout).await?;
    let col = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .unwrap_or_default()
    };
    let p = &cfg.backends[primary.index()];
    let template = match col(0) {
        t if t.trim().is_empty() => format!("user={}", cfg.monitor.user),
        t => t,
    };
    let conninfo =
        conninfo_for(&template, &p.host, p.port, &b.application_name).ok_or_else(|| {
            RejoinError::Unsafe(format!(
                "cannot build primary_conninfo from node {primary}'s {template:?}"
            ))
        })?;
    let slot = (!col(1).is_empty()).then(|| slot_name(&b.application_name, node));

    if dir.running().await? {
        step(cluster, node, MODE, "stopping it (pg_ctl stop -m fast)")?;
        let t = f.rejoin_timeout.as_secs().to_string();
        dir.run(
            "pg_ctl",
            &["stop", "-D", &dir.arg(), "-m", "fast", "-w", "-t", &t],
            &[],
            f.rejoin_timeout,
        )
        .await?;
    }
    let saved = save_files(&dir)?;
    if let Some(slot) = &slot {
        step(
            cluster,
            node,
            MODE,
            &format!("creating slot {slot} on node {primary}"),
        )?;
        ensure_slot(cfg, node, primary, slot).await?;
    }
    // pg_rewind reads the source's timeline from its control file, which
    // keeps the old timeline until the first checkpoint after a promotion:
    // without one it finds "no rewind required" and leaves the divergent
    // WAL in place. (Needs superuser or pg_checkpoint.)
    step(
        cluster,
        node,
        MODE,
        &format!("CHECKPOINT on node {primary}"),
    )?;
    monitor_query(cfg, primary, "CHECKPOINT", f.rejoin_timeout).await?;
    step(
        cluster,
        node,
        MODE,
        &format!("pg_rewind from node {primary}"),
    )?;
    let source = format!(
        "host={} port={} user={} dbname={} connect_timeout=10",
        p.host, p.port, cfg.monitor.user, cfg.monitor.database
    );
    // pg_rewind connects like libpq: [backend_tls] reaches it as PGSSL*.
    let tls = hooks::tls_env(cfg);
    let mut envs: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if !cfg.monitor.password.is_empty() {
        envs.push(("PGPASSWORD", cfg.monitor.password.as_str()));
    }
    dir.run(
        "pg_rewind",
        &[
            &format!("--target-pgdata={}", dir.arg()),
            &format!("--source-server={source}"),
        ],
        &envs,
        f.rejoin_timeout,
    )
    .await?;
    step(cluster, node, MODE, "configuring it as a standby")?;
    restore_files(&dir, &saved, &conninfo, slot.as_deref())?;
    step(cluster, node, MODE, "starting it")?;
    let log_dir = dir.path.join("log");
    if !log_dir.exists() {
        std::fs::create_dir(&log_dir).map_err(|source| RejoinError::Files {
            what: format!("create {}", log_dir.display()),
            source,
        })?;
        if nix::unistd::geteuid().is_root() {
            let (uid, gid) = dir.owner;
            std::os::unix::fs::chown(&log_dir, Some(uid), Some(gid)).map_err(|source| {
                RejoinError::Files {
                    what: format!("chown {}", log_dir.display()),
                    source,
                }
            })?;
        }
    }
    let log = log_dir
        .join("pgpilot_rejoin.log")
        .to_string_lossy()
        .into_owned();
    let t = f.rejoin_timeout.as_secs().to_string();
    dir.run(
        "pg_ctl",
        &["start", "-D", &dir.arg(), "-w", "-t", &t, "-l", &log],
        &[],
        f.rejoin_timeout,
    )
    .await?;
    streams_from(cluster, cfg, node, primary, MODE).await
}

/// The last step of both modes: wait until the node streams from the
/// primary, then check that its WAL fits the primary's history.
async fn streams_from(
    cluster: &Cluster,
    cfg: &Config,
    node: NodeId,
    primary: NodeId,
    mode: &str,
) -> Result<(), RejoinError> {
    step(
        cluster,
        node,
        mode,
        &format!("waiting until it streams from node {primary}"),
    )?;
    wait_streaming(cfg, node, primary, cfg.failover.rejoin_timeout).await?;
    still_diverged(cfg, node, primary).await
}

/// The `command` mode (see the module docs).
async fn by_command(
    cluster: &Cluster,
    cfg: &Config,
    node: NodeId,
    primary: NodeId,
) -> Result<(), RejoinError> {
    const MODE: &str = "command";
    let f = &cfg.failover;
    step(cluster, node, MODE, "checking it")?;
    let h = timeline::history(cfg, primary).await?;
    let w = ask_running(cfg, node, &h)
        .await
        .map_err(|_| RejoinError::Unreachable { node })?;
    check_safety(node, &w, &h, primary)?;
    step(cluster, node, MODE, "running failover.rejoin_command")?;
    let old = cluster.failover_report().last.and_then(|t| t.old_primary);
    let nodes = HookNodes {
        failed: Some(node),
        new_primary: Some(primary),
        old_primary: old,
    };
    let line = hooks::expand(&f.rejoin_command, cfg, nodes);
    hooks::run(
        "rejoin_command",
        &line,
        f.rejoin_timeout,
        &hooks::tls_env(cfg),
    )
    .await?;
    streams_from(cluster, cfg, node, primary, MODE).await
}

/// After a rejoin: an error if the node's WAL still does not fit the
/// primary's history (a WAL receiver may report `streaming` for a moment
/// before the primary refuses its start point).
async fn still_diverged(cfg: &Config, node: NodeId, primary: NodeId) -> Result<(), RejoinError> {
    let h = timeline::history(cfg, primary).await?;
    match timeline::standby_fit(cfg, node, &h).await? {
        Fit::Follows => Ok(()),
        Fit::Diverged { timeline, lsn, .. } => Err(RejoinError::StillDiverged {
            node,
            timeline,
            lsn,
        }),
    }
}

/// `auto_rejoin` (see the module docs), until shutdown.
pub(crate) async fn watch_fenced(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next_try: HashMap<NodeId, (Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(AUTO_PERIOD) => {}
            _ = shutdown.changed() => return,
        }
        let cfg = config.load_full();
        let f = &cfg.failover;
        // With coordination through etcd only the leader rejoins.
        if !f.auto_rejoin || f.rejoin == RejoinMode::Off || !cluster.may_decide() {
            continue;
        }
        let snap = cluster.snapshot();
        let holds = cluster.holds();
        next_try.retain(|n, _| {
            matches!(
                holds.get(n.index()).copied().flatten(),
                Some(HoldKind::Fenced | HoldKind::Diverged)
            )
        });
        let now = Instant::now();
        for n in &snap.nodes {
            let Ok(kind) = startable(&cluster, &cfg, n.id) else {
                continue;
            };
            let back = n.pg_status == PgStatus::Up
                || (f.rejoin == RejoinMode::PgRewind
                    && !cfg.backends[n.id.index()].data_directory.is_empty()
                    && std::path::Path::new(&cfg.backends[n.id.index()].data_directory)
                        .join("PG_VERSION")
                        .exists());
            if !back || next_try.get(&n.id).is_some_and(|(t, _)| now < *t) {
                continue;
            }
            if claim(&cluster, n.id).is_err() {
                continue;
            }
            tracing::warn!(
                node = %n.id,
                mode = f.rejoin.as_str(),
                "auto_rejoin: rejoining a fenced node"
            );
            let pause = next_try
                .get(&n.id)
                .map_or(AUTO_RETRY_FIRST, |(_, p)| (*p * 2).min(AUTO_RETRY_MAX));
            // Only one rejoin per round and node: the next round looks again.
            if run(cluster.clone(), cfg.clone(), n.id, kind).await {
                next_try.remove(&n.id);
            } else {
                next_try.insert(n.id, (Instant::now() + pause, pause));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_writes_are_never_discarded() {
        let h = History::parse(2, "1\t0/3000000\tno recovery target specified\n");
        let wal = |end, synchronous| NodeWal {
            end,
            synchronous,
            hints: true,
            running: false,
        };
        // At or before the fork: nothing to lose, either way.
        assert!(
            check_safety(
                NodeId::new(0),
                &wal(Some((1, 0x3000000)), true),
                &h,
                NodeId::new(1)
            )
            .is_ok()
        );
        // Past the fork: lost at the failover with async, kept with sync.
        assert!(
            check_safety(
                NodeId::new(0),
                &wal(Some((1, 0x3000100)), false),
                &h,
                NodeId::new(1)
            )
            .is_ok()
        );
        let e = check_safety(
            NodeId::new(0),
            &wal(Some((1, 0x3000100)), true),
            &h,
            NodeId::new(1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("acknowledged writes"), "{e}");
        assert!(e.refused());
        // Unknown end (crashed): only refused with sync.
        assert!(check_safety(NodeId::new(0), &wal(None, false), &h, NodeId::new(1)).is_ok());
        assert!(check_safety(NodeId::new(0), &wal(None, true), &h, NodeId::new(1)).is_err());
    }
}
