//! What an idle session costs: `cargo bench --bench idle_session`.
//!
//! A real cluster (a primary and two standbys, as `benches/clients.sh`
//! uses), pgpilot in process in front of it, pooling per transaction with
//! read routing off; N clients log in with SCRAM, run `select 1` and stay
//! idle. dhat counts every allocation of the process, so the heap that N
//! idle sessions keep, and what their logins allocated, are read exactly
//! (the clients are blocking sockets outside the runtime and keep nothing).
//! It prints those per session, the heap left after they all left, and the
//! sizes of the session task's futures and of a parked session.
//!
//! It measures twice: idle sessions that never park (`pool.park_idle_after
//! = 0`: each keeps its task and its socket's tokio registration), then
//! sessions parked after 100 ms idle (transaction pooling only; the figures
//! are taken once every session is parked). `PARK=off` or `PARK=on` runs
//! one of the two.
//!
//! `N` (default 1000) and `MODE` (`transaction`, `session`) override the
//! defaults; `DHAT_OUT=file.json` writes a dhat profile taken while the
//! sessions of the last measurement are idle (open it in dhat's viewer,
//! `dh_view.html`): its "at t-end" figures are what they keep, by
//! allocation site.

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[path = "../tests/common/mod.rs"]
mod common;

use pgpilot::config::PoolMode;

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mode = match std::env::var("MODE").as_deref() {
        Ok("session") => PoolMode::Session,
        _ => PoolMode::Transaction,
    };
    let out = std::env::var("DHAT_OUT").ok();
    let park = std::time::Duration::from_millis(100);
    let runs = match std::env::var("PARK").as_deref() {
        Ok("off") => vec![std::time::Duration::ZERO],
        Ok("on") => vec![park],
        _ => vec![std::time::Duration::ZERO, park],
    };
    let mut profiler = Some(match &out {
        Some(f) => dhat::Profiler::builder()
            .file_name(f)
            .trim_backtraces(Some(40))
            .build(),
        None => dhat::Profiler::builder().testing().build(),
    });
    let heap = common::idle::Heap::from_dhat;
    let alive = std::cell::Cell::new(true);
    let mut at_peak = || {
        if out.is_some() {
            // Written now: its end figures are what the idle sessions keep.
            profiler.take();
            alive.set(false);
        }
    };
    for (i, park_after) in runs.iter().enumerate() {
        let setup = common::idle::Setup::start_parking(2, mode, *park_after);
        let last = i + 1 == runs.len();
        let report = common::idle::measure(
            setup.proxy.addr,
            n,
            4,
            &|k| setup.quiet(k),
            &|| {
                if alive.get() {
                    heap()
                } else {
                    Default::default()
                }
            },
            &mut || {
                if last {
                    at_peak()
                }
            },
        );
        let what = if park_after.is_zero() || mode != PoolMode::Transaction {
            "idle sessions"
        } else {
            "parked sessions"
        };
        println!("{what} ({mode:?} pooling): {report}");
    }
    for (what, bytes) in pgpilot::server::session_sizes() {
        println!("  {what}: {bytes} B");
    }
}
