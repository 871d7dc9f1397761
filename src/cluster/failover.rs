//! The failover coordinator: one task that turns "the primary is lost" into
//! "another node is the primary".
//!
//! Detection. The cluster owner starts a failover in the update that loses
//! the chosen primary: its health round failed after all retries and it
//! could not be reached (a primary that *answers* with an error — too many
//! connections, authentication — is alive and is never failed over). With
//! `failover.detect_on_session_error` a session that sees its primary
//! connection refused or reset wakes this task, which probes the primary at
//! once; only if it cannot be reached is the primary declared failed. A
//! refused connection is decisive at once; a probe that times out (the
//! primary may be merely busy) is repeated up to `health_check.max_retries`
//! times, as in a health round, so this path is no easier to trigger.
//! A client terminating its own backend, a FATAL, a cancel or a vanished
//! client leave a reachable primary, so they cannot start a failover.
//!
//! A failover then, in order:
//! 1. chooses the candidate ([`super::promote::choose_candidate`]); if none
//!    is acceptable the failover waits (phase `waiting`) and retries every
//!    second — the old primary answering again cancels it, `PROMOTE NODE n`
//!    forces a candidate (tried at once, then every second while it fails);
//! 2. looks at the old primary once more (one probe within
//!    `health_check.timeout`): if it answers as a primary, or answers at all
//!    with an error (too many connections, authentication …), nothing is
//!    promoted and the failover is cancelled;
//! 3. records the promotion, which fences the old primary, then promotes by
//!    `failover.mode` (`none`: promotes nothing);
//! 4. searches (≤ `search_primary_timeout`) until exactly one node that is
//!    not held reports `pg_is_in_recovery() = false`, and only then
//!    publishes it as the primary;
//! 5. re-points the remaining standbys in the background ([`super::follow`]).
//!
//! With `failover.mode = "command"`, pgpool's `failover_command` also runs
//! when a standby fails (with `%d` the standby), as pgpool does; scripts
//! usually exit early in that case.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::error::StepError;
use super::events::{Event, Phase, TransitionStatus};
use super::health::probe_once;
use super::hooks::{self, HookNodes};
use super::{Cluster, NodeStatus, PgStatus, Role, follow, promote};
use crate::config::{Config, FailoverMode, NodeId};

/// How often a waiting failover retries its candidate choice.
const RETRY: Duration = Duration::from_secs(1);
/// Least spacing of direct probes triggered by session errors (a client
/// killing its own backend in a loop costs at most this many probes).
const SUSPECT_GAP: Duration = Duration::from_millis(100);
/// Longest pause between two probes of the session-error fast path (a
/// long `health_check.retry_delay` is shortened to this).
const CONFIRM_PAUSE: Duration = Duration::from_millis(500);
/// Pause between two rounds of the search for the new primary.
const SEARCH_PAUSE: Duration = Duration::from_millis(100);

/// Run the coordinator until shutdown.
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = cluster.subscribe();
    let mut last_probe = Instant::now() - SUSPECT_GAP;
    let mut standbys = StandbyWatch::default();
    loop {
        let cfg = config.load_full();
        cluster
            .fast_detect
            .store(cfg.failover.detect_on_session_error, Ordering::Relaxed);
        // Coordination through etcd: only the leader with a live lease
        // decides (see `coordination/mod.rs`).
        if cluster.may_decide() && cluster.transition_due(RETRY).is_some() {
            let _one_at_a_time = cluster.transition_lock.lock().await;
            if cluster.may_decide()
                && let Some(t) = cluster.transition_due(RETRY)
            {
                run_failover(&cluster, &cfg, t).await;
            }
            continue;
        }
        standbys.check(&cluster, &cfg);
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = cluster.suspect.notified() => {
                if cfg.failover.detect_on_session_error {
                    let wait = SUSPECT_GAP.saturating_sub(last_probe.elapsed());
                    tokio::time::sleep(wait).await;
                    tokio::select! {
                        _ = confirm_primary_failure(&cluster, &cfg) => {}
                        _ = shutdown.changed() => return,
                    }
                    last_probe = Instant::now();
                }
                cluster.verdicts.send_modify(|v| *v += 1);
            }
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A session lost its primary connection: probe the primary now; declare it
/// failed only if it cannot be reached. A refused (or reset) connection is
/// decisive; a probe that timed out is repeated up to
/// `health_check.max_retries` times, `retry_delay` (at most
/// [`CONFIRM_PAUSE`]) apart, like the attempts of a health round, so a busy
/// primary that misses one probe is not failed over.
async fn confirm_primary_failure(cluster: &Cluster, cfg: &Config) {
    let Some(p) = cluster.snapshot().primary else {
        return;
    };
    let Some(backend) = cfg.backends.get(p.index()) else {
        return;
    };
    let hc = &cfg.health_check;
    let mut retries = 0;
    loop {
        match probe_once(backend, &cfg.monitor, hc.timeout).await {
            Err(e) if !e.alive && e.timed_out && retries < hc.max_retries => {
                retries += 1;
                tracing::info!(node = %p, attempt = retries, error = %e, "sessions lost the primary and a direct probe timed out; probing again");
                tokio::time::sleep(hc.retry_delay.min(CONFIRM_PAUSE)).await;
                if cluster.snapshot().primary != Some(p) {
                    return;
                }
            }
            Err(e) if !e.alive => {
                tracing::warn!(node = %p, retries, error = %e, "sessions lost the primary and a direct probe cannot reach it");
                cluster.primary_unreachable(
                    p,
                    format!("sessions lost their connections and a direct probe failed: {e}"),
                    cfg,
                );
                return;
            }
            Err(e) => {
                tracing::info!(node = %p, error = %e, "primary answers (alive); no failover");
                return;
            }
            Ok(_) => {
                tracing::debug!(
                    node = %p,
                    "session error, but the primary answers; no failover"
                );
                return;
            }
        }
    }
}

/// Steps 1–5 of the module docs for transition `t`.
async fn run_failover(cluster: &Arc<Cluster>, cfg: &Arc<Config>, t: TransitionStatus) {
    let id = t.id;
    let old = t.old_primary;
    let mut switch_lsn = None;
    if !t.search_only && cfg.failover.mode != FailoverMode::None {
        let chosen = match t.forced {
            Some(n) => promote::position(cfg, n, cfg.health_check.timeout).await,
            None => promote::choose_candidate(cluster, cfg, old).await,
        };
        let candidate = match chosen {
            Ok(p) => p,
            Err(why) => {
                let why = match t.forced {
                    Some(n) => format!(
                        "forced candidate node {n} cannot be promoted: {why}; retrying every {RETRY:?} (PROMOTE NODE m chooses another)"
                    ),
                    None => why.to_string(),
                };
                if t.phase != Phase::Waiting || t.detail != why {
                    tracing::warn!(reason = %why, "failover waits: no acceptable candidate");
                    cluster.count(Event::CandidateRefused);
                }
                if let Err(e) = cluster.candidate_refused(id, t.forced, why) {
                    e.log("candidate refused");
                }
                return;
            }
        };
        // The last look: an answering primary is never failed over.
        if let Some(o) = old
            && let Some(b) = cfg.backends.get(o.index())
        {
            match probe_once(b, &cfg.monitor, cfg.health_check.timeout).await {
                Ok(false) => {
                    cluster.observe_role(o, false);
                    let why = format!(
                        "cancelled: node {o} answers as a primary again; nothing was promoted"
                    );
                    if let Err(e) = cluster.fail(id, why, cfg) {
                        e.log("cancel: old primary answers as a primary");
                    }
                    return;
                }
                Err(e) if e.alive => {
                    if let Err(e) = cluster.primary_answers(id, o, e.message, cfg) {
                        e.log("cancel: old primary answers");
                    }
                    return;
                }
                Ok(true) => {
                    tracing::info!(
                        node = %o,
                        "last look: the old primary is in recovery now; promoting"
                    )
                }
                Err(e) => {
                    tracing::info!(node = %o, error = %e, "last look: the old primary is still unreachable; promoting")
                }
            }
        }
        if let Err(e) = cluster.promotion_started(id, candidate.node) {
            e.log("promotion");
            return;
        }
        // Coordination: the promotion is recorded in etcd before it is sent.
        if let Err(why) = cluster.record_promotion().await {
            let why = format!("not promoted: the promotion could not be recorded in etcd ({why})");
            if let Err(e) = cluster.fail(id, why, cfg) {
                e.log("promotion not recorded");
            }
            return;
        }
        switch_lsn = Some(candidate.lsn);
        tracing::warn!(
            node = %candidate.node,
            mode = cfg.failover.mode.as_str(),
            "promoting"
        );
        match promote::promote(cfg, candidate.node, old).await {
            Ok(msg) => {
                tracing::warn!(node = %candidate.node, "{msg}");
                cluster.count(Event::Promotion);
            }
            Err(e) => {
                tracing::error!(node = %candidate.node, error = %e, "promotion failed; still searching for a primary");
                cluster.count(Event::PromotionFailed);
            }
        }
    }
    let timeout = cfg.failover.search_primary_timeout;
    match search(cluster, cfg, id, timeout).await {
        Ok(new) => match cluster.finish(id, new, cfg) {
            Ok(()) => follow::spawn_all(cluster.clone(), cfg.clone(), new, old, switch_lsn, false),
            Err(e) => e.log("publish the new primary"),
        },
        Err(why) => {
            if let Err(e) = cluster.fail(id, why.to_string(), cfg) {
                e.log("give up");
            }
        }
    }
}

/// Why the search for the new primary ended without one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SearchError {
    /// The transition moved on while the search ran.
    #[error(transparent)]
    Step(#[from] StepError),
    /// Not exactly one node reported primary in time.
    #[error(
        "no single primary within {timeout:?} ({last}); pgpilot keeps watching: a node that reports primary is admitted"
    )]
    NoSinglePrimary {
        /// `failover.search_primary_timeout`.
        timeout: Duration,
        /// What the last round saw.
        last: String,
    },
}

/// Probe every node not held, every [`SEARCH_PAUSE`], until exactly one
/// reports not-in-recovery (its id), or `timeout`.
pub(super) async fn search(
    cluster: &Cluster,
    cfg: &Config,
    id: u64,
    timeout: Duration,
) -> Result<NodeId, SearchError> {
    let deadline = Instant::now() + timeout;
    let limit = cfg.health_check.timeout.min(Duration::from_secs(2));
    loop {
        let asks: Vec<_> = NodeId::all(cfg.backends.len())
            .filter(|&n| !cluster.is_held(n))
            .map(|n| {
                let b = cfg.backends[n.index()].clone();
                let m = cfg.monitor.clone();
                (
                    n,
                    tokio::spawn(async move { probe_once(&b, &m, limit).await }),
                )
            })
            .collect();
        let mut primaries = Vec::new();
        for (n, ask) in asks {
            match ask.await {
                Ok(Ok(in_recovery)) => {
                    cluster.observe_role(n, in_recovery);
                    if !in_recovery {
                        primaries.push(n);
                    }
                }
                // Expected while nodes restart; the detail says what is missing.
                Ok(Err(e)) => tracing::debug!(node = %n, error = %e, "search: node did not answer"),
                Err(e) => tracing::warn!(node = %n, error = %e, "search: probe task failed"),
            }
        }
        let detail = match primaries.as_slice() {
            [one] => return Ok(*one),
            [] => "searching: no node reports pg_is_in_recovery() = false yet".to_string(),
            many => format!(
                "searching: nodes {many:?} all report pg_is_in_recovery() = false; waiting until exactly one does"
            ),
        };
        cluster.set_phase(id, Phase::Searching, detail.clone())?;
        if Instant::now() >= deadline {
            return Err(SearchError::NoSinglePrimary {
                timeout,
                last: detail,
            });
        }
        tokio::time::sleep(SEARCH_PAUSE).await;
    }
}

/// Standby failures seen by the coordinator, for pgpool's habit of running
/// `failover_command` on every node failure (mode `command` only).
#[derive(Default)]
struct StandbyWatch {
    /// Per node: in service as a standby at the last look.
    serving: Vec<bool>,
}

impl StandbyWatch {
    fn check(&mut self, cluster: &Cluster, cfg: &Arc<Config>) {
        let snap = cluster.snapshot();
        self.serving.resize(snap.nodes.len(), false);
        for n in &snap.nodes {
            let serving = n.status.is_usable() && n.role == Role::Standby;
            let failed = self.serving[n.id.index()]
                && n.status == NodeStatus::Down
                && n.pg_status == PgStatus::Down
                && Some(n.id) != snap.primary;
            self.serving[n.id.index()] = serving;
            if failed && cfg.failover.mode == FailoverMode::Command {
                let nodes = HookNodes {
                    failed: Some(n.id),
                    new_primary: snap.primary,
                    old_primary: snap.primary,
                };
                let line = hooks::expand(&cfg.failover.command, cfg, nodes);
                let limit = cfg.failover.promote_timeout;
                let node = n.id;
                tokio::spawn(async move {
                    // A standby's failure changes no primary: the hook's
                    // outcome is only reported.
                    if let Err(e) =
                        hooks::run("failover_command (standby down)", &line, limit).await
                    {
                        tracing::warn!(%node, error = %e, "failover_command for a failed standby did not succeed");
                    }
                });
            }
        }
    }
}
