//! The client's side of connection start: the first packet (TLS by
//! SSLRequest or direct, GSS refusal, cancel, protocol version) and client
//! authentication: the `hba_file` line the client matches (or, without
//! rules, the user's configured `auth`) decides the exchange.
//!
//! Failures come back as a ready-to-send [`PgError`]; the caller writes it and
//! closes. Unknown users go through the same SCRAM exchange as known ones and
//! fail with the same 28P01 message, so user names cannot be probed.

use std::net::IpAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::hba::{Method, Peer};
use crate::config::tls::{ALPN, TlsServer};
use crate::config::{AuthMethod, Config};
use crate::error::ToPgError;
use crate::error::sqlstate::*;
use crate::net::Stream;
use crate::protocol::auth::{
    AuthError, ScramKeys, ScramServer, ScramVerifier, md5_check, scram_password_check,
};
use crate::protocol::frame::next_frame;
use crate::protocol::messages::{self, PgError};
use crate::protocol::startup::{
    CancelKey, InitialPacket, MAX_STARTUP_PACKET, StartupMessage, parse_initial,
};
use crate::protocol::tag;

/// What a new connection asked for.
#[derive(Debug)]
pub(crate) enum Opening {
    /// A v3 startup: go on to authentication.
    Startup(StartupMessage),
    /// A CancelRequest: forward it and close.
    Cancel(CancelKey),
}

fn io_err(e: std::io::Error) -> PgError {
    PgError::fatal(CONNECTION_FAILURE, format!("client connection failed: {e}"))
}

/// A TLS handshake failed (a bad client certificate, no common version):
/// rustls has sent its alert; nothing more can reach the client.
fn tls_err(e: std::io::Error) -> PgError {
    PgError::fatal(CONNECTION_FAILURE, format!("TLS handshake failed: {e}"))
}

/// The first byte of a TLS handshake record: a client using direct TLS
/// (PostgreSQL 17's `sslnegotiation=direct`) starts with it, where a
/// startup packet starts with its length's high byte, 0.
const TLS_HANDSHAKE: u8 = 0x16;

/// Read the first packet(s): answer SSLRequest with `S` and a TLS handshake
/// when `tls` is set (else `N`), GSSENCRequest with `N`, and read on. With
/// `tls`, a connection that opens with a TLS record is direct TLS, which must
/// name ALPN `postgresql` (as PostgreSQL requires). The stream is TLS
/// afterwards if either happened.
pub(crate) async fn read_opening(
    stream: &mut Stream,
    tls: Option<&TlsServer>,
) -> Result<Opening, PgError> {
    if let (Some(tls), Stream::Plain(tcp)) = (tls, &*stream) {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.map_err(io_err)? == 1 && first[0] == TLS_HANDSHAKE {
            stream
                .accept_tls(tls.config.clone())
                .await
                .map_err(tls_err)?;
            if stream.tls().and_then(|c| c.alpn_protocol()) != Some(ALPN) {
                return Err(PgError::fatal(
                    PROTOCOL_VIOLATION,
                    "direct TLS connection without ALPN protocol \"postgresql\"",
                ));
            }
        }
    }
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
            Ok(InitialPacket::Ssl) => match tls {
                _ if stream.is_tls() => {
                    return Err(PgError::fatal(
                        PROTOCOL_VIOLATION,
                        "SSLRequest on a connection that is already TLS",
                    ));
                }
                Some(tls) => {
                    stream.write_all(b"S").await.map_err(io_err)?;
                    stream
                        .accept_tls(tls.config.clone())
                        .await
                        .map_err(tls_err)?;
                }
                // Not configured: the client may go on in the clear.
                None => stream.write_all(b"N").await.map_err(io_err)?,
            },
            Ok(InitialPacket::GssEnc) => {
                stream.write_all(b"N").await.map_err(io_err)?;
            }
            Ok(InitialPacket::Cancel(key)) => {
                return Ok(Opening::Cancel(key));
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
    stream: &mut Stream,
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

/// Who is logging in, from where, and over what.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Login<'a> {
    /// Role name from the startup packet.
    pub(crate) user: &'a str,
    /// Database from the startup packet (the user name when absent).
    pub(crate) database: &'a str,
    /// The client's address.
    pub(crate) addr: IpAddr,
    /// Whether the client connection is TLS-encrypted.
    pub(crate) tls: bool,
    /// The common name of the client certificate rustls verified (TLS with
    /// `ca_file` only).
    pub(crate) cert_name: Option<&'a str>,
    /// `tls-server-end-point` data of the certificate served, when the
    /// client is TLS and the certificate defines it: SCRAM-SHA-256-PLUS is
    /// offered.
    pub(crate) channel_binding: Option<&'a [u8]>,
}

/// What the client is asked for.
enum Challenge<'a> {
    /// Nothing: it is in.
    Trust,
    /// An MD5 challenge, checked against this clear-text password (none: no
    /// answer matches).
    Md5(Option<&'a str>),
    /// A SCRAM-SHA-256 exchange; `known` is false for the mock verifier of a
    /// user who cannot log in, whose exchange fails at its end.
    Scram {
        /// The verifier the proof is checked against.
        verifier: ScramVerifier,
        /// Whether a login may succeed.
        known: bool,
    },
    /// The password in clear text.
    Cleartext,
}

/// The connection's encryption as PostgreSQL words it in hba messages.
fn encryption(login: &Login<'_>) -> &'static str {
    if login.tls {
        "SSL encryption"
    } else {
        "no encryption"
    }
}

/// Decide the challenge: by the matching `hba_file` line when rules are
/// configured (PostgreSQL's messages when none matches or it rejects), else
/// by the user's configured `auth`.
fn challenge<'a>(
    config: &'a Config,
    login: &Login<'_>,
    server_secret: &[u8],
) -> Result<Challenge<'a>, PgError> {
    let user = login.user;
    let known = config.user(user);
    // Unknown users and users without a password go through the same SCRAM
    // exchange as others and fail at its end, so names cannot be probed.
    let scram = || match known
        .and_then(|u| u.verifier.as_deref())
        .and_then(ScramVerifier::parse)
    {
        Some(verifier) => Challenge::Scram {
            verifier,
            known: true,
        },
        None => Challenge::Scram {
            verifier: ScramVerifier::mock(user, server_secret),
            known: false,
        },
    };
    let Some(rules) = &config.hba else {
        return Ok(match known.map(|u| u.auth) {
            Some(AuthMethod::Trust) => Challenge::Trust,
            Some(AuthMethod::Md5) => Challenge::Md5(known.and_then(|u| u.password.as_deref())),
            Some(AuthMethod::ScramSha256) | None => scram(),
        });
    };
    let peer = Peer {
        addr: login.addr,
        tls: login.tls,
        user,
        database: login.database,
    };
    let host = login.addr.to_canonical();
    let (db, enc) = (login.database, encryption(login));
    let Some(verdict) = rules.lookup(&peer) else {
        return Err(PgError::fatal(
            INVALID_AUTHORIZATION,
            format!(
                "no pg_hba.conf entry for host \"{host}\", user \"{user}\", database \"{db}\", {enc}"
            ),
        ));
    };
    tracing::debug!(user, line = verdict.line, method = ?verdict.method, "hba_file line matched");
    Ok(match verdict.method {
        Method::Reject => {
            return Err(PgError::fatal(
                INVALID_AUTHORIZATION,
                format!(
                    "pg_hba.conf rejects connection for host \"{host}\", user \"{user}\", database \"{db}\", {enc}"
                ),
            ));
        }
        // rustls verified the certificate against `ca_file` during the
        // handshake; as PostgreSQL, its common name must be the user's.
        Method::Cert => match login.cert_name {
            None => {
                return Err(PgError::fatal(
                    INVALID_AUTHORIZATION,
                    "connection requires a valid client certificate",
                ));
            }
            Some(cn) if cn != user || known.is_none() => {
                return Err(PgError::fatal(
                    INVALID_AUTHORIZATION,
                    format!("certificate authentication failed for user \"{user}\""),
                ));
            }
            Some(_) => Challenge::Trust,
        },
        Method::Trust if known.is_none() => {
            return Err(PgError::fatal(
                INVALID_AUTHORIZATION,
                format!("role \"{user}\" does not exist"),
            ));
        }
        Method::Trust => Challenge::Trust,
        // PostgreSQL: an md5 line uses MD5 unless the password is stored as a
        // SCRAM verifier, then SCRAM. A configured `password` is the clear
        // text, which MD5 can check (as PgBouncer does with its auth_file).
        // Users without a password, and unknown ones, get the MD5 challenge
        // that the common case gets, and fail it: the method tells nothing.
        Method::Md5 => match known {
            Some(u) if u.scram_verifier.is_some() => scram(),
            Some(u) => Challenge::Md5(u.password.as_deref()),
            None => Challenge::Md5(None),
        },
        Method::ScramSha256 => scram(),
        Method::Password => Challenge::Cleartext,
    })
}

/// Authenticate a client by the `hba_file` line it matches, or by its
/// configured method without rules. On success nothing has been written yet
/// beyond the exchange itself; the caller sends AuthenticationOk. A SCRAM (or
/// clear-text, against a verifier) login returns what it proved: the keys
/// log in to nodes for a user configured without a password.
pub(crate) async fn authenticate(
    stream: &mut Stream,
    config: &Config,
    login: &Login<'_>,
    server_secret: &[u8],
) -> Result<Option<ScramKeys>, PgError> {
    let user = login.user;
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let known = config.user(user);
    match challenge(config, login, server_secret)? {
        Challenge::Trust => Ok(None),
        Challenge::Md5(password) => {
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
        Challenge::Cleartext => {
            messages::auth_cleartext(&mut out);
            stream.write_all(&out).await.map_err(io_err)?;
            let body = read_password_message(stream, &mut inbuf).await?;
            let given = crate::protocol::frame::cstr(&body)
                .map(|(p, _)| p)
                .ok_or_else(|| PgError::fatal(PROTOCOL_VIOLATION, "invalid password packet"))?;
            match known {
                Some(u) if u.password.is_some() => {
                    let stored = u.password.as_deref().unwrap_or_default().as_bytes();
                    if ct_eq(stored, given) {
                        Ok(None)
                    } else {
                        Err(failed(user))
                    }
                }
                Some(u) => u
                    .verifier
                    .as_deref()
                    .and_then(ScramVerifier::parse)
                    .and_then(|v| scram_password_check(&v, given))
                    .map(Some)
                    .ok_or_else(|| failed(user)),
                None => Err(failed(user)),
            }
        }
        Challenge::Scram { verifier, known } => {
            let mut scram = match login.channel_binding {
                Some(end_point) => ScramServer::with_channel_binding(verifier, end_point.to_vec()),
                None => ScramServer::new(verifier),
            };
            messages::auth_sasl(&mut out, login.channel_binding.is_some());
            stream.write_all(&out).await.map_err(io_err)?;
            out.clear();
            let first = read_password_message(stream, &mut inbuf).await?;
            let server_first = scram.client_first(&first).map_err(|e| map_auth(e, user))?;
            messages::auth_sasl_continue(&mut out, &server_first);
            stream.write_all(&out).await.map_err(io_err)?;
            out.clear();
            let last = read_password_message(stream, &mut inbuf).await?;
            let server_final = scram.client_final(&last).map_err(|e| map_auth(e, user))?;
            if !known {
                return Err(failed(user));
            }
            messages::auth_sasl_final(&mut out, &server_final);
            stream.write_all(&out).await.map_err(io_err)?;
            Ok(scram.proven_keys())
        }
    }
}

/// Constant-time comparison: a password check must not leak how much matched.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with a password user, a verifier-only user and a trust user,
    /// and `rules` as its hba_file when given.
    fn config(rules: Option<&str>, dir: &std::path::Path) -> Config {
        let verifier = ScramVerifier::from_password("pw");
        let v = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            verifier.iterations,
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &verifier.salt),
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                verifier.stored_key
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                verifier.server_key
            ),
        );
        let mut toml = String::new();
        if let Some(rules) = rules {
            let path = dir.join("hba.conf");
            std::fs::write(&path, rules).unwrap();
            toml.push_str(&format!("hba_file = {:?}\n", path.display().to_string()));
        }
        toml.push_str(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\n\
             [[users]]\nname = \"plain\"\npassword = \"pw\"\n\
             [[users]]\nname = \"verified\"\nscram_verifier = \"{v}\"\n\
             [[users]]\nname = \"trusted\"\nauth = \"trust\"\n"
        ));
        Config::from_toml(&toml).unwrap()
    }

    fn decide(cfg: &Config, user: &str) -> Result<&'static str, PgError> {
        let login = Login {
            user,
            database: "db",
            addr: "10.0.0.1".parse().unwrap(),
            tls: false,
            cert_name: None,
            channel_binding: None,
        };
        Ok(match challenge(cfg, &login, b"secret")? {
            Challenge::Trust => "trust",
            Challenge::Md5(None) => "md5 (fails)",
            Challenge::Md5(_) => "md5",
            Challenge::Scram { known: true, .. } => "scram",
            Challenge::Scram { known: false, .. } => "scram (fails)",
            Challenge::Cleartext => "password",
        })
    }

    /// The configuration keeps a user's verifier as text and checks its form
    /// at load; the handshake parses it at login. Both must agree, and a
    /// verifier derived from a password must check that password.
    #[test]
    fn the_configuration_accepts_exactly_the_verifiers_the_handshake_parses() {
        let good = config(None, std::path::Path::new("."));
        let text = good.user("verified").unwrap().verifier.clone().unwrap();
        let (head, keys) = text.rsplit_once('$').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        let candidates = [
            text.clone(),
            format!("{head}${stored}:{}", &server[4..]),
            format!("{head}${stored}"),
            text.replacen("SCRAM-SHA-256$", "SCRAM-SHA-1$", 1),
            text.replacen("$4096:", "$0:", 1),
            text.replacen("$4096:", "$x:", 1),
            format!("{head}$!!!!:{server}"),
            "SCRAM-SHA-256$4096:c2FsdA==$x:y".to_string(),
            "md5abc".to_string(),
        ];
        for v in candidates {
            let toml = format!(
                "[[backends]]\nhost = \"h\"\n[[users]]\nname = \"u\"\nscram_verifier = \"{v}\"\n"
            );
            assert_eq!(
                Config::from_toml(&toml).is_ok(),
                ScramVerifier::parse(&v).is_some(),
                "{v}"
            );
        }
        let plain = good.user("plain").unwrap().verifier.as_deref();
        let derived = plain.and_then(ScramVerifier::parse).unwrap();
        assert!(scram_password_check(&derived, b"pw").is_some());
        assert!(scram_password_check(&derived, b"other").is_none());
    }

    #[test]
    fn md5_lines_use_scram_for_a_scram_stored_password() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(Some("host all all all md5\n"), dir.path());
        assert_eq!(decide(&cfg, "plain").unwrap(), "md5");
        assert_eq!(decide(&cfg, "verified").unwrap(), "scram");
        // No password, or unknown: the MD5 challenge a password user gets
        // (with no password, which no answer matches).
        assert_eq!(decide(&cfg, "trusted").unwrap(), "md5 (fails)");
        assert_eq!(decide(&cfg, "nobody").unwrap(), "md5 (fails)");
        let cfg = config(Some("host all all all scram-sha-256\n"), dir.path());
        assert_eq!(decide(&cfg, "plain").unwrap(), "scram");
        let cfg = config(Some("host all all all password\n"), dir.path());
        assert_eq!(decide(&cfg, "verified").unwrap(), "password");
    }

    #[test]
    fn trust_reject_cert_and_no_match() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            Some(
                "hostssl all verified all cert\n\
                 host all trusted,plain 10.0.0.0/8 trust\n\
                 host all nobody all trust\n\
                 host all verified 10.0.0.1/32 reject\n",
            ),
            dir.path(),
        );
        assert_eq!(decide(&cfg, "plain").unwrap(), "trust");
        let e = decide(&cfg, "nobody").unwrap_err();
        assert_eq!(
            (&*e.code, e.message.as_str()),
            ("28000", "role \"nobody\" does not exist")
        );
        let e = decide(&cfg, "verified").unwrap_err();
        assert_eq!(e.code, "28000");
        assert!(e.message.starts_with("pg_hba.conf rejects connection for host \"10.0.0.1\", user \"verified\", database \"db\""), "{}", e.message);
        let cfg = config(Some("hostssl all all all cert\n"), dir.path());
        let e = decide(&cfg, "plain").unwrap_err();
        assert_eq!(
            e.message,
            "no pg_hba.conf entry for host \"10.0.0.1\", user \"plain\", database \"db\", no encryption"
        );
        // With TLS the cert line matches: without a certificate, or with
        // another name's, it refuses; with the user's, it lets in.
        let mut login = Login {
            user: "plain",
            database: "db",
            addr: "10.0.0.1".parse().unwrap(),
            tls: true,
            cert_name: None,
            channel_binding: None,
        };
        let Err(e) = challenge(&cfg, &login, b"secret") else {
            panic!("a cert line let a client without a certificate in");
        };
        assert_eq!(e.message, "connection requires a valid client certificate");
        login.cert_name = Some("verified");
        let Err(e) = challenge(&cfg, &login, b"secret") else {
            panic!("a cert line let another user's certificate in");
        };
        assert_eq!(
            e.message,
            "certificate authentication failed for user \"plain\""
        );
        login.cert_name = Some("plain");
        assert!(matches!(
            challenge(&cfg, &login, b"secret"),
            Ok(Challenge::Trust)
        ));
    }

    #[test]
    fn without_rules_the_users_auth_decides() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(None, dir.path());
        assert_eq!(decide(&cfg, "plain").unwrap(), "scram");
        assert_eq!(decide(&cfg, "trusted").unwrap(), "trust");
        assert_eq!(decide(&cfg, "nobody").unwrap(), "scram (fails)");
    }
}
