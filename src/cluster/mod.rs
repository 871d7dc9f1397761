//! The one owner of node state: which node is the primary, which nodes take
//! traffic, how far each standby lags, and what each node's read weight is.
//!
//! Three kinds of tasks feed it, all through [`Cluster`]'s methods, which
//! serialise every change under one lock and publish a new immutable
//! [`ClusterSnapshot`] through `arc-swap`:
//!
//! * [`health`]: one task per node. Every `health_check.period` it asks
//!   `pg_is_in_recovery()` as the `[monitor]` role (so the role is part of the
//!   health probe) on a connection renewed every
//!   `health_check.connection_lifetime`, retrying `max_retries` times before the
//!   verdict `down`. Client sessions that see a connection to a node fail call
//!   [`Cluster::report_session_error`], which only *requests* an early probe:
//!   the probe, with its retries, is the verdict, never the session's error.
//! * [`replication`]: one task running pgpool's `sr_check` every
//!   `sr_check.period`: LSNs, `pg_stat_replication`, replay state; it computes
//!   lag and, through [`lag`], each standby's effective read weight.
//! * [`slots`]: one task listing the primary's physical replication slots,
//!   which standby uses each, and the stale ones (optionally dropped).
//! * the backend pool, which reports the first connection to a node
//!   ([`Cluster::note_backend_connected`]) so `waiting` turns `up`.
//! * [`failover`]: the coordinator. When the chosen primary is lost it
//!   picks the most advanced standby, promotes it ([`promote`], by
//!   `failover.mode`), waits for exactly one primary, publishes it and
//!   re-points the other standbys ([`follow`]); the old primary is fenced.
//!   [`switchover`] runs `PROMOTE NODE` (planned), and admin commands attach
//!   and detach nodes. Why this never publishes two primaries is written
//!   down in `state_machine/transition.rs`.
//! * [`patroni`]: with `failover.mode = "patroni"`, the task that follows
//!   Patroni's leader key in etcd; the coordinator then decides nothing
//!   (see `patroni/mod.rs`).
//!
//! Sessions, the router, admin commands and metrics only read snapshots (an
//! `Arc` load, no lock). The state machine itself (admission, false primaries,
//! auto_failback, weights) lives in `state_machine/mod.rs` as plain functions over data, so
//! it is unit-tested without a network.

pub(crate) mod at_start;
pub mod coordination;
pub(crate) mod error;
pub mod events;
pub(crate) mod failover;
pub(crate) mod follow;
pub(crate) mod health;
pub(crate) mod hooks;
pub(crate) mod lag;
pub(crate) mod monitor_conn;
pub mod patroni;
pub(crate) mod pgbin;
pub(crate) mod promote;
pub(crate) mod rejoin;
pub mod replication;
pub(crate) mod returning;
pub(crate) mod slots;
mod state_machine;
pub(crate) mod switchover;
pub(crate) mod timeline;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::config::{Backend, Config, Monitor, NodeId};
pub(crate) use error::{CommandError, StepError};
pub(crate) use events::FailoverReport;
pub(crate) use health::HealthStats;
pub(crate) use lag::LagPolicy;
pub(crate) use state_machine::HoldKind;
use state_machine::{Admission, Owner};

/// pgpilot's own view of a node: does it get traffic?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Not checked yet (before the first health check finished).
    Unknown,
    /// In service and serving client traffic.
    Up,
    /// In service (healthy) but no client session has used it yet since it was
    /// admitted: pgpool's `waiting`. Gets traffic like `Up`.
    Waiting,
    /// Out of service: unreachable after all retries, or held out (a false
    /// primary, a standby not yet re-admitted). Gets no traffic.
    Down,
}

impl NodeStatus {
    /// Whether the node may get traffic (`Up` or `Waiting`).
    pub fn is_usable(self) -> bool {
        matches!(self, NodeStatus::Up | NodeStatus::Waiting)
    }

    /// pgpool's spelling: `up`, `waiting`, `down` (`Unknown` shows as `down`:
    /// it gets no traffic).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Up => "up",
            NodeStatus::Waiting => "waiting",
            NodeStatus::Down | NodeStatus::Unknown => "down",
        }
    }
}

/// Live reachability: the result of the latest health-check attempt
/// (pgpool's `pg_status`). Unlike [`NodeStatus`] it has no hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgStatus {
    /// Never checked.
    Unknown,
    /// The latest attempt connected and got an answer.
    Up,
    /// The latest attempt failed.
    Down,
}

impl PgStatus {
    /// `up`, `down` or `unknown`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PgStatus::Up => "up",
            PgStatus::Down => "down",
            PgStatus::Unknown => "unknown",
        }
    }
}

/// Role as reported by `pg_is_in_recovery()` (the node's own claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Not known (never reached).
    Unknown,
    /// Not in recovery.
    Primary,
    /// In recovery (hot standby).
    Standby,
}

impl Role {
    /// `primary`, `standby` or `unknown`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Unknown => "unknown",
        }
    }
}

/// What the latest replication check found on one node. Every field is
/// `None`/empty when unknown (sr_check off, node unreachable, query failed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicationView {
    /// When this node was last asked (wall clock, for display).
    pub(crate) checked_at: Option<SystemTime>,
    /// Primary: `pg_current_wal_lsn()`. Standby: `pg_last_wal_replay_lsn()`.
    pub(crate) lsn: Option<u64>,
    /// Standby: `pg_last_wal_receive_lsn()` (received, maybe not replayed).
    pub(crate) receive_lsn: Option<u64>,
    /// Standby: primary LSN − replay LSN (0 for the primary).
    pub lag_bytes: Option<u64>,
    /// Standby: how far behind in time (0 for the primary; see
    /// `replication.rs` for how it is estimated).
    pub(crate) lag_seconds: Option<f64>,
    /// Standby: `pg_is_wal_replay_paused()`.
    pub replay_paused: Option<bool>,
    /// Standby: `pg_last_xact_replay_timestamp()`.
    pub(crate) last_replay_at: Option<SystemTime>,
    /// `pg_stat_replication.state` for this standby on the primary
    /// (`streaming`, `catchup` …), matched by application name; empty if none.
    pub state: String,
    /// `pg_stat_replication.sync_state` (`async`, `sync`, `potential`, `quorum`).
    pub(crate) sync_state: String,
    /// Timeline: the primary's current one, or the standby's received one.
    pub(crate) timeline: Option<u32>,
    /// The name the standby shows in `pg_stat_replication` (configured
    /// `application_name`, else detected from its WAL receiver).
    pub(crate) application_name: String,
    /// Whether the primary shows this standby streaming (auto_failback needs it).
    pub(crate) streaming_from_primary: bool,
    /// The standby is on another timeline than the primary: it diverged and
    /// gets no reads.
    pub timeline_mismatch: bool,
    /// Why the data is missing or suspicious (query error, role or timeline
    /// mismatch); shown in `SHOW PGPILOT_NODES`.
    pub(crate) issue: Option<String>,
}

/// One node as of a snapshot.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Position in `backends`.
    pub id: NodeId,
    /// Configured host.
    pub(crate) host: String,
    /// Configured port.
    pub(crate) port: u16,
    /// Configured weight.
    pub(crate) weight: f64,
    /// pgpilot's view: does the node get traffic (with hysteresis).
    pub status: NodeStatus,
    /// Live reachability from the latest health-check attempt.
    pub(crate) pg_status: PgStatus,
    /// Live role from the latest successful health check (the node's claim;
    /// the chosen primary is [`ClusterSnapshot::primary`]).
    pub(crate) role: Role,
    /// When `status` or `role` last changed.
    pub(crate) last_change: SystemTime,
    /// Latest health-check error, shown to operators (cleared on success).
    pub(crate) last_error: Option<String>,
    /// Why a reachable node is kept out of service (false primary, waiting for
    /// auto_failback); `None` when it is not held out.
    pub held_out: Option<String>,
    /// Read weight after lag: `weight × f(lag)` for an in-service standby,
    /// `weight` for the chosen primary, 0 when the node must not get reads.
    pub effective_weight: f64,
    /// Latest replication check.
    pub repl: ReplicationView,
}

/// An immutable picture of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// All configured nodes, by id.
    pub nodes: Vec<NodeView>,
    /// The node writes go to, if one is known and in service.
    pub primary: Option<NodeId>,
    /// The lag curve and thresholds the weights were computed with.
    pub(crate) lag_policy: LagPolicy,
    /// Increases with every published snapshot.
    pub(crate) generation: u64,
}

impl ClusterSnapshot {
    fn initial(backends: &[Backend]) -> ClusterSnapshot {
        ClusterSnapshot {
            nodes: backends
                .iter()
                .enumerate()
                .map(|(i, b)| NodeView {
                    id: NodeId::new(i),
                    host: b.host.clone(),
                    port: b.port,
                    weight: b.weight,
                    status: NodeStatus::Unknown,
                    pg_status: PgStatus::Unknown,
                    role: Role::Unknown,
                    last_change: SystemTime::now(),
                    last_error: None,
                    held_out: None,
                    effective_weight: 0.0,
                    repl: ReplicationView {
                        application_name: b.application_name.clone(),
                        ..ReplicationView::default()
                    },
                })
                .collect(),
            primary: None,
            lag_policy: LagPolicy::default(),
            generation: 0,
        }
    }

    /// Whether a primary is known and in service (what `/healthz` reports).
    pub fn has_primary(&self) -> bool {
        self.primary
            .and_then(|p| self.nodes.get(p.index()))
            .is_some_and(|n| n.status.is_usable())
    }
}

/// Shared cluster state.
pub struct Cluster {
    /// Current snapshot; replaced whole on every change.
    snapshot: ArcSwap<ClusterSnapshot>,
    /// Woken when a snapshot is published (sessions waiting for a primary).
    changed: Notify,
    /// Snapshot generation, for tasks that react to changes (pool cleanup).
    generation: watch::Sender<u64>,
    /// The mutable state behind the snapshots; every change goes through it.
    owner: Mutex<Owner>,
    /// One per node: a session saw a connection failure; probe now. A `Notify`
    /// holds at most one permit, so a burst of errors costs one probe.
    probe_requests: Vec<Notify>,
    /// A failover or switchover is in progress (mirrors the owner, so the
    /// sessions' check is one atomic load).
    in_transition: AtomicBool,
    /// A session lost its connection to the primary: the failover
    /// coordinator probes it directly (`failover.detect_on_session_error`).
    suspect: Notify,
    /// Counts the coordinator's finished direct probes, so a session can wait
    /// for the verdict on the connection it lost.
    verdicts: watch::Sender<u64>,
    /// `failover.detect_on_session_error`, mirrored by the coordinator.
    fast_detect: AtomicBool,
    /// Held while a failover or switchover runs: one at a time.
    transition_lock: tokio::sync::Mutex<()>,
    /// The primary's physical replication slots, as `slots::run` last saw them.
    slots: ArcSwap<Vec<slots::SlotInfo>>,
    /// Coordination through etcd, when `[coordination]` is on: who decides.
    coord: OnceLock<Arc<coordination::Handle>>,
    /// Patroni mode (`failover.mode = "patroni"`): Patroni decides.
    patroni: OnceLock<Arc<patroni::Handle>>,
    /// Nodes a rejoin runs for (`REJOIN NODE`, `auto_rejoin`): one at a time each.
    rejoining: std::sync::Mutex<std::collections::HashSet<NodeId>>,
}

/// How long a session whose primary connection broke waits for the
/// coordinator's verdict before it tells its client (only with
/// `detect_on_session_error`; a refused connection answers in milliseconds).
const VERDICT_WAIT: Duration = Duration::from_secs(1);

impl Cluster {
    /// State for the configured backends, all unknown.
    pub(crate) fn new(backends: &[Backend]) -> Cluster {
        let snap = ClusterSnapshot::initial(backends);
        Cluster {
            snapshot: ArcSwap::from_pointee(snap.clone()),
            changed: Notify::new(),
            generation: watch::Sender::new(0),
            owner: Mutex::new(Owner::new(snap)),
            probe_requests: backends.iter().map(|_| Notify::new()).collect(),
            in_transition: AtomicBool::new(false),
            suspect: Notify::new(),
            verdicts: watch::Sender::new(0),
            fast_detect: AtomicBool::new(false),
            transition_lock: tokio::sync::Mutex::new(()),
            slots: ArcSwap::from_pointee(Vec::new()),
            coord: OnceLock::new(),
            patroni: OnceLock::new(),
            rejoining: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The primary's physical replication slots, with the standby using each
    /// and whether it is stale (see [`slots`]).
    pub(crate) fn replication_slots(&self) -> Arc<Vec<slots::SlotInfo>> {
        self.slots.load_full()
    }

    /// Whether a failover or switchover is in progress (one atomic load).
    pub fn failover_in_progress(&self) -> bool {
        self.in_transition.load(Ordering::Acquire)
    }

    /// The primary's id, waiting up to `normal` for one — or up to
    /// `during_failover` (`failover.client_wait_timeout`) while a failover
    /// or switchover is in progress, re-judged on every change.
    pub(crate) async fn wait_primary_for(
        &self,
        normal: Duration,
        during_failover: Duration,
    ) -> Option<NodeId> {
        let start = tokio::time::Instant::now();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.snapshot.load().primary {
                return Some(p);
            }
            let limit = if self.failover_in_progress() {
                normal.max(during_failover)
            } else {
                normal
            };
            let deadline = start + limit;
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// A session's server connection to `node` broke (or was refused). Asks
    /// for probes like [`Cluster::report_session_error`]; when `node` is the
    /// primary and `detect_on_session_error` is on, waits (≤ 1 s) for the
    /// coordinator's direct probe. Returns whether a failover is in progress,
    /// so the session can tell its client so.
    pub(crate) async fn session_lost(&self, node: NodeId) -> bool {
        if self.failover_in_progress() {
            self.report_session_error(node);
            return true;
        }
        let was_primary = self.snapshot.load().primary == Some(node);
        let mut verdicts = self.verdicts.subscribe();
        verdicts.borrow_and_update();
        self.report_session_error(node);
        if !was_primary || !self.fast_detect.load(Ordering::Relaxed) {
            return false;
        }
        let verdict = async {
            while !self.failover_in_progress() {
                if verdicts.changed().await.is_err() {
                    break;
                }
                if !self.failover_in_progress() {
                    // The probe found it alive.
                    return false;
                }
            }
            self.failover_in_progress()
        };
        tokio::time::timeout(VERDICT_WAIT, verdict)
            .await
            .unwrap_or_else(|_| self.failover_in_progress())
    }

    /// Failover status and event counters (`SHOW PGPILOT_FAILOVER`, metrics).
    pub fn failover_report(&self) -> FailoverReport {
        self.lock().report()
    }

    /// `ATTACH NODE n`: lift the node's hold (detached, fenced, cannot
    /// follow) and admit it. The message says what happened.
    pub(crate) fn attach(&self, node: NodeId, config: &Config) -> Result<String, CommandError> {
        if let Some(r) = self.forward_if_follower("attach", node) {
            return r;
        }
        let adm = Admission::from(config);
        self.update_with(|o| o.attach(node, &adm))
    }

    /// `DETACH NODE n`: no traffic to the node until `ATTACH NODE n`.
    /// Refused for the primary (use `PROMOTE NODE` to move it first).
    pub(crate) fn detach(&self, node: NodeId, config: &Config) -> Result<String, CommandError> {
        if let Some(r) = self.forward_if_follower("detach", node) {
            return r;
        }
        let adm = Admission::from(config);
        self.update_with(|o| o.detach(node, &adm))
    }

    /// The current snapshot (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.snapshot.load_full()
    }

    /// Changes whenever a snapshot is published.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A session saw its connection to `node` refused, reset or time out.
    /// Non-blocking and coalesced: asks that node's health task to probe now.
    /// Never a verdict by itself: the node goes down only if the probe (with
    /// its retries) fails, so a client killing its own backend, a FATAL from a
    /// statement or a vanished client cannot take a healthy node down.
    pub(crate) fn report_session_error(&self, node: NodeId) {
        tracing::debug!(%node, "session reported a connection error; probing early");
        self.request_probe(node);
        if self.snapshot.load().primary == Some(node) {
            self.suspect.notify_one();
        }
    }

    /// Ask `node`'s health task for a round now (coalesced).
    fn request_probe(&self, node: NodeId) {
        if let Some(n) = self.probe_requests.get(node.index()) {
            n.notify_one();
        }
    }

    /// The pool opened a connection to `node`: a `waiting` node is now `up`.
    /// Cheap when the node is already up (one snapshot load).
    pub(crate) fn note_backend_connected(&self, node: NodeId) {
        let waiting = self
            .snapshot
            .load()
            .nodes
            .get(node.index())
            .is_some_and(|n| n.status == NodeStatus::Waiting);
        if waiting {
            self.update(|o| o.backend_connected(node));
        }
    }

    // ---- steps of the failover coordinator (see `state_machine/transition.rs`) ----

    /// The failover step that is due, if any.
    fn transition_due(&self, retry: Duration) -> Option<events::TransitionStatus> {
        self.lock().transition_due(retry)
    }

    /// Record the phase of transition `id`.
    fn set_phase(&self, id: u64, phase: events::Phase, detail: String) -> Result<(), StepError> {
        self.update_with(|o| o.set_phase(id, phase, detail))
    }

    /// Failover `id` found no candidate (having tried `tried`, if forced).
    fn candidate_refused(
        &self,
        id: u64,
        tried: Option<NodeId>,
        why: String,
    ) -> Result<(), StepError> {
        self.update_with(|o| o.candidate_refused(id, tried, why))
    }

    /// The last look found the old primary answering: cancel failover `id`.
    fn primary_answers(
        &self,
        id: u64,
        node: NodeId,
        error: String,
        config: &Config,
    ) -> Result<(), StepError> {
        let adm = Admission::from(config);
        self.update_with(|o| o.primary_answers(id, node, error, &adm))
    }

    /// The direct probe confirmed the primary cannot be reached.
    fn primary_unreachable(&self, node: NodeId, reason: String, config: &Config) {
        let adm = Admission::from(config);
        self.update(|o| o.primary_unreachable(node, reason, &adm));
    }

    /// A role seen directly by the coordinator.
    fn observe_role(&self, node: NodeId, in_recovery: bool) {
        self.update(|o| o.observe_role(node, in_recovery));
    }

    /// The point of no return of transition `id` (fences the old primary).
    fn promotion_started(&self, id: u64, candidate: NodeId) -> Result<(), StepError> {
        self.update_with(|o| o.promotion_started(id, candidate))
    }

    /// Publish `new` as the primary, ending transition `id`.
    fn finish(&self, id: u64, new: NodeId, config: &Config) -> Result<(), StepError> {
        let adm = Admission::from(config);
        self.update_with(|o| o.finish(id, new, &adm))
    }

    /// Transition `id` gives up.
    fn fail(&self, id: u64, reason: String, config: &Config) -> Result<(), StepError> {
        let adm = Admission::from(config);
        self.update_with(|o| o.fail(id, reason, &adm))
    }

    /// Count a failover event.
    fn count(&self, e: events::Event) {
        self.lock().count(e);
    }

    /// Whether `node` is held out (detached, fenced, cannot follow).
    fn is_held(&self, node: NodeId) -> bool {
        self.lock().is_held(node)
    }

    /// The last WAL position seen on `node` while it was the primary.
    fn last_primary_lsn(&self, node: NodeId) -> Option<u64> {
        self.lock().last_primary_lsn(node)
    }

    /// A standby could not follow the new primary (`diverged`: its
    /// timeline did).
    fn cannot_follow(&self, node: NodeId, reason: String, diverged: bool) {
        self.update(|o| o.cannot_follow(node, reason, diverged));
    }

    /// `failover.promote_at_start` (see `Owner::failover_at_start`).
    fn failover_at_start(&self, reason: String) -> bool {
        self.update_with(|o| o.failover_at_start(reason))
    }

    /// A rejoin of `node` reports progress (false: not held for it any more).
    fn rejoin_progress(&self, node: NodeId, reason: String) -> bool {
        self.update_with(|o| o.rejoin_progress(node, reason))
    }

    /// `node` rejoined as a standby (see `Owner::rejoined`).
    fn rejoined(&self, node: NodeId, reason: String) {
        self.update(|o| o.rejoined(node, reason));
    }

    /// Why each node is held out of service, by node id (`None`: not held):
    /// `SHOW PGPILOT_NODES` names a fenced old primary by it.
    pub(crate) fn holds(&self) -> Vec<Option<HoldKind>> {
        self.lock().holds()
    }

    /// Health-check statistics per node (for `SHOW POOL_HEALTH_CHECK_STATS`).
    pub fn health_stats(&self) -> Vec<HealthStats> {
        self.lock().health_stats()
    }

    /// Wait until a session asks for an early probe of `node`.
    pub(crate) async fn probe_requested(&self, node: NodeId) {
        match self.probe_requests.get(node.index()) {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Run `f` on the owner state and publish the resulting snapshot.
    fn update(&self, f: impl FnOnce(&mut Owner)) {
        self.update_with(f)
    }

    /// [`Cluster::update`] returning `f`'s result.
    fn update_with<R>(&self, f: impl FnOnce(&mut Owner) -> R) -> R {
        let mut owner = self.lock();
        let r = f(&mut owner);
        // Before the snapshot: a session that sees `primary: None` also sees
        // whether a failover is why.
        self.in_transition
            .store(owner.in_transition(), Ordering::Release);
        let snap = owner.publishable();
        let generation = snap.generation;
        self.snapshot.store(Arc::new(snap));
        drop(owner);
        self.changed.notify_waiters();
        self.generation.send_replace(generation);
        r
    }

    fn lock(&self) -> MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// tokio-postgres settings for connecting to `backend` as the monitor role,
/// with `monitor.timeout` as the connect timeout.
pub(crate) fn monitor_conn_config(
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
