//! Throwaway Patroni clusters for tests: Debian's `patroni` (3.x,
//! `/usr/bin/patroni`, or `PGPILOT_PATRONI`) managing N PostgreSQL members
//! on loopback, with a 1-member etcd from [`super::etcd`], everything under
//! one private temporary directory:
//!
//! ```text
//! <temp>/pgpilot-cluster-<pid>-<random>/
//!     etcd0/ etcd0.log      the etcd
//!     m0.yml m0.log         member m0's Patroni configuration and log
//!     m0/data/              its PGDATA (initdb by Patroni on the first
//!                           leader, pg_basebackup on the others)
//! ```
//!
//! Each member's YAML: `scope`, `name`, `restapi` on a free loopback port,
//! `etcd3` hosts, `postgresql` listen/connect address on a free loopback
//! port, `bin_dir` (the binaries [`super::find_bindir`] finds), superuser and
//! replication authentication (trusted on loopback), and `bootstrap.dcs`
//! with `ttl` 10, `loop_wait` 1, `retry_timeout` 5, `use_slots`,
//! `wal_log_hints` and `hot_standby` on.
//!
//! When we are root, Patroni runs as the `postgres` OS user (as PostgreSQL
//! does for [`super::LocalCluster`]): spawned with that uid and gid (std
//! drops the supplementary groups), so the child *is* the Patroni process
//! and killing it hard needs no process search. Drop kills every Patroni
//! process, then any postmaster they left, then removes the directory.
//!
//! Blocking code, like the rest of this module.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::etcd::EtcdCluster;
use super::process::{RunAs, chown_to, kill_postmaster, run_command, wait_until};
use super::{
    ClusterError, CommandFailed, CommandOutcome, SUPERUSER, create_base_dir, find_bindir, free_port,
};

/// Patroni's `scope` in these clusters.
pub const SCOPE: &str = "pgpilot-test";
/// Patroni's `namespace` in these clusters.
pub const NAMESPACE: &str = "/service";
/// The superuser's password (logins are trusted on loopback; initdb wants one).
const SUPERUSER_PASSWORD: &str = "postgres";

/// The patroni binary: `PGPILOT_PATRONI` or `/usr/bin/patroni`.
fn patroni_binary() -> PathBuf {
    std::env::var_os("PGPILOT_PATRONI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/patroni"))
}

/// One Patroni member.
#[derive(Debug)]
pub struct PatroniMember {
    /// `m0`, `m1` …
    pub name: String,
    /// PostgreSQL's port on 127.0.0.1.
    pub pg_port: u16,
    /// The REST API's port on 127.0.0.1.
    pub rest_port: u16,
    /// PGDATA.
    pub data_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl PatroniMember {
    /// `http://127.0.0.1:<rest port>`.
    pub fn rest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rest_port)
    }
}

/// A running Patroni cluster and its etcd.
#[derive(Debug)]
pub struct PatroniCluster {
    /// The members, in start order.
    pub members: Vec<PatroniMember>,
    /// The etcd Patroni uses (and pgpilot reads).
    pub etcd: Option<EtcdCluster>,
    base_dir: PathBuf,
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    run_as: RunAs,
}

impl PatroniCluster {
    /// Start etcd and `members` Patroni members, then wait (≤ 120 s) until
    /// a leader is elected and the other members stream from it
    /// (`pg_stat_replication` on the leader shows them all `streaming`).
    pub fn start(members: usize) -> Result<PatroniCluster, ClusterError> {
        let bindir = find_bindir()?;
        let (run_as, owner) = RunAs::detect()?;
        let base_dir = create_base_dir(owner)?;
        let mut c = PatroniCluster {
            members: Vec::new(),
            etcd: None,
            base_dir,
            bindir,
            owner,
            run_as,
        };
        // On error `c` is dropped: everything started is stopped.
        let etcd = EtcdCluster::start(1, &c.base_dir)?;
        let etcd_hosts = etcd
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",");
        c.etcd = Some(etcd);
        for i in 0..members {
            let name = format!("m{i}");
            let dir = c.base_dir.join(&name);
            std::fs::create_dir_all(&dir)?;
            chown_to(&dir, c.owner)?;
            let m = PatroniMember {
                pg_port: free_port(),
                rest_port: free_port(),
                data_dir: dir.join("data"),
                config: c.base_dir.join(format!("{name}.yml")),
                log: c.base_dir.join(format!("{name}.log")),
                name,
                child: None,
            };
            std::fs::write(&m.config, c.yaml(&m, &dir, &etcd_hosts))?;
            chown_to(&m.config, c.owner)?;
            c.members.push(m);
        }
        for i in 0..members {
            c.spawn(i)?;
        }
        c.wait_ready(members, Duration::from_secs(120))?;
        Ok(c)
    }

    /// Member `m`'s Patroni configuration.
    fn yaml(&self, m: &PatroniMember, dir: &Path, etcd_hosts: &str) -> String {
        let bindir = self.bindir.display();
        let sock = dir.display();
        let pgpass = dir.join("pgpass");
        format!(
            r#"scope: {SCOPE}
namespace: {NAMESPACE}
name: {name}
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: {etcd_hosts}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 5
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: "on"
        hot_standby: "on"
        wal_level: replica
        max_wal_senders: 10
        max_replication_slots: 10
        max_connections: 100
  initdb:
    - encoding: UTF8
    - auth: trust
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {bindir}
  pgpass: {pgpass}
  authentication:
    superuser:
      username: {SUPERUSER}
      password: {SUPERUSER_PASSWORD}
    replication:
      username: replicator
      password: replicator
  parameters:
    unix_socket_directories: '{sock}'
    shared_buffers: 32MB
    fsync: "off"
    hot_standby_feedback: "on"
    logging_collector: "off"
"#,
            name = m.name,
            rest = m.rest_port,
            pg = m.pg_port,
            data = m.data_dir.display(),
            pgpass = pgpass.display(),
        )
    }

    /// Start member `i`'s Patroni (as `postgres` when root).
    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let m = &self.members[i];
        let log = std::fs::File::create(&m.log)?;
        let mut cmd = Command::new(patroni_binary());
        cmd.arg(&m.config)
            .current_dir(&self.base_dir)
            .env("HOME", &self.base_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().map_err(|e| {
            ClusterError::Command(Box::new(CommandFailed {
                cmd: "patroni (is it installed? Debian: apt-get install patroni)".into(),
                outcome: CommandOutcome::NotStarted(e),
                stderr: String::new(),
                stdout: String::new(),
                server_log: None,
            }))
        })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Wait until a leader streams to `expected - 1` replicas.
    fn wait_ready(&self, expected: usize, limit: Duration) -> Result<(), ClusterError> {
        let r = wait_until(
            limit,
            "a Patroni leader with every replica streaming",
            || {
                let Some(l) = self.leader_index() else {
                    return Ok(false);
                };
                let n = self.psql(
                    l,
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )?;
                Ok(n.trim() == (expected - 1).to_string())
            },
        );
        r.map_err(|e| ClusterError::Timeout(format!("{e}\n{}", self.log_tails(15))))
    }

    /// The member that holds the leader lock, as Patroni's REST API says
    /// (`GET /leader` answers 200 only there).
    pub fn leader_index(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some() && http_get(m.rest_port, "/leader").is_some_and(|(s, _)| s == 200)
        })
    }

    /// Runs `sql` through psql on member `i` as the superuser in database
    /// `postgres`; the output (unaligned, tuples only, trimmed).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String, ClusterError> {
        self.psql_db(i, "postgres", sql)
    }

    /// [`PatroniCluster::psql`] in database `db`.
    pub fn psql_db(&self, i: usize, db: &str, sql: &str) -> Result<String, ClusterError> {
        let psql = self.bindir.join("psql");
        let port = self.members[i].pg_port.to_string();
        let args = [
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            SUPERUSER,
            "-d",
            db,
            "-c",
            sql,
        ];
        let (cmd, label) = self
            .run_as
            .command(&psql.to_string_lossy(), &args, &self.base_dir);
        run_command(cmd, &label, Duration::from_secs(10)).map(|o| o.trim().to_string())
    }

    /// Stop member `i` hard: SIGKILL its Patroni, then stop its PostgreSQL
    /// with `pg_ctl stop -m immediate` (a crash, with nobody to restart it).
    pub fn kill_member(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill_patroni(i);
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.members[i].data_dir.to_string_lossy().into_owned();
        let args = ["stop", "-m", "immediate", "-w", "-t", "30", "-D", &data];
        let (cmd, label) = self
            .run_as
            .command(&pg_ctl.to_string_lossy(), &args, &self.base_dir);
        let r = run_command(cmd, &label, Duration::from_secs(40));
        kill_postmaster(&self.members[i].data_dir);
        r.map(|_| ())
    }

    /// SIGKILL member `i`'s Patroni only: its PostgreSQL keeps running,
    /// and its leader key (if it held it) expires after the TTL.
    pub fn kill_patroni(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last lines of every member's Patroni log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} ({})\n", m.name, m.log.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Every etcd client URL.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd
            .as_ref()
            .map(EtcdCluster::endpoints)
            .unwrap_or_default()
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        // Patroni first, so nothing restarts the servers stopped next.
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for m in &self.members {
            kill_postmaster(&m.data_dir);
        }
        self.etcd = None;
        let _ = std::fs::remove_dir_all(&self.base_dir);
    }
}

/// One `GET path` on 127.0.0.1:`port` (≤ 2 s): status and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let limit = Duration::from_secs(2);
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.set_write_timeout(Some(limit)).ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    tracing::trace!(port, path, took = ?started.elapsed(), "GET");
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}
