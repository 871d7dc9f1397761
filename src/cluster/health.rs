//! Health checks: one task per node, with hysteresis.
//!
//! A check runs `SELECT pg_is_in_recovery()` as the `[monitor]` role within
//! `health_check.timeout`, on the node task's kept connection; a new connection
//! replaces it every `health_check.connection_lifetime` (so the checks keep
//! proving the node accepts connections) and whenever it fails. The answer
//! also gives the node's role, so there is one mechanism for reachability and
//! roles. A failed attempt is retried
//! `max_retries` times, `retry_delay` apart; only when every attempt of the
//! round failed is the node declared `down`. A failed attempt on its own only
//! turns the live `pg_status` down.
//!
//! Rounds run every `period`, or sooner when a session reports a connection
//! error ([`Cluster::report_session_error`]); such early rounds are spaced at
//! least [`MIN_EARLY_GAP`] (or `retry_delay`, if smaller) apart so a client
//! killing its own backends in a loop cannot turn checks into a flood. Settings
//! are re-read every round, so a reload applies at the next one.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::Cluster;
use super::monitor_conn::MonitorConn;
use super::state_machine::Admission;
use crate::config::{Backend, Config, Monitor, NodeId};

/// Longest spacing between two session-triggered rounds of one node.
pub(crate) const MIN_EARLY_GAP: Duration = Duration::from_millis(500);

/// Called after every attempt with (node, attempt duration, success): how the
/// metrics layer observes checks without the cluster depending on it.
pub(crate) type CheckObserver = Arc<dyn Fn(NodeId, Duration, bool) + Send + Sync>;

/// Counters of one node's health checks, with pgpool's meanings: a *check* is a
/// round (first attempt plus retries).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthStats {
    /// Rounds run.
    pub total_count: u64,
    /// Rounds that ended with an answer.
    pub(crate) success_count: u64,
    /// Rounds where every attempt failed (each one a `down` verdict).
    pub fail_count: u64,
    /// Rounds skipped (pgpilot never skips: always 0, kept for pgpool's column).
    pub(crate) skip_count: u64,
    /// Retries, all rounds together.
    pub(crate) retry_count: u64,
    /// Most retries in one round.
    pub(crate) max_retry_count: u32,
    /// Sum of round durations (for the average).
    pub(crate) total_duration: Duration,
    /// Longest round.
    pub(crate) max_duration: Duration,
    /// Shortest round (`None` before the first).
    pub(crate) min_duration: Option<Duration>,
    /// When the latest round ended.
    pub(crate) last_health_check: Option<SystemTime>,
    /// When the latest successful round ended.
    pub(crate) last_successful_health_check: Option<SystemTime>,
    /// When the latest failed round ended.
    pub(crate) last_failed_health_check: Option<SystemTime>,
    /// When a round was last skipped (never).
    pub(crate) last_skip_health_check: Option<SystemTime>,
}

impl HealthStats {
    /// Count one finished round.
    pub(super) fn record(&mut self, ok: bool, retries: u32, duration: Duration, at: SystemTime) {
        self.total_count += 1;
        if ok {
            self.success_count += 1;
            self.last_successful_health_check = Some(at);
        } else {
            self.fail_count += 1;
            self.last_failed_health_check = Some(at);
        }
        self.retry_count += u64::from(retries);
        self.max_retry_count = self.max_retry_count.max(retries);
        self.total_duration += duration;
        self.max_duration = self.max_duration.max(duration);
        self.min_duration = Some(self.min_duration.map_or(duration, |m| m.min(duration)));
        self.last_health_check = Some(at);
    }

    /// Mean retries per round.
    pub(crate) fn average_retry_count(&self) -> f64 {
        let n = self.total_count - self.skip_count;
        if n == 0 {
            0.0
        } else {
            self.retry_count as f64 / n as f64
        }
    }

    /// Mean round duration.
    pub(crate) fn average_duration(&self) -> Duration {
        let n = self.total_count - self.skip_count;
        if n == 0 {
            Duration::ZERO
        } else {
            self.total_duration / n as u32
        }
    }
}

/// How one round ended.
#[derive(Debug, Clone)]
pub(super) struct Round {
    /// `Ok(in_recovery)` or the last attempt's error (whose
    /// [`ProbeError::alive`] says whether a running server answered it: such
    /// a primary is not failed over).
    pub(crate) outcome: Result<bool, ProbeError>,
    /// Attempts after the first.
    pub(crate) retries: u32,
    /// From the first attempt's start to the end.
    pub(crate) duration: Duration,
    /// When the last attempt started: a role it reports is older than any
    /// direct observation made after this instant.
    pub(crate) started: Instant,
}

/// A failed probe. Plain data (it is kept in the cluster state and compared
/// in tests), so the tokio-postgres error is kept as its one-line text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ProbeError {
    /// One line, without passwords.
    pub(crate) message: String,
    /// The node answered with an error that shows a server running and
    /// serving (too many connections, authentication, missing database …),
    /// as opposed to no answer, or `57P0x` (shutting down, starting up,
    /// recovering from a crash) and `08xxx`. Why it matters: a client can
    /// make a healthy primary refuse connections (exhaust `max_connections`);
    /// that must never start a failover.
    pub(crate) alive: bool,
    /// No answer within the limit (the connect or the whole probe timed
    /// out): the node may be merely busy, so one such failure is not
    /// decisive. A refused or reset connection is not a timeout.
    pub(crate) timed_out: bool,
}

impl ProbeError {
    fn from_pg(e: &tokio_postgres::Error) -> ProbeError {
        let alive = e.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            !(code.starts_with("57P") || code.starts_with("08"))
        });
        let mut timed_out = false;
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            if let Some(io) = inner.downcast_ref::<std::io::Error>() {
                timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
            }
            src = inner.source();
        }
        ProbeError {
            message: describe(e),
            alive,
            timed_out,
        }
    }
}

impl Cluster {
    /// An attempt failed and will be retried: live status only, no verdict.
    fn record_attempt_failure(&self, node: NodeId, error: &str) {
        self.update(|o| o.attempt_failed(node, error));
    }

    /// A round finished: update status (with admission rules) and statistics.
    fn record_round(&self, node: NodeId, round: Round, config: &Config) {
        let adm = Admission::from(config);
        self.update(|o| o.round_finished(node, round, SystemTime::now(), adm));
    }
}

/// One attempt on a new connection, closed afterwards: connect and ask
/// `pg_is_in_recovery()`, all within `limit`. Returns the answer or a one-line
/// error (no password in it). Failover uses it for its last looks.
pub(crate) async fn probe_once(
    backend: &Backend,
    monitor: &Monitor,
    limit: Duration,
) -> Result<bool, ProbeError> {
    let mut none = None;
    probe(&mut none, backend, monitor, limit, Duration::ZERO).await
}

/// One attempt of a node's health task: `SELECT pg_is_in_recovery()` on the
/// task's kept connection while it is open and younger than `lifetime`;
/// otherwise, or when the kept connection turns out closed or terminated (a
/// client may `pg_terminate_backend` it), on a new connection, which is kept
/// for the next checks (closed at once when `lifetime` is 0). All within
/// `limit`. Renewing the connection every `lifetime` keeps proving that the
/// node accepts connections, at a fraction of the cost of one per check.
async fn probe(
    kept: &mut Option<MonitorConn>,
    backend: &Backend,
    monitor: &Monitor,
    limit: Duration,
    lifetime: Duration,
) -> Result<bool, ProbeError> {
    let work = async {
        if let Some(conn) = kept.take() {
            if conn.serves(backend) && conn.age() < lifetime {
                match ask_role(&conn).await {
                    Ok(in_recovery) => {
                        *kept = Some(conn);
                        return Ok(in_recovery);
                    }
                    Err(e) => {
                        tracing::debug!(node = %backend.host, error = %e, "kept health connection failed; trying a new one")
                    }
                }
            } else {
                tokio::spawn(conn.close());
            }
        }
        let conn = MonitorConn::open(backend, monitor, "pgpilot-health")
            .await
            .map_err(|e| ProbeError::from_pg(&e))?;
        let answer = ask_role(&conn).await;
        if answer.is_ok() && !lifetime.is_zero() {
            *kept = Some(conn);
        } else {
            tokio::spawn(conn.close());
        }
        answer
    };
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => {
            // Whatever was in flight is abandoned with the connection.
            *kept = None;
            Err(ProbeError {
                message: format!("no answer within {limit:?}"),
                alive: false,
                timed_out: true,
            })
        }
    }
}

/// `SELECT pg_is_in_recovery()` on `conn`.
async fn ask_role(conn: &MonitorConn) -> Result<bool, ProbeError> {
    let row = conn
        .client()
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| ProbeError::from_pg(&e))?;
    row.try_get::<_, bool>(0)
        .map_err(|e| ProbeError::from_pg(&e))
}

/// A tokio-postgres error as one line, with the server's SQLSTATE when it sent one.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// One round: first attempt plus up to `max_retries` retries.
async fn run_round(
    node: NodeId,
    kept: &mut Option<MonitorConn>,
    cluster: &Cluster,
    cfg: &Config,
    observer: &CheckObserver,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Round> {
    let hc = &cfg.health_check;
    let backend = cfg.backends.get(node.index())?;
    // A node already down fails every round: keep the log quiet about it.
    let was_down = cluster
        .snapshot()
        .nodes
        .get(node.index())
        .is_some_and(|n| !n.status.is_usable());
    let started = Instant::now();
    let mut retries = 0;
    loop {
        let t0 = Instant::now();
        let r = probe(
            kept,
            backend,
            &cfg.monitor,
            hc.timeout,
            hc.connection_lifetime,
        )
        .await;
        observer(node, t0.elapsed(), r.is_ok());
        match r {
            Ok(in_recovery) => {
                return Some(Round {
                    outcome: Ok(in_recovery),
                    retries,
                    duration: started.elapsed(),
                    started: t0,
                });
            }
            Err(e) if retries < hc.max_retries => {
                if was_down {
                    tracing::debug!(%node, attempt = retries + 1, error = %e, "health check failed; retrying");
                } else {
                    tracing::info!(%node, attempt = retries + 1, error = %e, "health check failed; retrying");
                }
                cluster.record_attempt_failure(node, &e.message);
                retries += 1;
                tokio::select! {
                    _ = tokio::time::sleep(hc.retry_delay) => {}
                    _ = shutdown.changed() => return None,
                }
            }
            Err(e) => {
                return Some(Round {
                    outcome: Err(e),
                    retries,
                    duration: started.elapsed(),
                    started: t0,
                });
            }
        }
    }
}

/// Check `node` every `health_check.period` (or early on request) until shutdown.
pub(crate) async fn run_node(
    node: NodeId,
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    observer: CheckObserver,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next_due = tokio::time::Instant::now() + config.load().health_check.period;
    let mut last_end = tokio::time::Instant::now();
    let mut kept = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_due) => {}
            _ = cluster.probe_requested(node) => {
                let gap = MIN_EARLY_GAP.min(config.load().health_check.retry_delay);
                tokio::select! {
                    _ = tokio::time::sleep_until(last_end + gap) => {}
                    _ = shutdown.changed() => return,
                }
            }
            _ = shutdown.changed() => return,
        }
        let cfg = config.load_full();
        let was_usable = cluster
            .snapshot()
            .nodes
            .get(node.index())
            .is_some_and(|n| n.status.is_usable());
        let Some(round) =
            run_round(node, &mut kept, &cluster, &cfg, &observer, &mut shutdown).await
        else {
            return;
        };
        if let Err(e) = &round.outcome {
            if was_usable {
                tracing::warn!(%node, retries = round.retries, error = %e, "health check failed after all retries");
            } else {
                tracing::debug!(%node, error = %e, "node still unreachable");
            }
        }
        cluster.record_round(node, round, &cfg);
        last_end = tokio::time::Instant::now();
        next_due = last_end + cfg.health_check.period;
    }
}

/// Check every node once, concurrently and without retries, before clients are
/// accepted, so the primary is known from the start. A node that does not
/// answer is marked down at once (it never was in service); its health task
/// re-admits it when it answers.
pub(crate) async fn initial_check(cluster: &Cluster, config: &Config, observer: &CheckObserver) {
    let tasks: Vec<_> = config
        .backends
        .iter()
        .cloned()
        .map(|b| {
            let m = config.monitor.clone();
            let limit = config.health_check.timeout;
            tokio::spawn(async move {
                let t0 = Instant::now();
                let r = probe_once(&b, &m, limit).await;
                (r, t0, t0.elapsed())
            })
        })
        .collect();
    for (node, t) in NodeId::all(tasks.len()).zip(tasks) {
        let (outcome, t0, duration) = t.await.unwrap_or_else(|e| {
            let e = ProbeError {
                message: format!("check task failed: {e}"),
                alive: false,
                timed_out: false,
            };
            (Err(e), Instant::now(), Duration::ZERO)
        });
        observer(node, duration, outcome.is_ok());
        if let Err(e) = &outcome {
            tracing::warn!(%node, error = %e, "node did not answer the initial health check");
        }
        let round = Round {
            outcome,
            retries: 0,
            duration,
            started: t0,
        };
        cluster.record_round(node, round, config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_follow_pgpool_meanings() {
        let mut s = HealthStats::default();
        let t = SystemTime::now();
        s.record(true, 0, Duration::from_millis(4), t);
        s.record(true, 2, Duration::from_millis(10), t);
        s.record(false, 2, Duration::from_millis(16), t);
        assert_eq!((s.total_count, s.success_count, s.fail_count), (3, 2, 1));
        assert_eq!((s.retry_count, s.max_retry_count), (4, 2));
        assert!((s.average_retry_count() - 4.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.average_duration(), Duration::from_millis(10));
        assert_eq!(s.min_duration, Some(Duration::from_millis(4)));
        assert_eq!(s.max_duration, Duration::from_millis(16));
        assert!(s.last_failed_health_check.is_some());
        assert_eq!(HealthStats::default().average_retry_count(), 0.0);
    }
}
