//! Which node runs a statement, and what a statement leaves behind.
//!
//! The router is a set of pure functions of (statement, session state, cluster
//! snapshot), so the policy can be tested without sockets. The core proxy sends
//! every statement to the primary; read/write splitting plugs in here.

pub mod cache;
pub mod catalog;
pub mod chooser;
pub mod classify;
pub mod lexer;
pub mod normalize;
pub mod policy;

use crate::cluster::ClusterSnapshot;

/// Where a statement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The current primary.
    Primary,
    /// A specific node (a standby chosen for reads).
    Node(usize),
}

/// Decides the target node for each statement of a session.
pub trait Router: Send + Sync {
    /// Route a simple Query or a Parse, given its SQL text (raw bytes as sent).
    fn route(&self, sql: &[u8], cluster: &ClusterSnapshot) -> Target;
}

/// The core proxy's policy: everything on the primary.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrimaryOnly;

impl Router for PrimaryOnly {
    fn route(&self, _sql: &[u8], _cluster: &ClusterSnapshot) -> Target {
        Target::Primary
    }
}

/// Resolve a target to a node id using the snapshot.
pub fn resolve(target: Target, cluster: &ClusterSnapshot) -> Option<usize> {
    match target {
        Target::Primary => cluster.primary,
        Target::Node(n) => Some(n),
    }
}
