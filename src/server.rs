//! The listener: accept clients, spawn a session each, run the background tasks
//! (a health check per node, replication checks, the metrics endpoint, pool
//! cleanup when a node goes down, the idle-connection reaper), reload on
//! SIGHUP, stop on request.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{self, NodeStatus, health::CheckObserver};
use crate::config::{Config, ConfigError, NodeId};
use crate::context::ProxyContext;
use crate::session;

/// How long a stop waits for sessions to send their goodbye and end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address from `listen`.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// A bound, not yet running proxy.
pub struct Proxy {
    listener: TcpListener,
    /// `/metrics` and `/healthz`, when `metrics.listen` is set.
    metrics_listener: Option<TcpListener>,
    ctx: Arc<ProxyContext>,
    /// Flipped to true to stop sessions and background tasks.
    shutdown_tx: watch::Sender<bool>,
    /// Config file to re-read on SIGHUP, if any.
    config_path: Option<PathBuf>,
}

impl Proxy {
    /// Validate nothing more (the config is already validated) and bind `listen`.
    pub async fn bind(config: Config) -> Result<Proxy, ServerError> {
        let addr = config.listen_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let metrics_listener = match config.metrics_addr()? {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            None => None,
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(ProxyContext::new(config, shutdown_rx));
        Ok(Proxy {
            listener,
            metrics_listener,
            ctx,
            shutdown_tx,
            config_path: None,
        })
    }

    /// Re-read this file on SIGHUP.
    pub fn with_reload_from(mut self, path: PathBuf) -> Proxy {
        self.config_path = Some(path);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address `/metrics` and `/healthz` are served on, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Shared state, for embedding and tests.
    pub fn context(&self) -> Arc<ProxyContext> {
        self.ctx.clone()
    }

    /// Serve until `stop` completes, then end sessions and background tasks.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let Proxy {
            listener,
            metrics_listener,
            ctx,
            shutdown_tx,
            config_path,
        } = self;
        let observer: CheckObserver = {
            let ctx = ctx.clone();
            Arc::new(move |node, took, ok| ctx.metrics.health_checked(node, took, ok))
        };
        // With `[coordination]`: no primary is published until etcd's state
        // is read (see `cluster::coordination`).
        let coordination = listener.local_addr().ok().and_then(|addr| {
            cluster::coordination::start(
                &ctx.cluster,
                ctx.config.clone(),
                addr,
                ctx.shutdown.clone(),
            )
        });
        // Patroni mode: the primary is Patroni's leader key, read and
        // confirmed before it is published (see `cluster::patroni`).
        let patroni =
            cluster::patroni::start(&ctx.cluster, ctx.config.clone(), ctx.shutdown.clone());
        // Know the primary before the first client arrives.
        cluster::health::initial_check(&ctx.cluster, &ctx.config.load(), &observer).await;
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(task) = coordination {
            tasks.spawn(task);
        }
        if let Some(task) = patroni {
            tasks.spawn(task);
        }
        for node in NodeId::all(ctx.config.load().backends.len()) {
            tasks.spawn(cluster::health::run_node(
                node,
                ctx.cluster.clone(),
                ctx.config.clone(),
                observer.clone(),
                ctx.shutdown.clone(),
            ));
        }
        tasks.spawn(cluster::replication::run(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(cluster::returning::watch_returning(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(cluster::at_start::promote_at_start(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(cluster::rejoin::watch_fenced(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(cluster::slots::run(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(cluster::failover::run(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        if let Some(l) = metrics_listener {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint listening");
            tasks.spawn(crate::metrics::http::serve(l, ctx.clone()));
        }
        tasks.spawn(close_idle_of_down_nodes(ctx.clone()));
        tasks.spawn(reap_idle(ctx.clone()));
        tasks.spawn(crate::consistency::run_replay_poller(
            ctx.lsns.clone(),
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(crate::consistency::run_primary_fetcher(
            ctx.lsns.clone(),
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        if let Some(path) = config_path {
            tasks.spawn(reload_on_sighup(ctx.clone(), path));
        }
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgpilot listening");
        // One task per client; a stop waits for these tasks themselves
        // (and for the parking lot, which wakes the clients parked there).
        let sessions = ctx.session_tasks.clone();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        tracing::trace!(%peer, "accepted");
                        sessions.spawn(session::serve(ctx.clone(), stream));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        tracing::info!("pgpilot stopping");
        drop(listener);
        if shutdown_tx.send(true).is_err() {
            // Every background task has already ended: nothing to stop.
            tracing::debug!("no background task left to stop");
        }
        ctx.sessions.wake_all();
        // Give sessions a moment to send their goodbye. Sessions still
        // running after it are not aborted; they end with the runtime.
        sessions.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, sessions.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                left = sessions.len(),
                "sessions still ending after the drain timeout"
            );
        }
        tasks.abort_all();
    }
}

/// When a node leaves service, close its idle pooled connections: they would
/// fail (node down) or serve a node that must not get traffic (held out).
async fn close_idle_of_down_nodes(ctx: Arc<ProxyContext>) {
    let mut changes = ctx.cluster.subscribe();
    let mut usable: Vec<bool> = Vec::new();
    loop {
        let snap = ctx.cluster.snapshot();
        usable.resize(snap.nodes.len(), true);
        for n in &snap.nodes {
            let now = n.status.is_usable() || n.status == NodeStatus::Unknown;
            if usable[n.id.index()] && !now {
                tracing::info!(
                    node = %n.id,
                    "node out of service; closing its idle connections"
                );
                ctx.pool.close_idle(n.id);
            }
            usable[n.id.index()] = now;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Close idle pooled connections past `pool.idle_timeout`.
async fn reap_idle(ctx: Arc<ProxyContext>) {
    loop {
        let idle = ctx.config.load().pool.idle_timeout;
        let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::time::sleep(every).await;
        let closed = ctx.pool.expire_idle(idle);
        if closed > 0 {
            tracing::debug!(closed, "closed idle backend connections");
        }
    }
}

/// Re-read the config file on SIGHUP. Settings apply to new sessions; a change of
/// `listen`, `backends` or Patroni mode needs a restart and is reported, not
/// applied.
async fn reload_on_sighup(ctx: Arc<ProxyContext>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        match Config::load(&path) {
            Ok(new) => {
                let old = ctx.config.load();
                let restart_needed = new.listen != old.listen
                    || new.backends.len() != old.backends.len()
                    || new
                        .backends
                        .iter()
                        .zip(&old.backends)
                        .any(|(a, b)| a.host != b.host || a.port != b.port);
                if restart_needed {
                    tracing::warn!(
                        "config reload: `listen` or the backend list changed; restart pgpilot to apply; nothing reloaded"
                    );
                    continue;
                }
                // Patroni mode is set up at start (see `cluster::patroni`).
                let patroni = |c: &Config| {
                    (c.failover.mode == crate::config::FailoverMode::Patroni)
                        .then(|| c.patroni.prefix())
                };
                if patroni(&new) != patroni(&old) {
                    tracing::warn!(
                        "config reload: failover.mode = \"patroni\" (or its scope or namespace) changed; restart pgpilot to apply; nothing reloaded"
                    );
                    continue;
                }
                if new.metrics.listen != old.metrics.listen {
                    tracing::warn!(
                        "config reload: `metrics.listen` changed; the endpoint moves only after a restart"
                    );
                }
                ctx.reload(new);
                tracing::info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the old configuration")
            }
        }
    }
}

/// The sizes of a client session's task and state, for
/// `benches/idle_session.rs`: (what, bytes).
#[doc(hidden)]
pub fn session_sizes() -> Vec<(&'static str, usize)> {
    session::sizes()
}
