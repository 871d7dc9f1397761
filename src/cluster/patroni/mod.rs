//! Patroni mode (`failover.mode = "patroni"`): pgpilot in front of a
//! cluster Patroni manages. Patroni decides; pgpilot follows.
//!
//! # What is read
//!
//! Patroni's keys in etcd (v3 API), under `<namespace>/<scope>/`:
//!
//! | key | value |
//! | --- | --- |
//! | `leader` | the leading member's name (bound to the leader's lease) |
//! | `members/<name>` | JSON: `conn_url`, `api_url`, `role`, `state`, `timeline`, `xlog_location` … |
//!
//! Members are mapped to `[[backends]]` by the host and port of their
//! `conn_url`; a member that is no configured backend is logged and ignored
//! (so every Patroni node must be listed as a backend to get traffic).
//!
//! # Who decides: nobody here
//!
//! While Patroni mode is on, [`super::Cluster::may_decide`] is false: the
//! failover coordinator starts no failover, no standby is re-pointed, no
//! node is fenced or rejoined, no stale slot is dropped (the gates the
//! coordination through etcd uses for its followers). The cluster state is
//! held as a follower's ([`super::state_machine::External`],
//! `state_machine/shared.rs`): the primary is only ever the node etcd names,
//! here through Patroni's leader key, and only while pgpilot's own health
//! checks see it in service and claiming primary.
//!
//! # Following the leader key ([`watch`])
//!
//! One task reads the prefix once, then *watches* it from the revision it
//! read (no polling). When the leader key names a member mapped to node `n`,
//! no primary is published (writes wait, up to
//! `failover.client_wait_timeout`) until `n` itself answers
//! `pg_is_in_recovery() = false` (Patroni takes the key before promoting),
//! then `n` is published through the same path coordination followers use
//! (`Owner::apply_external`). While there is no leader key (Patroni is
//! failing over) writes wait and then fail with 57P03 naming Patroni; reads
//! keep going to the standbys. Health checks, lag weighting, read-your-writes
//! and routing work as without Patroni.
//!
//! # Switchover ([`switchover`])
//!
//! `PROMOTE NODE n` is `POST /switchover {"leader": …, "candidate": …}` on
//! the leader's REST API (its member's `api_url`, then `[patroni]
//! rest_urls`), answered with Patroni's outcome; the leader key's change
//! then moves pgpilot's writes like any other.

mod rest;
mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::watch as tokio_watch;

use super::state_machine::{Admission, External};
use super::{Cluster, CommandError};
use crate::config::{Backend, Config, FailoverMode, NodeId};

/// One member as Patroni records it (the fields pgpilot reads).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct Member {
    /// `postgres://host:port/db`.
    #[serde(default)]
    pub conn_url: String,
    /// `http://host:port/patroni`.
    #[serde(default)]
    pub api_url: String,
    /// `master`/`primary`, `replica`, `standby_leader` …
    #[serde(default)]
    pub role: String,
    /// `running`, `starting`, `stopped` …
    #[serde(default)]
    pub state: String,
    /// The member's timeline, as it last reported.
    #[serde(default)]
    pub timeline: Option<u64>,
}

/// What pgpilot knows of Patroni's cluster (shared by the watch task,
/// `PROMOTE NODE` and the sessions' 57P03 message).
#[derive(Debug, Default)]
struct View {
    /// The leader key's value (`None`: no key).
    leader: Option<String>,
    /// Members by name.
    members: BTreeMap<String, Member>,
    /// Why no primary is published, naming Patroni (`None`: one is).
    why_no_primary: Option<String>,
}

/// Patroni mode's state, set once at start.
pub struct Handle {
    /// `<namespace>/<scope>`.
    pub prefix: String,
    view: Mutex<View>,
}

impl Handle {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader's member name, if there is a leader key.
    pub fn leader(&self) -> Option<String> {
        self.view().leader.clone()
    }
}

/// Host and port of a libpq URL (`postgres://[user@]host[:port][/db][?…]`).
pub(crate) fn url_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let auth = &rest[..end];
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        (h, p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 5432,
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The backend a member's `conn_url` names (same port; same host, or the
/// same IP address written alike).
pub(crate) fn backend_of(backends: &[Backend], conn_url: &str) -> Option<NodeId> {
    let (host, port) = url_host_port(conn_url)?;
    let same_host = |b: &str| {
        b.eq_ignore_ascii_case(&host)
            || matches!(
                (b.parse::<std::net::IpAddr>(), host.parse::<std::net::IpAddr>()),
                (Ok(x), Ok(y)) if x == y
            )
    };
    backends
        .iter()
        .position(|b| b.port == port && same_host(&b.host))
        .map(NodeId::new)
}

impl Cluster {
    /// Patroni mode's handle, when it is on.
    pub fn patroni(&self) -> Option<&Arc<Handle>> {
        self.patroni.get()
    }

    /// Why no primary is published, when Patroni mode knows (the 57P03
    /// message names Patroni).
    pub(crate) fn no_primary_reason(&self) -> Option<String> {
        let v = self.patroni.get()?.view();
        if let Some(why) = &v.why_no_primary {
            return Some(why.clone());
        }
        // Published, but pgpilot's own checks do not see it in service.
        let leader = v.leader.as_deref().unwrap_or_default();
        Some(format!(
            "Patroni's leader {leader:?} is not in service (pgpilot's health checks); Patroni fails over once its leader key expires"
        ))
    }

    /// Publish what Patroni's leader key says, through the followers' path
    /// (`Owner::apply_external`); holds (DETACH NODE) stay as they are.
    fn apply_patroni(&self, primary: Option<NodeId>, waiting: bool, cfg: &Config) {
        let adm = Admission::from(cfg);
        let e = External {
            primary,
            timeline: None,
            failover: waiting,
        };
        self.update(|o| {
            let holds = o.holds_with_reasons();
            o.apply_external(e, holds, &adm)
        });
    }
}

/// Turn Patroni mode on for `cluster` (before its first health check: no
/// primary is published until Patroni's leader is read and confirmed) and
/// return the task that follows Patroni. `None` unless `failover.mode =
/// "patroni"`.
pub fn start(
    cluster: &Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    shutdown: tokio_watch::Receiver<bool>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let cfg = config.load_full();
    if cfg.failover.mode != FailoverMode::Patroni {
        return None;
    }
    let handle = Arc::new(Handle {
        prefix: cfg.patroni.prefix(),
        view: Mutex::new(View {
            why_no_primary: Some(format!(
                "Patroni's leader for scope {:?} has not been read from etcd yet",
                cfg.patroni.scope
            )),
            ..View::default()
        }),
    });
    if cluster.patroni.set(handle.clone()).is_err() {
        return None;
    }
    if cfg.coordination.enabled() {
        tracing::info!(
            "Patroni mode: [coordination] is not run; every pgpilot follows Patroni's leader key itself"
        );
    }
    cluster.apply_patroni(None, false, &cfg);
    Some(watch::run(cluster.clone(), config, handle, shutdown))
}

/// `PROMOTE NODE node` in Patroni mode: a Patroni switchover to the member
/// that is `node`, answered with Patroni's outcome. On success, waits (up
/// to `[patroni] timeout`) until pgpilot routes writes to `node`.
pub(crate) async fn switchover(
    cluster: &Cluster,
    cfg: &Config,
    node: NodeId,
) -> Result<String, CommandError> {
    let h = cluster.patroni().ok_or_else(|| CommandError::Patroni {
        message: "failover.mode is not \"patroni\"".into(),
    })?;
    if node.index() >= cfg.backends.len() {
        return Err(CommandError::NoSuchNode { node });
    }
    let (leader, candidate, mut urls) = {
        let v = h.view();
        let leader = v.leader.clone().ok_or_else(|| CommandError::Patroni {
            message: "no leader now (a Patroni failover is in progress?); retry".into(),
        })?;
        let candidate = v
            .members
            .iter()
            .find(|(_, m)| backend_of(&cfg.backends, &m.conn_url) == Some(node))
            .map(|(name, _)| name.clone())
            .ok_or_else(|| CommandError::Patroni {
                message: format!(
                    "no member's conn_url is node {node} ({}:{})",
                    cfg.backends[node.index()].host,
                    cfg.backends[node.index()].port
                ),
            })?;
        let api = v
            .members
            .get(&leader)
            .map(|m| m.api_url.clone())
            .unwrap_or_default();
        let urls: Vec<String> = (!api.is_empty()).then_some(api).into_iter().collect();
        (leader, candidate, urls)
    };
    if leader == candidate {
        return Err(CommandError::AlreadyPrimary { node });
    }
    for u in &cfg.patroni.rest_urls {
        if !urls.contains(u) {
            urls.push(u.clone());
        }
    }
    if urls.is_empty() {
        return Err(CommandError::Patroni {
            message: format!(
                "the leader {leader:?} has no api_url and [patroni] rest_urls is empty"
            ),
        });
    }
    let body = serde_json::json!({ "leader": leader, "candidate": candidate }).to_string();
    let p = &cfg.patroni;
    let mut tried = Vec::new();
    for url in &urls {
        tracing::warn!(%leader, %candidate, %url, "PROMOTE NODE {node}: asking Patroni for a switchover");
        match rest::post_json(url, "/switchover", &body, p.timeout, p.switchover_timeout).await {
            Ok(a) if (200..300).contains(&a.status) => {
                let routed = wait_primary(cluster, node, p.timeout).await;
                return Ok(format!(
                    "Patroni switchover from {leader} to {candidate}: {}{}",
                    a.body,
                    if routed {
                        "; writes go to this node"
                    } else {
                        "; pgpilot routes writes here once the node answers as a primary"
                    }
                ));
            }
            Ok(a) => {
                return Err(CommandError::Patroni {
                    message: format!(
                        "switchover from {leader} to {candidate} refused ({} {}): {}",
                        a.status, url, a.body
                    ),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Patroni REST API unreachable; trying the next");
                tried.push(e.to_string());
            }
        }
    }
    Err(CommandError::Patroni {
        message: format!("no REST API answered: {}", tried.join("; ")),
    })
}

/// Wait (≤ `limit`) until `node` is the published primary.
async fn wait_primary(cluster: &Cluster, node: NodeId, limit: Duration) -> bool {
    let mut changes = cluster.subscribe();
    let wait = async {
        loop {
            if cluster.snapshot().primary == Some(node) {
                return;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(host: &str, port: u16) -> Backend {
        let c = Config::from_toml(&format!("[[backends]]\nhost = \"{host}\"\nport = {port}\n"))
            .unwrap();
        c.backends[0].clone()
    }

    #[test]
    fn conn_urls_name_backends() {
        assert_eq!(
            url_host_port("postgres://127.0.0.1:5433/postgres"),
            Some(("127.0.0.1".into(), 5433))
        );
        assert_eq!(
            url_host_port("postgresql://u:p@db1/x?sslmode=off"),
            Some(("db1".into(), 5432))
        );
        assert_eq!(
            url_host_port("postgres://[::1]:6000/p"),
            Some(("::1".into(), 6000))
        );
        assert_eq!(url_host_port("http://h:1"), None);
        let b = vec![backend("127.0.0.1", 5432), backend("DB2", 5433)];
        assert_eq!(
            backend_of(&b, "postgres://127.0.0.1:5432/postgres"),
            Some(NodeId::new(0))
        );
        assert_eq!(
            backend_of(&b, "postgres://db2:5433/postgres"),
            Some(NodeId::new(1))
        );
        assert_eq!(backend_of(&b, "postgres://127.0.0.1:5433/postgres"), None);
        assert_eq!(backend_of(&b, "postgres://10.0.0.9:5432/postgres"), None);
    }

    #[test]
    fn member_records_parse() {
        let m: Member = serde_json::from_str(
            r#"{"conn_url":"postgres://127.0.0.1:25430/postgres","api_url":"http://127.0.0.1:28008/patroni","state":"running","role":"replica","version":"3.0.2","xlog_location":67108864,"timeline":1}"#,
        )
        .unwrap();
        assert_eq!(m.role, "replica");
        assert_eq!(m.timeline, Some(1));
        assert_eq!(m.api_url, "http://127.0.0.1:28008/patroni");
    }
}
