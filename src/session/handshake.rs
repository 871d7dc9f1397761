//! The client's side of connection start: the first packet (SSL/GSS refusal,
//! cancel, protocol version) and password authentication.
//!
//! Failures come back as a ready-to-send [`PgError`]; the caller writes it and
//! closes. Unknown users go through the same SCRAM exchange as known ones and
//! fail with the same 28P01 message, so user names cannot be probed.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{AuthMethod, Config};
use crate::error::ToPgError;
use crate::error::sqlstate::*;
use crate::protocol::auth::{AuthError, ScramKeys, ScramServer, ScramVerifier, md5_check};
use crate::protocol::frame::next_frame;
use crate::protocol::messages::{self, PgError};
use crate::protocol::startup::{InitialPacket, MAX_STARTUP_PACKET, StartupMessage, parse_initial};
use crate::protocol::tag;

/// What a new connection asked for.
#[derive(Debug)]
pub enum Opening {
    /// A v3 startup: go on to authentication.
    Startup(StartupMessage),
    /// A CancelRequest: forward it and close.
    Cancel {
        /// Key pid.
        pid: i32,
        /// Key secret.
        secret: i32,
    },
}

fn io_err(e: std::io::Error) -> PgError {
    PgError::fatal(CONNECTION_FAILURE, format!("client connection failed: {e}"))
}

/// Read the first packet(s): refuse SSL/GSS encryption with `N` and read on.
pub async fn read_opening(stream: &mut TcpStream) -> Result<Opening, PgError> {
    loop {
        let len = stream.read_i32().await.map_err(io_err)?;
        if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
            return Err(PgError::fatal(
                PROTOCOL_VIOLATION,
                format!("invalid length of startup packet: {len}"),
            ));
        }
        let mut body = vec![0u8; len as usize - 4];
        stream.read_exact(&mut body).await.map_err(io_err)?;
        match parse_initial(&body) {
            Ok(InitialPacket::Ssl) | Ok(InitialPacket::GssEnc) => {
                // TLS/GSS not configured: the client may go on in the clear.
                stream.write_all(b"N").await.map_err(io_err)?;
            }
            Ok(InitialPacket::Cancel { pid, secret }) => {
                return Ok(Opening::Cancel { pid, secret });
            }
            Ok(InitialPacket::Startup(m)) => return Ok(Opening::Startup(m)),
            Ok(InitialPacket::Unsupported { major, minor }) => {
                return Err(PgError::fatal(
                    FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                    ),
                ));
            }
            Err(m) => return Err(PgError::fatal(PROTOCOL_VIOLATION, m)),
        }
    }
}

/// Read one password-family message ('p') during authentication.
async fn read_password_message(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Vec<u8>, PgError> {
    loop {
        match next_frame(buf, MAX_STARTUP_PACKET) {
            Ok(Some(f)) if f.tag == tag::PASSWORD => {
                let body = f.body(buf).to_vec();
                buf.advance(f.wire_len);
                return Ok(body);
            }
            Ok(Some(f)) => {
                return Err(PgError::fatal(
                    PROTOCOL_VIOLATION,
                    format!("expected a password message, got {:?}", f.tag as char),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_pg_error()),
        }
        if stream.read_buf(buf).await.map_err(io_err)? == 0 {
            return Err(io_err(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

fn failed(user: &str) -> PgError {
    PgError::fatal(
        INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

fn map_auth(e: AuthError, user: &str) -> PgError {
    match e {
        AuthError::Failed => failed(user),
        other => other.to_pg_error(),
    }
}

/// Authenticate `user` per its configured method. On success nothing has been
/// written yet beyond the exchange itself; the caller sends AuthenticationOk.
/// A SCRAM login returns what it proved: the keys log in to nodes for a user
/// configured without a password.
pub async fn authenticate(
    stream: &mut TcpStream,
    config: &Config,
    user: &str,
    server_secret: &[u8],
) -> Result<Option<ScramKeys>, PgError> {
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let known = config.user(user);
    let method = known.map(|u| u.auth).unwrap_or(AuthMethod::ScramSha256);
    match method {
        AuthMethod::Trust => Ok(None),
        AuthMethod::Md5 => {
            let password = known.and_then(|u| u.password.as_deref());
            let salt: [u8; 4] = rand::random();
            messages::auth_md5(&mut out, salt);
            stream.write_all(&out).await.map_err(io_err)?;
            let body = read_password_message(stream, &mut inbuf).await?;
            if password.is_some_and(|p| md5_check(user, p, salt, &body)) {
                Ok(None)
            } else {
                Err(failed(user))
            }
        }
        AuthMethod::ScramSha256 => {
            let verifier = known
                .and_then(|u| u.verifier.clone())
                .unwrap_or_else(|| ScramVerifier::mock(user, server_secret));
            let mut scram = ScramServer::new(verifier);
            messages::auth_sasl(&mut out);
            stream.write_all(&out).await.map_err(io_err)?;
            out.clear();
            let first = read_password_message(stream, &mut inbuf).await?;
            let server_first = scram.client_first(&first).map_err(|e| map_auth(e, user))?;
            messages::auth_sasl_continue(&mut out, &server_first);
            stream.write_all(&out).await.map_err(io_err)?;
            out.clear();
            let last = read_password_message(stream, &mut inbuf).await?;
            let server_final = scram.client_final(&last).map_err(|e| map_auth(e, user))?;
            if known.is_none() {
                return Err(failed(user));
            }
            messages::auth_sasl_final(&mut out, &server_final);
            stream.write_all(&out).await.map_err(io_err)?;
            Ok(scram.proven_keys())
        }
    }
}
