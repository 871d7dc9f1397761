//! The one place where failures become what a client sees: a PostgreSQL
//! ErrorResponse with a SQLSTATE.
//!
//! Each layer has its own `thiserror` enum ([`crate::protocol::frame::FrameError`],
//! [`crate::protocol::auth::AuthError`], [`crate::backend::BackendError`],
//! [`crate::cluster::CommandError`]); this module maps them all. The
//! session's own [`SessionError`] is defined here, next to its mapping, so
//! that this module imports nothing above it (the session re-exports it).

use crate::backend::BackendError;
use crate::cluster::CommandError;
use crate::config::NodeId;
use crate::protocol::auth::AuthError;
use crate::protocol::frame::FrameError;
use crate::protocol::messages::{PgError, Severity};

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The client's stream could not be framed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Getting or using a server connection failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The server connection closed or broke mid-session.
    #[error("server connection to node {node} lost")]
    BackendLost {
        /// Node id.
        node: NodeId,
    },
    /// The client connection broke.
    #[error("client connection error: {0}")]
    ClientIo(std::io::Error),
    /// A write made no progress within `timeouts.write`.
    #[error("write timed out")]
    WriteTimeout,
    /// `timeouts.client_idle` elapsed.
    #[error("terminating connection due to idle-session timeout")]
    IdleTimeout,
    /// `timeouts.idle_in_transaction` elapsed.
    #[error("terminating connection due to idle-in-transaction timeout")]
    IdleInTransactionTimeout,
    /// A message type a client may not send after startup.
    #[error("invalid frontend message type {0}")]
    UnexpectedMessage(u8),
    /// pgpilot is shutting down.
    #[error("terminating connection due to administrator command")]
    Shutdown,
}

/// SQLSTATE codes pgpilot itself raises.
pub(crate) mod sqlstate {
    /// Feature not supported (e.g. protocol 2).
    pub(crate) const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// Client could not get a connection established.
    pub(crate) const CONNECTION_FAILURE: &str = "08006";
    /// Server unable to establish a connection.
    pub(crate) const SQLCLIENT_UNABLE_TO_ESTABLISH: &str = "08001";
    /// Protocol violation (bad framing, oversized message).
    pub(crate) const PROTOCOL_VIOLATION: &str = "08P01";
    /// Invalid authorization specification (no user name, ...).
    pub(crate) const INVALID_AUTHORIZATION: &str = "28000";
    /// Wrong password or unknown user.
    pub(crate) const INVALID_PASSWORD: &str = "28P01";
    /// Too many connections (client limit or pool exhausted).
    pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";
    /// Cannot connect now (no primary known).
    pub(crate) const CANNOT_CONNECT_NOW: &str = "57P03";
    /// Administrator shutdown (pgpilot stopping).
    pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
    /// Idle-session / idle-in-transaction timeouts.
    pub(crate) const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// Idle in transaction timeout.
    pub(crate) const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// Invalid text representation (a bad `pgpilot.min_lsn`).
    pub(crate) const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    /// In failed SQL transaction (pgpool mode: a balanced read failed).
    pub(crate) const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    /// Object not in prerequisite state (a refused `ATTACH` / `DETACH` /
    /// `PROMOTE NODE`).
    pub(crate) const NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// Internal error.
    pub(crate) const INTERNAL: &str = "XX000";
}

use sqlstate::*;

/// What a session whose server connection died during a failover tells its
/// client: 57P01, like a server shut down under it, so drivers and poolers
/// reconnect; new connections wait for the new primary.
pub(crate) fn failover_in_progress(node: NodeId) -> PgError {
    PgError::fatal(
        ADMIN_SHUTDOWN,
        format!(
            "terminating connection: failover in progress (the connection to node {node} was lost)"
        ),
    )
    .with_hint("reconnect: new connections wait for the new primary (failover.client_wait_timeout)")
}

/// Convert a layer error into the ErrorResponse the client receives.
pub(crate) trait ToPgError {
    /// The client-facing error.
    fn to_pg_error(&self) -> PgError;
}

impl ToPgError for FrameError {
    fn to_pg_error(&self) -> PgError {
        PgError::fatal(PROTOCOL_VIOLATION, format!("invalid message: {self}"))
    }
}

impl ToPgError for AuthError {
    fn to_pg_error(&self) -> PgError {
        match self {
            // The user name is added by the session, which knows it.
            // (A mismatched verifier is a node's answer to pgpilot, never a client's.)
            AuthError::Failed | AuthError::VerifierMismatch => {
                PgError::fatal(INVALID_PASSWORD, "password authentication failed")
            }
            AuthError::Malformed(m) => PgError::fatal(
                PROTOCOL_VIOLATION,
                format!("malformed authentication message: {m}"),
            ),
        }
    }
}

impl ToPgError for BackendError {
    fn to_pg_error(&self) -> PgError {
        match self {
            BackendError::Server { fields, .. } => {
                // Relay the node's own verdict (e.g. 3D000 database does not exist).
                let valid = fields.code.len() == 5 && fields.code.bytes().all(|b| b.is_ascii_alphanumeric());
                let code = if valid { fields.code.clone().into() } else { INTERNAL.into() };
                PgError {
                    severity: if fields.severity == "FATAL" {
                        Severity::Fatal
                    } else {
                        Severity::Error
                    },
                    code,
                    message: fields.message.clone(),
                    detail: None,
                    hint: None,
                }
            }
            BackendError::PoolTimeout { .. } => PgError::error(TOO_MANY_CONNECTIONS, self.to_string())
                .with_hint("raise pool.max_connections_per_node or pool.acquire_timeout, or reduce concurrent sessions"),
            BackendError::NoPrimary | BackendError::NoPrimaryBecause(_) => {
                PgError::error(CANNOT_CONNECT_NOW, self.to_string())
            }
            BackendError::Connect { .. } | BackendError::Timeout { .. } => {
                PgError::error(SQLCLIENT_UNABLE_TO_ESTABLISH, self.to_string())
            }
            BackendError::Auth { .. } => PgError::error(INVALID_AUTHORIZATION, self.to_string()),
            BackendError::Io { .. } | BackendError::Protocol { .. } => {
                PgError::error(CONNECTION_FAILURE, self.to_string())
            }
        }
    }
}

impl ToPgError for CommandError {
    fn to_pg_error(&self) -> PgError {
        // Every refusal is about the cluster's state, not the command's form.
        PgError::error(NOT_IN_PREREQUISITE_STATE, self.to_string())
    }
}

impl ToPgError for SessionError {
    fn to_pg_error(&self) -> PgError {
        match self {
            SessionError::Frame(e) => e.to_pg_error(),
            SessionError::Backend(e) => {
                let mut e = e.to_pg_error();
                e.severity = Severity::Fatal;
                e
            }
            SessionError::BackendLost { .. } => {
                PgError::fatal(CONNECTION_FAILURE, self.to_string())
                    .with_hint("the session's server connection closed; reconnect to continue")
            }
            SessionError::IdleTimeout => PgError::fatal(IDLE_SESSION_TIMEOUT, self.to_string()),
            SessionError::IdleInTransactionTimeout => {
                PgError::fatal(IDLE_IN_TRANSACTION_TIMEOUT, self.to_string())
            }
            SessionError::UnexpectedMessage(_) => {
                PgError::fatal(PROTOCOL_VIOLATION, self.to_string())
            }
            SessionError::Shutdown => PgError::fatal(ADMIN_SHUTDOWN, self.to_string()),
            SessionError::ClientIo(_) | SessionError::WriteTimeout => {
                PgError::fatal(CONNECTION_FAILURE, self.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::events::TransitionKind;

    #[test]
    fn refused_node_commands_map_to_55000_with_their_text() {
        for e in [
            CommandError::NoSuchNode {
                node: NodeId::new(7),
            },
            CommandError::PartOfTransition {
                node: NodeId::new(1),
                kind: TransitionKind::Failover,
            },
            CommandError::PromotionDisabled,
        ] {
            let pg = e.to_pg_error();
            assert_eq!((&*pg.code, pg.message.as_str()), ("55000", &*e.to_string()));
        }
    }
}
