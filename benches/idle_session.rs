//! What an idle session costs: `cargo bench --bench idle_session`.
//!
//! A real cluster (a primary and two standbys, as `benches/clients.sh`
//! uses), pgpilot in process in front of it, pooling per transaction with
//! read routing off; N clients log in with SCRAM, run `select 1` and stay
//! idle. dhat counts every allocation of the process, so the heap that N
//! idle sessions keep, and what their logins allocated, are read exactly
//! (the clients are blocking sockets outside the runtime and keep nothing).
//! It prints those per session, the heap left after they all left, and the
//! sizes of the session task's futures.
//!
//! `N` (default 1000) and `MODE` (`transaction`, `session`) override the
//! defaults; `DHAT_OUT=file.json` writes a dhat profile taken while the
//! sessions are idle (open it in dhat's viewer, `dh_view.html`): its "at
//! t-end" figures are what the idle sessions keep, by allocation site.

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
    let setup = common::idle::Setup::start(2, mode);
    let mut profiler = Some(match &out {
        Some(f) => dhat::Profiler::builder()
            .file_name(f)
            .trim_backtraces(Some(40))
            .build(),
        None => dhat::Profiler::builder().testing().build(),
    });
    let heap = || {
        let s = dhat::HeapStats::get();
        common::idle::Heap {
            curr_bytes: s.curr_bytes as u64,
            curr_blocks: s.curr_blocks as u64,
            total_bytes: s.total_bytes,
            total_blocks: s.total_blocks,
        }
    };
    let alive = std::cell::Cell::new(true);
    let mut at_peak = || {
        if out.is_some() {
            // Written now: its end figures are what the idle sessions keep.
            profiler.take();
            alive.set(false);
        }
    };
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
        &mut at_peak,
    );
    println!("idle sessions ({mode:?} pooling): {report}");
    for (what, bytes) in pgpilot::server::session_sizes() {
        println!("  {what}: {bytes} B");
    }
}
