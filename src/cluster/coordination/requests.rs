//! Admin commands (`ATTACH`, `DETACH`, `PROMOTE NODE`) run on a follower:
//! written to `requests/<id>`; the leader runs each one as if it had been
//! given to it, records its effect in the state key, then writes its
//! outcome to `results/<id>` and deletes the request, in one transaction.
//! The follower that sent it answers its client with that outcome
//! (`super::Cluster::forward_to_leader`) and deletes the result.
//!
//! Why the follower's answer comes after the effect is visible there: the
//! state write's revision is lower than the outcome's, etcd's watch
//! delivers events in revision order, and the follower's etcd task applies
//! each state write before it reads the next event. The outcome is bound
//! to the follower's lease, so the outcome of a follower that died waiting
//! disappears with it.

use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{CoordError, Session, call, lock};
use crate::cluster::switchover;
use crate::config::NodeId;

/// Distinguishes the requests of one instance.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// A request id unique among the instances (the name is unique, the
/// process id and counter tell this run's requests apart).
pub(super) fn new_id(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One forwarded command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct AdminRequest {
    /// `attach`, `detach` or `promote`.
    pub command: String,
    /// The node.
    pub node: usize,
    /// The instance it was given to.
    pub from: String,
    /// That instance's lease, which the outcome is bound to (0: none).
    #[serde(default)]
    pub lease: i64,
}

/// The leader's outcome of a forwarded command, as the follower answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Outcome {
    /// Run (`true`) or refused.
    pub ok: bool,
    /// The leader's answer: its result message, or why it refused.
    pub message: String,
    /// The leader's name.
    pub leader: String,
    /// The instance the command was given to.
    pub to: String,
}

impl Session {
    /// Write a follower's request for the leader.
    pub(super) async fn forward(
        &mut self,
        id: String,
        mut req: AdminRequest,
    ) -> Result<(), CoordError> {
        req.lease = self.lease;
        let key = format!("{}{id}", self.keys.requests);
        let value = serde_json::to_vec(&req).expect("a request serialises");
        call(&self.handle, self.client.put(key, value, None)).await?;
        Ok(())
    }

    /// A request appeared: the leader runs it, records its effect, answers
    /// the follower and deletes the request.
    pub(super) async fn on_request(
        &mut self,
        kv: &etcd_client::KeyValue,
    ) -> Result<(), CoordError> {
        if !self.handle.decides() {
            self.unrun_requests = true;
            return Ok(());
        }
        let key = kv.key().to_vec();
        let req = match serde_json::from_slice::<AdminRequest>(kv.value()) {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable forwarded request; deleted");
                call(&self.handle, self.client.delete(key, None)).await?;
                return Ok(());
            }
        };
        let cfg = self.config.load_full();
        let n = NodeId::new(req.node);
        let r = match req.command.as_str() {
            "attach" => self.cluster.attach(n, &cfg),
            "detach" => self.cluster.detach(n, &cfg),
            "promote" => switchover::start(self.cluster.clone(), self.config.clone(), n),
            other => Ok(format!("unknown command {other:?} ignored")),
        };
        let (ok, message) = match r {
            Ok(msg) => {
                tracing::warn!(from = %req.from, command = %req.command, node = %n, "forwarded command: {msg}");
                // The effect is in etcd before the answer (module docs).
                if self.publish().await? {
                    (true, msg)
                } else {
                    let why =
                        "this pgpilot stopped leading before it could record the command; retry";
                    (false, why.to_string())
                }
            }
            Err(e) => {
                tracing::warn!(from = %req.from, command = %req.command, node = %n, error = %e, "forwarded command refused");
                (false, e.to_string())
            }
        };
        let outcome = Outcome {
            ok,
            message,
            leader: self.handle.name.clone(),
            to: req.from.clone(),
        };
        self.answer(key, req.lease, &outcome).await
    }

    /// Write `outcome` for the request at `key` and delete the request.
    async fn answer(
        &mut self,
        key: Vec<u8>,
        lease: i64,
        outcome: &Outcome,
    ) -> Result<(), CoordError> {
        let id = &key[self.keys.requests.len().min(key.len())..];
        let result_key = [self.keys.results.as_bytes(), id].concat();
        let value = serde_json::to_vec(outcome).expect("an outcome serialises");
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new().and_then([
            TxnOp::put(result_key, value, opts),
            TxnOp::delete(key.clone(), None),
        ]);
        if let Err(e) = call(&self.handle, self.client.txn(txn)).await {
            // Most likely the follower's lease is gone (it stopped): nobody
            // waits for the outcome; the request is deleted all the same.
            tracing::info!(error = %e, "the outcome of a forwarded command could not be written");
            call(&self.handle, self.client.delete(key, None)).await?;
        }
        Ok(())
    }

    /// An outcome appeared: hand it to the command waiting for it here, and
    /// delete it. Outcomes for other instances are theirs to delete.
    pub(super) async fn on_result(&mut self, kv: &etcd_client::KeyValue) -> Result<(), CoordError> {
        let id = String::from_utf8_lossy(&kv.key()[self.keys.results.len()..]).into_owned();
        let outcome = serde_json::from_slice::<Outcome>(kv.value()).ok();
        let waiting = lock(&self.handle.pending).remove(&id);
        let mine = waiting.is_some() || outcome.as_ref().is_some_and(|o| o.to == self.handle.name);
        if !mine {
            return Ok(());
        }
        match (waiting, outcome) {
            (Some(tx), Some(o)) => {
                let _ = tx.send(o);
            }
            (Some(tx), None) => {
                let _ = tx.send(Outcome {
                    ok: false,
                    message: "its outcome in etcd could not be read".into(),
                    leader: lock(&self.handle.leader_name).clone(),
                    to: self.handle.name.clone(),
                });
            }
            // Its command stopped waiting (timed out).
            (None, _) => {}
        }
        call(&self.handle, self.client.delete(kv.key().to_vec(), None)).await?;
        Ok(())
    }
}
