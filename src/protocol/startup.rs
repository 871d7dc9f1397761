//! The untyped first packet a client sends: SSLRequest, GSSENCRequest,
//! CancelRequest or StartupMessage.

use super::frame::cstr;

/// Largest startup packet accepted (PostgreSQL uses the same limit).
pub(crate) const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// A BackendKeyData key: the process id and secret a CancelRequest must
/// carry. pgpilot issues its own to each client and keeps each server
/// connection's to forward cancels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CancelKey {
    /// Process id.
    pub(crate) pid: i32,
    /// Secret.
    pub(crate) secret: i32,
}

impl CancelKey {
    /// The key in the wire layout of BackendKeyData and CancelRequest: pid,
    /// then secret, both big-endian (`None` if shorter than 8 bytes).
    pub(crate) fn from_wire(b: &[u8]) -> Option<CancelKey> {
        let b: &[u8; 8] = b.get(..8)?.try_into().ok()?;
        Some(CancelKey {
            pid: i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            secret: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

/// What the client opened with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InitialPacket {
    /// SSLRequest: answered `N` until TLS is configured.
    Ssl,
    /// GSSENCRequest: answered `N`.
    GssEnc,
    /// CancelRequest carrying the key pgpilot issued.
    Cancel(CancelKey),
    /// StartupMessage, protocol 3.x.
    Startup(StartupMessage),
    /// A protocol version pgpilot does not speak (e.g. 2.0).
    Unsupported {
        /// Requested major version.
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
}

/// A v3 StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StartupMessage {
    /// Requested minor version (pgpilot negotiates down to 0).
    pub(crate) minor: u16,
    /// Parameters in the order sent, excluding `_pq_.` protocol options.
    pub(crate) params: Vec<(String, String)>,
    /// `_pq_.` options the client asked for; reported back as unrecognised.
    pub(crate) protocol_options: Vec<String>,
}

impl StartupMessage {
    /// Value of a startup parameter.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse the packet body (everything after the 4-byte length).
pub(crate) fn parse_initial(body: &[u8]) -> Result<InitialPacket, &'static str> {
    if body.len() < 4 {
        return Err("startup packet too short");
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST => return Ok(InitialPacket::Ssl),
        GSSENC_REQUEST => return Ok(InitialPacket::GssEnc),
        CANCEL_REQUEST => {
            return CancelKey::from_wire(rest)
                .map(InitialPacket::Cancel)
                .ok_or("cancel request too short");
        }
        _ => {}
    }
    let major = (code >> 16) as u16;
    let minor = (code & 0xffff) as u16;
    if major != 3 {
        return Ok(InitialPacket::Unsupported { major, minor });
    }
    let mut msg = StartupMessage {
        minor,
        ..Default::default()
    };
    let mut rest = rest;
    loop {
        let (key, tail) = cstr(rest).ok_or("startup packet has an unterminated parameter name")?;
        if key.is_empty() {
            break;
        }
        let (value, tail) =
            cstr(tail).ok_or("startup packet has an unterminated parameter value")?;
        let key = std::str::from_utf8(key).map_err(|_| "startup parameter name is not UTF-8")?;
        let value =
            std::str::from_utf8(value).map_err(|_| "startup parameter value is not UTF-8")?;
        if key.starts_with("_pq_.") {
            msg.protocol_options.push(key.to_string());
        } else {
            msg.params.push((key.to_string(), value.to_string()));
        }
        rest = tail;
    }
    Ok(InitialPacket::Startup(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, tail: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn startup_parameters_are_read_in_order() {
        let p = parse_initial(&packet(196608, b"user\0app\0database\0db\0_pq_.x\0y\0\0")).unwrap();
        let InitialPacket::Startup(m) = p else {
            panic!("not a startup")
        };
        assert_eq!(m.get("user"), Some("app"));
        assert_eq!(m.get("database"), Some("db"));
        assert_eq!(m.protocol_options, vec!["_pq_.x".to_string()]);
    }

    #[test]
    fn other_packets() {
        assert_eq!(
            parse_initial(&packet(SSL_REQUEST, b"")),
            Ok(InitialPacket::Ssl)
        );
        assert_eq!(
            parse_initial(&packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9])),
            Ok(InitialPacket::Cancel(CancelKey { pid: 7, secret: 9 }))
        );
        assert_eq!(
            parse_initial(&packet(2 << 16, b"")),
            Ok(InitialPacket::Unsupported { major: 2, minor: 0 })
        );
        assert!(parse_initial(&packet(196608, b"user\0app")).is_err());
        assert!(parse_initial(b"\0\0").is_err());
    }
}
