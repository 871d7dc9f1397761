//! Throwaway etcd for tests and benchmarks: 1 or 3 members of Debian's
//! `etcd` (v3 API) on loopback ports from [`free_port`], data in a
//! directory the caller names (usually the local cluster's temporary
//! directory), killed on drop.
//!
//! Blocking code, like the rest of this module.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ClusterError, CommandFailed, CommandOutcome, LocalCluster, free_port};

/// The etcd binary: `PGPILOT_ETCD` or `etcd` on the `PATH`.
fn etcd_binary() -> PathBuf {
    std::env::var_os("PGPILOT_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// One member.
#[derive(Debug)]
pub struct EtcdMember {
    /// `etcd0`, `etcd1` …
    pub name: String,
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

/// A running etcd cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<EtcdMember>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Start `members` members (1 or 3) with data under `dir`, and wait
    /// (≤ 30 s) until each answers `/health`.
    pub fn start(members: usize, dir: &Path) -> Result<EtcdCluster, ClusterError> {
        let mut list: Vec<EtcdMember> = (0..members)
            .map(|i| EtcdMember {
                name: format!("etcd{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.join(format!("etcd{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = list
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut list {
            std::fs::create_dir_all(&m.data_dir)?;
        }
        let mut c = EtcdCluster {
            members: list,
            initial_cluster,
        };
        for i in 0..c.members.len() {
            c.spawn(i)?;
        }
        for i in 0..c.members.len() {
            c.wait_healthy(i, Duration::from_secs(30))?;
        }
        Ok(c)
    }

    /// [`EtcdCluster::start`] with the data in `cluster`'s temporary
    /// directory (drop the etcd before the cluster).
    pub fn start_for(members: usize, cluster: &LocalCluster) -> Result<EtcdCluster, ClusterError> {
        EtcdCluster::start(members, &cluster.base_dir)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let ic = self.initial_cluster.clone();
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.data_dir.with_extension("log"))?;
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(m.data_dir.join("data"))
            .arg("--listen-client-urls")
            .arg(m.endpoint())
            .arg("--advertise-client-urls")
            .arg(m.endpoint())
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-cluster")
            .arg(ic)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("pgpilot-test-{}", std::process::id()))
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                ClusterError::Command(Box::new(CommandFailed {
                    cmd: "etcd (is it installed? Debian: apt-get install etcd-server)".into(),
                    outcome: CommandOutcome::NotStarted(e),
                    stderr: String::new(),
                    stdout: String::new(),
                    server_log: None,
                }))
            })?;
        m.child = Some(child);
        Ok(())
    }

    /// Wait until member `i` answers `/health` with `true`.
    pub fn wait_healthy(&self, i: usize, limit: Duration) -> Result<(), ClusterError> {
        let m = &self.members[i];
        let deadline = Instant::now() + limit;
        loop {
            if health(m.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(m.data_dir.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(ClusterError::Timeout(format!(
                    "etcd member {} not healthy within {limit:?}; log tail:\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill member `i` (SIGKILL) and wait for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again (same data) after [`EtcdCluster::kill`].
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.members[i].child.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.members[i].data_dir);
            let _ = std::fs::remove_file(self.members[i].data_dir.with_extension("log"));
        }
    }
}

/// One `GET /health` on 127.0.0.1:`port` (≤ 1 s): `"health":"true"`?
fn health(port: u16) -> bool {
    let limit = Duration::from_secs(1);
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), limit) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    let req = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
