//! The task that follows Patroni's leader key: read `<namespace>/<scope>/`
//! once, watch it from that revision, and publish the leader's node once it
//! answers as a primary (see the module docs of `cluster::patroni`).
//!
//! Losing etcd keeps what was published: the primary stays only while
//! pgpilot's own health checks see it claiming primary (Patroni demotes a
//! leader that cannot reach etcd, and a demoted node is not published).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::{Handle, Member, backend_of};
use crate::cluster::Cluster;
use crate::cluster::health::probe_once;
use crate::config::{Config, NodeId};

/// Pause before reconnecting to etcd after an error.
const BACKOFF: Duration = Duration::from_millis(250);
/// Pause between two probes of a new leader that is not a primary yet.
const CONFIRM_PAUSE: Duration = Duration::from_millis(20);

/// Why a session with etcd ended.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// An etcd call failed.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// An etcd call took too long.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// The watch stream ended.
    #[error("the watch stream ended")]
    WatchEnded,
}

/// A leader named but not published yet: probed until it answers as a
/// primary.
#[derive(Debug, Clone)]
struct Pending {
    name: String,
    node: NodeId,
    /// When the leader key said so.
    since: Instant,
    /// Probes so far.
    probes: u32,
}

/// Follow Patroni until shutdown; reconnect on any error.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    handle: Arc<Handle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next_endpoint = 0usize;
    let mut follower = Follower {
        cluster,
        config,
        handle,
        published: None,
        pending: None,
        unmapped: Default::default(),
    };
    loop {
        match follower.session(&mut next_endpoint, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "Patroni mode: no working etcd connection; keeping the last leader while it answers as a primary");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(BACKOFF) => {}
            _ = shutdown.changed() => return,
        }
    }
}

struct Follower {
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    handle: Arc<Handle>,
    /// The node last published as the primary (`None`: none).
    published: Option<NodeId>,
    /// The leader waiting to answer as a primary.
    pending: Option<Pending>,
    /// Members logged as not configured.
    unmapped: std::collections::HashSet<String>,
}

impl Follower {
    /// One connection to etcd: read, watch, react until shutdown (`Ok`) or
    /// an error.
    async fn session(
        &mut self,
        next_endpoint: &mut usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), WatchError> {
        let cfg = self.config.load_full();
        let limit = cfg.patroni.timeout;
        let endpoints = cfg.patroni_etcd_endpoints().to_vec();
        let root = format!("{}/", self.handle.prefix);
        // One member at a time, the next after a failure.
        let endpoint = endpoints[*next_endpoint % endpoints.len()].clone();
        *next_endpoint += 1;
        let opts = ConnectOptions::new()
            .with_connect_timeout(limit)
            .with_timeout(limit);
        let mut client = timed(limit, Client::connect([endpoint.as_str()], Some(opts))).await?;
        let r = timed(
            limit,
            client.get(root.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = r.header().map_or(0, |h| h.revision());
        {
            let mut v = self.handle.view();
            v.leader = None;
            v.members.clear();
            for kv in r.kvs() {
                apply_key(&mut v, &root, kv.key(), Some(kv.value()));
            }
        }
        *next_endpoint -= 1;
        tracing::info!(%endpoint, prefix = %self.handle.prefix, leader = ?self.handle.leader(), "Patroni mode: watching Patroni's keys");
        let (_watcher, mut events) = timed(
            limit,
            client.watch(
                root.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?
        .split();
        self.reconcile(None);
        loop {
            let confirm = self.pending.is_some();
            tokio::select! {
                m = events.message() => {
                    let Some(resp) = m? else { return Err(WatchError::WatchEnded) };
                    if resp.canceled() {
                        return Err(WatchError::WatchEnded);
                    }
                    let at = Instant::now();
                    let mut leader_changed = false;
                    {
                        let mut v = self.handle.view();
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let put = ev.event_type() == EventType::Put;
                            leader_changed |= apply_key(&mut v, &root, kv.key(), put.then(|| kv.value()));
                        }
                    }
                    self.reconcile(leader_changed.then_some(at));
                }
                _ = tokio::time::sleep(CONFIRM_PAUSE), if confirm => self.confirm().await,
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Publish what the view says: no leader, a leader not mapped to a
    /// backend, or a leader to confirm. `changed_at`: when a leader-key
    /// event arrived (for the log of how long publishing took).
    fn reconcile(&mut self, changed_at: Option<Instant>) {
        let cfg = self.config.load_full();
        self.log_unmapped(&cfg);
        let (leader, member) = {
            let v = self.handle.view();
            let leader = v.leader.clone();
            let member = leader.as_ref().and_then(|l| v.members.get(l).cloned());
            (leader, member)
        };
        let scope = &cfg.patroni.scope;
        let Some(name) = leader else {
            self.pending = None;
            self.publish(
                None,
                true,
                Some(format!(
                    "Patroni has no leader for scope {scope:?} (a Patroni failover is in progress, or Patroni is down); writes wait for its new leader"
                )),
                &cfg,
            );
            return;
        };
        let node = member
            .as_ref()
            .and_then(|m| backend_of(&cfg.backends, &m.conn_url));
        let Some(node) = node else {
            self.pending = None;
            let why = match &member {
                None => format!("Patroni's leader {name:?} has no member key yet"),
                Some(m) => format!(
                    "Patroni's leader {name:?} (conn_url {:?}) is not one of the configured [[backends]]",
                    m.conn_url
                ),
            };
            if self.published.is_some() || changed_at.is_some() {
                tracing::warn!("{why}; no primary");
            }
            self.publish(None, member.is_none(), Some(why), &cfg);
            return;
        };
        if self.published == Some(node) {
            self.pending = None;
            return;
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.node == node && p.name == name)
        {
            return;
        }
        tracing::info!(leader = %name, %node, "Patroni's leader key names a new leader; publishing it once it answers as a primary");
        self.pending = Some(Pending {
            name: name.clone(),
            node,
            since: changed_at.unwrap_or_else(Instant::now),
            probes: 0,
        });
        self.publish(
            None,
            true,
            Some(format!(
                "Patroni's leader {name:?} (node {node}) does not answer as a primary yet"
            )),
            &cfg,
        );
    }

    /// Probe the pending leader; publish it once it is not in recovery.
    async fn confirm(&mut self) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        p.probes += 1;
        let p = p.clone();
        let cfg = self.config.load_full();
        let Some(b) = cfg.backends.get(p.node.index()) else {
            return;
        };
        match probe_once(b, &cfg.monitor, cfg.patroni.timeout).await {
            Ok(false) => {
                self.pending = None;
                self.publish(Some(p.node), false, None, &cfg);
                let primary = self.cluster.snapshot().primary;
                if primary != Some(p.node) {
                    // Its last health round failed (Patroni restarted it):
                    // published once a round sees it up, asked for now.
                    self.cluster.request_probe(p.node);
                }
                tracing::warn!(
                    leader = %p.name,
                    node = %p.node,
                    published = primary == Some(p.node),
                    probes = p.probes,
                    elapsed_ms = p.since.elapsed().as_millis() as u64,
                    "Patroni's leader answers as a primary: writes go to it"
                );
            }
            Ok(true) => tracing::debug!(node = %p.node, "Patroni's leader is still in recovery"),
            Err(e) => {
                tracing::debug!(node = %p.node, error = %e, "Patroni's leader does not answer yet")
            }
        }
    }

    fn publish(
        &mut self,
        primary: Option<NodeId>,
        waiting: bool,
        why: Option<String>,
        cfg: &Config,
    ) {
        self.published = primary;
        self.handle.view().why_no_primary = why;
        self.cluster.apply_patroni(primary, waiting, cfg);
    }

    /// Log each member that is no configured backend, once.
    fn log_unmapped(&mut self, cfg: &Config) {
        let v = self.handle.view();
        for (name, m) in &v.members {
            if backend_of(&cfg.backends, &m.conn_url).is_none()
                && self.unmapped.insert(name.clone())
            {
                tracing::warn!(member = %name, conn_url = %m.conn_url, "Patroni member is not one of the configured [[backends]] (matched by host:port of its conn_url): ignored");
            }
        }
    }
}

/// One key's new value (`None`: deleted) into the view. Returns whether the
/// leader key changed.
fn apply_key(v: &mut super::View, root: &str, key: &[u8], value: Option<&[u8]>) -> bool {
    let Some(rest) = key.strip_prefix(root.as_bytes()) else {
        return false;
    };
    if rest == b"leader" {
        let new = value.map(|b| String::from_utf8_lossy(b).trim().to_string());
        let changed = new != v.leader;
        v.leader = new;
        return changed;
    }
    if let Some(name) = rest.strip_prefix(b"members/") {
        let name = String::from_utf8_lossy(name).into_owned();
        match value {
            None => {
                v.members.remove(&name);
            }
            Some(b) => match serde_json::from_slice::<Member>(b) {
                Ok(m) => {
                    v.members.insert(name, m);
                }
                Err(e) => {
                    tracing::warn!(member = %name, error = %e, "Patroni member key unreadable; ignored");
                }
            },
        }
    }
    false
}

/// One etcd call within `limit`.
async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, WatchError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(WatchError::Timeout(limit)),
    }
}
