//! The lease and the election: one lease per instance, renewed every third
//! of its TTL; the leader key created only while it does not exist and
//! bound to the winner's lease, so it disappears with the lease.
//!
//! Why the local judgement of "my lease is live" is safe: a renewal *sent*
//! at `t` and acknowledged keeps the lease on etcd until at least `t + ttl`
//! (etcd counts from when it received it, which is later). This instance
//! decides only until `t + ttl − ttl/4`, so it has stopped deciding before
//! etcd can let the leader key expire and another instance win it. A
//! renewal answered with TTL 0 means the lease is gone: the session ends.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{CALL_TIMEOUT, CoordError, Session, call, lock};

/// How long before the lease could expire on etcd this instance stops
/// deciding (a quarter of the TTL).
fn margin(ttl: Duration) -> Duration {
    ttl / 4
}

impl Session {
    /// Grant the lease and open its renewal stream.
    pub(super) async fn grant_lease(
        &mut self,
        ttl: i64,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), CoordError> {
        let sent = Instant::now();
        let g = call(&self.handle, self.client.lease_grant(ttl, None)).await?;
        self.lease = g.id();
        let ttl = Duration::from_secs(g.ttl().max(1) as u64);
        self.handle.set_lease_until(Some(sent + ttl - margin(ttl)));
        let pair = call(&self.handle, self.client.lease_keep_alive(self.lease)).await?;
        Ok(pair)
    }

    /// Renew the lease once.
    pub(super) async fn renew(
        &mut self,
        keeper: &mut LeaseKeeper,
        renewals: &mut LeaseKeepAliveStream,
        ttl: i64,
    ) -> Result<(), CoordError> {
        let sent = Instant::now();
        call(&self.handle, keeper.keep_alive()).await?;
        let answer = match tokio::time::timeout(CALL_TIMEOUT, renewals.message()).await {
            Ok(r) => r?,
            Err(_) => return Err(CoordError::Timeout(CALL_TIMEOUT)),
        };
        self.handle.note_rtt(sent);
        match answer {
            Some(a) if a.ttl() > 0 => {
                let ttl = Duration::from_secs(ttl as u64);
                self.handle.set_lease_until(Some(sent + ttl - margin(ttl)));
                Ok(())
            }
            _ => Err(CoordError::LeaseExpired),
        }
    }

    /// Try to become the leader: create the leader key bound to this lease
    /// unless it exists.
    pub(super) async fn campaign(&mut self) -> Result<(), CoordError> {
        let key = self.keys.leader.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.handle.name.clone(),
                Some(PutOptions::new().with_lease(self.lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = call(&self.handle, self.client.txn(txn)).await?;
        if r.succeeded() {
            *lock(&self.handle.leader_name) = self.handle.name.clone();
            return self.become_leader().await;
        }
        for op in r.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
            {
                let name = String::from_utf8_lossy(kv.value()).into_owned();
                let mine = kv.lease() == self.lease;
                *lock(&self.handle.leader_name) = name.clone();
                let leading = self.handle.leader.load(Ordering::Acquire);
                if mine && leading {
                    // Already leading on this lease: nothing to take over.
                    // This is the watch delivering, after this session won,
                    // the deletion of a key it freed below (the events
                    // queued while it campaigned). Taking over again would
                    // re-apply etcd's state over the decisions made since
                    // and not written yet: a DETACH just answered would be
                    // undone here and never reach the followers.
                    return Ok(());
                }
                if mine {
                    return self.become_leader().await;
                }
                if leading {
                    // etcd names another holder: this instance does not lead.
                    self.step_down();
                }
                if name == self.handle.name {
                    // Our own key from a session that ended (this instance
                    // stopped deciding then): free it instead of waiting
                    // for its lease to expire, then campaign again.
                    let stale = Txn::new()
                        .when([Compare::lease(
                            self.keys.leader.clone(),
                            CompareOp::Equal,
                            kv.lease(),
                        )])
                        .and_then([TxnOp::delete(self.keys.leader.clone(), None)]);
                    if call(&self.handle, self.client.txn(stale))
                        .await?
                        .succeeded()
                    {
                        return Box::pin(self.campaign()).await;
                    }
                }
                tracing::info!(leader = %name, "etcd coordination: following");
            }
        }
        Ok(())
    }

    /// Won the election: take over the recorded state, finish a recorded
    /// failover first (see `resume.rs`), then decide.
    async fn become_leader(&mut self) -> Result<(), CoordError> {
        self.read_state().await?;
        tracing::warn!(epoch = self.state.epoch, primary = ?self.state.primary, "this pgpilot leads (etcd election won)");
        // Follow the recorded state until the takeover is complete.
        self.apply(self.state.clone());
        self.handle.leader.store(true, Ordering::Release);
        match self.state.failover.clone() {
            Some(record) => {
                self.handle.resuming.store(true, Ordering::Release);
                // Commands forwarded meanwhile run once it is finished.
                self.unrun_requests = true;
                super::resume::spawn(
                    self.cluster.clone(),
                    self.config.clone(),
                    self.handle.clone(),
                    record,
                    self.state.holds_for(self.config.load().backends.len()),
                );
            }
            None => {
                self.take_over();
                self.publish().await?;
                // Commands forwarded while no leader decided.
                for kv in self.list(self.keys.requests.clone()).await? {
                    self.on_request(&kv).await?;
                }
            }
        }
        Ok(())
    }

    /// Decide locally from here on, starting from the recorded state.
    pub(super) fn take_over(&self) {
        let adm = crate::cluster::state_machine::Admission::from(&**self.config.load());
        self.cluster.update(|o| o.release_external(&adm));
    }
}
