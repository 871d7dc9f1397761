//! The owner's side of coordination through etcd (`cluster::coordination`):
//! an instance that is not the leader publishes the primary etcd names, and
//! decides nothing itself.
//!
//! # Why a follower never routes writes elsewhere than etcd says
//!
//! While [`External`] is set (coordination on and this instance is not the
//! leader with a live lease), [`Owner::choose_primary`] returns only
//! `External::primary`, and only while this instance's own checks see that
//! node in service, claiming primary, not held, and on the timeline etcd
//! recorded (when the replication check has seen one). [`Owner::watch_primary`]
//! starts no failover: losing the primary publishes `None` (writes wait, then
//! fail with 57P03) until etcd names another one. So:
//!
//! 1. a follower's routing changes only when etcd's state changes, or when
//!    its own checks show the recorded primary is gone (then: no primary);
//! 2. an instance cut off from etcd keeps the last recorded state, so it
//!    keeps writing to the last confirmed primary only while that node
//!    answers as a primary on the same timeline, and never to another node;
//! 3. a node whose timeline is older than the recorded one is never the
//!    published primary (a primary that was failed over and came back).
//!
//! Patroni mode (`cluster::patroni`) is a follower of the same kind whose
//! "etcd state" is Patroni's leader key: it applies the leader's node here
//! once that node answers as a primary, with no timeline recorded.

use std::time::{Instant, SystemTime};

use super::{Admission, Hold, NodeStatus, Owner, PgStatus, Role};
use crate::config::NodeId;

/// The state etcd recorded, as this follower applies it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(in crate::cluster) struct External {
    /// The primary the leader published (`None`: none, e.g. during a failover).
    pub primary: Option<NodeId>,
    /// The highest timeline recorded for the primary.
    pub timeline: Option<u32>,
    /// A failover or switchover is recorded in progress (sessions wait for
    /// it with `failover.client_wait_timeout`).
    pub failover: bool,
}

impl Owner {
    /// The primary etcd recorded, if this instance's own view still
    /// accepts it (rules 1–3 of the module docs).
    pub(super) fn external_primary(&self, e: &External) -> Option<NodeId> {
        let p = e.primary?;
        let n = self.snap.nodes.get(p.index())?;
        let b = &self.books[p.index()];
        let timeline_ok = match (n.repl.timeline, e.timeline) {
            (Some(seen), Some(recorded)) => seen == recorded,
            _ => true,
        };
        let ok = n.status.is_usable() && n.role == Role::Primary && b.hold.is_none() && timeline_ok;
        ok.then_some(p)
    }

    /// Apply the state etcd recorded: the holds, the primary and its
    /// timeline. The leader saw the named primary report not-in-recovery,
    /// so it is taken as a primary now (a health round started earlier must
    /// not undo that); this instance's next checks still confirm it.
    pub(crate) fn apply_external(
        &mut self,
        e: External,
        holds: Vec<Option<Hold>>,
        adm: &Admission,
    ) {
        let now = SystemTime::now();
        for (i, h) in holds.into_iter().enumerate().take(self.books.len()) {
            if self.books[i].hold != h {
                self.books[i].hold = h;
                self.books[i].attached = false;
                if self.books[i].hold.is_none() {
                    // Lifted by the leader (ATTACH NODE): admitted like an
                    // attached node.
                    self.books[i].attached = true;
                }
            }
        }
        if let Some(p) = e.primary
            && let Some(n) = self.snap.nodes.get_mut(p.index())
            && self.books[p.index()].hold.is_none()
            && n.pg_status != PgStatus::Down
        {
            if n.role != Role::Primary {
                tracing::info!(node = %p, "primary recorded in etcd; taken as the primary");
                n.role = Role::Primary;
                n.last_change = now;
            }
            if !n.status.is_usable() && n.pg_status == PgStatus::Up {
                n.status = NodeStatus::Waiting;
                n.held_out = None;
            }
            self.books[p.index()].false_primary = false;
            self.books[p.index()].role_seen_at = Some(Instant::now());
        }
        // A follower runs no transition of its own.
        if self.transition.is_some() {
            self.close_transition(
                super::super::events::Phase::Failed,
                "handed over: another pgpilot leads through etcd".into(),
                now,
            );
        }
        self.external = Some(e);
        self.settle(adm, now);
    }

    /// This instance became the leader: decide locally again, starting
    /// from the primary etcd recorded (losing it starts a failover).
    pub(crate) fn release_external(&mut self, adm: &Admission) {
        let Some(e) = self.external.take() else {
            return;
        };
        if let Some(p) = e.primary {
            self.last_primary = Some(p);
        }
        self.settle(adm, SystemTime::now());
    }

    /// Each node's hold with its reason (what the leader records).
    pub(crate) fn holds_with_reasons(&self) -> Vec<Option<Hold>> {
        self.books.iter().map(|b| b.hold.clone()).collect()
    }

    /// The transition in progress once its promotion was recorded:
    /// (old primary, candidate, kind), for the leader's record in etcd.
    pub(crate) fn promotion_in_progress(&self) -> Option<(Option<NodeId>, NodeId, &'static str)> {
        let t = self.transition.as_ref()?;
        if !t.promoted {
            return None;
        }
        Some((t.old_primary, t.target?, t.kind.as_str()))
    }
}
