//! Failover and switchover as state: when a transition starts, what it may
//! change, and the holds (detached, fenced, cannot follow) that keep nodes
//! out of service. The I/O (probes, promotion, re-pointing) is in
//! `failover.rs`, `promote.rs`, `follow.rs` and `switchover.rs`; they report
//! each step here, tagged with the transition's id.
//!
//! # Why writes never reach two primaries
//!
//! Sessions send writes to `snapshot.primary` only (and finish an open
//! transaction where it began); `None` makes them wait. So the invariant is
//! about what this owner publishes, and every publication goes through
//! [`Owner::choose_primary`] or [`Owner::finish`], under the owner's lock:
//!
//! 1. `choose_primary` returns `None` while a transition is in progress, and
//!    never returns a node under a hold or marked false primary. At most one
//!    node is ever published (it is one `Option`).
//! 2. A failover starts in the same update that loses the primary, so the
//!    snapshot that drops the old primary is also the one that says "failover
//!    in progress" — no snapshot in between can name another node.
//! 3. The old primary is fenced ([`HoldKind::Fenced`]) in the update that
//!    records the promotion ([`Owner::promotion_started`]), which the
//!    coordinator makes *before* it sends `pg_promote`, touches the trigger
//!    file or runs the command. From then on it can come back only through
//!    `ATTACH NODE`, which refuses while it claims to be a primary next to
//!    another one. Before that point nothing was promoted, so the old
//!    primary returning simply cancels the failover
//!    ([`Owner::watch_primary`]).
//! 4. `finish` publishes the new primary only after the coordinator saw
//!    exactly one non-held node report `pg_is_in_recovery() = false`, and
//!    only if the transition is still the one the coordinator started (ids);
//!    any other node claiming primary afterwards is a false primary (held).
//! 5. A switchover publishes `None` first (new writes wait), drains open
//!    transactions on the old primary (terminating what is left after the
//!    timeout) and makes it read-only before the target is promoted; a
//!    session that routed a write just before the switch reaches the old
//!    primary either before the drain check (waited for, and replicated
//!    before promotion) or after it (refused: read-only).
//!
//! Whatever order health rounds, replication rounds, session reports,
//! admin commands and coordinator steps arrive in, each is applied under the
//! lock and re-derives the published primary from these rules, so no
//! interleaving publishes two primaries or a fenced one. What pgpilot cannot
//! do is stop a primary it cannot reach: a client connected to the old
//! primary *directly* can still write there (fence it at the network or with
//! STONITH if that matters).

use std::time::{Instant, SystemTime};

use super::super::error::{CommandError, StepError};
use super::super::events::{Event, FailoverReport, Phase, TransitionKind, TransitionStatus};
use super::{Admission, Hold, HoldKind, NodeStatus, Owner, PgStatus, Role};

use crate::config::NodeId;

impl Owner {
    /// Whether node `i` is held (and keep it out of service if so). A
    /// `CannotFollow` hold is lifted by fresh evidence that the standby
    /// streams from the primary on its timeline.
    pub(super) fn held(&mut self, i: NodeId, now: SystemTime) -> bool {
        let Some(h) = self.books[i.index()].hold.clone() else {
            return false;
        };
        let n = &self.snap.nodes[i.index()];
        if h.kind == HoldKind::CannotFollow
            && n.role == Role::Standby
            && n.repl.streaming_from_primary
            && !n.repl.timeline_mismatch
            && self.snap.primary.is_some()
        {
            tracing::info!(
                node = %i,
                "standby streams from the primary again; hold lifted"
            );
            self.books[i.index()].hold = None;
            return false;
        }
        let reason = match (h.kind, n.role, self.snap.primary) {
            (HoldKind::Fenced, Role::Primary, Some(p)) if p != i => format!(
                "false primary: not in recovery, but node {p} is the primary; {}",
                h.reason
            ),
            (HoldKind::Fenced, Role::Primary, _) => format!("false primary; {}", h.reason),
            _ => h.reason,
        };
        self.hold(i, reason, now);
        true
    }

    /// After every change: remember the chosen primary; when it is lost,
    /// start a failover (or say why not); cancel a failover whose old
    /// primary is back before anything was promoted.
    pub(super) fn watch_primary(&mut self, now: SystemTime) {
        if let Some(p) = self.snap.primary {
            self.last_primary = Some(p);
            self.blocked = None;
            return;
        }
        if self.external.is_some() {
            // Another pgpilot leads: it alone starts failovers (shared.rs).
            return;
        }
        if let Some(t) = &self.transition {
            let Some(old) = t.old_primary else { return };
            let back = {
                let n = &self.snap.nodes[old.index()];
                n.status.is_usable()
                    && n.pg_status == PgStatus::Up
                    && n.role == Role::Primary
                    && self.books[old.index()].hold.is_none()
            };
            let cancellable = t.kind == TransitionKind::Failover
                && !t.promoted
                && !t.search_only
                && matches!(t.phase, Phase::Detected | Phase::Waiting);
            if back && cancellable {
                let msg = format!(
                    "cancelled: node {old} answers as a primary again before anything was promoted"
                );
                tracing::warn!(node = %old, "{msg}");
                self.close_transition(Phase::Failed, msg, now);
                self.counts.add(Event::FailoverFailed);
                self.snap.primary = self.choose_primary();
                if let Some(p) = self.snap.primary {
                    self.last_primary = Some(p);
                }
            }
            return;
        }
        let Some(p) = self.last_primary else { return };
        let n = &self.snap.nodes[p.index()];
        if n.pg_status == PgStatus::Up && n.role == Role::Standby {
            let reason = format!(
                "node {p} now reports pg_is_in_recovery() = true: demoted by someone else; searching for the new primary"
            );
            self.begin_failover(p, true, reason, now);
        } else if n.status == NodeStatus::Down && n.pg_status == PgStatus::Down {
            let err = n.last_error.clone().unwrap_or_default();
            if self.books[p.index()].failure_alive {
                let reason = format!(
                    "node {p} answers but refuses health checks ({err}); a running primary is not failed over automatically (PROMOTE NODE n forces a switchover)"
                );
                if self.blocked.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(node = %p, "{reason}");
                }
                self.blocked = Some(reason);
            } else {
                self.begin_failover(p, false, format!("primary node {p} failed: {err}"), now);
            }
        }
    }

    fn begin_failover(&mut self, old: NodeId, search_only: bool, reason: String, now: SystemTime) {
        tracing::warn!(node = %old, %reason, "failover started");
        self.start_transition(
            TransitionKind::Failover,
            old,
            None,
            search_only,
            reason,
            now,
        );
        self.counts.add(Event::FailoverStarted);
    }

    fn start_transition(
        &mut self,
        kind: TransitionKind,
        old: NodeId,
        target: Option<NodeId>,
        search_only: bool,
        detail: String,
        now: SystemTime,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.blocked = None;
        self.transition = Some(TransitionStatus {
            id,
            kind,
            phase: if kind == TransitionKind::Switchover {
                Phase::Draining
            } else {
                Phase::Detected
            },
            old_primary: Some(old),
            target,
            forced: None,
            search_only,
            promoted: false,
            started: now,
            started_at: Instant::now(),
            finished: None,
            duration: None,
            detail,
            attempted_at: None,
        });
        id
    }

    /// End the transition in progress (it moves to `last_transition`).
    pub(super) fn close_transition(&mut self, phase: Phase, detail: String, now: SystemTime) {
        if let Some(mut t) = self.transition.take() {
            t.phase = phase;
            t.detail = detail;
            t.finished = Some(now);
            t.duration = Some(t.started_at.elapsed());
            self.last_transition = Some(t);
        }
    }

    /// The transition `id`, if it is still the one in progress.
    fn current(&mut self, id: u64) -> Result<&mut TransitionStatus, StepError> {
        match self.transition.as_mut() {
            Some(t) if t.id == id => Ok(t),
            _ => Err(StepError::Superseded { id }),
        }
    }

    /// A failover step is due: a new one, or a waiting one whose retry time
    /// came. `PROMOTE NODE n` clears the time of the last attempt, so the
    /// forced candidate is tried at once; if that attempt fails, the next
    /// waits `retry` like any other (no busy loop on a node that refuses).
    pub(crate) fn transition_due(&self, retry: std::time::Duration) -> Option<TransitionStatus> {
        let t = self.transition.as_ref()?;
        let due = t.kind == TransitionKind::Failover
            && match t.phase {
                Phase::Detected => true,
                Phase::Waiting => t.attempted_at.is_none_or(|a| a.elapsed() >= retry),
                _ => false,
            };
        due.then(|| t.clone())
    }

    /// The attempt of waiting failover `id` that tried the forced candidate
    /// `tried` (`None`: the automatic choice) found none: wait, with `why`.
    /// If an operator forced another candidate while that attempt ran, the
    /// next attempt is due at once (for that candidate); otherwise it waits
    /// the retry time.
    pub(crate) fn candidate_refused(
        &mut self,
        id: u64,
        tried: Option<NodeId>,
        why: String,
    ) -> Result<(), StepError> {
        let t = self.current(id)?;
        t.phase = Phase::Waiting;
        t.detail = why;
        t.attempted_at = (t.forced == tried).then(Instant::now);
        Ok(())
    }

    /// The last look before promotion found the old primary `node` alive
    /// (it answered, with `error`: too many connections, authentication …):
    /// an answering primary is never failed over, so failover `id` ends
    /// before anything is promoted. `node` stays the remembered primary,
    /// down until a health round admits it again, and is failed over if
    /// a later round finds it unreachable.
    pub(crate) fn primary_answers(
        &mut self,
        id: u64,
        node: NodeId,
        error: String,
        adm: &Admission,
    ) -> Result<(), StepError> {
        let now = SystemTime::now();
        let t = self.current(id)?;
        if t.promoted {
            return Err(StepError::AlreadyPromoted { id });
        }
        let msg = format!(
            "cancelled: node {node} answers ({error}); a running primary is not failed over, nothing was promoted"
        );
        tracing::warn!(%node, "{msg}");
        self.close_transition(Phase::Failed, msg, now);
        self.counts.add(Event::FailoverFailed);
        if let Some(n) = self.snap.nodes.get_mut(node.index()) {
            n.last_error = Some(error);
            self.books[node.index()].failure_alive = true;
            self.last_primary = Some(node);
        }
        self.settle(adm, now);
        Ok(())
    }

    /// Record the phase and detail of transition `id`.
    pub(crate) fn set_phase(
        &mut self,
        id: u64,
        phase: Phase,
        detail: String,
    ) -> Result<(), StepError> {
        let t = self.current(id)?;
        t.phase = phase;
        t.detail = detail;
        t.attempted_at = Some(Instant::now());
        Ok(())
    }

    /// The session-error fast path confirmed that the chosen primary cannot be
    /// reached: declare it down now (a failover starts in the same update).
    pub(crate) fn primary_unreachable(&mut self, node: NodeId, reason: String, adm: &Admission) {
        if self.snap.primary != Some(node) {
            return;
        }
        let now = SystemTime::now();
        let n = &mut self.snap.nodes[node.index()];
        n.pg_status = PgStatus::Down;
        n.status = NodeStatus::Down;
        n.last_change = now;
        n.last_error = Some(reason);
        let b = &mut self.books[node.index()];
        b.failure_alive = false;
        b.healthy_since = None;
        self.settle(adm, now);
    }

    /// The coordinator asked `node` directly: record its role now, so older
    /// health rounds do not overwrite it.
    pub(crate) fn observe_role(&mut self, node: NodeId, in_recovery: bool) {
        let Some(n) = self.snap.nodes.get_mut(node.index()) else {
            return;
        };
        let role = if in_recovery {
            Role::Standby
        } else {
            Role::Primary
        };
        if n.role != role {
            tracing::info!(
                %node,
                to = role.as_str(),
                "node role changed (seen by the failover coordinator)"
            );
            n.role = role;
            n.last_change = SystemTime::now();
        }
        if n.pg_status != PgStatus::Up {
            self.books[node.index()].healthy_since = Some(Instant::now());
        }
        n.pg_status = PgStatus::Up;
        self.books[node.index()].role_seen_at = Some(Instant::now());
    }

    /// The point of no return: `candidate` is about to be promoted. Fences
    /// the old primary first (rule 3 of the module docs).
    pub(crate) fn promotion_started(
        &mut self,
        id: u64,
        candidate: NodeId,
    ) -> Result<(), StepError> {
        let now = SystemTime::now();
        let t = self.current(id)?;
        t.promoted = true;
        t.target = Some(candidate);
        t.phase = Phase::Promoting;
        t.detail = format!("promoting node {candidate}");
        let (kind, old) = (t.kind, t.old_primary);
        if let Some(old) = old {
            let reason = format!(
                "fenced: old primary, replaced by node {candidate} in a {}; rebuild it as a standby of the new primary (pg_rewind or pg_basebackup), then ATTACH NODE {old}",
                kind.as_str()
            );
            tracing::warn!(node = %old, "{reason}");
            self.books[old.index()].hold = Some(Hold {
                kind: HoldKind::Fenced,
                reason: reason.clone(),
            });
            self.books[old.index()].attached = false;
            self.hold(old, reason, now);
            self.counts.add(Event::Fenced);
        }
        Ok(())
    }

    /// Publish `new` as the primary: the coordinator saw it, and no other
    /// non-held node, report not-in-recovery (rule 4).
    pub(crate) fn finish(
        &mut self,
        id: u64,
        new: NodeId,
        adm: &Admission,
    ) -> Result<(), StepError> {
        let now = SystemTime::now();
        if self.books[new.index()].hold.is_some() {
            return Err(StepError::Held { node: new });
        }
        let t = self.current(id)?;
        t.target = Some(new);
        let kind = t.kind;
        let detail = format!("node {new} is the primary");
        self.close_transition(Phase::Done, detail, now);
        self.counts.add(match kind {
            TransitionKind::Failover => Event::FailoverFinished,
            TransitionKind::Switchover => Event::SwitchoverFinished,
        });
        let n = &mut self.snap.nodes[new.index()];
        n.role = Role::Primary;
        n.pg_status = PgStatus::Up;
        n.last_change = now;
        if !n.status.is_usable() {
            n.status = NodeStatus::Waiting;
            n.held_out = None;
        }
        let b = &mut self.books[new.index()];
        b.false_primary = false;
        b.role_seen_at = Some(Instant::now());
        self.snap.primary = Some(new);
        self.last_primary = Some(new);
        tracing::warn!(node = %new, kind = kind.as_str(), "new primary in service");
        self.settle(adm, now);
        Ok(())
    }

    /// Transition `id` gives up. A failover forgets the old primary (no
    /// retry loop; pgpilot keeps watching: a node that reports primary is
    /// admitted by the usual rules); an aborted switchover leaves the old
    /// primary as it was (chosen again if healthy, failed over if not).
    pub(crate) fn fail(
        &mut self,
        id: u64,
        reason: String,
        adm: &Admission,
    ) -> Result<(), StepError> {
        let now = SystemTime::now();
        let kind = self.current(id)?.kind;
        tracing::error!(kind = kind.as_str(), %reason, "transition failed");
        self.close_transition(Phase::Failed, reason, now);
        match kind {
            TransitionKind::Failover => {
                self.counts.add(Event::FailoverFailed);
                self.last_primary = None;
            }
            TransitionKind::Switchover => self.counts.add(Event::SwitchoverFailed),
        }
        self.settle(adm, now);
        Ok(())
    }

    /// Start a switchover from the current primary to `target`: publishes no
    /// primary (new writes wait) until [`Owner::finish`] or [`Owner::fail`].
    pub(crate) fn begin_switchover(
        &mut self,
        target: NodeId,
        adm: &Admission,
    ) -> Result<(u64, NodeId), CommandError> {
        let now = SystemTime::now();
        if let Some(t) = &self.transition {
            return Err(CommandError::Busy { kind: t.kind });
        }
        let old = self.snap.primary.ok_or(CommandError::NoPrimary)?;
        let detail = format!("switchover from node {old} to node {target}: holding new writes");
        tracing::warn!(%old, %target, "switchover started");
        let id = self.start_transition(
            TransitionKind::Switchover,
            old,
            Some(target),
            false,
            detail,
            now,
        );
        self.counts.add(Event::SwitchoverStarted);
        self.settle(adm, now);
        Ok((id, old))
    }

    /// `PROMOTE NODE n` while a failover waits for a candidate: use `n`.
    pub(crate) fn force_candidate(&mut self, node: NodeId) -> Result<(), CommandError> {
        match self.transition.as_mut() {
            Some(t)
                if t.kind == TransitionKind::Failover
                    && !t.promoted
                    && !t.search_only
                    && matches!(t.phase, Phase::Waiting | Phase::Detected) =>
            {
                t.forced = Some(node);
                // Tried at once, not at the next retry time.
                t.attempted_at = None;
                Ok(())
            }
            Some(t) => Err(CommandError::CandidateTooLate {
                kind: t.kind,
                phase: t.phase,
            }),
            None => Err(CommandError::NoFailoverWaiting),
        }
    }

    /// A standby could not follow the new primary: hold it with `reason`.
    pub(crate) fn cannot_follow(&mut self, node: NodeId, reason: String) {
        let now = SystemTime::now();
        tracing::error!(%node, %reason, "standby cannot follow the new primary");
        self.books[node.index()].hold = Some(Hold {
            kind: HoldKind::CannotFollow,
            reason: reason.clone(),
        });
        self.hold(node, reason, now);
        self.counts.add(Event::FollowFailed);
        self.recompute_weights();
    }

    /// Count an event the coordinator observed.
    pub(crate) fn count(&mut self, e: Event) {
        self.counts.add(e);
    }

    /// `ATTACH NODE n`: lift any hold, forget a false-primary mark and admit
    /// the node as a standby without waiting for streaming evidence.
    pub(crate) fn attach(&mut self, node: NodeId, adm: &Admission) -> Result<String, CommandError> {
        let now = SystemTime::now();
        let n = self
            .snap
            .nodes
            .get(node.index())
            .ok_or(CommandError::NoSuchNode { node })?;
        if let Some(t) = &self.transition
            && (t.old_primary == Some(node) || t.target == Some(node))
        {
            return Err(CommandError::PartOfTransition { node, kind: t.kind });
        }
        if let Some(p) = self.snap.primary
            && p != node
            && n.pg_status == PgStatus::Up
            && n.role == Role::Primary
        {
            return Err(CommandError::SecondPrimary { node, primary: p });
        }
        let b = &mut self.books[node.index()];
        let lifted = b.hold.take();
        b.false_primary = false;
        b.attached = true;
        self.counts.add(Event::Attach);
        tracing::warn!(%node, lifted = ?lifted.map(|h| h.reason), "node attached by operator");
        self.settle(adm, now);
        let n = &self.snap.nodes[node.index()];
        Ok(if n.status.is_usable() {
            format!("node {node} attached: in service as {}", n.role.as_str())
        } else if n.pg_status != PgStatus::Up {
            format!("node {node} attached: it takes traffic once a health check reaches it")
        } else {
            format!(
                "node {node} attached, not yet in service: {}",
                n.held_out.clone().unwrap_or_default()
            )
        })
    }

    /// `DETACH NODE n`: keep a standby out of service until `ATTACH NODE n`.
    pub(crate) fn detach(&mut self, node: NodeId, adm: &Admission) -> Result<String, CommandError> {
        let now = SystemTime::now();
        if node.index() >= self.snap.nodes.len() {
            return Err(CommandError::NoSuchNode { node });
        }
        if self.snap.primary == Some(node) {
            return Err(CommandError::DetachPrimary { node });
        }
        if let Some(t) = &self.transition
            && (t.old_primary == Some(node) || t.target == Some(node))
        {
            return Err(CommandError::PartOfTransition { node, kind: t.kind });
        }
        let reason = format!("detached by operator; ATTACH NODE {node} brings it back");
        let b = &mut self.books[node.index()];
        b.attached = false;
        b.hold = Some(Hold {
            kind: HoldKind::Detached,
            reason: reason.clone(),
        });
        self.hold(node, reason, now);
        self.counts.add(Event::Detach);
        tracing::warn!(%node, "node detached by operator");
        self.settle(adm, now);
        Ok(format!(
            "node {node} detached: no traffic until ATTACH NODE {node}"
        ))
    }

    /// Whether a hold keeps `node` out (the coordinator skips such nodes).
    pub(crate) fn is_held(&self, node: NodeId) -> bool {
        self.books
            .get(node.index())
            .is_some_and(|b| b.hold.is_some())
    }

    /// Each node's hold, by node id (`None`: not held).
    pub(crate) fn holds(&self) -> Vec<Option<HoldKind>> {
        self.books
            .iter()
            .map(|b| b.hold.as_ref().map(|h| h.kind))
            .collect()
    }

    /// What `SHOW PGPILOT_FAILOVER` and metrics show.
    pub(crate) fn report(&self) -> FailoverReport {
        FailoverReport {
            current: self.transition.clone(),
            last: self.last_transition.clone(),
            blocked: self.blocked.clone(),
            counts: self.counts.clone(),
        }
    }

    /// Whether a failover or switchover is in progress.
    pub(crate) fn in_transition(&self) -> bool {
        self.transition.is_some() || self.external.as_ref().is_some_and(|e| e.failover)
    }
}
