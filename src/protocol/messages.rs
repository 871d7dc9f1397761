//! Messages pgpilot writes itself (never client SQL): authentication requests,
//! errors, startup parameters, key data, ReadyForQuery and simple result sets.
//!
//! Encoding is delegated to pgwire's message types; every function appends to a
//! caller-owned buffer so several messages leave in one socket write.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};

use super::{CancelKey, TxStatus};

/// Severity of an error pgpilot reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error as the client will see it: severity, SQLSTATE, message, optional detail/hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgError {
    /// ERROR or FATAL.
    pub(crate) severity: Severity,
    /// Five-character SQLSTATE (borrowed for pgpilot's own codes, owned when relayed).
    pub(crate) code: Cow<'static, str>,
    /// Primary human-readable message.
    pub(crate) message: String,
    /// Optional DETAIL line.
    pub(crate) detail: Option<String>,
    /// Optional HINT line.
    pub(crate) hint: Option<String>,
}

impl PgError {
    /// An ERROR-severity message.
    pub(crate) fn error(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: Severity::Error,
            code: Cow::Borrowed(code),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A FATAL-severity message (the connection closes after it).
    pub(crate) fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: Severity::Fatal,
            ..PgError::error(code, message)
        }
    }

    /// Attach a HINT.
    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }

    fn fields(&self) -> Vec<(u8, String)> {
        let mut f = vec![
            (b'S', self.severity.as_str().to_string()),
            (b'V', self.severity.as_str().to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            f.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            f.push((b'H', h.clone()));
        }
        f
    }

    /// Append this error as an ErrorResponse.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        encode(buf, &ErrorResponse::new(self.fields()));
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

fn encode<M: Message>(buf: &mut BytesMut, m: &M) {
    // Encoding into a BytesMut cannot fail for the well-formed values built here.
    if let Err(e) = m.encode(buf) {
        tracing::error!(error = %e, "failed to encode a protocol message");
    }
}

/// AuthenticationOk.
pub(crate) fn auth_ok(buf: &mut BytesMut) {
    encode(buf, &Authentication::Ok);
}

/// AuthenticationCleartextPassword.
pub(crate) fn auth_cleartext(buf: &mut BytesMut) {
    encode(buf, &Authentication::CleartextPassword);
}

/// AuthenticationMD5Password with a 4-byte salt.
pub(crate) fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    encode(buf, &Authentication::MD5Password(salt.to_vec()));
}

/// AuthenticationSASL offering SCRAM-SHA-256.
pub(crate) fn auth_sasl(buf: &mut BytesMut) {
    encode(buf, &Authentication::SASL(vec!["SCRAM-SHA-256".into()]));
}

/// AuthenticationSASLContinue.
pub(crate) fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    encode(
        buf,
        &Authentication::SASLContinue(Bytes::copy_from_slice(data)),
    );
}

/// AuthenticationSASLFinal.
pub(crate) fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    encode(
        buf,
        &Authentication::SASLFinal(Bytes::copy_from_slice(data)),
    );
}

/// ParameterStatus.
pub(crate) fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    encode(buf, &ParameterStatus::new(name.into(), value.into()));
}

/// BackendKeyData with pgpilot's own key for this client (not a server's).
pub(crate) fn backend_key_data(buf: &mut BytesMut, key: CancelKey) {
    encode(
        buf,
        &BackendKeyData::new(key.pid, SecretKey::I32(key.secret)),
    );
}

/// ReadyForQuery.
pub(crate) fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    let s = match status {
        TxStatus::Idle => TransactionStatus::Idle,
        TxStatus::InTransaction => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
    };
    encode(buf, &ReadyForQuery::new(s));
}

/// NegotiateProtocolVersion: pgpilot speaks 3.0 and recognises no `_pq_` options.
pub(crate) fn negotiate_protocol_version(buf: &mut BytesMut, unrecognized: &[String]) {
    let len = 4 + 4 + 4 + unrecognized.iter().map(|o| o.len() + 1).sum::<usize>();
    buf.put_u8(b'v');
    buf.put_i32(len as i32);
    buf.put_i32(3 << 16);
    buf.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        buf.put_slice(o.as_bytes());
        buf.put_u8(0);
    }
}

/// RowDescription for columns that are all `text`.
pub(crate) fn row_description_text(buf: &mut BytesMut, columns: &[&str]) {
    const TEXT_OID: u32 = 25;
    let fields = columns
        .iter()
        .map(|c| FieldDescription::new((*c).into(), 0, 0, TEXT_OID, -1, -1, 0))
        .collect();
    encode(buf, &RowDescription::new(fields));
}

/// DataRow of text values (no NULLs).
pub(crate) fn data_row_text<S: AsRef<str>>(buf: &mut BytesMut, values: &[S]) {
    let mut data = BytesMut::new();
    for v in values {
        let v = v.as_ref().as_bytes();
        data.put_i32(v.len() as i32);
        data.put_slice(v);
    }
    encode(buf, &DataRow::new(data, values.len() as i16));
}

/// A message with no body (ParseComplete `1`, BindComplete `2`, CloseComplete
/// `3`, NoData `n`).
pub(crate) fn empty_message(buf: &mut BytesMut, tag: u8) {
    buf.put_u8(tag);
    buf.put_i32(4);
}

/// ParameterDescription for a statement without parameters.
pub(crate) fn no_parameters(buf: &mut BytesMut) {
    buf.put_u8(b't');
    buf.put_i32(6);
    buf.put_i16(0);
}

/// CommandComplete with the given tag (e.g. `SELECT 3`).
pub(crate) fn command_complete(buf: &mut BytesMut, tag: &str) {
    encode(buf, &CommandComplete::new(tag.into()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::ErrorFields;

    #[test]
    fn error_round_trips_through_our_parser() {
        let mut buf = BytesMut::new();
        PgError::fatal("28P01", "password authentication failed for user \"x\"").encode(&mut buf);
        assert_eq!(buf[0], b'E');
        let f = ErrorFields::parse(&buf[5..]);
        assert_eq!(f.code, "28P01");
        assert_eq!(f.severity, "FATAL");
    }

    #[test]
    fn ready_for_query_bytes() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, TxStatus::InTransaction);
        assert_eq!(&buf[..], b"Z\0\0\0\x05T");
    }
}
