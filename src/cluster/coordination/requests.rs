//! Admin commands (`ATTACH`, `DETACH`, `PROMOTE NODE`) run on a follower:
//! written to `requests/<id>`; the leader runs each one as if it had been
//! given to it, then deletes the key. The decision and its effect reach
//! every instance through the state key, like any other decision.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{CoordError, Session, call};
use crate::cluster::switchover;
use crate::config::NodeId;

/// Distinguishes the requests of one instance.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// One forwarded command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct AdminRequest {
    /// `attach`, `detach` or `promote`.
    pub command: String,
    /// The node.
    pub node: usize,
    /// The instance it was given to.
    pub from: String,
}

impl Session {
    /// Write a follower's request for the leader.
    pub(super) async fn forward(&mut self, req: AdminRequest) -> Result<(), CoordError> {
        let id = format!(
            "{}{}-{}-{}",
            self.keys.requests,
            req.from,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let value = serde_json::to_vec(&req).expect("a request serialises");
        call(&self.handle, self.client.put(id, value, None)).await?;
        Ok(())
    }

    /// A request appeared: the leader runs it and deletes it.
    pub(super) async fn on_request(
        &mut self,
        kv: &etcd_client::KeyValue,
    ) -> Result<(), CoordError> {
        if !self.handle.decides() {
            return Ok(());
        }
        let key = kv.key().to_vec();
        match serde_json::from_slice::<AdminRequest>(kv.value()) {
            Ok(req) => {
                let cfg = self.config.load_full();
                let n = NodeId::new(req.node);
                let r = match req.command.as_str() {
                    "attach" => self.cluster.attach(n, &cfg),
                    "detach" => self.cluster.detach(n, &cfg),
                    "promote" => switchover::start(self.cluster.clone(), self.config.clone(), n),
                    other => Ok(format!("unknown command {other:?} ignored")),
                };
                match r {
                    Ok(msg) => {
                        tracing::warn!(from = %req.from, command = %req.command, node = %n, "forwarded command: {msg}")
                    }
                    Err(e) => {
                        tracing::warn!(from = %req.from, command = %req.command, node = %n, error = %e, "forwarded command refused")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable forwarded request; deleted"),
        }
        call(&self.handle, self.client.delete(key, None)).await?;
        Ok(())
    }
}
