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
//!
//! The tests are grouped by what they exercise (`under_load.rs`, `modes.rs`,
//! `operator.rs`, `safety.rs`, `slots.rs`); this file holds the shared helpers.

#[path = "../common/mod.rs"]
mod common;

mod modes;
mod operator;
mod safety;
mod sessions;
mod slots;
mod under_load;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::load::{Ack, Load};
use common::{
    DB, PASSWORD, StoppableProxy, USER, connect, harness, http_get, parse_metrics, result_set,
    show, spawn_proxy_stoppable, sqlstate, wait_for, wait_until,
};
use pgpilot::cluster::events::Event;
use pgpilot::config::{Config, ConsistencyMode, FailoverMode, NodeId};
use pgpilot::localcluster::{ClusterSpec, LocalCluster};

/// One destructive test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A primary and `standbys` standbys with the test role and database.
async fn new_cluster(standbys: usize, synchronous: bool, extra: &[&str]) -> Arc<LocalCluster> {
    new_cluster_with(standbys, synchronous, extra, false).await
}

/// Like [`new_cluster`]; with `slots`, each standby streams through its own
/// physical replication slot (`pg_basebackup -R -C -S nodeN`).
async fn new_cluster_with(
    standbys: usize,
    synchronous: bool,
    extra: &[&str],
    slots: bool,
) -> Arc<LocalCluster> {
    common::init_logs();
    let spec = ClusterSpec {
        standbys,
        users: vec![(USER.into(), PASSWORD.into())],
        databases: vec![(DB.into(), USER.into())],
        extra_conf: extra.iter().map(|s| s.to_string()).collect(),
        synchronous,
        slots,
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
            let ok = s.primary == Some(NodeId::new(primary))
                && s.nodes.iter().all(|n| n.status.is_usable())
                && s.nodes
                    .iter()
                    .filter(|n| n.id != NodeId::new(primary))
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
    let sql = format!("SELECT count(*) FROM t WHERE k = '{key}'");
    wait_until(
        &format!("row {key} on node {node}"),
        Duration::from_secs(40),
        async || {
            let (c, sql) = (c.clone(), sql.clone());
            let got = blocking(move || c.psql_db(node, DB, &sql)).await;
            got.as_deref().ok() == Some("1")
        },
    )
    .await;
    t0.elapsed()
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
        (ctx.cluster.snapshot().primary == Some(NodeId::new(node))).then_some(())
    })
    .await;
    since.elapsed()
}

/// Stop node 0 (the primary) immediately under whatever load runs, and wait
/// for another node to be published as the primary: when it was stopped,
/// the new primary, and how long publishing took.
async fn fail_primary_over(
    c: &Arc<LocalCluster>,
    p: &StoppableProxy,
) -> (Instant, usize, Duration) {
    let killed = Instant::now();
    let c = c.clone();
    blocking(move || c.stop_node(0, "immediate"))
        .await
        .expect("stop the primary");
    let ctx = p.ctx.clone();
    let new = wait_for("a new primary", Duration::from_secs(30), || {
        ctx.cluster
            .snapshot()
            .primary
            .filter(|&n| n != NodeId::new(0))
    })
    .await;
    (killed, new.index(), killed.elapsed())
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
