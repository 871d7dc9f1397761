//! Idle sessions, measured: N clients log in with SCRAM, run `select 1` and
//! stay idle, and the heap of the process running pgpilot is read before,
//! with them, and after they left. Shared by `tests/idle_memory.rs` (a bound
//! that fails CI) and `benches/idle_session.rs` (the numbers for review),
//! which each install a counting global allocator (dhat) and pass its reading
//! in.
//!
//! The clients are plain blocking sockets, logged in from threads outside
//! any runtime: once logged in, a client holds only its socket (preallocated
//! room in one Vec), so what the heap gains while they are connected is what
//! pgpilot keeps for them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;

use pgpilot::config::{NodeId, PoolMode};
use pgpilot::localcluster::{ClusterSpec, LocalCluster};

use super::{DB, PASSWORD, StoppableProxy, USER};

/// A cluster of its own and a pgpilot in front of it, pooling per
/// `mode` with read routing off (everything on the primary, as in
/// `benches/clients.sh`); both stop when dropped, the proxy first.
pub struct Setup {
    /// The pgpilot.
    pub proxy: StoppableProxy,
    /// The cluster.
    pub cluster: LocalCluster,
    mode: PoolMode,
    /// Sessions park (`pool.park_idle_after`): quiet once all are parked.
    parking: bool,
}

impl Setup {
    /// Start a primary and `standbys` standbys, and pgpilot in front;
    /// sessions never park.
    pub fn start(standbys: usize, mode: PoolMode) -> Setup {
        Setup::start_parking(standbys, mode, Duration::ZERO)
    }

    /// [`Setup::start`] with `pool.park_idle_after = park_after` (zero:
    /// never).
    pub fn start_parking(standbys: usize, mode: PoolMode, park_after: Duration) -> Setup {
        super::init_logs();
        let cluster = LocalCluster::start(ClusterSpec {
            standbys,
            users: vec![(USER.into(), PASSWORD.into())],
            databases: vec![(DB.into(), USER.into())],
            ..ClusterSpec::default()
        })
        .expect("start a local PostgreSQL cluster");
        let mut config = pgpilot::demo::config_for(&cluster, "127.0.0.1:0", &[(USER, PASSWORD)]);
        config.pool.mode = mode;
        // Room for every client a measurement opens.
        config.max_client_conn = 100_000;
        config.routing.load_balance = false;
        config.pool.park_idle_after = park_after;
        let proxy = super::spawn_proxy_stoppable(config);
        wait(
            || {
                let s = proxy.ctx.cluster.snapshot();
                s.primary == Some(NodeId::new(0)) && s.nodes.iter().all(|n| n.status.is_usable())
            },
            "node 0 the primary and every node in service",
        );
        Setup {
            proxy,
            cluster,
            mode,
            parking: !park_after.is_zero() && mode == PoolMode::Transaction,
        }
    }

    /// Whether `sessions` sessions are logged in and, under transaction
    /// pooling, every server connection of the primary's pool is idle in it
    /// (none held by a session); with parking, every session parked.
    pub fn quiet(&self, sessions: usize) -> bool {
        let ctx = &self.proxy.ctx;
        let pool = ctx.pool.stats(NodeId::new(0));
        ctx.sessions.len() == sessions
            && (self.mode != PoolMode::Transaction || pool.idle == pool.open)
            && (!self.parking || ctx.metrics.clients_parked() == sessions as i64)
    }
}

/// Heap in use now: (bytes, blocks), and allocated so far: (bytes, blocks).
#[derive(Debug, Clone, Copy, Default)]
pub struct Heap {
    /// Bytes in live allocations.
    pub curr_bytes: u64,
    /// Live allocations.
    pub curr_blocks: u64,
    /// Bytes allocated since the profiler started.
    pub total_bytes: u64,
    /// Allocations since the profiler started.
    pub total_blocks: u64,
}

impl Heap {
    /// dhat's counts now; the binary's global allocator must be
    /// `dhat::Alloc`, with a profiler running.
    pub fn from_dhat() -> Heap {
        let s = dhat::HeapStats::get();
        Heap {
            curr_bytes: s.curr_bytes as u64,
            curr_blocks: s.curr_blocks as u64,
            total_bytes: s.total_bytes,
            total_blocks: s.total_blocks,
        }
    }
}

/// What N idle sessions cost, per session.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Sessions measured.
    pub n: usize,
    /// Heap bytes kept per idle session.
    pub kept_bytes: f64,
    /// Live allocations kept per idle session.
    pub kept_blocks: f64,
    /// Bytes allocated per session while it logged in and ran `select 1`
    /// (freed or not).
    pub allocated_bytes: f64,
    /// Allocations per session over the same span.
    pub allocated_blocks: f64,
    /// Heap bytes per session still in use after every client left.
    pub left_bytes: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "N={}: kept {:.0} B in {:.1} blocks per idle session; \
             allocated {:.0} B in {:.0} blocks per login + select 1; \
             {:.0} B per session left after they all left",
            self.n,
            self.kept_bytes,
            self.kept_blocks,
            self.allocated_bytes,
            self.allocated_blocks,
            self.left_bytes
        )
    }
}

fn read_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// Log in as the test user with SCRAM-SHA-256, run `select 1`, and return
/// the socket, idle after its ReadyForQuery.
pub fn login_idle(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect to pgpilot");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = bytes::BytesMut::new();
    frontend::startup_message([("user", USER), ("database", DB)], &mut buf).unwrap();
    s.write_all(&buf).unwrap();
    let mut scram = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let mut queried = false;
    loop {
        let (t, body) = read_msg(&mut s).expect("a message from pgpilot");
        buf.clear();
        let code = body
            .get(..4)
            .map_or(0, |b| i32::from_be_bytes(b.try_into().unwrap()));
        match (t, code) {
            (b'R', 10) => {
                frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut buf)
                    .unwrap();
                s.write_all(&buf).unwrap();
            }
            (b'R', 11) => {
                scram.update(&body[4..]).unwrap();
                frontend::sasl_response(scram.message(), &mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
            (b'R', 12) => scram.finish(&body[4..]).unwrap(),
            (b'E', _) => panic!("error from pgpilot: {}", String::from_utf8_lossy(&body)),
            (b'Z', _) if queried => return s,
            (b'Z', _) => {
                frontend::query("select 1", &mut buf).unwrap();
                s.write_all(&buf).unwrap();
                queried = true;
            }
            _ => {}
        }
    }
}

/// Read `heap` until two readings `settle` apart agree within `slack` bytes
/// (background tasks allocate now and then), at most `limit`; the last one.
fn settled(heap: &dyn Fn() -> Heap, slack: u64, settle: Duration) -> Heap {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = heap();
    loop {
        std::thread::sleep(settle);
        let now = heap();
        if now.curr_bytes.abs_diff(last.curr_bytes) <= slack || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Open `n` idle sessions to `addr` from `threads` threads, read the heap
/// with them, close them, read it again. `quiet()` says when pgpilot has
/// settled after a change (every server connection given back, every
/// session gone); `heap()` reads the counting allocator; `at_peak()` runs
/// while the sessions are idle, after the reading (a profile is written there).
pub fn measure(
    addr: SocketAddr,
    n: usize,
    threads: usize,
    quiet: &dyn Fn(usize) -> bool,
    heap: &dyn Fn() -> Heap,
    at_peak: &mut dyn FnMut(),
) -> Report {
    // The first login warms what every later one shares (the pool's server
    // connection, caches, the registry's table): not a per-session cost.
    let warm = login_idle(addr);
    let mut clients: Vec<TcpStream> = Vec::with_capacity(n);
    wait(|| quiet(1), "the warm-up session idle");
    let before = settled(heap, 256, Duration::from_millis(100));
    let per_thread = n.div_ceil(threads);
    let opened: Vec<Vec<TcpStream>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let count = per_thread.min(n.saturating_sub(t * per_thread));
                s.spawn(move || (0..count).map(|_| login_idle(addr)).collect::<Vec<_>>())
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    // Moved into the preallocated Vec, so the clients' side keeps nothing
    // but that one allocation (made before the first reading).
    for batch in opened {
        clients.extend(batch);
    }
    wait(|| quiet(n + 1), "every session idle");
    let with = settled(heap, 256, Duration::from_millis(100));
    at_peak();
    drop(clients);
    wait(|| quiet(1), "every session but the warm-up one gone");
    let after = settled(heap, 256, Duration::from_millis(100));
    drop(warm);
    let per = |a: u64, b: u64| (a as f64 - b as f64) / n as f64;
    Report {
        n,
        kept_bytes: per(with.curr_bytes, before.curr_bytes),
        kept_blocks: per(with.curr_blocks, before.curr_blocks),
        allocated_bytes: per(with.total_bytes, before.total_bytes),
        allocated_blocks: per(with.total_blocks, before.total_blocks),
        left_bytes: per(after.curr_bytes, before.curr_bytes),
    }
}

fn wait(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
