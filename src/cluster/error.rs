//! The cluster layer's errors: why the state machine refused a coordinator
//! step ([`StepError`]) or an operator's node command ([`CommandError`]),
//! and why a query pgpilot ran on a node itself failed ([`NodeQueryError`]).
//! The steps built on those queries have their own enums next to them
//! (`promote::PromoteError`, `follow::FollowError`, `hooks::HookError`,
//! `switchover::SwitchoverError`, `failover::SearchError`).
//!
//! Their texts are what operators read (in the answer to `ATTACH`, `DETACH`
//! and `PROMOTE NODE`, in logs), so a variant's message says what is wrong
//! and what to do. A refused command reaches its client as an
//! ErrorResponse; that mapping (SQLSTATE 55000) and its test are in `crate::error`.

use std::time::Duration;

use super::events::{Phase, TransitionKind};
use super::health::describe;

use crate::config::NodeId;

/// A query the coordinator ran on a node as the `[monitor]` role (its own
/// connection, closed after) failed. Its text is one line, with the server's
/// SQLSTATE when the node sent one, and never a password: it is shown in
/// `SHOW PGPILOT_FAILOVER` and in hold reasons.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeQueryError {
    /// No backend has that id.
    #[error("no node {node}")]
    NoSuchNode {
        /// The id asked for.
        node: NodeId,
    },
    /// Connecting (or logging in) failed.
    #[error("{}", describe(.source))]
    Connect {
        /// The node.
        node: NodeId,
        /// What tokio-postgres reported.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The query failed.
    #[error("{}", describe(.source))]
    Query {
        /// The node.
        node: NodeId,
        /// What tokio-postgres reported.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Connect and query together took longer than the limit.
    #[error("node {node}: no answer within {limit:?}")]
    Timeout {
        /// The node.
        node: NodeId,
        /// The limit.
        limit: Duration,
    },
    /// The query returned no row where one was expected.
    #[error("no row")]
    NoRow {
        /// The node.
        node: NodeId,
    },
}

/// A step the failover coordinator reports for transition `id` was refused:
/// the transition moved on without it. Never a fault of the step itself; the
/// caller logs it and stops working on that transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StepError {
    /// Another transition replaced it, or it ended (cancelled, failed,
    /// finished) while the step ran.
    #[error("transition {id} is no longer in progress")]
    Superseded {
        /// The transition the step was for.
        id: u64,
    },
    /// The old primary answered after a node was promoted: too late to
    /// cancel.
    #[error("transition {id} already promoted a node")]
    AlreadyPromoted {
        /// The transition.
        id: u64,
    },
    /// The node found as the new primary is held out of service (fenced,
    /// detached, cannot follow), so it is never published.
    #[error("node {node} is held out of service")]
    Held {
        /// The node.
        node: NodeId,
    },
}

/// An operator's node command (`ATTACH NODE`, `DETACH NODE`,
/// `PROMOTE NODE`) was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CommandError {
    /// No backend has that id.
    #[error("there is no node {node}")]
    NoSuchNode {
        /// The id given.
        node: NodeId,
    },
    /// The node is the old primary or the target of the transition in
    /// progress.
    #[error("node {node} is part of the {} in progress", .kind.as_str())]
    PartOfTransition {
        /// The node.
        node: NodeId,
        /// The transition in progress.
        kind: TransitionKind,
    },
    /// `ATTACH NODE` of a node that claims to be a primary next to the
    /// published one.
    #[error(
        "node {node} reports pg_is_in_recovery() = false while node {primary} is the primary: rebuild it as a standby of node {primary} (pg_rewind or pg_basebackup), then attach it"
    )]
    SecondPrimary {
        /// The node to attach.
        node: NodeId,
        /// The published primary.
        primary: NodeId,
    },
    /// `DETACH NODE` of the primary.
    #[error("node {node} is the primary: move the primary first with PROMOTE NODE <standby>")]
    DetachPrimary {
        /// The node.
        node: NodeId,
    },
    /// `PROMOTE NODE` with `failover.mode = "none"`.
    #[error(
        "failover.mode = \"none\": pgpilot promotes nothing (promote the node yourself; pgpilot notices)"
    )]
    PromotionDisabled,
    /// `PROMOTE NODE` of the primary.
    #[error("node {node} is already the primary")]
    AlreadyPrimary {
        /// The node.
        node: NodeId,
    },
    /// `PROMOTE NODE` of a node that is not an in-service standby.
    #[error(
        "node {node} is not an in-service standby (status {}, role {})",
        .status.as_str(),
        .role.as_str()
    )]
    NotStandby {
        /// The node.
        node: NodeId,
        /// Its status.
        status: super::NodeStatus,
        /// Its role.
        role: super::Role,
    },
    /// A switchover was asked for while a transition is in progress.
    #[error("a {} is already in progress", .kind.as_str())]
    Busy {
        /// The transition in progress.
        kind: TransitionKind,
    },
    /// A switchover was asked for with no primary in service.
    #[error("there is no primary in service to switch over from")]
    NoPrimary,
    /// `PROMOTE NODE` while a transition is in progress that no longer
    /// takes a candidate (promoting, searching, or a switchover).
    #[error("a {} is in progress ({})", .kind.as_str(), .phase.as_str())]
    CandidateTooLate {
        /// The transition in progress.
        kind: TransitionKind,
        /// Its phase.
        phase: Phase,
    },
    /// A candidate was forced with no failover in progress.
    #[error("no failover is waiting for a candidate")]
    NoFailoverWaiting,
    /// Coordination through etcd is on and the command could not be handed
    /// to the leader (etcd unreachable, no leader).
    #[error("not sent to the leading pgpilot: {message}")]
    Coordination {
        /// Why.
        message: String,
    },
    /// The leading pgpilot ran a command forwarded to it and refused it.
    #[error("the leading pgpilot {leader} refused it: {message}")]
    RefusedByLeader {
        /// The leader's name.
        leader: String,
        /// Its refusal, as it would have answered it.
        message: String,
    },
    /// The leading pgpilot did not confirm a forwarded command in time.
    #[error(
        "the leading pgpilot {leader} did not confirm within {} s; the command may still be applied (SHOW PGPILOT_NODES shows it)",
        .waited.as_secs()
    )]
    LeaderSilent {
        /// The leader's name when the command was sent.
        leader: String,
        /// How long this instance waited.
        waited: std::time::Duration,
    },
    /// `failover.mode = "patroni"`: Patroni refused or failed the
    /// switchover, or could not be asked.
    #[error("Patroni: {message}")]
    Patroni {
        /// Patroni's answer, or why it could not be asked.
        message: String,
    },
    /// `REJOIN NODE` with `failover.rejoin = "off"`.
    #[error(
        "failover.rejoin = \"off\": rebuild node {node} as a standby yourself (pg_rewind or pg_basebackup), then ATTACH NODE {node}"
    )]
    RejoinOff {
        /// The node.
        node: NodeId,
    },
    /// `REJOIN NODE` of a node that is neither fenced nor diverged.
    #[error(
        "node {node} is neither a fenced old primary nor a diverged standby: nothing to rejoin"
    )]
    NotRejoinable {
        /// The node.
        node: NodeId,
    },
    /// A rejoin of the node runs already.
    #[error("a rejoin of node {node} is already running (SHOW PGPILOT_NODES shows its progress)")]
    RejoinRunning {
        /// The node.
        node: NodeId,
    },
}

impl StepError {
    /// Log a refused step of the coordinator (`step` names it): nothing else
    /// records that a transition moved on without it. A held node found as
    /// the only primary is an operator's concern (warn); a superseded or
    /// already promoted transition is the normal end of a race (info).
    pub(super) fn log(&self, step: &'static str) {
        match self {
            StepError::Held { node } => {
                tracing::warn!(%node, step, error = %self, "transition step refused")
            }
            StepError::Superseded { id } | StepError::AlreadyPromoted { id } => {
                tracing::info!(transition = id, step, error = %self, "transition step not applied")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeStatus, Role};

    #[test]
    fn refusals_keep_the_texts_operators_see() {
        let cases = [
            (
                CommandError::NoSuchNode {
                    node: NodeId::new(7),
                },
                "there is no node 7",
            ),
            (
                CommandError::PartOfTransition {
                    node: NodeId::new(1),
                    kind: TransitionKind::Failover,
                },
                "node 1 is part of the failover in progress",
            ),
            (
                CommandError::NotStandby {
                    node: NodeId::new(2),
                    status: NodeStatus::Down,
                    role: Role::Unknown,
                },
                "node 2 is not an in-service standby (status down, role unknown)",
            ),
            (
                CommandError::CandidateTooLate {
                    kind: TransitionKind::Switchover,
                    phase: Phase::Draining,
                },
                "a switchover is in progress (draining)",
            ),
            (
                CommandError::PromotionDisabled,
                "failover.mode = \"none\": pgpilot promotes nothing (promote the node yourself; pgpilot notices)",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
        assert_eq!(
            StepError::Superseded { id: 4 }.to_string(),
            "transition 4 is no longer in progress"
        );
    }

    #[test]
    fn io_errors_keep_the_texts_shown_in_details_and_holds() {
        use crate::cluster::follow::FollowError;
        use crate::cluster::promote::PromoteError;
        use crate::cluster::switchover::SwitchoverError;
        let timeout = NodeQueryError::Timeout {
            node: NodeId::new(2),
            limit: Duration::from_secs(1),
        };
        assert_eq!(timeout.to_string(), "node 2: no answer within 1s");
        let none = PromoteError::NoneAnswered {
            errors: vec![
                (
                    NodeId::new(1),
                    PromoteError::NotInRecovery {
                        node: NodeId::new(1),
                    },
                ),
                (NodeId::new(2), PromoteError::Query(timeout)),
            ],
        };
        assert_eq!(
            none.to_string(),
            "no candidate answered: node 1: node 1 is not in recovery; node 2: node 2: no answer within 1s"
        );
        let far = PromoteError::TooFarBehind {
            node: NodeId::new(1),
            lsn: 0x1_0000_0000,
            reference: 0x1_0000_0100,
            behind: 256,
            max_lag: 16,
        };
        assert_eq!(
            far.to_string(),
            "refused: the most advanced standby, node 1, is at 1/0, 256 bytes behind the failed primary's last known position 1/100 (failover.max_lag_bytes = 16); waiting (PROMOTE NODE 1 forces it)"
        );
        let diverged = FollowError::Diverged {
            node: NodeId::new(2),
            replay: 0x30,
            switch: 0x20,
        };
        assert!(diverged.to_string().starts_with(
            "diverged: replayed up to 0/30 past the new primary's timeline switch at 0/20;"
        ));
        let behind = SwitchoverError::NotCaughtUp {
            node: NodeId::new(1),
            at: 0x10,
            wanted: 0x20,
        };
        assert_eq!(
            behind.to_string(),
            "node 1 did not catch up: at 0/10, old primary at 0/20"
        );
    }
}
