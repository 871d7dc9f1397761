//! [`NodeId`]: which configured node a value is about.
//!
//! A node is named by its position in `[[backends]]`, counted from 0; the
//! admin views, metrics labels and log lines print that plain number. The
//! type keeps node ids apart from counts, lengths and other indices.

use std::fmt;

/// A node: its position in the configuration's `[[backends]]` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(usize);

impl NodeId {
    /// The node at position `index` of `[[backends]]`.
    pub const fn new(index: usize) -> Self {
        NodeId(index)
    }

    /// The position in `[[backends]]`, for indexing per-node slices.
    pub const fn index(self) -> usize {
        self.0
    }

    /// Every node of a cluster of `count` nodes, in configuration order.
    pub fn all(count: usize) -> impl DoubleEndedIterator<Item = NodeId> + ExactSizeIterator {
        (0..count).map(NodeId)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<usize> for NodeId {
    fn from(index: usize) -> Self {
        NodeId(index)
    }
}
