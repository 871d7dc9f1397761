//! Coordination metrics, filled at scrape time from the cluster's etcd
//! handle:
//! `pgpilot_coordination_leader` (1 while this instance leads with a live
//! lease), `pgpilot_coordination_epoch` (epoch of the shared state applied
//! here), `pgpilot_coordination_etcd_rtt_seconds` (latest etcd round trip),
//! `pgpilot_coordination_etcd_errors_total` (failed etcd calls),
//! `pgpilot_coordination_epoch_recorded_timestamp_seconds` (Unix time at
//! which this instance, leading, sent the etcd write that started the
//! current epoch: the leader's decision) and
//! `pgpilot_coordination_epoch_routed_timestamp_seconds` (Unix time at
//! which this instance first routed writes to the primary the current epoch
//! names: a follower's switch). The last two tell, across instances, how
//! long followers take to follow a failover the leader decided
//! (`benches/failover.sh` with `INSTANCES=2`). All are 0 while coordination
//! is off.

use prometheus::{Gauge, IntCounter, IntGauge, Registry};

use super::{opts, reg, sync_counter};
use crate::cluster::Cluster;

/// Gauges and counters of coordination through etcd.
pub(super) struct CoordinationMetrics {
    leader: IntGauge,
    epoch: IntGauge,
    rtt: Gauge,
    errors: IntCounter,
    recorded_at: Gauge,
    routed_at: Gauge,
}

impl CoordinationMetrics {
    pub(super) fn new(r: &Registry) -> CoordinationMetrics {
        CoordinationMetrics {
            leader: reg(r, IntGauge::with_opts(opts(
                "pgpilot_coordination_leader",
                "1 while this pgpilot leads (holds the etcd leader key with a live lease), else 0.",
            ))
            .expect("valid metric")),
            epoch: reg(r, IntGauge::with_opts(opts(
                "pgpilot_coordination_epoch",
                "Epoch of the shared cluster state last applied or written by this pgpilot.",
            ))
            .expect("valid metric")),
            rtt: reg(r, Gauge::with_opts(opts(
                "pgpilot_coordination_etcd_rtt_seconds",
                "Round-trip time of the latest etcd call.",
            ))
            .expect("valid metric")),
            errors: reg(r, IntCounter::with_opts(opts(
                "pgpilot_coordination_etcd_errors_total",
                "etcd calls that failed or timed out (each ends the etcd session; it is reopened).",
            ))
            .expect("valid metric")),
            recorded_at: reg(r, Gauge::with_opts(opts(
                "pgpilot_coordination_epoch_recorded_timestamp_seconds",
                "Unix time at which this pgpilot, leading, sent the etcd write that started the current epoch (a new primary or a recorded promotion); 0 if it wrote none.",
            ))
            .expect("valid metric")),
            routed_at: reg(r, Gauge::with_opts(opts(
                "pgpilot_coordination_epoch_routed_timestamp_seconds",
                "Unix time at which this pgpilot first routed writes to the primary the current epoch names; 0 if not yet.",
            ))
            .expect("valid metric")),
        }
    }

    /// Fill from the cluster's handle.
    pub(super) fn fill(&self, cluster: &Cluster) {
        let Some(h) = cluster.coordination() else {
            return;
        };
        self.leader.set(h.is_leader().into());
        self.epoch.set(h.applied_epoch() as i64);
        self.rtt.set(h.rtt_seconds());
        sync_counter(&self.errors, h.errors());
        self.recorded_at.set(h.epoch_recorded_at());
        self.routed_at.set(h.epoch_routed_at());
    }
}
