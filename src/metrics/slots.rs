//! Metrics of the primary's physical replication slots, filled at scrape
//! time: `pgpilot_replication_slot_retained_bytes{slot}` and
//! `pgpilot_replication_slot_stale{slot}` (a slot no in-service standby
//! uses, retaining WAL until dropped).

use prometheus::{GaugeVec, IntGaugeVec, Registry};

use super::{opts, reg};
use crate::cluster::slots::SlotInfo;

/// Gauges of replication slots.
pub(super) struct SlotMetrics {
    retained: GaugeVec,
    stale: IntGaugeVec,
}

impl SlotMetrics {
    pub(super) fn new(r: &Registry) -> SlotMetrics {
        let retained = GaugeVec::new(
            opts(
                "pgpilot_replication_slot_retained_bytes",
                "WAL a physical replication slot on the primary makes it keep (pg_current_wal_lsn() - restart_lsn).",
            ),
            &["slot"],
        );
        let stale = IntGaugeVec::new(
            opts(
                "pgpilot_replication_slot_stale",
                "1 for a physical slot on the primary that is inactive and used by no in-service standby.",
            ),
            &["slot"],
        );
        SlotMetrics {
            retained: reg(r, retained.expect("valid metric")),
            stale: reg(r, stale.expect("valid metric")),
        }
    }

    /// Replace the series with `slots` (a dropped slot's series disappear).
    pub(super) fn fill(&self, slots: &[SlotInfo]) {
        self.retained.reset();
        self.stale.reset();
        for s in slots {
            let label = [s.name.as_str()];
            if let Some(b) = s.retained_bytes {
                self.retained.with_label_values(&label).set(b as f64);
            }
            self.stale
                .with_label_values(&label)
                .set(s.stale_since.is_some().into());
        }
    }
}
