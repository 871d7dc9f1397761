//! Throwaway local PostgreSQL clusters for `pgpilot demo` and integration tests.
//!
//! [`LocalCluster::start`] builds a real cluster — one primary plus N
//! streaming-replication hot standbys — from the PostgreSQL server binaries on
//! the machine (see [`find_bindir`]). The cluster owns everything it creates, all
//! under one private temporary directory:
//!
//! ```text
//! <temp>/pgpilot-cluster-<pid>-<random>/   LocalCluster::base_dir
//!     node0/          node dir: unix socket + postgres.log
//!         data/       PGDATA of the primary (initdb)
//!     node1/data/ ... standbys (pg_basebackup copies of node0)
//! ```
//!
//! Servers listen on 127.0.0.1 only, on ports from [`free_port`], with their unix
//! sockets in their node dir, so nothing touches `/var/run/postgresql` or an
//! installed cluster. The superuser `postgres` is trusted on loopback (no
//! password); roles from [`ClusterSpec::users`] authenticate with SCRAM-SHA-256.
//! Each server reports its name (`node0`, `node1`, ...) in
//! `current_setting('cluster_name')`.
//!
//! [`LocalCluster::shutdown`] (also run on drop, including when `start` fails
//! midway) stops every server and deletes the directory. A process killed by a
//! signal cannot clean up and leaves its servers behind.
//!
//! PostgreSQL refuses to run as root, so when we are root every server binary
//! runs as the `postgres` OS user (via `runuser`, or `su` as a fallback) and the
//! directory tree is owned by that user.
//!
//! This is blocking code (it spawns processes and sleeps while polling); call it
//! from a plain thread or `tokio::task::spawn_blocking`.

mod bindir;
mod error;
pub mod etcd;
pub mod patroni;
mod process;
mod tls;

pub(crate) use bindir::find_bindir;
pub use tls::{Issued, TestCa, TlsFiles, TlsSpec};

pub use error::{ClusterError, CommandFailed, CommandOutcome, LogTail};

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fs::{self, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use process::{RunAs, chown_to, kill_postmaster, run_command, wait_until};

/// Database superuser made by initdb, and the OS user servers run as under root.
const SUPERUSER: &str = "postgres";
/// Upper bound for one external command, so a hung child cannot hang the caller.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for one psql call inside a polling loop.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds `pg_ctl -w -t` waits for a start, stop or promotion.
const PG_CTL_WAIT: u64 = 60;
/// Seconds `pg_ctl -w -t` waits for the immediate stop in `shutdown`, so a
/// wedged server delays cleanup by no more than this before it gets SIGKILL.
const SHUTDOWN_WAIT: u64 = 10;

/// Replaces initdb's pg_hba.conf: loopback only; the superuser and replication
/// are trusted, every other role must use SCRAM.
const HBA_CONF: &str = "\
# Written by pgpilot localcluster: loopback only.
local  all          all                    trust
host   all          postgres  127.0.0.1/32 trust
host   all          postgres  ::1/128      trust
host   replication  all       127.0.0.1/32 trust
host   replication  all       ::1/128      trust
host   all          all       127.0.0.1/32 scram-sha-256
host   all          all       ::1/128      scram-sha-256
";

/// Settings appended to every node's postgresql.conf (before `extra_conf`).
const COMMON_CONF: &str = "
# ---- added by pgpilot localcluster ----
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
hot_standby = on
hot_standby_feedback = on
wal_keep_size = '256MB'
max_connections = 100
shared_buffers = '32MB'
fsync = off
logging_collector = off
password_encryption = 'scram-sha-256'
";

/// What [`LocalCluster::start`] should build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of streaming hot standbys next to the primary (0 allowed).
    pub standbys: usize,
    /// Roles to create on the primary as `(name, password)`: LOGIN CREATEDB with a
    /// SCRAM-SHA-256 password, so clients exercise real password authentication.
    pub users: Vec<(String, String)>,
    /// Databases to create as `(name, owner)`; the owner must exist (a `users`
    /// entry or `postgres`).
    pub databases: Vec<(String, String)>,
    /// Extra postgresql.conf lines for every node (e.g. `"max_connections = 200"`).
    pub extra_conf: Vec<String>,
    /// When true, `synchronous_standby_names = 'ANY 1 (node1, ...)'` is set on the
    /// primary once the standbys stream, so commits wait for one standby.
    pub synchronous: bool,
    /// When true, each standby streams through a physical replication slot
    /// named after it (`pg_basebackup -R -C -S nodeN`, so `primary_slot_name
    /// = 'nodeN'`), as production clusters are usually built. The default;
    /// false builds standbys that stream without a slot.
    pub slots: bool,
}

impl Default for ClusterSpec {
    /// Two asynchronous standbys streaming through slots; no extra roles,
    /// databases or settings.
    fn default() -> Self {
        ClusterSpec {
            standbys: 2,
            users: Vec::new(),
            databases: Vec::new(),
            extra_conf: Vec::new(),
            synchronous: false,
            slots: true,
        }
    }
}

/// One PostgreSQL server of a [`LocalCluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Index in [`LocalCluster::nodes`]: 0 is the primary at creation, 1.. standbys.
    pub(crate) node_id: usize,
    /// TCP port the server listens on (127.0.0.1 only).
    pub port: u16,
    /// PGDATA of the server (`<base_dir>/nodeN/data`).
    pub data_dir: PathBuf,
    /// `nodeN`: the server's `cluster_name` and, for a standby, the
    /// `application_name` it shows in the primary's `pg_stat_replication`.
    pub(crate) application_name: String,
}

impl LocalNode {
    /// The node dir holding `data/`, the unix socket and the server log.
    pub(crate) fn node_dir(&self) -> PathBuf {
        self.data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// The server log, `<node dir>/postgres.log` (written via `pg_ctl -l`).
    pub(crate) fn log_file(&self) -> PathBuf {
        self.node_dir().join("postgres.log")
    }
}

/// A running throwaway cluster, stopped and deleted by [`LocalCluster::shutdown`]
/// or on drop.
#[derive(Debug)]
pub struct LocalCluster {
    /// The servers, indexed by [`LocalNode::node_id`].
    pub nodes: Vec<LocalNode>,
    /// Private temporary directory holding every node; removed on shutdown.
    pub(crate) base_dir: PathBuf,
    /// Directory of the PostgreSQL binaries in use (from [`find_bindir`]).
    pub bindir: PathBuf,
    /// How to launch binaries (directly, or as the `postgres` OS user when root).
    run_as: RunAs,
    /// `(uid, gid)` of the `postgres` OS user when root: owner of what we create.
    owner: Option<(u32, u32)>,
    /// Set once shutdown ran, so it is idempotent (explicit call, then Drop).
    shut_down: bool,
    /// The certificates of a cluster started by [`LocalCluster::start_tls`].
    pub tls: Option<TlsFiles>,
}

/// Picks a free TCP port on 127.0.0.1: drawn at random from 20000..32768 (below
/// Linux's ephemeral range; randomness limits collisions between test binaries
/// running at once), checked to be bindable, never handed out twice by this
/// process. It is free when returned, not reserved; [`LocalCluster::start`]
/// moves a server whose port got taken meanwhile.
pub(crate) fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let bindable = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    let port = (0..1000)
        .map(|_| 20000 + (random_u64() % 12768) as u16)
        .find(|&port| !handed_out.contains(&port) && bindable(port))
        .unwrap_or_else(|| {
            // Range exhausted (unlikely): let the kernel choose.
            let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
            listener.local_addr().expect("local_addr").port()
        });
    handed_out.insert(port);
    port
}

impl LocalCluster {
    /// Builds and starts a cluster: initdb the primary, configure and start it,
    /// create the spec's roles and databases, clone each standby with
    /// `pg_basebackup -R -X stream` and start it, then wait (60 s) until the
    /// primary's `pg_stat_replication` shows every standby `streaming` (with
    /// [`ClusterSpec::slots`], each through its slot `nodeN`). On error
    /// everything created so far is stopped and removed.
    pub fn start(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        Self::start_inner(spec, None)
    }

    /// Like [`LocalCluster::start`], with `ssl = on` on every node: a test CA,
    /// a server and a client certificate are written under `<base_dir>/tls/`
    /// ([`LocalCluster::tls`]); with [`TlsSpec::hostssl_only`] the nodes
    /// accept TCP connections over TLS only (the harness's own psql calls
    /// and the standbys' streaming use TLS, as libpq prefers it).
    pub fn start_tls(spec: ClusterSpec, tls: TlsSpec) -> Result<LocalCluster, ClusterError> {
        Self::start_inner(spec, Some(tls))
    }

    fn start_inner(spec: ClusterSpec, tls: Option<TlsSpec>) -> Result<LocalCluster, ClusterError> {
        let bindir = find_bindir()?;
        let (run_as, owner) = RunAs::detect()?;
        let base_dir = create_base_dir(owner)?;
        tracing::info!(base_dir = %base_dir.display(), "starting local PostgreSQL cluster");
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            base_dir,
            bindir,
            run_as,
            owner,
            shut_down: false,
            tls: None,
        };
        // On error `cluster` is dropped here, which stops servers and removes base_dir.
        cluster.build(&spec, tls.as_ref())?;
        Ok(cluster)
    }

    /// The database superuser, `postgres`; it connects over 127.0.0.1 with trust
    /// (no password).
    pub(crate) fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// A libpq key/value connection string for the superuser on `node`, database `db`.
    pub(crate) fn conninfo(&self, node: usize, db: &str) -> String {
        let db = db.replace('\\', "\\\\").replace('\'', "\\'");
        let port = self.node(node).port;
        format!("host=127.0.0.1 port={port} user={SUPERUSER} dbname='{db}' connect_timeout=10")
    }

    /// Runs `sql` through psql on `node` as the superuser in database `postgres`
    /// and returns stdout trimmed (unaligned, tuples only: columns joined by `|`,
    /// rows by newlines). Errors on non-zero exit, with psql's stderr.
    pub fn psql(&self, node: usize, sql: &str) -> Result<String, ClusterError> {
        self.psql_db(node, "postgres", sql)
    }

    /// Like [`LocalCluster::psql`], in database `db`.
    pub fn psql_db(&self, node: usize, db: &str, sql: &str) -> Result<String, ClusterError> {
        self.psql_timeout(node, db, sql, COMMAND_TIMEOUT)
    }

    /// Stops `node` with `pg_ctl stop -m <mode> -w` (`mode`: "smart", "fast" or
    /// "immediate").
    pub fn stop_node(&self, node: usize, mode: &str) -> Result<(), ClusterError> {
        self.pg_ctl(node, &format!("stop -m {mode}"), PG_CTL_WAIT)
    }

    /// The shell command that stops `node` with `pg_ctl stop -m <mode>`, as a
    /// person types it: this cluster's pg_ctl (whatever its version or
    /// installation), run as the `postgres` OS user when we are root.
    pub(crate) fn stop_command_line(&self, node: usize, mode: &str) -> String {
        let exe = path_str(&self.bindir.join("pg_ctl"));
        let data = path_str(&self.node(node).data_dir);
        let args = ["stop", "-m", mode, "-D", &data];
        self.run_as.shell_line(&exe, &args)
    }

    /// Starts `node` with `pg_ctl start -w`, logging to its `postgres.log`, and waits
    /// (30 s) until it accepts connections.
    pub fn start_node(&self, node: usize) -> Result<(), ClusterError> {
        let log = path_str(&self.node(node).log_file());
        self.pg_ctl(node, &format!("start -l {log}"), PG_CTL_WAIT)?;
        wait_until(
            Duration::from_secs(30),
            &format!("node{node} to accept connections"),
            || {
                self.psql_timeout(node, "postgres", "SELECT 1", POLL_TIMEOUT)
                    .map(|_| true)
            },
        )
        .map_err(|e| self.with_log(node, e))
    }

    /// True if `pg_ctl status` says the server of `node` is running.
    #[cfg(test)]
    pub(crate) fn is_running(&self, node: usize) -> bool {
        let data = path_str(&self.node(node).data_dir);
        self.run("pg_ctl", &["status", "-D", &data], POLL_TIMEOUT)
            .is_ok()
    }

    /// Promotes standby `node` to primary (`pg_ctl promote -w`).
    pub fn promote(&self, node: usize) -> Result<(), ClusterError> {
        self.pg_ctl(node, "promote", PG_CTL_WAIT)
    }

    /// Index of a node that accepts connections and is not in recovery, if any.
    pub(crate) fn primary_index(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.in_recovery(i) == Some(false))
    }

    /// Waits (30 s) until every reachable standby has replayed the primary's
    /// `pg_current_wal_lsn()` as of this call. Standbys that are down are skipped;
    /// one that follows no reachable primary makes this time out.
    pub fn wait_replayed(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut primary = None;
        wait_until(Duration::from_secs(30), "a reachable primary", || {
            primary = self.primary_index();
            Ok(primary.is_some())
        })?;
        let primary = primary.unwrap_or_default();
        let lsn = quote_literal(&self.psql(primary, "SELECT pg_current_wal_lsn()")?);
        let sql = format!("SELECT coalesce(pg_last_wal_replay_lsn() >= {lsn}::pg_lsn, false)");
        for i in (0..self.nodes.len()).filter(|&i| self.in_recovery(i) == Some(true)) {
            let left = deadline.saturating_duration_since(Instant::now());
            wait_until(left, &format!("node{i} to replay up to {lsn}"), || {
                Ok(self.psql_timeout(i, "postgres", &sql, POLL_TIMEOUT)? == "t")
            })
            .map_err(|e| self.with_log(i, e))?;
        }
        Ok(())
    }

    /// The last `max_lines` lines of the server log of `node` (empty if none).
    pub(crate) fn log_tail(&self, node: usize, max_lines: usize) -> String {
        let text = fs::read(self.node(node).log_file()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }

    /// Stops every node (`pg_ctl stop -m immediate`, falling back to SIGKILL of the
    /// postmaster) and removes `base_dir`. Idempotent, never panics; run on drop.
    pub fn shutdown(&mut self) {
        if std::mem::replace(&mut self.shut_down, true) {
            return;
        }
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        let removed = (0..5).any(|attempt| {
            thread::sleep(Duration::from_millis(200 * attempt));
            let result = fs::remove_dir_all(&self.base_dir);
            matches!(&result, Err(e) if e.kind() == io::ErrorKind::NotFound) || result.is_ok()
        });
        if !removed {
            tracing::warn!(dir = %self.base_dir.display(), "could not remove cluster dir");
        }
    }

    /// Creates the primary and the standbys described by `spec`.
    fn build(&mut self, spec: &ClusterSpec, tls: Option<&TlsSpec>) -> Result<(), ClusterError> {
        self.add_node(0)?;
        let data_dir = self.nodes[0].data_dir.clone();
        let data = path_str(&data_dir);
        let initdb = format!(
            "-D {data} -U {SUPERUSER} --auth-local=trust --auth-host=trust -E UTF8 --locale=C \
             --no-sync"
        );
        self.run("initdb", &words(&initdb), COMMAND_TIMEOUT)?;
        let mut hba = HBA_CONF.to_string();
        let mut extra: String = spec
            .extra_conf
            .iter()
            .map(|line| format!("{line}\n"))
            .collect();
        if let Some(tls) = tls {
            extra.push_str(&self.make_tls(tls)?);
            if tls.hostssl_only {
                hba = tls::hostssl_only(&hba);
            }
        }
        self.write_file(&data_dir.join("pg_hba.conf"), &hba, false)?;
        let conf = format!("{COMMON_CONF}{extra}{}", self.node_conf(0));
        self.write_file(&data_dir.join("postgresql.conf"), &conf, true)?;
        self.start_new_node(0)?;

        for (name, password) in &spec.users {
            let (name, password) = (quote_ident(name), quote_literal(password));
            self.psql(
                0,
                &format!("CREATE ROLE {name} LOGIN CREATEDB PASSWORD {password}"),
            )?;
        }
        for (db, owner) in &spec.databases {
            let (db, owner) = (quote_ident(db), quote_ident(owner));
            self.psql(0, &format!("CREATE DATABASE {db} OWNER {owner}"))?;
        }

        for id in 1..=spec.standbys {
            self.add_node(id)?;
            let data_dir = self.nodes[id].data_dir.clone();
            let (data, port) = (path_str(&data_dir), self.nodes[0].port);
            let mut args = format!(
                "-h 127.0.0.1 -p {port} -U {SUPERUSER} -D {data} -R -X stream -c fast --no-sync"
            );
            if spec.slots {
                // -C creates the slot on the primary; -R writes primary_slot_name.
                args.push_str(&format!(" -C -S {}", self.nodes[id].application_name));
            }
            let backup = self.run("pg_basebackup", &words(&args), COMMAND_TIMEOUT);
            backup.map_err(|e| self.with_log(0, e))?;
            // The primary's settings were copied; later lines win, so override them.
            let conninfo = quote_literal(&self.primary_conninfo(id, 0));
            let conf = format!("\n{}primary_conninfo = {conninfo}\n", self.node_conf(id));
            self.write_file(&data_dir.join("postgresql.auto.conf"), &conf, true)?;
            self.start_new_node(id)?;
        }

        let names: Vec<String> = self.nodes[1..]
            .iter()
            .map(|n| n.application_name.clone())
            .collect();
        // An array literal ('{node1,node2}'), which also works with no standbys.
        let mut streaming = format!(
            "state = 'streaming' AND application_name = ANY('{{{}}}')",
            names.join(",")
        );
        if spec.slots {
            streaming.push_str(
                " AND pid IN (SELECT active_pid FROM pg_replication_slots \
                 WHERE slot_name = application_name)",
            );
        }
        self.wait_replication(&streaming, names.len(), Duration::from_secs(60))?;

        if spec.synchronous && !names.is_empty() {
            let value = quote_literal(&format!("ANY 1 ({})", names.join(", ")));
            self.psql(
                0,
                &format!("ALTER SYSTEM SET synchronous_standby_names = {value}"),
            )?;
            self.psql(0, "SELECT pg_reload_conf()")?;
            let timeout = Duration::from_secs(30);
            self.wait_replication("sync_state = 'quorum'", names.len(), timeout)?;
        }
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        tracing::info!(?ports, base_dir = %self.base_dir.display(), "local cluster ready");
        Ok(())
    }

    /// Creates `<base_dir>/node<id>`, owned by the server user, and registers the node.
    fn add_node(&mut self, id: usize) -> Result<(), ClusterError> {
        let dir = self.base_dir.join(format!("node{id}"));
        fs::create_dir(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        self.chown(&dir)?;
        self.nodes.push(LocalNode {
            node_id: id,
            port: free_port(),
            data_dir: dir.join("data"),
            application_name: format!("node{id}"),
        });
        Ok(())
    }

    /// Starts a new node; if its port was taken meanwhile ("Address already in
    /// use" in the log), moves it to another port and retries, 3 tries in all.
    fn start_new_node(&mut self, id: usize) -> Result<(), ClusterError> {
        for attempt in 1.. {
            let log = self.nodes[id].log_file();
            let log_len = fs::metadata(&log).map_or(0, |m| m.len() as usize);
            let Err(err) = self.start_node(id) else {
                return Ok(());
            };
            let log_text = fs::read(&log).unwrap_or_default();
            let new_text = String::from_utf8_lossy(log_text.get(log_len..).unwrap_or_default());
            if attempt >= 3 || !new_text.contains("Address already in use") {
                return Err(err);
            }
            let port = free_port();
            tracing::warn!(node = id, port, "port was taken; retrying on another");
            let auto_conf = self.nodes[id].data_dir.join("postgresql.auto.conf");
            self.write_file(&auto_conf, &format!("\nport = {port}\n"), true)?;
            self.nodes[id].port = port;
        }
        unreachable!("the retry loop returns")
    }

    /// Polls node 0 until `expected` rows of `pg_stat_replication` match
    /// `condition`; a timeout error carries the standbys' log tails.
    fn wait_replication(
        &self,
        condition: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let sql = format!("SELECT count(*) FROM pg_stat_replication WHERE {condition}");
        let what = format!("{expected} pg_stat_replication row(s) with {condition}");
        wait_until(timeout, &what, || {
            Ok(self.psql_timeout(0, "postgres", &sql, POLL_TIMEOUT)? == expected.to_string())
        })
        .map_err(|e| (1..self.nodes.len()).fold(e, |e, i| self.with_log(i, e)))
    }

    /// Per-node settings: port, cluster_name and unix socket directory.
    fn node_conf(&self, id: usize) -> String {
        let n = &self.nodes[id];
        let (name, sockets) = (
            quote_literal(&n.application_name),
            quote_literal(&path_str(&n.node_dir())),
        );
        format!(
            "port = {}\ncluster_name = {name}\nunix_socket_directories = {sockets}\n",
            n.port
        )
    }

    /// `primary_conninfo` for `standby` streaming from `primary` (its slot, if
    /// any, is in `primary_slot_name`, written by `pg_basebackup -R`).
    fn primary_conninfo(&self, standby: usize, primary: usize) -> String {
        let (name, port) = (
            &self.node(standby).application_name,
            self.node(primary).port,
        );
        format!("host=127.0.0.1 port={port} user={SUPERUSER} application_name={name}")
    }

    /// The node at index `i`; panics with a clear message if there is none.
    fn node(&self, i: usize) -> &LocalNode {
        let count = self.nodes.len();
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("no node {i} in a cluster of {count} nodes"))
    }

    /// `Some(true)` for a standby, `Some(false)` for a primary, `None` if unreachable.
    fn in_recovery(&self, node: usize) -> Option<bool> {
        let sql = "SELECT pg_is_in_recovery()";
        match self.psql_timeout(node, "postgres", sql, POLL_TIMEOUT) {
            Ok(out) => Some(out == "t"),
            Err(e) => {
                // Polled while nodes start and stop: not answering is expected.
                tracing::debug!(node, error = %e, "node did not answer pg_is_in_recovery()");
                None
            }
        }
    }

    /// psql on `node`/`db` (see [`LocalCluster::psql`]) with a custom time limit.
    fn psql_timeout(
        &self,
        node: usize,
        db: &str,
        sql: &str,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        let conninfo = self.conninfo(node, db);
        let mut args = words("-X -A -t -q -v ON_ERROR_STOP=1 -d");
        args.extend([conninfo.as_str(), "-c", sql]);
        Ok(self.run("psql", &args, timeout)?.trim().to_string())
    }

    /// `pg_ctl <action> -D <data> -w -t <wait_secs>`; errors carry the node's log tail.
    fn pg_ctl(&self, node: usize, action: &str, wait_secs: u64) -> Result<(), ClusterError> {
        let data = path_str(&self.node(node).data_dir);
        let args = format!("{action} -D {data} -w -t {wait_secs}");
        let timeout = Duration::from_secs(wait_secs + 30); // pg_ctl's own limit plus slack
        let result = self.run("pg_ctl", &words(&args), timeout);
        result.map(drop).map_err(|e| self.with_log(node, e))
    }

    /// Runs `<bindir>/<program> args...` (as the `postgres` OS user when root), in
    /// `base_dir`, without PG* environment variables that could redirect it.
    fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String, ClusterError> {
        let exe = path_str(&self.bindir.join(program));
        let (cmd, label) = self.run_as.command(&exe, args, &self.base_dir);
        tracing::debug!(cmd = %label, "localcluster: running");
        run_command(cmd, &label, timeout)
    }

    /// Writes (or appends) `text` to `path`, owned by the server user.
    fn write_file(&self, path: &Path, text: &str, append: bool) -> Result<(), ClusterError> {
        let mut options = OpenOptions::new();
        options
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append);
        options.open(path)?.write_all(text.as_bytes())?;
        Ok(self.chown(path)?)
    }

    /// Gives `path` to the `postgres` OS user when we are root.
    fn chown(&self, path: &Path) -> io::Result<()> {
        chown_to(path, self.owner)
    }

    /// Appends the tail of `node`'s server log to a command or timeout error.
    fn with_log(&self, node: usize, mut err: ClusterError) -> ClusterError {
        let lines = self.log_tail(node, 30);
        if lines.is_empty() {
            return err;
        }
        let tail = LogTail {
            path: self.node(node).log_file(),
            lines,
        };
        match &mut err {
            ClusterError::Command(failed) => failed.server_log = Some(tail),
            ClusterError::Timeout(text) => text.push_str(&LogTail::suffix(&Some(tail))),
            _ => {}
        }
        err
    }

    /// Stops `node` if it has a postmaster.pid: pg_ctl immediate, then SIGKILL.
    fn kill_node(&self, i: usize) {
        let data_dir = &self.nodes[i].data_dir;
        if !data_dir.join("postmaster.pid").exists() {
            return;
        }
        if let Err(e) = self.pg_ctl(i, "stop -m immediate", SHUTDOWN_WAIT) {
            tracing::warn!(node = i, error = %e, "pg_ctl stop failed; killing the postmaster");
        }
        kill_postmaster(data_dir);
    }
}

impl Drop for LocalCluster {
    /// Stops the servers and removes the directory (see [`LocalCluster::shutdown`]).
    fn drop(&mut self) {
        self.shutdown()
    }
}

/// Creates the private base dir (mode 0700, owned by `owner`) in the temp dir.
/// Falls back to /tmp when the temp dir path is long (unix socket paths are
/// limited to ~107 bytes), contains whitespace (command lines are split on it),
/// or, as root, is not traversable by the `postgres` user.
fn create_base_dir(owner: Option<(u32, u32)>) -> io::Result<PathBuf> {
    let mut parent = std::env::temp_dir();
    let traversable = |p: &Path| {
        let mode = |a: &Path| fs::metadata(a).map_or(0, |m| m.permissions().mode());
        p.ancestors().all(|a| mode(a) & 0o001 != 0)
    };
    let text = path_str(&parent);
    if text.len() > 60
        || text.contains(char::is_whitespace)
        || (owner.is_some() && !traversable(&parent))
    {
        parent = PathBuf::from("/tmp");
    }
    loop {
        let name = format!(
            "pgpilot-cluster-{}-{:012x}",
            std::process::id(),
            random_u64() >> 16
        );
        let dir = parent.join(name);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
                chown_to(&dir, owner)?;
                return Ok(dir);
            }
        }
    }
}

/// Random bits from std's randomly keyed hasher, the clock, the pid and a counter.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Splits a command line made by this module on whitespace (its paths have none).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// A path as a string for command lines and config files.
fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// SQL identifier quoting: `"name"` with embedded quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQL / postgresql.conf string literal: `'text'` with embedded quotes doubled.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_replicates_to_standby() {
        if let Err(e) = find_bindir() {
            eprintln!("skipping localcluster test: {e}");
            return;
        }
        let spec = ClusterSpec {
            standbys: 1,
            users: vec![("app".into(), "secret".into())],
            databases: vec![("app".into(), "app".into())],
            slots: true,
            ..ClusterSpec::default()
        };
        let mut cluster = LocalCluster::start(spec).expect("start cluster");
        assert_eq!(cluster.nodes.len(), 2);
        let scram =
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app'";
        assert_eq!(cluster.psql(0, scram).unwrap(), "t");

        let create = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'hi')";
        cluster.psql_db(0, "app", create).unwrap();
        cluster.wait_replayed().unwrap();
        assert_eq!(
            cluster
                .psql_db(1, "app", "SELECT v FROM t WHERE id = 1")
                .unwrap(),
            "hi"
        );
        assert_eq!(cluster.psql(1, "select pg_is_in_recovery()").unwrap(), "t");
        let name = "SELECT current_setting('cluster_name')";
        assert_eq!(cluster.psql(1, name).unwrap(), "node1");
        let slot = "SELECT current_setting('primary_slot_name')";
        assert_eq!(cluster.psql(1, slot).unwrap(), "node1");
        let active = "SELECT active FROM pg_replication_slots WHERE slot_name = 'node1'";
        assert_eq!(cluster.psql(0, active).unwrap(), "t");
        assert_eq!(cluster.primary_index(), Some(0));

        cluster.stop_node(1, "fast").unwrap();
        assert!(!cluster.is_running(1));
        cluster.start_node(1).unwrap();
        assert!(cluster.is_running(1));

        let base_dir = cluster.base_dir.clone();
        cluster.shutdown();
        cluster.shutdown(); // idempotent
        assert!(!base_dir.exists(), "shutdown must remove the base dir");
    }
}
