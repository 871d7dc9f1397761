//! Unit tests of the pool: keys, retiring databases, and the queue of
//! sessions waiting for a connection (no PostgreSQL: a slot granted to a
//! waiter opens a connection to a port nothing listens on, which fails at
//! once).

use super::{AcquireSettings, Pool, PoolKey, RETIRE_WINDOW, Retiring, Slot};
use crate::backend::BackendError;
use crate::config::NodeId;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn a_database_retires_until_each_statement_ends_or_the_window_passes() {
    let r = Retiring::default();
    let now = Instant::now();
    assert!(!r.contains("d", now));
    // Two statements retire it: pooled again after both ended.
    r.start("d", now);
    r.start("d", now);
    assert!(r.contains("d", now));
    assert!(!r.contains("e", now));
    r.end("d");
    assert!(r.contains("d", now));
    r.end("d");
    assert!(!r.contains("d", now));
    // One never ended: over after the window.
    r.start("d", now);
    assert!(r.contains("d", now + RETIRE_WINDOW / 2));
    assert!(!r.contains("d", now + RETIRE_WINDOW));
    assert!(!r.any.load(std::sync::atomic::Ordering::Relaxed));
}

fn p(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[test]
fn keys_are_equal_exactly_when_their_parameters_are() {
    let a = PoolKey::new(
        NodeId::new(0),
        "app",
        "db",
        &[p("TimeZone", "UTC"), p("application_name", "x")],
    );
    // Same parameters in another order, built separately (not shared).
    let b = PoolKey::new(
        NodeId::new(0),
        "app",
        "db",
        &[p("application_name", "x"), p("TimeZone", "UTC")],
    );
    assert!(!std::sync::Arc::ptr_eq(&a.startup, &b.startup));
    assert_eq!(a, b);
    let h = foldhash::fast::RandomState::default();
    assert_eq!(h.hash_one(&a), h.hash_one(&b));
    for other in [
        PoolKey::new(
            NodeId::new(1),
            "app",
            "db",
            &[p("TimeZone", "UTC"), p("application_name", "x")],
        ),
        PoolKey::new(
            NodeId::new(0),
            "bob",
            "db",
            &[p("TimeZone", "UTC"), p("application_name", "x")],
        ),
        PoolKey::new(
            NodeId::new(0),
            "app",
            "db2",
            &[p("TimeZone", "UTC"), p("application_name", "x")],
        ),
        PoolKey::new(
            NodeId::new(0),
            "app",
            "db",
            &[p("TimeZone", "UTC"), p("application_name", "y")],
        ),
        PoolKey::new(NodeId::new(0), "app", "db", &[p("TimeZone", "UTC")]),
    ] {
        assert_ne!(a, other, "{other:?}");
    }
    // A user/database given again among the extras does not count twice.
    assert_eq!(a.user(), "app");
    let c = PoolKey::new(
        NodeId::new(0),
        "app",
        "db",
        &[
            p("user", "z"),
            p("TimeZone", "UTC"),
            p("application_name", "x"),
        ],
    );
    assert_eq!(a, c);
}

/// A loopback port nothing listens on: connecting is refused at once.
fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One connection per node, to `port`, waiting up to `wait`.
fn settings(port: u16, wait: Duration) -> AcquireSettings<'static> {
    AcquireSettings {
        host: "127.0.0.1",
        port,
        password: Some("x"),
        scram_keys: None,
        md5_stored: None,
        max_per_node: 1,
        acquire_timeout: wait,
        connect_timeout: Duration::from_secs(5),
        auth_timeout: Duration::from_secs(5),
        tls: None,
    }
}

/// A pool of one node whose one slot is taken: dropping the returned slot
/// frees it (for the longest waiter).
fn full_pool() -> (Arc<Pool>, Slot) {
    let pool = Arc::new(Pool::new(1));
    let np = pool.nodes[0].clone();
    np.lock().open = 1;
    (pool, Slot(np))
}

fn node0() -> NodeId {
    NodeId::new(0)
}

/// Let spawned tasks run until `n` sessions are queued.
async fn until_queued(pool: &Pool, n: usize) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while pool.stats(node0()).waiting != n {
        assert!(Instant::now() < give_up, "{n} sessions never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Spawn one acquisition; it records its number in `order` when it ends.
fn spawn_acquire(
    pool: &Arc<Pool>,
    port: u16,
    wait: Duration,
    i: usize,
    order: &Arc<Mutex<Vec<usize>>>,
) -> tokio::task::JoinHandle<Result<(), BackendError>> {
    let (pool, order) = (pool.clone(), order.clone());
    tokio::spawn(async move {
        let key = PoolKey::new(node0(), "u", "d", &[]);
        let r = pool.acquire(&key, &settings(port, wait)).await.map(drop);
        order.lock().unwrap().push(i);
        r
    })
}

#[tokio::test]
async fn a_freed_slot_goes_to_the_longest_waiter_first() {
    let (pool, held) = full_pool();
    let port = refused_port();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(spawn_acquire(
            &pool,
            port,
            Duration::from_secs(20),
            i,
            &order,
        ));
        until_queued(&pool, i + 1).await;
    }
    // Each waiter in turn gets the slot, fails to connect and so passes the
    // slot on: they end in the order they queued.
    drop(held);
    for t in tasks {
        let r = t.await.unwrap();
        assert!(matches!(r, Err(BackendError::Connect { .. })), "{r:?}");
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    assert_eq!(pool.stats(node0()).open, 0);
    assert!(pool.nodes[0].lock().waiters.is_empty());
}

#[tokio::test]
async fn many_waiters_each_time_out_on_time_and_leave_the_queue() {
    let (pool, held) = full_pool();
    let port = refused_port();
    let order = Arc::new(Mutex::new(Vec::new()));
    let wait = Duration::from_millis(200);
    let start = Instant::now();
    let tasks: Vec<_> = (0..300)
        .map(|i| spawn_acquire(&pool, port, wait, i, &order))
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(matches!(r, Err(BackendError::PoolTimeout { .. })), "{r:?}");
    }
    let took = start.elapsed();
    assert!(took >= wait && took < Duration::from_secs(5), "{took:?}");
    // Nobody who gave up is left in the queue.
    assert!(pool.nodes[0].lock().waiters.is_empty());
    // The next session is served as soon as the slot is freed.
    let next = spawn_acquire(&pool, port, Duration::from_secs(20), 300, &order);
    until_queued(&pool, 1).await;
    drop(held);
    let r = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("served at once")
        .unwrap();
    assert!(matches!(r, Err(BackendError::Connect { .. })), "{r:?}");
    assert_eq!(pool.stats(node0()).open, 0);
}

#[tokio::test]
async fn a_session_gone_while_queued_leaves_the_queue() {
    let (pool, held) = full_pool();
    let order = Arc::new(Mutex::new(Vec::new()));
    let gone = spawn_acquire(&pool, refused_port(), Duration::from_secs(20), 0, &order);
    until_queued(&pool, 1).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    assert!(pool.nodes[0].lock().waiters.is_empty());
    // The slot is freed, not passed to the session that went away.
    drop(held);
    assert_eq!(pool.stats(node0()).open, 0);
}
