//! What the client gets instead of the server's answers to pgpilot's own
//! messages ([`super::Link::scan`] finds them, [`super::Link::forward`]
//! leaves them out), and the error that replaces a use of a statement whose
//! result changed.

use crate::net::{Outbox, Stream};

use super::SessionError;

/// A range of the server's bytes the client does not get, and what it gets
/// instead (usually nothing).
pub(super) type Cut = (usize, usize, &'static [u8]);

/// SQLSTATE of PostgreSQL's error for a cached statement whose result changed.
pub(super) const SHAPE_ERROR_SQLSTATE: &[u8; 5] = b"0A000";

/// The ErrorResponse PostgreSQL sends when a cached statement's result type
/// would change (`RevalidateCachedQuery`).
pub(super) fn shape_error() -> &'static [u8] {
    static ERROR: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut body = Vec::new();
        for (code, value) in [
            (b'S', &b"ERROR"[..]),
            (b'V', b"ERROR"),
            (b'C', SHAPE_ERROR_SQLSTATE),
            (b'M', b"cached plan must not change result type"),
            (b'R', b"RevalidateCachedQuery"),
        ] {
            body.push(code);
            body.extend_from_slice(value);
            body.push(0);
        }
        body.push(0);
        let mut msg = vec![crate::protocol::tag::ERROR_RESPONSE];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(&body);
        msg
    });
    &ERROR
}

/// Forward `bytes` to the client without the ranges `cuts` (answers to
/// messages pgpilot put in the client's stream), or with their replacements,
/// in one write.
#[cold]
#[inline(never)]
pub(super) fn forward_cut(
    client: &mut Stream,
    to_client: &mut Outbox,
    bytes: &[u8],
    cuts: &[Cut],
) -> Result<(), SessionError> {
    let mut kept = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for &(start, end, instead) in cuts {
        kept.extend_from_slice(&bytes[from..start]);
        kept.extend_from_slice(instead);
        from = end;
    }
    kept.extend_from_slice(&bytes[from..]);
    if kept.is_empty() {
        return Ok(());
    }
    to_client
        .send(client, &kept)
        .map_err(SessionError::ClientIo)
}
