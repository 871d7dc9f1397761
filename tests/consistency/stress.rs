//! Read-your-writes under CPU contention, by the hundred thousand: the races
//! between an acknowledgement and the position that guards the next read only
//! show when threads are preempted at the wrong moment, so these tests keep
//! both cores busy with spinning threads while pgpilot (two runtime threads),
//! the servers and the clients compete for them.
//!
//! * `global` mode: pairs of connections; a writer inserts a row and, once the
//!   INSERT is acknowledged, hands its id to a reader on another connection
//!   through the same pgpilot, which must see it.
//! * `session` mode: each connection inserts a row and reads it back.
//!
//! `PGPILOT_STRESS_HANDOFFS` sets the number of hand-offs per test (default
//! [`DEFAULT_HANDOFFS`]); `benches/handoff.sh` runs them longer by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{SERIAL, Tally, config, connect, fresh_table, insert_row, read_row, report};
use pgpilot::config::ConsistencyMode;

/// Hand-offs per test unless `PGPILOT_STRESS_HANDOFFS` says otherwise.
const DEFAULT_HANDOFFS: u64 = 100_000;

/// Connection pairs (global) or connections (session) working at once.
const PAIRS: u64 = 16;

/// Spinning threads competing for the CPU.
const BUSY_LOOPS: usize = 2;

fn handoffs() -> u64 {
    std::env::var("PGPILOT_STRESS_HANDOFFS")
        .ok()
        .map(|v| v.parse().expect("PGPILOT_STRESS_HANDOFFS: a number"))
        .unwrap_or(DEFAULT_HANDOFFS)
}

/// Threads spinning until dropped (`yes > /dev/null`, in process).
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start(n: usize) -> BusyLoops {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a stress run must show: every read saw its row, and most ran on
/// standbys (read-your-writes by waiting for replay, not by the primary).
fn check(mode: &str, tally: &Tally, total: u64, took: std::time::Duration) {
    report(mode, tally, took);
    assert_eq!(tally.iterations.load(Ordering::Relaxed), total);
    assert_eq!(
        tally.missing.load(Ordering::Relaxed),
        0,
        "{mode}: acknowledged rows missing from reads"
    );
    let on_standby = tally.on_standby.load(Ordering::Relaxed);
    assert!(
        on_standby > total / 2,
        "{mode}: only {on_standby} of {total} reads on standbys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_handoffs_under_cpu_contention_never_miss() {
    let _serial = SERIAL.lock().await;
    let addr = super::spawn_proxy(config(ConsistencyMode::Global));
    let table = "stress_global";
    fresh_table(addr, table).await;
    let total = handoffs();
    let per_pair = total.div_ceil(PAIRS);
    let tally = Arc::new(Tally::default());
    let _busy = BusyLoops::start(BUSY_LOOPS);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PAIRS {
        let mut writer = connect(addr, "application_name=stress_writer").await;
        let reader = connect(addr, "application_name=stress_reader").await;
        let n = per_pair.min(total.saturating_sub(p * per_pair));
        // One hand-off in flight per pair: each read arrives right after its
        // write's acknowledgement, where a race would show.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(i64, u64)>(1);
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                let id = (p * per_pair + i) as i64;
                insert_row(&mut writer, table, id, i).await;
                tx.send((id, i)).await.unwrap();
            }
        }));
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((id, i)) = rx.recv().await {
                read_row(&reader, table, id, i, &tally).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    check("global hand-offs", &tally, total, started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_under_cpu_contention_never_miss() {
    let _serial = SERIAL.lock().await;
    let addr = super::spawn_proxy(config(ConsistencyMode::Session));
    let total = handoffs();
    let _busy = BusyLoops::start(BUSY_LOOPS);
    let started = Instant::now();
    let tally =
        super::insert_then_read(addr, "stress_session", PAIRS as usize, total / PAIRS).await;
    check(
        "session same-connection reads",
        &tally,
        total / PAIRS * PAIRS,
        started.elapsed(),
    );
}
