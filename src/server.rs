//! The listener: accept clients, spawn a session each, run the background tasks
//! (role monitor, idle-connection reaper), reload on SIGHUP, stop on request.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster;
use crate::config::{Config, ConfigError};
use crate::context::ProxyContext;
use crate::session;

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
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(ProxyContext::new(config, shutdown_rx));
        Ok(Proxy {
            listener,
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

    /// Shared state, for embedding and tests.
    pub fn context(&self) -> Arc<ProxyContext> {
        self.ctx.clone()
    }

    /// Serve until `stop` completes, then end sessions and background tasks.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let Proxy {
            listener,
            ctx,
            shutdown_tx,
            config_path,
        } = self;
        // Know the primary before the first client arrives.
        cluster::check_all(&ctx.cluster, &ctx.config.load()).await;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(cluster::run_monitor(
            ctx.cluster.clone(),
            ctx.config.clone(),
            ctx.shutdown.clone(),
        ));
        tasks.spawn(reap_idle(ctx.clone()));
        if let Some(path) = config_path {
            tasks.spawn(reload_on_sighup(ctx.clone(), path));
        }
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgpilot listening");
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        tracing::trace!(%peer, "accepted");
                        tokio::spawn(session::serve(ctx.clone(), stream));
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
        let _ = shutdown_tx.send(true);
        // Give sessions a moment to send their goodbye.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while ctx.clients.load(std::sync::atomic::Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.abort_all();
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
/// `listen` or `backends` needs a restart and is reported, not applied.
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
                ctx.reload(new);
                tracing::info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the old configuration")
            }
        }
    }
}
