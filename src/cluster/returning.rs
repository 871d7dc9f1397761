//! Standbys that return after a failover, and standbys held out because
//! their re-pointing failed: both are re-pointed at the current primary
//! ([`super::follow`], slot first), unless their timeline diverged.
//!
//! Every [`RETURNING_PERIOD`] this task looks at the standbys that are up,
//! in recovery and not streaming from the primary:
//!
//! * one not held whose WAL receiver, asked itself, streams from nobody, or
//!   from a fenced node, or on an older timeline than the primary's (it was
//!   down while the others were re-pointed, or restarted with an old
//!   `primary_conninfo`). Seen so twice in a row (so a WAL receiver
//!   restarting for a moment is left alone), it is re-pointed;
//! * one held out because following failed (not streaming in time, its
//!   slot could not be created, a query failed): re-pointed again while it
//!   is reachable, with a backoff from [`RETRY_FIRST`] doubling up to
//!   [`RETRY_MAX`], so a standby that recovers (its disk freed, the role
//!   granted) comes back without an operator, and one that never does costs
//!   one attempt a minute.
//!
//! Before either is re-pointed, its WAL is compared with the primary's
//! timeline history ([`super::timeline`]): one that went past the point
//! where the primary's timeline forked (it was ahead on the old timeline)
//! cannot follow, and would only fail again and again. It is held out at
//! once as *diverged* ([`HoldKind::Diverged`], shown down with the reason in
//! `SHOW PGPILOT_NODES`) and never re-pointed; `REJOIN NODE` (pg_rewind, see
//! [`super::rejoin`]) or a rebuild brings it back. Without the privilege to
//! read the history (`pg_read_file`) the check is skipped: such a standby
//! is re-pointed, does not stream, and is held out after `follow_timeout`.
//!
//! Any hold of these kinds is lifted once the standby is seen streaming
//! from the primary on its timeline; it then serves reads again, weighted by
//! its lag like any standby. A standby cascading from another standby is
//! left alone; nothing is done before pgpilot's first failover or
//! switchover, or in mode `none`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::events::Event;
use super::follow::follow_one;
use super::promote::monitor_query;
use super::replication::format_lsn;
use super::state_machine::HoldKind;
use super::timeline::{self, Fit, History};
use super::{Cluster, ClusterSnapshot, PgStatus, Role};
use crate::config::{Config, FailoverMode, NodeId};

/// How often returning standbys are looked for.
pub(crate) const RETURNING_PERIOD: Duration = Duration::from_secs(2);
/// First pause before a standby whose re-pointing failed is tried again.
pub(crate) const RETRY_FIRST: Duration = Duration::from_secs(4);
/// Longest pause between two such tries.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(60);

/// When a held-out standby is tried again.
#[derive(Debug, Clone, Copy)]
struct Retry {
    next: Instant,
    pause: Duration,
}

impl Retry {
    fn new(now: Instant) -> Retry {
        Retry {
            next: now + RETRY_FIRST,
            pause: RETRY_FIRST,
        }
    }

    /// Due now? If so, the next try is after twice the pause (bounded).
    fn take(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.pause = (self.pause * 2).min(RETRY_MAX);
        self.next = now + self.pause;
        true
    }
}

/// Re-point returning and held-out standbys (see the module docs), until
/// shutdown.
pub(crate) async fn watch_returning(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen_before: HashSet<NodeId> = HashSet::new();
    let mut running: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut retries: HashMap<NodeId, Retry> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETURNING_PERIOD) => {}
            _ = shutdown.changed() => return,
        }
        running.retain(|_, task| !task.is_finished());
        let cfg = config.load_full();
        let snap = cluster.snapshot();
        let report = cluster.failover_report();
        let primary = match (snap.primary, &report.current, &report.last) {
            // With coordination through etcd only the leader re-points.
            (Some(p), None, Some(_))
                if cfg.failover.mode != FailoverMode::None && cluster.may_decide() =>
            {
                p
            }
            _ => {
                seen_before.clear();
                continue;
            }
        };
        let holds = cluster.holds();
        retries.retain(|n, _| holds.get(n.index()) == Some(&Some(HoldKind::CannotFollow)));
        let now = Instant::now();
        let mut seen_now = HashSet::new();
        let mut history: Option<Option<History>> = None;
        for n in &snap.nodes {
            if n.id == primary
                || n.pg_status != PgStatus::Up
                || n.role != Role::Standby
                || n.repl.streaming_from_primary
                || running.contains_key(&n.id)
            {
                continue;
            }
            let why = match holds.get(n.id.index()).copied().flatten() {
                None => {
                    let Some(why) = not_following(&cluster, &cfg, &snap, n.id, primary).await
                    else {
                        continue;
                    };
                    if !seen_before.contains(&n.id) {
                        seen_now.insert(n.id);
                        continue;
                    }
                    why
                }
                Some(HoldKind::CannotFollow) => {
                    if !retries
                        .entry(n.id)
                        .or_insert_with(|| Retry::new(now))
                        .take(now)
                    {
                        continue;
                    }
                    "it is held out because following failed; trying again".to_string()
                }
                Some(_) => continue,
            };
            if history.is_none() {
                history = Some(match timeline::history(&cfg, primary).await {
                    Ok(h) => Some(h),
                    Err(e) => {
                        tracing::debug!(node = %primary, error = %e, "cannot read the primary's timeline history; divergence not checked");
                        None
                    }
                });
            }
            if let Some(Some(h)) = &history
                && let Some(reason) = diverged(&cfg, n.id, primary, h).await
            {
                cluster.cannot_follow(n.id, reason, true);
                continue;
            }
            tracing::warn!(node = %n.id, %primary, reason = %why, "standby returned; re-pointing it");
            let (cluster, cfg, node) = (cluster.clone(), cfg.clone(), n.id);
            let task = tokio::spawn(async move {
                match follow_one(&cfg, node, primary, None, None).await {
                    Ok(()) => {
                        tracing::warn!(%node, %primary, "returned standby follows the primary");
                        cluster.count(Event::Follow);
                    }
                    Err(why) if why.standby_unreachable(node) => {
                        tracing::info!(%node, reason = %why, "returned standby unreachable again")
                    }
                    Err(why) => cluster.cannot_follow(node, why.to_string(), why.is_diverged()),
                }
            });
            running.insert(node, task);
        }
        seen_before = seen_now;
    }
}

/// The reason standby `node` cannot follow `primary` because its WAL went
/// past the fork of the primary's timeline history `h`; `None` when it fits
/// or cannot be asked.
async fn diverged(cfg: &Config, node: NodeId, primary: NodeId, h: &History) -> Option<String> {
    match timeline::standby_fit(cfg, node, h).await {
        Ok(Fit::Follows) => None,
        Ok(Fit::Diverged {
            timeline,
            lsn,
            switch,
        }) => {
            let fork = match switch {
                Some(s) => format!(
                    "past {}, where node {primary}'s timeline {} left it",
                    format_lsn(s),
                    h.timeline
                ),
                None => format!(
                    "a timeline node {primary} (on timeline {}) never was on",
                    h.timeline
                ),
            };
            Some(format!(
                "cannot follow: diverged: its WAL on timeline {timeline} reaches {}, {fork}; \
                 REJOIN NODE {node} (failover.rejoin) or rebuild it (pg_rewind or pg_basebackup)",
                format_lsn(lsn)
            ))
        }
        Err(e) => {
            tracing::debug!(%node, error = %e, "cannot compare the standby's timeline");
            None
        }
    }
}

/// Why standby `node` does not follow `primary` (its WAL receiver streams
/// from nobody, from a fenced node, or on an older timeline), or `None`
/// when it does or cannot be asked (then nothing is done).
async fn not_following(
    cluster: &Cluster,
    cfg: &Config,
    snap: &ClusterSnapshot,
    node: NodeId,
    primary: NodeId,
) -> Option<String> {
    let sql = "SELECT pg_is_in_recovery()::text, r.status::text, r.sender_host::text, \
               r.sender_port::text, r.received_tli::text \
               FROM (SELECT) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true";
    let rows = monitor_query(cfg, node, sql, cfg.health_check.timeout)
        .await
        .ok()?;
    let row = rows.first()?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if col(0) != "true" {
        return None;
    }
    if col(1) != "streaming" {
        return Some("its WAL receiver streams from nobody".into());
    }
    let holds = cluster.holds();
    let fenced = cfg.backends.iter().enumerate().find(|(i, b)| {
        holds.get(*i) == Some(&Some(HoldKind::Fenced))
            && b.host == col(2)
            && b.port.to_string() == col(3)
    });
    if let Some((i, _)) = fenced {
        return Some(format!("it streams from node {i}, a fenced old primary"));
    }
    let primary_tli = snap
        .nodes
        .get(primary.index())
        .and_then(|p| p.repl.timeline);
    match (col(4).parse::<u32>().ok(), primary_tli) {
        (Some(own), Some(p)) if own < p => Some(format!(
            "it streams on timeline {own}, the primary is on timeline {p}"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_a_bound() {
        let t0 = Instant::now();
        let mut r = Retry::new(t0);
        assert!(!r.take(t0));
        assert!(!r.take(t0 + RETRY_FIRST - Duration::from_millis(1)));
        let mut at = t0 + RETRY_FIRST;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            assert!(r.take(at));
            assert!(!r.take(at));
            pauses.push(r.pause.as_secs());
            at = r.next;
        }
        assert_eq!(pauses, [8, 16, 32, 60, 60, 60]);
    }
}
