//! Following the new primary: after a promotion the remaining standbys are
//! re-pointed at it, without SSH.
//!
//! Built in (PostgreSQL 13+, where `primary_conninfo` is reloadable): as
//! the `[monitor]` role, read the standby's `primary_conninfo`, replace its
//! `host`/`port` with the new primary's (keeping user, application_name,
//! passfile, sslmode …), `ALTER SYSTEM SET primary_conninfo = '…'` and
//! `SELECT pg_reload_conf()`. The WAL receiver restarts against the new
//! primary and, with `recovery_target_timeline = 'latest'` (the default
//! since PostgreSQL 12), follows its new timeline. The role needs superuser,
//! or `GRANT ALTER SYSTEM ON PARAMETER primary_conninfo` (PostgreSQL 15+)
//! and `GRANT EXECUTE ON FUNCTION pg_reload_conf()`.
//!
//! Slots: a standby streaming through a physical replication slot
//! (`primary_slot_name`, e.g. from `pg_basebackup -R -S nodeN`) would find no
//! slot on the new primary (slots are not replicated) and never stream
//! again ("replication slot does not exist"). So before re-pointing it, that
//! slot is created on the new primary when absent, with
//! `pg_create_physical_replication_slot(name, true)` (WAL reserved from
//! then on). This needs the `[monitor]` role to have REPLICATION (or be
//! superuser) on the new primary. A standby without a slot is re-pointed as
//! is.
//!
//! With `failover.follow_primary_command` set, that command runs instead,
//! once per standby, with pgpool's placeholders (`%d` the standby); the
//! standby's slot is created first all the same.
//!
//! Standbys that return after a failover ([`watch_returning`]): one that
//! was down while the others were re-pointed (or that is restarted with an
//! old `primary_conninfo`) is found every [`RETURNING_PERIOD`]: in
//! recovery, not held, not streaming from the primary, and, asked itself,
//! its WAL receiver streams from nobody, or from a fenced node, or on an
//! older timeline than the primary's. Seen so twice in a row (so a WAL
//! receiver restarting for a moment is left alone), it is re-pointed as
//! above, its slot created first. A standby cascading from another standby
//! is left alone. Nothing is done before pgpilot's first failover or
//! switchover, or in mode `none`.
//!
//! Either way the standby must then be seen streaming from the new primary
//! (`pg_stat_wal_receiver`) within `failover.follow_timeout`. A standby that
//! replayed past the new primary's switch point (it diverged: it cannot
//! follow that timeline), or that does not stream in time, is held out with
//! the reason shown; it comes back once it streams from the primary again
//! (e.g. after pg_rewind), or with `ATTACH NODE`. Standbys keep serving
//! reads while they are re-pointed (their data is consistent, if older);
//! the lag-weighted balancing keeps reads off them while their timeline
//! differs from the primary's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::error::NodeQueryError;
use super::events::Event;
use super::hooks::{self, HookError, HookNodes};
use super::promote::monitor_query;
use super::replication::{format_lsn, parse_lsn};
use super::state_machine::HoldKind;
use super::{Cluster, ClusterSnapshot, PgStatus, Role};
use crate::config::{Config, FailoverMode, NodeId};

/// How often standbys that returned after a failover are looked for.
pub(crate) const RETURNING_PERIOD: Duration = Duration::from_secs(2);

/// Why a standby cannot follow the new primary. The text is the reason its
/// hold shows (`SHOW PGPILOT_NODES`), so it says how to bring it back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FollowError {
    /// `follow_primary_command` failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// Asking or re-pointing the standby failed.
    #[error(transparent)]
    Query(#[from] NodeQueryError),
    /// The node is not a standby.
    #[error("node {node} is not in recovery: it cannot follow")]
    NotInRecovery {
        /// The node.
        node: NodeId,
    },
    /// It replayed past the point where the new primary's timeline forked.
    #[error(
        "diverged: replayed up to {} past the new primary's timeline switch at {}; rebuild it (pg_rewind or pg_basebackup), then ATTACH NODE {node}",
        format_lsn(*.replay),
        format_lsn(*.switch)
    )]
    Diverged {
        /// The node.
        node: NodeId,
        /// Its replay position.
        replay: u64,
        /// Where the new timeline forked.
        switch: u64,
    },
    /// `recovery_target_timeline` is pinned: it cannot switch timelines.
    #[error(
        "recovery_target_timeline is {timeline:?}, not 'latest': it cannot follow the new timeline (set it to 'latest' and restart it)"
    )]
    PinnedTimeline {
        /// The setting's value.
        timeline: String,
    },
    /// `primary_conninfo` is not in key/value form.
    #[error(
        "cannot rewrite primary_conninfo {conninfo:?} (a URI?): use failover.follow_primary_command"
    )]
    Conninfo {
        /// The setting's value.
        conninfo: String,
    },
    /// The standby's slot could not be created on the new primary.
    #[error(
        "cannot create its replication slot {slot:?} on the new primary: {source} (the monitor role needs REPLICATION or superuser)"
    )]
    Slot {
        /// The slot (the standby's `primary_slot_name`).
        slot: String,
        /// Why.
        source: NodeQueryError,
    },
    /// Not seen streaming from the new primary in time.
    #[error(
        "cannot follow node {new}: not streaming from it after {limit:?} ({last}); a diverged timeline? rebuild it (pg_rewind or pg_basebackup), then ATTACH NODE {node}"
    )]
    NotStreaming {
        /// The standby.
        node: NodeId,
        /// The new primary.
        new: NodeId,
        /// `failover.follow_timeout`.
        limit: Duration,
        /// What the last look saw.
        last: String,
    },
}

impl FollowError {
    /// The standby itself could not be reached (down, or restarting): not a
    /// reason to hold it out. It is re-pointed when it returns
    /// ([`watch_returning`]); a health check that has not yet noticed it
    /// down must not make it "cannot follow" for good.
    fn standby_unreachable(&self, standby: NodeId) -> bool {
        matches!(
            self,
            FollowError::Query(
                NodeQueryError::Connect { node, .. } | NodeQueryError::Timeout { node, .. }
            ) if *node == standby
        )
    }
}

/// Re-point every reachable standby except `new` (and `old`, unless
/// `include_old`) at `new`, each in its own task. `switch_lsn` is where the
/// new primary's timeline forked, when known.
pub(crate) fn spawn_all(
    cluster: Arc<Cluster>,
    cfg: Arc<Config>,
    new: NodeId,
    old: Option<NodeId>,
    switch_lsn: Option<u64>,
    include_old: bool,
) {
    let snap = cluster.snapshot();
    for n in &snap.nodes {
        let is_old = Some(n.id) == old;
        if n.id == new || (is_old && !include_old) || (!is_old && cluster.is_held(n.id)) {
            continue;
        }
        if n.pg_status != PgStatus::Up {
            tracing::info!(
                node = %n.id,
                "standby unreachable; not re-pointed (it will not be re-admitted until it streams from the new primary)"
            );
            continue;
        }
        let (cluster, cfg) = (cluster.clone(), cfg.clone());
        let node = n.id;
        tokio::spawn(async move {
            match follow_one(&cfg, node, new, old, switch_lsn).await {
                Ok(()) => {
                    tracing::warn!(%node, primary = %new, "standby follows the new primary");
                    cluster.count(Event::Follow);
                }
                Err(why) if is_old => {
                    tracing::warn!(%node, reason = %why, "old primary not re-pointed; it stays fenced")
                }
                Err(why) if why.standby_unreachable(node) => tracing::warn!(
                    %node,
                    reason = %why,
                    "standby unreachable; re-pointed when it returns"
                ),
                Err(why) => cluster.cannot_follow(node, why.to_string()),
            }
        });
    }
}

/// Re-point standbys that returned after a failover (see the module docs),
/// until shutdown.
pub(crate) async fn watch_returning(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen_before: HashSet<NodeId> = HashSet::new();
    let mut running: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
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
        let mut seen_now = HashSet::new();
        for n in &snap.nodes {
            if n.id == primary
                || n.pg_status != PgStatus::Up
                || n.role != Role::Standby
                || n.repl.streaming_from_primary
                || running.contains_key(&n.id)
                || cluster.is_held(n.id)
            {
                continue;
            }
            let Some(why) = not_following(&cluster, &cfg, &snap, n.id, primary).await else {
                continue;
            };
            if !seen_before.contains(&n.id) {
                seen_now.insert(n.id);
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
                    Err(why) => cluster.cannot_follow(node, why.to_string()),
                }
            });
            running.insert(node, task);
        }
        seen_before = seen_now;
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

/// Re-point standby `node` at `new`, then wait until it streams from it.
async fn follow_one(
    cfg: &Config,
    node: NodeId,
    new: NodeId,
    old: Option<NodeId>,
    switch_lsn: Option<u64>,
) -> Result<(), FollowError> {
    let f = &cfg.failover;
    if !f.follow_primary_command.trim().is_empty() {
        let sql = "SELECT current_setting('primary_slot_name')";
        let rows = monitor_query(cfg, node, sql, cfg.health_check.timeout).await?;
        let slot = rows.first().and_then(|r| r.first().cloned().flatten());
        ensure_slot(cfg, node, new, slot.as_deref().unwrap_or_default()).await?;
        let nodes = HookNodes {
            failed: Some(node),
            new_primary: Some(new),
            old_primary: old,
        };
        let line = hooks::expand(&f.follow_primary_command, cfg, nodes);
        hooks::run("follow_primary_command", &line, f.follow_timeout).await?;
    } else {
        repoint(cfg, node, new, switch_lsn).await?;
    }
    wait_streaming(cfg, node, new, f.follow_timeout).await
}

/// The built-in re-pointing (see the module docs).
async fn repoint(
    cfg: &Config,
    node: NodeId,
    new: NodeId,
    switch_lsn: Option<u64>,
) -> Result<(), FollowError> {
    let limit = cfg.health_check.timeout;
    let sql = "SELECT pg_is_in_recovery(), current_setting('primary_conninfo'), \
               pg_last_wal_replay_lsn(), current_setting('recovery_target_timeline'), \
               current_setting('primary_slot_name')";
    let rows = monitor_query(cfg, node, sql, limit).await?;
    let row = rows.first().ok_or(NodeQueryError::NoRow { node })?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if col(0) != "t" {
        return Err(FollowError::NotInRecovery { node });
    }
    if let (Some(switch), Some(replay)) = (switch_lsn, parse_lsn(&col(2)))
        && replay > switch
    {
        return Err(FollowError::Diverged {
            node,
            replay,
            switch,
        });
    }
    let timeline = col(3);
    if timeline != "latest" {
        return Err(FollowError::PinnedTimeline { timeline });
    }
    // After the checks: a standby that cannot follow gets no slot retaining
    // WAL on the new primary.
    ensure_slot(cfg, node, new, &col(4)).await?;
    let current = col(1);
    let b = &cfg.backends[new.index()];
    let app = &cfg.backends[node.index()].application_name;
    let wanted = repointed_conninfo(&current, &b.host, b.port, app).ok_or_else(|| {
        FollowError::Conninfo {
            conninfo: current.clone(),
        }
    })?;
    if wanted != current {
        let alter = format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            wanted.replace('\'', "''")
        );
        monitor_query(cfg, node, &alter, limit).await?;
        monitor_query(cfg, node, "SELECT pg_reload_conf()", limit).await?;
        tracing::info!(
            %node,
            primary = %new,
            "primary_conninfo re-pointed and reloaded"
        );
    }
    Ok(())
}

/// Create physical slot `slot` (standby `node`'s `primary_slot_name`; empty:
/// none) on `new` unless it exists there, reserving WAL at once so the
/// standby streams on without a gap.
async fn ensure_slot(
    cfg: &Config,
    node: NodeId,
    new: NodeId,
    slot: &str,
) -> Result<(), FollowError> {
    if slot.is_empty() {
        return Ok(());
    }
    let name = slot.replace('\'', "''");
    let sql = format!(
        "SELECT pg_create_physical_replication_slot('{name}', true) \
         WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}')"
    );
    let limit = cfg.health_check.timeout;
    let rows = match monitor_query(cfg, new, &sql, limit).await {
        Ok(rows) => rows,
        Err(source) => {
            // Another follow of the same standby (a returning one) may have
            // created it meanwhile: that is success.
            let exists = format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}'");
            match monitor_query(cfg, new, &exists, limit).await {
                Ok(r) if !r.is_empty() => Vec::new(),
                _ => {
                    return Err(FollowError::Slot {
                        slot: slot.to_string(),
                        source,
                    });
                }
            }
        }
    };
    if rows.is_empty() {
        tracing::info!(
            %node,
            primary = %new,
            slot,
            "replication slot already on the new primary"
        );
    } else {
        tracing::warn!(
            %node,
            primary = %new,
            slot,
            "replication slot created on the new primary"
        );
    }
    Ok(())
}

/// Wait until `node`'s WAL receiver streams from `new`.
async fn wait_streaming(
    cfg: &Config,
    node: NodeId,
    new: NodeId,
    limit: Duration,
) -> Result<(), FollowError> {
    let deadline = Instant::now() + limit;
    let b = &cfg.backends[new.index()];
    let sql = "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver";
    loop {
        let last = match monitor_query(cfg, node, sql, Duration::from_secs(2)).await {
            Ok(rows) => match rows.first() {
                Some(r) => {
                    let col = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                    if col(0) == "streaming" && col(1) == b.host && col(2) == b.port.to_string() {
                        return Ok(());
                    }
                    format!("WAL receiver {} from {}:{}", col(0), col(1), col(2))
                }
                None => "no WAL receiver running".into(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(FollowError::NotStreaming {
                node,
                new,
                limit,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `conninfo` with `host`/`port` replaced (and `hostaddr` dropped, as it
/// would win over `host`); `application_name` added when missing and
/// configured. `None` for a URI or an unparsable string.
pub(crate) fn repointed_conninfo(
    conninfo: &str,
    host: &str,
    port: u16,
    app: &str,
) -> Option<String> {
    let t = conninfo.trim_start();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        return None;
    }
    let mut pairs = parse_conninfo(conninfo)?;
    pairs.retain(|(k, _)| k != "hostaddr");
    let mut set = |key: &str, value: String, only_if_missing: bool| match pairs
        .iter_mut()
        .find(|(k, _)| k == key)
    {
        Some(p) if !only_if_missing => p.1 = value,
        Some(_) => {}
        None => pairs.push((key.to_string(), value)),
    };
    set("host", host.to_string(), false);
    set("port", port.to_string(), false);
    if !app.is_empty() {
        set("application_name", app.to_string(), true);
    }
    Some(
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", quote_value(v)))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// libpq key/value pairs: `key = value`, values bare or single-quoted with
/// backslash escapes.
fn parse_conninfo(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn quote_value(v: &str) -> String {
    let plain = !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_is_repointed_keeping_the_rest() {
        let ci = "user=postgres passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer host=10.0.0.1 hostaddr=10.0.0.1 port=5432 sslmode=prefer application_name=node2";
        assert_eq!(
            repointed_conninfo(ci, "10.0.0.2", 5433, "ignored").unwrap(),
            "user=postgres passfile=/var/lib/postgresql/.pgpass channel_binding=prefer host=10.0.0.2 port=5433 sslmode=prefer application_name=node2"
        );
        assert_eq!(
            repointed_conninfo("host = h port=1 password='a b\\'c'", "n", 2, "node1").unwrap(),
            "host=n port=2 password='a b\\'c' application_name=node1"
        );
        assert_eq!(repointed_conninfo("", "n", 2, "").unwrap(), "host=n port=2");
        assert_eq!(repointed_conninfo("postgresql://h:1/db", "n", 2, ""), None);
        assert_eq!(repointed_conninfo("host", "n", 2, ""), None);
        assert_eq!(repointed_conninfo("a='unterminated", "n", 2, ""), None);
    }
}
