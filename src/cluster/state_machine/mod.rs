//! The state machine behind the snapshots: plain data and functions, no I/O,
//! so every rule is unit-tested.
//!
//! Rules:
//! * A node goes `down` only when a whole health round failed (first attempt
//!   and every retry). A failed attempt only turns the live `pg_status` down.
//! * A node is admitted (`waiting`, then `up` once a backend connection is
//!   opened to it) when it answers and:
//!   - it is a standby seen for the first time (startup), or
//!   - it is a standby coming back and `auto_failback` is on and the primary
//!     shows it streaming in a replication check newer than its recovery (or
//!     replication checks are off), or
//!   - it claims to be a primary and no other in-service node is the primary,
//!     and it never was a *false primary*.
//! * A node claiming to be a primary while another in-service node is the
//!   chosen primary is a false primary: kept out of service (and remembered as
//!   such until it reports standby), the chosen primary keeps its role.
//! * The chosen primary is the in-service, non-false node claiming primary:
//!   the current one if it still qualifies, else the lowest id.
//! * Effective weights: configured weight for the primary, `weight × f(lag)`
//!   for in-service standbys on the primary's timeline, 0 otherwise.
//! * A node under a *hold* (detached by an operator, fenced old primary,
//!   standby that could not follow a new primary) gets no traffic and is
//!   never chosen as primary; `ATTACH NODE` lifts the hold.
//! * While a failover or switchover is in progress no primary is published;
//!   losing the chosen primary starts a failover (see `state_machine/transition.rs`,
//!   which also holds the reasoning why writes never reach two primaries).

use std::collections::VecDeque;
use std::time::{Instant, SystemTime};

use super::events::{EventCounts, TransitionStatus};
use super::health::{HealthStats, Round};
use super::replication::{NodeCheck, SrRound};
use super::{ClusterSnapshot, LagPolicy, NodeStatus, PgStatus, ReplicationView, Role};
use crate::config::{Config, NodeId};

mod shared;
mod transition;

pub(super) use shared::External;

/// Primary LSN samples kept for time-lag estimates (about an hour at 1 s).
const HISTORY_CAP: usize = 4096;

/// What a node was configured as (re-read from the config on every update,
/// so a reload of weights or application names applies).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct NodeSettings {
    /// `backends[].weight`: base of the effective weight.
    pub(crate) weight: f64,
    /// `backends[].host`: matched against a standby's WAL sender host, the
    /// fallback evidence that it streams from the primary.
    pub(crate) host: String,
    /// `backends[].port`: likewise.
    pub(crate) port: u16,
    /// `backends[].application_name`: finds the standby's row in the primary's
    /// `pg_stat_replication` (detected from the standby when empty).
    pub(crate) application_name: String,
}

/// The configuration the state machine needs, taken from `Config` per update.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Admission {
    /// `health_check.auto_failback`.
    pub(crate) auto_failback: bool,
    /// `sr_check.period > 0`: auto_failback then waits for streaming evidence.
    pub(crate) sr_enabled: bool,
    /// The lag curve.
    pub(crate) policy: LagPolicy,
    /// Per node.
    pub(crate) nodes: Vec<NodeSettings>,
}

impl From<&Config> for Admission {
    fn from(c: &Config) -> Self {
        Admission {
            auto_failback: c.health_check.auto_failback,
            sr_enabled: !c.sr_check.period.is_zero(),
            policy: LagPolicy::from(&c.sr_check),
            nodes: c
                .backends
                .iter()
                .map(|b| NodeSettings {
                    weight: b.weight,
                    host: b.host.clone(),
                    port: b.port,
                    application_name: b.application_name.clone(),
                })
                .collect(),
        }
    }
}

/// Bookkeeping per node that is not part of the published view.
#[derive(Debug, Default)]
struct NodeBook {
    /// When `pg_status` last turned up: replication evidence for auto_failback
    /// must be newer than this.
    healthy_since: Option<Instant>,
    /// When the latest replication sample of this node was taken.
    sr_seen_at: Option<Instant>,
    /// It claimed primary while another node was the primary; stays out until
    /// it reports standby.
    false_primary: bool,
    /// Health-check counters.
    stats: HealthStats,
    /// Kept out of service until an operator (or, for `CannotFollow`,
    /// streaming evidence) lifts it.
    hold: Option<Hold>,
    /// `ATTACH NODE` vouched for it: a returning standby is admitted without
    /// waiting for streaming evidence (the operator rebuilt it).
    attached: bool,
    /// When the failover coordinator last saw this node's role directly:
    /// health rounds that started earlier must not overwrite it (a round
    /// started before a promotion would otherwise report "standby" after it).
    role_seen_at: Option<Instant>,
    /// The latest failed round got an error *answer* from a running server
    /// (too many connections, authentication …): the node is alive, so it
    /// must not be failed over automatically.
    failure_alive: bool,
}

/// Why a node is held out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldKind {
    /// `DETACH NODE`.
    Detached,
    /// An old primary replaced by a failover or switchover: its data may
    /// have diverged, so only an operator (`ATTACH NODE`, after pg_rewind or
    /// pg_basebackup) may bring it back.
    Fenced,
    /// A standby that could not follow the new primary; lifted when it is
    /// seen streaming from the primary on its timeline (or by `ATTACH NODE`).
    CannotFollow,
}

/// A hold and the reason shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::cluster) struct Hold {
    /// What kind of hold.
    pub(crate) kind: HoldKind,
    /// Shown in `SHOW PGPILOT_NODES` (`held_out`).
    pub(crate) reason: String,
}

/// The chosen primary's LSN over time: when did it first pass a given LSN?
#[derive(Debug, Default)]
struct LsnHistory {
    /// The primary the samples belong to (cleared when it changes).
    primary: Option<NodeId>,
    /// (when first seen, LSN), both increasing.
    samples: VecDeque<(Instant, u64)>,
}

impl LsnHistory {
    fn push(&mut self, primary: NodeId, at: Instant, lsn: u64) {
        let went_back = self.samples.back().is_some_and(|&(_, l)| lsn < l);
        if self.primary != Some(primary) || went_back {
            self.samples.clear();
            self.primary = Some(primary);
        }
        if self.samples.back().is_some_and(|&(_, l)| l == lsn) {
            return;
        }
        if self.samples.len() >= HISTORY_CAP {
            self.samples.pop_front();
        }
        self.samples.push_back((at, lsn));
    }

    /// When the primary was first seen past `replay` (the oldest sample if it
    /// was past it already then; `None` if never).
    fn behind_since(&self, replay: u64) -> Option<Instant> {
        let i = self.samples.partition_point(|&(_, l)| l <= replay);
        self.samples.get(i).map(|&(t, _)| t)
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.primary = None;
    }
}

/// The mutable state behind the snapshots.
#[derive(Debug)]
pub(super) struct Owner {
    /// Working copy of the view; a clone is published after every change.
    snap: ClusterSnapshot,
    /// Per node, by id.
    books: Vec<NodeBook>,
    /// Primary LSN samples.
    history: LsnHistory,
    /// The failover or switchover in progress: while it is set no primary is
    /// published.
    transition: Option<TransitionStatus>,
    /// The last finished transition (for `SHOW PGPILOT_FAILOVER`).
    last_transition: Option<TransitionStatus>,
    /// The most recently chosen primary, kept after it is lost until a
    /// failover settles what replaces it: losing it is what starts one.
    last_primary: Option<NodeId>,
    /// Why the lost primary is not failed over (it answers: alive).
    blocked: Option<String>,
    /// Failover event counters.
    counts: EventCounts,
    /// Id of the next transition.
    next_id: u64,
    /// The latest `pg_current_wal_lsn()` of the chosen primary, kept after
    /// it is lost: `failover.max_lag_bytes` measures candidates against it.
    last_primary_lsn: Option<(NodeId, u64)>,
    /// Coordination through etcd, while another instance leads: the state
    /// etcd recorded, which alone names the primary (see
    /// `state_machine/shared.rs`).
    external: Option<External>,
}

impl Owner {
    /// State for a fresh snapshot (every node unknown).
    pub(crate) fn new(snap: ClusterSnapshot) -> Owner {
        let books = snap.nodes.iter().map(|_| NodeBook::default()).collect();
        Owner {
            snap,
            books,
            history: LsnHistory::default(),
            transition: None,
            last_transition: None,
            last_primary: None,
            blocked: None,
            counts: EventCounts::default(),
            next_id: 1,
            last_primary_lsn: None,
            external: None,
        }
    }

    /// The next snapshot to publish.
    pub(crate) fn publishable(&mut self) -> ClusterSnapshot {
        self.snap.generation += 1;
        self.snap.clone()
    }

    /// The last WAL position seen on `node` while it was the primary.
    pub(crate) fn last_primary_lsn(&self, node: NodeId) -> Option<u64> {
        self.last_primary_lsn
            .filter(|(p, _)| *p == node)
            .map(|(_, lsn)| lsn)
    }

    /// Health-check counters per node.
    pub(crate) fn health_stats(&self) -> Vec<HealthStats> {
        self.books.iter().map(|b| b.stats.clone()).collect()
    }

    /// One attempt failed; a retry follows. Live status only.
    pub(crate) fn attempt_failed(&mut self, node: NodeId, error: &str) {
        if let Some(n) = self.snap.nodes.get_mut(node.index()) {
            n.pg_status = PgStatus::Down;
            n.last_error = Some(error.to_string());
            self.books[node.index()].healthy_since = None;
        }
    }

    /// A health round finished.
    pub(crate) fn round_finished(
        &mut self,
        node: NodeId,
        round: Round,
        now: SystemTime,
        adm: Admission,
    ) {
        let Some(n) = self.snap.nodes.get_mut(node.index()) else {
            return;
        };
        let book = &mut self.books[node.index()];
        book.stats
            .record(round.outcome.is_ok(), round.retries, round.duration, now);
        match round.outcome {
            Ok(in_recovery) => {
                if n.pg_status != PgStatus::Up {
                    book.healthy_since = Some(Instant::now());
                }
                n.pg_status = PgStatus::Up;
                n.last_error = None;
                book.failure_alive = false;
                let role = if in_recovery {
                    Role::Standby
                } else {
                    Role::Primary
                };
                let stale = book.role_seen_at.is_some_and(|t| round.started < t);
                if role != n.role && !stale {
                    tracing::info!(
                        %node,
                        from = n.role.as_str(),
                        to = role.as_str(),
                        "node role changed"
                    );
                    n.role = role;
                    n.last_change = now;
                }
            }
            Err(e) => {
                n.pg_status = PgStatus::Down;
                n.last_error = Some(e.message);
                n.held_out = book.hold.as_ref().map(|h| h.reason.clone());
                book.healthy_since = None;
                book.failure_alive = e.alive;
                if n.status != NodeStatus::Down {
                    tracing::warn!(
                        %node,
                        "node is down: no answer after all health-check retries"
                    );
                    n.status = NodeStatus::Down;
                    n.last_change = now;
                }
            }
        }
        self.settle(&adm, now);
    }

    /// The pool opened a connection to `node`: `waiting` → `up`.
    pub(crate) fn backend_connected(&mut self, node: NodeId) {
        if let Some(n) = self.snap.nodes.get_mut(node.index())
            && n.status == NodeStatus::Waiting
        {
            tracing::debug!(%node, "first backend connection; node is up");
            n.status = NodeStatus::Up;
        }
    }

    /// Replication checks are off: forget lag.
    pub(crate) fn clear_replication(&mut self, adm: Admission) {
        self.history.clear();
        for (i, n) in self.snap.nodes.iter_mut().enumerate() {
            n.repl = ReplicationView {
                application_name: adm
                    .nodes
                    .get(i)
                    .map(|s| s.application_name.clone())
                    .unwrap_or_default(),
                ..ReplicationView::default()
            };
        }
        self.settle(&adm, SystemTime::now());
    }

    /// Apply a replication round. Returns nodes whose role looked different
    /// from the health check's view (to be probed now).
    pub(crate) fn apply_replication(
        &mut self,
        round: &SrRound,
        adm: Admission,
        now: SystemTime,
    ) -> Vec<NodeId> {
        let mut recheck = Vec::new();
        let primary = self.snap.primary;
        let primary_sample = primary.and_then(|p| match round.checks.get(p.index()) {
            Some(NodeCheck::Sample(s)) if !s.in_recovery => Some(s),
            _ => None,
        });
        let primary_lsn = primary_sample.and_then(|s| s.current_lsn);
        let primary_tli = primary_sample.and_then(|s| s.timeline);
        match (primary, primary_lsn) {
            (Some(p), Some(lsn)) => {
                self.history.push(p, round.at, lsn);
                self.last_primary_lsn = Some((p, lsn));
            }
            (None, _) => self.history.clear(),
            _ => {}
        }
        for (i, check) in NodeId::all(round.checks.len()).zip(&round.checks) {
            let Some(n) = self.snap.nodes.get(i.index()) else {
                continue;
            };
            let configured = adm.nodes.get(i.index());
            let mut v = ReplicationView {
                application_name: configured
                    .map(|s| s.application_name.clone())
                    .unwrap_or_default(),
                ..ReplicationView::default()
            };
            let mut issues: Vec<String> = Vec::new();
            match check {
                NodeCheck::Skipped => issues.push("not checked: node unreachable".into()),
                NodeCheck::Failed(e) => {
                    v.checked_at = Some(now);
                    issues.push(format!("replication check failed: {e}"));
                }
                NodeCheck::Sample(s) => {
                    v.checked_at = Some(now);
                    self.books[i.index()].sr_seen_at = Some(round.at);
                    let claimed = if s.in_recovery {
                        Role::Standby
                    } else {
                        Role::Primary
                    };
                    if n.role != Role::Unknown && claimed != n.role {
                        issues.push(format!(
                            "role mismatch: now reports {}, health check saw {}; re-checking",
                            claimed.as_str(),
                            n.role.as_str()
                        ));
                        recheck.push(i);
                    }
                    v.timeline = s.timeline;
                    if !s.in_recovery {
                        v.lsn = s.current_lsn;
                        if Some(i) == primary {
                            v.lag_bytes = Some(0);
                            v.lag_seconds = Some(0.0);
                        }
                    } else {
                        v.lsn = s.replay_lsn;
                        v.receive_lsn = s.receive_lsn;
                        v.replay_paused = s.replay_paused;
                        v.last_replay_at = s.last_replay_at;
                        if v.application_name.is_empty() {
                            v.application_name =
                                s.receiver_application_name.clone().unwrap_or_default();
                        }
                        let row = primary_sample.and_then(|ps| {
                            ps.replication.iter().find(|r| {
                                !v.application_name.is_empty()
                                    && r.application_name == v.application_name
                            })
                        });
                        if let Some(r) = row {
                            v.state = r.state.clone();
                            v.sync_state = r.sync_state.clone();
                        }
                        let sender_is_primary = primary
                            .and_then(|p| adm.nodes.get(p.index()))
                            .zip(s.sender.as_ref())
                            .is_some_and(|(p, (h, port))| &p.host == h && p.port == *port);
                        v.streaming_from_primary = row.is_some_and(|r| r.state == "streaming")
                            || (sender_is_primary
                                && s.receiver_status.as_deref() == Some("streaming"));
                        if let (Some(p), Some(r)) = (primary_lsn, s.replay_lsn) {
                            let bytes = p.saturating_sub(r);
                            v.lag_bytes = Some(bytes);
                            v.lag_seconds = Some(if bytes == 0 {
                                0.0
                            } else {
                                let seen = self.history.behind_since(r).map_or(0.0, |t| {
                                    round.at.saturating_duration_since(t).as_secs_f64()
                                });
                                seen.max(row.and_then(|r| r.replay_lag).unwrap_or(0.0))
                            });
                        }
                        if let (Some(a), Some(b)) = (primary_tli, s.timeline)
                            && a != b
                        {
                            v.timeline_mismatch = true;
                            issues.push(format!(
                                "timeline mismatch: standby on timeline {b}, primary on {a}"
                            ));
                        }
                        if primary_sample.is_some() && row.is_none() {
                            issues.push(if v.application_name.is_empty() {
                                format!(
                                    "not found in the primary's pg_stat_replication: set backends[{i}].application_name"
                                )
                            } else {
                                format!(
                                    "no pg_stat_replication row for application_name {:?} on the primary",
                                    v.application_name
                                )
                            });
                        }
                    }
                }
            }
            if !issues.is_empty() {
                v.issue = Some(issues.join("; "));
            }
            let old = &self.snap.nodes[i.index()].repl;
            if old.replay_paused != v.replay_paused && v.replay_paused.is_some() {
                tracing::info!(node = %i, paused = ?v.replay_paused, "standby replay pause state");
            }
            self.snap.nodes[i.index()].repl = v;
        }
        self.settle(&adm, now);
        recheck
    }

    /// Recompute the primary, admissions and weights after any change.
    fn settle(&mut self, adm: &Admission, now: SystemTime) {
        let before = self.snap.primary;
        for (n, s) in self.snap.nodes.iter_mut().zip(&adm.nodes) {
            n.weight = s.weight;
        }
        self.snap.lag_policy = adm.policy;
        self.snap.primary = self.choose_primary();
        for i in NodeId::all(self.snap.nodes.len()) {
            self.try_admit(i, adm, now);
            self.snap.primary = self.choose_primary();
        }
        if self.snap.primary != before {
            tracing::info!(old = ?before, new = ?self.snap.primary, "primary changed");
            if let Some(p) = self.snap.primary {
                self.snap.nodes[p.index()].last_change = now;
            }
        }
        self.watch_primary(now);
        self.recompute_weights();
    }

    /// The in-service node claiming primary that is not a false primary and
    /// not held: the current one if it still qualifies, else the lowest id.
    /// None at all while a failover or switchover is in progress: the
    /// coordinator alone decides the next primary (see `transition.rs`).
    fn choose_primary(&self) -> Option<NodeId> {
        if self.transition.is_some() {
            return None;
        }
        if let Some(e) = &self.external {
            return self.external_primary(e);
        }
        let claims = |i: &NodeId| {
            let n = &self.snap.nodes[i.index()];
            let b = &self.books[i.index()];
            n.status.is_usable() && n.role == Role::Primary && !b.false_primary && b.hold.is_none()
        };
        match self.snap.primary {
            Some(c) if c.index() < self.snap.nodes.len() && claims(&c) => Some(c),
            _ => NodeId::all(self.snap.nodes.len()).find(claims),
        }
    }

    fn try_admit(&mut self, i: NodeId, adm: &Admission, now: SystemTime) {
        let n = &self.snap.nodes[i.index()];
        if n.pg_status != PgStatus::Up {
            return;
        }
        if self.held(i, now) {
            return;
        }
        let n = &self.snap.nodes[i.index()];
        let in_service = n.status.is_usable();
        match n.role {
            Role::Primary => {
                let other = self
                    .snap
                    .primary
                    .filter(|&p| p != i && self.snap.nodes[p.index()].status.is_usable());
                if let Some(p) = other {
                    if !self.books[i.index()].false_primary {
                        self.counts.add(super::events::Event::Fenced);
                        tracing::warn!(
                            node = %i,
                            primary = %p,
                            "node is not in recovery but is not the primary: false primary, kept out of service"
                        );
                    }
                    self.books[i.index()].false_primary = true;
                    self.hold(
                        i,
                        format!("false primary: not in recovery, but node {p} is the primary"),
                        now,
                    );
                } else if self.books[i.index()].false_primary {
                    self.hold(
                        i,
                        "false primary: kept out of service until it is a standby again".into(),
                        now,
                    );
                } else if !in_service {
                    self.admit(i, now);
                }
            }
            Role::Standby => {
                self.books[i.index()].false_primary = false;
                if in_service {
                    return;
                }
                let b = &self.books[i.index()];
                let fresh_streaming = n.repl.streaming_from_primary
                    && matches!((b.sr_seen_at, b.healthy_since), (Some(s), Some(h)) if s >= h);
                if n.status == NodeStatus::Unknown
                    || b.attached
                    || (adm.auto_failback && (!adm.sr_enabled || fresh_streaming))
                {
                    self.books[i.index()].attached = false;
                    self.admit(i, now);
                } else if !adm.auto_failback {
                    self.hold(
                        i,
                        format!("healthy again, but auto_failback is off: stays down until ATTACH NODE {i}"),
                        now,
                    );
                } else {
                    self.hold(
                        i,
                        "healthy again; re-admitted once the primary shows it streaming (auto_failback)"
                            .into(),
                        now,
                    );
                }
            }
            Role::Unknown => {}
        }
    }

    fn admit(&mut self, i: NodeId, now: SystemTime) {
        let n = &mut self.snap.nodes[i.index()];
        tracing::info!(
            node = %i,
            role = n.role.as_str(),
            "node admitted (waiting for traffic)"
        );
        n.status = NodeStatus::Waiting;
        n.held_out = None;
        n.last_change = now;
    }

    fn hold(&mut self, i: NodeId, reason: String, now: SystemTime) {
        let n = &mut self.snap.nodes[i.index()];
        if n.status != NodeStatus::Down || n.held_out.as_deref() != Some(reason.as_str()) {
            tracing::info!(node = %i, %reason, "node kept out of service");
        }
        if n.status != NodeStatus::Down {
            n.status = NodeStatus::Down;
            n.last_change = now;
        }
        n.held_out = Some(reason);
    }

    fn recompute_weights(&mut self) {
        let policy = self.snap.lag_policy;
        let primary = self.snap.primary;
        for n in &mut self.snap.nodes {
            let w = if !n.status.is_usable() {
                0.0
            } else if Some(n.id) == primary {
                n.weight
            } else if n.role == Role::Standby && !n.repl.timeline_mismatch {
                n.weight * policy.factor(n.repl.lag_bytes, n.repl.lag_seconds)
            } else {
                0.0
            };
            if n.role == Role::Standby
                && n.status.is_usable()
                && n.weight > 0.0
                && n.repl.checked_at.is_some()
            {
                if w == 0.0 && n.effective_weight > 0.0 {
                    tracing::info!(node = %n.id, lag_bytes = ?n.repl.lag_bytes, lag_seconds = ?n.repl.lag_seconds, "standby over a delay threshold: no reads");
                } else if w > 0.0 && n.effective_weight == 0.0 {
                    tracing::info!(node = %n.id, "standby takes reads again");
                }
            }
            n.effective_weight = w;
        }
    }
}

#[cfg(test)]
mod tests;
