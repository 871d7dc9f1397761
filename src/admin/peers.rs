//! `SHOW PGPILOT_PEERS`: the pgpilot instances coordinating through etcd
//! (pgpool's `pcp_watchdog_info`), as this instance last read them from
//! etcd: `instance`, `address` (client port), `leader` (`true` for the one
//! holding the leader key), `last_heartbeat` (its latest registration
//! renewal), `applied_epoch` (epoch of the shared state it applied last),
//! `this` (`true` for the instance answering). Without coordination: one
//! row for this instance, `leader` `true` (it decides alone).

use super::ResultSet;
use super::format::local_time;
use crate::context::ProxyContext;

/// `SHOW PGPILOT_PEERS`.
pub(super) fn peers(ctx: &ProxyContext) -> ResultSet {
    let rows = match ctx.cluster.coordination() {
        Some(h) => h
            .peers()
            .into_iter()
            .map(|p| {
                vec![
                    p.name,
                    p.address,
                    p.leader.to_string(),
                    local_time(p.heartbeat),
                    p.applied_epoch.to_string(),
                    p.this.to_string(),
                ]
            })
            .collect(),
        None => {
            let listen = ctx.config.load().listen.clone();
            vec![vec![
                listen.clone(),
                listen,
                "true".into(),
                String::new(),
                "0".into(),
                "true".into(),
            ]]
        }
    };
    ResultSet::new(
        &[
            "instance",
            "address",
            "leader",
            "last_heartbeat",
            "applied_epoch",
            "this",
        ],
        rows,
    )
}
