//! The routing policy: given a statement's classification, the session's routing
//! state and a cluster snapshot, which node runs it. Pure functions, no I/O.
//!
//! The rules, in order:
//! 1. Inside a transaction, every statement runs where the transaction began
//!    (one snapshot per transaction). With `disable_load_balance_on_write =
//!    "transaction"` (pgpool's behaviour) reads before the transaction's first
//!    write run on the standby instead — outside the transaction's snapshot.
//! 2. A `/* pgpilot:primary */` leading comment wins; `/* pgpilot:standby */` wins
//!    for a statement that is structurally a read (it overrides the judgement of
//!    unknown or volatile functions, never a write).
//! 3. `SET pgpilot.route = 'primary'`, and sessions made sticky (temp tables,
//!    LISTEN, session advisory locks …) use the primary.
//! 4. BEGIN / START TRANSACTION: READ ONLY transactions (explicit, or by the
//!    session's `default_transaction_read_only`) run on the session's standby,
//!    all others on the primary — as do those whose BEGIN is classified Write
//!    (`READ WRITE` or `SERIALIZABLE`, which a hot standby cannot start).
//! 5. Writes (and anything the classifier is not sure of) → primary.
//! 6. Reads → the session's standby when load balancing is on and one is usable,
//!    else the primary.

use super::classify::{Access, Classification, TxControl};
use super::normalize::Hint;

use crate::config::NodeId;

/// The setting is read from the configuration; the router only follows it.
pub use crate::config::BalanceInTransaction;

/// Routing knobs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Send reads to standbys at all.
    pub(crate) load_balance: bool,
    /// Balancing inside transactions.
    pub(crate) in_transaction: BalanceInTransaction,
}

/// Per-session routing state. Owned by the session, updated by it after each
/// statement; the router only reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RouteState {
    /// The session's load-balance node (a standby, or the primary if it is in the read pool).
    pub(crate) standby: Option<NodeId>,
    /// The session must stay on the primary (temp table, LISTEN, advisory lock …).
    pub(crate) sticky_primary: bool,
    /// `SET pgpilot.route = 'primary'`.
    pub(crate) forced_primary: bool,
    /// `default_transaction_read_only` is on for the session.
    pub(crate) read_only_default: bool,
    /// The node the open transaction runs on, while the session is in one.
    pub(crate) tx_node: Option<NodeId>,
    /// The open transaction has sent a write (pgpool mode).
    pub(crate) tx_wrote: bool,
}

/// Where a statement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// A node id.
    Node(NodeId),
    /// The primary is needed but none is known.
    NoPrimary,
}

/// Decide the node for one statement (or one extended-protocol batch).
///
/// `in_tx` is true while the session's last ReadyForQuery said `T` or `E`.
pub(crate) fn decide(
    policy: &Policy,
    state: &RouteState,
    class: &Classification,
    hint: Option<Hint>,
    in_tx: bool,
    primary: Option<NodeId>,
) -> Decision {
    let to_primary = || primary.map_or(Decision::NoPrimary, Decision::Node);
    let to_standby = || state.standby.map_or_else(to_primary, Decision::Node);
    if in_tx {
        if let Some(node) = state.tx_node {
            let balanced = policy.in_transaction == BalanceInTransaction::Transaction
                && policy.load_balance
                && Some(node) == primary
                && !state.tx_wrote
                && !state.sticky_primary
                && !state.forced_primary
                && class.access == Access::Read
                && class.tx.is_none()
                && !class.session_state
                && class.prepare.is_none()
                && class.execute.is_none();
            return if balanced {
                to_standby()
            } else {
                Decision::Node(node)
            };
        }
        // In a transaction we did not see begin (should not happen): be safe.
        return to_primary();
    }
    match hint {
        Some(Hint::Primary) => return to_primary(),
        Some(Hint::Standby) if class.tx.is_none() && class.access == Access::Read => {
            return to_standby();
        }
        _ => {}
    }
    if state.forced_primary || state.sticky_primary || !policy.load_balance {
        return to_primary();
    }
    if let Some(TxControl::Begin { read_only }) = &class.tx {
        // A BEGIN classified Write (READ WRITE, SERIALIZABLE) cannot start on a standby.
        let read_only = *read_only || state.read_only_default;
        return if read_only && class.access == Access::Read {
            to_standby()
        } else {
            to_primary()
        };
    }
    if class.access == Access::Write || class.tx.is_some() || class.sticky_primary {
        return to_primary();
    }
    to_standby()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(access: Access) -> Classification {
        Classification {
            access,
            statements: 1,
            ..Classification::empty()
        }
    }

    const P: Policy = Policy {
        load_balance: true,
        in_transaction: BalanceInTransaction::Off,
    };

    fn st() -> RouteState {
        RouteState {
            standby: Some(NodeId::new(2)),
            ..Default::default()
        }
    }

    #[test]
    fn reads_to_standby_writes_to_primary() {
        assert_eq!(
            decide(
                &P,
                &st(),
                &class(Access::Read),
                None,
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(2))
        );
        assert_eq!(
            decide(
                &P,
                &st(),
                &class(Access::Write),
                None,
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        assert_eq!(
            decide(&P, &st(), &class(Access::Write), None, false, None),
            Decision::NoPrimary
        );
        let no_standby = RouteState::default();
        assert_eq!(
            decide(
                &P,
                &no_standby,
                &class(Access::Read),
                None,
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        let off = Policy {
            load_balance: false,
            ..P
        };
        assert_eq!(
            decide(
                &off,
                &st(),
                &class(Access::Read),
                None,
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
    }

    #[test]
    fn transactions_stay_on_one_node() {
        let mut begin = class(Access::Read);
        begin.tx = Some(TxControl::Begin { read_only: false });
        assert_eq!(
            decide(&P, &st(), &begin, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(0))
        );
        let mut ro = begin.clone();
        ro.tx = Some(TxControl::Begin { read_only: true });
        assert_eq!(
            decide(&P, &st(), &ro, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(2))
        );
        // A read-only BEGIN classified Write (SERIALIZABLE, READ WRITE) needs the
        // primary, also in a session whose default is read-only.
        let mut serializable = class(Access::Write);
        serializable.tx = Some(TxControl::Begin { read_only: true });
        assert_eq!(
            decide(&P, &st(), &serializable, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(0))
        );
        let mut ro_session = st();
        ro_session.read_only_default = true;
        let mut read_write = class(Access::Write);
        read_write.tx = Some(TxControl::Begin { read_only: false });
        assert_eq!(
            decide(
                &P,
                &ro_session,
                &read_write,
                None,
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        assert_eq!(
            decide(&P, &ro_session, &begin, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(2))
        );
        let mut in_tx = st();
        in_tx.tx_node = Some(NodeId::new(0));
        assert_eq!(
            decide(
                &P,
                &in_tx,
                &class(Access::Read),
                None,
                true,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        in_tx.tx_node = Some(NodeId::new(2));
        // A write in a READ ONLY transaction goes where the transaction is: the
        // server rejects it exactly as PostgreSQL would.
        assert_eq!(
            decide(
                &P,
                &in_tx,
                &class(Access::Write),
                None,
                true,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(2))
        );
        let mut rodefault = st();
        rodefault.read_only_default = true;
        assert_eq!(
            decide(&P, &rodefault, &begin, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(2))
        );
    }

    #[test]
    fn pgpool_mode_balances_reads_until_the_first_write() {
        let pool = Policy {
            in_transaction: BalanceInTransaction::Transaction,
            ..P
        };
        let mut s = st();
        s.tx_node = Some(NodeId::new(0));
        assert_eq!(
            decide(
                &pool,
                &s,
                &class(Access::Read),
                None,
                true,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(2))
        );
        assert_eq!(
            decide(
                &pool,
                &s,
                &class(Access::Write),
                None,
                true,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        s.tx_wrote = true;
        assert_eq!(
            decide(
                &pool,
                &s,
                &class(Access::Read),
                None,
                true,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
    }

    #[test]
    fn hints_sticky_and_forced() {
        let r = class(Access::Read);
        assert_eq!(
            decide(
                &P,
                &st(),
                &r,
                Some(Hint::Primary),
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        // The standby hint never sends a write to a standby.
        assert_eq!(
            decide(
                &P,
                &st(),
                &class(Access::Write),
                Some(Hint::Standby),
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(0))
        );
        let mut sticky_read = st();
        sticky_read.sticky_primary = true;
        assert_eq!(
            decide(
                &P,
                &sticky_read,
                &r,
                Some(Hint::Standby),
                false,
                Some(NodeId::new(0))
            ),
            Decision::Node(NodeId::new(2))
        );
        let mut sticky = st();
        sticky.sticky_primary = true;
        assert_eq!(
            decide(&P, &sticky, &r, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(0))
        );
        let mut forced = st();
        forced.forced_primary = true;
        assert_eq!(
            decide(&P, &forced, &r, None, false, Some(NodeId::new(0))),
            Decision::Node(NodeId::new(0))
        );
    }
}
