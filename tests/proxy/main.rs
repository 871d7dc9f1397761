//! End-to-end tests of the core proxy against a real primary + 2 standbys.
//! Everything here speaks to pgpilot on loopback: with tokio-postgres, with raw
//! protocol bytes, and with pgbench.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod auth_query;
mod databases;
mod hba;
mod identity;
mod limits;
mod park;

use std::time::{Duration, Instant};

use common::raw::{ended_with, login_raw, read_msg, send_query, sqlstate_of, until_ready};
use common::{
    DB, PASSWORD, USER, connect, harness, pool_status, running, spawn_proxy, spawn_proxy_full,
    sqlstate, superusers, try_connect, wait_until,
};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pgpilot::config::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn select_insert_update_round_trips() {
    let h = harness();
    let c = connect(h.proxy, "").await;
    c.batch_execute("DROP TABLE IF EXISTS rt; CREATE TABLE rt (id int primary key, v text)")
        .await
        .unwrap();
    c.execute("INSERT INTO rt VALUES ($1, $2)", &[&1i32, &"one"])
        .await
        .unwrap();
    let n = c
        .execute("UPDATE rt SET v = 'uno' WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Read it back on the primary (a standby may not have replayed it yet).
    let row = c
        .query_one(
            "/* pgpilot:primary */ SELECT v, current_setting('cluster_name') FROM rt WHERE id = $1",
            &[&1i32],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "uno");
    assert_eq!(row.get::<_, &str>(1), "node0");
    // The writes went to the primary.
    let on_primary = h
        .cluster
        .lock()
        .unwrap()
        .psql_db(0, DB, "SELECT v FROM rt WHERE id = 1");
    assert_eq!(on_primary.unwrap(), "uno");
}

#[tokio::test]
async fn messages_larger_than_the_relay_buffer_get_through() {
    let h = harness();
    let c = connect(h.proxy, "").await;
    // A 3 MiB statement (simple protocol) and a 3 MiB parameter (Bind): each
    // frame is larger than the relay's 1 MiB high-water mark.
    let big = "x".repeat(3 << 20);
    let sql = format!("SELECT length('{big}')");
    let rows = tokio::time::timeout(Duration::from_secs(30), c.simple_query(&sql))
        .await
        .expect("a 3 MiB query is relayed, not stalled")
        .unwrap();
    assert_eq!(common::result_set(&rows).1[0][0], (3 << 20).to_string());
    let n: i32 = tokio::time::timeout(
        Duration::from_secs(30),
        c.query_one("SELECT length($1::text)", &[&big]),
    )
    .await
    .expect("a 3 MiB parameter is relayed, not stalled")
    .unwrap()
    .get(0);
    assert_eq!(n, 3 << 20);
}

#[tokio::test]
async fn multi_statement_simple_query() {
    let h = harness();
    let c = connect(h.proxy, "").await;
    let msgs = c
        .simple_query("SELECT 1 AS a; SELECT 'x' AS b, 2 AS c; SELECT generate_series(1,3)")
        .await
        .unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["1", "x", "1", "2", "3"]);
    // An error in the middle stops the rest, and the session stays usable.
    let e = c
        .simple_query("SELECT 1; SELECT 1/0; SELECT 2")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    assert_eq!(
        c.query_one("SELECT 41 + 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
}

#[tokio::test]
async fn extended_protocol_named_statements_portals_and_pipelining() {
    let h = harness();
    let mut c = connect(h.proxy, "").await;
    // Named prepared statement, executed several times.
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    for i in 0..5i32 {
        let v: i32 = c.query_one(&stmt, &[&i]).await.unwrap().get(0);
        assert_eq!(v, i * 2);
    }
    // A portal fetched in chunks inside a transaction.
    let tx = c.transaction().await.unwrap();
    let s = tx.prepare("SELECT generate_series(1, 25)").await.unwrap();
    let portal = tx.bind(&s, &[]).await.unwrap();
    let mut seen = 0;
    loop {
        let rows = tx.query_portal(&portal, 10).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen += rows.len();
    }
    assert_eq!(seen, 25);
    tx.commit().await.unwrap();
    // A pipelined batch: all requests are written before any result is read.
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query_one("SELECT $1::text", &[&"two"]),
        c.query("SELECT generate_series(1, 100)", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(b.unwrap().get::<_, &str>(0), "two");
    assert_eq!(d.unwrap().len(), 100);
    // An error inside a pipeline fails that request only.
    let (ok, bad, ok2) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query_one("SELECT * FROM no_such_table", &[]),
        c.query_one("SELECT 3::int", &[]),
    );
    assert!(ok.is_ok() && ok2.is_ok());
    assert_eq!(sqlstate(&bad.unwrap_err()).as_deref(), Some("42P01"));
}

#[tokio::test]
async fn copy_in_and_out_100k_rows() {
    let h = harness();
    let c = connect(h.proxy, "").await;
    c.batch_execute("DROP TABLE IF EXISTS copyt; CREATE TABLE copyt (id int, t text)")
        .await
        .unwrap();
    let mut data = String::new();
    for i in 0..100_000 {
        data.push_str(&format!("{i}\trow number {i} \\\\ tab\\there\n"));
    }
    let sink = c.copy_in("COPY copyt FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(64 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 100_000);
    let out: Vec<bytes::Bytes> = c
        .copy_out("/* pgpilot:primary */ COPY (SELECT * FROM copyt ORDER BY id) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let out: Vec<u8> = out.concat();
    assert_eq!(out.len(), data.len());
    assert!(out == data.as_bytes(), "COPY OUT differs from what went in");
}

#[tokio::test]
async fn notices_and_notifications_are_delivered() {
    let h = harness();
    let (client, mut conn) = tokio_postgres::connect(
        &common::Harness::conninfo(h.proxy, ""),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            let _ = tx.send(m);
        }
    });
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        .await
        .unwrap();
    client.batch_execute("LISTEN pgpilot_chan").await.unwrap();
    let other = connect(h.proxy, "").await;
    other
        .batch_execute("NOTIFY pgpilot_chan, 'payload-1'")
        .await
        .unwrap();
    let mut got_notice = false;
    let mut got_notification = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(got_notice && got_notification) && Instant::now() < deadline {
        // Notifications arrive asynchronously; a query nudges the connection.
        let m = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        match m {
            Ok(Some(tokio_postgres::AsyncMessage::Notice(n))) => {
                got_notice |= n.message() == "hello from the server";
            }
            Ok(Some(tokio_postgres::AsyncMessage::Notification(n))) => {
                got_notification |= n.channel() == "pgpilot_chan" && n.payload() == "payload-1";
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                client.batch_execute("SELECT 1").await.unwrap();
            }
        }
    }
    assert!(got_notice, "NOTICE not delivered");
    assert!(got_notification, "NOTIFY not delivered");
}

#[tokio::test]
async fn cancel_request_reaches_the_server() {
    let h = harness();
    let c = connect(h.proxy, "").await;
    let token = c.cancel_token();
    let su = superusers().await;
    let canceller = async {
        wait_until(
            "the query to cancel to run",
            Duration::from_secs(30),
            async || running(&su, "AS cancel_me").await,
        )
        .await;
        let sent = Instant::now();
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        sent
    };
    let (r, sent) = tokio::join!(c.query("SELECT pg_sleep(10) AS cancel_me", &[]), canceller);
    let e = r.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(
        sent.elapsed() < Duration::from_millis(1000),
        "cancel took {:?}",
        sent.elapsed()
    );
    // The session is still usable after the cancel.
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
}

#[tokio::test]
async fn malformed_input_is_rejected_while_others_keep_working() {
    let h = harness();
    let survivor = connect(h.proxy, "").await;
    // 1. A startup packet with a nonsense length.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    let (t, body) = read_msg(&mut s).await.unwrap();
    assert_eq!(t, b'E');
    assert_eq!(sqlstate_of(&body), "08P01");
    // 2. A truncated parameter list.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let mut pkt = vec![];
    pkt.extend_from_slice(&196608i32.to_be_bytes());
    pkt.extend_from_slice(b"user\0app");
    let mut framed = ((pkt.len() + 4) as i32).to_be_bytes().to_vec();
    framed.extend(pkt);
    s.write_all(&framed).await.unwrap();
    let (t, body) = read_msg(&mut s).await.unwrap();
    assert_eq!((t, sqlstate_of(&body).as_str()), (b'E', "08P01"));
    // 3. Protocol 2.0 is refused with a clear error.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let mut v2 = 8i32.to_be_bytes().to_vec();
    v2.extend_from_slice(&(2i32 << 16).to_be_bytes());
    s.write_all(&v2).await.unwrap();
    let (t, body) = read_msg(&mut s).await.unwrap();
    assert_eq!((t, sqlstate_of(&body).as_str()), (b'E', "0A000"));
    // 4. A logged-in client announcing a 2 GiB message.
    let mut s = login_raw(h.proxy).await;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    let (t, body) = loop {
        let m = read_msg(&mut s).await.unwrap();
        if m.0 == b'E' {
            break m;
        }
    };
    assert_eq!((t, sqlstate_of(&body).as_str()), (b'E', "08P01"));
    let mut rest = vec![];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("connection closed after the error")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // 5. An unknown message type after login.
    let mut s = login_raw(h.proxy).await;
    s.write_all(&[b'?', 0, 0, 0, 4]).await.unwrap();
    let (t, body) = read_msg(&mut s).await.unwrap();
    assert_eq!((t, sqlstate_of(&body).as_str()), (b'E', "08P01"));
    // 6. A Query (and a Parse) with an empty body: an error from the node, no
    // panic, and the proxy keeps serving.
    for bad in [[b'Q', 0, 0, 0, 4], [b'P', 0, 0, 0, 4]] {
        let mut s = login_raw(h.proxy).await;
        s.write_all(&bad).await.unwrap();
        if bad[0] == b'P' {
            s.write_all(&[b'S', 0, 0, 0, 4]).await.unwrap();
        }
        let (t, body) = tokio::time::timeout(Duration::from_secs(5), read_msg(&mut s))
            .await
            .expect("an answer, not a hang")
            .unwrap();
        assert_eq!(t, b'E', "{:?}", String::from_utf8_lossy(&body));
        assert_eq!(sqlstate_of(&body), "08P01");
    }
    // 7. SSLRequest is answered 'N' and the client may go on in the clear.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'N');
    // Meanwhile the other client was never disturbed.
    let v: i32 = survivor.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
}

#[tokio::test]
async fn backend_connection_is_reused_across_sessions() {
    let h = harness();
    // A dedicated application_name gives this test its own pool key.
    let extra = "application_name=reuse_test";
    let c1 = connect(h.proxy, extra).await;
    c1.batch_execute("SET work_mem = '7MB'").await.unwrap();
    let pid1: i32 = c1
        .query_one("/* pgpilot:primary */ SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(c1);
    let admin = connect(h.proxy, "").await;
    wait_until(
        "the server connection back in the pool",
        Duration::from_secs(30),
        async || pool_status(&admin, pid1).await.as_deref() == Some("idle"),
    )
    .await;
    let c2 = connect(h.proxy, extra).await;
    let pid2: i32 = c2
        .query_one("/* pgpilot:primary */ SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid1, pid2, "the pooled server connection was not reused");
    // ... and it was reset: the previous session's SET is gone, startup parameters stay.
    let wm: String = c2.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "4MB");
    let app: String = c2
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "reuse_test");
}

#[tokio::test]
async fn startup_parameters_reach_the_server() {
    let h = harness();
    let c = connect(
        h.proxy,
        "application_name=pilot_params options='-c search_path=custom_path -c statement_timeout=4321'",
    )
    .await;
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path'), current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "pilot_params");
    assert_eq!(row.get::<_, &str>(1), "custom_path");
    assert_eq!(row.get::<_, &str>(2), "4321ms");
}

#[tokio::test]
async fn pool_exhaustion_gives_53300_after_the_wait() {
    let h = harness();
    let mut cfg = h.config();
    cfg.pool.max_connections_per_node = 2;
    cfg.pool.acquire_timeout = Duration::from_millis(800);
    let p = spawn_proxy_full(cfg);
    let addr = p.addr;
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    let started = Instant::now();
    let e = match try_connect(addr, "").await {
        Ok(_) => panic!("third session must not get a connection"),
        Err(e) => e,
    };
    let waited = started.elapsed();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    assert!(
        waited >= Duration::from_millis(700),
        "failed too early: {waited:?}"
    );
    // Once a session ends, its connection serves the next one.
    drop(a);
    wait_until(
        "the first session to end and free its connection",
        Duration::from_secs(30),
        async || {
            let pool = &p.ctx.pool;
            p.ctx.sessions.len() == 1
                && (0..pool.nodes()).all(|n| {
                    let st = pool.stats(NodeId::new(n));
                    st.open - st.idle <= 1
                })
        },
    )
    .await;
    let c = connect(addr, "").await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    drop(b);
}

#[tokio::test]
async fn without_a_primary_an_admin_logs_in_and_only_its_request_fails() {
    // pgpilot in front of a single node that is not there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let mut cfg = harness().config();
    cfg.backends.truncate(1);
    cfg.backends[0].port = port;
    cfg.pool.acquire_timeout = Duration::from_millis(500);
    let addr = spawn_proxy(cfg);
    let admin = tokio::time::timeout(Duration::from_secs(5), connect(addr, ""))
        .await
        .expect("an admin logs in without a primary");
    let (_, nodes) = common::show(&admin, "SHOW POOL_NODES").await;
    assert_eq!(nodes.len(), 1);
    // A statement that needs a server fails after the wait, as an error: the
    // session holds no connection, so it goes on.
    for _ in 0..2 {
        let e = admin.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
        let e = admin.query("SELECT $1::int", &[&1i32]).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    }
    let (_, nodes) = common::show(&admin, "SHOW POOL_NODES").await;
    assert_eq!(nodes.len(), 1);
}

#[tokio::test]
async fn client_limit_gives_53300() {
    let h = harness();
    let mut cfg = h.config();
    cfg.max_client_conn = 2;
    let addr = spawn_proxy(cfg);
    let _a = connect(addr, "").await;
    let _b = connect(addr, "").await;
    let e = match try_connect(addr, "").await {
        Ok(_) => panic!("third client refused"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
}

#[tokio::test]
async fn client_vanishing_mid_transaction_never_pools_a_dirty_connection() {
    let h = harness();
    let c = connect(h.proxy, "").await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS vanish (v int)")
        .await
        .unwrap();
    // A raw client (same pool key for all raw logins) opens a transaction, writes,
    // starts a long query, and vanishes without Terminate.
    let mut s = login_raw(h.proxy).await;
    send_query(
        &mut s,
        "BEGIN; INSERT INTO vanish VALUES (1); SELECT pg_backend_pid()",
    )
    .await;
    let pid: i32 = until_ready(&mut s).await[0].parse().unwrap();
    send_query(&mut s, "SELECT pg_sleep(30)").await;
    let sleeping = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND state = 'active' \
         AND query = 'SELECT pg_sleep(30)'"
    );
    wait_until(
        "the long query to run",
        Duration::from_secs(30),
        async || h.psql(0, &sleeping) == "1",
    )
    .await;
    drop(s);
    // The server process goes away (cancelled and closed), and nothing was committed.
    let alive = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    wait_until(
        &format!("server process {pid} to exit"),
        Duration::from_secs(30),
        async || h.psql(0, &alive) == "0",
    )
    .await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM vanish", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // A client vanishing while idle inside a transaction: its connection is not reused
    // (a new raw session must not inherit the open transaction).
    let mut s = login_raw(h.proxy).await;
    send_query(
        &mut s,
        "BEGIN; INSERT INTO vanish VALUES (2); SELECT pg_backend_pid()",
    )
    .await;
    let pid2: i32 = until_ready(&mut s).await[0].parse().unwrap();
    drop(s);
    // pgpilot noticed: the connection is closed or its transaction rolled back.
    let in_tx = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid2} AND state = 'idle in transaction'"
    );
    wait_until(
        &format!("server process {pid2} to leave its transaction"),
        Duration::from_secs(30),
        async || h.psql(0, &in_tx) == "0",
    )
    .await;
    let mut s = login_raw(h.proxy).await;
    send_query(
        &mut s,
        "SELECT pg_backend_pid()::text || ':' || (now() = statement_timestamp())::text",
    )
    .await;
    let v = until_ready(&mut s).await;
    assert_ne!(
        v[0],
        format!("{pid2}:false"),
        "new session inherited an open transaction"
    );
    assert!(v[0].ends_with(":true"), "{v:?}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM vanish", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn server_dying_mid_session_gives_an_error_not_a_hang() {
    let h = harness();
    let c = connect(h.proxy, "application_name=dying_test").await;
    let pid: i32 = c
        .query_one("/* pgpilot:primary */ SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    h.psql(0, &format!("SELECT pg_terminate_backend({pid})"));
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.query_one("/* pgpilot:primary */ SELECT 1", &[]),
    )
    .await;
    let e = r.expect("no hang").unwrap_err();
    // Either the server's own FATAL 57P01 or pgpilot's 08006, never silence.
    assert!(e.as_db_error().is_some() || e.is_closed(), "{e}");
    // The proxy still serves new sessions.
    let c2 = connect(h.proxy, "").await;
    assert_eq!(
        c2.query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

fn pgbench(args: &[&str]) -> String {
    common::pgbench_at(harness().proxy, args)
}

#[test]
fn pgbench_all_protocols_complete_without_failures() {
    pgbench(&["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        for workload in [&["-S"][..], &[][..]] {
            let mut args = vec!["-M", mode, "-c", "4", "-j", "2", "-T", "2"];
            args.extend_from_slice(workload);
            let text = pgbench(&args);
            assert!(
                text.contains("number of failed transactions: 0 (0.000%)"),
                "pgbench {args:?}:\n{text}"
            );
            let tps_line = text.lines().find(|l| l.starts_with("tps")).unwrap_or("");
            eprintln!("pgbench -M {mode} {workload:?}: {tps_line}");
        }
    }
}

/// The kinds of a login's messages, notices as `N:<SQLSTATE>`, parameter
/// statuses as one `S` (their order among themselves is not the point).
fn login_shape(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    let mut shape: Vec<String> = Vec::new();
    for (t, body) in msgs {
        let kind = match t {
            b'N' => format!("N:{}", common::raw::sqlstate_of(body)),
            t => (*t as char).to_string(),
        };
        if shape.last() != Some(&kind) || kind != "S" {
            shape.push(kind);
        }
    }
    shape
}

/// A NoticeResponse PostgreSQL sends while a connection starts (here the
/// truncation of a 70-byte application_name) reaches the client at its
/// login, where a direct login has it, also when the server connection
/// comes from the pool.
#[tokio::test]
async fn startup_notices_reach_the_client() {
    let h = harness();
    let app = format!("startup_notice_{}", "x".repeat(56));
    let params = [("application_name", app.as_str())];
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], h.ports[0]));
    let (_, direct) = common::raw::login_raw_with(direct_addr, &params).await;
    let direct = login_shape(&direct);
    assert!(direct.contains(&"N:42622".to_string()), "{direct:?}");
    let pid_sql = "/* pgpilot:primary */ SELECT pg_backend_pid()";
    let (mut s, first) = common::raw::login_raw_with(h.proxy, &params).await;
    assert_eq!(login_shape(&first), direct);
    common::raw::send_query(&mut s, pid_sql).await;
    let pid = common::raw::until_ready(&mut s).await;
    drop(s);
    // Log in again until the same server connection serves the login (it is
    // given back to the pool when the first session ends).
    wait_until(
        "the pooled connection to serve a login",
        Duration::from_secs(30),
        async || {
            let (mut s, again) = common::raw::login_raw_with(h.proxy, &params).await;
            assert_eq!(login_shape(&again), direct);
            common::raw::send_query(&mut s, pid_sql).await;
            common::raw::until_ready(&mut s).await == pid
        },
    )
    .await;
}
