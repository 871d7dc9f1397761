//! The PostgreSQL v3 wire protocol, as far as pgpilot needs it.
//!
//! This layer knows bytes, not policy: framing of client and server streams
//! ([`frame`]), the startup packet ([`startup`]), the few messages pgpilot
//! writes itself ([`messages`]), and server-side password checks ([`auth`]).
//! Client SQL is never decoded into a different encoding or re-encoded: frames
//! are forwarded as the raw bytes that arrived.

pub(crate) mod auth;
pub mod frame;
pub(crate) mod lsn;
pub(crate) mod messages;
pub(crate) mod shape;
pub(crate) mod startup;

pub(crate) use startup::CancelKey;

/// Message type bytes used by pgpilot (frontend and backend share one space).
pub(crate) mod tag {
    /// Frontend: simple Query.
    pub(crate) const QUERY: u8 = b'Q';
    /// Frontend: Parse (extended protocol).
    pub(crate) const PARSE: u8 = b'P';
    /// Frontend: Bind.
    pub(crate) const BIND: u8 = b'B';
    /// Frontend: Execute. Backend: ErrorResponse.
    pub(crate) const EXECUTE: u8 = b'E';
    /// Frontend: Describe. Backend: DataRow.
    pub(crate) const DESCRIBE: u8 = b'D';
    /// Frontend: Close. Backend: CommandComplete.
    pub(crate) const CLOSE: u8 = b'C';
    /// Frontend: Flush.
    pub(crate) const FLUSH: u8 = b'H';
    /// Frontend: Sync. Backend: ParameterStatus.
    pub(crate) const SYNC: u8 = b'S';
    /// Frontend: FunctionCall.
    pub(crate) const FUNCTION_CALL: u8 = b'F';
    /// Frontend: Terminate.
    pub(crate) const TERMINATE: u8 = b'X';
    /// Both directions: CopyData.
    pub(crate) const COPY_DATA: u8 = b'd';
    /// Both directions: CopyDone.
    pub(crate) const COPY_DONE: u8 = b'c';
    /// Frontend: CopyFail.
    pub(crate) const COPY_FAIL: u8 = b'f';
    /// Frontend: password / SASL messages.
    pub(crate) const PASSWORD: u8 = b'p';
    /// Backend: ReadyForQuery.
    pub(crate) const READY_FOR_QUERY: u8 = b'Z';
    /// Backend: ErrorResponse.
    pub(crate) const ERROR_RESPONSE: u8 = b'E';
    /// Backend: NoticeResponse.
    pub(crate) const NOTICE_RESPONSE: u8 = b'N';
    /// Backend: ParameterStatus.
    pub(crate) const PARAMETER_STATUS: u8 = b'S';
    /// Backend: BackendKeyData.
    pub(crate) const BACKEND_KEY_DATA: u8 = b'K';
    /// Backend: Authentication*.
    pub(crate) const AUTHENTICATION: u8 = b'R';
    /// Backend: CopyInResponse.
    pub(crate) const COPY_IN_RESPONSE: u8 = b'G';
    /// Backend: CopyOutResponse.
    pub(crate) const COPY_OUT_RESPONSE: u8 = b'H';
    /// Backend: CopyBothResponse.
    pub(crate) const COPY_BOTH_RESPONSE: u8 = b'W';
    /// Backend: ParseComplete.
    pub(crate) const PARSE_COMPLETE: u8 = b'1';
    /// Backend: DataRow (same byte as frontend Describe).
    pub(crate) const DATA_ROW: u8 = b'D';
    /// Backend: CommandComplete (same byte as frontend Close).
    pub(crate) const COMMAND_COMPLETE: u8 = b'C';
    /// Backend: CloseComplete.
    pub(crate) const CLOSE_COMPLETE: u8 = b'3';
    /// Backend: ParameterDescription (answers a Describe of a statement).
    pub(crate) const PARAMETER_DESCRIPTION: u8 = b't';
    /// Backend: RowDescription.
    pub(crate) const ROW_DESCRIPTION: u8 = b'T';
    /// Backend: NoData.
    pub(crate) const NO_DATA: u8 = b'n';
    /// Backend: NotificationResponse.
    pub(crate) const NOTIFICATION_RESPONSE: u8 = b'A';
    /// Backend: NegotiateProtocolVersion.
    pub(crate) const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Transaction status as reported by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    /// Decode the ReadyForQuery status byte; unknown bytes are treated as in-transaction
    /// (the conservative answer: such a connection is never reused).
    pub(crate) fn from_byte(b: u8) -> TxStatus {
        match b {
            b'I' => TxStatus::Idle,
            b'E' => TxStatus::Failed,
            _ => TxStatus::InTransaction,
        }
    }

    /// The status byte as sent on the wire.
    pub(crate) fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
