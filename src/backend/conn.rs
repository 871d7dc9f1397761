//! One authenticated connection to a PostgreSQL node.
//!
//! [`BackendConn::connect`] performs the startup exchange as the client's user:
//! it answers whatever the server asks (SCRAM-SHA-256, MD5, cleartext or trust)
//! with the password from the configuration, and records the server's
//! ParameterStatus values and BackendKeyData. Afterwards the session relays
//! raw frames through [`BackendConn::stream`].

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::BackendError;
use crate::config::NodeId;
use crate::config::tls::{BackendTls, BackendTlsMode};
use crate::net::Stream;
use crate::protocol::auth::{ScramKeyClient, ScramKeys, md5_salted_from_stored};
use crate::protocol::frame::{ErrorFields, next_frame};
use crate::protocol::shape::{Shape, ShapeHasher};
use crate::protocol::{CancelKey, TxStatus, tag};

/// Largest message accepted from a node during startup.
const MAX_STARTUP_MESSAGE: usize = 1 << 20;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub(crate) struct ConnectParams<'a> {
    /// Node id (for errors and metrics).
    pub(crate) node: NodeId,
    /// Host name or address.
    pub(crate) host: &'a str,
    /// Port.
    pub(crate) port: u16,
    /// Startup parameters (must include `user` and `database`).
    pub(crate) startup: &'a [(String, String)],
    /// Password for the user, if the server asks for one.
    pub(crate) password: Option<&'a str>,
    /// Without a password: the keys of the client's SCRAM login, for a server
    /// that asks for SCRAM and stores the same verifier (pass-through).
    pub(crate) scram_keys: Option<&'a ScramKeys>,
    /// Without a password: the user's stored MD5 hash (`auth_query`), which
    /// answers a server's MD5 challenge as the password would.
    pub(crate) md5_stored: Option<&'a str>,
    /// TCP connect timeout.
    pub(crate) connect_timeout: Duration,
    /// Timeout for the whole authentication exchange.
    pub(crate) auth_timeout: Duration,
    /// TLS towards the node (`[backend_tls]`), unless disabled.
    pub(crate) tls: Option<&'a BackendTls>,
}

/// A SCRAM-SHA-256 login in progress: with the password, or with the keys
/// of the client's own SCRAM login.
enum Scram {
    /// postgres-protocol's client, from the configured password.
    Password(ScramSha256),
    /// Pass-through: the client's proven keys.
    Keys(ScramKeyClient),
}

/// A wall-clock time as milliseconds since the epoch (0 before it): how a
/// connection's opening time is kept and shared (one atomic word in the
/// session registry).
pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The inverse of [`epoch_ms`].
pub(crate) fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// An open, authenticated connection to one node.
#[derive(Debug)]
pub(crate) struct BackendConn {
    /// Node id this connection belongs to.
    pub(crate) node: NodeId,
    /// The connection (plain or TLS). The session reads and writes raw
    /// frames on it.
    pub(crate) stream: Stream,
    /// Read buffer; bytes received but not yet forwarded.
    pub(crate) buf: BytesMut,
    /// Role this connection logs in as (the MD5 response mixes it in).
    pub(crate) user: String,
    /// Server address, for CancelRequest.
    pub(crate) addr: SocketAddr,
    /// Server process id and cancel secret (BackendKeyData): the pid names the
    /// connection in logs and views, the key goes into CancelRequests.
    pub(crate) cancel_key: CancelKey,
    /// Current ParameterStatus values, replayed to each new client of this connection.
    pub(crate) params: Vec<(String, String)>,
    /// Transaction status from the last ReadyForQuery; only `Idle` connections are pooled.
    pub(crate) status: TxStatus,
    /// When the connection was opened, by the wall clock, in milliseconds
    /// since the epoch (the admin views show it; a session reports it at
    /// every transaction under transaction pooling, so it is taken and
    /// converted once, here).
    pub(crate) opened_ms: u64,
    /// When it was last returned to the pool (idle expiry).
    pub(crate) last_used: Instant,
    /// The unnamed prepared statement it holds between two sessions'
    /// transactions (transaction pooling gives connections back with one).
    pub(crate) unnamed: Unnamed,
    /// The named prepared statements the server holds, whoever made them
    /// (transaction pooling passes connections between sessions with them).
    pub(crate) held: super::statements::HeldStatements,
    /// The NoticeResponse messages the server sent while the connection
    /// started (a truncated `application_name`, ...), whole: every client
    /// that logs in on this connection gets them, as from a direct login.
    /// Bounded by [`MAX_STARTUP_NOTICES`].
    pub(crate) startup_notices: Vec<u8>,
}

/// At most this many bytes of start-up notices are kept per connection.
pub(crate) const MAX_STARTUP_NOTICES: usize = 16 * 1024;

/// What a pooled connection's unnamed prepared statement is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Unnamed {
    /// None (or none that anyone can use).
    #[default]
    Absent,
    /// The statement this Parse message made (the session's own record of it,
    /// shared: the session that made it recognises it by identity and uses it
    /// as is).
    Parsed(bytes::Bytes),
    /// One of unknown origin.
    Unknown,
}

impl BackendConn {
    /// Open and authenticate a connection.
    pub(crate) async fn connect(p: &ConnectParams<'_>) -> Result<BackendConn, BackendError> {
        let node = p.node;
        let addr_str = format!("{}:{}", p.host, p.port);
        let stream = match timeout(p.connect_timeout, TcpStream::connect(&addr_str)).await {
            Err(_) => {
                return Err(BackendError::Timeout {
                    node,
                    what: "connecting to",
                });
            }
            Ok(Err(source)) => {
                return Err(BackendError::Connect {
                    node,
                    addr: addr_str,
                    source,
                });
            }
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        set_keepalive(&stream);
        let addr = stream
            .peer_addr()
            .map_err(|source| BackendError::Io { node, source })?;
        let mut stream = Stream::Plain(stream);
        if let Some(tls) = p.tls {
            match timeout(p.auth_timeout, start_tls(&mut stream, tls, p.host, node)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(BackendError::Timeout {
                        node,
                        what: "starting TLS with",
                    });
                }
            }
        }
        let mut conn = BackendConn {
            node,
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            user: p
                .startup
                .iter()
                .find(|(k, _)| k == "user")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
            addr,
            cancel_key: CancelKey { pid: 0, secret: 0 },
            params: Vec::new(),
            status: TxStatus::Idle,
            opened_ms: epoch_ms(SystemTime::now()),
            last_used: Instant::now(),
            unnamed: Unnamed::Absent,
            held: Default::default(),
            startup_notices: Vec::new(),
        };
        match timeout(p.auth_timeout, conn.startup(p)).await {
            Ok(r) => r.map(|()| conn),
            Err(_) => Err(BackendError::Timeout {
                node,
                what: "logging in to",
            }),
        }
    }

    async fn startup(&mut self, p: &ConnectParams<'_>) -> Result<(), BackendError> {
        let node = self.node;
        let mut out = BytesMut::new();
        frontend::startup_message(
            p.startup.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut out,
        )
        .map_err(|source| BackendError::Io { node, source })?;
        self.send(&out).await?;
        let mut scram: Option<Scram> = None;
        loop {
            let (t, body) = self.read_message().await?;
            match t {
                tag::AUTHENTICATION => {
                    let reply = self.answer_auth(&body, p, &mut scram)?;
                    if let Some(reply) = reply {
                        self.send(&reply).await?;
                    }
                }
                tag::PARAMETER_STATUS => {
                    let mut parts = body.split(|b| *b == 0);
                    let k = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    let v = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    self.set_param(k, v);
                }
                tag::BACKEND_KEY_DATA if body.len() >= 8 => {
                    self.cancel_key = CancelKey::from_wire(&body).unwrap_or(self.cancel_key);
                }
                tag::READY_FOR_QUERY => {
                    self.status = TxStatus::from_byte(body.first().copied().unwrap_or(b'T'));
                    return Ok(());
                }
                tag::ERROR_RESPONSE => {
                    return Err(BackendError::Server {
                        node,
                        fields: ErrorFields::parse(&body),
                    });
                }
                tag::NOTICE_RESPONSE => {
                    if self.startup_notices.len() + body.len() + 5 <= MAX_STARTUP_NOTICES {
                        let len = (body.len() + 4) as u32;
                        self.startup_notices.push(t);
                        self.startup_notices.extend_from_slice(&len.to_be_bytes());
                        self.startup_notices.extend_from_slice(&body);
                    }
                }
                tag::NEGOTIATE_PROTOCOL_VERSION => {}
                other => {
                    return Err(BackendError::Protocol {
                        node,
                        message: format!("unexpected message {:?} during startup", other as char),
                    });
                }
            }
        }
    }

    /// Build the reply to an Authentication request, if one is needed.
    fn answer_auth(
        &self,
        body: &[u8],
        p: &ConnectParams<'_>,
        scram: &mut Option<Scram>,
    ) -> Result<Option<BytesMut>, BackendError> {
        let password = p.password;
        let node = self.node;
        if body.len() < 4 {
            return Err(BackendError::Protocol {
                node,
                message: "short authentication message".into(),
            });
        }
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let data = &body[4..];
        let need_password = || {
            password.ok_or_else(|| BackendError::Auth {
                node,
                message: if p.md5_stored.is_some() {
                    "the server asks for a SCRAM or cleartext password, but pgpilot has only \
                     this user's MD5 hash (from auth_query), which answers MD5 only"
                        .into()
                } else if p.scram_keys.is_some() {
                    "the server asks for an MD5 or cleartext password, but this user has only a \
                     scram_verifier (which logs in to servers that ask for SCRAM-SHA-256)"
                        .into()
                } else {
                    "the server asks for a password but none is configured for this user".into()
                },
            })
        };
        let io = |source| BackendError::Io { node, source };
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(None),
            3 => frontend::password_message(need_password()?.as_bytes(), &mut out).map_err(io)?,
            5 => {
                let salt: [u8; 4] = data.get(..4).and_then(|s| s.try_into().ok()).ok_or(
                    BackendError::Protocol {
                        node,
                        message: "short MD5 salt".into(),
                    },
                )?;
                let hashed = match (password, p.md5_stored) {
                    (None, Some(stored)) => md5_salted_from_stored(stored, salt),
                    _ => md5_hash(self.user.as_bytes(), need_password()?.as_bytes(), salt),
                };
                frontend::password_message(hashed.as_bytes(), &mut out).map_err(io)?;
            }
            10 => {
                let offers_scram = data
                    .split(|b| *b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(BackendError::Auth {
                        node,
                        message: "the server offers no supported SASL mechanism".into(),
                    });
                }
                let s = match (password, p.scram_keys) {
                    (None, Some(keys)) => {
                        let (client, first) = ScramKeyClient::new(keys.clone());
                        frontend::sasl_initial_response(SCRAM_SHA_256, &first, &mut out)
                            .map_err(io)?;
                        Scram::Keys(client)
                    }
                    _ => {
                        let password = need_password()?.as_bytes();
                        let s = ScramSha256::new(password, ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                            .map_err(io)?;
                        Scram::Password(s)
                    }
                };
                *scram = Some(s);
            }
            11 => {
                let s = scram.as_mut().ok_or(BackendError::Protocol {
                    node,
                    message: "SASL continue without SASL start".into(),
                })?;
                let scram_error = |message: String| BackendError::Auth {
                    node,
                    message: format!("SCRAM: {message}"),
                };
                match s {
                    Scram::Password(s) => {
                        s.update(data).map_err(|e| scram_error(e.to_string()))?;
                        frontend::sasl_response(s.message(), &mut out).map_err(io)?;
                    }
                    Scram::Keys(c) => {
                        let last = c
                            .server_first(data)
                            .map_err(|e| scram_error(e.to_string()))?;
                        frontend::sasl_response(&last, &mut out).map_err(io)?;
                    }
                }
            }
            12 => {
                let s = scram.as_mut().ok_or(BackendError::Protocol {
                    node,
                    message: "SASL final without SASL start".into(),
                })?;
                let checked = match s {
                    Scram::Password(s) => s.finish(data).map_err(|e| e.to_string()),
                    Scram::Keys(c) => c.server_final(data).map_err(|e| e.to_string()),
                };
                checked.map_err(|e| BackendError::Auth {
                    node,
                    message: format!("SCRAM server signature: {e}"),
                })?;
                return Ok(None);
            }
            other => {
                return Err(BackendError::Auth {
                    node,
                    message: format!("unsupported authentication request {other}"),
                });
            }
        }
        Ok(Some(out))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        let node = self.node;
        self.stream
            .write_all(bytes)
            .await
            .map_err(|source| BackendError::Io { node, source })
    }

    /// Read one whole message (type, body) into memory. Used for startup and reset only.
    pub(crate) async fn read_message(&mut self) -> Result<(u8, Vec<u8>), BackendError> {
        let node = self.node;
        loop {
            match next_frame(&mut self.buf, MAX_STARTUP_MESSAGE) {
                Ok(Some(f)) => {
                    let body = f.body(&self.buf).to_vec();
                    self.buf.advance(f.wire_len);
                    return Ok((f.tag, body));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(BackendError::Protocol {
                        node,
                        message: e.to_string(),
                    });
                }
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| BackendError::Io { node, source })?;
            if n == 0 {
                return Err(BackendError::Io {
                    node,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    /// Record a ParameterStatus value.
    pub(crate) fn set_param(&mut self, name: String, value: String) {
        match self.params.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name, value)),
        }
    }

    /// Run a simple query whose results are discarded (used for the reset between
    /// sessions). Succeeds only if the server ends idle without an error.
    pub(crate) async fn run_discarding(
        &mut self,
        sql: &str,
        limit: Duration,
    ) -> Result<(), BackendError> {
        let node = self.node;
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|source| BackendError::Io { node, source })?;
        let errors = self.exchange_discarding(&out, 1, limit).await?;
        match errors.into_iter().next() {
            Some(fields) => Err(BackendError::Server { node, fields }),
            None if self.status != TxStatus::Idle => Err(BackendError::Protocol {
                node,
                message: "connection not idle after reset".into(),
            }),
            None => Ok(()),
        }
    }

    /// Run a simple query returning one row of text values and return them
    /// (`None` for NULL). Used for pgpilot's own small questions on a session's
    /// idle connection.
    pub(crate) async fn query_row(
        &mut self,
        sql: &str,
        limit: Duration,
    ) -> Result<Vec<Option<String>>, BackendError> {
        let node = self.node;
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|source| BackendError::Io { node, source })?;
        let work = async {
            self.send(&out).await?;
            let mut row = None;
            let mut failed = None;
            loop {
                let (t, body) = self.read_message().await?;
                match t {
                    tag::DATA_ROW if row.is_none() => row = Some(decode_data_row(&body)),
                    tag::ERROR_RESPONSE => failed = Some(ErrorFields::parse(&body)),
                    tag::READY_FOR_QUERY => {
                        self.status = TxStatus::from_byte(body.first().copied().unwrap_or(b'T'));
                        break;
                    }
                    _ => {}
                }
            }
            match (failed, row) {
                (Some(fields), _) => Err(BackendError::Server { node, fields }),
                (None, row) => Ok(row.unwrap_or_default()),
            }
        };
        timeout(limit, work)
            .await
            .unwrap_or(Err(BackendError::Timeout {
                node,
                what: "querying",
            }))
    }

    /// Send ready-made protocol messages (`rfqs` requests, each ending in a
    /// ReadyForQuery: simple Queries, or extended messages closed by Sync) and read
    /// the answers up to the last ReadyForQuery, discarding them. Returns the errors
    /// the server reported. Used to bring a connection up to a session's state
    /// (replayed SETs, prepared statements) before the session uses it.
    pub(crate) async fn exchange_discarding(
        &mut self,
        messages: &[u8],
        rfqs: usize,
        limit: Duration,
    ) -> Result<Vec<ErrorFields>, BackendError> {
        self.exchange_describing(messages, rfqs, limit, &mut Vec::new())
            .await
    }

    /// [`Self::exchange_discarding`], keeping in `shapes` the shape of each
    /// statement a Describe among `messages` described, in order.
    pub(crate) async fn exchange_describing(
        &mut self,
        messages: &[u8],
        rfqs: usize,
        limit: Duration,
        shapes: &mut Vec<Shape>,
    ) -> Result<Vec<ErrorFields>, BackendError> {
        let node = self.node;
        let work = async {
            self.send(messages).await?;
            let mut errors = Vec::new();
            let mut left = rfqs;
            let mut params = None;
            while left > 0 {
                let (t, body) = self.read_message().await?;
                match t {
                    tag::ERROR_RESPONSE => errors.push(ErrorFields::parse(&body)),
                    tag::PARAMETER_STATUS => {
                        let mut parts = body.split(|b| *b == 0);
                        let k =
                            String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                        let v =
                            String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                        self.set_param(k, v);
                    }
                    tag::PARAMETER_DESCRIPTION => params = Some(ShapeHasher::params(&body)),
                    tag::ROW_DESCRIPTION | tag::NO_DATA => {
                        if let Some(h) = params.take() {
                            shapes.push(h.finish((t == tag::ROW_DESCRIPTION).then_some(&body[..])));
                        }
                    }
                    tag::READY_FOR_QUERY => {
                        self.status = TxStatus::from_byte(body.first().copied().unwrap_or(b'T'));
                        left -= 1;
                    }
                    _ => {}
                }
            }
            Ok(errors)
        };
        timeout(limit, work)
            .await
            .unwrap_or(Err(BackendError::Timeout {
                node,
                what: "preparing a connection to",
            }))
    }

    /// True if the socket is still open and has no unread bytes (an idle server sends
    /// nothing; bytes mean e.g. a FATAL from pg_terminate_backend).
    pub(crate) fn is_healthy_idle(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [MaybeUninit::<u8>::uninit()];
        // A peek (recv with MSG_PEEK) leaves any bytes for the relay. Tokio's
        // sockets are non-blocking, so "nothing to read" is WouldBlock, and
        // Ok(0) (closed) or Ok(1) (bytes waiting) mean not healthy.
        let Some(tcp) = self.stream.tcp() else {
            return false;
        };
        // (Under TLS a peeked byte may be a record without data, e.g. a
        // KeyUpdate: the connection is then dropped, which is only wasteful.)
        let peeked = socket2::SockRef::from(tcp).peek(&mut byte);
        matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// The text values of a DataRow body (`None` for NULL); malformed → what parsed.
fn decode_data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(n) = body.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
        return out;
    };
    let mut rest = &body[2..];
    for _ in 0..n.max(0) {
        let Some(len) = rest
            .get(..4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
            continue;
        }
        let Some(v) = rest.get(..len as usize) else {
            break;
        };
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        rest = &rest[len as usize..];
    }
    out
}

/// Ask the node for TLS (SSLRequest) and handshake, as `[backend_tls]` says.
async fn start_tls(
    stream: &mut Stream,
    tls: &BackendTls,
    host: &str,
    node: NodeId,
) -> Result<(), BackendError> {
    let io = |source| BackendError::Io { node, source };
    let refused = |message: String| BackendError::Auth { node, message };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    stream.write_all(&req).await.map_err(io)?;
    // One byte, not more: what follows an 'S' is the TLS handshake.
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| refused(format!("TLS: {host:?} is not a server name: {e}")))?;
            stream
                .connect_tls(tls.config.clone(), name)
                .await
                .map_err(|e| refused(format!("TLS handshake failed: {e}")))
        }
        b'N' if tls.mode == BackendTlsMode::Prefer => Ok(()),
        b'N' => Err(refused(format!(
            "the server does not support TLS, but backend_tls mode is {}",
            tls.mode.sslmode()
        ))),
        other => Err(BackendError::Protocol {
            node,
            message: format!("unexpected answer {other:#04x} to SSLRequest"),
        }),
    }
}

/// Turn on TCP keepalive so a silently vanished peer is noticed.
pub(crate) fn set_keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Send a CancelRequest for `key` to the server at `addr`.
pub(crate) async fn send_cancel(addr: SocketAddr, key: CancelKey, limit: Duration) {
    let pid = key.pid;
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(key.pid, key.secret, &mut buf);
        s.write_all(&buf).await?;
        // The server closes the connection when done; wait for that briefly.
        let mut sink = [0u8; 16];
        let _ = s.read(&mut sink).await;
        Ok::<_, std::io::Error>(())
    };
    match timeout(limit, work).await {
        Ok(Ok(())) => tracing::debug!(%addr, pid, "cancel request sent"),
        Ok(Err(e)) => tracing::warn!(%addr, pid, error = %e, "cancel request failed"),
        Err(_) => tracing::warn!(%addr, pid, "cancel request timed out"),
    }
}
