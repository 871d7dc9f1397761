//! Who is connected: one entry per client session, for `SHOW POOL_PROCESSES`
//! and `SHOW POOL_POOLS`.
//!
//! A session registers once after login ([`SessionRegistry::register`]) and
//! keeps the returned [`SessionHandle`]; dropping it unregisters. The handle's
//! mutable fields are atomics, so a session can report its current backend
//! and state on every statement without a lock; only register/unregister and
//! admin listings take the registry's mutex.
//!
//! User, database and application names are interned: the sessions of one
//! user and database share one copy of each, so a registered client costs
//! its entry and nothing per name (thousands of idle clients of one
//! application are the common case).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use futures_util::task::AtomicWaker;

use crate::backend::conn::from_epoch_ms;
use crate::config::NodeId;

/// What a session is doing (pgpool's process status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SessionActivity {
    /// Logged in, waiting for its first server connection.
    Connecting = 0,
    /// Idle between transactions.
    Idle = 1,
    /// A request is being executed.
    Active = 2,
    /// Idle inside a transaction.
    IdleInTransaction = 3,
    /// Idle inside a failed transaction.
    FailedTransaction = 4,
}

impl SessionActivity {
    fn from_u8(v: u8) -> SessionActivity {
        match v {
            1 => SessionActivity::Idle,
            2 => SessionActivity::Active,
            3 => SessionActivity::IdleInTransaction,
            4 => SessionActivity::FailedTransaction,
            _ => SessionActivity::Connecting,
        }
    }

    /// pgpool's wording (`Idle`, `Execute command`, `Idle in transaction` …).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SessionActivity::Connecting => "Connecting",
            SessionActivity::Idle => "Idle",
            SessionActivity::Active => "Execute command",
            SessionActivity::IdleInTransaction => "Idle in transaction",
            SessionActivity::FailedTransaction => "Idle in transaction (aborted)",
        }
    }
}

/// One client session, as admin commands see it.
#[derive(Debug)]
pub(crate) struct SessionInfo {
    /// pgpilot's BackendKeyData pid for this client (its `pool_pid`).
    pub(crate) pid: i32,
    /// User name from the startup packet.
    pub(crate) user: Arc<str>,
    /// Database from the startup packet.
    pub(crate) database: Arc<str>,
    /// `application_name` from the startup packet (empty if none).
    pub(crate) application_name: Arc<str>,
    /// The client's address.
    pub(crate) client_addr: Option<SocketAddr>,
    /// When the session logged in.
    pub(crate) started: SystemTime,
    /// Node of the server connection currently serving the session; -1 = none.
    node: AtomicI64,
    /// That connection's server process id; 0 = none.
    backend_pid: AtomicI32,
    /// When that connection was opened (ms since the epoch); 0 = none.
    backend_opened_ms: AtomicU64,
    /// [`SessionActivity`] as a byte.
    state: AtomicU8,
    /// The server connection the session holds on each node, if any. Under
    /// transaction pooling it changes twice per transaction, so it takes no lock.
    held: Box<[HeldSlot]>,
    /// Wakes the session's relay when pgpilot stops. An idle session registers
    /// its waker here on every turn, which costs no lock (a watch channel's
    /// change future would take one each time).
    stop: AtomicWaker,
}

/// One node's server connection held by a session.
#[derive(Debug, Default)]
struct HeldSlot {
    /// Server process id; 0 = none held. Written after `opened_ms`.
    pid: AtomicI32,
    /// When that connection was opened (ms since the epoch).
    opened_ms: AtomicU64,
}

impl SessionInfo {
    /// The session now uses the server connection `pid` on `node`, opened at
    /// `opened_ms` (`BackendConn::opened_ms`).
    pub(crate) fn set_backend(&self, node: NodeId, pid: i32, opened_ms: u64) {
        self.node.store(node.index() as i64, Ordering::Relaxed);
        self.backend_pid.store(pid, Ordering::Relaxed);
        self.backend_opened_ms.store(opened_ms, Ordering::Relaxed);
    }

    /// The session holds no server connection now.
    pub(crate) fn clear_backend(&self) {
        self.node.store(-1, Ordering::Relaxed);
        self.backend_pid.store(0, Ordering::Relaxed);
        self.backend_opened_ms.store(0, Ordering::Relaxed);
    }

    /// Report what the session is doing.
    pub(crate) fn set_state(&self, s: SessionActivity) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Current node, backend pid and when that connection was opened, if any.
    pub(crate) fn backend(&self) -> Option<(NodeId, i32, SystemTime)> {
        let node = self.node.load(Ordering::Relaxed);
        let pid = self.backend_pid.load(Ordering::Relaxed);
        let opened = self.backend_opened_ms.load(Ordering::Relaxed);
        (node >= 0).then(|| (NodeId::new(node as usize), pid, from_epoch_ms(opened)))
    }

    /// The session now holds server connection `pid` on `node`, opened at
    /// `opened_ms` ([`epoch_ms`]).
    pub(crate) fn hold(&self, node: NodeId, pid: i32, opened_ms: u64) {
        if let Some(slot) = self.held.get(node.index()) {
            slot.opened_ms.store(opened_ms, Ordering::Relaxed);
            slot.pid.store(pid, Ordering::Release);
        }
    }

    /// The session no longer holds a connection to `node`.
    pub(crate) fn release(&self, node: NodeId) {
        if let Some(slot) = self.held.get(node.index()) {
            slot.pid.store(0, Ordering::Release);
        }
    }

    /// The server connections the session holds: (node, pid, opened). A
    /// listing taken while the session swaps connections may pair a new pid
    /// with the previous one's opening time, which a view can live with.
    pub(crate) fn held(&self) -> Vec<(NodeId, i32, SystemTime)> {
        self.held
            .iter()
            .enumerate()
            .filter_map(|(node, slot)| {
                let pid = slot.pid.load(Ordering::Acquire);
                let opened = from_epoch_ms(slot.opened_ms.load(Ordering::Relaxed));
                (pid != 0).then_some((NodeId::new(node), pid, opened))
            })
            .collect()
    }

    /// Ready once `stopped()` is true; until then the task is woken by
    /// [`SessionRegistry::wake_all`]. `registered` is the caller's record of
    /// the waker it registered last: the same waker is not registered again.
    /// That is sound because only `wake_all` takes a registered waker, and it
    /// runs after the stop is visible to `stopped()` (which is checked every
    /// time), so a taken waker is never needed again.
    pub(crate) fn poll_stopping(
        &self,
        cx: &mut std::task::Context<'_>,
        registered: &mut Option<std::task::Waker>,
        stopped: impl Fn() -> bool,
    ) -> std::task::Poll<()> {
        // Register first: a wake between the check and the registration
        // would otherwise be lost.
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.stop.register(cx.waker());
            *registered = Some(cx.waker().clone());
        }
        if stopped() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Drop the waker [`SessionInfo::poll_stopping`] registered: the task
    /// it wakes has ended (the session was parked), and a waker keeps its
    /// task's memory allocated.
    pub(crate) fn forget_waker(&self) {
        drop(self.stop.take());
    }

    /// What the session is doing.
    pub(crate) fn state(&self) -> SessionActivity {
        SessionActivity::from_u8(self.state.load(Ordering::Relaxed))
    }
}

type Entries = Arc<Mutex<Table>>;

/// The registered sessions and the names they share.
#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<u64, Arc<SessionInfo>>,
    /// One copy of each user, database and application name in use.
    names: HashSet<Arc<str>>,
}

impl Table {
    /// The shared copy of `name`.
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        n
    }

    /// Forget session `id`, and the names only it used.
    fn remove(&mut self, id: u64) {
        let Some(info) = self.sessions.remove(&id) else {
            return;
        };
        let names = [&info.user, &info.database, &info.application_name];
        for name in names {
            // Only the table's copy and this entry's: nobody else uses it.
            // (An entry an admin listing still holds keeps its names here
            // until a later session of the same names leaves.)
            let here = names.iter().filter(|n| Arc::ptr_eq(n, name)).count();
            if Arc::strong_count(name) <= 1 + here {
                self.names.remove(name);
            }
        }
    }
}

/// All connected client sessions.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    entries: Entries,
    next_id: AtomicU64,
}

/// A session's registration; unregisters when dropped. Derefs to its
/// [`SessionInfo`] for the atomic setters.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    id: u64,
    info: Arc<SessionInfo>,
    entries: Entries,
}

impl SessionHandle {
    /// The registered entry, shared.
    pub(crate) fn info(&self) -> Arc<SessionInfo> {
        self.info.clone()
    }
}

impl std::ops::Deref for SessionHandle {
    type Target = SessionInfo;
    fn deref(&self) -> &SessionInfo {
        &self.info
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        lock(&self.entries).remove(self.id);
    }
}

fn lock(e: &Entries) -> MutexGuard<'_, Table> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionRegistry {
    /// Register a logged-in session of a cluster of `nodes` nodes.
    pub(crate) fn register(
        &self,
        nodes: usize,
        pid: i32,
        user: &str,
        database: &str,
        application_name: &str,
        client_addr: Option<SocketAddr>,
    ) -> SessionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut table = lock(&self.entries);
        let info = Arc::new(SessionInfo {
            pid,
            user: table.intern(user),
            database: table.intern(database),
            application_name: table.intern(application_name),
            client_addr,
            started: SystemTime::now(),
            node: AtomicI64::new(-1),
            backend_pid: AtomicI32::new(0),
            backend_opened_ms: AtomicU64::new(0),
            state: AtomicU8::new(SessionActivity::Connecting as u8),
            held: (0..nodes).map(|_| HeldSlot::default()).collect(),
            stop: AtomicWaker::new(),
        });
        table.sessions.insert(id, info.clone());
        drop(table);
        SessionHandle {
            id,
            info,
            entries: self.entries.clone(),
        }
    }

    /// Every registered session, oldest first.
    pub(crate) fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = lock(&self.entries).sessions.values().cloned().collect();
        v.sort_by_key(|s| (s.started, s.pid));
        v
    }

    /// Wake every session waiting in [`SessionInfo::poll_stopping`] (pgpilot
    /// stops). Call it only once the stop is visible to their `stopped()`
    /// checks: it takes their wakers, which they do not register again.
    pub(crate) fn wake_all(&self) {
        for s in lock(&self.entries).sessions.values() {
            s.stop.wake();
        }
    }

    /// pgpilot's PID for the client whose session holds server process `pid`
    /// on `node` (a NotificationResponse names the notifying server process;
    /// its client knows pgpilot's PID from BackendKeyData).
    pub(crate) fn client_pid_of(&self, node: NodeId, pid: i32) -> Option<i32> {
        lock(&self.entries)
            .sessions
            .values()
            .find(|s| {
                s.held
                    .get(node.index())
                    .is_some_and(|h| h.pid.load(Ordering::Acquire) == pid)
            })
            .map(|s| s.pid)
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        lock(&self.entries).sessions.len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conn::epoch_ms;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn register_update_and_unregister_on_drop() {
        let r = SessionRegistry::default();
        let h = r.register(3, 42, "app", "db", "psql", "127.0.0.1:5000".parse().ok());
        assert_eq!(r.len(), 1);
        assert_eq!(h.state(), SessionActivity::Connecting);
        assert_eq!(h.backend(), None);
        h.set_backend(NodeId::new(1), 777, epoch_ms(SystemTime::now()));
        h.set_state(SessionActivity::Active);
        let listed = r.list();
        assert_eq!(listed[0].pid, 42);
        assert_eq!(
            listed[0].backend().map(|b| (b.0, b.1)),
            Some((NodeId::new(1), 777))
        );
        assert_eq!(listed[0].state().as_str(), "Execute command");
        h.clear_backend();
        assert_eq!(h.backend(), None);
        let opened = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        h.hold(NodeId::new(2), 900, epoch_ms(opened));
        h.hold(NodeId::new(0), 901, epoch_ms(opened));
        h.hold(NodeId::new(7), 902, epoch_ms(opened)); // no such node: ignored
        assert_eq!(
            h.held(),
            vec![(NodeId::new(0), 901, opened), (NodeId::new(2), 900, opened)]
        );
        h.release(NodeId::new(2));
        h.hold(NodeId::new(0), 903, epoch_ms(opened));
        assert_eq!(h.held(), vec![(NodeId::new(0), 903, opened)]);
        drop(h);
        assert!(r.is_empty());
    }

    #[test]
    fn names_are_shared_and_forgotten_with_their_last_session() {
        let r = SessionRegistry::default();
        let a = r.register(1, 1, "app", "app", "", None);
        let b = r.register(1, 2, "app", "db", "", None);
        assert!(Arc::ptr_eq(&a.user, &b.user));
        assert!(Arc::ptr_eq(&a.user, &a.database));
        assert_eq!(lock(&r.entries).names.len(), 3);
        drop(a);
        assert_eq!(lock(&r.entries).names.len(), 3, "app, db, '' still used");
        drop(b);
        assert!(lock(&r.entries).names.is_empty());
    }
}
