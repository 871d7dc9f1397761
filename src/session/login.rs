//! Logging a client in: from the accepted socket to the first
//! ReadyForQuery (the first packet, TLS, `max_client_conn`, authentication
//! with throttling, the first server connection), then the session's relay
//! for the rest of its life.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::handshake::{self, Opening};
use super::{
    ClientView, Link, Outbox, Policy, RouteState, Session, SessionHandle, Stream, answered_here,
    cfg_password, clock, link, read_your_writes, retry, tx_state,
};
use crate::config::Config;
use crate::config::tls::TlsMode;
use crate::context::{ClientSlot, ProxyContext};
use crate::error::sqlstate::*;
use crate::protocol::messages::{self, PgError};

/// Entry point for an accepted client connection.
///
/// The login's futures (TLS handshake, authentication, the first server
/// connection) are large and done with at login: they run boxed, so the
/// task keeps for the session's life only the session and its relay loop.
pub(crate) async fn serve(ctx: Arc<ProxyContext>, tcp: TcpStream) {
    let mut session = None;
    Box::pin(log_in(ctx, tcp, &mut session)).await;
    super::park::relay(&mut session).await;
}

/// From the first packet to the first ReadyForQuery: `logged_in` gets the
/// session if the client got in.
async fn log_in(ctx: Arc<ProxyContext>, tcp: TcpStream, logged_in: &mut Option<Session>) {
    let _ = tcp.set_nodelay(true);
    crate::backend::conn::set_keepalive(&tcp);
    let mut stream = Stream::Plain(tcp);
    // The certificates of the configuration in force at accept (a SIGHUP
    // changes them for later connections only).
    let cfg = ctx.config.load_full();
    let tls = cfg.tls_server.as_deref();
    // A stop does not wait for a connection that has not sent its first
    // packet: it holds no client slot and gets no goodbye.
    let mut stop = ctx.shutdown.clone();
    let opening = tokio::select! {
        r = timeout(cfg.timeouts.auth, handshake::read_opening(&mut stream, tls)) => r,
        _ = stop.wait_for(|stopping| *stopping) => return,
    };
    let opening = match opening {
        Ok(Ok(o)) => o,
        Ok(Err(e)) if stream.tcp().is_none() => {
            // A failed TLS handshake: rustls sent its alert.
            tracing::info!(message = %e.message, "client TLS handshake failed");
            return;
        }
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
        Opening::Cancel(key) => {
            ctx.cancel(key, cfg.timeouts.connect).await;
            return;
        }
        Opening::Startup(m) => m,
    };
    if !stream.is_tls() && tls.is_some_and(|t| t.mode == TlsMode::Require) {
        let e = PgError::fatal(
            INVALID_AUTHORIZATION,
            "TLS is required: pgpilot's [tls] mode is \"require\"",
        )
        .with_hint("connect with sslmode=require (or stronger)");
        return send_fatal(&mut stream, &e, &cfg).await;
    }
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
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    // Channel binding data of the certificate this client was served.
    let end_point = tls
        .filter(|_| stream.is_tls())
        .and_then(|t| crate::net::end_point_hash(&t.leaf));
    let cert_name = stream
        .tls()
        .and_then(|c| c.peer_certificates())
        .and_then(|certs| certs.first())
        .and_then(|c| crate::net::common_name(c));
    let login = handshake::Login {
        user: &user,
        database: startup.get("database").unwrap_or(&user),
        addr: peer.ip(),
        tls: stream.is_tls(),
        cert_name: cert_name.as_deref(),
        channel_binding: end_point.as_deref(),
    };
    let deadline = tokio::time::Instant::now() + cfg.timeouts.auth;
    let auth = async {
        let primary = ctx.cluster.snapshot().primary;
        let stored = handshake::look_up(&ctx.auth_lookup, &cfg, primary, &user).await?;
        handshake::authenticate(
            &mut stream,
            &cfg,
            &login,
            stored.as_deref(),
            &ctx.server_secret,
        )
        .await
    };
    let proven = match timeout(cfg.timeouts.auth, auth).await {
        Ok(Ok(proven)) => proven,
        Ok(Err(e)) => {
            tracing::info!(user = %user, client = %peer.ip(), code = %e.code, message = %e.message, "client authentication failed");
            if e.code == INVALID_PASSWORD {
                throttle_failure(&ctx, &cfg, peer.ip(), deadline).await;
            }
            return send_fatal(&mut stream, &e, &cfg).await;
        }
        Err(_) => {
            let e = PgError::fatal(PROTOCOL_VIOLATION, "authentication timed out");
            return send_fatal(&mut stream, &e, &cfg).await;
        }
    };
    messages::auth_ok(&mut out);
    let mut session = Session::new(ctx, cfg, stream, user, &startup, slot);
    // The keys log in to nodes only as a user with no password here (the
    // session's configuration stays the one it started with).
    if cfg_password(&session.cfg, &session.user).is_none() {
        session.scram_keys = proven.scram_keys.map(Box::new);
    }
    session.md5_stored = proven.md5_stored;
    if session.start(out, &startup).await {
        *logged_in = Some(session);
    }
}

/// The sizes of a session's task and state: (what, bytes), for
/// `benches/idle_session.rs`.
pub(crate) fn sizes() -> Vec<(&'static str, usize)> {
    /// The size of what `f` returns, without calling it.
    fn returned<A, B, F>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    fn returned1<A, F>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    vec![
        ("the task's future (serve)", returned(serve)),
        ("Session", std::mem::size_of::<Session>()),
        ("Parked", super::park::parked_size()),
        ("relay future", returned1(Session::relay)),
        ("relay_to_end future", returned1(Session::relay_to_end)),
        ("perform future", returned(Session::perform)),
        ("Link", std::mem::size_of::<Link>()),
        ("LinkState", std::mem::size_of::<link::LinkState>()),
        ("ClientView", std::mem::size_of::<ClientView>()),
        ("Stream", std::mem::size_of::<Stream>()),
        ("Outbox", std::mem::size_of::<Outbox>()),
        (
            "OwnStatements",
            std::mem::size_of::<answered_here::OwnStatements>(),
        ),
        (
            "ReadYourWrites",
            std::mem::size_of::<read_your_writes::ReadYourWrites>(),
        ),
        ("RetryNet", std::mem::size_of::<retry::RetryNet>()),
        ("RouteState", std::mem::size_of::<RouteState>()),
        ("Tx", std::mem::size_of::<tx_state::Tx>()),
        ("TurnClock", std::mem::size_of::<clock::TurnClock>()),
        ("ReadWatch", std::mem::size_of::<crate::net::ReadWatch>()),
        ("SessionHandle", std::mem::size_of::<SessionHandle>()),
        ("Policy", std::mem::size_of::<Policy>()),
        (
            "memo",
            std::mem::size_of::<crate::router::memo::StatementMemo>(),
        ),
        (
            "ScramKeys",
            std::mem::size_of::<Option<crate::protocol::auth::ScramKeys>>(),
        ),
    ]
}

/// Hold the answer to a failed login while its address is over
/// `auth_failure_limit` (see [`crate::auth::throttle`]); the wait ends by the
/// authentication deadline at the latest.
async fn throttle_failure(
    ctx: &ProxyContext,
    cfg: &Config,
    addr: std::net::IpAddr,
    deadline: tokio::time::Instant,
) {
    let (limit, max) = (cfg.auth_failure_limit, cfg.auth_failure_max_delay);
    let delay = ctx
        .login_throttle
        .failed(addr, limit, max, std::time::Instant::now());
    if !delay.is_zero() {
        ctx.metrics.auth.failure_delayed();
        tracing::info!(client = %addr, ?delay, "repeated failed logins: answer delayed");
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + delay)).await;
    }
}

/// Write a FATAL error and close, bounded by the write timeout.
async fn send_fatal(stream: &mut Stream, e: &PgError, cfg: &Config) {
    let mut buf = BytesMut::new();
    e.encode(&mut buf);
    let _ = timeout(cfg.timeouts.write, async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    })
    .await;
}
