//! Several pgpilots coordinating through a real etcd (started by
//! `localcluster::etcd` on loopback) in front of one real cluster with a
//! synchronous standby: one leader decides, the others follow what etcd
//! records, an instance cut off from etcd decides nothing.
//!
//! Each test builds its own cluster, etcd and pgpilots (in-process, each on
//! its own runtime thread like a separate process), one test at a time
//! ([`SERIAL`]). The files group them: `failover.rs` (primary killed, leader
//! killed), `cutoff.rs` (an instance cut off from etcd), `commands.rs` (admin
//! commands on any instance, peers, the 3-member etcd).

#[path = "../common/mod.rs"]
mod common;

mod commands;
mod cutoff;
mod failover;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    DB, PASSWORD, StoppableProxy, USER, connect, show, spawn_proxy_stoppable, wait_for, wait_until,
    write_through,
};
use pgpilot::cluster::events::Event;
use pgpilot::config::{Config, NodeId};
use pgpilot::localcluster::etcd::EtcdCluster;
use pgpilot::localcluster::{ClusterSpec, LocalCluster};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// One destructive test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A primary and `standbys` standbys (the first one synchronous when
/// `synchronous`), with the test role, database and table `t`.
async fn new_cluster(standbys: usize, synchronous: bool) -> Arc<LocalCluster> {
    common::init_logs();
    let spec = ClusterSpec {
        standbys,
        users: vec![(USER.into(), PASSWORD.into())],
        databases: vec![(DB.into(), USER.into())],
        extra_conf: Vec::new(),
        synchronous,
        slots: false,
    };
    let c = blocking(move || LocalCluster::start(spec))
        .await
        .expect("start a local cluster");
    let c = Arc::new(c);
    psql(
        &c,
        0,
        "CREATE TABLE t (k text PRIMARY KEY); ALTER TABLE t OWNER TO app",
    )
    .await;
    c
}

/// An etcd of `members` members with its data beside the cluster's.
async fn new_etcd(c: &Arc<LocalCluster>, members: usize) -> EtcdCluster {
    let c = c.clone();
    blocking(move || EtcdCluster::start_for(members, &c))
        .await
        .expect("start etcd")
}

/// psql as the superuser in the test database on `node`.
async fn psql(c: &Arc<LocalCluster>, node: usize, sql: &str) -> String {
    let (c, sql) = (c.clone(), sql.to_string());
    blocking(move || c.psql_db(node, DB, &sql))
        .await
        .unwrap_or_else(|e| panic!("psql on node {node}: {e}"))
}

/// pgpilot `name` for `c`, coordinating through `endpoints`.
fn config_for(c: &LocalCluster, name: &str, endpoints: &[String]) -> Config {
    let mut cfg = pgpilot::demo::config_for(c, "127.0.0.1:0", &[(USER, PASSWORD)]);
    cfg.metrics.listen = "127.0.0.1:0".into();
    cfg.cluster_name = format!("test{}", std::process::id());
    cfg.coordination.etcd_endpoints = endpoints.to_vec();
    cfg.coordination.instance_name = name.into();
    cfg.coordination.lease_ttl = Duration::from_secs(2);
    cfg
}

/// Start pgpilot `name` and wait until it routes to `primary`.
async fn start_instance(
    c: &LocalCluster,
    name: &str,
    endpoints: &[String],
    primary: usize,
) -> StoppableProxy {
    let p = spawn_proxy_stoppable(config_for(c, name, endpoints));
    routes_to(&p, primary).await;
    p
}

/// Wait until `p` publishes `primary` as the primary.
async fn routes_to(p: &StoppableProxy, primary: usize) {
    let ctx = p.ctx.clone();
    wait_for(
        &format!("{} routing to node {primary}", p.addr),
        Duration::from_secs(30),
        || (ctx.cluster.snapshot().primary == Some(NodeId::new(primary))).then_some(()),
    )
    .await;
}

/// Whether `p` leads.
fn leads(p: &StoppableProxy) -> bool {
    p.ctx.cluster.coordination().is_some_and(|h| h.is_leader())
}

/// Wait until exactly one of `ps` leads; its index.
async fn one_leader(ps: &[&StoppableProxy]) -> usize {
    wait_for("exactly one leader", Duration::from_secs(30), || {
        let leaders: Vec<usize> = (0..ps.len()).filter(|&i| leads(ps[i])).collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

/// Promotions `p` made.
fn promotions(p: &StoppableProxy) -> u64 {
    p.ctx.cluster.failover_report().counts.get(Event::Promotion)
}

/// The nodes that answer `pg_is_in_recovery() = false`.
async fn primaries(c: &Arc<LocalCluster>) -> Vec<usize> {
    let mut v = Vec::new();
    for n in 0..c.nodes.len() {
        let (c2, sql) = (c.clone(), "SELECT pg_is_in_recovery()");
        let r = blocking(move || c2.psql_db(n, DB, sql)).await;
        if r.as_deref().ok() == Some("f") {
            v.push(n);
        }
    }
    v
}

/// Stop node 0 (the primary) immediately.
async fn kill_primary(c: &Arc<LocalCluster>) {
    let c = c.clone();
    blocking(move || c.stop_node(0, "immediate"))
        .await
        .expect("stop the primary");
}

/// A TCP forwarder on loopback to `to`, closed (listener and every
/// connection) by [`Forwarder::close`] or on drop: cuts a pgpilot off etcd.
struct Forwarder {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> Forwarder {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let held = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut a, _)) = l.accept().await {
                let h = tokio::spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        let _ = b.shutdown().await;
                    }
                });
                held.lock().unwrap().push(h);
            }
        });
        Forwarder { addr, task, conns }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn close(&self) {
        self.task.abort();
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.close();
    }
}

/// `SHOW PGPILOT_PEERS` through `addr`: (instance, leader) rows.
async fn peers(addr: SocketAddr) -> Vec<(String, String)> {
    let c = connect(addr, "").await;
    let (cols, rows) = show(&c, "SHOW PGPILOT_PEERS").await;
    assert_eq!(cols[0], "instance");
    let leader = cols
        .iter()
        .position(|c| c == "leader")
        .expect("leader column");
    rows.into_iter()
        .map(|r| (r[0].clone(), r[leader].clone()))
        .collect()
}

/// Run `sql` (an admin command) through `addr`.
async fn admin(addr: SocketAddr, sql: &str) -> Vec<Vec<String>> {
    let c = connect(addr, "").await;
    show(&c, sql).await.1
}

/// Run admin command `sql` through `addr` until it is accepted (an
/// election may be in progress).
async fn admin_ok(addr: SocketAddr, sql: &str) {
    wait_until(
        &format!("{sql} accepted"),
        Duration::from_secs(30),
        async || {
            let c = connect(addr, "").await;
            c.simple_query(sql).await.is_ok()
        },
    )
    .await;
}

/// Wait until `cond` holds on `p`'s snapshot.
async fn until_on(
    p: &StoppableProxy,
    what: &str,
    cond: impl Fn(&pgpilot::cluster::ClusterSnapshot) -> bool,
) {
    let ctx = p.ctx.clone();
    wait_until(what, Duration::from_secs(30), async || {
        cond(&ctx.cluster.snapshot())
    })
    .await;
}
