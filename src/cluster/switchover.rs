//! `PROMOTE NODE n`: a planned switchover from the healthy primary to
//! standby `n`, or — while a failover waits for an acceptable candidate —
//! the operator's choice of candidate.
//!
//! The switchover, in the background once the command was accepted:
//! 1. publish no primary: new write requests and new sessions *wait* (up to
//!    `failover.client_wait_timeout`) instead of failing;
//! 2. wait (≤ `switchover_timeout`) until the old primary has no open
//!    client transaction (`pg_stat_activity.xact_start`), then make it
//!    read-only (`ALTER SYSTEM SET default_transaction_read_only = on` +
//!    reload) and terminate transactions still open after the timeout;
//! 3. note the old primary's `pg_current_wal_lsn()` and wait (≤
//!    `switchover_timeout`) until the target has received it — so no
//!    acknowledged commit is lost;
//! 4. fence the old primary, promote the target by `failover.mode`, wait for
//!    exactly one primary, publish it (the waiting requests proceed there);
//! 5. re-point the other standbys; `follow_primary_command`, when set, also
//!    runs for the old primary (as pgpool does), which otherwise stays
//!    running, read-only and fenced until rebuilt and attached.
//!
//! A client between transactions sees no error: its next write waits in
//! step 1–4 and runs on the new primary. A failure before step 4 (target
//! does not catch up, old primary unreachable) aborts: the read-only setting
//! is reset and the old primary is published again (or failed over, if it
//! is gone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::error::{NodeQueryError, StepError};
use super::events::{Event, Phase};
use super::promote::{self, PromoteError, monitor_query};
use super::replication::format_lsn;
use super::{Cluster, CommandError, Role, failover, follow};
use crate::config::{Config, FailoverMode, NodeId};

/// Let sessions that routed a write just before the switch deliver it.
const GRACE: Duration = Duration::from_millis(50);

/// Open client transactions on a node. pgpilot's own checks are excluded by
/// role as well as name (they run as the monitor role, as this query does): a
/// client may call itself anything, so a name alone would let its transaction
/// escape the drain and commit on the old primary.
const OPEN_TRANSACTIONS: &str = "FROM pg_stat_activity WHERE backend_type = 'client backend' \
     AND xact_start IS NOT NULL AND pid <> pg_backend_pid() \
     AND NOT (usename = current_user AND application_name LIKE 'pgpilot-%')";

/// Why a switchover stopped before the promotion (it is then aborted: the
/// old primary is published again). The text ends up in the transition's
/// detail as `switchover aborted: …`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SwitchoverError {
    /// Asking or configuring the old primary failed.
    #[error(transparent)]
    Query(#[from] NodeQueryError),
    /// Asking the target where it stands failed (or it left recovery).
    #[error(transparent)]
    Target(#[from] PromoteError),
    /// The transition moved on while it was being prepared.
    #[error(transparent)]
    Step(#[from] StepError),
    /// Open transactions were terminated but their backends stayed.
    #[error("transactions on node {node} were terminated but did not end")]
    NotDrained {
        /// The old primary.
        node: NodeId,
    },
    /// `pg_current_wal_insert_lsn()` gave no readable answer.
    #[error("cannot read the old primary's WAL position")]
    NoWalPosition,
    /// The target did not receive the old primary's last WAL in time.
    #[error(
        "node {node} did not catch up: at {}, old primary at {}",
        format_lsn(*.at),
        format_lsn(*.wanted)
    )]
    NotCaughtUp {
        /// The target.
        node: NodeId,
        /// Where it got to.
        at: u64,
        /// The old primary's final position.
        wanted: u64,
    },
}

/// Validate `PROMOTE NODE target` and start it; the switchover continues in
/// the background. The message says what was started.
pub(crate) fn start(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    target: NodeId,
) -> Result<String, CommandError> {
    let cfg = config.load_full();
    if cfg.failover.mode == FailoverMode::None {
        return Err(CommandError::PromotionDisabled);
    }
    // Patroni mode: the switchover is Patroni's. Sessions run it and wait
    // for Patroni's answer (`Step::AdminElsewhere`); anything else asks in the
    // background.
    if cluster.patroni().is_some() {
        tokio::spawn(async move {
            match super::patroni::switchover(&cluster, &cfg, target).await {
                Ok(m) => tracing::warn!(node = %target, "{m}"),
                Err(e) => tracing::error!(node = %target, error = %e, "PROMOTE NODE"),
            }
        });
        return Ok(format!(
            "Patroni switchover to node {target} requested; SHOW PGPILOT_NODES shows the primary once Patroni's leader changes"
        ));
    }
    // Coordination through etcd: only the leader switches over.
    if let Some(r) = cluster.forward_if_follower("promote", target) {
        return r;
    }
    let snap = cluster.snapshot();
    let n = snap
        .nodes
        .get(target.index())
        .ok_or(CommandError::NoSuchNode { node: target })?;
    if snap.primary == Some(target) {
        return Err(CommandError::AlreadyPrimary { node: target });
    }
    let standby = n.status.is_usable() && n.role == Role::Standby && !cluster.is_held(target);
    if !standby {
        return Err(CommandError::NotStandby {
            node: target,
            status: n.status,
            role: n.role,
        });
    }
    if cluster.failover_in_progress() {
        cluster.update_with(|o| o.force_candidate(target))?;
        return Ok(format!(
            "the failover in progress will promote node {target}"
        ));
    }
    let adm = super::state_machine::Admission::from(&*cfg);
    let (id, old) = cluster.update_with(|o| o.begin_switchover(target, &adm))?;
    tokio::spawn(async move {
        let _one_at_a_time = cluster.transition_lock.lock().await;
        run(&cluster, &cfg, id, old, target).await;
    });
    Ok(format!(
        "switchover from node {old} to node {target} started; SHOW PGPILOT_FAILOVER shows its progress"
    ))
}

/// Steps 2–5 of the module docs.
async fn run(cluster: &Arc<Cluster>, cfg: &Arc<Config>, id: u64, old: NodeId, target: NodeId) {
    let mut read_only = false;
    let result = prepare(cluster, cfg, id, old, target, &mut read_only).await;
    let switch_lsn = match result {
        Ok(lsn) => lsn,
        Err(why) => {
            if read_only && let Err(e) = set_read_only(cfg, old, false).await {
                tracing::error!(node = %old, error = %e, "could not reset default_transaction_read_only");
            }
            if let Err(e) = cluster.fail(id, format!("switchover aborted: {why}"), cfg) {
                e.log("abort the switchover");
            }
            return;
        }
    };
    if let Err(e) = cluster.promotion_started(id, target) {
        e.log("promotion");
        return;
    }
    // Coordination: the promotion is recorded in etcd before it is sent.
    if let Err(why) = cluster.record_promotion().await {
        let why = format!("switchover aborted: not recorded in etcd ({why})");
        if let Err(e) = cluster.fail(id, why, cfg) {
            e.log("promotion not recorded");
        }
        return;
    }
    match promote::promote(cfg, target, Some(old)).await {
        Ok(msg) => {
            tracing::warn!(node = %target, "{msg}");
            cluster.count(Event::Promotion);
        }
        Err(e) => {
            tracing::error!(node = %target, error = %e, "promotion failed; still searching for a primary");
            cluster.count(Event::PromotionFailed);
        }
    }
    match failover::search(cluster, cfg, id, cfg.failover.search_primary_timeout).await {
        Ok(new) => match cluster.finish(id, new, cfg) {
            Ok(()) => {
                let include_old = !cfg.failover.follow_primary_command.trim().is_empty();
                follow::spawn_all(
                    cluster.clone(),
                    cfg.clone(),
                    new,
                    Some(old),
                    Some(switch_lsn),
                    include_old,
                );
            }
            Err(e) => e.log("publish the new primary"),
        },
        Err(why) => {
            if let Err(e) = cluster.fail(id, why.to_string(), cfg) {
                e.log("give up");
            }
        }
    }
}

/// Drain, make read-only, catch up. Returns the old primary's final LSN.
async fn prepare(
    cluster: &Cluster,
    cfg: &Config,
    id: u64,
    old: NodeId,
    target: NodeId,
    read_only: &mut bool,
) -> Result<u64, SwitchoverError> {
    let limit = cfg.health_check.timeout;
    let timeout = cfg.failover.switchover_timeout;
    tokio::time::sleep(GRACE).await;
    let mut deadline = Instant::now() + timeout;
    let mut terminated = false;
    let count = format!("SELECT count(*) {OPEN_TRANSACTIONS}");
    loop {
        let open = first_value(monitor_query(cfg, old, &count, limit).await?);
        if open.as_deref() == Some("0") {
            break;
        }
        if !*read_only {
            // Nothing routes here any more; refuse writes from late arrivals.
            set_read_only(cfg, old, true).await?;
            *read_only = true;
        }
        if Instant::now() >= deadline {
            if terminated {
                return Err(SwitchoverError::NotDrained { node: old });
            }
            // Terminate, then keep counting until the backends are gone: a
            // terminated backend writes its abort record as it exits, and the
            // position read below must include it (or a standby still
            // streaming from the old primary would be ahead of the target).
            let kill = format!("SELECT count(pg_terminate_backend(pid)) {OPEN_TRANSACTIONS}");
            let killed = first_value(monitor_query(cfg, old, &kill, limit).await?);
            tracing::warn!(node = %old, terminated = ?killed, "open transactions did not finish in time; terminated");
            terminated = true;
            deadline = Instant::now() + limit;
        }
        cluster.set_phase(
            id,
            Phase::Draining,
            format!(
                "waiting for {} open transaction(s) on node {old}",
                open.unwrap_or_default()
            ),
        )?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !*read_only {
        set_read_only(cfg, old, true).await?;
        *read_only = true;
    }
    // The insert position: records not yet written out (an abort's is not
    // flushed at once) count too, or a standby still streaming from the old
    // primary could receive them after the target was promoted without them.
    let lsn =
        first_value(monitor_query(cfg, old, "SELECT pg_current_wal_insert_lsn()", limit).await?)
            .as_deref()
            .and_then(super::replication::parse_lsn)
            .ok_or(SwitchoverError::NoWalPosition)?;
    cluster.set_phase(
        id,
        Phase::CatchingUp,
        format!("waiting for node {target} to receive {}", format_lsn(lsn)),
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        let p = promote::position(cfg, target, limit).await?;
        if p.lsn >= lsn {
            return Ok(p.lsn);
        }
        if Instant::now() >= deadline {
            return Err(SwitchoverError::NotCaughtUp {
                node: target,
                at: p.lsn,
                wanted: lsn,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `ALTER SYSTEM SET default_transaction_read_only` (or RESET) and reload.
async fn set_read_only(cfg: &Config, node: NodeId, on: bool) -> Result<(), NodeQueryError> {
    let limit = cfg.health_check.timeout;
    let sql = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    monitor_query(cfg, node, sql, limit).await?;
    monitor_query(cfg, node, "SELECT pg_reload_conf()", limit).await?;
    tracing::info!(
        %node,
        on,
        "default_transaction_read_only set on the old primary"
    );
    Ok(())
}

fn first_value(rows: Vec<Vec<Option<String>>>) -> Option<String> {
    rows.into_iter().next()?.into_iter().next().flatten()
}
