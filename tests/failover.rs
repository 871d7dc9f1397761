//! Failover against real PostgreSQL: each destructive test builds its own
//! cluster (primary + standbys, real servers on loopback) and its own
//! pgpilot, stops the primary with `pg_ctl stop -m immediate` or switches it
//! over, and checks what clients saw and where the data is. Tests that only
//! change pgpilot's view (detach/attach, client misbehaviour) share the
//! binary's cluster from `common::harness`.
//!
//! Destructive tests run one at a time ([`SERIAL`]): the machine has few
//! cores and the downtime measured should not depend on a neighbour's
//! initdb.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::load::{Ack, Load, reader};
use common::{
    DB, PASSWORD, StoppableProxy, USER, connect, harness, http_get, parse_metrics, result_set,
    show, spawn_proxy_stoppable, sqlstate, wait_for,
};
use pgpilot::cluster::events::Event;
use pgpilot::config::{Config, ConsistencyMode, FailoverMode};
use pgpilot::localcluster::{ClusterSpec, LocalCluster};

/// One destructive test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A primary and `standbys` standbys with the test role and database.
async fn new_cluster(standbys: usize, synchronous: bool, extra: &[&str]) -> Arc<LocalCluster> {
    common::init_logs();
    let spec = ClusterSpec {
        standbys,
        users: vec![(USER.into(), PASSWORD.into())],
        databases: vec![(DB.into(), USER.into())],
        extra_conf: extra.iter().map(|s| s.to_string()).collect(),
        synchronous,
    };
    let c = blocking(move || LocalCluster::start(spec))
        .await
        .expect("start a local cluster");
    Arc::new(c)
}

/// pgpilot's configuration for `c` with default failover settings.
fn config_for(c: &LocalCluster) -> Config {
    let mut cfg = pgpilot::demo::config_for(c, "127.0.0.1:0", &[(USER, PASSWORD)]);
    cfg.metrics.listen = "127.0.0.1:0".into();
    cfg
}

/// psql as the superuser in the test database on `node`.
async fn psql(c: &Arc<LocalCluster>, node: usize, sql: &str) -> String {
    psql_in(c, node, DB, sql).await
}

/// psql as the superuser in database `db` on `node`.
async fn psql_in(c: &Arc<LocalCluster>, node: usize, db: &str, sql: &str) -> String {
    let (c, db, sql) = (c.clone(), db.to_string(), sql.to_string());
    blocking(move || c.psql_db(node, &db, &sql))
        .await
        .unwrap_or_else(|e| panic!("psql on node {node}: {e}"))
}

/// Transactions and sessions in the test database on `node`, read from the
/// `postgres` database (so the reading does not count).
async fn activity(c: &Arc<LocalCluster>, node: usize) -> String {
    let sql = "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'app')                || '/' || (SELECT count(*) FROM pg_stat_activity WHERE datname = 'app')";
    psql_in(c, node, "postgres", sql).await
}

/// Every node in service, `primary` the primary, every standby streaming.
async fn all_in_service(p: &StoppableProxy, primary: usize) {
    let ctx = p.ctx.clone();
    wait_for(
        "every node in service and streaming",
        Duration::from_secs(30),
        || {
            let s = ctx.cluster.snapshot();
            let ok = s.primary == Some(primary)
                && s.nodes.iter().all(|n| n.status.is_usable())
                && s.nodes
                    .iter()
                    .filter(|n| n.id != primary)
                    .all(|n| n.repl.state == "streaming");
            ok.then_some(())
        },
    )
    .await;
}

/// Table `t` (one text key per acknowledged write), owned by the test role.
async fn create_table(c: &Arc<LocalCluster>) {
    psql(
        c,
        0,
        "CREATE TABLE t (k text PRIMARY KEY); ALTER TABLE t OWNER TO app",
    )
    .await;
}

/// Keys present in table `t` on `node`.
async fn keys_on(c: &Arc<LocalCluster>, node: usize) -> HashSet<String> {
    psql(c, node, "SELECT k FROM t")
        .await
        .lines()
        .map(str::to_string)
        .collect()
}

/// `name{labels}` → value of a Prometheus text exposition.
async fn metrics(p: &StoppableProxy) -> HashMap<String, f64> {
    let (code, body) = http_get(p.metrics.expect("metrics on"), "/metrics").await;
    assert_eq!(code, 200);
    parse_metrics(&body)
}

/// Wait until the write `key` (made through pgpilot after a failover) is on
/// `node`: it streams from the new primary.
async fn replicated_to(c: &Arc<LocalCluster>, node: usize, key: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let sql = format!("SELECT count(*) FROM t WHERE k = '{key}'");
        let (c2, sql2) = (c.clone(), sql.clone());
        let got = blocking(move || c2.psql_db(node, DB, &sql2)).await;
        if got.as_deref().ok() == Some("1") {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "row {key} never reached node {node}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn killing_the_primary_under_write_load_promotes_the_most_advanced_standby() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, true, &[]).await;
    create_table(&cluster).await;
    let p = spawn_proxy_stoppable(config_for(&cluster));
    all_in_service(&p, 0).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();

    let load = Load::writers(p.addr, 4, Duration::from_millis(5), true);
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reads = reader(p.addr, stop_reader.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let killed = Instant::now();
    let c = cluster.clone();
    blocking(move || c.stop_node(0, "immediate"))
        .await
        .expect("stop the primary");
    let ctx = p.ctx.clone();
    let new = wait_for("a new primary", Duration::from_secs(30), || {
        ctx.cluster.snapshot().primary.filter(|&n| n != 0)
    })
    .await;
    let published = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = load.finish().await;
    stop_reader.store(true, Ordering::Relaxed);
    let read_seen = reads.await.unwrap();

    // Downtime: kill → first write acknowledged by the new primary.
    let first_new = seen
        .iter()
        .flat_map(|s| &s.acks)
        .filter(|a| a.port == ports[new] && a.at > killed)
        .map(|a| a.at)
        .min()
        .unwrap_or_else(|| {
            let ports: Vec<(u16, usize)> = seen
                .iter()
                .map(|s| (s.acks.last().map_or(0, |a| a.port), s.acks.len()))
                .collect();
            panic!(
                "writes did not resume on node {new}: last ports/acks {ports:?}; errors {:?}",
                seen.iter()
                    .map(|s| s.errors.iter().rev().take(3).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            )
        });
    let downtime = first_new - killed;
    let acked: Vec<&Ack> = seen.iter().flat_map(|s| &s.acks).collect();
    let on_new = keys_on(&cluster, new).await;
    let lost: Vec<&str> = acked
        .iter()
        .filter(|a| !on_new.contains(&a.key))
        .map(|a| a.key.as_str())
        .collect();
    let errors: Vec<_> = seen.iter().flat_map(|s| &s.errors).collect();
    eprintln!(
        "failover to node {new}: new primary published {published:?} after the kill, \
         write downtime {downtime:?}; {} writes acknowledged, {} lost; {} client errors; \
         reader: {} reads, {} errors",
        acked.len(),
        lost.len(),
        errors.len(),
        read_seen.acks.len(),
        read_seen.errors.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new primary: {lost:?}"
    );
    assert!(downtime < Duration::from_secs(10), "downtime {downtime:?}");
    // Sessions whose backend died were told a failover is in progress.
    assert!(
        errors
            .iter()
            .any(|(_, code, msg)| code == "57P01" && msg.contains("failover in progress")),
        "{errors:?}"
    );
    for (_, code, msg) in &errors {
        assert!(
            ["57P01", "08006", ""].contains(&code.as_str()),
            "unexpected client error {code} {msg}"
        );
    }
    assert!(
        read_seen.errors.is_empty(),
        "reader errors: {:?}",
        read_seen.errors
    );
    assert!(read_seen.acks.iter().any(|a| a.at > killed + published));

    // The most advanced standby (with synchronous replication both are
    // complete; ties go to the lower id) was promoted; the other follows.
    let other = 3 - new;
    let s = p.ctx.cluster.snapshot();
    assert_eq!(s.primary, Some(new));
    let c = connect(p.addr, "").await;
    c.simple_query("INSERT INTO t VALUES ('after-failover')")
        .await
        .unwrap();
    let took = replicated_to(&cluster, other, "after-failover").await;
    eprintln!("node {other} follows node {new}: a new row arrived after {took:?}");
    wait_for(
        "the other standby to serve reads again",
        Duration::from_secs(30),
        || {
            let n = &ctx.cluster.snapshot().nodes[other];
            (n.status.is_usable() && n.effective_weight > 0.0 && !n.repl.timeline_mismatch)
                .then_some(())
        },
    )
    .await;
    let r = connect(p.addr, "").await;
    let (_, rows) = show(
        &r,
        "SELECT inet_server_port(), count(*) FROM t WHERE k = 'after-failover'",
    )
    .await;
    assert_eq!(rows[0], vec![ports[other].to_string(), "1".to_string()]);

    // The old primary restarted as it was is fenced: a false primary.
    let c2 = cluster.clone();
    blocking(move || c2.start_node(0))
        .await
        .expect("restart node 0");
    wait_for(
        "node 0 fenced as a false primary",
        Duration::from_secs(30),
        || {
            let n = &ctx.cluster.snapshot().nodes[0];
            n.held_out
                .as_deref()
                .filter(|h| h.starts_with("false primary") && !n.status.is_usable())
                .map(|_| ())
        },
    )
    .await;
    let before = activity(&cluster, 0).await;
    assert!(
        before.ends_with("/0"),
        "sessions in the fenced node: {before}"
    );
    for i in 0..10 {
        let c = connect(p.addr, "").await;
        c.simple_query(&format!("INSERT INTO t VALUES ('fenced-{i}')"))
            .await
            .unwrap();
        c.simple_query("SELECT count(*) FROM t").await.unwrap();
        c.simple_query("/* pgpilot:primary */ SELECT 1")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = activity(&cluster, 0).await;
    assert_eq!(before, after, "a statement reached the fenced old primary");
    assert_eq!(psql_in(&cluster, 0, "postgres", "SELECT 1").await, "1");
    assert_eq!(
        psql(
            &cluster,
            0,
            "SELECT count(*) FROM t WHERE k LIKE 'fenced-%'"
        )
        .await,
        "0"
    );
    assert_eq!(
        psql(
            &cluster,
            new,
            "SELECT count(*) FROM t WHERE k LIKE 'fenced-%'"
        )
        .await,
        "10"
    );

    // What operators see.
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    assert_eq!(
        (&*rows[0][3], &*rows[0][7]),
        ("down", "primary"),
        "{rows:?}"
    );
    assert_eq!(rows[new][6], "primary");
    let (cols, rows) = show(&c, "SHOW PGPILOT_NODES").await;
    let held = cols.iter().position(|c| c == "held_out").unwrap();
    assert!(rows[0][held].contains("false primary") && rows[0][held].contains("ATTACH NODE 0"));
    let (cols, rows) = show(&c, "SHOW PGPILOT_FAILOVER").await;
    let col = |n: &str| rows[0][cols.iter().position(|c| c == n).unwrap()].clone();
    assert_eq!((col("state"), col("phase")), ("idle".into(), "done".into()));
    assert_eq!(
        (col("old_primary"), col("new_primary")),
        ("0".into(), new.to_string())
    );
    let e = c.simple_query("ATTACH NODE 0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let m = metrics(&p).await;
    for (event, want) in [
        ("failover_started", 1.0),
        ("failover_finished", 1.0),
        ("promotion", 1.0),
    ] {
        assert_eq!(
            m[&format!("pgpilot_failover_events_total{{event=\"{event}\"}}")],
            want,
            "{event}"
        );
    }
    assert!(m["pgpilot_failover_events_total{event=\"fenced\"}"] >= 1.0);
    assert!(m["pgpilot_failover_events_total{event=\"follow\"}"] >= 1.0);
    assert_eq!(m["pgpilot_failover_in_progress"], 0.0);
    assert_eq!(
        p.ctx
            .cluster
            .failover_report()
            .counts
            .get(Event::FailoverFailed),
        0
    );
}

/// Kill node 0 while a client holds an idle session (it notices at once).
async fn kill_primary(c: &Arc<LocalCluster>, p: &StoppableProxy) -> Instant {
    let _idle = connect(p.addr, "application_name=idle").await;
    let killed = Instant::now();
    let c = c.clone();
    blocking(move || c.stop_node(0, "immediate"))
        .await
        .expect("stop the primary");
    killed
}

/// Wait for `node` to be published as the primary; returns how long it took.
async fn new_primary(p: &StoppableProxy, node: usize, since: Instant, limit: Duration) -> Duration {
    let ctx = p.ctx.clone();
    wait_for(&format!("node {node} as the primary"), limit, || {
        (ctx.cluster.snapshot().primary == Some(node)).then_some(())
    })
    .await;
    since.elapsed()
}

/// A write through pgpilot lands on `port`.
async fn write_lands_on(p: &StoppableProxy, port: u16, key: &str) {
    let c = connect(p.addr, "").await;
    let (_, rows) = show(
        &c,
        &format!("INSERT INTO t VALUES ('{key}') RETURNING inet_server_port()"),
    )
    .await;
    assert_eq!(rows[0][0], port.to_string());
}

#[tokio::test]
async fn trigger_file_mode_promotes_through_promote_trigger_file() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false, &["promote_trigger_file = 'promote.trigger'"]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.mode = FailoverMode::TriggerFile;
    for b in &mut cfg.backends {
        b.trigger_file = "promote.trigger".into();
    }
    cfg.validate().expect("valid config");
    let trigger = cfg.backends[1].trigger_path().unwrap();
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let killed = kill_primary(&cluster, &p).await;
    let took = new_primary(&p, 1, killed, Duration::from_secs(40)).await;
    eprintln!("trigger_file mode: node 1 primary {took:?} after the kill");
    assert!(!trigger.exists(), "PostgreSQL consumes the trigger file");
    write_lands_on(&p, cluster.nodes[1].port, "via-trigger-file").await;
    assert_eq!(psql(&cluster, 1, "SELECT pg_is_in_recovery()").await, "f");
}

#[tokio::test]
async fn command_mode_runs_pgpool_scripts_with_placeholders_expanded() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false, &[]).await;
    create_table(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let psql_bin = cluster.bindir.join("psql").display().to_string();
    // pgpool's failover.sh / follow_primary.sh argument order.
    let failover_sh = format!(
        "#!/bin/sh\necho \"$@\" > {d}/failover.args\n\
         exec {psql_bin} -X -q -d \"host=$6 port=$9 user=postgres dbname=postgres\" -c 'SELECT pg_promote()'\n"
    );
    let follow_sh = format!(
        "#!/bin/sh\necho \"$@\" >> {d}/follow.args\n\
         {psql_bin} -X -q -d \"host=$2 port=$3 user=postgres dbname=postgres\" \
           -c \"ALTER SYSTEM SET primary_conninfo = 'host=$6 port=$9 user=postgres application_name=node$1'\" && \
         {psql_bin} -X -q -d \"host=$2 port=$3 user=postgres dbname=postgres\" -c 'SELECT pg_reload_conf()'\n"
    );
    for (name, text) in [("failover.sh", &failover_sh), ("follow.sh", &follow_sh)] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cfg = config_for(&cluster);
    cfg.failover.mode = FailoverMode::Command;
    cfg.failover.command = format!("{d}/failover.sh %d %h %p %D %m %H %M %P %r %R %N %S %%");
    cfg.failover.follow_primary_command = format!("{d}/follow.sh %d %h %p %D %m %H %M %P %r %R");
    // Node 1 may never be promoted: node 2 is the candidate.
    cfg.backends[1].no_failover = true;
    cfg.validate().expect("valid config");
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let killed = kill_primary(&cluster, &p).await;
    let ctx = p.ctx.clone();
    let new = wait_for("a new primary", Duration::from_secs(30), || {
        ctx.cluster.snapshot().primary.filter(|&n| n != 0)
    })
    .await;
    eprintln!(
        "command mode: node {new} primary {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(new, 2, "node 1 has no_failover = true");
    let n = |i: usize| &cluster.nodes[i];
    let args = std::fs::read_to_string(dir.path().join("failover.args")).unwrap();
    let want = format!(
        "0 127.0.0.1 {} {} {new} 127.0.0.1 0 0 {} {} 127.0.0.1 {} %",
        n(0).port,
        n(0).data_dir.display(),
        n(new).port,
        n(new).data_dir.display(),
        n(0).port
    );
    assert_eq!(args.trim(), want);
    // The remaining standby was re-pointed by follow_primary_command.
    let other = 3 - new;
    wait_for(
        "follow_primary_command to finish",
        Duration::from_secs(30),
        || {
            let c = ctx.cluster.failover_report().counts;
            (c.get(Event::Follow) >= 1).then_some(())
        },
    )
    .await;
    let follow = std::fs::read_to_string(dir.path().join("follow.args")).unwrap();
    let want = format!(
        "{other} 127.0.0.1 {} {} {new} 127.0.0.1 0 0 {} {}",
        n(other).port,
        n(other).data_dir.display(),
        n(new).port,
        n(new).data_dir.display()
    );
    assert_eq!(follow.trim(), want);
    write_lands_on(&p, n(new).port, "via-command").await;
    replicated_to(&cluster, other, "via-command").await;
}

#[tokio::test]
async fn none_mode_waits_for_an_outside_promotion_and_clients_wait_too() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false, &[]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.mode = FailoverMode::None;
    // Eventual reads: a session can write and then read on the standby without
    // learning its commit position first (the admin session below).
    cfg.routing.consistency = ConsistencyMode::Eventual;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    // A session whose last request ran on the standby.
    let reading = connect(p.addr, "").await;
    let (_, rows) = show(&reading, "SELECT inet_server_port()").await;
    assert_eq!(rows[0][0], cluster.nodes[1].port.to_string());
    // An admin session that wrote (its commit position is then unknown) and
    // then read on the standby (so the primary's death does not end it).
    let admin = connect(p.addr, "").await;
    admin
        .batch_execute("INSERT INTO t VALUES ('admin-wrote')")
        .await
        .unwrap();
    let (_, rows) = show(&admin, "SELECT inet_server_port()").await;
    assert_eq!(rows[0][0], cluster.nodes[1].port.to_string());
    let killed = kill_primary(&cluster, &p).await;
    let ctx = p.ctx.clone();
    wait_for("a failover in progress", Duration::from_secs(10), || {
        ctx.cluster.failover_in_progress().then_some(())
    })
    .await;
    // With no primary to ask its position, admin commands are still answered.
    let t0 = Instant::now();
    let (_, nodes) = tokio::time::timeout(Duration::from_secs(10), show(&admin, "SHOW POOL_NODES"))
        .await
        .expect("SHOW POOL_NODES answered without a primary");
    assert_eq!(nodes.len(), 2);
    eprintln!(
        "none mode: SHOW POOL_NODES without a primary took {:?}",
        t0.elapsed()
    );
    // An admin who logs in now is let in at once, with no server connection,
    // and sees the dead primary (a login waits up to client_wait_timeout for a
    // primary otherwise: 30 s by default).
    let t0 = Instant::now();
    let late_admin = tokio::time::timeout(Duration::from_secs(10), connect(p.addr, ""))
        .await
        .expect("an admin logs in while there is no primary");
    let (cols, nodes) = show(&late_admin, "SHOW POOL_NODES").await;
    let status = cols.iter().position(|c| c == "status").unwrap();
    assert_eq!(nodes[0][status], "down", "{nodes:?}");
    eprintln!(
        "none mode: an admin login and SHOW POOL_NODES without a primary took {:?}",
        t0.elapsed()
    );
    // Its next write, and a new connection, wait for a primary instead of failing.
    let insert = |c: tokio_postgres::Client, key: &'static str| async move {
        let t0 = Instant::now();
        let sql = format!("INSERT INTO t VALUES ('{key}') RETURNING inet_server_port()");
        let r = c.simple_query(&sql).await;
        (r.map(|m| result_set(&m).1[0][0].clone()), t0.elapsed())
    };
    let old_session = tokio::spawn(insert(reading, "old-session"));
    let addr = p.addr;
    let new_session = tokio::spawn(async move {
        let t0 = Instant::now();
        let c = connect(addr, "").await;
        let (r, _) = insert(c, "new-session").await;
        (r, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!old_session.is_finished() && !new_session.is_finished());
    assert_eq!(
        psql(&cluster, 1, "SELECT pg_is_in_recovery()").await,
        "t",
        "pgpilot promoted nothing"
    );
    assert_eq!(ctx.cluster.snapshot().primary, None);
    let c = cluster.clone();
    blocking(move || c.promote(1))
        .await
        .expect("promote by hand");
    let took = new_primary(&p, 1, killed, Duration::from_secs(30)).await;
    let port = cluster.nodes[1].port.to_string();
    for (what, task) in [
        ("existing session", old_session),
        ("new session", new_session),
    ] {
        let (r, waited) = task.await.unwrap();
        eprintln!(
            "none mode: node 1 noticed {took:?} after the kill; the {what}'s write waited {waited:?}"
        );
        assert_eq!(r.unwrap_or_else(|e| panic!("{what}: {e}")), port);
        assert!(waited > Duration::from_secs(2), "{what} waited {waited:?}");
    }
    let last = ctx.cluster.failover_report().last.unwrap();
    assert_eq!((last.old_primary, last.target), (Some(0), Some(1)));
    // The admin who logged in without a server writes on the new primary.
    let (_, rows) = show(
        &late_admin,
        "INSERT INTO t VALUES ('late-admin') RETURNING inet_server_port()",
    )
    .await;
    assert_eq!(rows[0][0], port);
}

/// A configuration file for the CLI to reach `p`.
fn cli_config(
    dir: &std::path::Path,
    p: &StoppableProxy,
    cluster_ports: &[u16],
) -> std::path::PathBuf {
    let mut text = format!(
        "listen = \"127.0.0.1:{}\"\nadmin_users = [\"{USER}\"]\n[[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        p.addr.port()
    );
    for port in cluster_ports {
        text.push_str(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\nport = {port}\n"
        ));
    }
    let path = dir.join("pgpilot.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Run the `pgpilot` binary; (success, stdout + stderr).
async fn cli(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpilot"))
            .args(args)
            .env("PGPILOT_LOG", "error")
            .output(),
    )
    .await
    .expect("pgpilot CLI finished")
    .expect("run the pgpilot CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn promote_node_switches_over_without_client_errors() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false, &[]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.switchover_timeout = Duration::from_secs(2);
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let dir = tempfile::tempdir().unwrap();
    let conf = cli_config(dir.path(), &p, &ports);
    let conf = conf.to_str().unwrap();

    // A client that names itself like pgpilot's own checks and holds a write
    // transaction open: the drain must not overlook it (it is terminated at
    // switchover_timeout, so it never commits on the old primary).
    let sneaky = connect(p.addr, "application_name=pgpilot-health").await;
    sneaky
        .batch_execute("BEGIN; INSERT INTO t VALUES ('sneaky')")
        .await
        .unwrap();

    // Light load: clients between transactions most of the time.
    let load = Load::writers(p.addr, 3, Duration::from_millis(20), false);
    // What SHOW POOL_NODES says as the switchover goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, addr) = (stop.clone(), p.addr);
        tokio::spawn(async move {
            let c = connect(addr, "").await;
            let mut seen: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (_, rows) = show(&c, "SHOW POOL_NODES").await;
                let primary = rows
                    .iter()
                    .find(|r| r[6] == "primary")
                    .map_or("none".to_string(), |r| r[0].clone());
                if seen.last() != Some(&primary) {
                    seen.push(primary);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t0 = Instant::now();
    let (ok, out) = cli(&["promote", "1", "--config", conf]).await;
    let took = t0.elapsed();
    assert!(ok, "pgpilot promote failed:\n{out}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen = load.finish().await;
    stop.store(true, Ordering::Relaxed);
    let primaries = watcher.await.unwrap();
    let acked: Vec<&Ack> = seen.iter().flat_map(|s| &s.acks).collect();
    let errors: Vec<_> = seen.iter().flat_map(|s| &s.errors).collect();
    let on_new = keys_on(&cluster, 1).await;
    let lost = acked.iter().filter(|a| !on_new.contains(&a.key)).count();
    eprintln!(
        "switchover in {took:?} (CLI):\n{out}\n{} writes acknowledged, {lost} lost, {} failed; SHOW POOL_NODES primary went {primaries:?}",
        acked.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "client errors during the switchover: {errors:?}"
    );
    assert_eq!(lost, 0);
    assert!(
        acked.iter().any(|a| a.port == ports[1]),
        "writes moved to node 1"
    );
    assert_eq!(primaries, ["0", "none", "1"]);
    assert!(out.contains("done"), "{out}");
    assert!(
        sneaky.batch_execute("COMMIT").await.is_err(),
        "a transaction open across the switchover committed"
    );
    assert_eq!(
        psql(&cluster, 0, "SELECT count(*) FROM t WHERE k = 'sneaky'").await,
        "0"
    );

    // The old primary is fenced and read-only; node 2 follows node 1.
    let n0 = p.ctx.cluster.snapshot().nodes[0].clone();
    assert!(!n0.status.is_usable());
    assert!(
        n0.held_out.as_deref().unwrap_or("").contains("fenced"),
        "{:?}",
        n0.held_out
    );
    assert_eq!(
        psql(&cluster, 0, "SHOW default_transaction_read_only").await,
        "on"
    );
    write_lands_on(&p, ports[1], "after-switchover").await;
    replicated_to(&cluster, 2, "after-switchover").await;
    let (ok, nodes) = cli(&["nodes", "--config", conf]).await;
    assert!(ok, "{nodes}");
    let row1 = nodes
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_default();
    assert!(row1.contains("primary"), "{nodes}");
    let last = p.ctx.cluster.failover_report().last.unwrap();
    assert_eq!(last.kind.as_str(), "switchover");
    // A second PROMOTE NODE to the fenced node is refused.
    let (ok, out) = cli(&["promote", "0", "--config", conf]).await;
    assert!(!ok && out.contains("not an in-service standby"), "{out}");
}

#[tokio::test]
async fn detach_and_attach_a_standby() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let p = spawn_proxy_stoppable(h.config());
    all_in_service(&p, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = cli_config(dir.path(), &p, &h.ports);
    let conf = conf.to_str().unwrap();
    let reads_on = |addr| async move {
        let mut ports = HashSet::new();
        for _ in 0..20 {
            let c = connect(addr, "").await;
            let (_, rows) = show(&c, "SELECT inet_server_port()").await;
            ports.insert(rows[0][0].parse::<u16>().unwrap());
        }
        ports
    };

    // Through the extended protocol: Describe must not run it twice.
    let c = connect(p.addr, "").await;
    let rows = c.query("DETACH NODE 2", &[]).await.unwrap();
    let msg: String = rows[0].get("result");
    assert!(msg.contains("detached"), "{msg}");
    assert_eq!(p.ctx.cluster.failover_report().counts.get(Event::Detach), 1);
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    assert_eq!(rows[2][3], "down");
    let (cols, rows) = show(&c, "SHOW PGPILOT_NODES").await;
    let held = cols.iter().position(|c| c == "held_out").unwrap();
    assert!(rows[2][held].contains("detached by operator"), "{rows:?}");
    let ports = reads_on(p.addr).await;
    assert!(
        !ports.contains(&h.ports[2]),
        "a detached standby got reads: {ports:?}"
    );
    assert!(ports.contains(&h.ports[1]), "{ports:?}");
    // Still detached after its next health checks.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!p.ctx.cluster.snapshot().nodes[2].status.is_usable());

    let e = c.simple_query("DETACH NODE 0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let e = c.simple_query("ATTACH NODE 7").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");

    let (ok, out) = cli(&["attach", "2", "--config", conf]).await;
    assert!(ok && out.contains("attached"), "{out}");
    assert!(p.ctx.cluster.snapshot().nodes[2].status.is_usable());
    let ports = reads_on(p.addr).await;
    assert!(
        ports.contains(&h.ports[2]),
        "reads reach node 2 again: {ports:?}"
    );

    // Only admin users.
    let mut cfg = h.config();
    cfg.admin_users.clear();
    let q = spawn_proxy_stoppable(cfg);
    let c = connect(q.addr, "").await;
    for sql in [
        "DETACH NODE 2",
        "ATTACH NODE 2",
        "PROMOTE NODE 1",
        "SHOW PGPILOT_FAILOVER",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e}");
    }
    assert_eq!(q.ctx.cluster.failover_report().counts.get(Event::Detach), 0);
}

#[tokio::test]
async fn nothing_a_client_does_fails_over_a_healthy_primary() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let p = spawn_proxy_stoppable(h.config());
    all_in_service(&p, 0).await;
    let primary = "/* pgpilot:primary */";

    // A client kills its own backend on the primary, provokes a FATAL,
    // vanishes mid-query.
    common::client_misbehaviour(p.addr, primary).await;
    // A cancel of a query on the primary.
    let c = connect(p.addr, "").await;
    let token = c.cancel_token();
    let q = tokio::spawn(async move {
        c.simple_query(&format!("{primary} SELECT pg_sleep(5)"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = q.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    // Many clients terminating their backends at once.
    let mut kills = Vec::new();
    for _ in 0..10 {
        let addr = p.addr;
        kills.push(tokio::spawn(async move {
            let c = connect(addr, "").await;
            let _ = c
                .simple_query(&format!(
                    "{primary} SELECT pg_terminate_backend(pg_backend_pid())"
                ))
                .await;
        }));
    }
    for k in kills {
        k.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = p.ctx.cluster.failover_report();
    assert_eq!(r.counts.get(Event::FailoverStarted), 0, "{r:?}");
    assert!(r.current.is_none() && r.blocked.is_none());
    let s = p.ctx.cluster.snapshot();
    assert_eq!(s.primary, Some(0));
    assert!(s.nodes.iter().all(|n| n.status.is_usable()));
    let c = connect(p.addr, "").await;
    let (_, rows) = show(&c, &format!("{primary} SELECT inet_server_port()")).await;
    assert_eq!(rows[0][0], h.ports[0].to_string());
}

#[tokio::test]
async fn a_lagging_candidate_is_refused_until_an_operator_promotes_it() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false, &[]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.max_lag_bytes = 1 << 20;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    // The standby stops receiving; the primary writes ~6 MB more.
    psql_in(
        &cluster,
        1,
        "postgres",
        "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1 user=postgres'",
    )
    .await;
    psql_in(&cluster, 1, "postgres", "SELECT pg_reload_conf()").await;
    psql(
        &cluster,
        0,
        "INSERT INTO t SELECT 'filler-' || g || repeat('x', 1000) FROM generate_series(1, 5000) g",
    )
    .await;
    let ctx = p.ctx.clone();
    wait_for("the standby's lag to show", Duration::from_secs(30), || {
        let lag = ctx.cluster.snapshot().nodes[1].repl.lag_bytes?;
        (lag > 4 << 20).then_some(())
    })
    .await;
    // An admin session whose last request ran on the standby survives the kill.
    let admin = connect(p.addr, "").await;
    show(&admin, "SELECT 1").await;
    kill_primary(&cluster, &p).await;
    let detail = wait_for(
        "the failover to refuse the candidate",
        Duration::from_secs(20),
        || {
            let r = ctx.cluster.failover_report();
            let t = r.current?;
            (t.phase.as_str() == "waiting").then_some(t.detail)
        },
    )
    .await;
    assert!(
        detail.contains("refused") && detail.contains("max_lag_bytes"),
        "{detail}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(psql(&cluster, 1, "SELECT pg_is_in_recovery()").await, "t");
    let (cols, rows) = show(&admin, "SHOW PGPILOT_FAILOVER").await;
    let col = |n: &str| rows[0][cols.iter().position(|c| c == n).unwrap()].clone();
    assert_eq!(
        (col("state"), col("phase")),
        ("failover".into(), "waiting".into())
    );
    assert!(
        col("detail").contains("PROMOTE NODE 1"),
        "{}",
        col("detail")
    );
    // The operator accepts the loss.
    let (_, rows) = show(&admin, "PROMOTE NODE 1").await;
    assert!(rows[0][1].contains("will promote node 1"), "{rows:?}");
    new_primary(&p, 1, Instant::now(), Duration::from_secs(30)).await;
    write_lands_on(&p, cluster.nodes[1].port, "after-forced").await;
    let r = ctx.cluster.failover_report();
    assert!(r.counts.get(Event::CandidateRefused) >= 1);
    assert_eq!(r.last.unwrap().target, Some(1));
}
