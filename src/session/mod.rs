//! One task per client connection: the login ([`login`], [`handshake`]),
//! then one relay loop forwarding raw frames between the client and the
//! server connections serving it.
//!
//! A session holds at most one server connection per node ([`link`]): the
//! primary's, opened at login, and a standby's, opened when the first read is
//! routed there. [`route`] decides the node of each request and [`track`]
//! records what sending it did; [`client_view`] keeps the settings and prepared
//! statements every connection must share; [`relay`] is the loop. [`txpool`]
//! gives connections back between transactions (transaction pooling), and
//! [`no_primary_login`] lets an admin in while no primary can be reached.
//!
//! The session's state is grouped by concern: the client's transaction
//! ([`tx_state`], with its transitions), what the client has been told
//! ([`client_view`]), the routing state (`route`), read-your-writes
//! ([`read_your_writes`]), and the one-shot fallbacks a failure leaves for the
//! next request ([`route::NextRequest`]). The few bools left on [`Session`] are
//! independent flags, each documented at its field.
//!
//! The session decodes only what it must: frame boundaries, Query and Parse
//! text, Bind/Close names from the client; ReadyForQuery, ErrorResponse,
//! ParameterStatus and ParseComplete from the servers. Everything else passes
//! through as the bytes that arrived, batched per read.

mod answered_here;
mod catalog_io;
mod client_view;
mod clock;
mod connect;
pub(crate) mod handshake;
mod link;
mod login;
mod no_primary_login;
mod park;
mod read_your_writes;
mod relay;
mod retry;
mod route;
mod shape_check;
mod sql_prepare;
mod statements;
mod track;
mod tx_state;
mod txpool;
mod unlogged;

use std::sync::Arc;

use bytes::BytesMut;

use crate::backend::conn::Unnamed;
use crate::config::{Config, NodeId};
use crate::context::cancel::{CancelSlot, CancelTarget};
use crate::context::registry::{self, SessionHandle};
use crate::context::{ClientSlot, ProxyContext};
use crate::error::ToPgError;
use crate::net::{Outbox, Stream, WriteError, write_all_timeout};
use crate::protocol::messages;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{CancelKey, TxStatus};
use crate::router::classify::Classification;
use crate::router::policy::{Policy, RouteState};
use client_view::ClientView;
use link::{Done, Link};

/// Why a session ended abnormally; defined beside its SQLSTATE mapping.
pub(crate) use crate::error::SessionError;
pub(crate) use login::{serve, sizes};

/// The password `cfg` has for `user`, if any.
fn cfg_password<'a>(cfg: &'a Config, user: &str) -> Option<&'a str> {
    cfg.user(user).and_then(|u| u.password.as_deref())
}

/// The routing knobs of `cfg`, as a session (new or resumed) keeps them.
fn policy(cfg: &Config) -> Policy {
    Policy {
        load_balance: cfg.routing.load_balance,
        in_transaction: cfg.routing.disable_load_balance_on_write,
    }
}

/// A logged-in client.
struct Session {
    /// Proxy-wide state (pool, cluster, cancels, classifier).
    ctx: Arc<ProxyContext>,
    /// Configuration as of session start (a reload applies to new sessions).
    cfg: Arc<Config>,
    /// Routing knobs from `cfg`.
    policy: Policy,
    /// The client socket.
    client: Stream,
    /// Bytes read from the client and not yet forwarded: at most one partial frame,
    /// or requests waiting for their node ([`route::Step::Blocked`]).
    cbuf: BytesMut,
    /// Bytes for the client that its socket has not taken yet.
    to_client: Outbox,
    /// Role name from the startup packet.
    user: String,
    /// What the client's SCRAM login proved: how pgpilot logs in to nodes as
    /// this user when its config has a `scram_verifier` but no `password`.
    /// Boxed: most users have a password in the configuration, and every
    /// idle session would carry the room.
    scram_keys: Option<Box<crate::protocol::auth::ScramKeys>>,
    /// The user's stored MD5 hash (`auth_query`): how pgpilot answers a
    /// node's MD5 challenge for a user it has no password for.
    md5_stored: Option<String>,
    /// Database from the startup packet (defaults to the user name).
    database: String,
    /// The pool key of each node for this session: user, database and the
    /// startup parameters sent to every node the session uses. Built once,
    /// since transaction pooling acquires a connection per request.
    /// Built for the primary at login, for another node the first time the
    /// session uses it ([`Session::pool_key`]): most sessions use one node.
    pool_keys: Vec<std::sync::OnceLock<crate::backend::PoolKey>>,
    /// pgpilot's BackendKeyData key for this client (its pid keys the cancel
    /// registry and names the session in the admin views).
    cancel_key: CancelKey,
    /// The time of the current relay turn, read once per turn (see [`clock`]).
    clock: clock::TurnClock,
    /// Where this client's cancels go: the registry reads it, the session
    /// points it at whichever server connection serves it now.
    cancel: CancelSlot,
    /// Server connections by node id (at most one per node).
    links: Vec<Option<Link>>,
    /// Read wake-ups of the client socket: a relay turn woken by a server
    /// skips re-polling a client that is known to be quiet.
    client_reads: crate::net::ReadWatch,
    /// The node whose answers the client is waiting for (the last one sent to);
    /// only it can have requests in flight.
    active: NodeId,
    /// Where the extended-protocol batch being forwarded goes (until its Sync).
    batch: Option<route::Target>,
    /// Settings and prepared statements shared by every connection of the session.
    client_view: ClientView,
    /// Routing state: the session's standby, sticky/forced primary, transaction node.
    route: RouteState,
    /// The client's transaction: the block as predicted from what was sent and
    /// corrected by the transaction node's ReadyForQuery, pgpilot's abort of
    /// it in pgpool mode, and whether the prediction is certain ([`tx_state`]).
    tx: tx_state::Tx,
    /// Classification of the request just routed (reused when it is sent).
    pending_class: Option<Arc<Classification>>,
    /// Classifications of the Parses of the batch just routed, in order (reused
    /// when each Parse is forwarded, so a statement is classified once).
    parsed_ahead:
        std::collections::VecDeque<(Arc<Classification>, Option<crate::router::normalize::Hint>)>,
    /// The shapes of the statements the session sent last: most statements
    /// are classified by recognising one of them (see [`crate::router::memo`]).
    memo: crate::router::memo::StatementMemo,
    /// The open batch was routed in an earlier read: its messages arriving
    /// now were not seen then, so the statements they use are supplied as
    /// they come ([`Session::supply_statement`]).
    batch_unseen: bool,
    /// A statement supplied in front of a message of the open batch awaits
    /// the answer to pgpilot's Describe of it: the batch's next messages wait
    /// ([`Session::supply_statement`]).
    shape_wait: bool,
    /// One-shot fallbacks a failure leaves for the next request.
    next: route::NextRequest,
    /// The request that may run again on the primary if a standby refuses it.
    retry: retry::RetryNet,
    /// A request that may change the catalog was sent since the session was
    /// last idle ([`Session::catalog_settled`]).
    catalog_changed: bool,
    /// Standbys this session failed to use, not retried before the instant
    /// (empty until the first).
    shunned_until: Vec<Option<tokio::time::Instant>>,
    /// The session has picked a load-balance node once (later picks are moves).
    standby_picked: bool,
    /// The session's transaction defaults were read from the primary connection.
    defaults_probed: bool,
    /// Client data may be routable now (new bytes, or a node became free).
    recheck: bool,
    /// Whether the session may have left state (SET, PREPARE, temp tables...) that
    /// must be reset before another client reuses its connections.
    dirty: bool,
    /// This session in `ctx.sessions` (SHOW POOL_PROCESSES); unregisters on drop.
    registration: SessionHandle,
    /// Admin statements prepared through the extended protocol.
    answered_here: answered_here::OwnStatements,
    /// Read-your-writes state: what the session's reads must see.
    read_your_writes: read_your_writes::ReadYourWrites,
    /// The open transaction was begun on a standby by this Query and has run
    /// nothing else: a `SET TRANSACTION` only the primary can take moves it
    /// there ([`route::Step::MoveTxToPrimary`]).
    untouched_tx_begin: Option<bytes::Bytes>,
    /// Logged in without a server connection (an admin user while no primary
    /// could be reached): the session may hold none until a request needs one.
    no_primary_login: bool,
    /// Databases whose connections the pool closes rather than keeps until
    /// the statement sent for them (`DROP DATABASE` …) is answered.
    retiring: Vec<String>,
    /// Counts this client against `max_client_conn` until dropped.
    _slot: ClientSlot,
}

/// How the relay loop ended.
enum End {
    /// Terminate message or the client closed the socket.
    ClientGone,
    /// An error; the client is told (if still there) and the server connections dropped.
    Error(SessionError),
    /// Idle past `pool.park_idle_after` and parkable ([`park`]): idle since
    /// then.
    Park(std::time::Instant),
}

/// How long a standby that failed a session is left alone by that session.
const SHUN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a standby that refused the session's login (database or role not
/// replicated yet) is left alone.
const SHUN_REFUSED: std::time::Duration = std::time::Duration::from_millis(500);

impl Session {
    fn new(
        ctx: Arc<ProxyContext>,
        cfg: Arc<Config>,
        client: Stream,
        user: String,
        startup: &StartupMessage,
        slot: ClientSlot,
    ) -> Session {
        let (cancel_key, cancel) = ctx.new_client_key();
        let nodes = cfg.backends.len();
        let database = startup.get("database").unwrap_or(&user).to_string();
        let policy = policy(&cfg);
        let registration = ctx.sessions.register(
            nodes,
            cancel_key.pid,
            &user,
            startup.get("database").unwrap_or(&user),
            startup.get("application_name").unwrap_or_default(),
            client.peer_addr().ok(),
        );
        let pool_keys: Vec<std::sync::OnceLock<_>> =
            (0..nodes).map(|_| Default::default()).collect();
        let first = ctx.cluster.snapshot().primary.unwrap_or(NodeId::new(0));
        if let Some(key) = pool_keys.get(first.index()) {
            key.get_or_init(|| {
                crate::backend::PoolKey::new(first, &user, &database, &startup.params)
            });
        }
        Session {
            ctx,
            cfg,
            policy,
            client,
            pool_keys,
            cbuf: BytesMut::new(),
            to_client: Outbox::default(),
            user,
            scram_keys: None,
            md5_stored: None,
            database,
            cancel_key,
            cancel,
            clock: clock::TurnClock::default(),
            links: (0..nodes).map(|_| None).collect(),
            client_reads: Default::default(),
            active: NodeId::new(0),
            batch: None,
            client_view: ClientView::default(),
            route: RouteState::default(),
            tx: tx_state::Tx::default(),
            pending_class: None,
            parsed_ahead: std::collections::VecDeque::new(),
            memo: Default::default(),
            batch_unseen: false,
            shape_wait: false,
            next: route::NextRequest::default(),
            catalog_changed: false,
            retry: retry::RetryNet::default(),
            shunned_until: Vec::new(),
            standby_picked: false,
            defaults_probed: false,
            recheck: false,
            dirty: false,
            registration,
            answered_here: answered_here::OwnStatements::default(),
            read_your_writes: read_your_writes::ReadYourWrites::default(),
            untouched_tx_begin: None,
            no_primary_login: false,
            retiring: Vec::new(),
            _slot: slot,
        }
    }

    /// Finish startup (primary connection, parameters, key): true when the
    /// client got its ReadyForQuery; otherwise it was told why and the
    /// session is cleaned up.
    async fn start(&mut self, mut out: BytesMut, startup: &StartupMessage) -> bool {
        match self.attach_at_login().await {
            Ok(true) => {
                if let Some(l) = &self.links[self.active.index()] {
                    // What the server said while it started, as PostgreSQL
                    // sends it: after AuthenticationOk, before the parameters.
                    out.extend_from_slice(&l.conn.startup_notices);
                    self.ctx.server_params.remember(&l.conn.params);
                    for (k, v) in &l.conn.params {
                        messages::parameter_status(&mut out, k, v);
                    }
                }
            }
            Ok(false) => {
                for (k, v) in self.ctx.server_params.for_login(startup, &self.user) {
                    messages::parameter_status(&mut out, &k, &v);
                }
            }
            Err(e) => {
                let mut fatal = e.to_pg_error();
                tracing::warn!(user = %self.user, error = %fatal, "could not get a server connection");
                fatal.severity = messages::Severity::Fatal;
                fatal.encode(&mut out);
                let _ = self.write_client(&out).await;
                self.cleanup();
                return false;
            }
        }
        messages::backend_key_data(&mut out, self.cancel_key);
        messages::ready_for_query(&mut out, TxStatus::Idle);
        match self.write_client(&out).await {
            Ok(()) => true,
            Err(e) => {
                self.end(End::Error(e)).await;
                false
            }
        }
    }

    /// Relay until the client leaves, an error occurs or pgpilot stops,
    /// then clean up; or until the session may be parked: `Some(idle since)`.
    async fn relay_to_end(&mut self) -> Option<std::time::Instant> {
        let end = self.relay().await;
        if let End::Park(since) = end {
            return Some(since);
        }
        // Boxed: the goodbye's futures would otherwise size the task's
        // future for the whole session.
        Box::pin(self.end(end)).await;
        None
    }

    /// Tell the client why the session ends (if it is still there and no
    /// server told it), then give the server connections back.
    async fn end(&mut self, end: End) {
        if let End::Error(e) = &end {
            // A lost server connection asks for an early health probe of that
            // node; the probe, not this error, decides whether it is down
            // (or, for the primary, whether a failover starts).
            let failover = match e {
                SessionError::BackendLost { node } => self.ctx.cluster.session_lost(*node).await,
                _ => false,
            };
            let lost_client = matches!(e, SessionError::ClientIo(_) | SessionError::WriteTimeout);
            tracing::debug!(user = %self.user, error = %e, "session ended with an error");
            let server_said_fatal = self.links.iter().flatten().any(|l| l.saw_fatal);
            if !lost_client && !server_said_fatal {
                let mut buf = BytesMut::new();
                match e {
                    SessionError::BackendLost { node } if failover => {
                        crate::error::failover_in_progress(*node)
                    }
                    _ => e.to_pg_error(),
                }
                .encode(&mut buf);
                let _ = self.write_client(&buf).await;
            }
        }
        self.cleanup();
    }

    /// The pool key of `node`, built from another node's the first time:
    /// the same user, database and startup parameters.
    fn pool_key(&self, node: NodeId) -> &crate::backend::PoolKey {
        self.pool_keys[node.index()].get_or_init(|| {
            let built = self
                .pool_keys
                .iter()
                .find_map(std::sync::OnceLock::get)
                .expect("a pool key is built at login");
            // `startup` is user, database, then the rest in order.
            crate::backend::PoolKey::new(node, built.user(), built.database(), &built.startup[2..])
        })
    }

    /// Make `node` the one whose answers are awaited; cancels go to its server.
    fn set_active(&mut self, node: NodeId) {
        let changed = self.active != node;
        self.active = node;
        if changed
            || self.links[node.index()]
                .as_ref()
                .is_some_and(|l| l.sent == 0)
        {
            self.serving_now(node);
        }
    }

    /// Point cancels and the registry at the session's connection to `node`.
    fn serving_now(&mut self, node: NodeId) {
        if let Some(l) = &self.links[node.index()] {
            self.registration
                .set_backend(node, l.conn.cancel_key.pid, l.conn.opened_ms);
            self.cancel.set(Some(CancelTarget {
                addr: l.conn.addr,
                key: l.conn.cancel_key,
            }));
        }
    }

    /// The link to `node`, which routing made sure exists.
    fn link_mut(&mut self, node: NodeId) -> Result<&mut Link, SessionError> {
        self.links
            .get_mut(node.index())
            .and_then(Option::as_mut)
            .ok_or(SessionError::BackendLost { node })
    }

    /// Apply what the response stream of `node` settled.
    fn settle(&mut self, node: NodeId, done: &mut Vec<Done>) {
        for d in done.drain(..) {
            match d {
                Done::Effects { effects, succeeded } => {
                    if succeeded {
                        self.apply_effects(node, *effects);
                    }
                }
                Done::ParseFailed(name) => self.parse_failed(node, &name),
                Done::ParamChanged => self.dirty = true,
                Done::Described { name, shape } => self.on_described(&name, shape),
                Done::ShapeChecked {
                    name,
                    expected,
                    got,
                } => self.on_shape_checked(&name, expected, got),
                Done::Answered { since } => {
                    let took = self.clock.now().saturating_duration_since(since);
                    self.ctx.metrics.query_finished(node, took.as_secs_f64());
                }
                Done::Ready {
                    status,
                    drained,
                    failed,
                } => {
                    let tx_link = self.route.tx_node.is_none_or(|t| t == node);
                    if failed && !tx_link && self.tx.in_block() {
                        // A read balanced off the transaction's node failed: in
                        // PostgreSQL the transaction would now be aborted.
                        self.tx.abort_client();
                    }
                    if tx_link && status == TxStatus::Idle {
                        self.catalog_settled();
                        self.client_view.pending_tx.clear();
                        self.tx.clear_abort();
                    }
                    if status == TxStatus::Idle
                        && self.read_your_writes.write_pending
                        && Some(node) == self.ctx.cluster.snapshot().primary
                    {
                        self.writes_acknowledged();
                    }
                    if drained {
                        if !self.retiring.is_empty()
                            && !self.links.iter().flatten().any(|l| l.busy())
                        {
                            self.end_retiring();
                        }
                        if tx_link {
                            self.tx.correct(status != TxStatus::Idle);
                            self.route.tx_node = self.tx.in_block().then_some(node);
                            if !self.tx.in_block() {
                                self.route.tx_wrote = false;
                            }
                        }
                        self.tx.uncertain = false;
                        // Requests held back while the node was busy can go now
                        // (with none waiting, there is nothing to route).
                        self.recheck |= !self.cbuf.is_empty();
                        self.registration.set_state(match status {
                            TxStatus::Idle => registry::SessionActivity::Idle,
                            TxStatus::InTransaction => registry::SessionActivity::IdleInTransaction,
                            TxStatus::Failed => registry::SessionActivity::FailedTransaction,
                        });
                    }
                }
            }
        }
    }

    /// A client's Parse of `name` failed on `node`: the statement does not exist.
    #[cold]
    #[inline(never)]
    fn parse_failed(&mut self, node: NodeId, name: &[u8]) {
        if let Some(l) = self.links[node.index()].as_mut() {
            l.statements.remove(name);
        }
        if let Some(client_view::Stmt {
            source: client_view::StmtSource::Parse(_),
            ..
        }) = self.client_view.stmts.get(name)
        {
            self.client_view.stmts.remove(name);
        }
    }

    /// A request's effects, confirmed by the server.
    #[inline(never)]
    fn apply_effects(&mut self, node: NodeId, e: client_view::Effects) {
        use crate::router::classify::TxControl;
        let c = &e.class;
        if let Some(ro) = c.sets_read_only_default {
            self.route.read_only_default = ro;
        }
        if let Some(primary) = e.route {
            self.route.forced_primary = primary;
        }
        if let (Some((name, access)), Some(q)) = (&c.prepare, &e.sql_prepare) {
            let mut inner = (**c).clone();
            inner.access = *access;
            inner.prepare = None;
            inner.session_state = false;
            let name = name.as_bytes().to_vec();
            self.client_view.stmts.insert(
                name.clone(),
                client_view::Stmt::new(
                    client_view::StmtSource::Sql(q.clone()),
                    Arc::new(inner),
                    None,
                ),
            );
            if !self.client_view.sql_names.contains(&name) {
                self.client_view.sql_names.push(name.clone());
            }
            if let Some(l) = self.links[node.index()].as_mut() {
                l.statements.insert(name);
            }
        }
        match &c.deallocate {
            Some(None) => self.forget_all_statements(node),
            Some(Some(name)) => self.forget_statement(node, name.as_bytes()),
            None => {}
        }
        if e.discard_all {
            self.forget_all_statements(node);
        }
        if let Some(op) = &e.savepoint {
            self.client_view.savepoint(op);
            if matches!(op, crate::router::session_cmd::SavepointOp::RollbackTo(_)) {
                self.tx.clear_abort();
            }
        }
        let mut logged = Vec::new();
        if let Some(q) = e.replay {
            if e.in_tx_block {
                self.client_view
                    .pending_tx
                    .push(client_view::Pending::Setting(q));
            } else {
                logged.push(q);
            }
        }
        if matches!(c.tx, Some(TxControl::Commit)) {
            logged.append(&mut self.client_view.take_committed());
        }
        for q in logged {
            let was_current = self.links[node.index()]
                .as_ref()
                .is_some_and(|l| l.applied == self.client_view.log_end());
            let text = std::str::from_utf8(route::query_sql(&q)).unwrap_or("");
            let resets = crate::router::session_cmd::resets_all(text);
            self.client_view.log_setting(q, resets);
            if was_current && let Some(l) = self.links[node.index()].as_mut() {
                l.applied = self.client_view.log_end();
            }
        }
        if self.client_view.overflowed {
            self.route.sticky_primary = true;
        }
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

    /// Give each server connection back (reset if needed) or discard it.
    fn cleanup(&mut self) {
        self.ctx.cancels.unregister(self.cancel_key);
        self.end_retiring();
        for link in self.links.iter_mut().filter_map(Option::take) {
            let ctx = self.ctx.clone();
            let cfg = self.cfg.clone();
            if link.reusable() {
                // Prepared statements need no reset: the connection's next user
                // finds its own there or closes them first (`super::statements`).
                // Session pooling resets a connection that has named ones: its
                // next session parses its own anyway.
                let dirty = self.dirty
                    || (cfg.pool.mode == crate::config::PoolMode::Session
                        && !link.conn.held.is_empty());
                tokio::spawn(async move {
                    let mut conn = link.into_conn();
                    // The reset (a simple Query) drops an unnamed statement.
                    if dirty {
                        conn.unnamed = Unnamed::Absent;
                    }
                    let reset = if dirty {
                        let r = conn
                            .run_discarding(&cfg.pool.reset_query, cfg.timeouts.reset)
                            .await;
                        // DISCARD ALL drops every statement; another reset
                        // query may leave some (which ones is unknown).
                        if crate::router::session_cmd::is_discard_all(&cfg.pool.reset_query) {
                            conn.held.clear();
                        } else {
                            conn.held.forget_contents();
                        }
                        r
                    } else {
                        Ok(())
                    };
                    match reset {
                        Ok(()) => ctx.pool.put_idle(conn, std::time::Instant::now()),
                        Err(e) => {
                            tracing::info!(node = %conn.node, error = %e, "reset failed; closing the connection")
                        }
                    }
                });
            } else if link.busy() {
                // Mid-request: never pooled. Cancel what runs, then close.
                let (addr, key) = (link.conn.addr, link.conn.cancel_key);
                tokio::spawn(async move {
                    crate::backend::conn::send_cancel(addr, key, cfg.timeouts.connect).await;
                });
            }
        }
    }
}
