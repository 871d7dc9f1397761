//! One task per client connection: handshake, then one `select!` loop relaying
//! raw frames between the client and the server connection serving it.
//!
//! The session decodes only what it must: frame boundaries and types from the
//! client (to count requests, see Terminate, and enforce the size limit), and
//! ReadyForQuery / ErrorResponse / ParameterStatus from the server (to know when
//! the connection is idle and whether it can be reused). Everything else passes
//! through as the bytes that arrived, batched per read.

pub mod cancel;
pub mod handshake;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::backend::pool::{AcquireSettings, PooledConn};
use crate::backend::{BackendError, PoolKey};
use crate::config::Config;
use crate::context::{ClientSlot, ProxyContext};
use crate::error::ToPgError;
use crate::error::sqlstate::*;
use crate::protocol::frame::{
    BackendEvent, BackendScanner, FrameError, cstr, missing_bytes, peek_frame,
};
use crate::protocol::messages::{self, PgError};
use crate::protocol::startup::StartupMessage;
use crate::protocol::{TxStatus, tag};
use crate::router::{self, lexer};
use cancel::CancelTarget;
use handshake::Opening;

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's stream could not be framed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Getting or using a server connection failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The server connection closed or broke mid-session.
    #[error("server connection to node {node} lost")]
    BackendLost {
        /// Node id.
        node: usize,
    },
    /// The client connection broke.
    #[error("client connection error: {0}")]
    ClientIo(std::io::Error),
    /// A write made no progress within `timeouts.write`.
    #[error("write timed out")]
    WriteTimeout,
    /// `timeouts.client_idle` elapsed.
    #[error("terminating connection due to idle-session timeout")]
    IdleTimeout,
    /// `timeouts.idle_in_transaction` elapsed.
    #[error("terminating connection due to idle-in-transaction timeout")]
    IdleInTransactionTimeout,
    /// A message type a client may not send after startup.
    #[error("invalid frontend message type {0}")]
    UnexpectedMessage(u8),
    /// pgpilot is shutting down.
    #[error("terminating connection due to administrator command")]
    Shutdown,
}

/// Entry point for an accepted client connection.
pub async fn serve(ctx: Arc<ProxyContext>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    crate::backend::conn::set_keepalive(&stream);
    let cfg = ctx.config.load_full();
    let opening = match timeout(cfg.timeouts.auth, handshake::read_opening(&mut stream)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return send_fatal(&mut stream, &e, &cfg).await,
        Err(_) => {
            let e = PgError::fatal(
                PROTOCOL_VIOLATION,
                "timeout while waiting for a startup packet",
            );
            return send_fatal(&mut stream, &e, &cfg).await;
        }
    };
    let startup = match opening {
        Opening::Cancel { pid, secret } => {
            ctx.cancels.cancel(pid, secret, cfg.timeouts.connect).await;
            return;
        }
        Opening::Startup(m) => m,
    };
    let Some(slot) = ClientSlot::try_acquire(&ctx, cfg.max_client_conn) else {
        let e = PgError::fatal(TOO_MANY_CONNECTIONS, "sorry, too many clients already")
            .with_hint("raise max_client_conn or reduce the number of client connections");
        return send_fatal(&mut stream, &e, &cfg).await;
    };
    let user = match startup.get("user") {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => {
            let e = PgError::fatal(
                INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            );
            return send_fatal(&mut stream, &e, &cfg).await;
        }
    };
    let mut out = BytesMut::with_capacity(1024);
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        messages::negotiate_protocol_version(&mut out, &startup.protocol_options);
        if let Err(e) = stream.write_all(&out).await {
            tracing::debug!(error = %e, "client went away during startup");
            return;
        }
        out.clear();
    }
    let auth = handshake::authenticate(&mut stream, &cfg, &user, &ctx.server_secret);
    match timeout(cfg.timeouts.auth, auth).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::info!(user = %user, code = %e.code, "client authentication failed");
            return send_fatal(&mut stream, &e, &cfg).await;
        }
        Err(_) => {
            let e = PgError::fatal(PROTOCOL_VIOLATION, "authentication timed out");
            return send_fatal(&mut stream, &e, &cfg).await;
        }
    }
    messages::auth_ok(&mut out);
    let mut session = Session::new(ctx, cfg, stream, user, startup, slot);
    session.run(out).await;
}

/// Write a FATAL error and close, bounded by the write timeout.
async fn send_fatal(stream: &mut TcpStream, e: &PgError, cfg: &Config) {
    let mut buf = BytesMut::new();
    e.encode(&mut buf);
    let _ = timeout(cfg.timeouts.write, async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    })
    .await;
}

/// A logged-in client.
struct Session {
    /// Proxy-wide state (pool, cluster, cancels).
    ctx: Arc<ProxyContext>,
    /// Configuration as of session start (a reload applies to new sessions).
    cfg: Arc<Config>,
    /// The client socket.
    client: TcpStream,
    /// Bytes read from the client and not yet forwarded.
    cbuf: BytesMut,
    /// Role name from the startup packet.
    user: String,
    /// Startup packet; its parameters are sent to every node the session uses.
    startup: StartupMessage,
    /// pgpilot's BackendKeyData pid for this client (key of the cancel registry).
    key_pid: i32,
    /// pgpilot's BackendKeyData secret for this client.
    key_secret: i32,
    /// The server connection serving this session.
    backend: Option<PooledConn>,
    /// Position in the server's message stream.
    scanner: BackendScanner,
    /// Scratch space for scanner events (reused to avoid allocation).
    events: Vec<BackendEvent>,
    /// Requests sent that will each end with a ReadyForQuery not yet received
    /// (Query, Sync, FunctionCall). Zero means the server is waiting for us.
    outstanding: usize,
    /// Extended-protocol messages sent since the last Sync.
    in_batch: bool,
    /// Whether the session may have left state (SET, PREPARE, temp tables...) that
    /// must be reset before another client reuses the connection.
    dirty: bool,
    /// Transaction status from the last ReadyForQuery.
    status: TxStatus,
    /// The server sent a FATAL error; it is about to close the connection.
    saw_fatal: bool,
    /// Counts this client against `max_client_conn` until dropped.
    _slot: ClientSlot,
}

/// How the relay loop ended.
enum End {
    /// Terminate message or the client closed the socket.
    ClientGone,
    /// An error; the client is told (if still there) and the server connection dropped.
    Error(SessionError),
}

impl Session {
    fn new(
        ctx: Arc<ProxyContext>,
        cfg: Arc<Config>,
        client: TcpStream,
        user: String,
        startup: StartupMessage,
        slot: ClientSlot,
    ) -> Session {
        let (key_pid, key_secret) = ctx.new_client_key();
        Session {
            ctx,
            cfg,
            client,
            cbuf: BytesMut::with_capacity(16 * 1024),
            user,
            startup,
            key_pid,
            key_secret,
            backend: None,
            scanner: BackendScanner::default(),
            events: Vec::with_capacity(8),
            outstanding: 0,
            in_batch: false,
            dirty: false,
            status: TxStatus::Idle,
            saw_fatal: false,
            _slot: slot,
        }
    }

    /// Finish startup (server connection, parameters, key), relay, then clean up.
    async fn run(&mut self, mut out: BytesMut) {
        if let Err(e) = self.connect_primary().await {
            let e = e.to_pg_error();
            tracing::warn!(user = %self.user, error = %e, "could not get a server connection");
            let mut fatal = e;
            fatal.severity = messages::Severity::Fatal;
            fatal.encode(&mut out);
            let _ = self.write_client(&out).await;
            self.cleanup();
            return;
        }
        if let Some(b) = &self.backend {
            for (k, v) in &b.params {
                messages::parameter_status(&mut out, k, v);
            }
        }
        messages::backend_key_data(&mut out, self.key_pid, self.key_secret);
        messages::ready_for_query(&mut out, TxStatus::Idle);
        let end = match self.write_client(&out).await {
            Ok(()) => self.relay().await,
            Err(e) => End::Error(e),
        };
        if let End::Error(e) = &end {
            let lost_client = matches!(e, SessionError::ClientIo(_) | SessionError::WriteTimeout);
            tracing::debug!(user = %self.user, error = %e, "session ended with an error");
            if !lost_client && !self.saw_fatal {
                let mut buf = BytesMut::new();
                e.to_pg_error().encode(&mut buf);
                let _ = self.write_client(&buf).await;
            }
        }
        self.cleanup();
    }

    /// Get a connection to the current primary for this session's key.
    async fn connect_primary(&mut self) -> Result<(), BackendError> {
        let snapshot = self.ctx.cluster.snapshot();
        let node = match router::resolve(router::Target::Primary, &snapshot) {
            Some(n) => n,
            None => self
                .ctx
                .cluster
                .wait_primary(self.cfg.pool.acquire_timeout)
                .await
                .ok_or(BackendError::NoPrimary)?,
        };
        let database = self
            .startup
            .get("database")
            .unwrap_or(&self.user)
            .to_string();
        let key = PoolKey::new(node, &self.user, &database, &self.startup.params);
        let b = &self.cfg.backends[node];
        let settings = AcquireSettings {
            host: &b.host,
            port: b.port,
            password: self
                .cfg
                .user(&self.user)
                .and_then(|u| u.password.as_deref()),
            max_per_node: self.cfg.pool.max_connections_per_node,
            acquire_timeout: self.cfg.pool.acquire_timeout,
            connect_timeout: self.cfg.timeouts.connect,
            auth_timeout: self.cfg.timeouts.auth,
        };
        let conn = self.ctx.pool.acquire(&key, &settings).await?;
        self.ctx.cancels.set_target(
            self.key_pid,
            Some(CancelTarget {
                addr: conn.addr,
                pid: conn.pid,
                secret: conn.secret,
            }),
        );
        self.status = conn.status;
        self.backend = Some(conn);
        Ok(())
    }

    /// The relay loop.
    async fn relay(&mut self) -> End {
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            let idle_limit = if self.outstanding > 0 || self.in_batch {
                Duration::ZERO
            } else if self.status == TxStatus::Idle {
                self.cfg.timeouts.client_idle
            } else {
                self.cfg.timeouts.idle_in_transaction
            };
            let Some(backend) = self.backend.as_mut() else {
                return End::Error(SessionError::BackendLost { node: 0 });
            };
            let node = backend.node;
            let conn = &mut backend.conn;
            tokio::select! {
                _ = shutdown.changed() => return End::Error(SessionError::Shutdown),
                r = self.client.read_buf(&mut self.cbuf) => match r {
                    Ok(0) => return End::ClientGone,
                    Ok(_) => match self.on_client_data().await {
                        Ok(true) => {}
                        Ok(false) => return End::ClientGone,
                        Err(e) => return End::Error(e),
                    },
                    Err(e) => return End::Error(SessionError::ClientIo(e)),
                },
                r = conn.stream.read_buf(&mut conn.buf) => match r {
                    Ok(0) | Err(_) => {
                        tracing::info!(node, user = %self.user, "server closed the session's connection");
                        return End::Error(SessionError::BackendLost { node });
                    }
                    Ok(_) => {
                        if let Err(e) = self.on_backend_data().await {
                            return End::Error(e);
                        }
                    }
                },
                _ = sleep_unless_zero(idle_limit) => {
                    return End::Error(if self.status == TxStatus::Idle {
                        SessionError::IdleTimeout
                    } else {
                        SessionError::IdleInTransactionTimeout
                    });
                }
            }
        }
    }

    /// Frame what the client sent, account for it, and forward it in one write.
    /// Returns false when the client sent Terminate.
    async fn on_client_data(&mut self) -> Result<bool, SessionError> {
        let max = self.cfg.max_message_size;
        let mut pos = 0;
        let mut keep_going = true;
        while let Some(f) = peek_frame(&self.cbuf[pos..], max)? {
            let body = &self.cbuf[pos + 5..pos + f.wire_len];
            match f.tag {
                tag::QUERY => {
                    self.outstanding += 1;
                    self.dirty |= lexer::may_leave_session_state(body);
                }
                tag::PARSE => {
                    self.in_batch = true;
                    let (name, rest) = cstr(body).unwrap_or_default();
                    let sql = cstr(rest).map(|(q, _)| q).unwrap_or_default();
                    self.dirty |= !name.is_empty() || lexer::may_leave_session_state(sql);
                }
                tag::BIND | tag::EXECUTE | tag::DESCRIBE | tag::CLOSE | tag::FLUSH => {
                    self.in_batch = true;
                }
                tag::SYNC => {
                    self.in_batch = false;
                    self.outstanding += 1;
                }
                tag::FUNCTION_CALL => {
                    self.outstanding += 1;
                    self.dirty = true;
                }
                tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
                tag::TERMINATE => {
                    keep_going = false;
                    break;
                }
                other => return Err(SessionError::UnexpectedMessage(other)),
            }
            pos += f.wire_len;
        }
        if pos > 0 {
            let chunk = self.cbuf.split_to(pos);
            self.write_backend(&chunk).await?;
        }
        if keep_going {
            let need = missing_bytes(&self.cbuf);
            self.cbuf.reserve(need.max(4096));
        }
        Ok(keep_going)
    }

    /// Scan what the server sent, track its state, and forward it in one write.
    async fn on_backend_data(&mut self) -> Result<(), SessionError> {
        let Some(b) = self.backend.as_mut() else {
            return Ok(());
        };
        let node = b.node;
        let n = self.scanner.scan(&b.buf, &mut self.events).map_err(|e| {
            tracing::warn!(node, error = %e, "unframeable data from server");
            SessionError::BackendLost { node }
        })?;
        for ev in self.events.drain(..) {
            match ev {
                BackendEvent::ReadyForQuery(s) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    self.status = TxStatus::from_byte(s);
                    b.status = self.status;
                }
                BackendEvent::Error { fatal, .. } => self.saw_fatal |= fatal,
                BackendEvent::ParameterStatus(k, v) => {
                    b.set_param(k, v);
                    self.dirty = true;
                }
                BackendEvent::CopyStarted(_) => {}
            }
        }
        if n > 0 {
            let chunk = b.buf.split_to(n);
            self.write_client(&chunk).await?;
        }
        Ok(())
    }

    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        match timeout(self.cfg.timeouts.write, self.client.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::ClientIo(e)),
            Err(_) => Err(SessionError::WriteTimeout),
        }
    }

    async fn write_backend(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionError::BackendLost { node: 0 });
        };
        let node = b.node;
        match timeout(self.cfg.timeouts.write, b.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SessionError::BackendLost { node }),
            Err(_) => Err(SessionError::WriteTimeout),
        }
    }

    /// Give the server connection back (reset if needed) or discard it.
    fn cleanup(&mut self) {
        self.ctx.cancels.unregister(self.key_pid);
        let Some(conn) = self.backend.take() else {
            return;
        };
        let reusable = self.outstanding == 0
            && !self.in_batch
            && self.status == TxStatus::Idle
            && self.scanner.at_boundary()
            && conn.buf.is_empty()
            && !self.saw_fatal;
        let ctx = self.ctx.clone();
        let cfg = self.cfg.clone();
        if reusable {
            let dirty = self.dirty;
            tokio::spawn(async move {
                let mut conn = conn;
                let reset = if dirty {
                    conn.run_discarding(&cfg.pool.reset_query, cfg.timeouts.reset)
                        .await
                } else {
                    Ok(())
                };
                if let Err(e) = reset {
                    tracing::info!(node = conn.node, error = %e, "reset failed; closing the connection");
                    return;
                }
                ctx.pool.put_idle(conn);
            });
        } else {
            // Mid-request or mid-transaction: never pooled. Cancel what runs, then close.
            if self.outstanding > 0 || self.in_batch {
                let (addr, pid, secret) = (conn.addr, conn.pid, conn.secret);
                tokio::spawn(async move {
                    crate::backend::conn::send_cancel(addr, pid, secret, cfg.timeouts.connect)
                        .await;
                });
            }
            drop(conn);
        }
    }
}

async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(d).await;
    }
}
