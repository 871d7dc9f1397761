//! The instances in front of the cluster: each registers under its lease
//! (so a dead instance disappears with its lease), with the address its
//! client port is reached at, its cancel tag, a heartbeat and the epoch of
//! the state it applied last (`SHOW PGPILOT_PEERS`).
//!
//! The cancel tag (1–255) is claimed with a create-only transaction on
//! `tags/<n>` bound to the lease, so two live instances never hold the same
//! tag; it is the top byte of the 30-bit pid pgpilot hands its clients
//! (`context::cancel`), which tells any instance where a cancel belongs.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{CoordError, Session, call, lock};

/// One instance as registered in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Instance name.
    pub name: String,
    /// Client address (`host:port`).
    pub address: String,
    /// Cancel tag.
    pub tag: u8,
    /// When it last renewed its registration (ms since the Unix epoch).
    pub heartbeat_ms: u64,
    /// Epoch of the state it applied last.
    pub applied_epoch: u64,
}

/// One row of `SHOW PGPILOT_PEERS`.
#[derive(Debug, Clone)]
pub struct PeerView {
    /// Instance name.
    pub name: String,
    /// Client address.
    pub address: String,
    /// Whether it holds the leader key.
    pub leader: bool,
    /// Its last heartbeat.
    pub heartbeat: SystemTime,
    /// Epoch of the state it applied last.
    pub applied_epoch: u64,
    /// Whether it is the instance answering.
    pub this: bool,
}

impl Session {
    /// Claim a free cancel tag, starting from one derived from the name.
    pub(super) async fn claim_tag(&mut self) -> Result<(), CoordError> {
        let start = self
            .handle
            .name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        for i in 0..255u32 {
            let tag = ((start + i) % 255 + 1) as u8;
            let key = format!("{}{tag}", self.keys.tags);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    self.handle.name.clone(),
                    Some(PutOptions::new().with_lease(self.lease)),
                )]);
            if call(&self.handle, self.client.txn(txn)).await?.succeeded() {
                self.handle.tag.store(tag, Ordering::Relaxed);
                tracing::info!(tag, "etcd coordination: cancel tag claimed");
                return Ok(());
            }
        }
        tracing::warn!(
            "etcd coordination: no free cancel tag; cancels are not forwarded to this instance"
        );
        Ok(())
    }

    /// Register (again) under the lease with a fresh heartbeat; the
    /// revision it was written at (its event must come back through the
    /// watch, see `liveness.rs`).
    pub(super) async fn heartbeat(&mut self) -> Result<i64, CoordError> {
        let m = Member {
            name: self.handle.name.clone(),
            address: self.handle.address.clone(),
            tag: self.handle.tag(),
            heartbeat_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            applied_epoch: self.handle.applied_epoch(),
        };
        let key = format!("{}{}", self.keys.members, m.name);
        let value = serde_json::to_vec(&m).expect("a member serialises");
        self.put_leased(key, value).await
    }

    /// Re-read the member list and the leader's name.
    pub(super) async fn refresh_peers(&mut self) -> Result<(), CoordError> {
        let kvs = self.list(self.keys.members.clone()).await?;
        let members: Vec<Member> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        *lock(&self.handle.peers) = members;
        let r = call(
            &self.handle,
            self.client.get(self.keys.leader.clone(), None),
        )
        .await?;
        *lock(&self.handle.leader_name) = r
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_default();
        Ok(())
    }
}
