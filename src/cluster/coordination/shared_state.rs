//! The cluster state in etcd: what the leader decided, in one key, and
//! how it is written (compare-and-swap, leader's lease checked in the same
//! transaction) and applied by followers.

use std::sync::atomic::Ordering;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::{CoordError, Session, call, unix_micros};
use crate::cluster::state_machine::{Admission, External, Hold};
use crate::cluster::{Cluster, HoldKind};
use crate::config::NodeId;

/// The keys of one cluster.
pub(super) struct Keys {
    root: String,
    /// The state key.
    pub state: String,
    /// The leader key.
    pub leader: String,
    /// Prefix of member keys.
    pub members: String,
    /// Prefix of cancel tags.
    pub tags: String,
    /// Prefix of forwarded admin requests.
    pub requests: String,
    /// Prefix of the leader's outcomes of those requests.
    pub results: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            root: format!("{prefix}/"),
            state: format!("{prefix}/state"),
            leader: format!("{prefix}/leader"),
            members: format!("{prefix}/members/"),
            tags: format!("{prefix}/tags/"),
            requests: format!("{prefix}/requests/"),
            results: format!("{prefix}/results/"),
        }
    }

    /// Everything of this cluster (what is watched).
    pub(super) fn root(&self) -> String {
        self.root.clone()
    }
}

/// A held node as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedHold {
    /// Node id.
    pub node: usize,
    /// `detached`, `fenced` or `cannot_follow`.
    pub kind: String,
    /// Shown in `SHOW PGPILOT_NODES`.
    pub reason: String,
}

/// A promotion recorded before it was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// `failover` or `switchover`.
    pub kind: String,
    /// The primary being replaced.
    pub old_primary: Option<usize>,
    /// The standby being promoted.
    pub candidate: usize,
}

/// The whole decided state, one JSON value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedState {
    /// Increases with every change of primary and every recorded promotion.
    pub epoch: u64,
    /// The primary writes go to (`None`: none in service).
    pub primary: Option<usize>,
    /// The highest timeline recorded for a primary.
    pub timeline: Option<u32>,
    /// Held nodes.
    pub holds: Vec<SharedHold>,
    /// The promotion in progress, if any.
    pub failover: Option<FailoverRecord>,
    /// Who wrote it.
    pub leader: String,
}

fn kind_str(k: HoldKind) -> &'static str {
    match k {
        HoldKind::Detached => "detached",
        HoldKind::Fenced => "fenced",
        HoldKind::CannotFollow => "cannot_follow",
        HoldKind::Diverged => "diverged",
    }
}

fn kind_from(s: &str) -> HoldKind {
    match s {
        "detached" => HoldKind::Detached,
        "cannot_follow" => HoldKind::CannotFollow,
        "diverged" => HoldKind::Diverged,
        // Unknown kinds are the strictest: only ATTACH NODE lifts them.
        _ => HoldKind::Fenced,
    }
}

impl SharedState {
    /// The leader's current decisions, `prev` being the last recorded
    /// state (the epoch and the timeline only grow).
    pub(super) fn current(cluster: &Cluster, prev: &SharedState, leader: &str) -> SharedState {
        let snap = cluster.snapshot();
        let (holds, promotion) = {
            let o = cluster.lock();
            (o.holds_with_reasons(), o.promotion_in_progress())
        };
        let primary = snap.primary;
        let seen_tl = primary
            .and_then(|p| snap.nodes.get(p.index()))
            .and_then(|n| n.repl.timeline);
        let primary = primary.map(NodeId::index);
        let timeline = match (prev.timeline, seen_tl) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let failover = promotion.map(|(old, candidate, kind)| FailoverRecord {
            kind: kind.to_string(),
            old_primary: old.map(NodeId::index),
            candidate: candidate.index(),
        });
        let holds = holds
            .into_iter()
            .enumerate()
            .filter_map(|(node, h)| {
                h.map(|h| SharedHold {
                    node,
                    kind: kind_str(h.kind).to_string(),
                    reason: h.reason,
                })
            })
            .collect();
        let mut next = SharedState {
            epoch: prev.epoch,
            primary,
            timeline,
            holds,
            failover,
            leader: leader.to_string(),
        };
        let new_primary = primary.is_some() && primary != prev.primary;
        let new_record = next.failover.is_some() && next.failover != prev.failover;
        if new_primary || new_record {
            next.epoch += 1;
        }
        next
    }

    /// The same decisions (ignoring who wrote them).
    fn same(&self, other: &SharedState) -> bool {
        self.epoch == other.epoch
            && self.primary == other.primary
            && self.timeline == other.timeline
            && self.holds == other.holds
            && self.failover == other.failover
    }

    /// Per node, the hold recorded for it.
    pub(super) fn holds_for(&self, nodes: usize) -> Vec<Option<Hold>> {
        let mut v = vec![None; nodes];
        for h in &self.holds {
            if let Some(slot) = v.get_mut(h.node) {
                *slot = Some(Hold {
                    kind: kind_from(&h.kind),
                    reason: h.reason.clone(),
                });
            }
        }
        v
    }

    /// What a follower's owner applies.
    pub(super) fn external(&self) -> External {
        External {
            primary: self.primary.map(NodeId::new),
            timeline: self.timeline,
            failover: self.failover.is_some(),
        }
    }
}

impl Session {
    /// Read the state key.
    pub(super) async fn read_state(&mut self) -> Result<(), CoordError> {
        let r = call(&self.handle, self.client.get(self.keys.state.clone(), None)).await?;
        match r.kvs().first() {
            Some(kv) => self.state_changed(kv),
            None => {
                self.state = SharedState::default();
                self.state_rev = 0;
            }
        }
        Ok(())
    }

    /// A new value of the state key: remember it; a follower applies it.
    pub(super) fn state_changed(&mut self, kv: &etcd_client::KeyValue) {
        let parsed: SharedState = match serde_json::from_slice(kv.value()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "etcd coordination: unreadable state; ignored");
                return;
            }
        };
        self.state_rev = kv.mod_revision();
        self.state = parsed;
        if !self.handle.leader.load(Ordering::Acquire) {
            self.apply(self.state.clone());
            self.note_routed();
        }
    }

    /// Apply `state` to this instance's cluster as a follower.
    pub(super) fn apply(&self, state: SharedState) {
        let cfg = self.config.load();
        let adm = Admission::from(&**cfg);
        let holds = state.holds_for(cfg.backends.len());
        let epoch = state.epoch;
        tracing::debug!(epoch, primary = ?state.primary, "applying the state recorded in etcd");
        self.cluster
            .update(|o| o.apply_external(state.external(), holds, &adm));
        self.handle.applied_epoch.store(epoch, Ordering::Relaxed);
    }

    /// The leader writes its current decisions if they changed. `Ok(false)`:
    /// etcd refused (the state moved on or this instance no longer holds the
    /// leader key); this instance then steps down and follows what etcd has.
    pub(super) async fn publish(&mut self) -> Result<bool, CoordError> {
        let next = SharedState::current(&self.cluster, &self.state, &self.handle.name);
        if next.same(&self.state) && self.state_rev != 0 {
            return Ok(true);
        }
        let value = serde_json::to_vec(&next).expect("the state serialises");
        // The decision is taken when its record is sent (etcd's commit time
        // is part of the delay until followers switch).
        let sent_at = unix_micros();
        let txn = Txn::new()
            .when([
                Compare::mod_revision(self.keys.state.clone(), CompareOp::Equal, self.state_rev),
                Compare::lease(self.keys.leader.clone(), CompareOp::Equal, self.lease),
            ])
            .and_then([TxnOp::put(self.keys.state.clone(), value, None)])
            .or_else([
                TxnOp::get(self.keys.state.clone(), None),
                TxnOp::get(self.keys.leader.clone(), None),
            ]);
        let r = call(&self.handle, self.client.txn(txn)).await?;
        if r.succeeded() {
            let rev = r
                .header()
                .map(|h| h.revision())
                .unwrap_or(self.state_rev + 1);
            tracing::info!(epoch = next.epoch, primary = ?next.primary, failover = ?next.failover, "state written to etcd");
            if next.epoch != self.state.epoch {
                self.handle.recorded_at_us.store(sent_at, Ordering::Relaxed);
            }
            self.state = next;
            self.state_rev = rev;
            self.handle
                .applied_epoch
                .store(self.state.epoch, Ordering::Relaxed);
            self.note_routed();
            return Ok(true);
        }
        tracing::warn!(
            "etcd refused the state write: another pgpilot leads or wrote first; following etcd"
        );
        for op in r.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
                && kv.key() == self.keys.state.as_bytes()
            {
                self.state_rev = kv.mod_revision();
                if let Ok(s) = serde_json::from_slice(kv.value()) {
                    self.state = s;
                }
            }
        }
        self.step_down();
        Ok(false)
    }

    /// Put `value` under `key` bound to this session's lease; the revision
    /// etcd wrote it at.
    pub(super) async fn put_leased(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> Result<i64, CoordError> {
        let opts = PutOptions::new().with_lease(self.lease);
        let r = call(&self.handle, self.client.put(key, value, Some(opts))).await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Every key under `prefix`.
    pub(super) async fn list(
        &mut self,
        prefix: String,
    ) -> Result<Vec<etcd_client::KeyValue>, CoordError> {
        let r = call(
            &self.handle,
            self.client
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        Ok(r.kvs().to_vec())
    }
}
