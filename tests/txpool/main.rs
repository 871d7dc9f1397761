//! Transaction pooling (`pool.mode = "transaction"`) against a real primary +
//! 2 standbys: clean sessions share server connections between transactions,
//! a transaction keeps its connection, session state pins one, a cancel never
//! reaches a connection that now serves someone else, waiting sessions are
//! served in arrival order, prepared statements (unnamed and named) are shared
//! but never cross sessions, and pgbench completes; with many clients per
//! server connection, each gets exactly its own answers ([`many_waiters`]).

#[path = "../common/mod.rs"]
mod common;

mod many_waiters;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw::{ended_with, login_raw, send_query, until_ready};
use common::{
    Spawned, connect, harness, result_set, running, spawn_proxy, spawn_proxy_full, sqlstate,
    superusers, wait_until,
};
use pgpilot::config::{Config, NodeId, PoolMode};

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

/// Sessions of `p` queued for a server connection to the primary.
fn queued(p: &Spawned) -> usize {
    p.ctx.pool.stats(NodeId::new(0)).waiting
}

/// The first column of the first row of a simple query.
async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).await.expect(sql);
    let (_, rows) = result_set(&msgs);
    rows[0][0].clone()
}

/// Connect, retrying while the pool is still busy (e.g. resetting a connection).
async fn connect_within(addr: SocketAddr, limit: Duration) -> tokio_postgres::Client {
    let mut client = None;
    wait_until("a session to log in", limit, async || {
        match common::try_connect(addr, "").await {
            Ok(c) => client = Some(c),
            Err(e) => eprintln!("retrying: {e}"),
        }
        client.is_some()
    })
    .await;
    client.expect("logged in")
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

/// Between transactions a session holds no server connection and waits on
/// its client alone: the idle limit and pgpilot's stop still end it, with
/// their own SQLSTATEs, and its connection serves others meanwhile.
#[tokio::test]
async fn a_session_between_transactions_still_times_out_and_stops() {
    let mut cfg = tx_config(1, Duration::from_secs(5));
    cfg.timeouts.client_idle = Duration::from_millis(1000);
    let addr = spawn_proxy(cfg);
    let mut idle = login_raw(addr).await;
    send_query(&mut idle, "SELECT 1").await;
    until_ready(&mut idle).await;
    // Released: another client gets the node's only connection at once.
    let other = connect_within(addr, Duration::from_millis(500)).await;
    assert_eq!(one(&other, "SELECT 2").await, "2");
    let quiet = Instant::now();
    assert_eq!(ended_with(&mut idle, Duration::from_secs(5)).await, "57P05");
    assert!(
        quiet.elapsed() >= Duration::from_millis(900),
        "{:?}",
        quiet.elapsed()
    );

    let p = common::spawn_proxy_stoppable(tx_config(1, Duration::from_secs(5)));
    let mut waiting = login_raw(p.addr).await;
    send_query(&mut waiting, "SELECT 1").await;
    until_ready(&mut waiting).await;
    let stopper = tokio::task::spawn_blocking(move || drop(p));
    assert_eq!(
        ended_with(&mut waiting, Duration::from_secs(2)).await,
        "57P01"
    );
    stopper.await.unwrap();
}

#[tokio::test]
async fn a_transaction_keeps_its_connection_and_others_wait() {
    let p = spawn_proxy_full(tx_config(1, Duration::from_secs(5)));
    let a = connect(p.addr, "").await;
    let b = connect(p.addr, "").await;
    a.simple_query("BEGIN").await.unwrap();
    let in_tx = one(&a, "SELECT pg_backend_pid()").await;
    let waiting = tokio::spawn(async move { one(&b, "SELECT pg_backend_pid()").await });
    wait_until(
        "the other session to queue for the connection",
        Duration::from_secs(30),
        async || queued(&p) == 1,
    )
    .await;
    assert!(
        !waiting.is_finished(),
        "ran while another client's transaction held the connection"
    );
    // Still the same connection inside the transaction.
    assert_eq!(one(&a, "SELECT pg_backend_pid()").await, in_tx);
    a.simple_query("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), in_tx);
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

/// SQL PREPARE pins the session (as other session state does) and, with
/// reads balanced, its statements serve every SQL of the session as on one
/// server, and no other session's.
#[tokio::test]
async fn sql_prepared_statements_serve_the_whole_session_and_no_other() {
    let mut cfg = tx_config(4, Duration::from_secs(5));
    cfg.routing.load_balance = true;
    let addr = spawn_proxy(cfg);
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    let listed = "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements";
    a.simple_query("PREPARE tp_q(int) AS SELECT $1 + 1")
        .await
        .unwrap();
    assert_eq!(one(&a, "EXECUTE tp_q(1)").await, "2");
    // Run by a DO block on the primary, listed, deallocated.
    a.simple_query("DO $$ BEGIN EXECUTE 'EXECUTE tp_q(2)'; END $$")
        .await
        .unwrap();
    assert_eq!(one(&a, listed).await, "tp_q");
    let e = b.simple_query("EXECUTE tp_q(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    let count = "SELECT count(*) FROM pg_prepared_statements";
    assert_eq!(one(&b, count).await, "0");
    a.simple_query("DEALLOCATE tp_q").await.unwrap();
    let e = a.simple_query("EXECUTE tp_q(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
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
        let r = b.simple_query("SELECT pg_sleep(1.5) AS not_a_target").await;
        (b, r)
    });
    let su = superusers().await;
    wait_until("B's query to run", Duration::from_secs(30), async || {
        running(&su, "AS not_a_target").await
    })
    .await;
    a_cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (b, r) = slow.await.unwrap();
    assert!(
        r.is_ok(),
        "another client's cancel stopped this query: {r:?}"
    );
    // A cancel still stops its own client's running query.
    let b_cancel = b.cancel_token();
    let own =
        tokio::spawn(async move { b.simple_query("SELECT pg_sleep(10) AS own_target").await });
    wait_until(
        "B's own query to run",
        Duration::from_secs(30),
        async || running(&su, "AS own_target").await,
    )
    .await;
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
    let p = spawn_proxy_full(tx_config(1, Duration::from_secs(20)));
    // Everyone logs in first (a login uses the connection for a moment).
    let holder = connect(p.addr, "").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(p.addr, "").await);
    }
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    // Four sessions queue for the one connection, each asking once the one
    // before is queued; each holds it for 50 ms once served, so they finish
    // in the order they were served.
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let served = served.clone();
        tasks.push(tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(0.05)").await.unwrap();
            served.lock().unwrap().push(i);
        }));
        wait_until(
            &format!("session {i} to queue"),
            Duration::from_secs(30),
            async || queued(&p) == i + 1,
        )
        .await;
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
    stmt_request(s, "", parse).await
}

/// Like [`unnamed_request`] for the statement `name`.
async fn stmt_request(
    s: &mut tokio::net::TcpStream,
    name: &str,
    parse: Option<&str>,
) -> Result<Vec<String>, String> {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    if let Some(sql) = parse {
        frontend::parse(name, sql, std::iter::empty(), &mut buf).unwrap();
    }
    bind_execute_sync(&mut buf, name);
    s.write_all(&buf).await.unwrap();
    rows_or_error(s).await
}

/// Bind statement `name` (no parameters, text results) to the unnamed portal,
/// Execute it, Sync.
fn bind_execute_sync(buf: &mut bytes::BytesMut, name: &str) {
    bind_execute(buf, name);
    postgres_protocol::message::frontend::sync(buf);
}

/// Bind statement `name` (no parameters, text results) to the unnamed portal
/// and Execute it (no Sync: the batch goes on).
fn bind_execute(buf: &mut bytes::BytesMut, name: &str) {
    use postgres_protocol::message::frontend;
    frontend::bind(
        "",
        name,
        std::iter::empty::<i16>(),
        std::iter::empty::<i32>(),
        |_: i32,
         _: &mut bytes::BytesMut|
         -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!()
        },
        Some(0),
        buf,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::execute("", 0, buf).unwrap();
}

/// A simple Query on a raw socket: first column of each row, or the SQLSTATE.
async fn raw_query(s: &mut tokio::net::TcpStream, sql: &str) -> Result<Vec<String>, String> {
    common::raw::send_query(s, sql).await;
    rows_or_error(s).await
}

/// Read until ReadyForQuery: the first column of each row, or the SQLSTATE of
/// the error.
async fn rows_or_error(s: &mut tokio::net::TcpStream) -> Result<Vec<String>, String> {
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

fn one_row(v: &str) -> Result<Vec<String>, String> {
    Ok(vec![v.to_string()])
}

/// The first part of a batch (a Parse, Bind and Execute of its own, then
/// Flush), answered before the rest is sent: the rest is routed as part of a
/// batch already under way.
async fn first_part_flushed(a: &mut tokio::net::TcpStream) {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    frontend::parse("", "SELECT 'first'", std::iter::empty(), &mut buf).unwrap();
    bind_execute(&mut buf, "");
    frontend::flush(&mut buf);
    a.write_all(&buf).await.unwrap();
    loop {
        let (t, body) = common::raw::read_msg(a).await.unwrap();
        match t {
            b'C' => break,
            b'E' => panic!("first part failed: {}", common::raw::sqlstate_of(&body)),
            _ => {}
        }
    }
}

/// A statement to prepare, its text and what running it returns.
type Prepared<'a> = (&'a str, &'a str, Result<Vec<String>, String>);

/// Create `table`; session A prepares and runs its statements, then B its own
/// (so B's are what the shared connection holds under their names); then B
/// drops the table, so A's statements that read it no longer parse.
async fn prepare_then_drop(
    (a, b): (&mut tokio::net::TcpStream, &mut tokio::net::TcpStream),
    table: &str,
    by_a: &[Prepared<'_>],
    by_b: &[Prepared<'_>],
) {
    let create = format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int)");
    raw_query(a, &create).await.unwrap();
    for (s, stmts) in [(&mut *a, by_a), (&mut *b, by_b)] {
        for (name, sql, rows) in stmts {
            assert_eq!(&stmt_request(s, name, Some(sql)).await, rows, "{name}");
        }
    }
    raw_query(b, &format!("DROP TABLE {table}")).await.unwrap();
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

#[tokio::test]
async fn named_statements_share_connections_and_never_cross_sessions() {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(2)));
    let mut a = common::raw::login_raw(addr).await;
    let mut b = common::raw::login_raw(addr).await;
    let mut c = common::raw::login_raw(addr).await;
    // Same name, different statements, one server connection: B's Parse is
    // not refused (A's is closed first), and each Bind runs its own client's.
    assert_eq!(
        stmt_request(&mut a, "s1", Some("SELECT 'of a'")).await,
        one_row("of a")
    );
    assert_eq!(
        stmt_request(&mut b, "s1", Some("SELECT 'of b'")).await,
        one_row("of b")
    );
    for _ in 0..2 {
        assert_eq!(stmt_request(&mut a, "s1", None).await, one_row("of a"));
        assert_eq!(stmt_request(&mut a, "s1", None).await, one_row("of a"));
        assert_eq!(stmt_request(&mut b, "s1", None).await, one_row("of b"));
    }
    // C never prepared s1: neither its Bind nor an SQL EXECUTE runs B's.
    assert_eq!(
        stmt_request(&mut c, "s1", None).await,
        Err("26000".to_string())
    );
    assert_eq!(stmt_request(&mut b, "s1", None).await, one_row("of b"));
    assert_eq!(
        raw_query(&mut c, "EXECUTE s1").await,
        Err("26000".to_string())
    );
    assert_eq!(stmt_request(&mut b, "s1", None).await, one_row("of b"));
    assert_eq!(
        raw_query(&mut c, "EXPLAIN (COSTS OFF) EXECUTE s1").await,
        Err("26000".to_string())
    );
    // The identical statement is shared: once both clients prepared it, their
    // Binds run the one on the server, never parsed again.
    let prepared_at = async |s: &mut tokio::net::TcpStream| {
        raw_query(
            s,
            "SELECT prepare_time::text FROM pg_prepared_statements WHERE name = 'same'",
        )
        .await
        .unwrap()
    };
    assert_eq!(
        stmt_request(&mut a, "same", Some("SELECT 'same'")).await,
        one_row("same")
    );
    assert_eq!(
        stmt_request(&mut b, "same", Some("SELECT 'same'")).await,
        one_row("same")
    );
    let made = prepared_at(&mut a).await;
    assert_eq!(made.len(), 1);
    for _ in 0..2 {
        assert_eq!(stmt_request(&mut a, "same", None).await, one_row("same"));
        assert_eq!(stmt_request(&mut b, "same", None).await, one_row("same"));
    }
    assert_eq!(prepared_at(&mut b).await, made);
    // C's statement of that name differs: A's Bind parses A's again.
    assert_eq!(
        stmt_request(&mut c, "same", Some("SELECT 'other'")).await,
        one_row("other")
    );
    assert_eq!(stmt_request(&mut a, "same", None).await, one_row("same"));
    let by_a = prepared_at(&mut a).await;
    assert_ne!(by_a, made);
    // A setting makes B's context differ from A's: B parses its own.
    raw_query(&mut b, "SET search_path = public").await.unwrap();
    assert_eq!(stmt_request(&mut b, "same", None).await, one_row("same"));
    assert_ne!(prepared_at(&mut b).await, by_a);
    assert_eq!(stmt_request(&mut b, "s1", None).await, one_row("of b"));
}

#[tokio::test]
async fn a_statement_that_no_longer_parses_fails_without_stalling_the_session() {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(2)));
    let mut a = common::raw::login_raw(addr).await;
    let mut b = common::raw::login_raw(addr).await;
    // B leaves its own "q" and a "zz" on the connection, then drops the table.
    prepare_then_drop(
        (&mut a, &mut b),
        "txpool_gone",
        &[("q", "SELECT x FROM txpool_gone", Ok(vec![]))],
        &[
            ("zz", "SELECT 'zz'", one_row("zz")),
            ("q", "SELECT 'b'", one_row("b")),
        ],
    )
    .await;
    // A's request needs B's "zz" closed and its own "q" parsed again, which
    // now fails: the server's own errors come back, and the session goes on.
    let mut buf = bytes::BytesMut::new();
    frontend::describe(b'S', "zz", &mut buf).unwrap();
    bind_execute_sync(&mut buf, "q");
    a.write_all(&buf).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), rows_or_error(&mut a)).await;
    assert_eq!(
        answer.expect("an answer, not a stall"),
        Err("26000".to_string())
    );
    let answer =
        tokio::time::timeout(Duration::from_secs(10), stmt_request(&mut a, "q", None)).await;
    assert!(answer.expect("an answer, not a stall").is_err());
    assert_eq!(
        raw_query(&mut a, "SELECT 'still here'").await,
        one_row("still here")
    );
    assert_eq!(stmt_request(&mut b, "q", None).await, one_row("b"));
}

/// A batch that arrives in two reads starts on a connection that lacks the
/// session's statements (another session's of the same name are closed); the
/// statement its second part binds is parsed in front of that Bind, and
/// another of the session's statements, which no longer parses, is left alone.
#[tokio::test]
async fn a_batch_split_across_reads_binds_the_sessions_own_statement() {
    use tokio::io::AsyncWriteExt;
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(2)));
    let mut a = common::raw::login_raw(addr).await;
    let mut b = common::raw::login_raw(addr).await;
    prepare_then_drop(
        (&mut a, &mut b),
        "txpool_split",
        &[
            ("gone", "SELECT x FROM txpool_split", Ok(vec![])),
            ("s1", "SELECT 'of a'", one_row("of a")),
        ],
        &[
            ("s1", "SELECT 'of b'", one_row("of b")),
            ("gone", "SELECT 'b gone'", one_row("b gone")),
        ],
    )
    .await;
    // The first part, answered (Flush) before the second is sent.
    first_part_flushed(&mut a).await;
    let mut buf = bytes::BytesMut::new();
    bind_execute_sync(&mut buf, "s1");
    a.write_all(&buf).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), rows_or_error(&mut a)).await;
    assert_eq!(answer.expect("an answer, not a stall"), one_row("of a"));
    // Each session still runs its own.
    assert_eq!(stmt_request(&mut b, "s1", None).await, one_row("of b"));
    assert_eq!(stmt_request(&mut b, "gone", None).await, one_row("b gone"));
    assert_eq!(stmt_request(&mut a, "s1", None).await, one_row("of a"));
    assert!(stmt_request(&mut a, "gone", None).await.is_err());
    assert_eq!(
        raw_query(&mut a, "SELECT 'still here'").await,
        one_row("still here")
    );
}

#[tokio::test]
async fn a_connection_keeps_at_most_max_prepared_statements() {
    let mut cfg = tx_config(1, Duration::from_secs(2));
    cfg.pool.max_prepared_statements = 2;
    let p = common::spawn_proxy_full(cfg);
    let mut a = common::raw::login_raw(p.addr).await;
    for i in 0..5 {
        let sql = format!("SELECT 'v{i}'");
        assert_eq!(
            stmt_request(&mut a, &format!("s{i}"), Some(&sql)).await,
            one_row(&format!("v{i}"))
        );
    }
    // Every statement still runs: the evicted ones are parsed again, unseen.
    for _ in 0..2 {
        for i in 0..5 {
            assert_eq!(
                stmt_request(&mut a, &format!("s{i}"), None).await,
                one_row(&format!("v{i}"))
            );
        }
    }
    // The connection kept at most two: the others were closed to make room.
    let m = common::parse_metrics(&p.ctx.metrics.render(&p.ctx));
    let evicted = m["pgpilot_prepared_statements_total{event=\"evicted\"}"];
    assert!(evicted >= 3.0 + 2.0 * 5.0 - 2.0, "evicted {evicted}");
    // Listing them shows all of the session's, as on one server: the view
    // needs every one of them on the connection it is read on.
    let held = raw_query(&mut a, "SELECT count(*)::text FROM pg_prepared_statements").await;
    assert_eq!(held, one_row("5"));
}

#[test]
fn pgbench_completes_with_more_clients_than_server_connections() {
    let p = common::spawn_proxy_full(tx_config(3, Duration::from_secs(10)));
    let addr = p.addr;
    common::pgbench_at(addr, &["-i", "-s", "1", "-q"]);
    // 8 clients over 3 server connections: only transaction pooling can
    // (extended and prepared: protocol-level statements do not pin a session).
    // Not TPC-B in prepared mode: pgbench prepares each statement with a
    // blocking PQprepare at its first use, inside the client's first
    // transaction, so one thread's client waiting for a connection stops that
    // thread's clients that hold one (through any transaction pooler).
    for mode in ["simple", "extended", "prepared"] {
        let workloads = if mode == "prepared" {
            &[&["-S"][..]][..]
        } else {
            &[&["-S"][..], &[][..]][..]
        };
        for workload in workloads {
            let mut args = vec!["-M", mode, "-c", "8", "-j", "2", "-T", "2"];
            args.extend_from_slice(workload);
            let text = common::pgbench_at(addr, &args);
            assert!(
                text.contains("number of failed transactions: 0 (0.000%)"),
                "pgbench {args:?}:\n{text}"
            );
        }
    }
    // The clients' identical statements were shared, not parsed for each.
    let m = common::parse_metrics(&p.ctx.metrics.render(&p.ctx));
    let reused = m["pgpilot_prepared_statements_total{event=\"reused\"}"];
    let prepared = m["pgpilot_prepared_statements_total{event=\"prepared\"}"];
    assert!(
        reused > 10.0 * prepared.max(1.0),
        "reused {reused}, prepared {prepared}"
    );
}

/// Parse statement `name` as `sql` and Describe it (what drivers do to learn
/// a statement's types), Sync: the SQLSTATE of an error, if any.
async fn parse_describe(
    s: &mut tokio::net::TcpStream,
    name: &str,
    sql: &str,
) -> Result<(), String> {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    frontend::parse(name, sql, std::iter::empty(), &mut buf).unwrap();
    frontend::describe(b'S', name, &mut buf).unwrap();
    frontend::sync(&mut buf);
    s.write_all(&buf).await.unwrap();
    rows_or_error(s).await.map(|_| ())
}

/// Sessions A and B of a transaction-pooling pgpilot with one server
/// connection. A describes and runs its "q" (`b` is an int); B's "q" takes
/// its place on the connection; `b` becomes `real`. A's "q" must be parsed
/// again, and now has another result type.
async fn describe_then_retype(table: &str) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let addr = spawn_proxy(tx_config(1, Duration::from_secs(2)));
    let mut a = common::raw::login_raw(addr).await;
    let mut b = common::raw::login_raw(addr).await;
    let create = format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int, b int); \
         INSERT INTO {table} VALUES (1, 2)"
    );
    raw_query(&mut a, &create).await.unwrap();
    let sql = format!("SELECT b FROM {table}");
    parse_describe(&mut a, "q", &sql).await.unwrap();
    assert_eq!(stmt_request(&mut a, "q", None).await, one_row("2"));
    assert_eq!(
        stmt_request(&mut b, "q", Some("SELECT 'of b'")).await,
        one_row("of b")
    );
    let alter = format!("ALTER TABLE {table} ALTER COLUMN b TYPE real");
    raw_query(&mut b, &alter).await.unwrap();
    (a, b)
}

/// Under transaction pooling, a described statement parsed again on the
/// connection after its table's column changed type fails with 0A000 (as
/// PostgreSQL's own cached statement does) at every use, instead of
/// returning values of another type; parsed again by the client, it runs.
#[tokio::test]
async fn a_described_statement_parsed_again_after_a_type_change_fails_with_0a000() {
    let (mut a, mut b) = describe_then_retype("txpool_retyped").await;
    for _ in 0..2 {
        assert_eq!(
            stmt_request(&mut a, "q", None).await,
            Err("0A000".to_string())
        );
    }
    assert_eq!(raw_query(&mut a, "SELECT 'on'").await, one_row("on"));
    // The client closes and prepares it again: the new result.
    {
        use postgres_protocol::message::frontend;
        use tokio::io::AsyncWriteExt;
        let mut buf = bytes::BytesMut::new();
        frontend::close(b'S', "q", &mut buf).unwrap();
        frontend::sync(&mut buf);
        a.write_all(&buf).await.unwrap();
        rows_or_error(&mut a).await.unwrap();
    }
    parse_describe(&mut a, "q", "SELECT b FROM txpool_retyped")
        .await
        .unwrap();
    assert_eq!(stmt_request(&mut a, "q", None).await, one_row("2"));
    assert_eq!(stmt_request(&mut b, "q", None).await, one_row("of b"));
}

/// The same when the statement is supplied in front of its Bind, in a batch
/// already under way (split across reads): the Bind fails with 0A000 and the
/// rest of the batch is skipped.
#[tokio::test]
async fn a_described_statement_supplied_mid_batch_after_a_type_change_fails_with_0a000() {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let (mut a, mut b) = describe_then_retype("txpool_retyped_split").await;
    first_part_flushed(&mut a).await;
    let mut buf = bytes::BytesMut::new();
    bind_execute(&mut buf, "q");
    frontend::parse("", "SELECT 'skipped'", std::iter::empty(), &mut buf).unwrap();
    bind_execute_sync(&mut buf, "");
    a.write_all(&buf).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), rows_or_error(&mut a)).await;
    assert_eq!(
        answer.expect("an answer, not a stall"),
        Err("0A000".to_string())
    );
    assert_eq!(raw_query(&mut a, "SELECT 'on'").await, one_row("on"));
    assert_eq!(stmt_request(&mut b, "q", None).await, one_row("of b"));
}
