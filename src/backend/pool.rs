//! The backend connection pool.
//!
//! Connections are pooled per [`PoolKey`]: node, user, database and the client's
//! other startup parameters, so a reused connection is indistinguishable from a
//! fresh one opened for the same client. Each node has a cap on open connections
//! (idle + in use). A session that finds no idle connection and no free slot
//! evicts an idle connection of another key on that node, or queues (up to
//! `pool.acquire_timeout`). Queued sessions are served in arrival order: a
//! connection given back goes straight to the longest waiter for its key, and
//! a freed slot to the longest waiter of any key, so no newcomer overtakes
//! them and a release wakes one session, not all.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::BackendError;
use super::conn::{BackendConn, ConnectParams};
use crate::cluster::Cluster;
use crate::config::NodeId;
use crate::protocol::auth::ScramKeys;

/// A connection given back less than this long ago is handed out again
/// without the liveness check (a non-blocking peek, one system call): under
/// transaction pooling that is nearly every acquire, and a server connection
/// rarely dies in the moment between two transactions. (PgBouncer's
/// `server_check_delay`, 30 s by default, plays the same role.)
const RECENTLY_USED: Duration = Duration::from_secs(1);

/// The longest a database stays retiring ([`Pool::close_idle_database`]) if
/// the session that retired it never says its statement ended (it normally
/// does, at the statement's ReadyForQuery or when it ends).
const RETIRE_WINDOW: Duration = Duration::from_secs(60);

/// Which connections are interchangeable.
///
/// Hashed and compared on every transaction under transaction pooling (a
/// connection given back, one taken), so the hash of the startup parameters
/// is computed once, when the session builds its key, and the parameters are
/// shared: the copies the pool keeps compare by pointer first.
#[derive(Debug, Clone)]
pub(crate) struct PoolKey {
    /// Node id.
    pub(crate) node: NodeId,
    /// Startup parameters sent to the node, in a canonical order (user and database
    /// first, then the rest sorted by name).
    pub(crate) startup: Arc<[(String, String)]>,
    /// Hash of `node` and `startup` (with a per-process random key: clients
    /// choose the parameters).
    hash: u64,
}

impl PoolKey {
    /// Build the key (and the startup parameters) for a client's parameters on a node.
    pub(crate) fn new(
        node: NodeId,
        user: &str,
        database: &str,
        extra: &[(String, String)],
    ) -> PoolKey {
        static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let mut rest: Vec<(String, String)> = extra
            .iter()
            .filter(|(k, _)| k != "user" && k != "database")
            .cloned()
            .collect();
        rest.sort();
        let mut startup = vec![
            ("user".to_string(), user.to_string()),
            ("database".to_string(), database.to_string()),
        ];
        startup.extend(rest);
        let hash = SEED
            .get_or_init(Default::default)
            .hash_one((node, &startup));
        PoolKey {
            node,
            startup: startup.into(),
            hash,
        }
    }

    /// The user name in the key.
    pub(crate) fn user(&self) -> &str {
        &self.startup[0].1
    }

    /// The database name in the key.
    pub(crate) fn database(&self) -> &str {
        &self.startup[1].1
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &PoolKey) -> bool {
        self.hash == other.hash
            && self.node == other.node
            && (Arc::ptr_eq(&self.startup, &other.startup) || self.startup == other.startup)
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Counts of one node's connections, for admin views and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePoolStats {
    /// Open connections (idle and in use).
    pub open: usize,
    /// Idle connections waiting in the pool.
    pub idle: usize,
    /// Connections opened since start (a counter, for metrics).
    pub(crate) opened_total: u64,
    /// Sessions queued for a connection.
    pub waiting: usize,
}

/// One idle pooled connection, for `SHOW POOL_POOLS`.
#[derive(Debug, Clone)]
pub(crate) struct IdleConnInfo {
    /// Node id.
    pub(crate) node: NodeId,
    /// User it is logged in as.
    pub(crate) user: String,
    /// Database it is connected to.
    pub(crate) database: String,
    /// The server process id.
    pub(crate) pid: i32,
    /// When it was opened (wall clock).
    pub(crate) opened: std::time::SystemTime,
    /// When it was last returned to the pool.
    pub(crate) last_used: Instant,
}

/// Mutable state of one node's pool.
#[derive(Default)]
struct NodeState {
    /// Open connections, idle or in use; bounded by the per-node cap.
    open: usize,
    /// Idle connections per key; the most recently used at the end (reused first).
    /// Never holds a key some waiter wants: a given-back connection goes to it.
    idle: HashMap<PoolKey, Vec<PooledConn>, foldhash::fast::RandomState>,
    /// Sessions waiting for a connection, longest first. Only queued while
    /// every slot is taken. A session that stops waiting (timed out, or gone)
    /// takes itself out ([`Queued`]), so a hand-over looks at the front only:
    /// with a thousand sessions queued it stays O(1).
    waiters: VecDeque<Waiter>,
    /// The number the next waiter gets (names it in `waiters`).
    next_seq: u64,
}

/// A session queued for a connection.
struct Waiter {
    /// The connection it can use.
    key: PoolKey,
    /// Its number, for taking itself out of the queue.
    seq: u64,
    /// Where its grant goes.
    tx: oneshot::Sender<Grant>,
}

/// What a queued session is handed.
enum Grant {
    /// A connection of its key, given back by the session it served (not
    /// boxed: a connection is small, and a hand-over allocates nothing).
    Conn(PooledConn),
    /// A freed slot: the waiter opens a new connection in it.
    Slot(Slot),
}

/// One node's pool. Shared with each connection's slot guard.
#[derive(Default)]
struct NodePool {
    state: Mutex<NodeState>,
    /// Connections opened since start (exported as a metric).
    opened_total: AtomicU64,
}

/// Keep `conn` idle under its key, the most recently used last.
fn keep_idle(st: &mut NodeState, mut conn: PooledConn) {
    match st.idle.entry(conn.key.clone()) {
        std::collections::hash_map::Entry::Occupied(mut e) => {
            // Share the pool's copy of the parameters: the next comparisons
            // are a pointer comparison.
            if !Arc::ptr_eq(&e.key().startup, &conn.key.startup) {
                conn.key = e.key().clone();
            }
            e.get_mut().push(conn);
        }
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(vec![conn]);
        }
    }
}

impl NodePool {
    fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Holds one of a node's connection slots; when dropped, passes it to the
/// longest waiter or frees it. Never dropped under the node's lock.
struct Slot(Arc<NodePool>);

impl Drop for Slot {
    fn drop(&mut self) {
        let np = &self.0;
        let mut st = np.lock();
        while let Some(w) = st.waiters.pop_front() {
            if w.tx.is_closed() {
                continue;
            }
            // The slot passes on: the count of open connections is unchanged.
            if let Err(unsent) = w.tx.send(Grant::Slot(Slot(np.clone()))) {
                // It gave up just now: dropping the grant frees the slot
                // again, for the next waiter.
                drop(st);
                drop(unsent);
            }
            return;
        }
        st.open -= 1;
    }
}

/// A connection checked out of (or belonging to) the pool.
pub(crate) struct PooledConn {
    /// The connection itself (boxed: under transaction pooling a connection
    /// moves between the pool and sessions on every transaction).
    pub(crate) conn: Box<BackendConn>,
    /// The key it was opened with; where it returns.
    pub(crate) key: PoolKey,
    /// Its slot in the node's cap: dropping the connection frees it.
    _slot: Slot,
}

impl std::ops::Deref for PooledConn {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        &self.conn
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut BackendConn {
        &mut self.conn
    }
}

/// Limits and login settings the pool needs for one acquisition.
#[derive(Debug, Clone)]
pub(crate) struct AcquireSettings<'a> {
    /// Node host.
    pub(crate) host: &'a str,
    /// Node port.
    pub(crate) port: u16,
    /// Password for the user.
    pub(crate) password: Option<&'a str>,
    /// Without a password: the keys of the client's SCRAM login.
    pub(crate) scram_keys: Option<&'a ScramKeys>,
    /// Without a password: the user's stored MD5 hash.
    pub(crate) md5_stored: Option<&'a str>,
    /// Per-node cap.
    pub(crate) max_per_node: usize,
    /// How long to wait for a slot.
    pub(crate) acquire_timeout: Duration,
    /// TCP connect timeout.
    pub(crate) connect_timeout: Duration,
    /// Login timeout.
    pub(crate) auth_timeout: Duration,
    /// TLS towards the node, unless disabled.
    pub(crate) tls: Option<&'a crate::config::tls::BackendTls>,
}

/// Databases whose connections are not pooled for a while
/// ([`Pool::close_idle_database`]).
#[derive(Default)]
struct Retiring {
    /// Whether `until` may hold an entry: the check on every connection given
    /// back is one relaxed load while no database is retiring.
    any: std::sync::atomic::AtomicBool,
    /// Database name → until when its connections are closed when given
    /// back; one entry per statement that retired it.
    until: Mutex<Vec<(String, Instant)>>,
}

impl Retiring {
    fn start(&self, database: &str, now: Instant) {
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        until.retain(|(_, t)| *t > now);
        until.push((database.to_string(), now + RETIRE_WINDOW));
        self.any.store(true, Ordering::Relaxed);
    }

    fn end(&self, database: &str) {
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = until.iter().position(|(d, _)| d == database) {
            until.swap_remove(i);
        }
        if until.is_empty() {
            self.any.store(false, Ordering::Relaxed);
        }
    }

    fn contains(&self, database: &str, now: Instant) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        until.retain(|(_, t)| *t > now);
        if until.is_empty() {
            self.any.store(false, Ordering::Relaxed);
        }
        until.iter().any(|(d, _)| d == database)
    }
}

/// All nodes' pools.
pub struct Pool {
    /// Indexed by node id.
    nodes: Vec<Arc<NodePool>>,
    /// Databases being dropped (or renamed, or copied).
    retiring: Retiring,
    /// Told about the first connection to a node after it was admitted
    /// (`waiting` → `up`); none in unit tests.
    cluster: Option<Arc<Cluster>>,
}

impl Pool {
    /// A pool for `nodes` nodes.
    pub(crate) fn new(nodes: usize) -> Pool {
        Pool {
            nodes: (0..nodes).map(|_| Arc::new(NodePool::default())).collect(),
            retiring: Retiring::default(),
            cluster: None,
        }
    }

    /// A pool that reports opened connections to `cluster` (so a node's status
    /// turns from `waiting` to `up` on first use).
    pub(crate) fn with_cluster(nodes: usize, cluster: Arc<Cluster>) -> Pool {
        Pool {
            cluster: Some(cluster),
            ..Pool::new(nodes)
        }
    }

    /// Get a connection for `key`: an idle one if any is healthy, else a new
    /// one, else the next one given back (or slot freed) after the sessions
    /// already waiting, within `acquire_timeout`.
    pub(crate) async fn acquire(
        &self,
        key: &PoolKey,
        s: &AcquireSettings<'_>,
    ) -> Result<PooledConn, BackendError> {
        let np = self
            .nodes
            .get(key.node.index())
            .ok_or(BackendError::NoPrimary)?;
        if let Some(c) = self.take_recent(key, Instant::now()) {
            return Ok(c);
        }
        let deadline = tokio::time::Instant::now() + s.acquire_timeout;
        let slot = loop {
            // Decided under the lock; connections are dropped after it.
            let next = {
                let mut st = np.lock();
                if let Some(c) = st.idle.get_mut(key).and_then(Vec::pop) {
                    Next::Idle(c)
                } else if st.open < s.max_per_node {
                    st.open += 1;
                    Next::Open(Slot(np.clone()))
                } else if let Some(victim) = evict_one(&mut st) {
                    Next::Evicted(victim)
                } else {
                    let (tx, rx) = oneshot::channel();
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.waiters.push_back(Waiter {
                        key: key.clone(),
                        seq,
                        tx,
                    });
                    Next::Wait(Queued {
                        np: np.clone(),
                        seq,
                        rx,
                        done: false,
                    })
                }
            };
            match next {
                Next::Idle(c) if c.is_healthy_idle() => return Ok(c),
                Next::Idle(c) => {
                    tracing::debug!(
                        node = %key.node,
                        pid = c.cancel_key.pid,
                        "dropping a dead idle connection"
                    );
                }
                Next::Open(slot) => break slot,
                // Full of idle connections of other keys: one is closed (its
                // slot goes to a session queued earlier, if any), then retry.
                Next::Evicted(victim) => drop(victim),
                Next::Wait(q) => match wait_for_grant(q, deadline).await {
                    Some(Grant::Conn(c)) => return Ok(c),
                    Some(Grant::Slot(slot)) => break slot,
                    None => {
                        return Err(BackendError::PoolTimeout {
                            node: key.node,
                            waited: s.acquire_timeout,
                        });
                    }
                },
            }
        };
        let params = ConnectParams {
            node: key.node,
            host: s.host,
            port: s.port,
            startup: &key.startup,
            password: s.password,
            scram_keys: s.scram_keys,
            md5_stored: s.md5_stored,
            connect_timeout: s.connect_timeout,
            auth_timeout: s.auth_timeout,
            tls: s.tls,
        };
        // On failure the slot is dropped: it passes to the next waiter.
        let conn = BackendConn::connect(&params).await?;
        tracing::debug!(node = %key.node, pid = conn.cancel_key.pid, "opened backend connection");
        np.opened_total.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.cluster {
            c.note_backend_connected(key.node);
        }
        Ok(PooledConn {
            conn: Box::new(conn),
            key: key.clone(),
            _slot: slot,
        })
    }

    /// An idle connection for `key` given back under [`RECENTLY_USED`] ago, if
    /// the most recently given back one is that: no waiting, no liveness check.
    /// The common case under transaction pooling.
    pub(crate) fn take_recent(&self, key: &PoolKey, now: Instant) -> Option<PooledConn> {
        let np = self.nodes.get(key.node.index())?;
        let mut st = np.lock();
        let conns = st.idle.get_mut(key)?;
        if now.saturating_duration_since(conns.last()?.last_used) < RECENTLY_USED {
            conns.pop()
        } else {
            None
        }
    }

    /// Return an idle, reset connection to the pool: to the longest waiter for
    /// its key if there is one; closed, so its slot goes to the longest waiter,
    /// if only sessions of other keys wait; otherwise idle.
    pub(crate) fn put_idle(&self, mut conn: PooledConn, now: Instant) {
        let Some(np) = self.nodes.get(conn.key.node.index()) else {
            return;
        };
        if self.retiring.contains(conn.key.database(), now) {
            // Closed: its slot goes to the longest waiter, if any.
            drop(conn);
            return;
        }
        conn.last_used = now;
        let mut st = np.lock();
        if st.waiters.is_empty() {
            keep_idle(&mut st, conn);
        } else {
            self.hand_over(st, conn, now);
        }
    }

    /// [`Pool::put_idle`] while sessions wait (with many more clients than
    /// connections, on every transaction; kept out of the idle path's code).
    #[inline(never)]
    fn hand_over(&self, mut st: MutexGuard<'_, NodeState>, conn: PooledConn, now: Instant) {
        while st.waiters.front().is_some_and(|w| w.tx.is_closed()) {
            st.waiters.pop_front();
        }
        // Nearly always the front one: sessions of one key.
        if let Some(i) = st
            .waiters
            .iter()
            .position(|w| w.key == conn.key && !w.tx.is_closed())
        {
            let waiter = st.waiters.remove(i);
            drop(st);
            if let Some(w) = waiter
                && let Err(Grant::Conn(unsent)) = w.tx.send(Grant::Conn(conn))
            {
                // It gave up just now: the next waiter, or idle.
                self.put_idle(unsent, now);
            }
            return;
        }
        if !st.waiters.is_empty() {
            // Only sessions of other keys wait, for a slot: closing this
            // connection passes its slot to the longest of them.
            drop(st);
            drop(conn);
            return;
        }
        keep_idle(&mut st, conn);
    }

    /// Close idle connections unused for longer than `idle_timeout`. Returns how many.
    pub(crate) fn expire_idle(&self, idle_timeout: Duration) -> usize {
        let mut closed = 0;
        for np in &self.nodes {
            let mut expired = Vec::new();
            {
                let mut st = np.lock();
                for conns in st.idle.values_mut() {
                    let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(conns)
                        .into_iter()
                        .partition(|c| c.last_used.elapsed() > idle_timeout);
                    *conns = keep;
                    expired.extend(old);
                }
                st.idle.retain(|_, v| !v.is_empty());
            }
            closed += expired.len();
        }
        closed
    }

    /// Close every idle connection of one node (e.g. when it went down).
    pub(crate) fn close_idle(&self, node: NodeId) {
        if let Some(np) = self.nodes.get(node.index()) {
            let idle = std::mem::take(&mut np.lock().idle);
            drop(idle);
        }
    }

    /// Close every idle connection to `database` on every node, and close
    /// rather than pool the connections to it given back until
    /// [`Pool::end_retiring`] (at most [`RETIRE_WINDOW`]): a statement that
    /// needs the database without other sessions (`DROP DATABASE` …) is
    /// about to run, and PostgreSQL lets it wait a few seconds for them to
    /// leave. Connections in use stay. Returns how many were closed.
    pub(crate) fn close_idle_database(&self, database: &str, now: Instant) -> usize {
        self.retiring.start(database, now);
        let mut closed = Vec::new();
        for np in &self.nodes {
            let mut st = np.lock();
            st.idle.retain(|key, conns| {
                if key.database() == database {
                    closed.append(conns);
                    false
                } else {
                    true
                }
            });
        }
        // Dropped outside the nodes' locks (a freed slot takes the lock).
        closed.len()
    }

    /// The statement that retired `database` ended: its connections are
    /// pooled again (unless another statement retired it too).
    pub(crate) fn end_retiring(&self, database: &str) {
        self.retiring.end(database);
    }

    /// Open and idle counts for a node.
    pub fn stats(&self, node: NodeId) -> NodePoolStats {
        self.nodes
            .get(node.index())
            .map(|np| {
                let st = np.lock();
                NodePoolStats {
                    open: st.open,
                    idle: st.idle.values().map(Vec::len).sum(),
                    opened_total: np.opened_total.load(Ordering::Relaxed),
                    waiting: st.waiters.iter().filter(|w| !w.tx.is_closed()).count(),
                }
            })
            .unwrap_or_default()
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Every idle connection of every node (for `SHOW POOL_POOLS`).
    pub(crate) fn idle_connections(&self) -> Vec<IdleConnInfo> {
        let mut out = Vec::new();
        for np in &self.nodes {
            let st = np.lock();
            for (key, conns) in &st.idle {
                for c in conns {
                    out.push(IdleConnInfo {
                        node: key.node,
                        user: key.user().to_string(),
                        database: key.startup.get(1).map(|p| p.1.clone()).unwrap_or_default(),
                        pid: c.cancel_key.pid,
                        opened: super::conn::from_epoch_ms(c.opened_ms),
                        last_used: c.last_used,
                    });
                }
            }
        }
        out.sort_by_key(|c| (c.node, c.pid));
        out
    }
}

/// What an acquisition does next, decided under the node's lock.
enum Next {
    /// Reuse this idle connection if it is still alive.
    Idle(PooledConn),
    /// Open a new connection in this slot.
    Open(Slot),
    /// Close this idle connection of another key, then look again.
    Evicted(PooledConn),
    /// Queued: wait for a grant.
    Wait(Queued),
}

/// A session's place in a node's queue. It leaves the queue when it stops
/// waiting: served, timed out, or dropped (the session went away while
/// queued), so the queue holds no one who gave up.
struct Queued {
    /// The node whose queue it is in.
    np: Arc<NodePool>,
    /// Its number there.
    seq: u64,
    /// Where its grant comes.
    rx: oneshot::Receiver<Grant>,
    /// Served or out of the queue already: nothing to do when dropped.
    done: bool,
}

impl Queued {
    /// Leave the queue (if a grant has not taken it out already). Taken
    /// out here, no grant can be sent to it any more.
    fn leave(&mut self) {
        self.done = true;
        let removed = {
            let mut st = self.np.lock();
            // Searched from the back: a session gives up after those queued
            // before it, so it is usually among the last.
            let i = st.waiters.iter().rposition(|w| w.seq == self.seq);
            i.and_then(|i| st.waiters.remove(i))
        };
        drop(removed);
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.done {
            self.leave();
        }
        // A grant still in `rx` is dropped with it, after the node's lock was
        // let go: a slot or connection dropped there takes the lock itself.
    }
}

/// A queued session's grant, or `None` when `deadline` passed first. A grant
/// sent in the instant the deadline passed is still taken (not lost).
async fn wait_for_grant(mut q: Queued, deadline: tokio::time::Instant) -> Option<Grant> {
    match tokio::time::timeout_at(deadline, &mut q.rx).await {
        Ok(grant) => {
            // Taken out of the queue by whoever sent it (or the pool is gone).
            q.done = true;
            grant.ok()
        }
        Err(_) => {
            // Out of the queue first: then no grant can come after the close.
            q.leave();
            q.rx.close();
            q.rx.try_recv().ok()
        }
    }
}

/// Take the least recently used idle connection of the node, whatever its key.
fn evict_one(st: &mut NodeState) -> Option<PooledConn> {
    let key = st
        .idle
        .iter()
        .filter_map(|(k, v)| v.first().map(|c| (k, c.last_used)))
        .min_by_key(|(_, t)| *t)
        .map(|(k, _)| k.clone())?;
    let v = st.idle.get_mut(&key)?;
    let c = v.remove(0);
    if v.is_empty() {
        st.idle.remove(&key);
    }
    Some(c)
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
