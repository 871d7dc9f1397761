//! Choosing a session's load-balance node: weighted random over usable nodes.
//!
//! Takes the cluster snapshot as input, so replication-lag weighting can change
//! the effective weights without touching the session.

use crate::cluster::{ClusterSnapshot, NodeStatus, Role};

/// The effective read weight of each node (0 = not eligible): configured weight
/// for up standbys; the primary only when `include_primary` is set.
pub fn read_weights(snapshot: &ClusterSnapshot, include_primary: bool) -> Vec<f64> {
    snapshot
        .nodes
        .iter()
        .map(|n| {
            let usable = n.status == NodeStatus::Up
                && match n.role {
                    Role::Standby => true,
                    Role::Primary => include_primary && Some(n.id) == snapshot.primary,
                    Role::Unknown => false,
                };
            if usable { n.weight.max(0.0) } else { 0.0 }
        })
        .collect()
}

/// Pick a node by weight; `r` is a uniform random number in [0, 1).
pub fn pick(weights: &[f64], r: f64) -> Option<usize> {
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
pub fn still_usable(snapshot: &ClusterSnapshot, node: usize, include_primary: bool) -> bool {
    read_weights(snapshot, include_primary)
        .get(node)
        .is_some_and(|w| *w > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeView;
    use std::time::SystemTime;

    fn snap() -> ClusterSnapshot {
        let node = |id, role, weight| NodeView {
            id,
            host: "h".into(),
            port: 1,
            weight,
            status: NodeStatus::Up,
            role,
            last_change: SystemTime::now(),
            last_error: None,
        };
        ClusterSnapshot {
            nodes: vec![
                node(0, Role::Primary, 1.0),
                node(1, Role::Standby, 1.0),
                node(2, Role::Standby, 3.0),
            ],
            primary: Some(0),
        }
    }

    #[test]
    fn weights_follow_roles_and_status() {
        let mut s = snap();
        assert_eq!(read_weights(&s, false), vec![0.0, 1.0, 3.0]);
        assert_eq!(read_weights(&s, true), vec![1.0, 1.0, 3.0]);
        s.nodes[2].status = NodeStatus::Down;
        assert_eq!(read_weights(&s, false), vec![0.0, 1.0, 0.0]);
        assert!(!still_usable(&s, 2, false));
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
}
