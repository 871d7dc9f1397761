//! Parked sessions: a client idle past `pool.park_idle_after` between
//! transactions, holding no server connection, gives up its task and its
//! tokio socket registration and waits in the runtime's parking lot
//! ([`lot`]) as a [`Parked`]: the socket, the identity, the cancel key and
//! what the client has been told (settings, prepared statements, routing
//! and read-your-writes state, only when not at their defaults). Caches (the
//! statement memo, shunned standbys, the pool keys of other nodes, scratch
//! space) are dropped and rebuilt on [`Parked::resume`].
//!
//! Only a session with nothing in flight is parked ([`Session::parkable`]):
//! plain TCP (a TLS session's rustls state stays in its task), no server
//! connection, no transaction block, nothing buffered either way, no batch
//! open. Its next message, a hang-up, its `timeouts.client_idle` deadline or
//! pgpilot's stop resumes it in a new task, where the ordinary relay and
//! goodbye code handle it: a parked session behaves as an idle one.

pub(super) mod lot;

use std::sync::Arc;
use std::time::Instant;

use super::client_view::ClientView;
use super::{Session, answered_here, read_your_writes, route};
use crate::backend::PoolKey;
use crate::config::{Config, NodeId};
use crate::context::cancel::CancelSlot;
use crate::context::registry::SessionHandle;
use crate::context::{ClientSlot, ProxyContext};
use crate::net::Stream;
use crate::protocol::CancelKey;
use crate::router::policy::RouteState;

/// A session waiting in the parking lot: what an idle client without a
/// server connection must keep, and nothing else.
pub(super) struct Parked {
    /// The client socket, deregistered from tokio.
    pub(super) client: std::net::TcpStream,
    /// When `timeouts.client_idle` closes the client, if it is on.
    pub(super) deadline: Option<Instant>,
    ctx: Arc<ProxyContext>,
    cfg: Arc<Config>,
    /// The pool key built at login: user, database and startup parameters
    /// (the session's user and database are read back from it).
    pool_key: PoolKey,
    cancel_key: CancelKey,
    cancel: CancelSlot,
    registration: SessionHandle,
    slot: ClientSlot,
    active: NodeId,
    flags: Flags,
    /// The rest, only when some of it differs from a fresh session's: most
    /// idle clients have none of it.
    kept: Option<Box<Kept>>,
}

/// What the client was told, the routing state and pgpilot's own session
/// state; the large parts boxed again, only when not at their default.
#[derive(Default)]
struct Kept {
    route: RouteState,
    next: route::NextRequest,
    client_view: Option<Box<ClientView>>,
    read_your_writes: Option<Box<read_your_writes::ReadYourWrites>>,
    answered_here: Option<Box<answered_here::OwnStatements>>,
    scram_keys: Option<Box<crate::protocol::auth::ScramKeys>>,
    md5_stored: Option<String>,
}

impl Kept {
    /// Whether it holds nothing a fresh session would not.
    fn is_empty(&self) -> bool {
        self.route == RouteState::default()
            && self.next == route::NextRequest::default()
            && self.client_view.is_none()
            && self.read_your_writes.is_none()
            && self.answered_here.is_none()
            && self.scram_keys.is_none()
            && self.md5_stored.is_none()
    }
}

/// The session's independent flags, kept across parking.
#[derive(Clone, Copy)]
struct Flags {
    standby_picked: bool,
    defaults_probed: bool,
    dirty: bool,
    no_primary_login: bool,
    catalog_changed: bool,
}

/// `v` boxed, unless it is at its default (`empty`).
fn boxed_unless<T>(v: T, empty: impl FnOnce(&T) -> bool) -> Option<Box<T>> {
    (!empty(&v)).then(|| Box::new(v))
}

/// Whether `v` holds nothing a fresh session would not.
fn view_is_empty(v: &ClientView) -> bool {
    v.stmts.is_empty()
        && v.sql_names.is_empty()
        && v.log.is_empty()
        && v.log_base == 0
        && v.pending_tx.is_empty()
        && !v.overflowed
        && !v.any_broken
}

impl Session {
    /// Whether the session may be parked once idle: nothing in flight,
    /// nothing buffered, no server connection, plain TCP, and a parking
    /// lot to go to.
    pub(super) fn parkable(&self) -> bool {
        matches!(self.client, Stream::Plain(_))
            && self.released()
            && self.cbuf.is_empty()
            && self.to_client.is_empty()
            && !self.tx.in_block()
            && !self.tx.client_aborted()
            && !self.tx.uncertain
            && self.batch.is_none()
            && !self.batch_unseen
            && !self.shape_wait
            && !self.recheck
            && self.pending_class.is_none()
            && self.parsed_ahead.is_empty()
            && self.untouched_tx_begin.is_none()
            && self.retiring.is_empty()
            && self.pool_keys.iter().any(|k| k.get().is_some())
            && lot::Lot::of(&self.ctx).is_some()
    }

    /// How long the session waits idle before it parks this turn (zero:
    /// it does not).
    pub(super) fn park_after(&self) -> std::time::Duration {
        let after = self.cfg.pool.park_idle_after;
        if after.is_zero() || !self.parkable() {
            return std::time::Duration::ZERO;
        }
        after
    }

    /// Shrink the session to its parked form; `Err` gives it back (with its
    /// socket, or a closed stream if tokio lost it) when the socket cannot
    /// leave tokio.
    // The session comes back on the rare failure only, once per parking.
    #[allow(clippy::result_large_err)]
    pub(super) fn park(mut self, idle_since: Instant) -> Result<Box<Parked>, Session> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.client, Stream::Closed) else {
            return Err(self);
        };
        let client = match tcp.into_std() {
            Ok(c) => c,
            Err(e) => {
                // The socket is closed by now: the relay ends the session.
                tracing::debug!(error = %e, "could not take the client socket from tokio");
                return Err(self);
            }
        };
        let Session {
            ctx,
            cfg,
            policy: _,
            client: _,
            cbuf: _,
            to_client: _,
            user: _,
            scram_keys,
            md5_stored,
            database: _,
            pool_keys,
            cancel_key,
            clock: _,
            cancel,
            links: _,
            client_reads: _,
            active,
            batch: _,
            client_view,
            route,
            tx: _,
            pending_class: _,
            parsed_ahead: _,
            memo: _,
            batch_unseen: _,
            shape_wait: _,
            next,
            retry: _,
            catalog_changed,
            shunned_until: _,
            standby_picked,
            defaults_probed,
            recheck: _,
            dirty,
            registration,
            answered_here,
            read_your_writes,
            untouched_tx_begin: _,
            no_primary_login,
            retiring: _,
            _slot: slot,
        } = self;
        // The stop reaches a parked session through the lot; the waker of
        // the task it leaves would keep that task allocated.
        registration.forget_waker();
        let pool_key = pool_keys
            .into_iter()
            .find_map(std::sync::OnceLock::into_inner)
            .expect("parkable: a pool key is built");
        let idle = cfg.timeouts.client_idle;
        Ok(Box::new(Parked {
            client,
            deadline: (!idle.is_zero()).then(|| idle_since + idle),
            ctx,
            cfg,
            pool_key,
            cancel_key,
            cancel,
            registration,
            slot,
            active,
            flags: Flags {
                standby_picked,
                defaults_probed,
                dirty,
                no_primary_login,
                catalog_changed,
            },
            kept: boxed_unless(
                Kept {
                    route,
                    next,
                    client_view: boxed_unless(client_view, view_is_empty),
                    read_your_writes: boxed_unless(read_your_writes, |r| *r == Default::default()),
                    answered_here: boxed_unless(
                        answered_here,
                        answered_here::OwnStatements::is_empty,
                    ),
                    scram_keys,
                    md5_stored,
                },
                Kept::is_empty,
            ),
        }))
    }
}

impl Parked {
    /// The session again, its socket registered with tokio (of the runtime
    /// this runs on) and its caches empty.
    pub(super) fn resume(self) -> Session {
        let Parked {
            client,
            deadline: _,
            ctx,
            cfg,
            pool_key,
            cancel_key,
            cancel,
            registration,
            slot,
            active,
            flags,
            kept,
        } = self;
        let Kept {
            route,
            next,
            client_view,
            read_your_writes,
            answered_here,
            scram_keys,
            md5_stored,
        } = kept.map(|k| *k).unwrap_or_default();
        let client = match tokio::net::TcpStream::from_std(client) {
            Ok(tcp) => Stream::Plain(tcp),
            Err(e) => {
                // The relay finds the stream closed and ends the session.
                tracing::warn!(error = %e, "could not give a parked client's socket back to tokio");
                Stream::Closed
            }
        };
        let nodes = cfg.backends.len();
        let pool_keys: Vec<std::sync::OnceLock<PoolKey>> =
            (0..nodes).map(|_| Default::default()).collect();
        let (user, database) = (pool_key.user().to_string(), pool_key.database().to_string());
        if let Some(k) = pool_keys.get(pool_key.node.index()) {
            let _ = k.set(pool_key);
        }
        Session {
            policy: super::policy(&cfg),
            ctx,
            cfg,
            client,
            cbuf: Default::default(),
            to_client: Default::default(),
            user,
            scram_keys,
            md5_stored,
            database,
            pool_keys,
            cancel_key,
            clock: Default::default(),
            cancel,
            links: (0..nodes).map(|_| None).collect(),
            client_reads: Default::default(),
            active,
            batch: None,
            client_view: client_view.map(|b| *b).unwrap_or_default(),
            route,
            tx: Default::default(),
            pending_class: None,
            parsed_ahead: Default::default(),
            memo: Default::default(),
            batch_unseen: false,
            shape_wait: false,
            next,
            retry: Default::default(),
            catalog_changed: flags.catalog_changed,
            shunned_until: Vec::new(),
            standby_picked: flags.standby_picked,
            defaults_probed: flags.defaults_probed,
            recheck: false,
            dirty: flags.dirty,
            registration,
            answered_here: answered_here.map(|b| *b).unwrap_or_default(),
            read_your_writes: read_your_writes.map(|b| *b).unwrap_or_default(),
            untouched_tx_begin: None,
            no_primary_login: flags.no_primary_login,
            retiring: Vec::new(),
            _slot: slot,
        }
    }

    /// The proxy this session belongs to.
    pub(super) fn ctx(&self) -> &ProxyContext {
        &self.ctx
    }
}

/// Relay `session` until it ends, parking it whenever it asks to be: the
/// loop of a session's task, from login or from the parking lot.
pub(super) async fn relay(session: &mut Option<Session>) {
    while let Some(s) = session.as_mut() {
        let Some(idle_since) = s.relay_to_end().await else {
            return;
        };
        let s = session.take().expect("the session is there");
        match s.park(idle_since) {
            Ok(parked) => {
                if let Err(back) = lot::park(parked) {
                    // The lot is closing (pgpilot stops): relay on, the stop
                    // ends the session with its goodbye.
                    *session = Some(back.resume());
                }
            }
            Err(back) => *session = Some(back),
        }
    }
}

/// The size of a parked session (for `benches/idle_session.rs`).
pub(super) fn parked_size() -> usize {
    std::mem::size_of::<Parked>()
}
