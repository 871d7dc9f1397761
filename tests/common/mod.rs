//! Shared test harness: one real PostgreSQL cluster (primary + 2 streaming
//! standbys) per test binary, and pgpilot instances running in-process on
//! loopback in front of it.
//!
//! The cluster is built on first use and stopped (and its files removed) when
//! the test process exits, through an `atexit` hook: Rust never drops statics.
#![allow(dead_code)]

pub mod idle;
pub mod load;
pub mod raw;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pgpilot::config::{Config, NodeId};
use pgpilot::context::ProxyContext;
use pgpilot::localcluster::{ClusterSpec, LocalCluster};
use pgpilot::server::Proxy;

/// The application role tests log in as.
pub const USER: &str = "app";
/// Its password.
pub const PASSWORD: &str = "secret";
/// Its database.
pub const DB: &str = "app";

/// A shared cluster and a default pgpilot in front of it.
pub struct Harness {
    /// The cluster; behind a mutex so the exit hook can shut it down.
    pub cluster: Mutex<LocalCluster>,
    /// Ports of the nodes (node id order).
    pub ports: Vec<u16>,
    /// Address of the default pgpilot instance.
    pub proxy: SocketAddr,
    /// Directory of the PostgreSQL binaries (pgbench, psql).
    pub bindir: std::path::PathBuf,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

extern "C" fn stop_cluster_at_exit() {
    if let Some(h) = HARNESS.get() {
        let mut c = h.cluster.lock().unwrap_or_else(|p| p.into_inner());
        c.shutdown();
    }
}

/// The shared harness, built on first call.
pub fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let _ = tracing_subscriber_init();
        let spec = ClusterSpec {
            standbys: 2,
            users: vec![(USER.into(), PASSWORD.into())],
            databases: vec![(DB.into(), USER.into())],
            extra_conf: vec!["max_connections = 150".into()],
            synchronous: false,
            slots: true,
        };
        let cluster = LocalCluster::start(spec).expect("start a local PostgreSQL cluster");
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_cluster_at_exit);
        }
        let ports = cluster.nodes.iter().map(|n| n.port).collect();
        let bindir = cluster.bindir.clone();
        let config = base_config(&cluster);
        let proxy = spawn_proxy(config);
        Harness {
            cluster: Mutex::new(cluster),
            ports,
            proxy,
            bindir,
        }
    })
}

/// Logs from pgpilot during tests: set PGPILOT_LOG=debug to see them.
fn tracing_subscriber_init() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGPILOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init()
}

fn base_config(cluster: &LocalCluster) -> Config {
    let mut c = pgpilot::demo::config_for(cluster, "127.0.0.1:0", &[(USER, PASSWORD)]);
    c.pool.max_connections_per_node = 60;
    // An ephemeral port per proxy: tests run many proxies at once.
    c.metrics.listen = "127.0.0.1:0".into();
    c
}

impl Harness {
    /// A config for this cluster that tests may adjust before [`spawn_proxy`].
    pub fn config(&self) -> Config {
        base_config(&self.cluster.lock().unwrap())
    }

    /// Run SQL on a node as the superuser through psql.
    pub fn psql(&self, node: usize, sql: &str) -> String {
        self.cluster
            .lock()
            .unwrap()
            .psql(node, sql)
            .expect("psql on a node")
    }

    /// tokio-postgres connection string to a pgpilot address.
    pub fn conninfo(addr: SocketAddr, extra: &str) -> String {
        format!(
            "host={} port={} user={USER} password={PASSWORD} dbname={DB} connect_timeout=10 {extra}",
            addr.ip(),
            addr.port()
        )
    }
}

/// Start a pgpilot with `config` on its own runtime thread; returns its address.
/// It runs until the test process exits.
pub fn spawn_proxy(config: Config) -> SocketAddr {
    spawn_proxy_full(config).addr
}

/// Run a pgpilot on its own runtime thread until `stop` completes; returns
/// what it bound and the thread.
fn spawn_until(
    config: Config,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Spawned, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let proxy = Proxy::bind(config).await.expect("bind pgpilot");
            let spawned = Spawned {
                addr: proxy.local_addr(),
                metrics: proxy.metrics_addr(),
                ctx: proxy.context(),
            };
            tx.send(spawned).expect("report address");
            proxy.run(stop).await;
        });
    });
    let spawned = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("pgpilot started");
    (spawned, thread)
}

/// A pgpilot started by [`spawn_proxy_full`].
pub struct Spawned {
    /// Client address.
    pub addr: SocketAddr,
    /// `/metrics` and `/healthz` address, if enabled.
    pub metrics: Option<SocketAddr>,
    /// Its shared state (cluster snapshots, metrics, registry).
    pub ctx: Arc<ProxyContext>,
}

/// Like [`spawn_proxy`], also returning the metrics address and the context.
pub fn spawn_proxy_full(config: Config) -> Spawned {
    spawn_until(config, std::future::pending()).0
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to /metrics");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read response");
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (code, body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("HTTP answer in time")
}

/// Columns and rows of the first result set in a simple-query answer.
pub fn result_set(msgs: &[tokio_postgres::SimpleQueryMessage]) -> (Vec<String>, Vec<Vec<String>>) {
    use tokio_postgres::SimpleQueryMessage as M;
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        match m {
            M::RowDescription(c) if cols.is_empty() => {
                cols = c.iter().map(|c| c.name().to_string()).collect();
            }
            M::Row(r) => rows.push(
                (0..r.len())
                    .map(|i| r.get(i).expect("no NULLs").to_string())
                    .collect(),
            ),
            _ => {}
        }
    }
    (cols, rows)
}

/// Run `sql` as a simple query on `c`: columns and rows of its first result set.
pub async fn show(c: &tokio_postgres::Client, sql: &str) -> (Vec<String>, Vec<Vec<String>>) {
    result_set(
        &c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}")),
    )
}

/// The status of server connection `pid` in `SHOW POOL_POOLS`, if listed.
pub async fn pool_status(admin: &tokio_postgres::Client, pid: i32) -> Option<String> {
    let (cols, rows) = show(admin, "SHOW POOL_POOLS").await;
    let col = |n: &str| {
        cols.iter()
            .position(|c| c == n)
            .expect("a POOL_POOLS column")
    };
    let (backend, status) = (col("pool_backendpid"), col("status"));
    rows.into_iter()
        .find(|r| r[backend] == pid.to_string())
        .map(|r| r[status].clone())
}

/// `name{labels}` → value, for every sample line of a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Wait until `p` sees node 0 as the primary and every node in service, so the
/// first sessions do not race the first health checks.
pub async fn nodes_in_service(p: &Spawned) {
    wait_until(
        "node 0 the primary and every node in service",
        Duration::from_secs(30),
        async || {
            let s = p.ctx.cluster.snapshot();
            s.primary == Some(NodeId::new(0)) && s.nodes.iter().all(|n| n.status.is_usable())
        },
    )
    .await;
}

/// Connect to pgpilot at `addr` with tokio-postgres, driving the connection in a task.
pub async fn connect(addr: SocketAddr, extra: &str) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&Harness::conninfo(addr, extra), tokio_postgres::NoTls)
            .await
            .expect("connect through pgpilot");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Like [`connect`] but returns the error instead of panicking.
pub async fn try_connect(
    addr: SocketAddr,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&Harness::conninfo(addr, extra), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, if the server (or pgpilot) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// A tokio-postgres error as "SQLSTATE: message" when the server (or
/// pgpilot) sent one, else the client's own text.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A write through `addr` on a new connection: the port of the node that
/// took it, or the error as [`error_text`] puts it. The table `t` (one text
/// column) must exist.
pub async fn write_through(addr: SocketAddr, key: &str) -> Result<u16, String> {
    let (client, conn) =
        tokio_postgres::connect(&Harness::conninfo(addr, ""), tokio_postgres::NoTls)
            .await
            .map_err(|e| error_text(&e))?;
    tokio::spawn(conn);
    let sql = format!("INSERT INTO t VALUES ('{key}') RETURNING inet_server_port()::text");
    match client.simple_query(&sql).await {
        Ok(msgs) => {
            let (_, rows) = result_set(&msgs);
            Ok(rows[0][0].parse().expect("a port"))
        }
        Err(e) => Err(error_text(&e)),
    }
}

/// What a client can do to its own server connections through pgpilot at
/// `addr`, each step checked: terminate its backend (57P01), provoke a FATAL
/// (`idle_session_timeout`), and vanish in the middle of a query. `prefix`
/// goes before the statements that run on a node (e.g. a routing hint). None of
/// this may take a node down or fail one over.
pub async fn client_misbehaviour(addr: SocketAddr, prefix: &str) {
    // 1. A client kills its own backend.
    let c = connect(addr, "").await;
    let e = c
        .simple_query(&format!(
            "{prefix} SELECT pg_terminate_backend(pg_backend_pid())"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    // 2. A FATAL raised by the server for the session.
    let c = connect(addr, "").await;
    c.batch_execute("SET idle_session_timeout = '200ms'")
        .await
        .unwrap();
    // Its primary connection's FATAL ends the session (as PostgreSQL's would).
    wait_until(
        "the idle_session_timeout FATAL to end the session",
        Duration::from_secs(30),
        async || c.is_closed(),
    )
    .await;
    assert!(c.simple_query("SELECT 1").await.is_err());
    // 3. A client vanishes in the middle of a query.
    let (client, conn) =
        tokio_postgres::connect(&Harness::conninfo(addr, ""), tokio_postgres::NoTls)
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let sql = format!("{prefix} SELECT pg_sleep(5) AS vanishing_client");
    let query = tokio::spawn(async move { client.simple_query(&sql).await });
    let su = superusers().await;
    wait_until(
        "the vanishing client's query to run",
        Duration::from_secs(30),
        async || running(&su, "AS vanishing_client").await,
    )
    .await;
    conn_task.abort();
    query.abort();
}

/// Resumes replay on the node when dropped, even if the test fails.
pub struct ResumeReplay(pub usize);

impl Drop for ResumeReplay {
    fn drop(&mut self) {
        let _ = harness()
            .cluster
            .lock()
            .map(|c| c.psql(self.0, "SELECT pg_wal_replay_resume()"));
    }
}

/// A pgpilot on its own runtime thread that stops when dropped (sessions get
/// 57P01, background tasks end): for tests that own a cluster, so nothing
/// keeps probing it after it is gone.
pub struct StoppableProxy {
    /// Client address, metrics address and shared state.
    pub spawned: Spawned,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for StoppableProxy {
    type Target = Spawned;
    fn deref(&self) -> &Spawned {
        &self.spawned
    }
}

impl Drop for StoppableProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Like [`spawn_proxy_full`], stopped when the result is dropped.
pub fn spawn_proxy_stoppable(config: Config) -> StoppableProxy {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (spawned, thread) = spawn_until(config, async {
        let _ = stop_rx.await;
    });
    StoppableProxy {
        spawned,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// Route pgpilot's logs to the test output (`PGPILOT_LOG`, default `warn`)
/// for tests that do not use [`harness`].
pub fn init_logs() {
    let _ = tracing_subscriber_init();
}

/// Poll `f` every 25 ms until it returns `Some`, or panic after `limit`.
pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// How often [`wait_until`] and [`wait_for`] look again.
const POLL: Duration = Duration::from_millis(25);

/// Wait until `cond` holds, looking every 25 ms; panic naming `what` after
/// `limit`. For waits on something a test caused (a query running, a
/// connection given back, a health check run): a fixed sleep is too long on
/// a quiet machine and too short on a loaded one.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Direct connections to every node of the shared cluster as the superuser
/// (no pgpilot in between), in database `postgres`, for [`running`].
pub async fn superusers() -> Vec<tokio_postgres::Client> {
    let mut out = Vec::new();
    for port in &harness().ports {
        let info = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to port {port} as the superuser: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        out.push(client);
    }
    out
}

/// Whether a statement whose text contains `marker` is running (state
/// `active`) on one of the nodes `su` ([`superusers`]) are connected to.
pub async fn running(su: &[tokio_postgres::Client], marker: &str) -> bool {
    for c in su {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                 AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
                &[&marker],
            )
            .await
            .expect("read pg_stat_activity")
            .get(0);
        if n > 0 {
            return true;
        }
    }
    false
}

/// Wait until every node of `ctx`'s cluster has finished `rounds` more health
/// checks: for an assertion that something does not happen, the chance for it
/// to happen. The first round may have started before the call.
pub async fn health_rounds(ctx: &ProxyContext, rounds: u64) {
    let after: Vec<u64> = ctx
        .cluster
        .health_stats()
        .iter()
        .map(|s| s.total_count + rounds)
        .collect();
    wait_until(
        &format!("{rounds} more health checks of every node"),
        Duration::from_secs(30),
        async || {
            let now = ctx.cluster.health_stats();
            now.iter()
                .zip(&after)
                .all(|(s, &want)| s.total_count >= want)
        },
    )
    .await;
}

/// A superuser role of its own for one pgpilot's `[monitor]`, so a test can
/// tell that pgpilot's check connections from every other proxy's in
/// `pg_stat_activity` (name `<prefix>_<pid>`; it replicates to the standbys).
pub async fn own_monitor_role(h: &Harness, cfg: &mut Config, prefix: &str) -> String {
    let role = format!("{prefix}_{}", std::process::id());
    h.psql(
        0,
        &format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN \
             CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'monpw'; END IF; END$$"
        ),
    );
    // Usable on every node before pgpilot's first check.
    let exists = format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'");
    for node in 1..h.ports.len() {
        wait_until(
            &format!("role {role} on node {node}"),
            Duration::from_secs(30),
            async || h.psql(node, &exists) == "1",
        )
        .await;
    }
    cfg.monitor.user = role.clone();
    cfg.monitor.password = "monpw".into();
    role
}

/// Backend pids (and last state change, as text) of `role`'s connections named
/// `application_name` on `node`.
pub fn monitor_backends(
    h: &Harness,
    node: usize,
    role: &str,
    application_name: &str,
) -> Vec<String> {
    let out = h.psql(
        node,
        &format!(
            "SELECT pid || ' ' || coalesce(state_change::text, '') FROM pg_stat_activity \
             WHERE usename = '{role}' AND application_name = '{application_name}' ORDER BY pid"
        ),
    );
    out.lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Run the cluster's pgbench against `addr` as the test user; panics (with its
/// output) if pgbench fails, else returns its output.
pub fn pgbench_at(addr: SocketAddr, args: &[&str]) -> String {
    let exe = harness().bindir.join("pgbench");
    let out = std::process::Command::new(exe)
        .args(args)
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", USER, DB])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}
