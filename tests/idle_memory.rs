//! What an idle session keeps, and a parked one, measured, against a
//! bound each: a change that makes idle clients cost more fails here, not
//! only in review.
//!
//! dhat counts every allocation of this test binary (its global allocator);
//! `common::idle` opens the sessions against a real cluster and reads it.

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

mod common;

use pgpilot::config::PoolMode;

/// Heap bytes one idle session may keep under transaction pooling: twice
/// what it keeps now in a test build (about 3.3 KB: the task and its
/// future, the client socket's registration, the registry and cancel
/// entries, the pool keys, the statement memo), and a quarter of what it
/// kept while every session held a 16 KB read buffer and the login's
/// futures (29 KB). Release builds keep less (smaller futures).
const KEPT_BOUND: f64 = 7_000.0;

/// Heap bytes one parked session (`pool.park_idle_after`) may keep: about
/// twice what it keeps now (about 0.9 KB: its `Parked` form, the registry
/// entry and its node slots, the cancel slot, and its share of the tables
/// that hold them). It keeps no task, no future and no tokio registration;
/// a change that left one of those behind (a stray waker keeps a finished
/// task allocated, 1.6 KB) fails here.
const PARKED_BOUND: f64 = 2_000.0;

#[test]
fn idle_and_parked_sessions_keep_little_memory() {
    // One profiler per process: both measurements in one test.
    let _profiler = dhat::Profiler::builder().testing().build();
    let idle = measure(std::time::Duration::ZERO);
    assert!(
        idle.kept_bytes <= KEPT_BOUND,
        "an idle session keeps {:.0} B (bound {KEPT_BOUND} B): {idle}",
        idle.kept_bytes
    );
    let parked = measure(std::time::Duration::from_millis(100));
    assert!(
        parked.kept_bytes <= PARKED_BOUND,
        "a parked session keeps {:.0} B (bound {PARKED_BOUND} B): {parked}",
        parked.kept_bytes
    );
}

/// What 300 idle sessions keep, parked after `park_after` (zero: never).
fn measure(park_after: std::time::Duration) -> common::idle::Report {
    let setup = common::idle::Setup::start_parking(2, PoolMode::Transaction, park_after);
    let heap = common::idle::Heap::from_dhat;
    let report = common::idle::measure(
        setup.proxy.addr,
        300,
        4,
        &|k| setup.quiet(k),
        &heap,
        &mut || {},
    );
    eprintln!("park_idle_after {park_after:?}: {report}");
    report
}
