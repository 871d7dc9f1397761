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
//! [`DEFAULT_HANDOFFS`]), `PGPILOT_STRESS_BUSY` the spinning threads (default
//! [`DEFAULT_BUSY_LOOPS`]); `benches/handoff.sh` runs them longer by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{SERIAL, Tally, config, connect, fresh_table, read_sql, report, result_set};
use pgpilot::config::ConsistencyMode;

/// Hand-offs per test unless `PGPILOT_STRESS_HANDOFFS` says otherwise.
/// (About half a minute each on two busy cores; the acceptance runs of
/// 100,000 and more are made by hand.)
const DEFAULT_HANDOFFS: u64 = 30_000;

/// Connection pairs working at once: a writer and a reader each (global),
/// or two connections each reading back their own writes (session).
const PAIRS: u64 = 16;

/// Spinning threads competing for the CPU unless `PGPILOT_STRESS_BUSY` says
/// otherwise.
const DEFAULT_BUSY_LOOPS: u64 = 2;

/// A count from the environment variable `name`, else `default`.
fn from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: {v:?} is not a count"))
        })
        .unwrap_or(default)
}

fn handoffs() -> u64 {
    from_env("PGPILOT_STRESS_HANDOFFS", DEFAULT_HANDOFFS)
}

fn busy_loops() -> BusyLoops {
    BusyLoops::start(from_env("PGPILOT_STRESS_BUSY", DEFAULT_BUSY_LOOPS))
}

/// Threads spinning until dropped (`yes > /dev/null`, in process).
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start(n: u64) -> BusyLoops {
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

/// A connection with the workload's statements prepared once (a hand-off
/// costs one round trip per statement, so more of them fit in a minute).
struct Conn {
    client: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    read: tokio_postgres::Statement,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, table: &str) -> Conn {
        let client = connect(addr, "").await;
        let insert = client
            .prepare(&format!("INSERT INTO {table} VALUES ($1)"))
            .await
            .unwrap();
        let read = client.prepare(&read_sql(table, "$1")).await.unwrap();
        Conn {
            client,
            insert,
            read,
        }
    }

    /// Insert row `id`, acknowledged when this returns; `i` picks the form,
    /// cycling through: simple autocommit, extended autocommit, simple
    /// explicit transaction, extended explicit transaction.
    async fn insert(&mut self, table: &str, id: i64, i: u64) {
        match i % 4 {
            0 => drop(
                self.client
                    .simple_query(&format!("INSERT INTO {table} VALUES ({id})"))
                    .await
                    .unwrap(),
            ),
            1 => drop(self.client.execute(&self.insert, &[&id]).await.unwrap()),
            2 => self
                .client
                .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES ({id}); COMMIT"))
                .await
                .unwrap(),
            _ => {
                let tx = self.client.transaction().await.unwrap();
                tx.execute(&self.insert, &[&id]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    }

    /// Read row `id` (simple protocol for even `i`, extended for odd) and
    /// count the outcome in `tally`.
    async fn read(&self, table: &str, id: i64, i: u64, tally: &Tally) {
        if i.is_multiple_of(2) {
            let sql = read_sql(table, &id.to_string());
            let msgs = self.client.simple_query(&sql).await.unwrap();
            let (_, rows) = result_set(&msgs);
            tally.record(rows[0][0].parse().unwrap(), &rows[0][1]);
        } else {
            let row = self.client.query_one(&self.read, &[&id]).await.unwrap();
            tally.record(row.get(0), row.get(1));
        }
    }
}

/// One stress run: a pgpilot in `mode` in front of a fresh `table`, the
/// spinning threads, the clock, and the tally the workload fills.
struct Run {
    addr: std::net::SocketAddr,
    table: &'static str,
    total: u64,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _busy: BusyLoops,
    started: Instant,
}

impl Run {
    async fn start(mode: ConsistencyMode, table: &'static str) -> Run {
        let addr = super::spawn_proxy(config(mode));
        fresh_table(addr, table).await;
        Run {
            addr,
            table,
            total: handoffs(),
            tally: Arc::new(Tally::default()),
            tasks: Vec::new(),
            _busy: busy_loops(),
            started: Instant::now(),
        }
    }

    /// Wait for the workload, then check what it saw.
    async fn finish(self, name: &str) {
        for t in self.tasks {
            t.await.unwrap();
        }
        check(name, &self.tally, self.total, self.started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_handoffs_under_cpu_contention_never_miss() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start(ConsistencyMode::Global, "stress_global").await;
    let (table, total) = (run.table, run.total);
    let per_pair = total.div_ceil(PAIRS);
    for p in 0..PAIRS {
        let mut writer = Conn::open(run.addr, table).await;
        let reader = Conn::open(run.addr, table).await;
        let n = per_pair.min(total.saturating_sub(p * per_pair));
        // One hand-off in flight per pair: each read arrives right after its
        // write's acknowledgement, where a race would show.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(i64, u64)>(1);
        run.tasks.push(tokio::spawn(async move {
            for i in 0..n {
                let id = (p * per_pair + i) as i64;
                writer.insert(table, id, i).await;
                tx.send((id, i)).await.unwrap();
            }
        }));
        let tally = run.tally.clone();
        run.tasks.push(tokio::spawn(async move {
            while let Some((id, i)) = rx.recv().await {
                reader.read(table, id, i, &tally).await;
            }
        }));
    }
    run.finish("global hand-offs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_under_cpu_contention_never_miss() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start(ConsistencyMode::Session, "stress_session").await;
    let (table, total) = (run.table, run.total);
    let conns = 2 * PAIRS;
    let per_conn = total.div_ceil(conns);
    for c in 0..conns {
        let mut conn = Conn::open(run.addr, table).await;
        let n = per_conn.min(total.saturating_sub(c * per_conn));
        let tally = run.tally.clone();
        run.tasks.push(tokio::spawn(async move {
            for i in 0..n {
                let id = (c * per_conn + i) as i64;
                conn.insert(table, id, i).await;
                conn.read(table, id, i, &tally).await;
            }
        }));
    }
    run.finish("session same-connection reads").await;
}
