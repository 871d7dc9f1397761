//! Transaction pooling (`pool.mode = "transaction"`) against a real primary +
//! 2 standbys: clean sessions share server connections between transactions,
//! a transaction keeps its connection, session state pins one, a cancel never
//! reaches a connection that now serves someone else, waiting sessions are
//! served in arrival order, unnamed statements never cross sessions, and
//! pgbench completes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{connect, harness, result_set, spawn_proxy, sqlstate};
use pgpilot::config::{Config, PoolMode};

/// A transaction-pooling pgpilot with `per_node` server connections per node,
/// everything on the primary (so every statement shares one pool).
fn tx_config(per_node: usize, acquire: Duration) -> Config {
    let mut cfg = harness().config();
    cfg.pool.mode = PoolMode::Transaction;
    cfg.pool.max_connections_per_node = per_node;
    cfg.pool.acquire_timeout = acquire;
    cfg.routing.load_balance = false;
    cfg
}

/// The first column of the first row of a simple query.
async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).await.expect(sql);
    let (_, rows) = result_set(&msgs);
    rows[0][0].clone()
}

/// Connect, retrying while the pool is still busy (e.g. resetting a connection).
async fn connect_within(addr: SocketAddr, limit: Duration) -> tokio_postgres::Client {
    let deadline = Instant::now() + limit;
    loop {
        match common::try_connect(addr, "").await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("could not connect: {e}"),
        }
    }
}

#[tokio::test]
async fn clean_sessions_share_one_server_connection() {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(5)));
    // One server connection for the node, two clients, turns taken.
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    for _ in 0..3 {
        assert_eq!(one(&b, "SELECT pg_backend_pid()").await, pid);
        assert_eq!(one(&a, "SELECT pg_backend_pid()").await, pid);
    }
    // Writes and multi-statement strings too.
    a.simple_query("CREATE TABLE IF NOT EXISTS txpool_t (v int); INSERT INTO txpool_t VALUES (1)")
        .await
        .unwrap();
    assert_ne!(one(&b, "SELECT count(*) FROM txpool_t").await, "0");
}

#[tokio::test]
async fn a_transaction_keeps_its_connection_and_others_wait() {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(5)));
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    a.simple_query("BEGIN").await.unwrap();
    let in_tx = one(&a, "SELECT pg_backend_pid()").await;
    let started = Instant::now();
    let waiting = tokio::spawn(async move { one(&b, "SELECT pg_backend_pid()").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !waiting.is_finished(),
        "ran while another client's transaction held the connection"
    );
    // Still the same connection inside the transaction.
    assert_eq!(one(&a, "SELECT pg_backend_pid()").await, in_tx);
    a.simple_query("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), in_tx);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn session_state_pins_the_connection_until_the_session_ends() {
    let addr = spawn_proxy(tx_config(1, Duration::from_millis(500)));
    let a = connect(addr, "").await;
    a.simple_query("SET application_name = 'pinned'")
        .await
        .unwrap();
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    // The setting survives transactions because the connection stays A's ...
    a.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    assert_eq!(one(&a, "SHOW application_name").await, "pinned");
    assert_eq!(one(&a, "SELECT pg_backend_pid()").await, pid);
    // ... so nobody else gets it: a second client waits, then gets 53300.
    let e = match common::try_connect(addr, "").await {
        Ok(b) => b.simple_query("SELECT 1").await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    // When A leaves, its connection is reset before anyone else uses it.
    drop(a);
    let c = connect_within(addr, Duration::from_secs(5)).await;
    assert_eq!(one(&c, "SELECT pg_backend_pid()").await, pid);
    assert_ne!(one(&c, "SHOW application_name").await, "pinned");
}

#[tokio::test]
async fn a_cancel_after_release_never_reaches_another_session() {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(5)));
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    a.simple_query("SELECT 1").await.unwrap();
    let a_cancel = a.cancel_token();
    // B now runs on the connection A used; A's cancel must not touch it.
    let slow = tokio::spawn(async move {
        let r = b.simple_query("SELECT pg_sleep(1.5)").await;
        (b, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (b, r) = slow.await.unwrap();
    assert!(
        r.is_ok(),
        "another client's cancel stopped this query: {r:?}"
    );
    // A cancel still stops its own client's running query.
    let b_cancel = b.cancel_token();
    let own = tokio::spawn(async move { b.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b_cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(2), own)
        .await
        .expect("cancelled within 2 s")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
}

#[tokio::test]
async fn waiting_sessions_are_served_in_arrival_order() {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(20)));
    // Everyone logs in first (a login uses the connection for a moment).
    let holder = connect(addr, "").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(addr, "").await);
    }
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    // Four sessions queue for the one connection, 150 ms apart; each holds it
    // for 50 ms once served, so they finish in the order they were served.
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let served = served.clone();
        tasks.push(tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(0.05)").await.unwrap();
            served.lock().unwrap().push(i);
        }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        served.lock().unwrap().is_empty(),
        "ran during another's transaction"
    );
    holder.simple_query("COMMIT").await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*served.lock().unwrap(), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn a_waiter_that_gave_up_costs_no_connection() {
    let addr = spawn_proxy(tx_config(1, Duration::from_millis(300)));
    let holder = connect(addr, "").await;
    let quitter = connect(addr, "").await;
    let next = connect(addr, "").await;
    holder.simple_query("BEGIN").await.unwrap();
    let pid = one(&holder, "SELECT pg_backend_pid()").await;
    let e = quitter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    holder.simple_query("COMMIT").await.unwrap();
    // The connection was not handed to the session that left the queue.
    assert_eq!(one(&next, "SELECT pg_backend_pid()").await, pid);
    assert_eq!(one(&holder, "SELECT pg_backend_pid()").await, pid);
}

/// One extended-protocol request on a raw socket: an optional unnamed Parse,
/// then Bind/Execute of the unnamed statement, Sync. The first column of each
/// row, or the SQLSTATE of the error.
async fn unnamed_request(
    s: &mut tokio::net::TcpStream,
    parse: Option<&str>,
) -> Result<Vec<String>, String> {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    if let Some(sql) = parse {
        frontend::parse("", sql, std::iter::empty(), &mut buf).unwrap();
    }
    frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<i32>(),
        |_: i32,
         _: &mut bytes::BytesMut|
         -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!()
        },
        Some(0),
        &mut buf,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::execute("", 0, &mut buf).unwrap();
    frontend::sync(&mut buf);
    s.write_all(&buf).await.unwrap();
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (t, body) = common::raw::read_msg(s).await.unwrap();
        match t {
            b'D' => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                rows.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
            }
            b'E' => error = Some(common::raw::sqlstate_of(&body)),
            b'Z' => return error.map_or(Ok(rows), Err),
            _ => {}
        }
    }
}

#[tokio::test]
async fn unnamed_statements_share_connections_and_never_cross_sessions() {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(2)));
    let mut a = common::raw::login_raw(addr).await;
    let mut b = common::raw::login_raw(addr).await;
    // Both run extended-protocol requests on the one server connection.
    let pid = unnamed_request(&mut a, Some("SELECT pg_backend_pid()::text")).await;
    assert_eq!(
        unnamed_request(&mut b, Some("SELECT pg_backend_pid()::text")).await,
        pid
    );
    // A parses a statement; C, which never parsed one, cannot run it: the
    // connection's unnamed statement is closed before C's Bind.
    let mut c = common::raw::login_raw(addr).await;
    unnamed_request(&mut a, Some("SELECT 'secret of a'"))
        .await
        .unwrap();
    assert_eq!(
        unnamed_request(&mut c, None).await,
        Err("26000".to_string())
    );
    // B's Bind alone runs B's own earlier statement, re-parsed.
    unnamed_request(&mut a, Some("SELECT 'secret of a'"))
        .await
        .unwrap();
    assert_eq!(unnamed_request(&mut b, None).await, pid);
    // B parses its own; A's Bind alone runs A's statement again (re-parsed
    // on the connection B's statement replaced).
    assert_eq!(
        unnamed_request(&mut b, Some("SELECT 'of b'")).await,
        Ok(vec!["of b".to_string()])
    );
    assert_eq!(
        unnamed_request(&mut a, None).await,
        Ok(vec!["secret of a".to_string()])
    );
    // And again with nobody in between: the statement found on the connection.
    assert_eq!(
        unnamed_request(&mut a, None).await,
        Ok(vec!["secret of a".to_string()])
    );
    assert_eq!(
        unnamed_request(&mut b, None).await,
        Ok(vec!["of b".to_string()])
    );
}

#[test]
fn pgbench_completes_with_more_clients_than_server_connections() {
    let addr = spawn_proxy(tx_config(3, Duration::from_secs(10)));
    common::pgbench_at(addr, &["-i", "-s", "1", "-q"]);
    // 8 clients over 3 server connections: only transaction pooling can
    // (extended: unnamed statements, which do not pin a session).
    for mode in ["simple", "extended"] {
        for workload in [&["-S"][..], &[][..]] {
            let mut args = vec!["-M", mode, "-c", "8", "-j", "2", "-T", "2"];
            args.extend_from_slice(workload);
            let text = common::pgbench_at(addr, &args);
            assert!(
                text.contains("number of failed transactions: 0 (0.000%)"),
                "pgbench {args:?}:\n{text}"
            );
        }
    }
}
