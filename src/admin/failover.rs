//! `SHOW PGPILOT_FAILOVER` and the results of `ATTACH`/`DETACH`/`PROMOTE
//! NODE`.
//!
//! `SHOW PGPILOT_FAILOVER` is one row: `state` (`idle`, `failover`,
//! `switchover`), `phase` (see `cluster::events::Phase`), `old_primary`,
//! `new_primary` (the candidate while in progress), `started`, `finished`,
//! `duration_ms` (detection to the new primary taking writes), `detail` (the
//! latest step, or why it waits or failed), `blocked` (why a lost primary
//! is not failed over), then counters `failovers`, `switchovers`,
//! `promotions`, `follows`, `fenced`. With nothing in progress the columns
//! describe the last transition (empty when there was none).
//!
//! `SHOW PGPILOT_SLOTS` is one row per physical replication slot on the
//! primary (see `cluster::slots`): `slot_name`, `node_id` (the in-service
//! standby whose `primary_slot_name` it is; empty for none), `active`,
//! `retained_bytes` (WAL it makes the primary keep), `stale_seconds` (how
//! long it has been inactive and used by no in-service standby; empty when
//! it is not stale).

use super::format::opt_local_time;
use super::{ResultSet, views::opt};
use crate::cluster::CommandError;
use crate::cluster::events::{Event, TransitionStatus};
use crate::config::NodeId;
use crate::context::ProxyContext;
use crate::error::ToPgError;
use crate::protocol::messages::PgError;

const NODE_COLUMNS: [&str; 2] = ["node_id", "result"];

/// The (empty) result set of a node command: what Describe announces.
pub(super) fn node_columns() -> ResultSet {
    ResultSet::new(&NODE_COLUMNS, Vec::new())
}

/// A node command's outcome: one row, or the refusal (55000, see
/// `crate::error`).
pub(crate) fn node_result(
    node: NodeId,
    r: Result<String, CommandError>,
) -> Result<ResultSet, PgError> {
    match r {
        Ok(msg) => Ok(ResultSet::new(
            &NODE_COLUMNS,
            vec![vec![node.to_string(), msg]],
        )),
        Err(why) => Err(why.to_pg_error()),
    }
}

/// `SHOW PGPILOT_FAILOVER`.
pub(super) fn status(ctx: &ProxyContext) -> ResultSet {
    let r = ctx.cluster.failover_report();
    let (state, t): (&str, Option<&TransitionStatus>) = match (&r.current, &r.last) {
        (Some(t), _) => (t.kind.as_str(), Some(t)),
        (None, last) => ("idle", last.as_ref()),
    };
    let c = &r.counts;
    let row = vec![
        state.to_string(),
        t.map(|t| t.phase.as_str().to_string()).unwrap_or_default(),
        opt(t.and_then(|t| t.old_primary)),
        opt(t.and_then(|t| t.target)),
        opt_local_time(t.map(|t| t.started)),
        opt_local_time(t.and_then(|t| t.finished)),
        opt(t.and_then(|t| t.duration).map(|d| d.as_millis())),
        t.map(|t| t.detail.clone()).unwrap_or_default(),
        r.blocked.clone().unwrap_or_default(),
        c.get(Event::FailoverFinished).to_string(),
        c.get(Event::SwitchoverFinished).to_string(),
        c.get(Event::Promotion).to_string(),
        c.get(Event::Follow).to_string(),
        c.get(Event::Fenced).to_string(),
    ];
    ResultSet::new(
        &[
            "state",
            "phase",
            "old_primary",
            "new_primary",
            "started",
            "finished",
            "duration_ms",
            "detail",
            "blocked",
            "failovers",
            "switchovers",
            "promotions",
            "follows",
            "fenced",
        ],
        vec![row],
    )
}

/// `SHOW PGPILOT_SLOTS`.
pub(super) fn slots(ctx: &ProxyContext) -> ResultSet {
    let rows = ctx
        .cluster
        .replication_slots()
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                opt(s.standby),
                s.active.to_string(),
                opt(s.retained_bytes),
                opt(s.stale_since.map(|t| t.elapsed().as_secs())),
            ]
        })
        .collect();
    ResultSet::new(
        &[
            "slot_name",
            "node_id",
            "active",
            "retained_bytes",
            "stale_seconds",
        ],
        rows,
    )
}
