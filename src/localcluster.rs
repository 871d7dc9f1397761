//! Throwaway local PostgreSQL clusters for `pgpilot demo` and integration tests.
//!
//! [`LocalCluster::start`] builds a real cluster — one primary plus N
//! streaming-replication hot standbys — from the PostgreSQL server binaries
//! installed on the machine (see [`find_bindir`]). The cluster owns everything
//! it creates, all of it under one private temporary directory:
//!
//! ```text
//! <temp>/pgpilot-cluster-<pid>-<random>/    LocalCluster::base_dir
//!     node0/                node directory: unix socket + postgres.log
//!         data/             PGDATA of the primary (initdb)
//!     node1/data/, ...      standbys (pg_basebackup copies of node0)
//! ```
//!
//! Servers listen on 127.0.0.1 only, on ports picked by [`free_port`], and keep
//! their unix sockets in their node directory, so nothing touches
//! `/var/run/postgresql` or an installed cluster. The superuser `postgres` is
//! trusted on loopback (no password); roles from [`ClusterSpec::users`]
//! authenticate with SCRAM-SHA-256. Each server reports its node name in
//! `current_setting('cluster_name')` (`node0`, `node1`, ...).
//!
//! [`LocalCluster::shutdown`] (also run by `Drop`, including when `start`
//! fails midway) stops every server and deletes the directory. A process
//! killed by a signal cannot clean up; its servers and directory are left behind.
//!
//! PostgreSQL refuses to run as root, so when the current process is root every
//! server binary runs as the `postgres` OS user (through `runuser`, or `su` as a
//! fallback) and the directory tree is owned by that user.
//!
//! This is blocking code (it spawns processes and sleeps while polling); call it
//! from a plain thread or `tokio::task::spawn_blocking`.

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fs::{self, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Database superuser created by initdb (also the OS user servers run as under root).
const SUPERUSER: &str = "postgres";
/// Upper bound for any single external command, so a hung child cannot hang the caller.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout for one psql call inside a polling loop.
const POLL_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds `pg_ctl -w -t` waits for a start, stop or promotion.
const PG_CTL_WAIT: &str = "60";
/// Outer timeout for pg_ctl itself (its own `-t` plus slack).
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(90);
/// Binaries a bindir must contain to be usable.
const REQUIRED_BINARIES: [&str; 5] = ["initdb", "pg_ctl", "pg_basebackup", "postgres", "psql"];

/// Replaces the pg_hba.conf written by initdb: loopback only, superuser and
/// replication trusted, every other role must use SCRAM.
const HBA_CONF: &str = "\
# Written by pgpilot localcluster: loopback only.
local   all          all                       trust
host    all          postgres     127.0.0.1/32 trust
host    all          postgres     ::1/128      trust
host    replication  all          127.0.0.1/32 trust
host    replication  all          ::1/128      trust
host    all          all          127.0.0.1/32 scram-sha-256
host    all          all          ::1/128      scram-sha-256
";

/// What [`LocalCluster::start`] should build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of streaming hot standbys to create next to the primary (0 allowed).
    pub standbys: usize,
    /// Roles to create on the primary as `(name, password)`: LOGIN CREATEDB with a
    /// SCRAM-SHA-256 password, so clients can exercise real password auth.
    pub users: Vec<(String, String)>,
    /// Databases to create as `(name, owner)`; the owner should be one of `users`
    /// (or `postgres`).
    pub databases: Vec<(String, String)>,
    /// Extra postgresql.conf lines applied to every node (e.g. `"max_connections = 200"`).
    pub extra_conf: Vec<String>,
    /// When true, `synchronous_standby_names = 'ANY 1 (node1, ...)'` is set on the
    /// primary once the standbys stream, so commits wait for one standby.
    pub synchronous: bool,
}

impl Default for ClusterSpec {
    /// Two asynchronous standbys, no extra roles, databases or settings.
    fn default() -> Self {
        ClusterSpec {
            standbys: 2,
            users: Vec::new(),
            databases: Vec::new(),
            extra_conf: Vec::new(),
            synchronous: false,
        }
    }
}

/// One PostgreSQL server of a [`LocalCluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Index in [`LocalCluster::nodes`]; 0 is the primary at creation, 1.. the standbys.
    pub node_id: usize,
    /// TCP port the server listens on (127.0.0.1 only).
    pub port: u16,
    /// PGDATA of the server (`<base_dir>/nodeN/data`).
    pub data_dir: PathBuf,
    /// `nodeN`: the server's `cluster_name` and, on standbys, the
    /// `application_name` it shows in the primary's `pg_stat_replication`.
    pub application_name: String,
}

impl LocalNode {
    /// The node directory holding `data/`, the unix socket and the log file.
    pub fn node_dir(&self) -> PathBuf {
        self.data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// The server log (`<node dir>/postgres.log`, written through `pg_ctl -l`).
    pub fn log_file(&self) -> PathBuf {
        self.node_dir().join("postgres.log")
    }
}

/// How server binaries are launched.
#[derive(Debug, Clone)]
enum RunAs {
    /// Directly, as the current (non-root) user.
    Current,
    /// `runuser -u postgres -- <cmd>` (we are root).
    Runuser(PathBuf),
    /// `su postgres -s /bin/sh -c '<cmd>'` (we are root and runuser is missing).
    Su,
}

/// A running throwaway cluster; stopped and deleted by [`LocalCluster::shutdown`] or on drop.
#[derive(Debug)]
pub struct LocalCluster {
    /// The servers, indexed by [`LocalNode::node_id`].
    pub nodes: Vec<LocalNode>,
    /// Private temporary directory holding every node; removed on shutdown.
    pub base_dir: PathBuf,
    /// Directory of the PostgreSQL binaries in use (from [`find_bindir`]).
    pub bindir: PathBuf,
    /// How to launch binaries (directly, or as the `postgres` OS user when root).
    run_as: RunAs,
    /// `(uid, gid)` of the `postgres` OS user when running as root: owner of what we create.
    owner: Option<(u32, u32)>,
    /// Set once shutdown ran, so it is idempotent (explicit call followed by Drop).
    shut_down: bool,
}

/// Errors from building or driving a [`LocalCluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL server binaries (or, as root, no `postgres` OS user).
    #[error(
        "PostgreSQL server binaries not found: {0}. Install the Debian package `postgresql` \
         (apt-get install -y postgresql) or set PGPILOT_PG_BINDIR to its bin directory"
    )]
    BinariesNotFound(String),
    /// An external command failed; `output` holds its stderr/stdout and, where
    /// relevant, the tail of the node's server log.
    #[error("command `{cmd}` failed ({status}):\n{output}")]
    Command {
        /// The command line that was run.
        cmd: String,
        /// Exit status, or why it could not run.
        status: String,
        /// Captured stderr and stdout, plus the server log tail if relevant.
        output: String,
    },
    /// Filesystem or process I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Something did not happen within its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Finds the PostgreSQL server binaries: `$PGPILOT_PG_BINDIR` if set, else
/// `pg_config --bindir`, else the highest version in `/usr/lib/postgresql/*/bin`,
/// else a directory on `PATH`. A directory counts only if it holds initdb, pg_ctl,
/// pg_basebackup, postgres and psql.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("PGPILOT_PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_binaries(&dir) {
            return Ok(dir);
        }
        return Err(ClusterError::BinariesNotFound(format!(
            "PGPILOT_PG_BINDIR={} lacks one of {}",
            dir.display(),
            REQUIRED_BINARIES.join(", ")
        )));
    }
    let mut pg_config = Command::new("pg_config");
    pg_config.arg("--bindir");
    if let Ok(out) = run_command(pg_config, "pg_config --bindir", POLL_QUERY_TIMEOUT) {
        let dir = PathBuf::from(out.trim());
        if has_binaries(&dir) {
            return Ok(dir);
        }
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_binaries(dir))
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return Ok(dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| has_binaries(d)) {
        return Ok(dir);
    }
    Err(ClusterError::BinariesNotFound(format!(
        "no directory with {} (looked at PGPILOT_PG_BINDIR, pg_config, /usr/lib/postgresql/*/bin, PATH)",
        REQUIRED_BINARIES.join(", ")
    )))
}

/// Picks a free TCP port on 127.0.0.1. Ports are drawn at random from
/// 20000..32768 (below Linux's ephemeral range, to limit collisions between test
/// binaries running at once), checked to be bindable, and never handed out twice
/// by this process. The port is free when returned, not reserved: a server
/// failing with "Address already in use" is retried on a new port by `start`.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = 20000 + (random_u64() % 12768) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    // Range exhausted (unlikely): let the kernel choose.
    let port = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind any TCP port on 127.0.0.1");
    handed_out.insert(port);
    port
}

impl LocalCluster {
    /// Builds and starts a cluster: initdb the primary, configure and start it,
    /// create the spec's roles and databases, then clone each standby with
    /// `pg_basebackup -R -X stream`, start it, and wait (60 s) until the primary's
    /// `pg_stat_replication` shows every standby `streaming`. On error, everything
    /// created so far is stopped and removed.
    pub fn start(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        let bindir = find_bindir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let (run_as, owner) = if root {
            let owner = postgres_account().ok_or_else(|| {
                ClusterError::BinariesNotFound(
                    "running as root, but there is no `postgres` OS user to run the servers".into(),
                )
            })?;
            let runuser = [
                "/usr/sbin/runuser",
                "/sbin/runuser",
                "/usr/bin/runuser",
                "/bin/runuser",
            ]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
            (runuser.map_or(RunAs::Su, RunAs::Runuser), Some(owner))
        } else {
            (RunAs::Current, None)
        };
        let base_dir = create_base_dir(owner)?;
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            base_dir,
            bindir,
            run_as,
            owner,
            shut_down: false,
        };
        tracing::info!(base_dir = %cluster.base_dir.display(), bindir = %cluster.bindir.display(),
            standbys = spec.standbys, "starting local PostgreSQL cluster");
        // Any error below drops `cluster`, whose Drop stops the servers and removes base_dir.
        cluster.build(&spec)?;
        tracing::info!(ports = ?cluster.nodes.iter().map(|n| n.port).collect::<Vec<_>>(), "local cluster ready");
        Ok(cluster)
    }

    /// The database superuser (`postgres`); it connects over 127.0.0.1 with trust (no password).
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// A libpq key/value connection string for the superuser on `node`, database `db`.
    pub fn conninfo(&self, node: usize, db: &str) -> String {
        let quoted = format!("'{}'", db.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={quoted} connect_timeout=10",
            self.node(node).port
        )
    }

    /// Runs `sql` through psql on `node` as the superuser in database `postgres`,
    /// returning trimmed stdout (unaligned, tuples only). Errors on non-zero exit.
    pub fn psql(&self, node: usize, sql: &str) -> Result<String, ClusterError> {
        self.psql_db(node, "postgres", sql)
    }

    /// Like [`LocalCluster::psql`], in database `db`.
    pub fn psql_db(&self, node: usize, db: &str, sql: &str) -> Result<String, ClusterError> {
        self.psql_timeout(node, db, sql, COMMAND_TIMEOUT)
    }

    /// Stops `node` with `pg_ctl stop -m <mode> -w` (`mode`: "smart", "fast" or "immediate").
    pub fn stop_node(&self, node: usize, mode: &str) -> Result<(), ClusterError> {
        let data = path_str(&self.node(node).data_dir);
        let args = ["stop", "-D", &data, "-m", mode, "-w", "-t", PG_CTL_WAIT];
        self.run("pg_ctl", &args, PG_CTL_TIMEOUT)
            .map_err(|e| self.with_log(node, e))?;
        Ok(())
    }

    /// Starts `node` with `pg_ctl start -w` (logging to its `postgres.log`) and waits
    /// up to 30 s until it accepts connections.
    pub fn start_node(&self, node: usize) -> Result<(), ClusterError> {
        let n = self.node(node);
        let (data, log) = (path_str(&n.data_dir), path_str(&n.log_file()));
        let args = ["start", "-D", &data, "-l", &log, "-w", "-t", PG_CTL_WAIT];
        self.run("pg_ctl", &args, PG_CTL_TIMEOUT)
            .map_err(|e| self.with_log(node, e))?;
        wait_until(
            Duration::from_secs(30),
            &format!("node{node} to accept connections"),
            || {
                self.psql_timeout(node, "postgres", "SELECT 1", POLL_QUERY_TIMEOUT)
                    .map(|_| true)
            },
        )
        .map_err(|e| self.with_log(node, e))
    }

    /// True if `pg_ctl status` says the server of `node` is running.
    pub fn is_running(&self, node: usize) -> bool {
        let data = path_str(&self.node(node).data_dir);
        self.run("pg_ctl", &["status", "-D", &data], POLL_QUERY_TIMEOUT)
            .is_ok()
    }

    /// Promotes standby `node` to primary (`pg_ctl promote -w`).
    pub fn promote(&self, node: usize) -> Result<(), ClusterError> {
        let data = path_str(&self.node(node).data_dir);
        let args = ["promote", "-D", &data, "-w", "-t", PG_CTL_WAIT];
        self.run("pg_ctl", &args, PG_CTL_TIMEOUT)
            .map_err(|e| self.with_log(node, e))?;
        Ok(())
    }

    /// Points standby `standby` at `primary` (e.g. after a promotion) by setting its
    /// `primary_conninfo` with ALTER SYSTEM and reloading; the standby keeps its
    /// `application_name`.
    pub fn follow(&self, standby: usize, primary: usize) -> Result<(), ClusterError> {
        let conninfo = self.primary_conninfo(standby, primary);
        self.psql(
            standby,
            &format!(
                "ALTER SYSTEM SET primary_conninfo = {}",
                quote_literal(&conninfo)
            ),
        )?;
        self.psql(standby, "SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// Index of a node that accepts connections and is not in recovery, if any.
    pub fn primary_index(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.in_recovery(i) == Some(false))
    }

    /// Waits (30 s) until every reachable standby has replayed the primary's
    /// `pg_current_wal_lsn()` as of this call. Standbys that are down are skipped;
    /// a standby following another primary would time out.
    pub fn wait_replayed(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut primary = None;
        wait_until(Duration::from_secs(30), "a running primary", || {
            primary = self.primary_index();
            Ok(primary.is_some())
        })?;
        let primary = primary.unwrap_or_default();
        let lsn = self.psql(primary, "SELECT pg_current_wal_lsn()")?;
        let check = format!(
            "SELECT coalesce(pg_last_wal_replay_lsn() >= {}::pg_lsn, false)",
            quote_literal(&lsn)
        );
        for i in
            (0..self.nodes.len()).filter(|&i| i != primary && self.in_recovery(i) == Some(true))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            wait_until(left, &format!("node{i} to replay up to {lsn}"), || {
                Ok(self.psql_timeout(i, "postgres", &check, POLL_QUERY_TIMEOUT)? == "t")
            })?;
        }
        Ok(())
    }

    /// The last `max_lines` lines of the server log of `node` (empty if none).
    pub fn log_tail(&self, node: usize, max_lines: usize) -> String {
        let text = fs::read(self.node(node).log_file()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }

    /// Stops every node (`pg_ctl stop -m immediate`, falling back to SIGKILL of the
    /// postmaster) and removes `base_dir`. Idempotent; never panics; run by Drop.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        for attempt in 1..=5 {
            match fs::remove_dir_all(&self.base_dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if attempt == 5 => {
                    tracing::warn!(dir = %self.base_dir.display(), error = %e, "could not remove cluster dir")
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
        tracing::info!(base_dir = %self.base_dir.display(), "local cluster shut down");
    }

    // ---- construction ----

    /// Creates the primary and the standbys described by `spec`.
    fn build(&mut self, spec: &ClusterSpec) -> Result<(), ClusterError> {
        self.add_node(0)?;
        let data = path_str(&self.nodes[0].data_dir);
        let initdb = [
            "-D",
            &data,
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=trust",
        ];
        self.run(
            "initdb",
            &[&initdb[..], &["-E", "UTF8", "--locale=C", "--no-sync"]].concat(),
            COMMAND_TIMEOUT,
        )?;
        let data_dir = &self.nodes[0].data_dir;
        self.write_file(&data_dir.join("pg_hba.conf"), HBA_CONF, false)?;
        let conf = format!("{}{}", common_conf(&spec.extra_conf), self.node_conf(0));
        self.write_file(&data_dir.join("postgresql.conf"), &conf, true)?;
        self.start_new_node(0)?;

        for (name, password) in &spec.users {
            let sql = format!(
                "CREATE ROLE {} LOGIN CREATEDB PASSWORD {}",
                quote_ident(name),
                quote_literal(password)
            );
            self.psql(0, &sql)?;
        }
        for (db, owner) in &spec.databases {
            self.psql(
                0,
                &format!(
                    "CREATE DATABASE {} OWNER {}",
                    quote_ident(db),
                    quote_ident(owner)
                ),
            )?;
        }

        for id in 1..=spec.standbys {
            self.add_node(id)?;
            let (data, port) = (
                path_str(&self.nodes[id].data_dir),
                self.nodes[0].port.to_string(),
            );
            let args = ["-h", "127.0.0.1", "-p", &port, "-U", SUPERUSER, "-D", &data];
            let more = ["-R", "-X", "stream", "-c", "fast", "--no-sync"];
            self.run(
                "pg_basebackup",
                &[&args[..], &more].concat(),
                COMMAND_TIMEOUT,
            )
            .map_err(|e| self.with_log(0, e))?;
            // Later lines win: override what was copied from the primary.
            let overrides = format!(
                "\n{}primary_conninfo = {}\n",
                self.node_conf(id),
                quote_literal(&self.primary_conninfo(id, 0))
            );
            self.write_file(
                &self.nodes[id].data_dir.join("postgresql.auto.conf"),
                &overrides,
                true,
            )?;
            self.start_new_node(id)?;
        }

        let names: Vec<String> = (1..=spec.standbys)
            .map(|i| quote_literal(&format!("node{i}")))
            .collect();
        let streaming = format!(
            "state = 'streaming' AND application_name IN ({})",
            names.join(", ")
        );
        self.wait_replication(&streaming, spec.standbys, Duration::from_secs(60))?;

        if spec.synchronous && spec.standbys > 0 {
            let list: Vec<String> = (1..=spec.standbys).map(|i| format!("node{i}")).collect();
            let value = quote_literal(&format!("ANY 1 ({})", list.join(", ")));
            self.psql(
                0,
                &format!("ALTER SYSTEM SET synchronous_standby_names = {value}"),
            )?;
            self.psql(0, "SELECT pg_reload_conf()")?;
            self.wait_replication(
                "sync_state = 'quorum'",
                spec.standbys,
                Duration::from_secs(30),
            )?;
        }
        Ok(())
    }

    /// Creates `<base_dir>/node<id>` (owned by the server user) and registers the node.
    fn add_node(&mut self, id: usize) -> Result<(), ClusterError> {
        let dir = self.base_dir.join(format!("node{id}"));
        fs::create_dir(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        self.chown(&dir)?;
        let application_name = format!("node{id}");
        self.nodes.push(LocalNode {
            node_id: id,
            port: free_port(),
            data_dir: dir.join("data"),
            application_name,
        });
        Ok(())
    }

    /// Starts a freshly created node; if its port was grabbed meanwhile
    /// ("Address already in use"), moves it to a new port and retries (3 tries).
    fn start_new_node(&mut self, id: usize) -> Result<(), ClusterError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let log = self.nodes[id].log_file();
            let log_len = fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
            let err = match self.start_node(id) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let new_log = fs::read(&log).unwrap_or_default();
            let new_log = String::from_utf8_lossy(new_log.get(log_len..).unwrap_or_default());
            if attempt >= 3 || !new_log.contains("Address already in use") {
                return Err(err);
            }
            let port = free_port();
            tracing::warn!(
                node = id,
                old = self.nodes[id].port,
                new = port,
                "port taken, retrying"
            );
            self.write_file(
                &self.nodes[id].data_dir.join("postgresql.auto.conf"),
                &format!("\nport = {port}\n"),
                true,
            )?;
            self.nodes[id].port = port;
        }
    }

    /// Polls the primary (node 0) until `count(*)` of `pg_stat_replication` rows
    /// matching `condition` equals `expected`; on timeout includes standby logs.
    fn wait_replication(
        &self,
        condition: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let sql = format!("SELECT count(*) FROM pg_stat_replication WHERE {condition}");
        let what = format!("{expected} standby(s) with {condition} in pg_stat_replication");
        wait_until(timeout, &what, || {
            Ok(self.psql_timeout(0, "postgres", &sql, POLL_QUERY_TIMEOUT)? == expected.to_string())
        })
        .map_err(|e| (1..self.nodes.len()).fold(e, |e, i| self.with_log(i, e)))
    }

    /// Node-specific settings: port, cluster_name and socket directory.
    fn node_conf(&self, id: usize) -> String {
        let n = &self.nodes[id];
        format!(
            "port = {}\ncluster_name = {}\nunix_socket_directories = {}\n",
            n.port,
            quote_literal(&n.application_name),
            quote_literal(&path_str(&n.node_dir()))
        )
    }

    /// `primary_conninfo` for `standby` streaming from `primary`.
    fn primary_conninfo(&self, standby: usize, primary: usize) -> String {
        let (s, p) = (self.node(standby), self.node(primary));
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} application_name={}",
            p.port, s.application_name
        )
    }

    // ---- helpers ----

    /// The node at index `i`; panics with a clear message if there is none.
    fn node(&self, i: usize) -> &LocalNode {
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("no node {i} in a cluster of {} nodes", self.nodes.len()))
    }

    /// `Some(true)` for a standby, `Some(false)` for a primary, `None` if unreachable.
    fn in_recovery(&self, node: usize) -> Option<bool> {
        match self.psql_timeout(
            node,
            "postgres",
            "SELECT pg_is_in_recovery()",
            POLL_QUERY_TIMEOUT,
        ) {
            Ok(out) => Some(out == "t"),
            Err(_) => None,
        }
    }

    fn psql_timeout(
        &self,
        node: usize,
        db: &str,
        sql: &str,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        let conninfo = self.conninfo(node, db);
        let args = [
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conninfo,
            "-c",
            sql,
        ];
        Ok(self.run("psql", &args, timeout)?.trim().to_string())
    }

    /// Runs `<bindir>/<program> args...` (as the `postgres` OS user when root),
    /// with PG* environment variables removed so they cannot redirect it.
    fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String, ClusterError> {
        let exe = path_str(&self.bindir.join(program));
        let label = std::iter::once(exe.as_str())
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = match &self.run_as {
            RunAs::Current => Command::new(&exe),
            RunAs::Runuser(runuser) => {
                let mut c = Command::new(runuser);
                c.args(["-u", SUPERUSER, "--", &exe]);
                c
            }
            RunAs::Su => {
                let line: Vec<String> = std::iter::once(exe.as_str())
                    .chain(args.iter().copied())
                    .map(sh_quote)
                    .collect();
                let mut c = Command::new("su");
                c.args([SUPERUSER, "-s", "/bin/sh", "-c", &line.join(" ")]);
                c
            }
        };
        if !matches!(self.run_as, RunAs::Su) {
            cmd.args(args);
        }
        cmd.current_dir(&self.base_dir);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        tracing::debug!(cmd = %label, "localcluster: running");
        run_command(cmd, &label, timeout)
    }

    /// Writes (or appends) `text` to `path`, owned by the server user.
    fn write_file(&self, path: &Path, text: &str, append: bool) -> Result<(), ClusterError> {
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)?;
        file.write_all(text.as_bytes())?;
        self.chown(path)?;
        Ok(())
    }

    fn chown(&self, path: &Path) -> io::Result<()> {
        match self.owner {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Adds the tail of `node`'s server log to a command or timeout error.
    fn with_log(&self, node: usize, err: ClusterError) -> ClusterError {
        let tail = self.log_tail(node, 30);
        if tail.is_empty() {
            return err;
        }
        let extra = format!(
            "\n--- last lines of {} ---\n{tail}",
            self.node(node).log_file().display()
        );
        match err {
            ClusterError::Command {
                cmd,
                status,
                output,
            } => ClusterError::Command {
                cmd,
                status,
                output: output + &extra,
            },
            ClusterError::Timeout(msg) => ClusterError::Timeout(msg + &extra),
            other => other,
        }
    }

    /// Stops `node` if its postmaster.pid exists: pg_ctl immediate, then SIGKILL.
    fn kill_node(&self, i: usize) {
        let data_dir = &self.nodes[i].data_dir;
        let pid_file = data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        if let Err(e) = self.stop_node(i, "immediate") {
            tracing::warn!(node = i, error = %e, "pg_ctl stop failed; killing the postmaster");
        }
        let pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
        let Some(pid) = pid.filter(|&p| p > 0 && postmaster_alive(p, data_dir)) else {
            return;
        };
        // SAFETY: plain kill(2); the pid was checked to be a postmaster in our data dir.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = wait_until(Duration::from_secs(5), "postmaster to exit", || {
            Ok(!postmaster_alive(pid, data_dir))
        });
    }
}

impl Drop for LocalCluster {
    /// Stops the servers and removes the directory (see [`LocalCluster::shutdown`]).
    fn drop(&mut self) {
        self.shutdown()
    }
}

/// Settings shared by every node, followed by the caller's extra lines.
fn common_conf(extra: &[String]) -> String {
    let mut conf = String::from("\n# ---- added by pgpilot localcluster ----\n");
    for line in [
        "listen_addresses = '127.0.0.1'",
        "wal_level = replica",
        "max_wal_senders = 10",
        "hot_standby = on",
        "hot_standby_feedback = on",
        "wal_keep_size = '256MB'",
        "max_connections = 100",
        "shared_buffers = '32MB'",
        "fsync = off",
        "logging_collector = off",
        "password_encryption = 'scram-sha-256'",
    ]
    .into_iter()
    .chain(extra.iter().map(String::as_str))
    {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

/// True if `dir` holds every binary in [`REQUIRED_BINARIES`] as an executable file.
fn has_binaries(dir: &Path) -> bool {
    REQUIRED_BINARIES.iter().all(|b| {
        fs::metadata(dir.join(b))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// `(uid, gid)` of the `postgres` OS user.
fn postgres_account() -> Option<(u32, u32)> {
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, both owned here and sized as passed.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

/// Creates the private base directory under the temp dir. Falls back to /tmp when
/// the temp dir path is long (unix socket paths are limited to ~107 bytes) or, as
/// root, not traversable by the `postgres` user.
fn create_base_dir(owner: Option<(u32, u32)>) -> io::Result<PathBuf> {
    let mut parent = std::env::temp_dir();
    let traversable = |p: &Path| {
        p.ancestors().all(|a| {
            fs::metadata(a)
                .map(|m| m.permissions().mode() & 0o001 != 0)
                .unwrap_or(false)
        })
    };
    if parent.as_os_str().len() > 60 || (owner.is_some() && !traversable(&parent)) {
        parent = PathBuf::from("/tmp");
    }
    loop {
        let dir = parent.join(format!(
            "pgpilot-cluster-{}-{:012x}",
            std::process::id(),
            random_u64() >> 16
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// True while `pid` is a live process whose working directory is `data_dir`
/// (a postmaster chdirs to its data dir), so we never signal an unrelated process.
fn postmaster_alive(pid: i32, data_dir: &Path) -> bool {
    let cwd = fs::read_link(format!("/proc/{pid}/cwd"));
    matches!((cwd, fs::canonicalize(data_dir)), (Ok(cwd), Ok(data)) if cwd == data)
}

/// Random bits from std's randomly keyed hasher, the clock, the pid and a counter.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Calls `check` every 100 ms until it returns `Ok(true)` or `timeout` passes;
/// errors from `check` count as "not yet" and are reported on timeout.
fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool, ClusterError>,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            let last = last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            return Err(ClusterError::Timeout(format!(
                "waited {timeout:?} for {what}{last}"
            )));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd` with stdin closed, capturing stdout (returned) and stderr. After
/// `timeout` its process group gets SIGTERM, then SIGKILL.
fn run_command(mut cmd: Command, label: &str, timeout: Duration) -> Result<String, ClusterError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| ClusterError::Command {
        cmd: label.to_string(),
        status: "could not be started".into(),
        output: e.to_string(),
    })?;
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let (tx, rx) = mpsc::channel();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    for (index, pipe) in pipes.into_iter().enumerate() {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = tx.send((index, bytes));
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let group = -(child.id() as i32);
            // SAFETY: signals the process group created for this child (process_group(0)).
            unsafe { libc::kill(group, libc::SIGTERM) };
            let grace = Instant::now() + Duration::from_secs(2);
            while child.try_wait()?.is_none() && Instant::now() < grace {
                thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = child.wait();
            return Err(ClusterError::Timeout(format!(
                "`{label}` did not finish within {timeout:?}"
            )));
        }
        thread::sleep(Duration::from_millis(10));
    };
    // A grandchild could keep a pipe open; do not wait for it forever.
    let mut output = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok((index, bytes)) => output[index] = bytes,
            Err(_) => break,
        }
    }
    let [stdout, stderr] = output.map(|b| String::from_utf8_lossy(&b).into_owned());
    if status.success() {
        Ok(stdout)
    } else {
        Err(ClusterError::Command {
            cmd: label.to_string(),
            status: status.to_string(),
            output: stderr + &stdout,
        })
    }
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

/// POSIX shell single-quoting, for the `su -c` fallback.
fn sh_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
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
            ..ClusterSpec::default()
        };
        let mut cluster = LocalCluster::start(spec).expect("start cluster");
        assert_eq!(cluster.nodes.len(), 2);
        let scram =
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app'";
        assert_eq!(cluster.psql(0, scram).unwrap(), "t");

        let create =
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'hello')";
        cluster.psql_db(0, "app", create).unwrap();
        cluster.wait_replayed().unwrap();
        assert_eq!(
            cluster
                .psql_db(1, "app", "SELECT v FROM t WHERE id = 1")
                .unwrap(),
            "hello"
        );
        assert_eq!(cluster.psql(1, "select pg_is_in_recovery()").unwrap(), "t");
        assert_eq!(
            cluster
                .psql(1, "SELECT current_setting('cluster_name')")
                .unwrap(),
            "node1"
        );
        assert_eq!(cluster.primary_index(), Some(0));

        cluster.stop_node(1, "fast").unwrap();
        assert!(!cluster.is_running(1));
        cluster.start_node(1).unwrap();
        assert!(cluster.is_running(1));

        let base = cluster.base_dir.clone();
        cluster.shutdown();
        cluster.shutdown();
        assert!(!base.exists(), "base dir should be removed");
    }
}
