//! Connections to PostgreSQL nodes: opening and authenticating one
//! ([`conn`]) and pooling them per (node, user, database, startup parameters)
//! ([`pool`]), and what prepared statements each holds ([`statements`]).
//! Nothing here knows about client sockets.

pub(crate) mod conn;
pub(crate) mod pool;
pub(crate) mod statements;

pub(crate) use pool::{Pool, PoolKey};

use std::time::Duration;

use crate::config::NodeId;
use crate::protocol::frame::ErrorFields;

/// What went wrong talking to a node. `node` is the node id (position in `backends`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    /// TCP connect failed (refused, unreachable).
    #[error("could not connect to node {node} ({addr}): {source}")]
    Connect {
        /// Node id.
        node: NodeId,
        /// host:port tried.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A step did not finish in time.
    #[error("timed out while {what} node {node}")]
    Timeout {
        /// Node id.
        node: NodeId,
        /// The step, e.g. "connecting to".
        what: &'static str,
    },
    /// The node answered the login with an ErrorResponse (relayed to the client).
    #[error("node {node} refused the connection: {}", fields.message)]
    Server {
        /// Node id.
        node: NodeId,
        /// The node's error.
        fields: ErrorFields,
    },
    /// pgpilot could not authenticate (missing password, unsupported method).
    #[error("cannot log in to node {node}: {message}")]
    Auth {
        /// Node id.
        node: NodeId,
        /// Why.
        message: String,
    },
    /// The node sent something that is not valid protocol.
    #[error("protocol error from node {node}: {message}")]
    Protocol {
        /// Node id.
        node: NodeId,
        /// What.
        message: String,
    },
    /// The connection broke.
    #[error("connection to node {node} lost: {source}")]
    Io {
        /// Node id.
        node: NodeId,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Every connection slot of the node stayed busy for the whole wait.
    #[error(
        "no connection to node {node} became available within {waited:?} (pool.max_connections_per_node reached)"
    )]
    PoolTimeout {
        /// Node id.
        node: NodeId,
        /// How long the session waited.
        waited: Duration,
    },
    /// No node is currently known to be the primary.
    #[error("no primary node is available")]
    NoPrimary,
    /// No primary, and the cluster layer knows why (Patroni mode names
    /// Patroni's state).
    #[error("no primary node is available: {0}")]
    NoPrimaryBecause(String),
}

impl BackendError {
    /// Whether this error says something about the node's health (as opposed to the
    /// client's request): only connection-level failures do.
    pub(crate) fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            BackendError::Connect { .. } | BackendError::Timeout { .. } | BackendError::Io { .. }
        )
    }
}
