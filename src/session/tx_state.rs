//! The client's transaction as the session tracks it: whether a transaction
//! block is open, whether pgpilot has aborted it on the client's behalf, and
//! whether the prediction can be trusted yet.
//!
//! The block is *predicted* from what is sent (a BEGIN opens it, a COMMIT or
//! ROLLBACK closes it) and *corrected* by every ReadyForQuery of the
//! transaction's node once its requests are drained. The prediction is
//! [`Tx::uncertain`] while a request holding several statements with
//! transaction control (`COMMIT; BEGIN` …) is in flight: then only the
//! server's ReadyForQuery says where the session stands.
//!
//! pgpool mode balances reads inside a transaction off its node. When such a
//! read fails, the transaction PostgreSQL would have aborted is still open on
//! the primary: pgpilot aborts it for the client ([`TxState::Aborted`]),
//! refuses its statements (25P02) and turns its COMMIT into ROLLBACK, until
//! the transaction's node reports it ended.
//!
//! ```text
//!                 begin / correct(true)
//!          Idle ─────────────────────────► InBlock
//!           ▲  ◄─────────────────────────   │  ▲
//!           │    end_sent / correct(false)   │  │ savepoint rolled back
//!           │                   failed read  │  │ (clear_abort)
//! clear_abort                 (abort_client) ▼  │
//!  (node idle)                              Aborted
//!           │    end_sent / correct(false)   │  ▲
//!    EndingAborted ◄──────────────────────────┘  │
//!                  ─────────────────────────────┘
//!                     begin / correct(true)
//! ```
//!
//! The two bits behind it (a block is open; the client's transaction is
//! aborted) change independently, so a COMMIT sent for an aborted transaction
//! leaves it [`TxState::EndingAborted`] until the node reports idle.

/// Whether a transaction block is open and whether pgpilot aborted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum TxState {
    /// No transaction block.
    #[default]
    Idle,
    /// A transaction block is open.
    InBlock,
    /// A transaction block is open and pgpilot aborted it for the client: a
    /// read balanced off its node failed.
    Aborted,
    /// The client ended an aborted transaction (its COMMIT or ROLLBACK is
    /// sent); the transaction's node has not reported idle yet.
    EndingAborted,
}

/// The session's transaction tracking.
#[derive(Debug, Default)]
pub(super) struct Tx {
    /// The block, and pgpilot's abort of it.
    pub(super) state: TxState,
    /// The prediction is unreliable until in-flight requests are answered.
    pub(super) uncertain: bool,
}

impl Tx {
    /// Inside a transaction block, as predicted and corrected.
    pub(super) fn in_block(&self) -> bool {
        matches!(self.state, TxState::InBlock | TxState::Aborted)
    }

    /// pgpilot aborted the client's transaction and it has not ended yet.
    pub(super) fn client_aborted(&self) -> bool {
        matches!(self.state, TxState::Aborted | TxState::EndingAborted)
    }

    /// A transaction block opens (BEGIN sent).
    pub(super) fn begin(&mut self) {
        self.correct(true);
    }

    /// The client ended the block (COMMIT, ROLLBACK or PREPARE TRANSACTION sent).
    pub(super) fn end_sent(&mut self) {
        self.correct(false);
    }

    /// The transaction's node says whether a block is open.
    pub(super) fn correct(&mut self, in_block: bool) {
        self.state = match (in_block, self.client_aborted()) {
            (false, false) => TxState::Idle,
            (true, false) => TxState::InBlock,
            (true, true) => TxState::Aborted,
            (false, true) => TxState::EndingAborted,
        };
    }

    /// A read balanced off the transaction's node failed inside the block:
    /// the client's transaction is aborted.
    pub(super) fn abort_client(&mut self) {
        if self.state == TxState::InBlock {
            self.state = TxState::Aborted;
        }
    }

    /// The abort is over: the transaction's node reported idle, or the client
    /// rolled back to a savepoint.
    pub(super) fn clear_abort(&mut self) {
        self.state = match self.state {
            TxState::Aborted => TxState::InBlock,
            TxState::EndingAborted => TxState::Idle,
            s => s,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_bits_change_independently() {
        let mut t = Tx::default();
        assert!(!t.in_block() && !t.client_aborted());
        t.abort_client();
        assert_eq!(t.state, TxState::Idle, "no block, nothing to abort");
        t.begin();
        t.abort_client();
        assert_eq!(t.state, TxState::Aborted);
        assert!(t.in_block() && t.client_aborted());
        t.end_sent();
        assert_eq!(t.state, TxState::EndingAborted);
        assert!(!t.in_block() && t.client_aborted());
        t.correct(true);
        assert_eq!(t.state, TxState::Aborted, "the node says the block is open");
        t.clear_abort();
        assert_eq!(t.state, TxState::InBlock);
        t.end_sent();
        t.clear_abort();
        assert_eq!(t.state, TxState::Idle);
    }
}
