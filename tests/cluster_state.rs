//! Cluster state against real PostgreSQL: health checks and their hysteresis,
//! session errors that must not take nodes down, SHOW POOL_NODES and the other
//! admin commands (tokio-postgres and psql), replication lag and lag-weighted
//! read weights, Prometheus /metrics and /healthz.
//!
//! Non-destructive tests share the binary's cluster (primary + 2 standbys,
//! `common::harness`), each with its own pgpilot. The destructive test (stop
//! and restart nodes) builds its own primary + 1 standby and removes it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{
    DB, PASSWORD, Spawned, USER, connect, harness, http_get, nodes_in_service, parse_metrics, show,
    spawn_proxy_full, sqlstate, wait_for, wait_until,
};
use pgpilot::config::{Config, NodeId};
use pgpilot::localcluster::{ClusterSpec, LocalCluster};
use pgpilot::router::chooser::read_weights;

/// pgpool 4.3+'s SHOW POOL_NODES columns, in order.
const POOL_NODES_COLUMNS: [&str; 14] = [
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
];

/// Short periods so tests see several checks quickly.
fn fast(mut c: Config) -> Config {
    c.health_check.period = Duration::from_millis(500);
    c.health_check.timeout = Duration::from_secs(2);
    c.health_check.max_retries = 2;
    c.health_check.retry_delay = Duration::from_millis(300);
    c.sr_check.period = Duration::from_millis(500);
    c
}

fn assert_no_node_went_down(p: &Spawned) {
    let s = p.ctx.cluster.snapshot();
    assert_eq!(s.primary, Some(NodeId::new(0)));
    for n in &s.nodes {
        assert!(n.status.is_usable(), "node {} is {:?}", n.id, n.status);
    }
    for (i, st) in p.ctx.cluster.health_stats().iter().enumerate() {
        assert_eq!(
            st.fail_count, 0,
            "node {i} had a failed health round: {st:?}"
        );
    }
}

#[tokio::test]
async fn a_session_error_triggers_an_early_probe_but_is_no_verdict() {
    let h = harness();
    let mut cfg = h.config();
    cfg.health_check.period = Duration::from_secs(600);
    let p = spawn_proxy_full(cfg);
    nodes_in_service(&p).await;
    let before = p.ctx.cluster.health_stats()[0].total_count;
    let c = connect(p.addr, "").await;
    let e = c
        .simple_query("SELECT pg_terminate_backend(pg_backend_pid())")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    let ctx = p.ctx.clone();
    let started = Instant::now();
    wait_for(
        "an early health check of node 0",
        Duration::from_secs(5),
        || (ctx.cluster.health_stats()[0].total_count > before).then_some(()),
    )
    .await;
    eprintln!("early probe after {:?} (period 600 s)", started.elapsed());
    assert_no_node_went_down(&p);
}

#[tokio::test]
async fn killed_backends_fatal_errors_and_vanishing_clients_leave_every_node_up() {
    let h = harness();
    let p = spawn_proxy_full(fast(h.config()));
    nodes_in_service(&p).await;

    // A client kills its own backend, provokes a FATAL, vanishes mid-query.
    common::client_misbehaviour(p.addr, "").await;

    // An administrator terminates sessions' backends.
    let victim = format!("victim{}", std::process::id());
    let v1 = connect(p.addr, &format!("application_name={victim}")).await;
    let v2 = connect(p.addr, &format!("application_name={victim}")).await;
    // (Hinted: a plain SELECT would be balanced to a standby.)
    let on_primary = "/* pgpilot:primary */ SELECT 1";
    v1.simple_query(on_primary).await.unwrap();
    v2.simple_query(on_primary).await.unwrap();
    let killed = h.psql(
        0,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{victim}'"
        ),
    );
    assert_eq!(killed, "2");
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{victim}'");
    wait_until(
        "the terminated backends to exit",
        Duration::from_secs(30),
        async || h.psql(0, &gone) == "0",
    )
    .await;
    assert!(v1.simple_query(on_primary).await.is_err());
    assert!(v2.simple_query(on_primary).await.is_err());

    // Several health periods later, nothing went down.
    common::health_rounds(&p.ctx, 5).await;
    assert_no_node_went_down(&p);
    let c = connect(p.addr, "").await;
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    for r in &rows {
        assert!(matches!(r[3].as_str(), "up" | "waiting"), "{r:?}");
        assert_eq!(r[4], "up", "{r:?}");
    }
}

#[tokio::test]
async fn show_pool_nodes_has_pgpool_columns_and_values() {
    let h = harness();
    let p = spawn_proxy_full(fast(h.config()));
    nodes_in_service(&p).await;
    let ctx = p.ctx.clone();
    wait_for(
        "both standbys streaming in pg_stat_replication",
        Duration::from_secs(30),
        || {
            let s = ctx.cluster.snapshot();
            s.nodes[1..]
                .iter()
                .all(|n| n.repl.state == "streaming")
                .then_some(())
        },
    )
    .await;
    let c = connect(p.addr, "").await;
    let (cols, rows) = show(&c, "show pool_nodes;").await;
    assert_eq!(cols, POOL_NODES_COLUMNS);
    assert_eq!(rows.len(), 3);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), 14);
        assert_eq!(r[0], i.to_string());
        assert_eq!(r[1], "127.0.0.1");
        assert_eq!(r[2], h.ports[i].to_string());
        assert_eq!(r[4], "up");
        assert_eq!(r[5], "0.333333");
        assert!(r[8].parse::<u64>().is_ok(), "select_cnt {:?}", r[8]);
        assert_eq!(r[9], "false");
        assert_eq!(r[13].len(), 19, "last_status_change {:?}", r[13]);
    }
    assert_eq!(&rows[0][3], "up", "the primary served this session");
    assert_eq!((&*rows[0][6], &*rows[0][7]), ("primary", "primary"));
    assert_eq!((&*rows[0][10], &*rows[0][11], &*rows[0][12]), ("0", "", ""));
    for r in &rows[1..] {
        assert!(matches!(r[3].as_str(), "up" | "waiting"), "{r:?}");
        assert_eq!((&*r[6], &*r[7]), ("standby", "standby"));
        // delay_threshold_by_time is on by default: pgpool prints seconds.
        let delay = &r[10];
        let (num, unit) = delay.split_once(' ').expect("value and unit");
        assert!(num.parse::<f64>().is_ok() && num.split('.').nth(1).map(str::len) == Some(6));
        assert!(unit == "second" || unit == "seconds", "{delay:?}");
        assert_eq!((&*r[11], &*r[12]), ("streaming", "async"));
    }

    // The extended protocol (tokio-postgres `query`) gets the same result set.
    let ext = c.query("SHOW POOL_NODES", &[]).await.unwrap();
    assert_eq!(ext.len(), 3);
    assert_eq!(ext[0].columns().len(), 14);
    assert_eq!(ext[0].columns()[13].name(), "last_status_change");
    assert_eq!(ext[1].get::<_, &str>(6), "standby");

    // select_cnt grows on the node that served this session's reads, which is
    // its load_balance_node.
    let before: Vec<u64> = rows.iter().map(|r| r[8].parse().unwrap()).collect();
    let mut served = String::new();
    for _ in 0..6 {
        served = node_of_read(&c).await;
    }
    let i = served.trim_start_matches("node").parse::<usize>().unwrap();
    assert!(i > 0, "a plain read ran on the primary");
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    let after: u64 = rows[i][8].parse().unwrap();
    assert!(
        after >= before[i] + 6,
        "select_cnt {} -> {after}",
        before[i]
    );
    assert_eq!(rows[i][9], "true", "{:?}", rows[i]);
    assert_eq!(
        rows[i][3], "up",
        "a standby that served reads is no longer waiting"
    );

    // The same through psql, which prints what it got.
    let conninfo = format!(
        "host=127.0.0.1 port={} user={USER} dbname={DB} password={PASSWORD} connect_timeout=10",
        p.addr.port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(h.bindir.join("psql"))
            .args([
                "-X",
                "-A",
                "-F",
                "|",
                "-d",
                &conninfo,
                "-c",
                "SHOW POOL_NODES",
            ])
            .output(),
    )
    .await
    .expect("psql finished")
    .expect("run psql");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], POOL_NODES_COLUMNS.join("|"));
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[1].starts_with("0|127.0.0.1|"), "{text}");
    assert!(lines[2].contains("|standby|standby|") && lines[2].contains("|streaming|async|"));
    assert_eq!(lines[4], "(3 rows)");

    // The other admin commands answer with their columns.
    let (cols, rows) = show(&c, "SHOW POOL_VERSION").await;
    assert_eq!((cols.len(), rows.len()), (1, 1));
    assert!(rows[0][0].contains("pgpilot"));
    let (cols, rows) = show(&c, "SHOW POOL_HEALTH_CHECK_STATS").await;
    assert_eq!((cols.len(), rows.len()), (20, 3));
    assert_eq!(cols[6], "total_count");
    assert!(
        rows.iter()
            .all(|r| r[6].parse::<u64>().unwrap() >= 1 && r[8] == "0")
    );
    let (cols, rows) = show(&c, "SHOW POOL_BACKEND_STATS").await;
    assert_eq!((cols.len(), rows.len()), (14, 3));
    assert_eq!(cols[13], "error_cnt");
    let (cols, rows) = show(&c, "SHOW POOL_PROCESSES").await;
    assert_eq!(cols[0], "pool_pid");
    let mine: Vec<_> = rows
        .iter()
        // (The node this session used last: after its reads, a standby.)
        .filter(|r| r[3] == USER && r[6].parse::<usize>().is_ok_and(|n| n == 1 || n == 2))
        .collect();
    assert!(!mine.is_empty(), "{rows:?}");
    let (cols, rows) = show(&c, "SHOW POOL_POOLS").await;
    assert_eq!(cols[5], "pool_backendpid");
    assert!(
        rows.iter().any(|r| r[0] == "0" && r[7] == "in use"),
        "{rows:?}"
    );
    let (cols, rows) = show(&c, "SHOW PGPILOT_NODES").await;
    assert_eq!(rows.len(), 3);
    let col = |name: &str| cols.iter().position(|c| c == name).unwrap();
    assert_eq!(rows[0][col("effective_weight")], "1.000000");
    assert_eq!(rows[0][col("lag_bytes")], "0");
    assert_eq!(rows[1][col("replay_paused")], "false");
    assert_eq!(rows[1][col("timeline")], "1");
    assert_eq!(rows[2][col("application_name")], "node2");
    let (cols, rows) = show(&c, "PGPOOL SHOW health_check_period").await;
    assert_eq!(
        (cols, rows),
        (
            vec!["health_check_period".to_string()],
            vec![vec!["0.5".to_string()]]
        )
    );
    let (_, rows) = show(&c, "PGPOOL SHOW ALL").await;
    assert!(
        rows.iter()
            .any(|r| r[0] == "sr_check_period" && r[1] == "0.5")
    );
    // The session goes on as usual.
    let (_, rows) = show(&c, "SELECT 41 + 1").await;
    assert_eq!(rows, vec![vec!["42".to_string()]]);
}

#[tokio::test]
async fn admin_commands_need_an_admin_user() {
    let h = harness();
    let mut cfg = h.config();
    cfg.admin_users.clear();
    let p = spawn_proxy_full(cfg);
    let c = connect(p.addr, "").await;
    let e = c.simple_query("SHOW POOL_NODES").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
    let (_, rows) = show(&c, "SELECT 1").await;
    assert_eq!(rows, vec![vec!["1".to_string()]]);
}

#[tokio::test]
async fn a_paused_standby_loses_its_weight_and_gets_it_back() {
    let h = harness();
    let mut cfg = fast(h.config());
    let period = Duration::from_millis(500);
    cfg.sr_check.period = period;
    cfg.sr_check.delay_threshold = 1 << 20;
    let p = spawn_proxy_full(cfg);
    nodes_in_service(&p).await;
    let ctx = p.ctx.clone();
    wait_for("lag known for node 2", Duration::from_secs(30), || {
        let s = ctx.cluster.snapshot();
        (s.nodes[2].repl.lag_bytes.is_some() && s.nodes[2].effective_weight > 0.9).then_some(())
    })
    .await;

    // Sessions that picked their standby before the pause (some picked node 2).
    let mut early = Vec::new();
    for _ in 0..10 {
        let c = connect(p.addr, "").await;
        node_of_read(&c).await;
        early.push(c);
    }

    h.psql(2, "SELECT pg_wal_replay_pause()");
    let _resume = common::ResumeReplay(2);
    let table = format!("lag_filler_{}", std::process::id());
    h.psql(
        0,
        &format!(
            "DROP TABLE IF EXISTS {table}; \
             CREATE TABLE {table} AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 5000) g"
        ),
    );
    let written = Instant::now();
    let snap = wait_for(
        "node 2's effective weight to drop to 0",
        2 * period + Duration::from_millis(500),
        || {
            let s = ctx.cluster.snapshot();
            // (Node 1 may lag for a moment too, replaying the same bulk write.)
            (s.nodes[2].effective_weight == 0.0 && s.nodes[1].effective_weight > 0.0).then_some(s)
        },
    )
    .await;
    eprintln!("weight 0 after {:?}", written.elapsed());
    let lag = snap.nodes[2].repl.lag_bytes.unwrap();
    assert!(lag > 1 << 20, "lag {lag}");
    assert_eq!(snap.nodes[2].repl.replay_paused, Some(true));
    assert!(
        snap.nodes[2].status.is_usable(),
        "lag is not a reason to mark a node down"
    );
    let w = read_weights(&snap, false);
    let total: f64 = w.iter().sum();
    assert!(w[1] / total >= 0.95, "weights {w:?}");

    // Reads through pgpilot now: new sessions, and the sessions that had picked
    // node 2 before (they move to the other standby), ≥ 95% on node 1.
    let mut by_node: HashMap<String, u32> = HashMap::new();
    for _ in 0..100 {
        let c = connect(p.addr, "").await;
        *by_node.entry(node_of_read(&c).await).or_default() += 1;
    }
    for c in &early {
        for _ in 0..10 {
            *by_node.entry(node_of_read(c).await).or_default() += 1;
        }
    }
    eprintln!("reads with node 2 lagging: {by_node:?}");
    let on_node1 = by_node.get("node1").copied().unwrap_or(0);
    assert!(on_node1 * 100 >= 95 * 200, "{by_node:?}");

    // The lag shows in SHOW PGPILOT_NODES and in /metrics.
    let c = connect(p.addr, "").await;
    let (cols, rows) = show(&c, "SHOW PGPILOT_NODES").await;
    let col = |name: &str| cols.iter().position(|c| c == name).unwrap();
    assert_eq!(rows[2][col("replay_paused")], "true");
    assert_eq!(rows[2][col("effective_weight")], "0.000000");
    assert!(rows[2][col("lag_bytes")].parse::<u64>().unwrap() > 1 << 20);
    let (code, body) = http_get(p.metrics.expect("metrics on"), "/metrics").await;
    assert_eq!(code, 200);
    let m = parse_metrics(&body);
    assert!(m["pgpilot_node_replication_lag_bytes{node=\"2\"}"] > (1 << 20) as f64);
    assert_eq!(m["pgpilot_node_effective_weight{node=\"2\"}"], 0.0);
    assert_eq!(m["pgpilot_node_replay_paused{node=\"2\"}"], 1.0);

    h.psql(2, "SELECT pg_wal_replay_resume()");
    wait_for(
        "node 2's weight to come back",
        Duration::from_secs(15),
        || (ctx.cluster.snapshot().nodes[2].effective_weight > 0.9).then_some(()),
    )
    .await;
    // Traffic returns: new sessions read on node 2 again.
    let mut back = 0;
    for _ in 0..60 {
        let c = connect(p.addr, "").await;
        if node_of_read(&c).await == "node2" {
            back += 1;
        }
    }
    eprintln!("after resume: {back}/60 new sessions read on node 2");
    assert!(back > 5, "reads did not return to node 2");
    h.psql(0, &format!("DROP TABLE {table}"));
}

/// Where a plain read of this session runs.
async fn node_of_read(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_setting('cluster_name')", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn metrics_and_healthz_over_http() {
    let h = harness();
    let p = spawn_proxy_full(fast(h.config()));
    nodes_in_service(&p).await;
    let ctx = p.ctx.clone();
    wait_for("a replication check", Duration::from_secs(30), || {
        ctx.cluster.snapshot().nodes[1].repl.lag_bytes.map(|_| ())
    })
    .await;
    let c = connect(p.addr, "").await;
    c.simple_query("SELECT 1").await.unwrap();
    let addr = p.metrics.expect("metrics on");
    assert!(addr.ip().is_loopback());
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let m = parse_metrics(&body);
    for (k, want) in [
        ("pgpilot_node_up{node=\"0\"}", Some(1.0)),
        ("pgpilot_node_primary{node=\"0\"}", Some(1.0)),
        ("pgpilot_node_role{node=\"1\",role=\"standby\"}", Some(1.0)),
        ("pgpilot_node_replication_lag_bytes{node=\"1\"}", None),
        ("pgpilot_node_replication_lag_seconds{node=\"1\"}", None),
        ("pgpilot_node_effective_weight{node=\"1\"}", None),
        ("pgpilot_primary_available", Some(1.0)),
        ("pgpilot_client_connections", Some(1.0)),
        (
            "pgpilot_backend_connections{node=\"0\",state=\"active\"}",
            Some(1.0),
        ),
        (
            "pgpilot_health_check_duration_seconds_count{node=\"2\"}",
            None,
        ),
        ("pgpilot_health_check_failures_total{node=\"0\"}", Some(0.0)),
        ("pgpilot_classify_cache_hits_total", None),
        ("pgpilot_classify_cache_misses_total", None),
    ] {
        let got = m.get(k).unwrap_or_else(|| panic!("{k} missing in\n{body}"));
        if let Some(w) = want {
            assert_eq!(*got, w, "{k}");
        }
    }
    assert!(body.contains("# TYPE pgpilot_health_check_duration_seconds histogram"));
    assert!(body.contains("# TYPE pgpilot_statements_routed_total counter"));
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/nope").await.0, 404);
}

#[tokio::test]
async fn a_stopped_standby_goes_down_within_the_bound_and_comes_back() {
    let spec = ClusterSpec {
        standbys: 1,
        users: vec![(USER.into(), PASSWORD.into())],
        databases: vec![(DB.into(), USER.into())],
        ..ClusterSpec::default()
    };
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(spec))
        .await
        .unwrap()
        .expect("start a primary + 1 standby");
    let mut cfg = pgpilot::demo::config_for(&cluster, "127.0.0.1:0", &[(USER, PASSWORD)]);
    cfg.metrics.listen = "127.0.0.1:0".into();
    let mut cfg = fast(cfg);
    cfg.health_check.period = Duration::from_secs(1);
    // This test checks what pgpilot shows without a primary: no failover
    // (tests/failover.rs covers failover).
    cfg.failover.mode = pgpilot::config::FailoverMode::None;
    let hc = cfg.health_check.clone();
    let bound = hc.period * (hc.max_retries + 1) + hc.timeout;
    let p = spawn_proxy_full(cfg);
    let ctx = p.ctx.clone();
    wait_for("both nodes in service", Duration::from_secs(30), || {
        let s = ctx.cluster.snapshot();
        (s.primary == Some(NodeId::new(0)) && s.nodes.iter().all(|n| n.status.is_usable()))
            .then_some(())
    })
    .await;
    let c = connect(p.addr, "").await;

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop_node(1, "fast").expect("stop the standby");
        cluster
    })
    .await
    .unwrap();
    let stopped = Instant::now();
    wait_for("node 1 down", bound, || {
        (!ctx.cluster.snapshot().nodes[1].status.is_usable()).then_some(())
    })
    .await;
    eprintln!(
        "standby down after {:?} (bound {bound:?})",
        stopped.elapsed()
    );
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    assert_eq!(
        (&*rows[1][3], &*rows[1][4], &*rows[1][7]),
        ("down", "down", "unknown")
    );
    assert_eq!(rows[0][3], "up");
    assert_eq!(http_get(p.metrics.unwrap(), "/healthz").await.0, 200);
    assert_eq!(p.ctx.cluster.snapshot().nodes[1].effective_weight, 0.0);

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_node(1).expect("restart the standby");
        cluster
    })
    .await
    .unwrap();
    let restarted = Instant::now();
    wait_for("node 1 back in service", Duration::from_secs(30), || {
        let s = ctx.cluster.snapshot();
        (s.nodes[1].status.is_usable() && s.nodes[1].repl.state == "streaming").then_some(())
    })
    .await;
    eprintln!("standby back after {:?}", restarted.elapsed());
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    assert!(matches!(rows[1][3].as_str(), "up" | "waiting"), "{rows:?}");

    // Without a primary, /healthz says 503.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop_node(0, "immediate").expect("stop the primary");
        cluster
    })
    .await
    .unwrap();
    wait_for("no primary", bound, || {
        (!ctx.cluster.snapshot().has_primary()).then_some(())
    })
    .await;
    assert_eq!(http_get(p.metrics.unwrap(), "/healthz").await.0, 503);
    let mut cluster = cluster;
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .unwrap();
}

#[tokio::test]
async fn health_checks_keep_their_connection_renew_it_and_shrug_off_its_loss() {
    let h = harness();
    let mut cfg = fast(h.config());
    cfg.health_check.connection_lifetime = Duration::from_secs(3);
    let role = common::own_monitor_role(h, &mut cfg, "mon_hc").await;
    let p = spawn_proxy_full(cfg);
    nodes_in_service(&p).await;
    let pid_of = || -> Vec<String> {
        common::monitor_backends(h, 0, &role, "pgpilot-health")
            .iter()
            .map(|l| l.split(' ').next().unwrap_or_default().to_string())
            .collect()
    };
    // The first periodic check opens a connection (the initial one closes
    // its own); it then serves check after check.
    let first = wait_for("a kept health connection", Duration::from_secs(5), || {
        let now = pid_of();
        (now.len() == 1).then_some(now)
    })
    .await;
    let checks = p.ctx.cluster.health_stats()[0].total_count;
    let ctx = p.ctx.clone();
    wait_for("two more checks", Duration::from_secs(30), || {
        (ctx.cluster.health_stats()[0].total_count >= checks + 2).then_some(())
    })
    .await;
    assert_eq!(pid_of(), first, "a check opened a new connection");
    // Killing it costs nothing: the next check opens another at once.
    h.psql(0, &format!("SELECT pg_terminate_backend({})", first[0]));
    let replaced = wait_for("a new health connection", Duration::from_secs(5), || {
        let now = pid_of();
        (now.len() == 1 && now != first).then_some(now)
    })
    .await;
    // It is renewed after connection_lifetime, proving new connections still work.
    wait_for("the connection renewed", Duration::from_secs(6), || {
        let now = pid_of();
        (now.len() == 1 && now != replaced).then_some(())
    })
    .await;
    assert_no_node_went_down(&p);
}
