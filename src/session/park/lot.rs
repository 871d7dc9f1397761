//! The parking lot: one task per proxy that holds every parked session
//! ([`super::Parked`]) in a slab and watches their sockets with an epoll
//! instance of its own, itself watched by tokio ([`AsyncFd`]). A parked
//! client therefore costs no task and no tokio registration, only its slab
//! entry and an epoll interest in the kernel.
//!
//! A socket is added with `EPOLLONESHOT` under the slab's lock, keyed by its
//! slab index; the lot removes the entry and the interest together, under
//! the same lock, so a key is never reused while the kernel may still report
//! it. Whatever the event (data, hang-up, error), the session is resumed in a
//! new task and the ordinary relay reads the socket: EOF and errors end it
//! as they end an idle session.
//!
//! The lot also keeps the parked sessions' `timeouts.client_idle` deadlines
//! (a sweep over the slab at the earliest one, at most every
//! [`SWEEP_GAP`]: a parked client is closed that much late at worst) and
//! wakes every parked session when pgpilot stops, so each sends the goodbye
//! an idle session sends.

use std::any::Any;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, watch};
use tokio_util::task::TaskTracker;

use super::Parked;
use crate::context::ProxyContext;
use crate::session::{End, SessionError};

/// Events read per `epoll_wait`.
const BATCH: usize = 256;

/// The shortest time between two deadline sweeps (bounds their cost when
/// deadlines are spread out; a client is closed at most this late).
const SWEEP_GAP: Duration = Duration::from_millis(50);

/// Where a proxy's parked sessions wait.
pub(in crate::session) struct Lot {
    /// The epoll instance the parked sockets are added to.
    epoll: AsyncFd<OwnedFd>,
    state: Mutex<State>,
    /// Wakes the lot's task when a parking brings the next deadline forward.
    nudge: Notify,
}

struct State {
    /// The parked sessions; the key is the epoll event's data.
    parked: Slab<Box<Parked>>,
    /// The earliest `client_idle` deadline among them.
    next_deadline: Option<Instant>,
    /// pgpilot stops: nothing is parked any more.
    closed: bool,
}

/// Why a parked session leaves the lot.
#[derive(Clone, Copy)]
enum Why {
    /// Its socket has something to say (data, hang-up, error).
    Ready,
    /// Its `timeouts.client_idle` deadline passed.
    Expired,
    /// pgpilot stops.
    Stop,
}

impl Lot {
    /// The lot of `ctx`'s proxy, started on the current runtime at the
    /// first call; `None` when it could not be made.
    pub(in crate::session) fn of(ctx: &ProxyContext) -> Option<&Lot> {
        ctx.parking
            .get_or_init(|| Lot::start(ctx))
            .as_ref()?
            .downcast_ref::<Lot>()
    }

    fn start(ctx: &ProxyContext) -> Option<Arc<dyn Any + Send + Sync>> {
        // AsyncFd registers with the current runtime's reactor.
        tokio::runtime::Handle::try_current().ok()?;
        // `with_interest` is deprecated because a `T` could close its fd
        // while tokio watches it; an `OwnedFd` closes it only when dropped,
        // after the AsyncFd has deregistered it (its safe replacement is
        // `unsafe`, which this crate forbids).
        #[allow(deprecated)]
        let made = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(std::io::Error::from)
            .and_then(|fd| AsyncFd::with_interest(fd, tokio::io::Interest::READABLE));
        let epoll = match made {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "no parking lot (epoll): idle clients keep their tasks");
                return None;
            }
        };
        let lot = Arc::new(Lot {
            epoll,
            state: Mutex::new(State {
                parked: Slab::new(),
                next_deadline: None,
                closed: false,
            }),
            nudge: Notify::new(),
        });
        let tasks = ctx.session_tasks.clone();
        tasks.spawn(run(lot.clone(), ctx.shutdown.clone(), tasks.clone()));
        Some(lot)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the entry `key` out of the lot (and its socket out of the epoll
    /// set), and resume its session in a new task.
    fn release(&self, st: &mut State, key: usize, why: Why, tasks: &TaskTracker) {
        let Some(p) = st.parked.try_remove(key) else {
            return;
        };
        let _ = epoll::delete(self.epoll.get_ref(), &p.client);
        p.ctx().metrics.client_parked(false);
        tasks.spawn(async move {
            let mut session = p.resume();
            match why {
                Why::Expired => {
                    // What the relay of an idle session ends with.
                    Box::pin(session.end(End::Error(SessionError::IdleTimeout))).await;
                }
                Why::Ready | Why::Stop => super::relay(&mut Some(session)).await,
            }
        });
    }
}

/// Add `p` to its proxy's lot; `Err` gives it back when the lot is closing
/// or the socket cannot be watched.
pub(in crate::session) fn park(p: Box<Parked>) -> Result<(), Box<Parked>> {
    let ctx = p.ctx.clone();
    let Some(lot) = Lot::of(&ctx) else {
        return Err(p);
    };
    let mut st = lot.lock();
    if st.closed {
        return Err(p);
    }
    let entry = st.parked.vacant_entry();
    let key = entry.key();
    let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
    if let Err(e) = epoll::add(
        lot.epoll.get_ref(),
        &p.client,
        epoll::EventData::new_u64(key as u64),
        flags,
    ) {
        tracing::debug!(error = %e, "could not park a client");
        return Err(p);
    }
    p.ctx().metrics.client_parked(true);
    let deadline = p.deadline;
    entry.insert(p);
    if let Some(d) = deadline
        && st.next_deadline.is_none_or(|n| d < n)
    {
        st.next_deadline = Some(d);
        drop(st);
        lot.nudge.notify_one();
    }
    Ok(())
}

/// The lot's task: resume a session when its socket stirs or its deadline
/// passes, and every session when pgpilot stops.
async fn run(lot: Arc<Lot>, mut stop: watch::Receiver<bool>, tasks: TaskTracker) {
    let _drain = Drain(lot.clone());
    let mut keys: Vec<u64> = Vec::with_capacity(BATCH);
    let mut last_sweep = Instant::now();
    loop {
        let sweep_at = lot
            .lock()
            .next_deadline
            .map(|d| tokio::time::Instant::from_std(d.max(last_sweep + SWEEP_GAP)));
        tokio::select! {
            ready = lot.epoll.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(error = %e, "the parking lot's epoll failed; waking every parked client");
                        break;
                    }
                };
                if let Err(e) = ready_keys(guard.get_inner(), &mut keys) {
                    if e == rustix::io::Errno::INTR {
                        continue;
                    }
                    tracing::error!(error = %e, "epoll_wait failed in the parking lot; waking every parked client");
                    break;
                }
                if keys.len() < BATCH {
                    guard.clear_ready();
                }
                let mut st = lot.lock();
                for &k in &keys {
                    lot.release(&mut st, k as usize, Why::Ready, &tasks);
                }
            }
            () = sleep_until(sweep_at), if sweep_at.is_some() => {
                let now = Instant::now();
                last_sweep = now;
                let mut st = lot.lock();
                let expired: Vec<usize> = st
                    .parked
                    .iter()
                    .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
                    .map(|(k, _)| k)
                    .collect();
                for k in expired {
                    lot.release(&mut st, k, Why::Expired, &tasks);
                }
                st.next_deadline = st.parked.iter().filter_map(|(_, p)| p.deadline).min();
            }
            () = lot.nudge.notified() => {}
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
    // pgpilot stops (or the lot cannot watch its sockets any more): every
    // parked session goes back to a task, where the relay sees the stop.
    let mut st = lot.lock();
    st.closed = true;
    let keys: Vec<usize> = st.parked.iter().map(|(k, _)| k).collect();
    for k in keys {
        lot.release(&mut st, k, Why::Stop, &tasks);
    }
}

/// The keys of the sockets that stirred (at most [`BATCH`]), without
/// waiting: the epoll instance said it has some.
fn ready_keys(epoll: &OwnedFd, keys: &mut Vec<u64>) -> rustix::io::Result<()> {
    keys.clear();
    let mut buf = [std::mem::MaybeUninit::<epoll::Event>::uninit(); BATCH];
    let no_wait = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let (events, _) = epoll::wait(epoll, &mut buf[..], Some(&no_wait))?;
    keys.extend(events.iter().map(|e| {
        let data = e.data;
        data.u64()
    }));
    Ok(())
}

/// Sleep until `at` (always `Some` where it is polled).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Closes the lot when its task is dropped unfinished (the runtime goes
/// away): the parked sessions are dropped, which unregisters them and closes
/// their sockets.
struct Drain(Arc<Lot>);

impl Drop for Drain {
    fn drop(&mut self) {
        let parked = {
            let mut st = self.0.lock();
            st.closed = true;
            std::mem::take(&mut st.parked)
        };
        for (_, p) in parked {
            p.ctx().metrics.client_parked(false);
            p.ctx().cancels.unregister(p.cancel_key);
        }
    }
}
