//! Framing of the two byte streams pgpilot relays.
//!
//! * Client → server: [`next_frame`] cuts whole messages out of a buffer,
//!   checking the length prefix against the configured maximum *before* any
//!   memory is reserved for the body.
//! * Server → client: [`BackendScanner`] walks the stream message by message
//!   without buffering large messages (a 100 MB DataRow streams through), and
//!   reports only the few messages pgpilot must understand (ReadyForQuery,
//!   ErrorResponse, ParameterStatus, COPY mode changes, and ParseComplete /
//!   CloseComplete, which a session swallows for statements it prepared itself),
//!   each with its position so the caller can drop or patch it.

use bytes::BytesMut;

use super::shape::{Shape, ShapeHasher};
use super::tag;

/// Why a byte stream could not be framed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The length prefix exceeds the configured maximum.
    #[error("message length {len} exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length announced by the peer.
        len: u64,
        /// Configured maximum (`max_message_size`).
        max: usize,
    },
    /// The length prefix is smaller than the 4 bytes of the length itself.
    #[error("invalid message length {0}")]
    BadLength(i32),
}

/// A complete frontend message located in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Message type byte.
    pub(crate) tag: u8,
    /// Total size on the wire: type byte + length field + body.
    pub(crate) wire_len: usize,
}

impl Frame {
    /// The message body (after the 5-byte header) within `buf`, which must start at the frame.
    pub(crate) fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[5..self.wire_len]
    }
}

/// Look at the front of `buf` and return the first complete frame, `Ok(None)` when
/// more bytes are needed, or an error when the length is invalid or too large.
pub(crate) fn peek_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    if len as usize > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    let wire_len = len as usize + 1;
    if buf.len() < wire_len {
        return Ok(None);
    }
    Ok(Some(Frame {
        tag: buf[0],
        wire_len,
    }))
}

/// Bytes still missing from an incomplete (but valid) frame at the front of `buf`.
pub(crate) fn missing_bytes(buf: &[u8]) -> usize {
    if buf.len() < 5 {
        return 5 - buf.len();
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]).max(4) as usize;
    (len + 1).saturating_sub(buf.len())
}

/// [`peek_frame`] on a read buffer, reserving room for the rest of an incomplete
/// frame so the next read can complete it.
pub(crate) fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let f = peek_frame(buf, max)?;
    if f.is_none() {
        buf.reserve(missing_bytes(buf));
    }
    Ok(f)
}

/// Something in the server's stream that pgpilot acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackendEvent {
    /// ReadyForQuery with its transaction status byte.
    ReadyForQuery(u8),
    /// ErrorResponse: SQLSTATE and whether severity was FATAL or PANIC.
    Error {
        /// Five-character SQLSTATE (`XX000` when the server sent none).
        sqlstate: [u8; 5],
        /// FATAL/PANIC: the server will close the connection.
        fatal: bool,
    },
    /// ParameterStatus name and value.
    ParameterStatus(String, String),
    /// CopyInResponse / CopyOutResponse / CopyBothResponse.
    CopyStarted(u8),
    /// ParseComplete.
    ParseComplete,
    /// CloseComplete.
    CloseComplete,
    /// CommandComplete (its tag lies in the message, see [`Scanned`] offsets).
    CommandComplete,
    /// NotificationResponse: the notifying server process's PID (at offset 5).
    Notification(i32),
    /// ParameterDescription: the first half of the answer to a Describe of a
    /// statement.
    ParameterDescription,
    /// The RowDescription or NoData that follows a ParameterDescription: the
    /// statement's [`Shape`].
    StatementDescribed(Shape),
}

/// A decoded server message and where it lies in the scanned buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// What it says.
    pub(crate) event: BackendEvent,
    /// Offset of its type byte.
    pub(crate) start: usize,
    /// Offset just past its end.
    pub(crate) end: usize,
}

/// Incremental scanner for the server → client stream.
///
/// Feed it the read buffer with [`BackendScanner::scan`]; it returns how many leading
/// bytes form whole messages or pass-through parts of messages, which may be
/// forwarded as they are. Messages pgpilot decodes are small and held until complete.
#[derive(Debug, Default)]
pub(crate) struct BackendScanner {
    /// Bytes of the current pass-through message body not yet seen. Lets huge
    /// DataRow/CopyData messages flow without being buffered whole.
    remaining: usize,
    /// A ParameterDescription was seen: the RowDescription or NoData that
    /// follows it completes a statement's shape (other RowDescriptions pass
    /// through undecoded).
    params: Option<ShapeHasher>,
}

/// Message types the scanner decodes (and therefore holds until complete).
fn decoded(t: u8) -> bool {
    matches!(
        t,
        tag::READY_FOR_QUERY
            | tag::ERROR_RESPONSE
            | tag::PARAMETER_STATUS
            | tag::COPY_IN_RESPONSE
            | tag::COPY_OUT_RESPONSE
            | tag::COPY_BOTH_RESPONSE
            | tag::PARSE_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::COMMAND_COMPLETE
            | tag::NOTIFICATION_RESPONSE
    )
}

/// Largest message the scanner holds whole; a decoded type longer than this is a
/// protocol violation by the server.
const MAX_DECODED_LEN: usize = 1 << 20;

impl BackendScanner {
    /// True when the scanner sits on a message boundary (nothing half-forwarded).
    pub(crate) fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Scan `buf` from the start, pushing events (with their offsets in `buf`), and
    /// return the number of bytes that can be forwarded now. Bytes after that are an
    /// incomplete decoded message.
    pub(crate) fn scan(
        &mut self,
        buf: &[u8],
        events: &mut Vec<Scanned>,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min(buf.len() - pos);
                self.remaining -= take;
                pos += take;
                if self.remaining > 0 {
                    return Ok(pos);
                }
            }
            let rest = &buf[pos..];
            if rest.len() < 5 {
                return Ok(pos);
            }
            let t = rest[0];
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            if len < 4 {
                return Err(FrameError::BadLength(len));
            }
            let wire_len = len as usize + 1;
            let shape_part = t == tag::PARAMETER_DESCRIPTION
                || (self.params.is_some() && matches!(t, tag::ROW_DESCRIPTION | tag::NO_DATA));
            if decoded(t) || shape_part {
                if wire_len > MAX_DECODED_LEN {
                    return Err(FrameError::TooLarge {
                        len: len as u64,
                        max: MAX_DECODED_LEN,
                    });
                }
                if rest.len() < wire_len {
                    return Ok(pos);
                }
                let body = &rest[5..wire_len];
                let event = if shape_part {
                    self.shape_event(t, body)
                } else {
                    if matches!(t, tag::ERROR_RESPONSE | tag::READY_FOR_QUERY) {
                        // A Describe that failed after its ParameterDescription.
                        self.params = None;
                    }
                    decode_event(t, body)
                };
                events.push(Scanned {
                    event,
                    start: pos,
                    end: pos + wire_len,
                });
                pos += wire_len;
            } else {
                let take = wire_len.min(rest.len());
                pos += take;
                self.remaining = wire_len - take;
            }
        }
    }
}

impl BackendScanner {
    /// A message of a statement's Describe answer (rare: kept out of the
    /// scan loop's code).
    #[cold]
    #[inline(never)]
    fn shape_event(&mut self, t: u8, body: &[u8]) -> BackendEvent {
        match (t, self.params.take()) {
            (tag::PARAMETER_DESCRIPTION, _) => {
                self.params = Some(ShapeHasher::params(body));
                BackendEvent::ParameterDescription
            }
            (tag::ROW_DESCRIPTION, Some(h)) => {
                BackendEvent::StatementDescribed(h.finish(Some(body)))
            }
            (_, h) => {
                BackendEvent::StatementDescribed(h.unwrap_or(ShapeHasher::params(&[])).finish(None))
            }
        }
    }
}

fn decode_event(t: u8, body: &[u8]) -> BackendEvent {
    match t {
        tag::READY_FOR_QUERY => BackendEvent::ReadyForQuery(body.first().copied().unwrap_or(b'T')),
        tag::ERROR_RESPONSE => {
            let fields = ErrorFields::parse(body);
            let mut sqlstate = *b"XX000";
            if fields.code.len() == 5 {
                sqlstate.copy_from_slice(fields.code.as_bytes());
            }
            let fatal = matches!(fields.severity.as_str(), "FATAL" | "PANIC");
            BackendEvent::Error { sqlstate, fatal }
        }
        tag::PARAMETER_STATUS => {
            let mut parts = body.split(|b| *b == 0);
            let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            BackendEvent::ParameterStatus(name, value)
        }
        tag::PARSE_COMPLETE => BackendEvent::ParseComplete,
        tag::CLOSE_COMPLETE => BackendEvent::CloseComplete,
        tag::COMMAND_COMPLETE => BackendEvent::CommandComplete,
        tag::NOTIFICATION_RESPONSE => BackendEvent::Notification(
            body.first_chunk::<4>()
                .map_or(0, |b| i32::from_be_bytes(*b)),
        ),
        other => BackendEvent::CopyStarted(other),
    }
}

/// The fields of an ErrorResponse/NoticeResponse body that pgpilot uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    /// `V` (non-localized severity) or else `S`.
    pub(crate) severity: String,
    /// `C`: SQLSTATE.
    pub code: String,
    /// `M`: primary message.
    pub message: String,
}

impl ErrorFields {
    /// Parse an ErrorResponse body, tolerating truncation.
    pub fn parse(body: &[u8]) -> ErrorFields {
        let mut out = ErrorFields::default();
        let mut localized_severity = String::new();
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match code {
                b'V' => out.severity = value,
                b'S' => localized_severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or_default();
        }
        if out.severity.is_empty() {
            out.severity = localized_severity;
        }
        out
    }
}

/// Read a NUL-terminated string from the front of `buf`, returning it and the rest.
pub(crate) fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|b| *b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_are_cut_and_limits_checked() {
        let mut buf = BytesMut::from(&msg(b'Q', b"select 1\0")[..]);
        let f = next_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(&buf), b"select 1\0");
        let mut huge = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            next_frame(&mut huge, 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(
            huge.capacity() < 1 << 20,
            "no allocation for a rejected frame"
        );
        let mut bad = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert_eq!(next_frame(&mut bad, 100), Err(FrameError::BadLength(2)));
        let mut partial = BytesMut::from(&msg(b'Q', b"select 1\0")[..6]);
        assert_eq!(next_frame(&mut partial, 100), Ok(None));
    }

    #[test]
    fn scanner_streams_large_messages_and_decodes_small_ones() {
        let mut stream = msg(b'D', &vec![7u8; 10_000]);
        stream.extend(msg(b'S', b"TimeZone\0UTC\0"));
        stream.extend(msg(b'E', b"SFATAL\0VFATAL\0C57P01\0Mbye\0\0"));
        stream.extend(msg(b'Z', b"I"));
        let mut sc = BackendScanner::default();
        let mut events = vec![];
        // Feed in small chunks: forwarded bytes must add up, events must be in order.
        let mut forwarded = 0;
        let mut pending: Vec<u8> = vec![];
        for chunk in stream.chunks(333) {
            pending.extend_from_slice(chunk);
            let n = sc.scan(&pending, &mut events).unwrap();
            forwarded += n;
            pending.drain(..n);
        }
        assert_eq!(forwarded, stream.len());
        let events: Vec<BackendEvent> = events.into_iter().map(|s| s.event).collect();
        assert_eq!(
            events,
            vec![
                BackendEvent::ParameterStatus("TimeZone".into(), "UTC".into()),
                BackendEvent::Error {
                    sqlstate: *b"57P01",
                    fatal: true
                },
                BackendEvent::ReadyForQuery(b'I'),
            ]
        );
    }

    #[test]
    fn scanner_reports_offsets() {
        let mut stream = msg(b'1', b"");
        stream.extend(msg(b'D', b"abc"));
        stream.extend(msg(b'Z', b"T"));
        let mut events = vec![];
        let n = BackendScanner::default()
            .scan(&stream, &mut events)
            .unwrap();
        assert_eq!(n, stream.len());
        assert_eq!(events[0].event, BackendEvent::ParseComplete);
        assert_eq!((events[0].start, events[0].end), (0, 5));
        assert_eq!((events[1].start, events[1].end), (13, 19));
    }

    #[test]
    fn error_fields_tolerate_garbage() {
        let f = ErrorFields::parse(b"SERROR\0C42P01\0Mno such table");
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.code, "42P01");
        assert_eq!(f.message, "no such table");
        assert_eq!(ErrorFields::parse(b""), ErrorFields::default());
    }
}
