//! The client's side of connection start: the first packet (TLS by
//! SSLRequest or direct, GSS refusal, cancel, protocol version) and client
//! authentication: the `hba_file` line the client matches (or, without
//! rules, the user's configured `auth`) decides the exchange.
//!
//! Failures come back as a ready-to-send [`PgError`]; the caller writes it and
//! closes. Unknown users go through the same SCRAM exchange as known ones and
//! fail with the same 28P01 message, so user names cannot be probed.
//!
//! A user not in `[[users]]` may be a role found by `auth_query`
//! ([`look_up`]): its stored SCRAM verifier or MD5 hash is checked as
//! PostgreSQL would, an expired one (`rolvaliduntil`) like a wrong password,
//! and a role that may not log in is refused after its password proved right,
//! with PostgreSQL's 28000.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::hba::{Method, Peer};
use crate::auth::query::{Answer, AuthLookup, LookupTarget, StoredPassword, StoredRole};
use crate::config::tls::{ALPN, TlsServer};
use crate::config::{AuthMethod, Config, NodeId, User};
use crate::error::ToPgError;
use crate::error::sqlstate::*;
use crate::net::Stream;
use crate::protocol::auth::{
    AuthError, ScramKeys, ScramServer, ScramVerifier, md5_check, md5_check_stored,
    md5_password_check, scram_password_check,
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

/// Look a user who is not in `[[users]]` up by `auth_query`, when it is on:
/// `None` when it is off or the user is listed. A role whose password has
/// expired comes back as no role: PostgreSQL refuses it as a wrong password.
/// A lookup that fails is not a wrong password: the client is told that its
/// login could not be checked now (57P03), and may retry.
pub(crate) async fn look_up(
    lookups: &AuthLookup,
    config: &Config,
    primary: Option<NodeId>,
    user: &str,
) -> Result<Option<Arc<StoredRole>>, PgError> {
    if !config.auth_query.enabled || config.user(user).is_some() {
        return Ok(None);
    }
    let target = LookupTarget {
        primary: primary.and_then(|p| config.backends.get(p.index())),
        monitor: &config.monitor,
        settings: &config.auth_query,
    };
    match lookups.lookup(&target, user).await {
        Ok(Answer::Role(role)) if role.expired(std::time::SystemTime::now()) => {
            tracing::info!(
                user,
                "auth_query: the role's password has expired (VALID UNTIL)"
            );
            Ok(None)
        }
        Ok(Answer::Role(role)) => Ok(Some(role)),
        Ok(Answer::NoSuchRole) => Ok(None),
        Err(e) => {
            tracing::warn!(user, error = %e, "auth_query: cannot look the user up");
            Err(PgError::fatal(
                CANNOT_CONNECT_NOW,
                format!("cannot check the password of user \"{user}\" now: {e}"),
            ))
        }
    }
}

/// What pgpilot knows of the user logging in.
#[derive(Clone, Copy)]
enum Account<'a> {
    /// Listed in `[[users]]`.
    Listed(&'a User),
    /// Found by `auth_query` (password not expired).
    Stored(&'a StoredRole),
}

/// What a successful login proved, for logging in to the nodes as the user
/// when pgpilot holds no password for it.
#[derive(Debug, Default)]
pub(crate) struct Proven {
    /// The keys of a SCRAM (or clear-text, against a verifier) login.
    pub(crate) scram_keys: Option<ScramKeys>,
    /// The stored MD5 hash a login was checked against (`auth_query`).
    pub(crate) md5_stored: Option<String>,
}

/// What the client is asked for.
enum Challenge<'a> {
    /// Nothing: it is in.
    Trust,
    /// An MD5 challenge, checked against this clear-text password (none: no
    /// answer matches).
    Md5(Option<&'a str>),
    /// An MD5 challenge, checked against this stored hash (`auth_query`).
    Md5Stored(&'a str),
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
    stored: Option<&'a StoredRole>,
    server_secret: &[u8],
) -> Result<Challenge<'a>, PgError> {
    let user = login.user;
    let account = config
        .user(user)
        .map(Account::Listed)
        .or(stored.map(Account::Stored));
    let known = config.user(user);
    let verifier = match account {
        Some(Account::Listed(u)) => u.verifier.as_deref(),
        Some(Account::Stored(StoredRole {
            password: StoredPassword::Scram(v),
            ..
        })) => Some(v.as_str()),
        Some(Account::Stored(_)) | None => None,
    };
    let md5_stored = match stored {
        Some(StoredRole {
            password: StoredPassword::Md5(h),
            ..
        }) if known.is_none() => Some(h.as_str()),
        _ => None,
    };
    // Unknown users and users without a password go through the same SCRAM
    // exchange as others and fail at its end, so names cannot be probed.
    let scram = || match verifier.and_then(ScramVerifier::parse) {
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
        return Ok(match (known.map(|u| u.auth), md5_stored) {
            (Some(AuthMethod::Trust), _) => Challenge::Trust,
            (Some(AuthMethod::Md5), _) => Challenge::Md5(known.and_then(|u| u.password.as_deref())),
            // A role found by auth_query: the method its stored password
            // allows, as a PostgreSQL `md5` line chooses.
            (None, Some(h)) => Challenge::Md5Stored(h),
            (Some(AuthMethod::ScramSha256) | None, _) => scram(),
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
            Some(cn) if cn != user || account.is_none() => {
                return Err(PgError::fatal(
                    INVALID_AUTHORIZATION,
                    format!("certificate authentication failed for user \"{user}\""),
                ));
            }
            Some(_) => Challenge::Trust,
        },
        Method::Trust if account.is_none() => {
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
        Method::Md5 => match account {
            Some(Account::Listed(u)) if u.scram_verifier.is_some() => scram(),
            Some(Account::Listed(u)) => Challenge::Md5(u.password.as_deref()),
            Some(Account::Stored(_)) if verifier.is_some() => scram(),
            Some(Account::Stored(_)) => {
                md5_stored.map_or(Challenge::Md5(None), Challenge::Md5Stored)
            }
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
    stored: Option<&StoredRole>,
    server_secret: &[u8],
) -> Result<Proven, PgError> {
    let proven = exchange(stream, config, login, stored, server_secret).await?;
    // PostgreSQL checks the login right once the password proved right.
    if let Some(role) = stored
        && config.user(login.user).is_none()
        && !role.can_login
    {
        return Err(PgError::fatal(
            INVALID_AUTHORIZATION,
            format!("role \"{}\" is not permitted to log in", login.user),
        ));
    }
    Ok(proven)
}

/// The exchange the matching line or the user's method asks for.
async fn exchange(
    stream: &mut Stream,
    config: &Config,
    login: &Login<'_>,
    stored: Option<&StoredRole>,
    server_secret: &[u8],
) -> Result<Proven, PgError> {
    let user = login.user;
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let known = config.user(user);
    let keys = |scram_keys| Proven {
        scram_keys,
        md5_stored: None,
    };
    match challenge(config, login, stored, server_secret)? {
        Challenge::Trust => Ok(Proven::default()),
        Challenge::Md5(password) => {
            let salt: [u8; 4] = rand::random();
            messages::auth_md5(&mut out, salt);
            stream.write_all(&out).await.map_err(io_err)?;
            let body = read_password_message(stream, &mut inbuf).await?;
            if password.is_some_and(|p| md5_check(user, p, salt, &body)) {
                Ok(Proven::default())
            } else {
                Err(failed(user))
            }
        }
        Challenge::Md5Stored(hash) => {
            let salt: [u8; 4] = rand::random();
            messages::auth_md5(&mut out, salt);
            stream.write_all(&out).await.map_err(io_err)?;
            let body = read_password_message(stream, &mut inbuf).await?;
            if md5_check_stored(hash, salt, &body) {
                Ok(Proven {
                    scram_keys: None,
                    md5_stored: Some(hash.to_string()),
                })
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
                        Ok(Proven::default())
                    } else {
                        Err(failed(user))
                    }
                }
                Some(u) => u
                    .verifier
                    .as_deref()
                    .and_then(ScramVerifier::parse)
                    .and_then(|v| scram_password_check(&v, given))
                    .map(|k| keys(Some(k)))
                    .ok_or_else(|| failed(user)),
                None => match stored.map(|r| &r.password) {
                    Some(StoredPassword::Scram(v)) => ScramVerifier::parse(v)
                        .and_then(|v| scram_password_check(&v, given))
                        .map(|k| keys(Some(k)))
                        .ok_or_else(|| failed(user)),
                    Some(StoredPassword::Md5(h)) if md5_password_check(user, h, given) => {
                        Ok(Proven {
                            scram_keys: None,
                            md5_stored: Some(h.clone()),
                        })
                    }
                    _ => Err(failed(user)),
                },
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
            Ok(keys(scram.proven_keys()))
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
        Ok(match challenge(cfg, &login, None, b"secret")? {
            Challenge::Trust => "trust",
            Challenge::Md5(None) => "md5 (fails)",
            Challenge::Md5(_) | Challenge::Md5Stored(_) => "md5",
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
        let Err(e) = challenge(&cfg, &login, None, b"secret") else {
            panic!("a cert line let a client without a certificate in");
        };
        assert_eq!(e.message, "connection requires a valid client certificate");
        login.cert_name = Some("verified");
        let Err(e) = challenge(&cfg, &login, None, b"secret") else {
            panic!("a cert line let another user's certificate in");
        };
        assert_eq!(
            e.message,
            "certificate authentication failed for user \"plain\""
        );
        login.cert_name = Some("plain");
        assert!(matches!(
            challenge(&cfg, &login, None, b"secret"),
            Ok(Challenge::Trust)
        ));
    }

    /// A role found by auth_query gets the method its stored password
    /// allows; one without a usable password the challenge an unknown user
    /// gets; a listed user of the same name wins over the lookup.
    #[test]
    fn roles_found_by_auth_query_are_challenged_by_their_stored_password() {
        let dir = tempfile::tempdir().unwrap();
        let role = |name: &str, password| StoredRole {
            name: name.into(),
            password,
            valid_until: None,
            can_login: true,
        };
        let scram =
            StoredPassword::from_stored(Some(&postgres_protocol::password::scram_sha_256(b"pw")));
        let md5 = StoredPassword::from_stored(Some(&postgres_protocol::password::md5(b"pw", "r")));
        let decide = |cfg: &Config, r: &StoredRole| {
            let login = Login {
                user: &r.name,
                database: "db",
                addr: "10.0.0.1".parse().unwrap(),
                tls: false,
                cert_name: None,
                channel_binding: None,
            };
            match challenge(cfg, &login, Some(r), b"secret") {
                Ok(Challenge::Trust) => "trust",
                Ok(Challenge::Md5(None)) => "md5 (fails)",
                Ok(Challenge::Md5(Some(_))) => "md5 (listed)",
                Ok(Challenge::Md5Stored(_)) => "md5",
                Ok(Challenge::Scram { known: true, .. }) => "scram",
                Ok(Challenge::Scram { known: false, .. }) => "scram (fails)",
                Ok(Challenge::Cleartext) => "password",
                Err(_) => "refused",
            }
        };
        let cfg = config(None, dir.path());
        assert_eq!(decide(&cfg, &role("r", scram.clone())), "scram");
        assert_eq!(decide(&cfg, &role("r", md5.clone())), "md5");
        assert_eq!(
            decide(&cfg, &role("r", StoredPassword::Unusable)),
            "scram (fails)"
        );
        // The configuration's user of that name decides, not the lookup.
        assert_eq!(decide(&cfg, &role("trusted", md5.clone())), "trust");
        let cfg = config(Some("host all all all md5\n"), dir.path());
        assert_eq!(decide(&cfg, &role("r", scram.clone())), "scram");
        assert_eq!(decide(&cfg, &role("r", md5.clone())), "md5");
        assert_eq!(
            decide(&cfg, &role("r", StoredPassword::Unusable)),
            "md5 (fails)"
        );
        let cfg = config(Some("host all all all scram-sha-256\n"), dir.path());
        assert_eq!(decide(&cfg, &role("r", md5.clone())), "scram (fails)");
        let cfg = config(Some("host all all all trust\n"), dir.path());
        assert_eq!(decide(&cfg, &role("r", md5)), "trust");
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
