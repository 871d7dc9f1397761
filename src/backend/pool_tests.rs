//! Unit tests of the pool: keys, retiring databases, the queue of sessions
//! waiting for a connection, and the requests written for them on the
//! connections they are handed (no PostgreSQL: a slot granted to a waiter
//! opens a connection to a port nothing listens on, which fails at once; a
//! handed-over connection is a loopback socket whose other end the test
//! reads).

use super::{
    AcquireSettings, Ahead, Pool, PoolKey, PooledConn, RETIRE_WINDOW, Request, Retiring, Slot,
    Waiter,
};
use crate::backend::BackendError;
use crate::backend::conn::{BackendConn, Unnamed};
use crate::config::NodeId;
use crate::net::Stream;
use crate::protocol::{CancelKey, TxStatus};
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
        ahead: None,
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

// The request a queued session leaves with its place (`Ahead`): written
// once, on the connection handed to it, and only there.

/// A connection for node 0's key `u`/`d` in one of `pool`'s slots, over a
/// loopback socket (no PostgreSQL: the tests read what reaches the other
/// end, returned as the "server"). `small`: small socket buffers, so a large
/// write is only partly taken.
async fn loopback_conn(pool: &Arc<Pool>, small: bool) -> (PooledConn, tokio::net::TcpStream) {
    let listener = tokio::net::TcpSocket::new_v4().unwrap();
    if small {
        listener.set_recv_buffer_size(4096).unwrap();
    }
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listener.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::net::TcpSocket::new_v4().unwrap();
    if small {
        client.set_send_buffer_size(4096).unwrap();
    }
    let (c, s) = tokio::join!(client.connect(addr), listener.accept());
    let np = pool.nodes[0].clone();
    np.lock().open += 1;
    let conn = BackendConn {
        node: node0(),
        stream: Stream::Plain(c.unwrap()),
        buf: bytes::BytesMut::new(),
        user: "u".into(),
        addr,
        cancel_key: CancelKey { pid: 1, secret: 0 },
        params: Vec::new(),
        status: TxStatus::Idle,
        opened_ms: 0,
        last_used: Instant::now(),
        unnamed: Unnamed::Absent,
        held: Default::default(),
        startup_notices: Vec::new(),
        written_ahead: bytes::Bytes::new(),
    };
    let conn = PooledConn {
        conn: Box::new(conn),
        key: key(),
        _slot: Slot(np),
    };
    (conn, s.unwrap().0)
}

fn key() -> PoolKey {
    PoolKey::new(node0(), "u", "d", &[])
}

/// A simple Query message.
fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Queue one acquisition that leaves `request` (if any) with its place,
/// written only on a connection holding at most `max_held` statements.
fn spawn_acquire_ahead(
    pool: &Arc<Pool>,
    request: Option<Vec<u8>>,
    max_held: usize,
    wait: Duration,
) -> tokio::task::JoinHandle<Result<PooledConn, BackendError>> {
    let pool = pool.clone();
    let port = refused_port();
    tokio::spawn(async move {
        let mut s = settings(port, wait);
        s.ahead = request.as_deref().map(|r| Ahead {
            request: r,
            max_held,
        });
        pool.acquire(&key(), &s).await
    })
}

/// Every byte the "server" end has received until now (nothing more comes
/// within 100 ms), and whether the connection was closed.
async fn received(server: &mut tokio::net::TcpStream) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test]
async fn a_waiters_request_is_written_once_on_the_connection_it_is_handed() {
    let pool = Arc::new(Pool::new(1));
    let (conn, mut server) = loopback_conn(&pool, false).await;
    let request = query("select 7");
    let waiter = spawn_acquire_ahead(&pool, Some(request.clone()), 100, Duration::from_secs(20));
    until_queued(&pool, 1).await;
    // Nothing is written while the session waits.
    assert_eq!(received(&mut server).await, (Vec::new(), false));
    pool.put_idle(conn, Instant::now());
    let mut conn = waiter.await.unwrap().expect("handed the connection");
    assert_eq!(conn.written_ahead[..], request[..]);
    assert_eq!(pool.stats(node0()).written_ahead_total, 1);
    assert_eq!(received(&mut server).await, (request.clone(), false));
    // The session sends nothing of it again (`Link::send` skips it); given
    // back with no one waiting, the connection writes nothing more.
    conn.written_ahead = bytes::Bytes::new();
    pool.put_idle(conn, Instant::now());
    assert_eq!(received(&mut server).await, (Vec::new(), false));
    assert_eq!(pool.stats(node0()).idle, 1);
    // A waiter that left no request gets the connection with nothing written.
    let conn = pool.take_recent(&key(), Instant::now()).expect("idle");
    let waiter = spawn_acquire_ahead(&pool, None, 100, Duration::from_secs(20));
    until_queued(&pool, 1).await;
    pool.put_idle(conn, Instant::now());
    let conn = waiter.await.unwrap().expect("handed the connection");
    assert!(conn.written_ahead.is_empty());
    assert_eq!(received(&mut server).await, (Vec::new(), false));
    assert_eq!(pool.stats(node0()).written_ahead_total, 1);
}

#[tokio::test]
async fn a_request_is_not_written_where_statements_must_be_closed_first() {
    let pool = Arc::new(Pool::new(1));
    let (mut conn, mut server) = loopback_conn(&pool, false).await;
    conn.held
        .made(b"s1", bytes::Bytes::from_static(b"P"), true, None);
    // One statement held, the waiter's cap is 0: its session closes one
    // before any request, so its request must not be on the wire first.
    let waiter = spawn_acquire_ahead(&pool, Some(query("select 1")), 0, Duration::from_secs(20));
    until_queued(&pool, 1).await;
    pool.put_idle(conn, Instant::now());
    let conn = waiter.await.unwrap().expect("handed the connection");
    assert!(conn.written_ahead.is_empty());
    assert_eq!(received(&mut server).await, (Vec::new(), false));
}

#[tokio::test]
async fn a_waiter_that_timed_out_never_has_its_request_written() {
    let pool = Arc::new(Pool::new(1));
    let (conn, mut server) = loopback_conn(&pool, false).await;
    let waiter = spawn_acquire_ahead(
        &pool,
        Some(query("select 1")),
        100,
        Duration::from_millis(50),
    );
    let r = waiter.await.unwrap();
    assert!(
        matches!(r, Err(BackendError::PoolTimeout { .. })),
        "{:?}",
        r.err()
    );
    // Given back after the session gave up: kept idle, nothing written.
    pool.put_idle(conn, Instant::now());
    assert_eq!(received(&mut server).await, (Vec::new(), false));
    let st = pool.stats(node0());
    assert_eq!((st.open, st.idle, st.written_ahead_total), (1, 1, 0));
}

#[tokio::test]
async fn a_waiter_gone_after_its_request_was_written_costs_the_connection() {
    let pool = Arc::new(Pool::new(1));
    let (conn, mut server) = loopback_conn(&pool, false).await;
    let request = query("select 3");
    // Taken out of the queue by the hand-over, then gone before the grant
    // reached it (a session ended, on another runtime thread, in between).
    let (tx, rx) = tokio::sync::oneshot::channel();
    drop(rx);
    let w = Waiter {
        key: key(),
        seq: 0,
        tx,
        ahead: Some(Request {
            bytes: bytes::Bytes::from(request.clone()),
            max_held: 100,
        }),
    };
    pool.deliver(w, conn, Instant::now());
    // The request reached the server, whose answer would go to no one: the
    // connection is closed, never pooled.
    assert_eq!(received(&mut server).await, (request, true));
    let st = pool.stats(node0());
    assert_eq!((st.open, st.idle), (0, 0));
}

#[tokio::test]
async fn a_request_the_socket_takes_in_part_is_finished_by_its_session() {
    let pool = Arc::new(Pool::new(1));
    let (conn, mut server) = loopback_conn(&pool, true).await;
    // Far more than small socket buffers hold.
    let request = query(&format!("select '{}'", "x".repeat(4 << 20)));
    let waiter = spawn_acquire_ahead(&pool, Some(request.clone()), 100, Duration::from_secs(20));
    until_queued(&pool, 1).await;
    pool.put_idle(conn, Instant::now());
    let conn = waiter.await.unwrap().expect("handed the connection");
    let n = conn.written_ahead.len();
    assert!(
        n > 0 && n < request.len(),
        "{n} of {} written",
        request.len()
    );
    assert_eq!(conn.written_ahead[..], request[..n]);
    // The session writes the rest (what `Link::send` does): the server gets
    // the request exactly once.
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; request.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request);
        received(&mut server).await
    });
    let Stream::Plain(tcp) = &conn.stream else {
        unreachable!()
    };
    let rest = query(&format!("select '{}'", "x".repeat(4 << 20)));
    let mut done = n;
    while done < rest.len() {
        tcp.writable().await.unwrap();
        done += crate::net::write_now(tcp, &rest[done..]).unwrap();
    }
    assert_eq!(reader.await.unwrap(), (Vec::new(), false));
}
