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
mod relay;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::admin::registry::{SessionHandle, SessionState};
use crate::backend::pool::{AcquireSettings, PooledConn};
use crate::backend::{BackendError, PoolKey};
use crate::config::Config;
use crate::context::{ClientSlot, ProxyContext};
use crate::error::ToPgError;
use crate::error::sqlstate::*;
use crate::net::{Outbox, WriteError, write_all_timeout};
use crate::protocol::TxStatus;
use crate::protocol::frame::{BackendEvent, BackendScanner, FrameError};
use crate::protocol::messages::{self, PgError};
use crate::protocol::startup::StartupMessage;
use crate::router;
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
    /// Bytes read from the client and not yet forwarded (at most one partial frame
    /// between reads).
    cbuf: BytesMut,
    /// Bytes for the client that its socket has not taken yet.
    to_client: Outbox,
    /// Bytes for the server that its socket has not taken yet.
    to_backend: Outbox,
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
    /// This session in `ctx.sessions` (SHOW POOL_PROCESSES); unregisters on drop.
    registration: SessionHandle,
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
        let registration = ctx.sessions.register(
            key_pid,
            &user,
            startup.get("database").unwrap_or(&user),
            startup.get("application_name").unwrap_or_default(),
            client.peer_addr().ok(),
        );
        Session {
            ctx,
            cfg,
            client,
            cbuf: BytesMut::with_capacity(16 * 1024),
            to_client: Outbox::default(),
            to_backend: Outbox::default(),
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
            registration,
            _slot: slot,
        }
    }

    /// Finish startup (server connection, parameters, key), relay, then clean up.
    async fn run(&mut self, mut out: BytesMut) {
        if let Err(e) = self.connect_primary().await {
            let mut fatal = e.to_pg_error();
            tracing::warn!(user = %self.user, error = %fatal, "could not get a server connection");
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
            // A lost server connection asks for an early health probe of that
            // node; the probe, not this error, decides whether it is down.
            if let SessionError::BackendLost { node } = e {
                self.ctx.cluster.report_session_error(*node);
            }
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
        let conn = match self.ctx.pool.acquire(&key, &settings).await {
            Ok(c) => c,
            Err(e) => {
                if e.is_connection_failure() {
                    self.ctx.cluster.report_session_error(node);
                }
                return Err(e);
            }
        };
        self.registration.set_backend(node, conn.pid, conn.created);
        self.registration.set_state(SessionState::Idle);
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

    /// Bounded blocking write to the client, after anything queued: used at startup
    /// and for the final error message.
    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let limit = self.cfg.timeouts.write;
        let mut r = self.to_client.drain(&mut self.client, limit).await;
        if r.is_ok() {
            r = write_all_timeout(&mut self.client, bytes, limit).await;
        }
        r.map_err(|e| match e {
            WriteError::Io(e) => SessionError::ClientIo(e),
            WriteError::Timeout => SessionError::WriteTimeout,
        })
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
            && self.to_backend.is_empty()
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
                match reset {
                    Ok(()) => ctx.pool.put_idle(conn),
                    Err(e) => {
                        tracing::info!(node = conn.node, error = %e, "reset failed; closing the connection")
                    }
                }
            });
        } else {
            // Mid-request or mid-transaction: never pooled. Cancel what runs, then close.
            if self.outstanding > 0 || self.in_batch || !self.to_backend.is_empty() {
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
