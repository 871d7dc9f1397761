//! Physical replication slots on the primary: which standby uses which, and
//! slots left behind by nodes that are gone.
//!
//! Every [`CHECK_PERIOD`], one task asks the published primary for its
//! physical slots (`pg_replication_slots`: active or not, and the WAL each
//! one retains, `pg_current_wal_lsn() - restart_lsn`, and the WAL sender
//! using it) and, only when a slot is inactive, every in-service standby not
//! seen streaming through one for its `primary_slot_name` (readable in
//! recovery). A slot that is inactive and named by no in-service standby is
//! *stale*: it makes the primary keep WAL without bound. Stale slots are published
//! ([`Cluster::replication_slots`]) for the metrics and `SHOW
//! PGPILOT_SLOTS`; with `failover.drop_stale_slots_after` (off by default) a
//! slot stale for that long is dropped (`pg_drop_replication_slot`, only
//! while still inactive). A round where a standby does not answer decides
//! nothing about staleness: its slot could be any of them.
//!
//! Creating a standby's slot on a new primary is part of following
//! (`follow.rs`). Dropping needs the `[monitor]` role to have REPLICATION
//! (or be superuser).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::Cluster;
use super::promote::monitor_query;
use crate::config::{Config, NodeId};

/// How often the slots are looked at.
pub(crate) const CHECK_PERIOD: Duration = Duration::from_secs(2);

/// The primary's physical slots, with the `application_name` of the WAL
/// sender using each; nothing while it is in recovery (where
/// `pg_current_wal_lsn()` fails).
const SLOTS_QUERY: &str = "\
SELECT s.slot_name::text, s.active::text, (pg_current_wal_lsn() - s.restart_lsn)::bigint::text, \
 (SELECT r.application_name::text FROM pg_stat_replication r WHERE r.pid = s.active_pid) \
 FROM pg_replication_slots s WHERE s.slot_type = 'physical' AND NOT pg_is_in_recovery() \
 ORDER BY s.slot_name";

/// One physical slot on the primary.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SlotInfo {
    /// `slot_name`.
    pub(crate) name: String,
    /// A WAL sender streams through it.
    pub(crate) active: bool,
    /// WAL the slot makes the primary keep (NULL `restart_lsn`: none).
    pub(crate) retained_bytes: Option<u64>,
    /// The in-service standby whose `primary_slot_name` it is.
    pub(crate) standby: Option<NodeId>,
    /// Since when it is stale (inactive, used by no in-service standby).
    pub(crate) stale_since: Option<Instant>,
}

/// Look at the slots until shutdown.
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stale_since: HashMap<String, Instant> = HashMap::new();
    loop {
        let cfg = config.load_full();
        let slots = check(&cluster, &cfg, &mut stale_since).await;
        cluster.slots.store(Arc::new(slots));
        tokio::select! {
            _ = tokio::time::sleep(CHECK_PERIOD) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One round: the slots as seen now (empty without a published primary or
/// when it does not answer), after dropping those stale for too long.
async fn check(
    cluster: &Cluster,
    cfg: &Config,
    stale_since: &mut HashMap<String, Instant>,
) -> Vec<SlotInfo> {
    let snap = cluster.snapshot();
    let Some(primary) = snap.primary.filter(|_| !cluster.failover_in_progress()) else {
        stale_since.clear();
        return Vec::new();
    };
    let limit = cfg.health_check.timeout;
    let rows = match monitor_query(cfg, primary, SLOTS_QUERY, limit).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(node = %primary, error = %e, "could not list replication slots");
            return Vec::new();
        }
    };
    let col = |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
    // Each in-service standby's slot; `None` when one did not answer. An
    // active slot's standby is known from its WAL sender; standbys are only
    // asked when a slot is inactive (the usual state asks nothing of them).
    let mut used: Option<HashMap<String, NodeId>> = Some(HashMap::new());
    for r in &rows {
        let app = col(r, 3);
        let node = snap
            .nodes
            .iter()
            .find(|n| n.id != primary && !app.is_empty() && n.repl.application_name == app);
        if let (Some(map), Some(n)) = (used.as_mut(), node) {
            map.insert(col(r, 0), n.id);
        }
    }
    let any_inactive = rows.iter().any(|r| col(r, 1) != "true");
    let streaming: Vec<NodeId> = used.iter().flat_map(|u| u.values().copied()).collect();
    let asked: Vec<NodeId> = snap
        .nodes
        .iter()
        .filter(|n| n.id != primary && n.status.is_usable() && !streaming.contains(&n.id))
        .map(|n| n.id)
        .filter(|_| any_inactive)
        .collect();
    for id in asked {
        let sql = "SELECT current_setting('primary_slot_name')";
        match monitor_query(cfg, id, sql, limit).await {
            Ok(r) => {
                let name = r.first().and_then(|r| r.first().cloned().flatten());
                if let (Some(map), Some(name)) = (used.as_mut(), name.filter(|s| !s.is_empty())) {
                    map.insert(name, id);
                }
            }
            Err(e) => {
                tracing::debug!(node = %id, error = %e, "could not read primary_slot_name");
                used = None;
            }
        }
    }
    let now = Instant::now();
    let mut slots: Vec<SlotInfo> = rows
        .iter()
        .map(|r| {
            let name = col(r, 0);
            SlotInfo {
                standby: used.as_ref().and_then(|u| u.get(&name).copied()),
                active: col(r, 1) == "true",
                retained_bytes: col(r, 2).parse().ok(),
                stale_since: None,
                name,
            }
        })
        .collect();
    if !mark_stale(&mut slots, used.as_ref(), stale_since, now) {
        return slots;
    }
    let after = cfg.failover.drop_stale_slots_after;
    // With coordination through etcd only the leader drops slots.
    if after.is_zero() || !cluster.may_decide() {
        return slots;
    }
    let mut dropped = Vec::new();
    for s in &slots {
        let Some(since) = s.stale_since.filter(|t| now.duration_since(*t) >= after) else {
            continue;
        };
        let name = s.name.replace('\'', "''");
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{name}' AND NOT active"
        );
        match monitor_query(cfg, primary, &sql, limit).await {
            Ok(rows) if rows.is_empty() => {} // in use again meanwhile
            Ok(_) => {
                tracing::warn!(
                    node = %primary,
                    slot = %s.name,
                    stale_for = ?now.duration_since(since),
                    retained_bytes = ?s.retained_bytes,
                    "stale replication slot dropped (failover.drop_stale_slots_after)"
                );
                dropped.push(s.name.clone());
            }
            Err(e) => tracing::warn!(
                node = %primary,
                slot = %s.name,
                error = %e,
                "could not drop a stale replication slot (the monitor role needs REPLICATION or superuser)"
            ),
        }
    }
    slots.retain(|s| !dropped.contains(&s.name));
    stale_since.retain(|name, _| !dropped.contains(name));
    slots
}

/// Set each slot's `stale_since` from `stale_since` (the first round each
/// was seen stale, updated here). `used`: each in-service standby's slot,
/// `None` when one did not answer; then nothing new is decided (known stale
/// slots keep their time) and this returns false.
fn mark_stale(
    slots: &mut [SlotInfo],
    used: Option<&HashMap<String, NodeId>>,
    stale_since: &mut HashMap<String, Instant>,
    now: Instant,
) -> bool {
    let Some(used) = used else {
        for s in slots.iter_mut().filter(|s| !s.active) {
            s.stale_since = stale_since.get(&s.name).copied();
        }
        return false;
    };
    let stale = |s: &SlotInfo| !s.active && !used.contains_key(&s.name);
    stale_since.retain(|name, _| slots.iter().any(|s| &s.name == name && stale(s)));
    for s in slots.iter_mut().filter(|s| stale(s)) {
        s.stale_since = Some(*stale_since.entry(s.name.clone()).or_insert(now));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, active: bool) -> SlotInfo {
        SlotInfo {
            name: name.into(),
            active,
            retained_bytes: Some(0),
            standby: None,
            stale_since: None,
        }
    }

    #[test]
    fn a_slot_is_stale_while_inactive_and_used_by_no_in_service_standby() {
        let t0 = Instant::now();
        let used: HashMap<String, NodeId> = [("node2".to_string(), NodeId::new(2))].into();
        let mut since = HashMap::new();
        let round =
            |active: [bool; 3], used: Option<&HashMap<String, NodeId>>, since: &mut _, at| {
                let mut slots = vec![
                    slot("node1", active[0]),
                    slot("node2", active[1]),
                    slot("gone", active[2]),
                ];
                let decided = mark_stale(&mut slots, used, since, at);
                (
                    decided,
                    slots.iter().map(|s| s.stale_since).collect::<Vec<_>>(),
                )
            };
        // node1 streams; node2 is restarting (inactive, but its standby is
        // in service); gone is stale from now on.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            round([true, false, false], Some(&used), &mut since, t0),
            (true, vec![None, None, Some(t0)])
        );
        // Still stale a round later: since the first round it was.
        assert_eq!(
            round([true, false, false], Some(&used), &mut since, t1),
            (true, vec![None, None, Some(t0)])
        );
        // A standby did not answer: nothing new is decided, known times kept.
        assert_eq!(
            round([false, false, false], None, &mut since, t1),
            (false, vec![None, None, Some(t0)])
        );
        // gone is used again, node1 is gone: the clock restarts for it.
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(
            round([false, true, true], Some(&used), &mut since, t2),
            (true, vec![Some(t2), None, None])
        );
        assert_eq!(since.len(), 1);
    }
}
