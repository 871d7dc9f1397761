//! The relay loop of a logged-in session: each turn waits once, in one
//! hand-written poll, on the client socket, the active server connection,
//! pending writes, timeouts and shutdown.
//!
//! Writes never block the loop: what a socket will not take now waits in an
//! [`Outbox`](crate::net::Outbox) and is flushed when the socket is writable,
//! while the other direction keeps flowing. Reading from a side pauses only
//! while the queue towards the other side is above a high-water mark, so memory
//! stays bounded and neither peer can deadlock the other.
//!
//! Only one server connection — the active one — can have requests in flight
//! (see [`super::route`]), so the loop reads from that one alone. Steps that need
//! I/O before a request can be routed (connecting, replaying settings, catalog
//! lookups, waiting for a primary) are awaited here, between turns.

use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::io::poll_read_buf;

use super::route::Step;
use super::{End, Session, SessionError};
use crate::config::NodeId;
use crate::net::poll_read_lazy;
use crate::protocol::TxStatus;

/// Stop reading a side while this many bytes wait to be written to the other.
const HIGH_WATER: usize = 1 << 20;

impl Session {
    /// Relay until the client leaves, an error occurs, or pgpilot stops.
    pub(super) async fn relay(&mut self) -> End {
        // Checked at every turn: an atomic load, so a session that is never idle
        // still stops. An idle one is woken through its registration.
        let stop_flag = self.ctx.shutdown.clone();
        if *stop_flag.borrow() {
            return End::Error(SessionError::Shutdown);
        }
        let stopped = || stop_flag.has_changed().unwrap_or(true);
        let info = self.registration.info();
        let mut timers = Timers::default();
        loop {
            if stopped() {
                return End::Error(SessionError::Shutdown);
            }
            if std::mem::take(&mut self.recheck) {
                // Routing itself never waits; only some steps it asks for do.
                match self.on_client_data() {
                    Ok(Step::Idle | Step::Blocked) => {}
                    Ok(Step::Terminate) => return End::ClientGone,
                    // Boxed: a step's future (connecting, waiting for a
                    // primary …) is large, and the relay's own must stay
                    // small, as every idle session keeps it.
                    Ok(step) => match Box::pin(self.perform(step)).await {
                        Ok(()) => {
                            // The step may have read from the sockets itself.
                            self.client_reads.forget();
                            for l in self.links.iter_mut().flatten() {
                                l.reads.forget();
                            }
                            self.clock.tick();
                            self.recheck = true;
                            continue;
                        }
                        Err(e) => return End::Error(e),
                    },
                    Err(e) => return End::Error(e),
                }
            }
            self.release_between_transactions();
            let busy = self.links.iter().flatten().any(|l| l.busy());
            if !busy && self.cbuf.is_empty() {
                // Nothing to route and no answer awaited: the read buffer
                // goes back (the next read brings its own, `poll_read_lazy`).
                self.cbuf = bytes::BytesMut::new();
            }
            let idle_limit = if busy {
                Duration::ZERO
            } else if !self.tx.in_block() {
                self.cfg.timeouts.client_idle
            } else {
                self.cfg.timeouts.idle_in_transaction
            };
            // Idle and parkable: parked after `pool.park_idle_after`.
            let park_after = if busy {
                Duration::ZERO
            } else {
                self.park_after()
            };
            let write_limit = self.cfg.timeouts.write;
            let node = self.active;
            // Between transactions under transaction pooling the session holds
            // no server connection: the turn waits on the client only.
            if self.links[node.index()].is_none() && !self.released() {
                return End::Error(SessionError::BackendLost { node });
            }
            let link = self.links[node.index()].as_mut();
            let server_stalled = link.as_ref().and_then(|l| l.out.stalled_since());
            let stalled = match (self.to_client.stalled_since(), server_stalled) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            timers.arm(
                stalled.map(|t| t + write_limit),
                idle_limit,
                park_after,
                &mut self.clock,
            );
            // A frame not yet whole is always read to its end (its length was
            // checked against max_message_size); whole requests waiting to be
            // routed pause reading past the high-water mark.
            let read_client = link.as_ref().is_none_or(|l| l.out.len() < HIGH_WATER)
                && (self.cbuf.len() < HIGH_WATER
                    || crate::protocol::frame::missing_bytes(&self.cbuf) > 0);
            let read_server = self.to_client.len() < HIGH_WATER;
            // TLS records rustls holds wait for writability too (a lost
            // wake-up otherwise: nothing else would flush them).
            let client_pending = !self.to_client.is_empty() || self.client.backlog();
            let server_pending = link
                .as_ref()
                .is_some_and(|l| !l.out.is_empty() || l.conn.conn.stream.backlog());
            let client = &mut self.client;
            let cbuf = &mut self.cbuf;
            let mut server = link.map(|l| (&mut l.conn.conn, &mut l.st.reads));
            let client_reads = &mut self.client_reads;
            // Whatever wakes the wait starts a new turn (nothing reads the
            // clock between here and the await).
            self.clock.tick();
            // One wait over everything the turn may react to, checked in this
            // order (writes first, so queues drain before more is read).
            let woke = std::future::poll_fn(|cx| {
                if client_pending && client.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(Wake::ClientWritable);
                }
                if let Some((server, server_reads)) = &mut server {
                    if server_pending && server.stream.poll_write_ready(cx).is_ready() {
                        return Poll::Ready(Wake::ServerWritable);
                    }
                    if read_server
                        && let Poll::Ready(r) = server_reads.poll(cx, |cx| {
                            poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.buf)
                        })
                    {
                        return Poll::Ready(Wake::ServerRead(r));
                    }
                }
                if read_client
                    && let Poll::Ready(r) =
                        client_reads.poll(cx, |cx| poll_read_lazy(Pin::new(&mut *client), cx, cbuf))
                {
                    return Poll::Ready(Wake::ClientRead(r));
                }
                timers.poll(cx, &info, stopped)
            })
            .await;
            match woke {
                Wake::ClientWritable => {
                    if let Err(e) = self.to_client.flush(&mut self.client) {
                        return End::Error(SessionError::ClientIo(e));
                    }
                }
                Wake::ServerWritable => {
                    let flushed = match self.links[node.index()].as_mut() {
                        Some(l) => l.st.out.flush(&mut l.conn.conn.stream),
                        None => Ok(()),
                    };
                    if flushed.is_err() {
                        return End::Error(SessionError::BackendLost { node });
                    }
                }
                Wake::ServerRead(Ok(0) | Err(_)) => {
                    tracing::info!(%node, user = %self.user, "server closed the session's connection");
                    return End::Error(SessionError::BackendLost { node });
                }
                Wake::ServerRead(Ok(_)) => {
                    if let Err(e) = self.on_backend_data(node) {
                        return End::Error(e);
                    }
                }
                Wake::ClientRead(Ok(0)) => return End::ClientGone,
                Wake::ClientRead(Ok(_)) => self.recheck = true,
                Wake::ClientRead(Err(e)) => return End::Error(SessionError::ClientIo(e)),
                Wake::WriteStalled => return End::Error(SessionError::WriteTimeout),
                Wake::Idle => {
                    return End::Error(if !self.tx.in_block() {
                        SessionError::IdleTimeout
                    } else {
                        SessionError::IdleInTransactionTimeout
                    });
                }
                Wake::Stop => return End::Error(SessionError::Shutdown),
                Wake::Park => return End::Park(timers.idle_since),
            }
        }
    }

    /// Perform a step routing asked for (I/O before a request can be routed);
    /// then the client's data is routed again.
    pub(super) async fn perform(&mut self, step: Step) -> Result<(), SessionError> {
        match step {
            // Not I/O steps: the relay loop handles them before calling this.
            Step::Idle | Step::Blocked | Step::Terminate => {
                debug_assert!(false, "perform called with {step:?}");
                Ok(())
            }
            Step::Prepare { node, needs } => self.prepare_node(node, needs).await,
            Step::NeedPrimary => {
                // During a failover, wait up to failover.client_wait_timeout.
                let (wait, failover) = (
                    self.cfg.pool.acquire_timeout,
                    self.cfg.failover.client_wait_timeout,
                );
                match self.ctx.cluster.wait_primary_for(wait, failover).await {
                    Some(_) => Ok(()),
                    // A session that holds no server connection (between
                    // transactions under transaction pooling, or an admin who
                    // logged in without a primary) loses only this request.
                    None if !self.tx.in_block() && self.links.iter().all(Option::is_none) => {
                        let e = crate::error::ToPgError::to_pg_error(&self.no_primary());
                        self.refuse_request(e)
                    }
                    None => Err(SessionError::Backend(self.no_primary())),
                }
            }
            Step::MoveTxToPrimary => self.move_untouched_tx_to_primary().await,
            Step::AdminElsewhere(cmd) => {
                // Its outcome answers the command routed again after this
                // step.
                let who = crate::admin::AdminCaller {
                    user: self.user.clone(),
                    load_balance_node: self.route.standby,
                };
                let r = crate::admin::execute_elsewhere(&self.ctx, &cmd, &who).await;
                self.answered_here.awaited = Some((cmd, r));
                Ok(())
            }
            Step::ProbeDefaults => self.probe_defaults().await,
            Step::FetchLsn => {
                let limit = self.cfg.monitor.timeout;
                let lsn = self.ctx.lsns.fresh_primary_lsn(limit).await;
                if let Err(e) = &lsn {
                    tracing::debug!(error = %e, "no fresh primary position; reading on the primary");
                }
                self.primary_lsn_fetched(lsn.ok());
                Ok(())
            }
            Step::WaitReplay {
                nodes,
                target,
                deadline,
            } => {
                // On time-out the request is routed again: past its deadline it
                // goes to a caught-up standby or the primary.
                let started = tokio::time::Instant::now();
                self.ctx.lsns.wait_replay(&nodes, target, deadline).await;
                self.ctx
                    .metrics
                    .consistency_waited(started.elapsed().as_secs_f64());
                Ok(())
            }
            Step::LookupRelations(names) => self.look_up_relations(names).await,
            Step::Lookup(names) => {
                let snapshot = self.ctx.cluster.snapshot();
                let primary = snapshot.primary.unwrap_or(self.active);
                let catalog = super::catalog_io::PrimaryCatalog {
                    primary: &self.cfg.backends[primary.index()],
                    monitor: &self.cfg.monitor,
                };
                // Cached on success; on failure the answer is "volatile" (primary),
                // remembered for this request only.
                if self
                    .ctx
                    .catalog
                    .any_volatile(&self.database, &names, &catalog)
                    .await
                    && self.ctx.catalog.cached(&self.database, &names).is_none()
                {
                    self.next.functions_volatile = true;
                }
                Ok(())
            }
        }
    }

    /// Scan what `node` sent, settle bookkeeping, pass it on in one write.
    pub(super) fn on_backend_data(&mut self, node: NodeId) -> Result<(), SessionError> {
        // A read balanced off the transaction's node must not end the client's
        // transaction in its eyes.
        let patch = (self.tx.in_block() && self.route.tx_node.is_some_and(|t| t != node))
            .then_some(TxStatus::InTransaction.as_byte());
        let Some(link) = self.links[node.index()].as_mut() else {
            return Ok(());
        };
        // Scratch space of the thread (a session keeps none between reads).
        let (mut events, mut done) = SCRATCH.take();
        let chunk = link.scan(
            &mut events,
            &mut done,
            patch,
            &super::link::Relaying {
                metrics: &self.ctx.metrics,
                own_pid: self.cancel_key.pid,
                sessions: &self.ctx.sessions,
            },
        )?;
        // Global mode's promise: a read sees every commit acknowledged to any
        // client before the read arrived. The count of acknowledged writes is
        // what makes other sessions' reads ask the primary for a newer
        // position, so it goes up *before* the client can learn of the
        // commit: once these bytes are on its socket, the client may hand
        // the news to another connection whose read pgpilot routes at once,
        // on another runtime thread, and that read must find the count
        // raised (the ordering argument is in `crate::consistency`).
        if chunk.tells_commit
            && self.read_your_writes.write_pending
            && self.ctx.cluster.snapshot().primary == Some(node)
        {
            self.ctx.lsns.write_acknowledged();
        }
        link.forward(&mut self.client, &mut self.to_client, chunk)?;
        self.settle(node, &mut done);
        events.clear();
        SCRATCH.set((events, done));
        if self.links[node.index()]
            .as_ref()
            .is_some_and(|l| l.watch == super::retry::Watch::Refused)
        {
            self.on_refused(node)?;
        }
        Ok(())
    }
}

thread_local! {
    /// The scanner's scratch space: the events of one read of a server
    /// connection and what they settled, taken and given back around each
    /// read, so sessions share it and keep none.
    static SCRATCH: std::cell::Cell<(Vec<crate::protocol::frame::Scanned>, Vec<super::link::Done>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// What ended a relay turn's wait.
enum Wake {
    /// The client socket can take queued bytes.
    ClientWritable,
    /// The server socket can take queued bytes.
    ServerWritable,
    /// A read from the server: bytes read (0: it closed), or the error.
    ServerRead(std::io::Result<usize>),
    /// A read from the client: bytes read (0: it closed), or the error.
    ClientRead(std::io::Result<usize>),
    /// A queue towards a peer has not moved for `timeouts.write`.
    WriteStalled,
    /// The idle (or idle-in-transaction) timeout elapsed.
    Idle,
    /// pgpilot is stopping.
    Stop,
    /// The client has been idle for `pool.park_idle_after`: park the session.
    Park,
}

/// The relay loop's timers, kept across turns: a turn re-arms them only when
/// a limit applies, so a busy session with the idle timeouts off (the
/// default) touches no timer at all.
struct Timers {
    /// Fires when a write queue has been stuck for `timeouts.write`.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `stall` applies to this turn.
    stall_armed: bool,
    /// Fires when the client has been idle for the applicable idle timeout.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `idle` applies to this turn.
    idle_armed: bool,
    /// The task waker last registered for the stop signal (registered again
    /// only when it changes).
    stop_waker: Option<std::task::Waker>,
    /// Fires when the session may park. A turn moves `park_at`, not the
    /// timer: when it fires early it is reset to `park_at` then, so a busy
    /// client touches it about once per `park_idle_after`, not per turn.
    park: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the session parks, if it may this turn.
    park_at: Option<tokio::time::Instant>,
    /// `park` holds this task's waker (it was polled since it was made or
    /// last fired).
    park_registered: bool,
    /// The start of the turn the idle timers count from.
    idle_since: std::time::Instant,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            stall: None,
            stall_armed: false,
            idle: None,
            idle_armed: false,
            stop_waker: None,
            park: None,
            park_at: None,
            park_registered: false,
            idle_since: std::time::Instant::now(),
        }
    }
}

impl Timers {
    /// Arm for one turn: the stall deadline, if a queue is stuck, and the idle
    /// timeout counted from now, unless it is zero (off).
    fn arm(
        &mut self,
        stall_deadline: Option<tokio::time::Instant>,
        idle_limit: Duration,
        park_after: Duration,
        clock: &mut super::clock::TurnClock,
    ) {
        self.stall_armed = stall_deadline.is_some();
        if let Some(deadline) = stall_deadline {
            set_deadline(&mut self.stall, deadline);
        }
        self.idle_armed = !idle_limit.is_zero();
        if self.idle_armed {
            let deadline = tokio::time::Instant::from_std(clock.now()) + idle_limit;
            set_deadline(&mut self.idle, deadline);
        }
        self.park_at = None;
        if !park_after.is_zero() {
            self.idle_since = clock.now();
            let at = tokio::time::Instant::from_std(self.idle_since) + park_after;
            self.park_at = Some(at);
            if self.park.is_none() {
                self.park = Some(Box::pin(tokio::time::sleep_until(at)));
            }
        }
    }

    /// The timer part of a turn's wait: a timer that fired, or shutdown.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        info: &crate::context::registry::SessionInfo,
        stopped: impl Fn() -> bool,
    ) -> Poll<Wake> {
        if self.stall_armed
            && let Some(t) = &mut self.stall
            && t.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Wake::WriteStalled);
        }
        if self.idle_armed
            && let Some(t) = &mut self.idle
            && t.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Wake::Idle);
        }
        // Polled only when it has fired or has not registered this task's
        // waker yet: once registered, the timer wakes the task itself, and a
        // poll per turn is most of what parking would cost a busy client.
        if let (Some(at), Some(t)) = (self.park_at, &mut self.park)
            && (!self.park_registered || t.is_elapsed())
        {
            self.park_registered = true;
            while t.as_mut().poll(cx).is_ready() {
                if t.deadline() >= at {
                    return Poll::Ready(Wake::Park);
                }
                t.as_mut().reset(at);
            }
        }
        info.poll_stopping(cx, &mut self.stop_waker, stopped)
            .map(|()| Wake::Stop)
    }
}

/// Point `timer` at `deadline`, creating it the first time.
fn set_deadline(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, deadline: tokio::time::Instant) {
    match timer {
        Some(t) if t.deadline() == deadline => {}
        Some(t) => t.as_mut().reset(deadline),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
}
