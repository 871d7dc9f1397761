//! What an idle session keeps, measured, against a bound: a change that
//! makes idle clients cost more fails here, not only in review.
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

#[test]
fn an_idle_session_keeps_little_memory() {
    let setup = common::idle::Setup::start(2, PoolMode::Transaction);
    let _profiler = dhat::Profiler::builder().testing().build();
    let heap = || {
        let s = dhat::HeapStats::get();
        common::idle::Heap {
            curr_bytes: s.curr_bytes as u64,
            curr_blocks: s.curr_blocks as u64,
            total_bytes: s.total_bytes,
            total_blocks: s.total_blocks,
        }
    };
    let report = common::idle::measure(
        setup.proxy.addr,
        300,
        4,
        &|k| setup.quiet(k),
        &heap,
        &mut || {},
    );
    eprintln!("{report}");
    assert!(
        report.kept_bytes <= KEPT_BOUND,
        "an idle session keeps {:.0} B (bound {KEPT_BOUND} B): {report}",
        report.kept_bytes
    );
}
