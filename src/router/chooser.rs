//! Choosing a session's load-balance node: weighted random over usable nodes,
//! with the weights the cluster owner derived from replication lag.
//!
//! The snapshot carries each node's effective weight (configured weight ×
//! the lag curve of `cluster::lag`, 0 for a node that must not get reads), so
//! lag changes routing without touching the session. A session picks its node
//! once ([`pick`] over [`read_weights`]), checks it before each read
//! ([`still_usable`]) and, when it no longer qualifies (down, or over a delay
//! threshold), picks again by weight or reads on the primary (the session's
//! `refresh_standby`, pgpool's `prefer_lower_delay_standby`).

use crate::cluster::{ClusterSnapshot, Role};
use crate::config::NodeId;

/// The effective read weight of each node (0 = not eligible): the lag-adjusted
/// weight of in-service standbys; the primary's weight only when
/// `include_primary` is set. Down nodes, held-out nodes, standbys over a delay
/// threshold or on another timeline get 0.
pub fn read_weights(snapshot: &ClusterSnapshot, include_primary: bool) -> Vec<f64> {
    NodeId::all(snapshot.nodes.len())
        .map(|i| read_weight(snapshot, i, include_primary))
        .collect()
}

/// The effective read weight of one node (see [`read_weights`]).
pub(crate) fn read_weight(snapshot: &ClusterSnapshot, node: NodeId, include_primary: bool) -> f64 {
    let Some(n) = snapshot.nodes.get(node.index()) else {
        return 0.0;
    };
    let eligible = if Some(n.id) == snapshot.primary {
        include_primary
    } else {
        n.role == Role::Standby
    };
    if eligible && n.status.is_usable() {
        n.effective_weight.max(0.0)
    } else {
        0.0
    }
}

/// Pick a node by weight; `r` is a uniform random number in [0, 1).
pub(crate) fn pick(weights: &[f64], r: f64) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let mut x = r * total;
    for (i, w) in weights.iter().enumerate() {
        if *w <= 0.0 {
            continue;
        }
        if x < *w {
            return Some(i);
        }
        x -= w;
    }
    weights.iter().rposition(|w| *w > 0.0)
}

/// Whether `node` may still serve the session's reads.
pub(crate) fn still_usable(
    snapshot: &ClusterSnapshot,
    node: NodeId,
    include_primary: bool,
) -> bool {
    read_weight(snapshot, node, include_primary) > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{LagPolicy, NodeStatus, NodeView, PgStatus, ReplicationView};
    use std::time::SystemTime;

    fn snap() -> ClusterSnapshot {
        let node = |id, role, weight| NodeView {
            id,
            host: "h".into(),
            port: 1,
            weight,
            status: NodeStatus::Up,
            pg_status: PgStatus::Up,
            role,
            last_change: SystemTime::now(),
            last_error: None,
            held_out: None,
            effective_weight: weight,
            repl: ReplicationView::default(),
        };
        ClusterSnapshot {
            nodes: vec![
                node(NodeId::new(0), Role::Primary, 1.0),
                node(NodeId::new(1), Role::Standby, 1.0),
                node(NodeId::new(2), Role::Standby, 3.0),
            ],
            primary: Some(NodeId::new(0)),
            lag_policy: LagPolicy::default(),
            generation: 1,
        }
    }

    #[test]
    fn weights_follow_roles_status_and_lag() {
        let mut s = snap();
        assert_eq!(read_weights(&s, false), vec![0.0, 1.0, 3.0]);
        assert_eq!(read_weights(&s, true), vec![1.0, 1.0, 3.0]);
        s.nodes[1].status = NodeStatus::Waiting;
        assert_eq!(read_weights(&s, false), vec![0.0, 1.0, 3.0]);
        s.nodes[2].status = NodeStatus::Down;
        assert_eq!(read_weights(&s, false), vec![0.0, 1.0, 0.0]);
        assert!(!still_usable(&s, NodeId::new(2), false));
        // The owner lowered node 1's weight for lag.
        s.nodes[2].status = NodeStatus::Up;
        s.nodes[1].effective_weight = 0.25;
        assert_eq!(read_weights(&s, false), vec![0.0, 0.25, 3.0]);
        // A false primary (not the chosen one) gets no reads.
        s.nodes[1].role = Role::Primary;
        assert_eq!(read_weights(&s, true), vec![1.0, 0.0, 3.0]);
    }

    #[test]
    fn pick_is_proportional() {
        let w = [0.0, 1.0, 3.0];
        let mut counts = [0; 3];
        for i in 0..4000 {
            counts[pick(&w, i as f64 / 4000.0).unwrap()] += 1;
        }
        assert_eq!(counts, [0, 1000, 3000]);
        assert_eq!(pick(&[0.0, 0.0], 0.5), None);
        assert_eq!(pick(&[], 0.5), None);
    }

    #[test]
    fn a_node_over_a_threshold_is_no_longer_usable() {
        let mut s = snap();
        assert!(still_usable(&s, NodeId::new(2), false));
        s.nodes[2].effective_weight = 0.0; // over a threshold
        assert!(!still_usable(&s, NodeId::new(2), false));
    }
}
