//! Leader loss mid-failover: the new leader finishes the promotion its
//! predecessor recorded, and promotes nothing else.
//!
//! The record (old primary, candidate) was written *before* the
//! predecessor sent the promotion, so the candidate may be promoted, being
//! promoted, or untouched. The new leader therefore:
//! 1. asks the candidate every [`PAUSE`]: primary → done; standby → it
//!    promotes that same candidate (promoting twice is harmless; promoting
//!    another standby could make two primaries); unreachable → it waits;
//! 2. once the candidate reports primary, publishes it (the record is
//!    cleared in the same write) and decides normally from then on.
//!
//! While this runs the instance is leader but does not decide
//! ([`super::Handle::decides`]): no other failover, switchover or command.
//! If the candidate never comes up, the record stays and pgpilot keeps
//! waiting: an operator decides (rebuild, then `ATTACH NODE`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use super::shared_state::FailoverRecord;
use super::{Handle, Request};
use crate::cluster::health::probe_once;
use crate::cluster::state_machine::{Admission, External, Hold};
use crate::cluster::{Cluster, promote};
use crate::config::{Config, NodeId};

/// Pause between two looks at the candidate.
const PAUSE: Duration = Duration::from_millis(250);

/// Finish `record` in the background.
pub(super) fn spawn(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    handle: Arc<Handle>,
    record: FailoverRecord,
    holds: Vec<Option<Hold>>,
) {
    // In the etcd task's span: its lines name the instance.
    let task = async move {
        let c = NodeId::new(record.candidate);
        let old = record.old_primary.map(NodeId::new);
        tracing::warn!(candidate = %c, old = ?record.old_primary, "finishing the failover the previous leader recorded");
        let mut promoted = false;
        loop {
            if !handle.leader.load(Ordering::Acquire) {
                tracing::warn!(
                    "leadership lost while finishing a recorded failover; the next leader finishes it"
                );
                return;
            }
            let cfg = config.load_full();
            let Some(b) = cfg.backends.get(c.index()) else {
                tracing::error!(
                    candidate = %c,
                    "the recorded candidate is not configured; waiting for an operator"
                );
                return;
            };
            match probe_once(b, &cfg.monitor, cfg.health_check.timeout).await {
                Ok(false) => break,
                Ok(true) if !promoted => {
                    match promote::promote(&cfg, c, old).await {
                        Ok(msg) => tracing::warn!(node = %c, "{msg}"),
                        Err(e) => {
                            tracing::error!(node = %c, error = %e, "promoting the recorded candidate failed; retrying")
                        }
                    }
                    promoted = true;
                }
                Ok(true) => {}
                Err(e) => {
                    tracing::info!(node = %c, error = %e, "recorded candidate unreachable; waiting (no other standby is promoted)")
                }
            }
            tokio::time::sleep(PAUSE).await;
        }
        let cfg = config.load_full();
        let adm = Admission::from(&*cfg);
        cluster.observe_role(c, false);
        let e = External {
            primary: Some(c),
            timeline: None,
            failover: false,
        };
        cluster.update(|o| {
            o.apply_external(e, holds, &adm);
            o.release_external(&adm);
        });
        handle.resuming.store(false, Ordering::Release);
        tracing::warn!(
            node = %c,
            "the recorded failover is finished: node {c} is the primary"
        );
        let (tx, rx) = oneshot::channel();
        if handle.tx.send(Request::Publish(tx)).is_ok()
            && let Ok(Err(e)) = rx.await
        {
            tracing::warn!(error = %e, "could not record the finished failover yet");
        }
    };
    tokio::spawn(tracing::Instrument::in_current_span(task));
}
