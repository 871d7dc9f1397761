//! The result sets of admin commands, built from a cluster snapshot, health
//! statistics, metrics counters, the pool and the session registry.
//!
//! pgpool-compatible commands keep pgpool's column names, order and value
//! formats. `SHOW POOL_PROCESSES` and `SHOW POOL_POOLS` are adapted to
//! pgpilot's model (one shared pool instead of a process per client):
//!
//! `SHOW POOL_PROCESSES`, one row per logged-in client session:
//! `pool_pid` (the BackendKeyData pid pgpilot gave the client), `start_time`
//! (login), `database`, `username`, `application_name`, `client_address`
//! (`host:port`), `node_id` / `backend_pid` / `backend_connection_time` of the
//! server connection currently serving it (empty when none), `status`
//! (`Connecting`, `Idle`, `Execute command`, `Idle in transaction` …).
//!
//! `SHOW POOL_POOLS`, one row per server connection: `node_id`, `hostname`,
//! `port`, `database`, `username`, `pool_backendpid`,
//! `backend_connection_time` (opened), `status` (`in use` or `idle`),
//! `pool_pid` and `client_connection_time` of the session using it (empty
//! when idle), `idle_duration` (seconds in the pool; empty when in use).

use std::time::Instant;

use super::format::{delay_seconds, f6, local_time, millis, opt_local_time};
use super::{AdminCaller, ResultSet};
use crate::cluster::{ClusterSnapshot, HoldKind, NodeView, PgStatus};
use crate::config::{Config, NodeId};
use crate::context::ProxyContext;
use crate::protocol::lsn::format_lsn;
use crate::protocol::messages::PgError;

/// SQLSTATE for an unknown `PGPOOL SHOW` parameter.
const UNDEFINED_OBJECT: &str = "42704";

/// pgpool's `role` column: the proxy's view.
fn proxy_role(s: &ClusterSnapshot, n: &NodeView) -> &'static str {
    if s.primary == Some(n.id) {
        "primary"
    } else {
        "standby"
    }
}

/// `SHOW PGPILOT_NODES`' `role`: pgpool's `role`, except that a fenced old
/// primary (`hold`) shows as `fenced`. pgpool's column calls every node that is
/// not the primary `standby`, which `SHOW POOL_NODES` keeps for pgpool's
/// clients but which reads as if the old primary had become one.
fn pilot_role(s: &ClusterSnapshot, n: &NodeView, hold: Option<HoldKind>) -> &'static str {
    match hold {
        Some(HoldKind::Fenced) if s.primary != Some(n.id) => "fenced",
        _ => proxy_role(s, n),
    }
}

/// pgpool's `pg_role`: the node's live claim, `unknown` when unreachable.
fn pg_role(n: &NodeView) -> &'static str {
    if n.pg_status == PgStatus::Up {
        n.role.as_str()
    } else {
        "unknown"
    }
}

pub(super) fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// `SHOW POOL_NODES`: pgpool 4.3+'s 14 columns.
pub(super) fn pool_nodes(ctx: &ProxyContext, who: &AdminCaller) -> ResultSet {
    let s = ctx.cluster.snapshot();
    let total: f64 = s.nodes.iter().map(|n| n.weight.max(0.0)).sum();
    let rows = s
        .nodes
        .iter()
        .map(|n| {
            let is_primary = s.primary == Some(n.id);
            let delay = if is_primary {
                "0".to_string()
            } else if s.lag_policy.by_time() {
                delay_seconds(n.repl.lag_seconds.unwrap_or(0.0))
            } else {
                n.repl.lag_bytes.unwrap_or(0).to_string()
            };
            let (state, sync) = if is_primary {
                (String::new(), String::new())
            } else {
                (n.repl.state.clone(), n.repl.sync_state.clone())
            };
            vec![
                n.id.to_string(),
                n.host.clone(),
                n.port.to_string(),
                n.status.as_str().into(),
                n.pg_status.as_str().into(),
                f6(if total > 0.0 { n.weight / total } else { 0.0 }),
                proxy_role(&s, n).into(),
                pg_role(n).into(),
                ctx.metrics.select_count(n.id).to_string(),
                (who.load_balance_node == Some(n.id)).to_string(),
                delay,
                state,
                sync,
                local_time(n.last_change),
            ]
        })
        .collect();
    ResultSet::new(
        &[
            "node_id",
            "hostname",
            "port",
            "status",
            "pg_status",
            "lb_weight",
            "role",
            "pg_role",
            "select_cnt",
            "load_balance_node",
            "replication_delay",
            "replication_state",
            "replication_sync_state",
            "last_status_change",
        ],
        rows,
    )
}

/// `SHOW POOL_VERSION`.
pub(super) fn pool_version() -> ResultSet {
    ResultSet::new(
        &["pool_version"],
        vec![vec![format!("{} (pgpilot)", env!("CARGO_PKG_VERSION"))]],
    )
}

/// `SHOW POOL_HEALTH_CHECK_STATS`: pgpool's 20 columns; durations in ms.
pub(super) fn health_check_stats(ctx: &ProxyContext) -> ResultSet {
    let s = ctx.cluster.snapshot();
    let stats = ctx.cluster.health_stats();
    let rows = s
        .nodes
        .iter()
        .map(|n| {
            let h = stats.get(n.id.index()).cloned().unwrap_or_default();
            vec![
                n.id.to_string(),
                n.host.clone(),
                n.port.to_string(),
                n.status.as_str().into(),
                proxy_role(&s, n).into(),
                local_time(n.last_change),
                h.total_count.to_string(),
                h.success_count.to_string(),
                h.fail_count.to_string(),
                h.skip_count.to_string(),
                h.retry_count.to_string(),
                f6(h.average_retry_count()),
                h.max_retry_count.to_string(),
                millis(h.max_duration),
                millis(h.min_duration.unwrap_or_default()),
                f6(h.average_duration().as_secs_f64() * 1000.0),
                opt_local_time(h.last_health_check),
                opt_local_time(h.last_successful_health_check),
                opt_local_time(h.last_skip_health_check),
                opt_local_time(h.last_failed_health_check),
            ]
        })
        .collect();
    ResultSet::new(
        &[
            "node_id",
            "hostname",
            "port",
            "status",
            "role",
            "last_status_change",
            "total_count",
            "success_count",
            "fail_count",
            "skip_count",
            "retry_count",
            "average_retry_count",
            "max_retry_count",
            "max_duration",
            "min_duration",
            "average_duration",
            "last_health_check",
            "last_successful_health_check",
            "last_skip_health_check",
            "last_failed_health_check",
        ],
        rows,
    )
}

/// `SHOW POOL_BACKEND_STATS`: pgpool's 14 columns.
pub(super) fn backend_stats(ctx: &ProxyContext) -> ResultSet {
    let s = ctx.cluster.snapshot();
    let rows = s
        .nodes
        .iter()
        .map(|n| {
            let c = ctx.metrics.node_counts(n.id);
            vec![
                n.id.to_string(),
                n.host.clone(),
                n.port.to_string(),
                n.status.as_str().into(),
                proxy_role(&s, n).into(),
                c.select.to_string(),
                c.insert.to_string(),
                c.update.to_string(),
                c.delete.to_string(),
                c.ddl.to_string(),
                c.other.to_string(),
                c.panic.to_string(),
                c.fatal.to_string(),
                c.error.to_string(),
            ]
        })
        .collect();
    ResultSet::new(
        &[
            "node_id",
            "hostname",
            "port",
            "status",
            "role",
            "select_cnt",
            "insert_cnt",
            "update_cnt",
            "delete_cnt",
            "ddl_cnt",
            "other_cnt",
            "panic_cnt",
            "fatal_cnt",
            "error_cnt",
        ],
        rows,
    )
}

/// `SHOW POOL_PROCESSES`: one row per client session (see the module docs).
pub(super) fn pool_processes(ctx: &ProxyContext) -> ResultSet {
    let rows = ctx
        .sessions
        .list()
        .iter()
        .map(|si| {
            let b = si.backend();
            vec![
                si.pid.to_string(),
                local_time(si.started),
                si.database.to_string(),
                si.user.to_string(),
                si.application_name.to_string(),
                opt(si.client_addr),
                opt(b.map(|b| b.0)),
                opt(b.map(|b| b.1)),
                opt(b.map(|b| local_time(b.2))),
                si.state().as_str().into(),
            ]
        })
        .collect();
    ResultSet::new(
        &[
            "pool_pid",
            "start_time",
            "database",
            "username",
            "application_name",
            "client_address",
            "node_id",
            "backend_pid",
            "backend_connection_time",
            "status",
        ],
        rows,
    )
}

/// `SHOW POOL_POOLS`: one row per server connection (see the module docs).
pub(super) fn pool_pools(ctx: &ProxyContext) -> ResultSet {
    let s = ctx.cluster.snapshot();
    let node_addr = |node: NodeId| {
        s.nodes
            .get(node.index())
            .map(|n| (n.host.clone(), n.port.to_string()))
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    for si in ctx.sessions.list() {
        for (node, pid, opened) in si.held() {
            let (host, port) = node_addr(node);
            rows.push(vec![
                node.to_string(),
                host,
                port,
                si.database.to_string(),
                si.user.to_string(),
                pid.to_string(),
                local_time(opened),
                "in use".into(),
                si.pid.to_string(),
                local_time(si.started),
                String::new(),
            ]);
        }
    }
    let now_i = Instant::now();
    for c in ctx.pool.idle_connections() {
        let (host, port) = node_addr(c.node);
        rows.push(vec![
            c.node.to_string(),
            host,
            port,
            c.database,
            c.user,
            c.pid.to_string(),
            local_time(c.opened),
            "idle".into(),
            String::new(),
            String::new(),
            now_i
                .saturating_duration_since(c.last_used)
                .as_secs()
                .to_string(),
        ]);
    }
    rows.sort_by(|a, b| (&a[0], &a[5]).cmp(&(&b[0], &b[5])));
    ResultSet::new(
        &[
            "node_id",
            "hostname",
            "port",
            "database",
            "username",
            "pool_backendpid",
            "backend_connection_time",
            "status",
            "pool_pid",
            "client_connection_time",
            "idle_duration",
        ],
        rows,
    )
}

/// `SHOW PGPILOT_NODES`: the node state pgpool does not show.
pub(super) fn pgpilot_nodes(ctx: &ProxyContext) -> ResultSet {
    let s = ctx.cluster.snapshot();
    let stats = ctx.cluster.health_stats();
    let holds = ctx.cluster.holds();
    let rows = s
        .nodes
        .iter()
        .map(|n| {
            let r = &n.repl;
            let hold = holds.get(n.id.index()).copied().flatten();
            vec![
                n.id.to_string(),
                n.host.clone(),
                n.port.to_string(),
                n.status.as_str().into(),
                n.pg_status.as_str().into(),
                pilot_role(&s, n, hold).into(),
                pg_role(n).into(),
                n.weight.to_string(),
                f6(n.effective_weight),
                opt(r.lag_bytes),
                r.lag_seconds.map(f6).unwrap_or_default(),
                opt(r.replay_paused),
                opt(r.timeline),
                r.lsn.map(format_lsn).unwrap_or_default(),
                r.receive_lsn.map(format_lsn).unwrap_or_default(),
                opt_local_time(r.last_replay_at),
                r.state.clone(),
                r.sync_state.clone(),
                r.application_name.clone(),
                local_time(n.last_change),
                opt_local_time(stats.get(n.id.index()).and_then(|h| h.last_health_check)),
                opt_local_time(r.checked_at),
                n.held_out.clone().unwrap_or_default(),
                r.issue.clone().unwrap_or_default(),
                n.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    ResultSet::new(
        &[
            "node_id",
            "hostname",
            "port",
            "status",
            "pg_status",
            "role",
            "pg_role",
            "weight",
            "effective_weight",
            "lag_bytes",
            "lag_seconds",
            "replay_paused",
            "timeline",
            "lsn",
            "receive_lsn",
            "last_replay",
            "replication_state",
            "replication_sync_state",
            "application_name",
            "last_status_change",
            "last_health_check",
            "last_replication_check",
            "held_out",
            "replication_issue",
            "last_error",
        ],
        rows,
    )
}

/// Seconds as pgpool writes them: an integer when whole, else a decimal.
fn secs(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}", d.as_secs_f64())
    }
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}

/// pgpool parameter names with pgpilot's values: (name, value, description).
fn pgpool_settings(cfg: &Config) -> Vec<(String, String, &'static str)> {
    let hc = &cfg.health_check;
    let sr = &cfg.sr_check;
    let mut v: Vec<(String, String, &'static str)> = vec![
        (
            "listen_addresses".into(),
            cfg.listen.clone(),
            "pgpilot: listen",
        ),
        (
            "health_check_period".into(),
            secs(hc.period),
            "health_check.period (seconds)",
        ),
        (
            "health_check_timeout".into(),
            secs(hc.timeout),
            "health_check.timeout (seconds)",
        ),
        (
            "health_check_max_retries".into(),
            hc.max_retries.to_string(),
            "health_check.max_retries",
        ),
        (
            "health_check_retry_delay".into(),
            secs(hc.retry_delay),
            "health_check.retry_delay (seconds)",
        ),
        (
            "health_check_user".into(),
            cfg.monitor.user.clone(),
            "monitor.user",
        ),
        (
            "health_check_database".into(),
            cfg.monitor.database.clone(),
            "monitor.database",
        ),
        (
            "auto_failback".into(),
            on_off(hc.auto_failback),
            "health_check.auto_failback",
        ),
        (
            "sr_check_period".into(),
            secs(sr.period),
            "sr_check.period (seconds)",
        ),
        (
            "sr_check_user".into(),
            cfg.monitor.user.clone(),
            "monitor.user",
        ),
        (
            "sr_check_database".into(),
            cfg.monitor.database.clone(),
            "monitor.database",
        ),
        (
            "delay_threshold".into(),
            sr.delay_threshold.to_string(),
            "sr_check.delay_threshold (bytes)",
        ),
        (
            "delay_threshold_by_time".into(),
            sr.delay_threshold_by_time.as_millis().to_string(),
            "sr_check.delay_threshold_by_time (milliseconds)",
        ),
        (
            "prefer_lower_delay_standby".into(),
            on_off(sr.prefer_lower_delay_standby),
            "sr_check.prefer_lower_delay_standby",
        ),
        (
            "load_balance_mode".into(),
            "on".into(),
            "always on in pgpilot",
        ),
        (
            "failover_command".into(),
            cfg.failover.command.clone(),
            "failover.command (failover.mode = \"command\")",
        ),
        (
            "follow_primary_command".into(),
            cfg.failover.follow_primary_command.clone(),
            "failover.follow_primary_command",
        ),
        (
            "search_primary_node_timeout".into(),
            secs(cfg.failover.search_primary_timeout),
            "failover.search_primary_timeout (seconds)",
        ),
        (
            "failover_on_backend_error".into(),
            on_off(cfg.failover.detect_on_session_error),
            "failover.detect_on_session_error (confirmed by a direct probe)",
        ),
        (
            "detach_false_primary".into(),
            "on".into(),
            "always on in pgpilot",
        ),
    ];
    for (i, b) in cfg.backends.iter().enumerate() {
        v.push((
            format!("backend_hostname{i}"),
            b.host.clone(),
            "backends[].host",
        ));
        v.push((
            format!("backend_port{i}"),
            b.port.to_string(),
            "backends[].port",
        ));
        v.push((
            format!("backend_weight{i}"),
            b.weight.to_string(),
            "backends[].weight",
        ));
        v.push((
            format!("backend_application_name{i}"),
            b.application_name.clone(),
            "backends[].application_name",
        ));
        v.push((
            format!("backend_data_directory{i}"),
            b.data_directory.clone(),
            "backends[].data_directory",
        ));
        v.push((
            format!("backend_flag{i}"),
            if b.no_failover {
                "DISALLOW_TO_FAILOVER"
            } else {
                "ALLOW_TO_FAILOVER"
            }
            .into(),
            "backends[].no_failover",
        ));
    }
    v
}

/// `PGPOOL SHOW name` (one column named after the parameter) or
/// `PGPOOL SHOW ALL` (item, value, description).
pub(super) fn pgpool_show(cfg: &Config, name: Option<&str>) -> Result<ResultSet, PgError> {
    let settings = pgpool_settings(cfg);
    match name {
        None => Ok(ResultSet::new(
            &["item", "value", "description"],
            settings
                .into_iter()
                .map(|(n, v, d)| vec![n, v, d.to_string()])
                .collect(),
        )),
        Some(name) => {
            let (n, v, _) = settings
                .into_iter()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| {
                    PgError::error(
                        UNDEFINED_OBJECT,
                        format!("unrecognized configuration parameter \"{name}\""),
                    )
                    .with_hint("PGPOOL SHOW ALL lists the parameters pgpilot knows")
                })?;
            let mut rs = ResultSet::new(&[n.as_str()], vec![vec![v]]);
            rs.command_tag = "SHOW".into();
            Ok(rs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fenced old primary is `fenced` in `SHOW PGPILOT_NODES`, and stays
    /// `standby` in pgpool's `SHOW POOL_NODES` column; other holds keep the role.
    #[test]
    fn fenced_old_primary_shows_as_fenced() {
        use crate::cluster::{LagPolicy, NodeStatus, ReplicationView, Role};
        let node = |id| NodeView {
            id,
            host: "h".into(),
            port: 1,
            weight: 1.0,
            status: NodeStatus::Down,
            pg_status: PgStatus::Down,
            role: Role::Unknown,
            last_change: std::time::SystemTime::now(),
            last_error: None,
            held_out: None,
            effective_weight: 0.0,
            repl: ReplicationView::default(),
        };
        let s = ClusterSnapshot {
            nodes: vec![
                node(NodeId::new(0)),
                node(NodeId::new(1)),
                node(NodeId::new(2)),
            ],
            primary: Some(NodeId::new(1)),
            lag_policy: LagPolicy::default(),
            generation: 1,
        };
        let (old, new, other) = (&s.nodes[0], &s.nodes[1], &s.nodes[2]);
        assert_eq!(pilot_role(&s, old, Some(HoldKind::Fenced)), "fenced");
        assert_eq!(proxy_role(&s, old), "standby");
        assert_eq!(pilot_role(&s, new, None), "primary");
        assert_eq!(pilot_role(&s, other, Some(HoldKind::Detached)), "standby");
        assert_eq!(
            pilot_role(&s, other, Some(HoldKind::CannotFollow)),
            "standby"
        );
    }

    #[test]
    fn pgpool_show_maps_settings() {
        let cfg = Config::from_toml(
            "[[backends]]\nhost = \"h\"\nport = 5432\n[sr_check]\ndelay_threshold_by_time = \"1.5s\"",
        )
        .unwrap();
        let rs = pgpool_show(&cfg, Some("delay_threshold_by_time")).unwrap();
        assert_eq!(rs.columns, vec!["delay_threshold_by_time"]);
        assert_eq!(rs.rows, vec![vec!["1500".to_string()]]);
        let rs = pgpool_show(&cfg, Some("health_check_period")).unwrap();
        assert_eq!(rs.rows[0][0], "1");
        assert_eq!(
            pgpool_show(&cfg, Some("backend_port0")).unwrap().rows[0][0],
            "5432"
        );
        let all = pgpool_show(&cfg, None).unwrap();
        assert_eq!(all.columns, vec!["item", "value", "description"]);
        assert!(all.rows.len() > 15);
        let e = pgpool_show(&cfg, Some("nope")).unwrap_err();
        assert_eq!(e.code, "42704");
    }
}
