//! What failovers and switchovers report: the status of the current (or
//! last) transition, shown by `SHOW PGPILOT_FAILOVER` and polled by
//! `pgpilot promote`, and event counters exported as
//! `pgpilot_failover_events_total{event}`.

use std::time::{Duration, Instant, SystemTime};

use crate::config::NodeId;

/// A primary change pgpilot drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionKind {
    /// The primary failed; a standby replaces it.
    Failover,
    /// `PROMOTE NODE n` with a healthy primary: a planned switchover.
    Switchover,
}

impl TransitionKind {
    /// `failover` or `switchover`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionKind::Failover => "failover",
            TransitionKind::Switchover => "switchover",
        }
    }
}

/// Where a transition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The primary was declared failed; choosing a candidate.
    Detected,
    /// No acceptable candidate yet (all lag too much, none up, or
    /// `max_lag_bytes` refused the best one): retried every second; the old
    /// primary returning cancels the failover.
    Waiting,
    /// Switchover: new writes are held; waiting for in-flight transactions
    /// on the old primary.
    Draining,
    /// Switchover: waiting for the target to replay the old primary's WAL.
    CatchingUp,
    /// The candidate is being promoted (the old primary is fenced from here on).
    Promoting,
    /// Waiting for exactly one node to report not-in-recovery.
    Searching,
    /// Finished: a new primary takes writes.
    Done,
    /// Gave up (see the detail); pgpilot keeps watching the nodes.
    Failed,
}

impl Phase {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Detected => "detected",
            Phase::Waiting => "waiting",
            Phase::Draining => "draining",
            Phase::CatchingUp => "catching_up",
            Phase::Promoting => "promoting",
            Phase::Searching => "searching",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

/// One transition, as the cluster owner tracks it.
#[derive(Debug, Clone)]
pub struct TransitionStatus {
    /// Identifies the transition: every step the coordinator reports carries
    /// it, so a step of a cancelled transition cannot change a newer one.
    pub(crate) id: u64,
    /// Failover or switchover.
    pub kind: TransitionKind,
    /// Current phase.
    pub phase: Phase,
    /// The primary being replaced.
    pub old_primary: Option<NodeId>,
    /// The node being promoted (candidate), then the new primary.
    pub target: Option<NodeId>,
    /// A node an operator chose with `PROMOTE NODE` while the failover
    /// waited: promoted without the lag check.
    pub(crate) forced: Option<NodeId>,
    /// The old primary was demoted or replaced by someone else: no
    /// promotion, only the search for the new primary.
    pub(crate) search_only: bool,
    /// A promotion was attempted: the old primary is fenced and the
    /// failover can no longer be cancelled by its return.
    pub(crate) promoted: bool,
    /// When it started (wall clock, for display).
    pub(crate) started: SystemTime,
    /// When it started (for durations).
    pub(crate) started_at: Instant,
    /// When it ended.
    pub(crate) finished: Option<SystemTime>,
    /// From start to the new primary being published.
    pub(crate) duration: Option<Duration>,
    /// The latest step or the reason it waits / failed.
    pub detail: String,
    /// When the coordinator last tried this phase (Waiting retries).
    pub(crate) attempted_at: Option<Instant>,
}

/// Events counted for metrics (`pgpilot_failover_events_total{event}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A failover started (primary declared failed).
    FailoverStarted,
    /// A failover finished with a new primary.
    FailoverFinished,
    /// A failover gave up or was cancelled.
    FailoverFailed,
    /// A switchover started.
    SwitchoverStarted,
    /// A switchover finished.
    SwitchoverFinished,
    /// A switchover was aborted.
    SwitchoverFailed,
    /// A candidate was refused (lag) or none was available.
    CandidateRefused,
    /// A promotion was attempted and reported success.
    Promotion,
    /// A promotion step failed (the search for a primary still runs).
    PromotionFailed,
    /// A standby was re-pointed at the new primary and streams from it.
    Follow,
    /// A standby could not follow the new primary.
    FollowFailed,
    /// A node was fenced (old primary, or a false primary).
    Fenced,
    /// `ATTACH NODE`.
    Attach,
    /// `DETACH NODE`.
    Detach,
}

/// Every event, in counter order.
pub(crate) const EVENTS: [Event; 14] = [
    Event::FailoverStarted,
    Event::FailoverFinished,
    Event::FailoverFailed,
    Event::SwitchoverStarted,
    Event::SwitchoverFinished,
    Event::SwitchoverFailed,
    Event::CandidateRefused,
    Event::Promotion,
    Event::PromotionFailed,
    Event::Follow,
    Event::FollowFailed,
    Event::Fenced,
    Event::Attach,
    Event::Detach,
];

impl Event {
    /// The `event` label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Event::FailoverStarted => "failover_started",
            Event::FailoverFinished => "failover_finished",
            Event::FailoverFailed => "failover_failed",
            Event::SwitchoverStarted => "switchover_started",
            Event::SwitchoverFinished => "switchover_finished",
            Event::SwitchoverFailed => "switchover_failed",
            Event::CandidateRefused => "candidate_refused",
            Event::Promotion => "promotion",
            Event::PromotionFailed => "promotion_failed",
            Event::Follow => "follow",
            Event::FollowFailed => "follow_failed",
            Event::Fenced => "fenced",
            Event::Attach => "attach",
            Event::Detach => "detach",
        }
    }

    fn index(self) -> usize {
        EVENTS.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Counts per event.
#[derive(Debug, Clone, Default)]
pub struct EventCounts([u64; EVENTS.len()]);

impl EventCounts {
    /// Count one.
    pub(crate) fn add(&mut self, e: Event) {
        self.0[e.index()] += 1;
    }

    /// The count of `e`.
    pub fn get(&self, e: Event) -> u64 {
        self.0[e.index()]
    }

    /// (label, count) for every event.
    pub(crate) fn all(&self) -> Vec<(&'static str, u64)> {
        EVENTS.iter().map(|e| (e.as_str(), self.get(*e))).collect()
    }
}

/// What `SHOW PGPILOT_FAILOVER` and metrics read.
#[derive(Debug, Clone, Default)]
pub struct FailoverReport {
    /// The transition in progress, if any.
    pub current: Option<TransitionStatus>,
    /// The last finished transition.
    pub last: Option<TransitionStatus>,
    /// Why the lost primary is not being failed over (it answers with an
    /// error: a running primary is never replaced automatically).
    pub blocked: Option<String>,
    /// Event counters.
    pub counts: EventCounts,
}
