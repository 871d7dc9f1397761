//! Read-your-writes for one session: may this standby serve the session's next
//! read without showing it the past?
//!
//! The session keeps the WAL position its reads must see: its own last commit
//! (`session` mode, learned lazily — only when a read next wants a standby, so
//! write-only traffic pays nothing), the proxy-wide position of every
//! acknowledged write (`global` mode), and any `SET pgpilot.min_lsn` token. A
//! standby that has replayed it serves the read; otherwise another standby that
//! has, or a short wait (`routing.consistency_wait`), or the primary. The
//! positions come from [`crate::consistency`].

use super::Session;
use super::route::Step;
use crate::cluster::ClusterSnapshot;
use crate::config::{ConsistencyMode, NodeId};
use crate::router::chooser;

/// Per-session read-your-writes state.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadYourWrites {
    /// Position the session's reads must see (its commits and tokens so far).
    pub(crate) read_lsn: u64,
    /// `SET pgpilot.min_lsn`.
    pub(crate) min_lsn: u64,
    /// The session's last commit position, as far as known (`SHOW pgpilot.last_commit_lsn`).
    pub(crate) last_commit_lsn: u64,
    /// A write was acknowledged whose position is not known yet.
    pub(crate) lsn_unknown: bool,
    /// A write was sent and not yet acknowledged (its transaction is open).
    pub(crate) write_pending: bool,
    /// `global` mode: a primary position fetched for the request being routed.
    pub(crate) request_lsn: Option<u64>,
    /// The request being routed waits for replay until then.
    pub(crate) replay_deadline: Option<tokio::time::Instant>,
    /// The request being routed goes to the primary (waiting did not help).
    pub(crate) to_primary_once: bool,
}

impl Session {
    /// The node a read decided for `node` (a standby) should run on, given what
    /// the session must see: `node`, another standby that is caught up, or the
    /// primary — or a step to learn a position or wait for replay first.
    pub(super) fn read_your_writes_node(
        &mut self,
        node: NodeId,
        snapshot: &ClusterSnapshot,
    ) -> Result<NodeId, Step> {
        let Some(primary) = snapshot.primary else {
            return Ok(node);
        };
        if self.read_your_writes.to_primary_once {
            self.ctx.metrics.consistency_routed_to_primary();
            return Ok(primary);
        }
        let target = self.read_target()?;
        if target == 0 {
            return Ok(node);
        }
        let lsns = &self.ctx.lsns;
        lsns.note_demand();
        if lsns.replayed(node) >= target {
            return Ok(node);
        }
        // The session's own standby first (its reads stay monotonic while it
        // catches up, usually within a millisecond), for up to consistency_wait.
        let wait = self.cfg.routing.consistency_wait;
        let now = tokio::time::Instant::now();
        let deadline = *self
            .read_your_writes
            .replay_deadline
            .get_or_insert(now + wait);
        if now < deadline {
            return Err(Step::WaitReplay {
                nodes: vec![node],
                target,
                deadline,
            });
        }
        // Then another standby that has caught up: it becomes the session's.
        let weights = chooser::read_weights(snapshot, self.cfg.routing.primary_in_read_pool);
        let caught_up = NodeId::all(weights.len()).find(|&n| {
            weights[n.index()] > 0.0
                && n != primary
                && !self.shunned(n)
                && lsns.replayed(n) >= target
        });
        if let Some(other) = caught_up {
            self.route.standby = Some(other);
            return Ok(other);
        }
        self.ctx.metrics.consistency_routed_to_primary();
        Ok(primary)
    }

    /// The position the next read must see, or the step that learns it.
    fn read_target(&self) -> Result<u64, Step> {
        let f = &self.read_your_writes;
        let mut target = f.min_lsn.max(f.read_lsn);
        match self.cfg.routing.consistency {
            ConsistencyMode::Eventual => {}
            ConsistencyMode::Session => {
                if f.lsn_unknown {
                    return Err(Step::FetchLsn);
                }
            }
            ConsistencyMode::Global => match f.request_lsn.or_else(|| self.ctx.lsns.global_lsn()) {
                Some(g) => target = target.max(g),
                None => return Err(Step::FetchLsn),
            },
        }
        Ok(target)
    }

    /// An own command (admin or `pgpilot.*`) should first learn the session's
    /// commit position, so `SHOW pgpilot.last_commit_lsn` is exact. Not again
    /// after a failed fetch (no primary, e.g. during a failover): the command is
    /// answered with what is known rather than asking in a loop.
    pub(super) fn own_command_wants_lsn(&self) -> bool {
        self.read_your_writes.lsn_unknown && !self.read_your_writes.to_primary_once
    }

    /// A fresh primary position arrived (`Step::FetchLsn`), or `None` if it could
    /// not be had: then this request's read goes to the primary.
    pub(super) fn primary_lsn_fetched(&mut self, lsn: Option<u64>) {
        let f = &mut self.read_your_writes;
        match lsn {
            Some(lsn) => {
                if f.lsn_unknown {
                    f.lsn_unknown = false;
                    f.last_commit_lsn = f.last_commit_lsn.max(lsn);
                    f.read_lsn = f.read_lsn.max(lsn);
                }
                f.request_lsn = Some(lsn);
            }
            None => f.to_primary_once = true,
        }
    }

    /// The request being routed was sent (or answered by pgpilot itself): its
    /// one-shot routing state ends.
    pub(super) fn read_your_writes_request_sent(&mut self) {
        let f = &mut self.read_your_writes;
        f.request_lsn = None;
        f.replay_deadline = None;
        f.to_primary_once = false;
    }

    /// A request ended on the primary with the session outside a transaction:
    /// any write it carried is now acknowledged (committed), and the session's
    /// next read must see it. (The proxy-wide count of acknowledged writes went
    /// up before the client got the answer: `Session::on_backend_data`.)
    pub(super) fn writes_acknowledged(&mut self) {
        if std::mem::take(&mut self.read_your_writes.write_pending) {
            self.read_your_writes.lsn_unknown = true;
        }
    }
}
