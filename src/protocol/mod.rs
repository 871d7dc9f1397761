//! The PostgreSQL v3 wire protocol, as far as pgpilot needs it.
//!
//! This layer knows bytes, not policy: framing of client and server streams
//! ([`frame`]), the startup packet ([`startup`]), the few messages pgpilot
//! writes itself ([`messages`]), and server-side password checks ([`auth`]).
//! Client SQL is never decoded into a different encoding or re-encoded: frames
//! are forwarded as the raw bytes that arrived.

pub mod auth;
pub mod frame;
pub mod lsn;
pub mod messages;
pub mod shape;
pub mod startup;

pub use startup::CancelKey;

/// Message type bytes used by pgpilot (frontend and backend share one space).
pub mod tag {
    /// Frontend: simple Query.
    pub const QUERY: u8 = b'Q';
    /// Frontend: Parse (extended protocol).
    pub const PARSE: u8 = b'P';
    /// Frontend: Bind.
    pub const BIND: u8 = b'B';
    /// Frontend: Execute. Backend: ErrorResponse.
    pub const EXECUTE: u8 = b'E';
    /// Frontend: Describe. Backend: DataRow.
    pub const DESCRIBE: u8 = b'D';
    /// Frontend: Close. Backend: CommandComplete.
    pub const CLOSE: u8 = b'C';
    /// Frontend: Flush.
    pub const FLUSH: u8 = b'H';
    /// Frontend: Sync. Backend: ParameterStatus.
    pub const SYNC: u8 = b'S';
    /// Frontend: FunctionCall.
    pub const FUNCTION_CALL: u8 = b'F';
    /// Frontend: Terminate.
    pub const TERMINATE: u8 = b'X';
    /// Both directions: CopyData.
    pub const COPY_DATA: u8 = b'd';
    /// Both directions: CopyDone.
    pub const COPY_DONE: u8 = b'c';
    /// Frontend: CopyFail.
    pub const COPY_FAIL: u8 = b'f';
    /// Frontend: password / SASL messages.
    pub const PASSWORD: u8 = b'p';
    /// Backend: ReadyForQuery.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// Backend: ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// Backend: NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// Backend: ParameterStatus.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// Backend: BackendKeyData.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// Backend: Authentication*.
    pub const AUTHENTICATION: u8 = b'R';
    /// Backend: CopyInResponse.
    pub const COPY_IN_RESPONSE: u8 = b'G';
    /// Backend: CopyOutResponse.
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    /// Backend: CopyBothResponse.
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    /// Backend: ParseComplete.
    pub const PARSE_COMPLETE: u8 = b'1';
    /// Backend: DataRow (same byte as frontend Describe).
    pub const DATA_ROW: u8 = b'D';
    /// Backend: CommandComplete (same byte as frontend Close).
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// Backend: CloseComplete.
    pub const CLOSE_COMPLETE: u8 = b'3';
    /// Backend: ParameterDescription (answers a Describe of a statement).
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    /// Backend: RowDescription.
    pub const ROW_DESCRIPTION: u8 = b'T';
    /// Backend: NoData.
    pub const NO_DATA: u8 = b'n';
    /// Backend: NotificationResponse.
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    /// Backend: NegotiateProtocolVersion.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Transaction status as reported by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
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
    pub fn from_byte(b: u8) -> TxStatus {
        match b {
            b'I' => TxStatus::Idle,
            b'E' => TxStatus::Failed,
            _ => TxStatus::InTransaction,
        }
    }

    /// The status byte as sent on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
