//! The one owner of node state: which node is the primary, which are up.
//!
//! A monitor task asks every node `pg_is_in_recovery()` (tokio-postgres, as the
//! `[monitor]` role, with timeouts) at start and every
//! `monitor.role_check_period`, and publishes an immutable [`ClusterSnapshot`]
//! through `arc-swap`. Sessions and the router read snapshots without locks;
//! nothing outside this module changes node state. Health checks, replication
//! lag and failover plug in here.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::config::{Backend, Config, Monitor};

/// Reachability as pgpilot sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Not checked yet.
    Unknown,
    /// Answered the last check.
    Up,
    /// Did not answer the last check; gets no traffic.
    Down,
}

/// Role as reported by `pg_is_in_recovery()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not known (never reached).
    Unknown,
    /// Not in recovery.
    Primary,
    /// In recovery (hot standby).
    Standby,
}

/// One node as of a snapshot.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Position in `backends`.
    pub id: usize,
    /// Configured host.
    pub host: String,
    /// Configured port.
    pub port: u16,
    /// Configured weight.
    pub weight: f64,
    /// Reachability.
    pub status: NodeStatus,
    /// Live role.
    pub role: Role,
    /// When status or role last changed.
    pub last_change: SystemTime,
    /// Last check error, shown to operators.
    pub last_error: Option<String>,
}

/// An immutable picture of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// All configured nodes, by id.
    pub nodes: Vec<NodeView>,
    /// The node writes go to, if one is known and up.
    pub primary: Option<usize>,
}

impl ClusterSnapshot {
    fn initial(backends: &[Backend]) -> ClusterSnapshot {
        ClusterSnapshot {
            nodes: backends
                .iter()
                .enumerate()
                .map(|(id, b)| NodeView {
                    id,
                    host: b.host.clone(),
                    port: b.port,
                    weight: b.weight,
                    status: NodeStatus::Unknown,
                    role: Role::Unknown,
                    last_change: SystemTime::now(),
                    last_error: None,
                })
                .collect(),
            primary: None,
        }
    }
}

/// Result of checking one node.
#[derive(Debug, Clone)]
pub enum Probe {
    /// Reached; `in_recovery` from `pg_is_in_recovery()`.
    Reached {
        /// True for a standby.
        in_recovery: bool,
    },
    /// Not reached or the query failed.
    Failed(String),
}

/// Shared cluster state.
pub struct Cluster {
    /// Current snapshot; replaced whole on every change.
    snapshot: ArcSwap<ClusterSnapshot>,
    /// Woken when a snapshot is published (sessions waiting for a primary).
    changed: Notify,
    /// Woken when a session saw a connection-level failure: check now.
    check_now: Notify,
}

impl Cluster {
    /// State for the configured backends, all unknown.
    pub fn new(backends: &[Backend]) -> Cluster {
        Cluster {
            snapshot: ArcSwap::from_pointee(ClusterSnapshot::initial(backends)),
            changed: Notify::new(),
            check_now: Notify::new(),
        }
    }

    /// A session could not reach `node` (refused, reset): probe the nodes now
    /// rather than at the next period. Never a verdict by itself.
    pub fn report_session_error(&self, node: usize) {
        tracing::debug!(node, "session reported a connection failure; checking now");
        self.check_now.notify_one();
    }

    /// The current snapshot (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.snapshot.load_full()
    }

    /// The primary's id, waiting up to `wait` for one to be known.
    pub async fn wait_primary(&self, wait: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.snapshot.load().primary {
                return Some(p);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.snapshot.load().primary;
            }
        }
    }

    /// Apply one round of probes (index = node id) and publish the new snapshot.
    pub fn apply_probes(&self, probes: &[Probe]) {
        let old = self.snapshot.load_full();
        let mut next = (*old).clone();
        let now = SystemTime::now();
        for (node, probe) in next.nodes.iter_mut().zip(probes) {
            let (status, role, err) = match probe {
                Probe::Reached { in_recovery } => (
                    NodeStatus::Up,
                    if *in_recovery {
                        Role::Standby
                    } else {
                        Role::Primary
                    },
                    None,
                ),
                Probe::Failed(e) => (NodeStatus::Down, node.role, Some(e.clone())),
            };
            if status != node.status || role != node.role {
                tracing::info!(node = node.id, ?status, ?role, "node state changed");
                node.last_change = now;
            }
            node.status = status;
            node.role = role;
            node.last_error = err;
        }
        next.primary = choose_primary(&next.nodes, old.primary);
        if next.primary != old.primary {
            tracing::info!(old = ?old.primary, new = ?next.primary, "primary changed");
        }
        self.snapshot.store(Arc::new(next));
        self.changed.notify_waiters();
    }
}

/// The primary is an up node that is not in recovery. If several claim it, the
/// current one keeps the role (the failover issue adds fencing); otherwise the
/// lowest id.
fn choose_primary(nodes: &[NodeView], current: Option<usize>) -> Option<usize> {
    let claims: Vec<usize> = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Up && n.role == Role::Primary)
        .map(|n| n.id)
        .collect();
    if claims.len() > 1 {
        tracing::warn!(?claims, "more than one node reports it is a primary");
    }
    match current {
        Some(c) if claims.contains(&c) => Some(c),
        _ => claims.first().copied(),
    }
}

/// tokio-postgres settings for connecting to `backend` as the monitor role.
pub fn monitor_conn_config(
    backend: &Backend,
    monitor: &Monitor,
    application_name: &str,
) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&backend.host)
        .port(backend.port)
        .user(&monitor.user)
        .dbname(&monitor.database)
        .application_name(application_name)
        .connect_timeout(monitor.timeout);
    if !monitor.password.is_empty() {
        cfg.password(&monitor.password);
    }
    cfg
}

/// Ask one node `pg_is_in_recovery()` as the monitor role.
pub async fn probe(backend: &Backend, monitor: &Monitor) -> Probe {
    let cfg = monitor_conn_config(backend, monitor, "pgpilot-monitor");
    let work = async {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        let conn_task = tokio::spawn(conn);
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await;
        drop(client);
        conn_task.abort();
        row.map(|r| r.get::<_, bool>(0))
    };
    match tokio::time::timeout(monitor.timeout, work).await {
        Ok(Ok(in_recovery)) => Probe::Reached { in_recovery },
        Ok(Err(e)) => Probe::Failed(e.to_string()),
        Err(_) => Probe::Failed(format!("no answer within {:?}", monitor.timeout)),
    }
}

/// Probe every node once, concurrently, and apply the results.
pub async fn check_all(cluster: &Cluster, config: &Config) {
    let tasks: Vec<_> = config
        .backends
        .iter()
        .cloned()
        .map(|b| {
            let m = config.monitor.clone();
            tokio::spawn(async move { probe(&b, &m).await })
        })
        .collect();
    let mut probes = Vec::with_capacity(tasks.len());
    for t in tasks {
        probes.push(
            t.await
                .unwrap_or_else(|e| Probe::Failed(format!("check task failed: {e}"))),
        );
    }
    cluster.apply_probes(&probes);
}

/// Run role checks until `shutdown` turns true.
pub async fn run_monitor(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let cfg = config.load_full();
        let period = cfg.monitor.role_check_period;
        check_all(&cluster, &cfg).await;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = cluster.check_now.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
