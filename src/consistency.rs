//! Read-your-writes by LSN: the positions that decide whether a standby may
//! serve a read without showing the past.
//!
//! Two numbers matter, both WAL positions (LSNs):
//!
//! * **What a read must see.** After a write is acknowledged, any
//!   `pg_current_wal_lsn()` the primary reports *afterwards* is at or past that
//!   write's commit record. [`Consistency::fresh_primary_lsn`] gets one: a single
//!   fetcher task asks the primary on behalf of every session that needs it, and
//!   a fetch only counts for a session if it *started* after the session asked
//!   (so requests arriving together share one round trip). In `global` mode the
//!   proxy also counts every acknowledged write; a fetch that started after the
//!   last one covers them all, for every session.
//! * **What each standby has replayed.** A poller keeps `pg_last_wal_replay_lsn()`
//!   of every standby, every [`IDLE_POLL`] when nobody waits and back to back
//!   while some session waits for a standby to catch up
//!   ([`Consistency::wait_replay`]). When no session has needed the positions
//!   for [`DORMANT_AFTER`] (write-free or primary-only traffic), the poller
//!   forgets them and sleeps until a session waits: positions it does not keep
//!   fresh must not be trusted, and polling nobody needs costs every standby
//!   a query every 50 ms.
//!
//! The session compares the two (see `session::route`): a read goes to a
//! standby only if it has replayed what the read must see; otherwise the session
//! waits up to `routing.consistency_wait` or sends the read to the primary.
//! Writes that bypass pgpilot are invisible to it: a client that wrote elsewhere
//! can carry the position itself (`SET pgpilot.min_lsn`).
//!
//! # Why a read never misses an acknowledged commit
//!
//! Let W be a commit acknowledged to some client before read R arrived at
//! pgpilot (`global` mode), or a commit of R's own session (`session` mode).
//! R may run on a standby only if that standby has replayed W. The chain:
//!
//! 1. **W is in the primary's WAL before its answer.** PostgreSQL commits a
//!    simple query's last statement before that statement's CommandComplete,
//!    and any transaction before ReadyForQuery `I`; with `synchronous_commit`
//!    on (the default) the commit record is written and flushed first. So every
//!    `pg_current_wal_lsn()` (the write position) the primary reports after
//!    pgpilot read that answer is at or past W's commit record.
//! 2. **The count goes up before the client hears.** The session raises
//!    `acked_writes` ([`Consistency::write_acknowledged`]) after reading the
//!    answer from the primary and *before* forwarding it
//!    (`Session::on_backend_data`: a chunk that `tells_commit`). Whatever the
//!    client does with the news — a read on another connection, handled by
//!    another runtime thread — starts after the count was raised, so R's
//!    session, loading `acked_writes` while routing R, sees a count that
//!    includes W. (Raised after forwarding, it could be read before the raise
//!    by a thread that routes R while the forwarding thread is preempted.)
//! 3. **R's target is a position fetched after W.** Either
//!    * [`Consistency::global_lsn`]: `covered_writes >= acked_writes`, i.e. the
//!      fetch behind `primary_lsn` loaded `acked_writes` (before asking the
//!      primary) and got a count that includes W. Reading the raised value
//!      means the raise — hence W's answer, hence (1) W — came before that
//!      load, so before the query: its answer is at or past W. The fetcher
//!      stores `primary_lsn` before `covered_writes` (release) and R loads them
//!      in the other order (acquire): R gets that fetch's answer or a later one.
//!    * or [`Consistency::fresh_primary_lsn`]: R's session takes a ticket (a
//!      read-modify-write of `fetch_tickets`) after R arrived; the fetch that
//!      answers it loaded `fetch_tickets` at or past the ticket before asking
//!      the primary, and loading the value an RMW wrote (acquire/release)
//!      orders the ticket before that load. A fetch already in flight when R
//!      arrived read the counter earlier and does not answer the ticket,
//!      however recently it began.
//!
//!    In `session` mode the session learns its own commit position by the
//!    second way, after its ReadyForQuery and before routing its next read
//!    (one task: no other thread is involved). A `SET pgpilot.min_lsn`
//!    token is a position the client got from `SHOW pgpilot.last_commit_lsn`,
//!    itself fetched after the commit.
//! 4. **The standby has replayed the target.** `replayed(node)` holds a value
//!    the standby itself reported (`pg_last_wal_replay_lsn()`, which PostgreSQL
//!    advances only after applying the record, so W is visible to new
//!    snapshots there). Replay only moves forward, so however old the poll
//!    behind it, the standby has replayed at least that much when R runs: an
//!    old poll result can only be too low (R waits for a newer one or goes to
//!    the primary), never too high. The exceptions are a standby that goes
//!    back (restarted, rebuilt) — a lower poll result replaces a higher one —
//!    and a node that stops being a usable standby (down, promoted), whose
//!    position the poller forgets (0) at its next turn. This holds whichever
//!    standby R ends up on: each is compared with the target for itself
//!    (`Session::read_your_writes_node`).
//!
//! The same chain covers transaction pooling (the session, not the pooled
//! connection, keeps the positions) and a session whose standby changes.
//! A transaction that runs on a standby is checked once, when its BEGIN is
//! routed: its later statements see what that standby has replayed by then,
//! at least the target as of the BEGIN. Not covered: a commit made with
//! `synchronous_commit = off`, which PostgreSQL acknowledges before writing
//! its WAL, so the write position may still be short of it for up to
//! `wal_writer_delay` (and no standby has it yet).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::cluster::monitor_conn::MonitorConn;
use crate::cluster::{Cluster, Role};
use crate::config::{Config, NodeId};
use crate::protocol::lsn::parse_lsn;

/// Replay positions are refreshed this often when no session waits.
pub(crate) const IDLE_POLL: Duration = Duration::from_millis(50);

/// Pause between polls while a session waits (keeps a busy standby's load bounded).
const BUSY_POLL: Duration = Duration::from_micros(500);

/// The poller goes dormant after this long without a session needing positions.
pub const DORMANT_AFTER: Duration = Duration::from_secs(5);

/// Shared LSN state; one per proxy.
pub(crate) struct Consistency {
    /// Last seen `pg_last_wal_replay_lsn()` per node (0 = unknown / not a standby).
    replayed: Vec<AtomicU64>,
    /// Woken when a replay position advances.
    replay_changed: Notify,
    /// Sessions currently waiting for replay: the poller polls back to back.
    waiters: AtomicUsize,
    /// Wakes the poller at once (a session starts waiting).
    poll_now: Notify,
    /// A session compared a position with `replayed` since the poller last
    /// looked: keep polling.
    demand: AtomicBool,
    /// Result of the last successful primary fetch (0 before the first).
    primary_lsn: AtomicU64,
    /// Tickets handed out: a session asking for a fresh position takes the
    /// next one ([`Consistency::fresh_primary_lsn`]).
    fetch_tickets: AtomicU64,
    /// The highest ticket the last completed fetch answers: the fetcher read
    /// `fetch_tickets` before it asked the primary.
    fetch_answered: AtomicU64,
    /// Whether the last completed fetch failed.
    fetch_failed: AtomicBool,
    /// Wakes the fetcher.
    fetch_request: Notify,
    /// Wakes sessions waiting for a fetch.
    fetch_completed: Notify,
    /// Writes acknowledged to clients so far (global mode).
    acked_writes: AtomicU64,
    /// `acked_writes` as read just before the last completed fetch started:
    /// `primary_lsn` covers all of them.
    covered_writes: AtomicU64,
}

/// Why a fresh primary position could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LsnError {
    /// No answer within the wait.
    #[error("no primary WAL position within {0:?}")]
    Timeout(Duration),
    /// The fetch failed (primary unreachable …).
    #[error("asking the primary for its WAL position failed")]
    Failed,
}

impl Consistency {
    /// State for `nodes` nodes, nothing known yet.
    pub(crate) fn new(nodes: usize) -> Consistency {
        Consistency {
            replayed: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            replay_changed: Notify::new(),
            waiters: AtomicUsize::new(0),
            poll_now: Notify::new(),
            demand: AtomicBool::new(false),
            primary_lsn: AtomicU64::new(0),
            fetch_tickets: AtomicU64::new(0),
            fetch_answered: AtomicU64::new(0),
            fetch_failed: AtomicBool::new(false),
            fetch_request: Notify::new(),
            fetch_completed: Notify::new(),
            acked_writes: AtomicU64::new(0),
            covered_writes: AtomicU64::new(0),
        }
    }

    /// The replay position last seen on `node`.
    pub(crate) fn replayed(&self, node: NodeId) -> u64 {
        self.replayed
            .get(node.index())
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// A session is about to compare a position with [`Self::replayed`]: the
    /// poller must keep them fresh. (A plain load first: the flag is usually
    /// set already, and a store on every read would bounce the cache line.)
    pub(crate) fn note_demand(&self) {
        if !self.demand.load(Ordering::Relaxed) {
            self.demand.store(true, Ordering::Relaxed);
        }
    }

    /// Record `node`'s replay position as last polled. It replaces the old one
    /// even when lower: a standby that restarted (or was rebuilt) replays from
    /// an earlier point, and believing the old figure would serve stale reads.
    pub(crate) fn set_replayed(&self, node: NodeId, lsn: u64) {
        if let Some(a) = self.replayed.get(node.index())
            && a.swap(lsn, Ordering::AcqRel) < lsn
        {
            self.replay_changed.notify_waiters();
        }
    }

    /// A write was acknowledged to a client (counts for `global` mode).
    pub(crate) fn write_acknowledged(&self) {
        self.acked_writes.fetch_add(1, Ordering::AcqRel);
    }

    /// In `global` mode: the position covering every write acknowledged so far,
    /// or `None` if a fetch is needed first.
    pub(crate) fn global_lsn(&self) -> Option<u64> {
        let acked = self.acked_writes.load(Ordering::Acquire);
        (self.covered_writes.load(Ordering::Acquire) >= acked)
            .then(|| self.primary_lsn.load(Ordering::Acquire))
    }

    /// A primary WAL position taken after this call began (so at or past every
    /// commit acknowledged before it), waiting at most `limit`.
    pub(crate) async fn fresh_primary_lsn(&self, limit: Duration) -> Result<u64, LsnError> {
        // The ticket is a read-modify-write the fetcher must *read* before
        // a fetch answers it: that read happens after this call began, and
        // the fetcher asks the primary after the read. A fetch already in
        // flight (it read the tickets before this one was taken) does not
        // count, however recently it started.
        let ticket = self.fetch_tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = Instant::now() + limit;
        loop {
            let done = self.fetch_completed.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            self.fetch_request.notify_one();
            if self.fetch_answered.load(Ordering::Acquire) >= ticket {
                // `fetch_failed` and `primary_lsn` are those of the fetch
                // that answered, or of a later one (stored before
                // `fetch_answered`): also started after the ticket.
                if self.fetch_failed.load(Ordering::Acquire) {
                    return Err(LsnError::Failed);
                }
                return Ok(self.primary_lsn.load(Ordering::Acquire));
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return Err(LsnError::Timeout(limit));
            }
        }
    }

    /// Wait until one of `nodes` has replayed `target`, or `deadline`; returns the
    /// first node that has (in the order given).
    pub(crate) async fn wait_replay(
        &self,
        nodes: &[NodeId],
        target: u64,
        deadline: Instant,
    ) -> Option<NodeId> {
        let caught_up = || nodes.iter().copied().find(|n| self.replayed(*n) >= target);
        if let Some(n) = caught_up() {
            return Some(n);
        }
        self.waiters.fetch_add(1, Ordering::AcqRel);
        self.poll_now.notify_one();
        let found = loop {
            let changed = self.replay_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(n) = caught_up() {
                break Some(n);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break caught_up();
            }
        };
        self.waiters.fetch_sub(1, Ordering::AcqRel);
        found
    }
}

/// Keep every standby's replay position fresh until shutdown.
pub(crate) async fn run_replay_poller(
    lsns: Arc<Consistency>,
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns: Vec<Option<MonitorConn>> = Vec::new();
    let mut quiet_since = Instant::now();
    loop {
        let cfg = config.load_full();
        conns.resize_with(cfg.backends.len(), || None);
        let snapshot = cluster.snapshot();
        let mut polls = Vec::new();
        for (node, conn) in NodeId::all(conns.len()).zip(conns.iter_mut()) {
            let standby = snapshot
                .nodes
                .get(node.index())
                .is_some_and(|n| n.role == Role::Standby && n.status.is_usable());
            if !standby {
                // Not a usable standby (down, promoted, held): nothing known
                // until it is polled again as one.
                *conn = None;
                lsns.set_replayed(node, 0);
                continue;
            }
            polls.push(poll_one(node, conn, &cfg, &lsns));
        }
        futures_util::future::join_all(polls).await;
        let waiting = lsns.waiters.load(Ordering::Acquire) > 0;
        if lsns.demand.swap(false, Ordering::Relaxed) || waiting {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= DORMANT_AFTER {
            // Nobody needs positions: forget them (unpolled, they would turn
            // stale) and sleep until a session waits for one. The connections
            // stay open: reopening costs the standby a backend start-up.
            for node in NodeId::all(conns.len()) {
                lsns.set_replayed(node, 0);
            }
            tracing::debug!("replay positions unused; poller dormant");
            tokio::select! {
                _ = lsns.poll_now.notified() => {}
                _ = shutdown.changed() => return,
            }
            quiet_since = Instant::now();
            continue;
        }
        let pause = if waiting { BUSY_POLL } else { IDLE_POLL };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = lsns.poll_now.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Ask one standby its replay position on the poller's own connection.
async fn poll_one(node: NodeId, conn: &mut Option<MonitorConn>, cfg: &Config, lsns: &Consistency) {
    if let Some(lsn) = ask_lsn(conn, node, cfg, "SELECT pg_last_wal_replay_lsn()").await {
        lsns.set_replayed(node, lsn);
    }
}

/// Run `sql` (one LSN column) on `node` over a kept monitor-role connection,
/// (re)opening it when it is missing, closed or to another node; a failure
/// drops it. Every step is bounded by `monitor.timeout`.
async fn ask_lsn(
    conn: &mut Option<MonitorConn>,
    node: NodeId,
    cfg: &Config,
    sql: &str,
) -> Option<u64> {
    let limit = cfg.monitor.timeout;
    let backend = cfg.backends.get(node.index())?;
    if !conn.as_ref().is_some_and(|c| c.serves(backend)) {
        *conn = None;
        let open = MonitorConn::open(backend, &cfg.monitor, "pgpilot-lsn");
        // Polled often while reads wait: failures are expected during
        // failovers and restarts, so they are logged at debug only.
        match tokio::time::timeout(limit, open).await {
            Ok(Ok(c)) => *conn = Some(c),
            Ok(Err(e)) => {
                tracing::debug!(%node, error = %e, "cannot connect to ask the WAL position");
                return None;
            }
            Err(_) => {
                tracing::debug!(
                    %node,
                    ?limit,
                    "no connection to ask the WAL position in time"
                );
                return None;
            }
        }
    }
    let client = conn.as_ref()?.client();
    let msgs = match tokio::time::timeout(limit, client.simple_query(sql)).await {
        Ok(Ok(msgs)) => msgs,
        Ok(Err(e)) => {
            tracing::debug!(%node, error = %e, "asking the WAL position failed");
            *conn = None;
            return None;
        }
        Err(_) => {
            tracing::debug!(%node, ?limit, "no WAL position in time");
            *conn = None;
            return None;
        }
    };
    msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(parse_lsn),
        _ => None,
    })
}

/// Answer requests for a fresh primary position until shutdown.
pub(crate) async fn run_primary_fetcher(
    lsns: Arc<Consistency>,
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<MonitorConn> = None;
    loop {
        let mut answers = lsns.fetch_tickets.load(Ordering::Acquire);
        while answers <= lsns.fetch_answered.load(Ordering::Acquire) {
            tokio::select! {
                _ = lsns.fetch_request.notified() => {}
                _ = shutdown.changed() => return,
            }
            answers = lsns.fetch_tickets.load(Ordering::Acquire);
        }
        // Both read before the primary is asked: the answer covers every
        // ticket up to `answers` and every write counted up to `covered`.
        let covered = lsns.acked_writes.load(Ordering::Acquire);
        let cfg = config.load_full();
        let result = fetch_once(&mut conn, &cluster, &cfg).await;
        match result {
            Some(lsn) => {
                // Replaced, not maxed: after a failover the new primary may be
                // behind what the old one reported.
                lsns.primary_lsn.store(lsn, Ordering::Release);
                lsns.covered_writes.fetch_max(covered, Ordering::AcqRel);
                lsns.fetch_failed.store(false, Ordering::Release);
            }
            None => {
                conn = None;
                lsns.fetch_failed.store(true, Ordering::Release);
            }
        }
        lsns.fetch_answered.store(answers, Ordering::Release);
        lsns.fetch_completed.notify_waiters();
    }
}

/// `pg_current_wal_lsn()` of the current primary, on a kept connection.
async fn fetch_once(
    conn: &mut Option<MonitorConn>,
    cluster: &Cluster,
    cfg: &Config,
) -> Option<u64> {
    let primary = cluster.snapshot().primary?;
    ask_lsn(conn, primary, cfg, "SELECT pg_current_wal_lsn()").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_replay_returns_the_first_node_caught_up() {
        let c = Consistency::new(3);
        c.set_replayed(NodeId::new(1), 100);
        c.set_replayed(NodeId::new(2), 300);
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            c.wait_replay(&[NodeId::new(1), NodeId::new(2)], 200, soon)
                .await,
            Some(NodeId::new(2))
        );
        assert_eq!(c.wait_replay(&[NodeId::new(1)], 200, soon).await, None);
        // A position that went back (the standby restarted) is believed.
        c.set_replayed(NodeId::new(2), 10);
        assert_eq!(c.replayed(NodeId::new(2)), 10);
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(c.wait_replay(&[NodeId::new(2)], 200, soon).await, None);
        assert_eq!(
            c.wait_replay(&[NodeId::new(2)], 5, soon).await,
            Some(NodeId::new(2))
        );
    }

    #[test]
    fn global_position_needs_a_fetch_after_each_acknowledged_write() {
        let c = Consistency::new(1);
        assert_eq!(c.global_lsn(), Some(0));
        c.write_acknowledged();
        assert_eq!(c.global_lsn(), None);
        c.covered_writes.store(1, Ordering::Release);
        c.primary_lsn.store(42, Ordering::Release);
        assert_eq!(c.global_lsn(), Some(42));
    }
}
