//! Prometheus metrics: the registry, the cheap counters sessions bump on the
//! hot path, and the gauges filled from cluster state at scrape time.
//!
//! Names use the `pgpilot_` prefix and base units (`_seconds`, `_bytes`);
//! counters end in `_total`. Hot-path methods ([`Metrics::statement_routed`],
//! [`Metrics::query_finished`] …) touch pre-resolved per-node children: an
//! atomic add, no lock, no label hashing. Everything derived from cluster
//! state (node up, role, lag, effective weight, backend connections, cache
//! counters) is read when Prometheus scrapes ([`Metrics::render`]), so it can
//! never go stale between scrapes.
//!
//! The HTTP endpoint (`/metrics`, `/healthz`) is in [`http`].

pub(crate) mod auth;
mod coordination;
pub(crate) mod http;
mod slots;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::Pool;
use crate::cluster::{Cluster, Role};
use crate::config::NodeId;
use crate::router::cache::ClassifyCache;

/// What a scrape reads besides the counters. The proxy's shared state
/// (`context::ProxyContext`) implements it, so this module names nothing
/// above the layers it reads.
pub trait Scrape: Send + Sync + 'static {
    /// The counters and the registry.
    fn metrics(&self) -> &Metrics;
    /// Node state.
    fn cluster(&self) -> &Cluster;
    /// The backend pool.
    fn pool(&self) -> &Pool;
    /// The shared classification cache (hit and miss counters).
    fn classify_cache(&self) -> &ClassifyCache;
    /// When the proxy started (uptime).
    fn started(&self) -> std::time::Instant;
    /// Turns true when the proxy stops.
    fn shutdown(&self) -> tokio::sync::watch::Receiver<bool>;
}

impl<T: Scrape> Scrape for std::sync::Arc<T> {
    fn metrics(&self) -> &Metrics {
        (**self).metrics()
    }
    fn cluster(&self) -> &Cluster {
        (**self).cluster()
    }
    fn pool(&self) -> &Pool {
        (**self).pool()
    }
    fn classify_cache(&self) -> &ClassifyCache {
        (**self).classify_cache()
    }
    fn started(&self) -> std::time::Instant {
        (**self).started()
    }
    fn shutdown(&self) -> tokio::sync::watch::Receiver<bool> {
        (**self).shutdown()
    }
}

/// Statement kinds sessions report, in counter order.
pub(crate) const KINDS: [&str; 5] = ["read", "write", "transaction", "session", "admin"];

/// Events of `pgpilot_prepared_statements_total`.
pub(crate) const STATEMENT_EVENTS: [&str; 4] = ["reused", "prepared", "closed", "evicted"];

/// Command kinds counted from CommandComplete tags (pgpool's backend stats).
const COMMANDS: [&str; 5] = ["insert", "update", "delete", "ddl", "other"];

/// Buckets for statement durations (0.5 ms … 30 s).
const QUERY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets for health-check attempts (1 ms … 10 s).
const HEALTH_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per-node counters kept outside Prometheus as well, for `SHOW POOL_*`.
#[derive(Debug, Default)]
struct NodeCounts {
    /// Reads routed here (`select_cnt`).
    selects: AtomicU64,
    /// insert, update, delete, ddl, other (CommandComplete tags).
    commands: [AtomicU64; 5],
    /// ERROR, FATAL, PANIC responses from this node.
    errors: [AtomicU64; 3],
}

/// Per-node counts for `SHOW POOL_BACKEND_STATS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NodeStatementCounts {
    /// Reads routed to the node.
    pub(crate) select: u64,
    /// INSERT commands completed.
    pub(crate) insert: u64,
    /// UPDATE commands completed.
    pub(crate) update: u64,
    /// DELETE commands completed.
    pub(crate) delete: u64,
    /// CREATE/ALTER/DROP/… commands completed.
    pub(crate) ddl: u64,
    /// Other commands completed.
    pub(crate) other: u64,
    /// ErrorResponses with severity PANIC.
    pub(crate) panic: u64,
    /// ErrorResponses with severity FATAL.
    pub(crate) fatal: u64,
    /// ErrorResponses with severity ERROR.
    pub(crate) error: u64,
}

/// Severity of an ErrorResponse a node sent, for [`Metrics::node_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorSeverity {
    /// ERROR: the statement failed.
    Error,
    /// FATAL: the server closes the connection.
    Fatal,
    /// PANIC: the server restarts. Never reported today: the response scanner
    /// tells only fatal from not (a PANIC counts as FATAL); the variant keeps
    /// the exported `panic` series, which stays 0.
    #[allow(dead_code)]
    Panic,
}

/// The registry and every metric pgpilot exports.
pub struct Metrics {
    registry: Registry,
    counts: Vec<NodeCounts>,
    /// `pgpilot_statements_routed_total{node,kind}`, children by [node][kind].
    routed: Vec<[IntCounter; 5]>,
    /// `pgpilot_query_duration_seconds{node}`.
    query_seconds: Vec<Histogram>,
    /// `pgpilot_server_errors_total{class}` (SQLSTATE class, first 2 chars).
    errors_by_class: IntCounterVec,
    /// `pgpilot_node_server_errors_total{node,severity}`.
    node_errors: Vec<[IntCounter; 3]>,
    /// `pgpilot_node_commands_total{node,command}`.
    commands: Vec<[IntCounter; 5]>,
    /// `pgpilot_client_connections`.
    clients: IntGauge,
    /// `pgpilot_client_connections_total`.
    clients_total: IntCounter,
    /// `pgpilot_clients_parked`.
    parked: IntGauge,
    /// `pgpilot_health_check_duration_seconds{node}`.
    health_seconds: Vec<Histogram>,
    /// `pgpilot_health_check_failures_total{node}` (failed attempts).
    health_failures: Vec<IntCounter>,
    /// `pgpilot_consistency_primary_reads_total`: reads sent to the primary because
    /// no standby had replayed what they must see.
    consistency_primary: IntCounter,
    /// `pgpilot_consistency_waits_total`: reads that waited for a standby to catch up.
    consistency_waits: IntCounter,
    /// `pgpilot_standby_refusals_retried_total`: reads a standby refused
    /// (recovery) that were run again on the primary.
    refusals_retried: IntCounter,
    /// `pgpilot_consistency_wait_seconds`: how long those waits took.
    consistency_wait_seconds: Histogram,
    /// `pgpilot_prepared_statements_total{event}`, children by [`STATEMENT_EVENTS`].
    prepared: [IntCounter; 4],
    scrape: ScrapeGauges,
    /// Client logins (delayed failures).
    pub auth: auth::AuthMetrics,
    /// Serialises scrapes (scrape-time gauges are reset and refilled).
    scrape_lock: Mutex<()>,
}

/// Metrics filled at scrape time from cluster and pool state.
struct ScrapeGauges {
    node_up: IntGaugeVec,
    node_reachable: IntGaugeVec,
    node_role: IntGaugeVec,
    node_primary: IntGaugeVec,
    lag_bytes: GaugeVec,
    lag_seconds: GaugeVec,
    effective_weight: GaugeVec,
    replay_paused: IntGaugeVec,
    backend_conns: IntGaugeVec,
    pool_waiting: IntGaugeVec,
    backend_opened: IntCounterVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    primary_available: IntGauge,
    health_checks: IntCounterVec,
    health_down_verdicts: IntCounterVec,
    info: IntGaugeVec,
    uptime: Gauge,
    failover_events: IntCounterVec,
    failover_in_progress: IntGauge,
    failover_last_duration: Gauge,
    slots: slots::SlotMetrics,
    coordination: coordination::CoordinationMetrics,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// Register a metric; names and labels are constants, so failure is a bug
/// caught by the unit tests, and the metric then simply is not exported.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "cannot register a metric");
    }
    c
}

macro_rules! metric {
    ($reg:expr, $ty:ident, $name:expr, $help:expr) => {
        reg(
            $reg,
            $ty::with_opts(opts($name, $help)).expect("valid metric"),
        )
    };
    ($reg:expr, $ty:ident, $name:expr, $help:expr, $labels:expr) => {
        reg(
            $reg,
            $ty::new(opts($name, $help), $labels).expect("valid metric"),
        )
    };
}

impl Metrics {
    /// Metrics for a cluster of `nodes` nodes.
    pub(crate) fn new(nodes: usize) -> Metrics {
        let r = Registry::new();
        let routed_vec = metric!(
            &r,
            IntCounterVec,
            "pgpilot_statements_routed_total",
            "Statements sent to a node, by routing kind (read, write, transaction, session, admin).",
            &["node", "kind"]
        );
        let query_vec = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "pgpilot_query_duration_seconds",
                    "Time from forwarding a statement to its completion, per node.",
                )
                .buckets(QUERY_BUCKETS.to_vec()),
                &["node"],
            )
            .expect("valid metric"),
        );
        let node_err_vec = metric!(
            &r,
            IntCounterVec,
            "pgpilot_node_server_errors_total",
            "ErrorResponses sent by a node, by severity.",
            &["node", "severity"]
        );
        let cmd_vec = metric!(
            &r,
            IntCounterVec,
            "pgpilot_node_commands_total",
            "Commands completed on a node, by kind (insert, update, delete, ddl, other).",
            &["node", "command"]
        );
        let health_vec = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "pgpilot_health_check_duration_seconds",
                    "Duration of one health-check attempt (connect, log in, pg_is_in_recovery()).",
                )
                .buckets(HEALTH_BUCKETS.to_vec()),
                &["node"],
            )
            .expect("valid metric"),
        );
        let health_fail_vec = metric!(
            &r,
            IntCounterVec,
            "pgpilot_health_check_failures_total",
            "Failed health-check attempts (each retry counts).",
            &["node"]
        );
        let ids: Vec<String> = (0..nodes).map(|i| i.to_string()).collect();
        let children3 = |v: &IntCounterVec, labels: [&str; 3], id: &str| {
            labels.map(|l| v.with_label_values(&[id, l]))
        };
        Metrics {
            consistency_primary: metric!(
                &r,
                IntCounter,
                "pgpilot_consistency_primary_reads_total",
                "Reads sent to the primary because no standby had replayed what the read must see."
            ),
            consistency_waits: metric!(
                &r,
                IntCounter,
                "pgpilot_consistency_waits_total",
                "Reads that waited for a standby to replay what they must see."
            ),
            refusals_retried: metric!(
                &r,
                IntCounter,
                "pgpilot_standby_refusals_retried_total",
                "Reads a standby refused as in recovery, run again on the primary."
            ),
            consistency_wait_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "pgpilot_consistency_wait_seconds",
                        "Time reads waited for a standby to catch up.",
                    )
                    .buckets(QUERY_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            prepared: {
                let v = metric!(
                    &r,
                    IntCounterVec,
                    "pgpilot_prepared_statements_total",
                    "Named prepared statements on server connections, by event: reused (a connection already held the session's statement), prepared (parsed again for a session), closed (another session's, in the way), evicted (over pool.max_prepared_statements).",
                    &["event"]
                );
                STATEMENT_EVENTS.map(|e| v.with_label_values(&[e]))
            },
            counts: (0..nodes).map(|_| NodeCounts::default()).collect(),
            routed: ids
                .iter()
                .map(|id| KINDS.map(|k| routed_vec.with_label_values(&[id, k])))
                .collect(),
            query_seconds: ids
                .iter()
                .map(|id| query_vec.with_label_values(&[id]))
                .collect(),
            errors_by_class: metric!(
                &r,
                IntCounterVec,
                "pgpilot_server_errors_total",
                "ErrorResponses relayed to clients, by SQLSTATE class (first two characters).",
                &["class"]
            ),
            node_errors: ids
                .iter()
                .map(|id| children3(&node_err_vec, ["error", "fatal", "panic"], id))
                .collect(),
            commands: ids
                .iter()
                .map(|id| COMMANDS.map(|c| cmd_vec.with_label_values(&[id, c])))
                .collect(),
            clients: metric!(
                &r,
                IntGauge,
                "pgpilot_client_connections",
                "Logged-in client connections."
            ),
            clients_total: metric!(
                &r,
                IntCounter,
                "pgpilot_client_connections_total",
                "Client connections accepted past the connection limit since start."
            ),
            parked: metric!(
                &r,
                IntGauge,
                "pgpilot_clients_parked",
                "Logged-in clients idle past pool.park_idle_after, parked without a task (counted in pgpilot_client_connections too)."
            ),
            health_seconds: ids
                .iter()
                .map(|id| health_vec.with_label_values(&[id]))
                .collect(),
            health_failures: ids
                .iter()
                .map(|id| health_fail_vec.with_label_values(&[id]))
                .collect(),
            scrape: ScrapeGauges::new(&r),
            auth: auth::AuthMetrics::new(&r),
            registry: r,
            scrape_lock: Mutex::new(()),
        }
    }

    /// A statement was sent to `node`. `kind` is one of [`KINDS`]; `read` also
    /// counts as the node's `select_cnt`. Unknown kinds and nodes are ignored.
    pub(crate) fn statement_routed(&self, node: NodeId, kind: &'static str) {
        let Some(children) = self.routed.get(node.index()) else {
            return;
        };
        let i = match kind {
            "read" => {
                self.counts[node.index()]
                    .selects
                    .fetch_add(1, Ordering::Relaxed);
                0
            }
            "write" => 1,
            "transaction" => 2,
            "session" => 3,
            "admin" => 4,
            _ => return,
        };
        children[i].inc();
    }

    /// `n` named prepared statements had `event` (one of [`STATEMENT_EVENTS`])
    /// on a server connection. Unknown events are ignored.
    pub(crate) fn prepared_statements(&self, event: &'static str, n: usize) {
        if let Some(i) = STATEMENT_EVENTS.iter().position(|e| *e == event) {
            self.prepared[i].inc_by(n as u64);
        }
    }

    /// A read went to the primary for read-your-writes consistency.
    pub(crate) fn consistency_routed_to_primary(&self) {
        self.consistency_primary.inc();
    }

    /// A read waited `seconds` for a standby to catch up.
    pub(crate) fn consistency_waited(&self, seconds: f64) {
        self.consistency_waits.inc();
        self.consistency_wait_seconds.observe(seconds);
    }

    /// A read a standby refused was run again on the primary.
    pub(crate) fn refusal_retried(&self) {
        self.refusals_retried.inc();
    }

    /// A statement on `node` completed after `seconds`.
    pub(crate) fn query_finished(&self, node: NodeId, seconds: f64) {
        if let Some(h) = self.query_seconds.get(node.index()) {
            h.observe(seconds);
        }
    }

    /// An ErrorResponse with this SQLSTATE reached a client (counted by class).
    pub(crate) fn server_error(&self, sqlstate: &[u8; 5]) {
        let class = [sqlstate[0], sqlstate[1]];
        let class = if class.iter().all(u8::is_ascii_alphanumeric) {
            std::str::from_utf8(&class).unwrap_or("XX")
        } else {
            "XX"
        };
        self.errors_by_class.with_label_values(&[class]).inc();
    }

    /// `node` sent an ErrorResponse of this severity (pgpool's error/fatal/panic counts).
    pub(crate) fn node_error(&self, node: NodeId, severity: ErrorSeverity) {
        let i = match severity {
            ErrorSeverity::Error => 0,
            ErrorSeverity::Fatal => 1,
            ErrorSeverity::Panic => 2,
        };
        if let (Some(c), Some(n)) = (
            self.counts.get(node.index()),
            self.node_errors.get(node.index()),
        ) {
            c.errors[i].fetch_add(1, Ordering::Relaxed);
            n[i].inc();
        }
    }

    /// `node` completed a command with this CommandComplete tag (`INSERT 0 1`,
    /// `CREATE TABLE` …): feeds insert/update/delete/ddl/other counts. SELECT
    /// is not counted here (reads are counted when routed).
    pub(crate) fn command_completed(&self, node: NodeId, tag: &[u8]) {
        let word = tag.split(|b| *b == b' ').next().unwrap_or_default();
        let i = match word {
            b"SELECT" => return,
            b"INSERT" => 0,
            b"UPDATE" => 1,
            b"DELETE" => 2,
            b"CREATE" | b"ALTER" | b"DROP" | b"TRUNCATE" | b"COMMENT" | b"GRANT" | b"REVOKE" => 3,
            _ => 4,
        };
        if let (Some(c), Some(m)) = (
            self.counts.get(node.index()),
            self.commands.get(node.index()),
        ) {
            c.commands[i].fetch_add(1, Ordering::Relaxed);
            m[i].inc();
        }
    }

    /// A client logged in (maintained by `context::ClientSlot`).
    pub(crate) fn client_connected(&self) {
        self.clients.inc();
        self.clients_total.inc();
    }

    /// A client left.
    pub(crate) fn client_disconnected(&self) {
        self.clients.dec();
    }

    /// A client was parked (`parked`) or woken from the parking lot.
    pub(crate) fn client_parked(&self, parked: bool) {
        if parked {
            self.parked.inc();
        } else {
            self.parked.dec();
        }
    }

    /// Clients parked now.
    pub fn clients_parked(&self) -> i64 {
        self.parked.get()
    }

    /// One health-check attempt of `node` finished.
    pub(crate) fn health_checked(&self, node: NodeId, took: Duration, ok: bool) {
        if let Some(h) = self.health_seconds.get(node.index()) {
            h.observe(took.as_secs_f64());
        }
        if !ok && let Some(c) = self.health_failures.get(node.index()) {
            c.inc();
        }
    }

    /// Reads routed to `node` since start (pgpool's `select_cnt`).
    pub(crate) fn select_count(&self, node: NodeId) -> u64 {
        self.counts
            .get(node.index())
            .map_or(0, |c| c.selects.load(Ordering::Relaxed))
    }

    /// Per-node statement and error counts.
    pub(crate) fn node_counts(&self, node: NodeId) -> NodeStatementCounts {
        let Some(c) = self.counts.get(node.index()) else {
            return NodeStatementCounts::default();
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStatementCounts {
            select: l(&c.selects),
            insert: l(&c.commands[0]),
            update: l(&c.commands[1]),
            delete: l(&c.commands[2]),
            ddl: l(&c.commands[3]),
            other: l(&c.commands[4]),
            error: l(&c.errors[0]),
            fatal: l(&c.errors[1]),
            panic: l(&c.errors[2]),
        }
    }

    /// The Prometheus text exposition of every metric, with cluster, pool and
    /// cache state read now.
    pub fn render(&self, ctx: &impl Scrape) -> String {
        let _guard = self.scrape_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.scrape.fill(ctx);
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Bring a Prometheus counter up to a monotonic count kept elsewhere.
fn sync_counter(c: &IntCounter, value: u64) {
    let cur = c.get();
    if value > cur {
        c.inc_by(value - cur);
    }
}

// After `metric!`: macros are visible to modules declared below them.
mod scrape;

#[cfg(test)]
mod tests;
