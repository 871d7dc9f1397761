//! State shared by every task of one running proxy: the configuration, the
//! cluster, the pool, the caches and metrics, and the registries sessions
//! write and admin commands read (who is connected, where cancels go, the
//! last primary's server parameters).
//!
//! It sits below `session` and `admin`, which both read it, and above the
//! layers whose parts it holds; it imports neither of the two.

pub(crate) mod cancel;
pub(crate) mod registry;
pub(crate) mod server_params;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::backend::Pool;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::consistency::Consistency;
use crate::context::cancel::{CancelRegistry, CancelSlot};
use crate::context::registry::SessionRegistry;
use crate::metrics::Metrics;
use crate::protocol::CancelKey;
use crate::router::cache::ClassifyCache;
use crate::router::catalog::FunctionCatalog;
use crate::router::classify::{FunctionPolicy, SqlParserClassifier};
use crate::router::relations::RelationCatalog;
use server_params::ServerParams;

/// Everything sessions and background tasks share.
pub struct ProxyContext {
    /// Current configuration; replaced on reload (SIGHUP). Sessions take a snapshot at start.
    pub(crate) config: Arc<ArcSwap<Config>>,
    /// Node state (roles, reachability, lag, weights); read via snapshots.
    pub cluster: Arc<Cluster>,
    /// Prometheus metrics and the counters behind `SHOW POOL_*`.
    pub metrics: Metrics,
    /// Logged-in client sessions, for `SHOW POOL_PROCESSES` / `POOL_POOLS`.
    pub sessions: SessionRegistry,
    /// When the proxy started (uptime metric).
    pub(crate) started: Instant,
    /// Backend connection pool.
    pub pool: Pool,
    /// WAL positions for read-your-writes routing.
    pub(crate) lsns: Arc<Consistency>,
    /// The statement classifier; rebuilt when a reload changes the function lists.
    pub(crate) classifier: ArcSwap<SqlParserClassifier>,
    /// Classifications by normalised statement text, shared by all sessions (hit
    /// and miss counters are exported at scrape time).
    pub(crate) classify_cache: ClassifyCache,
    /// `pg_proc` volatility of functions on no list, looked up once each.
    pub(crate) catalog: FunctionCatalog,
    /// Whether relations named by reads are unlogged, looked up on the primary.
    pub(crate) relations: RelationCatalog,
    /// Client cancel keys → server connections.
    pub(crate) cancels: CancelRegistry,
    /// Connected, logged-in clients (bounded by `max_client_conn`).
    pub(crate) clients: AtomicUsize,
    /// Failed logins per client address (`auth_failure_limit`).
    pub(crate) login_throttle: crate::auth::throttle::LoginThrottle,
    /// `auth_query` lookups and their cached answers.
    pub(crate) auth_lookup: crate::auth::query::AuthLookup,
    /// Random per-process secret: mock SCRAM salts for unknown users.
    pub(crate) server_secret: [u8; 32],
    /// The last primary connection's server-wide ParameterStatus values, for
    /// admin logins while no primary can be reached.
    pub(crate) server_params: ServerParams,
    /// Next BackendKeyData pid to hand out.
    next_pid: AtomicI32,
    /// Turns true when the proxy stops; sessions end.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The client sessions' tasks (and the parking lot's): a stop waits for
    /// them to send their goodbye.
    pub(crate) session_tasks: tokio_util::task::TaskTracker,
    /// Where sessions idle past `pool.park_idle_after` wait without a task
    /// (`session::park`), made at the first parking. Its type belongs to the
    /// session layer above, hence `Any`; `None` when it could not be made.
    pub(crate) parking: std::sync::OnceLock<Option<Arc<dyn std::any::Any + Send + Sync>>>,
}

impl ProxyContext {
    /// Build the shared state for `config`.
    pub(crate) fn new(config: Config, shutdown: watch::Receiver<bool>) -> ProxyContext {
        let nodes = config.backends.len();
        let cluster = Arc::new(Cluster::new(&config.backends));
        let pool = Pool::with_cluster(nodes, cluster.clone());
        let classifier = SqlParserClassifier::new(FunctionPolicy::from_config(&config.routing));
        let classify_cache = ClassifyCache::new(config.routing.cache_size);
        ProxyContext {
            config: Arc::new(ArcSwap::from_pointee(config)),
            cluster,
            metrics: Metrics::new(nodes),
            sessions: SessionRegistry::default(),
            started: Instant::now(),
            pool,
            lsns: Arc::new(Consistency::new(nodes)),
            classifier: ArcSwap::from_pointee(classifier),
            classify_cache,
            catalog: FunctionCatalog::default(),
            relations: RelationCatalog::default(),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            login_throttle: Default::default(),
            auth_lookup: Default::default(),
            server_secret: rand::random(),
            server_params: ServerParams::default(),
            next_pid: AtomicI32::new(rand::random_range(1..1 << 20)),
            shutdown,
            session_tasks: tokio_util::task::TaskTracker::new(),
            parking: std::sync::OnceLock::new(),
        }
    }

    /// Apply a reloaded configuration: new sessions see it; a change of the function
    /// lists rebuilds the classifier and empties the caches that depend on it.
    pub(crate) fn reload(&self, new: Config) {
        let old = self.config.load();
        let lists_changed = old.routing.write_functions != new.routing.write_functions
            || old.routing.read_only_functions != new.routing.read_only_functions
            || old.routing.unknown_functions != new.routing.unknown_functions
            || old.routing.primary_relations != new.routing.primary_relations;
        if lists_changed {
            let classifier = SqlParserClassifier::new(FunctionPolicy::from_config(&new.routing));
            self.classifier.store(Arc::new(classifier));
            self.classify_cache.clear();
            self.catalog.clear();
        }
        self.config.store(Arc::new(new));
        // Passwords may have changed: the next login of each user looks again.
        self.auth_lookup.clear();
    }

    /// How many `auth_query` lookups reached the primary (one per user name
    /// and cache period, however many logins wait for it).
    pub fn auth_lookups_sent(&self) -> u64 {
        self.auth_lookup.queries_sent()
    }

    /// A fresh key for a client's BackendKeyData, registered for cancels, and
    /// the slot that says where its cancels go.
    pub(crate) fn new_client_key(&self) -> (CancelKey, CancelSlot) {
        let tag = self.cancel_tag();
        loop {
            let n = self.next_pid.fetch_add(1, Ordering::Relaxed);
            let pid = if tag == 0 {
                n & 0x3fff_ffff
            } else {
                cancel::tagged_pid(tag, n)
            };
            let key = CancelKey {
                pid,
                secret: rand::random(),
            };
            if pid != 0
                && let Some(slot) = self.cancels.register(key)
            {
                return (key, slot);
            }
        }
    }
}

impl ProxyContext {
    /// This instance's cancel tag among its peers (0: coordination off or
    /// not registered yet).
    fn cancel_tag(&self) -> u8 {
        self.cluster.coordination().map_or(0, |h| h.tag())
    }

    /// A CancelRequest from a client: run here when the key is this
    /// instance's, else forwarded to the peer whose tag the pid carries
    /// (clients behind a load balancer may cancel through another
    /// instance than the one holding their session).
    pub(crate) async fn cancel(&self, key: CancelKey, limit: std::time::Duration) {
        let own = self.cancel_tag();
        let tag = cancel::pid_tag(key.pid);
        let peer = self
            .cluster
            .coordination()
            .filter(|_| own != 0 && tag != 0 && tag != own)
            .and_then(|h| h.peer_address_for_tag(tag));
        match peer {
            Some(addr) => {
                tracing::debug!(pid = key.pid, %addr, "cancel request forwarded to the peer holding the session");
                crate::backend::conn::send_cancel(addr, key, limit).await;
            }
            None => self.cancels.cancel(key, limit).await,
        }
    }
}

impl crate::metrics::Scrape for ProxyContext {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn cluster(&self) -> &Cluster {
        &self.cluster
    }
    fn pool(&self) -> &Pool {
        &self.pool
    }
    fn classify_cache(&self) -> &ClassifyCache {
        &self.classify_cache
    }
    fn started(&self) -> Instant {
        self.started
    }
    fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// One client counted against `max_client_conn`; released on drop.
pub(crate) struct ClientSlot(Arc<ProxyContext>);

impl ClientSlot {
    /// Take a slot if fewer than `max` clients are connected.
    pub(crate) fn try_acquire(ctx: &Arc<ProxyContext>, max: usize) -> Option<ClientSlot> {
        let mut cur = ctx.clients.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match ctx
                .clients
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    ctx.metrics.client_connected();
                    return Some(ClientSlot(ctx.clone()));
                }
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.client_disconnected();
    }
}
