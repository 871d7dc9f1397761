//! Acceptance tests of read/write routing, against a real primary and two
//! streaming hot standbys through pgpilot.
//!
//! How a test knows which node ran a statement:
//! * the statement reports it: `current_setting('cluster_name')` (`node0` is the
//!   primary, `node1`/`node2` the standbys), `inet_server_port()`,
//!   `pg_is_in_recovery()`, `SHOW cluster_name`, `RETURNING …` of a write, or a
//!   function of the test that returns `current_setting('cluster_name')`;
//! * or `pg_stat_activity` on each node, read over direct connections: every
//!   session of these tests sets a unique `application_name` (replayed by pgpilot
//!   on each of its server connections), and the node whose backend for that name
//!   last ran exactly the statement's text is the node that ran it. This also
//!   covers statements that report nothing or fail on every node.
//!
//! A write that reached a standby would fail there with SQLSTATE 25006 ("cannot
//! execute … in a read-only transaction" / "during recovery"): every write below
//! also has to succeed, or fail with the primary's own error.
//!
//! Sections follow the routing issue: 1. classifier rules, 2. transactions,
//! 3. session consistency, 4. choosing the standby, 5. the randomised
//! classifier test (`random_sql_never_panics_and_write_starts_are_write` in
//! `src/router/classify_tests.rs`), 6. a randomised mixed workload.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    DB, PASSWORD, Spawned, USER, connect, harness, nodes_in_service, spawn_proxy_full, sqlstate,
};
use futures_util::{SinkExt, TryStreamExt};
use pgpilot::config::Config;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const PRIMARY: &str = "node0";
/// The node reporting itself.
const WHERE: &str = "current_setting('cluster_name')";

// ---------------------------------------------------------------------------
// Harness helpers
// ---------------------------------------------------------------------------

/// A pgpilot with `cfg`, in service.
async fn proxy_with(cfg: Config) -> SocketAddr {
    let p = spawn_proxy_full(cfg);
    nodes_in_service(&p).await;
    p.addr
}

/// The config the routing tests start from: the default `[routing]`, except
/// that a read after a write waits longer for the session's own standby to
/// replay it (instead of moving to the other standby or the primary), so
/// which node serves a read does not depend on replay timing on a loaded
/// machine. (Read-your-writes itself is tested in tests/consistency.rs.)
fn routing_config() -> Config {
    let mut cfg = harness().config();
    cfg.routing.consistency_wait = std::time::Duration::from_secs(3);
    cfg
}

/// This binary's pgpilot with the default `[routing]`.
async fn proxy() -> SocketAddr {
    static PROXY: OnceLock<Spawned> = OnceLock::new();
    let p = PROXY.get_or_init(|| spawn_proxy_full(routing_config()));
    nodes_in_service(p).await;
    p.addr
}

/// Direct connections to every node (no pgpilot): the superuser, for
/// `pg_stat_activity`, and the application role on the primary, for setup.
struct Nodes {
    su: Vec<Client>,
    app: Client,
}

async fn direct(port: u16, user: &str) -> Client {
    let info = format!(
        "host=127.0.0.1 port={port} user={user} password={PASSWORD} dbname={DB} connect_timeout=10"
    );
    let (c, conn) = tokio_postgres::connect(&info, NoTls)
        .await
        .expect("direct connection to a node");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

async fn nodes() -> Nodes {
    let h = harness();
    let mut su = Vec::new();
    for &port in &h.ports {
        su.push(direct(port, "postgres").await);
    }
    Nodes {
        su,
        app: direct(h.ports[0], USER).await,
    }
}

impl Nodes {
    /// Run `sql` on the primary as the application role (objects are then owned
    /// by it) and wait until both standbys have replayed it.
    async fn setup(&self, sql: &str) {
        self.app
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("setup {sql}: {e}"));
        self.wait_replayed().await;
    }

    async fn wait_replayed(&self) {
        let lsn: String = self.su[0]
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &self.su[1..] {
            loop {
                let done: bool = s
                    .query_one(
                        "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                        &[&lsn],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if done {
                    break;
                }
                assert!(Instant::now() < deadline, "standby did not replay {lsn}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The nodes on which a backend of the session named `app` last ran exactly `sql`.
    async fn ran(&self, app: &str, sql: &str) -> Vec<usize> {
        let mut on = Vec::new();
        for (i, c) in self.su.iter().enumerate() {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = $1 AND query = $2",
                    &[&app, &sql],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                on.push(i);
            }
        }
        on
    }
}

/// Where a statement must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Primary,
    Standby,
}

/// A client session through pgpilot with a unique `application_name`.
struct Sess {
    c: Client,
    app: String,
}

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

async fn sess(addr: SocketAddr, tag: &str) -> Sess {
    let app = format!("rt_{tag}_{}", SESSIONS.fetch_add(1, Ordering::Relaxed));
    let c = connect(addr, "").await;
    c.batch_execute(&format!("SET application_name = '{app}'"))
        .await
        .unwrap();
    Sess { c, app }
}

/// The first column of the first row in a simple-query answer.
fn first(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
        _ => None,
    })
}

/// Every first-column value of a simple-query answer.
fn column(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

fn is_standby(node: &str) -> bool {
    node == "node1" || node == "node2"
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

impl Sess {
    /// First value of `sql`'s first row; panics on error.
    async fn one(&self, sql: &str) -> String {
        let msgs = self
            .c
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        first(&msgs).unwrap_or_else(|| panic!("{sql}: no row"))
    }

    /// The node running this session's plain reads.
    async fn read_node(&self) -> String {
        self.one(&format!("SELECT {WHERE}")).await
    }

    /// Run `sql` over the simple protocol; check it succeeded (`code` = None) or
    /// failed with SQLSTATE `code`, and that it ran on `on` (per pg_stat_activity).
    /// Returns the first value of the first row, if any.
    async fn expect(&self, n: &Nodes, sql: &str, code: Option<&str>, on: On) -> Option<String> {
        let value = match (self.c.simple_query(sql).await, code) {
            (Ok(msgs), None) => first(&msgs),
            (Ok(_), Some(code)) => panic!("{sql}: succeeded, expected {code}"),
            (Err(e), None) => panic!("{sql}: {}", describe(&e)),
            (Err(e), Some(code)) => {
                assert_eq!(
                    sqlstate(&e).as_deref(),
                    Some(code),
                    "{sql}: {}",
                    describe(&e)
                );
                None
            }
        };
        self.assert_ran(n, sql, on).await;
        value
    }

    /// Check `sql` was last run on `on`, and return that node's index.
    async fn assert_ran(&self, n: &Nodes, sql: &str, on: On) -> usize {
        let ran = n.ran(&self.app, sql).await;
        match (on, ran.as_slice()) {
            (On::Primary, [0]) => 0,
            (On::Standby, [s]) if *s > 0 => *s,
            _ => panic!("{sql}: expected on the {on:?}, ran on nodes {ran:?}"),
        }
    }
}

/// A raw protocol client: sees ReadyForQuery status bytes, sends batches of
/// several statements before one Sync.
struct Raw {
    s: TcpStream,
}

/// What came back for one request, up to its ReadyForQuery.
#[derive(Debug, Default)]
struct Reply {
    /// First-column value of every DataRow.
    values: Vec<String>,
    /// SQLSTATEs of ErrorResponses.
    errors: Vec<String>,
    /// The ReadyForQuery status byte.
    status: char,
}

impl Raw {
    async fn login(addr: SocketAddr) -> Raw {
        Raw {
            s: common::raw::login_raw(addr).await,
        }
    }

    async fn until_ready(&mut self) -> Reply {
        let mut r = Reply::default();
        loop {
            let (t, body) = read_msg(&mut self.s).await;
            match t {
                b'D' => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    let v = if len < 0 {
                        "NULL".to_string()
                    } else {
                        String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                    };
                    r.values.push(v);
                }
                b'E' => r
                    .errors
                    .push(pgpilot::protocol::frame::ErrorFields::parse(&body).code),
                b'Z' => {
                    r.status = body[0] as char;
                    return r;
                }
                _ => {}
            }
        }
    }

    /// One simple Query.
    async fn query(&mut self, sql: &str) -> Reply {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut buf).unwrap();
        self.s.write_all(&buf).await.unwrap();
        self.until_ready().await
    }

    /// One extended-protocol batch: Parse/Bind/Execute of each statement, one Sync.
    async fn batch(&mut self, sqls: &[&str]) -> Reply {
        let mut buf = bytes::BytesMut::new();
        for sql in sqls {
            parse_bind_execute(sql, &mut buf);
        }
        postgres_protocol::message::frontend::sync(&mut buf);
        self.s.write_all(&buf).await.unwrap();
        self.until_ready().await
    }
}

/// Parse, Bind and Execute of `sql` (unnamed statement and portal, no parameters).
fn parse_bind_execute(sql: &str, buf: &mut bytes::BytesMut) {
    use postgres_protocol::message::frontend;
    frontend::parse("", sql, std::iter::empty(), buf).unwrap();
    frontend::bind(
        "",
        "",
        std::iter::empty(),
        std::iter::empty::<Option<&[u8]>>(),
        |_, _| Ok(postgres_protocol::IsNull::Yes),
        std::iter::empty(),
        buf,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::execute("", 0, buf).unwrap();
}

/// One message, within 20 s.
async fn read_msg(s: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(20), common::raw::read_msg(s))
        .await
        .expect("an answer in time")
        .expect("a message")
}

// ---------------------------------------------------------------------------
// 1. Classifier rules, through pgpilot
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dml_ddl_copy_from_call_and_do_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE TABLE w_t (id int PRIMARY KEY, v text);
         CREATE TABLE w_copy (id int, v text);
         CREATE SEQUENCE w_seq;
         CREATE PROCEDURE w_proc(i int) LANGUAGE sql AS $$ INSERT INTO w_t VALUES (i, 'call') $$",
    )
    .await;
    let s = sess(addr, "dml").await;
    // The session has a standby for its reads: writes must still avoid it.
    assert!(is_standby(&s.read_node().await));
    let p = Some(PRIMARY.to_string());
    let ins = format!("INSERT INTO w_t VALUES (1, 'a') RETURNING {WHERE}");
    assert_eq!(s.expect(&n, &ins, None, On::Primary).await, p);
    let upd = format!("UPDATE w_t SET v = 'b' WHERE id = 1 RETURNING {WHERE}");
    assert_eq!(s.expect(&n, &upd, None, On::Primary).await, p);
    let merge = "MERGE INTO w_t USING (VALUES (2, 'm')) AS s(id, v) ON w_t.id = s.id \
                 WHEN MATCHED THEN UPDATE SET v = s.v \
                 WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)";
    s.expect(&n, merge, None, On::Primary).await;
    let del = "DELETE FROM w_t WHERE id = 2 RETURNING inet_server_port()";
    let port = s.expect(&n, del, None, On::Primary).await.unwrap();
    assert_eq!(port, harness().ports[0].to_string());
    for sql in [
        "CALL w_proc(3)",
        "DO $$ BEGIN INSERT INTO w_t VALUES (4, 'do'); END $$",
        "TRUNCATE w_copy",
        // DDL of every common kind.
        "CREATE TABLE w_ddl (a int)",
        "ALTER TABLE w_ddl ADD COLUMN b text",
        "CREATE INDEX w_ddl_a ON w_ddl (a)",
        "CREATE VIEW w_view AS SELECT a FROM w_ddl",
        "COMMENT ON TABLE w_ddl IS 'routing test'",
        "GRANT SELECT ON w_ddl TO PUBLIC",
        "REVOKE SELECT ON w_ddl FROM PUBLIC",
        "CREATE SCHEMA w_schema",
        "CREATE FUNCTION w_schema.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER FUNCTION w_schema.f() STABLE",
        "CREATE TYPE w_mood AS ENUM ('ok', 'meh')",
        "ALTER SEQUENCE w_seq RESTART WITH 10",
        "CREATE MATERIALIZED VIEW w_mv AS SELECT 1 AS one",
        "DROP VIEW w_view",
        "DROP TABLE w_ddl",
        "DROP SCHEMA w_schema CASCADE",
    ] {
        s.expect(&n, sql, None, On::Primary).await;
    }
    // Data-modifying statements behind a read-looking start.
    let with_insert =
        format!("WITH x AS (SELECT 5 AS id) INSERT INTO w_t SELECT id, {WHERE} FROM x RETURNING v");
    assert_eq!(s.expect(&n, &with_insert, None, On::Primary).await, p);
    let with_update = format!(
        "WITH x AS (SELECT 5 AS id) UPDATE w_t SET v = {WHERE} FROM x WHERE w_t.id = x.id RETURNING v"
    );
    assert_eq!(s.expect(&n, &with_update, None, On::Primary).await, p);
    let with_delete = "WITH x AS (SELECT 5 AS id) DELETE FROM w_t USING x WHERE w_t.id = x.id";
    s.expect(&n, with_delete, None, On::Primary).await;
    let values = format!("VALUES ({WHERE}, nextval('w_seq'))");
    assert_eq!(s.expect(&n, &values, None, On::Primary).await, p);
    // COPY of a data-modifying query, or of one calling a write function.
    for (copy, want) in [
        (
            format!("COPY (INSERT INTO w_t VALUES (6, 'copy') RETURNING {WHERE}) TO STDOUT"),
            "node0\n",
        ),
        (
            format!("COPY (SELECT {WHERE} WHERE nextval('w_seq') > 0) TO STDOUT"),
            "node0\n",
        ),
    ] {
        let out: Vec<bytes::Bytes> =
            s.c.copy_out(&copy)
                .await
                .unwrap_or_else(|e| panic!("{copy}: {}", describe(&e)))
                .try_collect()
                .await
                .unwrap();
        assert_eq!(out.concat(), want.as_bytes(), "{copy}");
    }
    // COPY … FROM STDIN (extended protocol, then COPY data).
    let copy = "COPY w_copy FROM STDIN";
    let sink = s.c.copy_in(copy).await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tx\n2\ty\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    s.assert_ran(&n, copy, On::Primary).await;
    let row = n
        .app
        .query_one(
            "SELECT (SELECT count(*) FROM w_copy), (SELECT string_agg(v, ',' ORDER BY id) FROM w_t)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, &str>(1), "b,call,do,copy");
    // The session still reads on its standby.
    assert!(is_standby(&s.read_node().await));
}

#[tokio::test]
async fn maintenance_lock_notify_cursors_and_two_phase_commit_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE TABLE m_t (id int PRIMARY KEY, v text);
         INSERT INTO m_t VALUES (1, 'a');
         CREATE MATERIALIZED VIEW m_mv AS SELECT count(*) FROM m_t",
    )
    .await;
    // CHECKPOINT needs pg_checkpoint (PostgreSQL 15+); a standby would run it too
    // (as a restartpoint), so only pg_stat_activity tells where it ran.
    n.su[0]
        .batch_execute("GRANT pg_checkpoint TO app")
        .await
        .unwrap();
    let s = sess(addr, "maint").await;
    assert!(is_standby(&s.read_node().await));
    for sql in [
        "VACUUM m_t",
        "ANALYZE m_t",
        "VACUUM (ANALYZE) m_t",
        "CLUSTER m_t USING m_t_pkey",
        "REINDEX TABLE m_t",
        "REFRESH MATERIALIZED VIEW m_mv",
        "CHECKPOINT",
        "NOTIFY m_chan, 'x'",
        "UNLISTEN m_chan",
        "UNLISTEN *",
    ] {
        s.expect(&n, sql, None, On::Primary).await;
    }
    // Outside a transaction these fail, with the primary's error (a standby
    // would also fail, but ran() shows where).
    s.expect(
        &n,
        "LOCK TABLE m_t IN SHARE MODE",
        Some("25P01"),
        On::Primary,
    )
    .await;
    s.expect(
        &n,
        "DECLARE m_c CURSOR FOR SELECT 1",
        Some("25P01"),
        On::Primary,
    )
    .await;
    s.expect(&n, "FETCH 1 FROM m_none", Some("34000"), On::Primary)
        .await;
    s.expect(&n, "CLOSE m_none", Some("34000"), On::Primary)
        .await;
    // Two-phase commit. The harness cluster has max_prepared_transactions = 0,
    // so PREPARE TRANSACTION fails with the primary's "prepared transactions
    // are disabled" (a standby says 25006 "during recovery").
    let two_phase: i32 = n.su[0]
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    s.expect(&n, "BEGIN", None, On::Primary).await;
    s.expect(&n, "INSERT INTO m_t VALUES (2, '2pc')", None, On::Primary)
        .await;
    let prep = "PREPARE TRANSACTION 'm_gid'";
    if two_phase > 0 {
        s.expect(&n, prep, None, On::Primary).await;
        s.expect(&n, "COMMIT PREPARED 'm_gid'", None, On::Primary)
            .await;
    } else {
        s.expect(&n, prep, Some("55000"), On::Primary).await;
        s.expect(&n, "COMMIT PREPARED 'm_gid'", Some("42704"), On::Primary)
            .await;
        s.expect(&n, "ROLLBACK PREPARED 'm_gid'", Some("42704"), On::Primary)
            .await;
        // Outside a transaction: a warning on the primary, 25006 on a standby.
        s.expect(&n, prep, None, On::Primary).await;
    }
    // Reads are still balanced: none of this made the session sticky.
    assert!(is_standby(&s.read_node().await));
    // LISTEN needs the primary (and keeps the session there).
    s.expect(&n, "LISTEN m_chan", None, On::Primary).await;
    assert_eq!(s.read_node().await, PRIMARY);
}

#[tokio::test]
async fn cursors_with_hold_stay_on_the_primary_even_when_hinted_to_a_standby() {
    let addr = proxy().await;
    let n = nodes().await;
    let s = sess(addr, "cursor").await;
    let declare =
        format!("DECLARE c_hold CURSOR WITH HOLD FOR SELECT {WHERE} FROM generate_series(1, 3)");
    s.expect(&n, &declare, None, On::Primary).await;
    // A standby hint moves reads only: FETCH and CLOSE are not reads, so they stay
    // with the cursor (on a standby they would fail with 34000).
    let fetch = "/* pgpilot:standby */ FETCH 1 FROM c_hold";
    assert_eq!(
        s.expect(&n, fetch, None, On::Primary).await.as_deref(),
        Some(PRIMARY)
    );
    s.expect(
        &n,
        "/* pgpilot:standby */ MOVE 1 IN c_hold",
        None,
        On::Primary,
    )
    .await;
    s.expect(&n, "/* pgpilot:standby */ CLOSE c_hold", None, On::Primary)
        .await;
}

#[tokio::test]
async fn select_into_locking_clauses_writable_ctes_and_explain_analyze_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE TABLE l_t (id int PRIMARY KEY, v text);
         INSERT INTO l_t VALUES (1, 'a');
         CREATE SEQUENCE l_seq",
    )
    .await;
    let s = sess(addr, "lock").await;
    assert!(is_standby(&s.read_node().await));
    let p = Some(PRIMARY.to_string());
    // SELECT … INTO creates a table.
    let into = format!("SELECT 1 AS one, {WHERE} AS node INTO l_into");
    s.expect(&n, &into, None, On::Primary).await;
    let made: String = n
        .app
        .query_one("SELECT node FROM l_into", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made, PRIMARY);
    // Every locking clause, at the top and nested.
    for lock in [
        "FOR UPDATE",
        "FOR NO KEY UPDATE",
        "FOR SHARE",
        "FOR KEY SHARE",
        "FOR UPDATE OF l_t NOWAIT",
        "FOR SHARE SKIP LOCKED",
        "ORDER BY 1 LIMIT 1 FOR UPDATE",
    ] {
        let sql = format!("SELECT {WHERE} FROM l_t WHERE id = 1 {lock}");
        assert_eq!(s.expect(&n, &sql, None, On::Primary).await, p, "{sql}");
    }
    s.expect(&n, "TABLE l_t FOR UPDATE", None, On::Primary)
        .await;
    s.expect(&n, "TABLE l_t", None, On::Standby).await;
    let nested = format!("SELECT {WHERE} FROM l_t WHERE id IN (SELECT id FROM l_t FOR SHARE)");
    assert_eq!(s.expect(&n, &nested, None, On::Primary).await, p);
    let in_cte = format!("WITH c AS (SELECT id FROM l_t FOR KEY SHARE) SELECT {WHERE} FROM c");
    assert_eq!(s.expect(&n, &in_cte, None, On::Primary).await, p);
    // Writable CTEs: at the top level they run; nested ones are rejected by
    // PostgreSQL itself (0A000), on the primary.
    let cte =
        format!("WITH i AS (INSERT INTO l_t VALUES (2, 'cte') RETURNING id) SELECT {WHERE} FROM i");
    assert_eq!(s.expect(&n, &cte, None, On::Primary).await, p);
    let second =
        "WITH a AS (SELECT 1), d AS (DELETE FROM l_t WHERE id = 99 RETURNING id) SELECT * FROM a";
    s.expect(&n, second, None, On::Primary).await;
    for sql in [
        "WITH a AS (WITH b AS (UPDATE l_t SET v = 'x' WHERE id = 2 RETURNING id) SELECT id FROM b) SELECT * FROM a",
        "SELECT * FROM (WITH d AS (DELETE FROM l_t WHERE id = 2 RETURNING id) SELECT id FROM d) s",
        "SELECT (WITH d AS (DELETE FROM l_t WHERE id = 2 RETURNING id) SELECT id FROM d)",
    ] {
        s.expect(&n, sql, Some("0A000"), On::Primary).await;
    }
    // EXPLAIN ANALYZE runs the statement: a write, in every spelling.
    for sql in [
        "EXPLAIN ANALYZE INSERT INTO l_t VALUES (3, 'ea')",
        "EXPLAIN (ANALYZE) UPDATE l_t SET v = 'eb' WHERE id = 3",
        "EXPLAIN (ANALYZE, COSTS OFF) DELETE FROM l_t WHERE id = 3",
        "EXPLAIN (ANALYZE true, TIMING off) SELECT nextval('l_seq')",
        "EXPLAIN (COSTS off, ANALYZE on) SELECT * FROM l_t FOR UPDATE",
        "EXPLAIN ANALYZE WITH i AS (INSERT INTO l_t VALUES (4, 'w') RETURNING id) SELECT * FROM i",
        "explain analyse verbose insert into l_t values (5, 'lower')",
    ] {
        s.expect(&n, sql, None, On::Primary).await;
    }
    // Without ANALYZE nothing runs: a read, even of a write.
    for sql in [
        "EXPLAIN INSERT INTO l_t VALUES (6, 'e')",
        "EXPLAIN (ANALYZE false) DELETE FROM l_t",
        "EXPLAIN (ANALYZE off, VERBOSE) UPDATE l_t SET v = 'x'",
        "EXPLAIN ANALYZE SELECT * FROM l_t",
    ] {
        s.expect(&n, sql, None, On::Standby).await;
    }
    let rows: i64 = n
        .app
        .query_one("SELECT count(*) FROM l_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 4, "1, 2 (cte), 4 (explain analyze cte), 5");
}

#[tokio::test]
async fn built_in_write_functions_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE SEQUENCE f_seq").await;
    let s = sess(addr, "wfn").await;
    assert!(is_standby(&s.read_node().await));
    let p = Some(PRIMARY.to_string());
    for sql in [
        format!("SELECT {WHERE}, nextval('f_seq')"),
        format!("SELECT {WHERE}, currval('f_seq')"),
        format!("SELECT {WHERE}, lastval()"),
        format!("SELECT {WHERE}, setval('f_seq', 100)"),
        format!("SELECT {WHERE}, pg_catalog.nextval('f_seq')"),
        format!("SELECT {WHERE} FROM (SELECT nextval('f_seq') AS v) s"),
        format!("SELECT {WHERE} WHERE nextval('f_seq') > 0"),
        format!("SELECT {WHERE}, coalesce(NULL, nextval('f_seq'))"),
        format!("SELECT {WHERE}, txid_current()"),
        format!("SELECT {WHERE}, pg_current_xact_id()"),
        format!("SELECT {WHERE}, pg_advisory_xact_lock(11)"),
        format!("SELECT {WHERE}, pg_try_advisory_xact_lock(12)"),
        format!("SELECT {WHERE}, pg_notify('f_chan', 'x')"),
        format!("SELECT {WHERE}, set_config('f.local', 'x', true)"),
        format!("SELECT {WHERE}, lo_unlink(lo_creat(-1))"),
    ] {
        assert_eq!(s.expect(&n, &sql, None, On::Primary).await, p, "{sql}");
    }
    // None of those is sticky: reads go back to the standby.
    assert!(is_standby(&s.read_node().await));
}

/// Functions created for the catalog-aware tests (idempotent setup, shared by
/// several tests of this binary).
async fn create_functions(n: &Nodes) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        n.setup(
            r#"CREATE TABLE fn_log (node text);
            CREATE FUNCTION fn_stable() RETURNS text STABLE LANGUAGE sql
                AS $$ SELECT current_setting('cluster_name') $$;
            CREATE FUNCTION fn_stable2() RETURNS text STABLE LANGUAGE sql
                AS $$ SELECT current_setting('cluster_name') $$;
            CREATE FUNCTION fn_immutable(int) RETURNS int IMMUTABLE LANGUAGE sql
                AS $$ SELECT $1 + 1 $$;
            CREATE FUNCTION fn_volatile_noop() RETURNS text VOLATILE LANGUAGE sql
                AS $$ SELECT current_setting('cluster_name') $$;
            CREATE FUNCTION fn_insert() RETURNS text VOLATILE LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO fn_log VALUES (current_setting('cluster_name'));
                    RETURN current_setting('cluster_name');
                END $$;
            CREATE FUNCTION "FnInsert"() RETURNS text VOLATILE LANGUAGE sql AS $$
                INSERT INTO fn_log VALUES (current_setting('cluster_name'))
                RETURNING node $$;
            CREATE FUNCTION fn_rows() RETURNS SETOF text VOLATILE LANGUAGE sql AS $$
                INSERT INTO fn_log VALUES (current_setting('cluster_name'))
                RETURNING node $$;"#,
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn volatile_user_functions_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    create_functions(&n).await;
    let s = sess(addr, "volatile").await;
    assert!(is_standby(&s.read_node().await));
    // A VOLATILE function (pg_proc lookup) goes to the primary, where its INSERT works.
    for sql in [
        "SELECT fn_insert()",
        "SELECT public.fn_insert()",
        r#"SELECT "FnInsert"()"#,
        "SELECT * FROM fn_rows()",
        "SELECT fn_volatile_noop()",
        "SELECT lower(fn_insert())",
        "SELECT fn_insert() WHERE fn_stable() IS NOT NULL",
    ] {
        assert_eq!(s.one(sql).await, PRIMARY, "{sql}");
    }
    // Extended protocol too.
    let row = s.c.query_one("SELECT fn_insert()", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), PRIMARY);
    // EXPLAIN ANALYZE runs it.
    s.expect(&n, "EXPLAIN ANALYZE SELECT fn_insert()", None, On::Primary)
        .await;
    let logged: i64 = n
        .app
        .query_one("SELECT count(*) FROM fn_log WHERE node = 'node0'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(logged >= 8, "{logged}");
}

/// With `unknown_functions = "lookup"` (the default) a STABLE or IMMUTABLE user
/// function is no reason to leave the standby.
#[tokio::test]
async fn stable_and_immutable_user_functions_may_run_on_a_standby() {
    let addr = proxy().await;
    let n = nodes().await;
    create_functions(&n).await;
    let s = sess(addr, "stable").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    assert_eq!(s.one("SELECT fn_stable()").await, standby);
    let imm = format!("SELECT {WHERE}, fn_immutable(1)");
    assert_eq!(s.one(&imm).await, standby);
    let row = s.c.query_one("SELECT fn_stable()", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), standby);
}

#[tokio::test]
async fn write_functions_and_read_only_functions_settings() {
    let n = nodes().await;
    create_functions(&n).await;
    // write_functions: a STABLE function declared a write goes to the primary.
    // (unknown_functions = "read": the other user functions may use the standby
    // without a pg_proc lookup.)
    let mut cfg = routing_config();
    cfg.routing.write_functions = vec!["fn_stable".into()];
    cfg.routing.unknown_functions = pgpilot::config::UnknownFunctions::Read;
    let addr = proxy_with(cfg).await;
    let s = sess(addr, "wlist").await;
    assert!(is_standby(&s.read_node().await));
    assert_eq!(s.one("SELECT fn_stable()").await, PRIMARY);
    assert_eq!(s.one("SELECT FN_STABLE()").await, PRIMARY);
    let other = s.one("SELECT fn_stable2()").await;
    assert!(is_standby(&other), "{other}");
    // read_only_functions: allow-list mode. Listed (and built-in read-only)
    // functions may run on a standby, every other function goes to the primary.
    let mut cfg = routing_config();
    cfg.routing.read_only_functions = vec!["fn_stable".into()];
    let addr = proxy_with(cfg).await;
    let s = sess(addr, "allow").await;
    assert!(is_standby(&s.read_node().await));
    assert!(is_standby(&s.one("SELECT fn_stable()").await));
    assert_eq!(s.one("SELECT fn_stable2()").await, PRIMARY);
    assert_eq!(s.one("SELECT fn_insert()").await, PRIMARY);
    let imm = format!("SELECT {WHERE}, fn_immutable(1)");
    assert_eq!(s.one(&imm).await, PRIMARY);
    let builtin = format!("SELECT {WHERE}, upper('x'), now()");
    assert!(is_standby(&s.one(&builtin).await));
}

#[tokio::test]
async fn statements_that_do_not_parse_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    let s = sess(addr, "parse").await;
    assert!(is_standby(&s.read_node().await));
    // Valid PostgreSQL that sqlparser does not parse: the primary, where it works.
    for sql in [
        format!("SELECT {WHERE}, xmlelement(name x)"),
        format!("SELECT {WHERE} FROM ROWS FROM (generate_series(1, 1))"),
    ] {
        let node = s.expect(&n, &sql, None, On::Primary).await;
        assert_eq!(node.as_deref(), Some(PRIMARY), "{sql}");
    }
    // Not SQL at all: the primary reports the syntax error.
    s.expect(&n, "SELECT FROM WHERE 1 +", Some("42601"), On::Primary)
        .await;
    s.expect(&n, "SELEKT 1", Some("42601"), On::Primary).await;
}

#[tokio::test]
async fn reads_run_on_the_sessions_standby() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(&format!(
        "CREATE TABLE r_t (id int PRIMARY KEY, v text);
         INSERT INTO r_t VALUES (1, 'a'), (2, 'b');
         CREATE VIEW r_where AS SELECT {WHERE} AS node"
    ))
    .await;
    let s = sess(addr, "reads").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    let idx: usize = standby[4..].parse().unwrap();
    let port = harness().ports[idx].to_string();
    assert_eq!(
        s.one("SELECT pg_is_in_recovery()::text || ' ' || inet_server_port()")
            .await,
        format!("true {port}")
    );
    for sql in [
        format!("VALUES ({WHERE})"),
        "TABLE r_where".to_string(),
        "SHOW cluster_name".to_string(),
        format!("SELECT {WHERE} FROM r_t WHERE id = 1"),
        format!("WITH x AS (SELECT {WHERE} AS n) SELECT n FROM x"),
        format!("SELECT {WHERE} UNION ALL SELECT v FROM r_t"),
        format!("SELECT {WHERE} FROM r_t JOIN r_t r2 USING (id) ORDER BY id LIMIT 1"),
        format!("select {WHERE} from r_t where v in (select v from r_t)"),
    ] {
        assert_eq!(s.one(&sql).await, standby, "{sql}");
    }
    for sql in [
        "EXPLAIN SELECT * FROM r_t",
        "EXPLAIN (VERBOSE, COSTS off) SELECT * FROM r_t WHERE id = 1",
    ] {
        s.expect(&n, sql, None, On::Standby).await;
    }
    // COPY … TO STDOUT, of a query and of a table.
    let copy = format!("COPY (SELECT {WHERE}) TO STDOUT");
    let out: Vec<bytes::Bytes> =
        s.c.copy_out(&copy)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
    assert_eq!(out.concat(), format!("{standby}\n").into_bytes());
    let copy = "COPY r_t TO STDOUT";
    let out: Vec<bytes::Bytes> =
        s.c.copy_out(copy)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
    assert_eq!(out.concat(), b"1\ta\n2\tb\n");
    assert_eq!(s.assert_ran(&n, copy, On::Standby).await, idx);
    // Extended protocol.
    let row =
        s.c.query_one(&format!("SELECT {WHERE}, $1::int"), &[&7i32])
            .await
            .unwrap();
    assert_eq!(row.get::<_, &str>(0), standby);
}

/// Requests for different nodes, pipelined: each answer reaches the client in
/// request order (a request for another node waits for the ones in flight).
#[tokio::test]
async fn pipelined_reads_and_writes_are_answered_in_order() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE pl_t (i int, node text)").await;
    let c = connect(addr, "").await;
    let standby: String = c
        .query_one(&format!("SELECT {WHERE}"), &[])
        .await
        .unwrap()
        .get(0);
    let read = c
        .prepare(&format!("SELECT $1::int, {WHERE}"))
        .await
        .unwrap();
    let write = c
        .prepare(&format!(
            "INSERT INTO pl_t VALUES ($1, {WHERE}) RETURNING i, node"
        ))
        .await
        .unwrap();
    let mut pending = Vec::new();
    for i in 0..40i32 {
        let stmt = if i % 3 == 2 { &write } else { &read };
        let c = &c;
        pending.push(async move { c.query_one(stmt, &[&i]).await });
    }
    let rows = futures_util::future::join_all(pending).await;
    for (i, row) in rows.into_iter().enumerate() {
        let row = row.unwrap();
        // Reads after the session's writes may run on whichever standby has
        // replayed them (read-your-writes), not only the session's own.
        let (got_i, node) = (row.get::<_, i32>(0), row.get::<_, &str>(1));
        assert_eq!(got_i, i as i32, "answers out of order");
        if i % 3 == 2 {
            assert_eq!(node, PRIMARY, "a write ran on {node}");
        } else {
            assert!(is_standby(node), "read {i} ran on {node}");
        }
        let _ = &standby;
    }
}

#[tokio::test]
async fn a_multi_statement_query_is_routed_as_a_whole() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE ms_t (id int)").await;
    let s = sess(addr, "multi").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    let all_reads = format!("SELECT {WHERE}; SELECT 2; SHOW cluster_name");
    let msgs = s.c.simple_query(&all_reads).await.unwrap();
    assert_eq!(
        column(&msgs),
        vec![standby.clone(), "2".into(), standby.clone()]
    );
    for sql in [
        format!("SELECT {WHERE}; INSERT INTO ms_t VALUES (1)"),
        format!("INSERT INTO ms_t VALUES (2); SELECT {WHERE}"),
        format!("SELECT {WHERE}; SELECT nextval('ms_seq_missing')"),
        format!("SELECT {WHERE}; SELECT 1 FROM ms_t FOR UPDATE"),
        format!("SELECT {WHERE}; CREATE TABLE ms_t2 (a int); DROP TABLE ms_t2"),
    ] {
        match s.c.simple_query(&sql).await {
            Ok(msgs) => assert_eq!(first(&msgs).as_deref(), Some(PRIMARY), "{sql}"),
            // nextval of a missing sequence fails, after the first statement ran.
            Err(e) if sql.contains("ms_seq_missing") => {
                assert_eq!(sqlstate(&e).as_deref(), Some("42P01"), "{sql}")
            }
            Err(e) => panic!("{sql}: {e}"),
        }
        s.assert_ran(&n, &sql, On::Primary).await;
    }
    // Nothing of that made the session sticky.
    assert_eq!(s.read_node().await, standby);
}

// ---------------------------------------------------------------------------
// 2. Transactions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn explicit_transactions_run_entirely_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE tx_t (id int PRIMARY KEY, node text)")
        .await;
    let mut s = sess(addr, "tx").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    for begin in [
        "BEGIN",
        "BEGIN WORK",
        "START TRANSACTION",
        "BEGIN READ WRITE",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
    ] {
        s.expect(&n, begin, None, On::Primary).await;
        assert_eq!(s.read_node().await, PRIMARY, "{begin}");
        assert_eq!(s.one("SHOW cluster_name").await, PRIMARY, "{begin}");
        s.expect(&n, "COMMIT", None, On::Primary).await;
        assert!(is_standby(&s.read_node().await), "after {begin}");
        let _ = &standby;
    }
    // A whole transaction in one string.
    let msgs =
        s.c.simple_query(&format!("BEGIN; SELECT {WHERE}; COMMIT"))
            .await
            .unwrap();
    assert_eq!(first(&msgs).as_deref(), Some(PRIMARY));
    // tokio-postgres transactions (extended protocol), committed and rolled back.
    let tx = s.c.transaction().await.unwrap();
    let q = format!("SELECT {WHERE}");
    assert_eq!(
        tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        PRIMARY
    );
    tx.execute(&format!("INSERT INTO tx_t VALUES ($1, {WHERE})"), &[&1i32])
        .await
        .unwrap();
    assert_eq!(
        tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        PRIMARY
    );
    let seen: i64 = tx
        .query_one("SELECT count(*) FROM tx_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1, "the transaction sees its own write");
    tx.commit().await.unwrap();
    let tx = s.c.transaction().await.unwrap();
    assert_eq!(
        tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        PRIMARY
    );
    tx.rollback().await.unwrap();
    assert_eq!(s.read_node().await, standby);
}

#[tokio::test]
async fn an_extended_batch_with_a_write_runs_entirely_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE xb_t (id int, node text)").await;
    let mut raw = Raw::login(addr).await;
    let q = format!("SELECT {WHERE}");
    // Reads only: the batch goes to one standby.
    let r = raw.batch(&[&q, &q, "SHOW cluster_name"]).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(is_standby(&r.values[0]), "{r:?}");
    assert!(r.values.iter().all(|v| *v == r.values[0]), "{r:?}");
    assert_eq!(r.status, 'I');
    let standby = r.values[0].clone();
    // A write among reads: the whole implicit transaction on the primary.
    let ins = format!("INSERT INTO xb_t VALUES (1, {WHERE}) RETURNING node");
    let r = raw.batch(&[&q, &ins, &q]).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, vec![PRIMARY; 3], "{r:?}");
    // The reads of that batch saw its write (one transaction, one node).
    let r = raw
        .batch(&[
            "INSERT INTO xb_t VALUES (2, 'x')",
            "SELECT count(*)::text FROM xb_t WHERE id = 2",
        ])
        .await;
    assert_eq!(r.values, vec!["1"], "{r:?}");
    // A failing batch rolls back as a whole.
    let r = raw
        .batch(&["INSERT INTO xb_t VALUES (3, 'x')", "SELECT 1/0"])
        .await;
    assert_eq!(r.errors, vec!["22012"], "{r:?}");
    let r = raw
        .query("/* pgpilot:primary */ SELECT count(*) FROM xb_t WHERE id = 3")
        .await;
    assert_eq!(r.values, vec!["0"]);
    let r = raw.query(&q).await;
    assert_eq!(r.values, vec![standby.clone()]);
    // BEGIN sent in the same batch as the first statement (as pgJDBC does).
    let r = raw.batch(&["BEGIN", &q]).await;
    assert_eq!(
        (r.values.as_slice(), r.status),
        (&[PRIMARY.to_string()][..], 'T')
    );
    let r = raw.batch(&[&q]).await;
    assert_eq!(
        (r.values.as_slice(), r.status),
        (&[PRIMARY.to_string()][..], 'T')
    );
    assert_eq!(raw.batch(&["COMMIT"]).await.status, 'I');
    let r = raw.batch(&["BEGIN READ ONLY", &q]).await;
    assert_eq!(
        (r.values.as_slice(), r.status),
        (&[standby.clone()][..], 'T')
    );
    let r = raw.batch(&[&q]).await;
    assert_eq!((r.values.as_slice(), r.status), (&[standby][..], 'T'));
    assert_eq!(raw.batch(&["COMMIT"]).await.status, 'I');
}

#[tokio::test]
async fn read_only_transactions_run_entirely_on_the_standby() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE ro_t (id int)").await;
    let mut s = sess(addr, "ro").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    for begin in [
        "BEGIN READ ONLY",
        "START TRANSACTION READ ONLY",
        "BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        "begin read only deferrable",
    ] {
        s.expect(&n, begin, None, On::Standby).await;
        assert_eq!(s.read_node().await, standby, "{begin}");
        assert_eq!(s.one("SHOW transaction_read_only").await, "on");
        s.expect(&n, "COMMIT", None, On::Standby).await;
    }
    // tokio-postgres: START TRANSACTION READ ONLY, extended-protocol queries.
    let tx =
        s.c.build_transaction()
            .read_only(true)
            .start()
            .await
            .unwrap();
    let q = format!("SELECT {WHERE}");
    for _ in 0..3 {
        assert_eq!(
            tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
            standby
        );
    }
    tx.commit().await.unwrap();
    // default_transaction_read_only = on: every BEGIN starts a read-only
    // transaction, which runs on the standby.
    s.c.batch_execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    s.expect(&n, "BEGIN", None, On::Standby).await;
    assert_eq!(s.read_node().await, standby);
    s.c.batch_execute("COMMIT").await.unwrap();
    let tx = s.c.transaction().await.unwrap();
    assert_eq!(
        tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        standby
    );
    tx.commit().await.unwrap();
    // BEGIN READ WRITE in such a session needs the primary.
    s.expect(&n, "BEGIN READ WRITE", None, On::Primary).await;
    assert_eq!(s.read_node().await, PRIMARY);
    s.c.batch_execute("INSERT INTO ro_t VALUES (1)")
        .await
        .unwrap();
    s.c.batch_execute("COMMIT").await.unwrap();
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    // After switching it off the session keeps to the primary (sticky).
    s.expect(&n, "BEGIN", None, On::Primary).await;
    s.c.batch_execute("COMMIT").await.unwrap();
    // SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY, in a new session.
    let s = sess(addr, "ro_chars").await;
    let standby = s.read_node().await;
    s.c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .unwrap();
    s.expect(&n, "START TRANSACTION", None, On::Standby).await;
    assert_eq!(s.read_node().await, standby);
    s.c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn set_transaction_a_standby_cannot_take_moves_a_fresh_read_only_transaction() {
    // On the primary, a READ ONLY transaction that has run nothing yet may
    // still become SERIALIZABLE or READ WRITE. On a hot standby both fail
    // (0A000, 25006), so pgpilot moves such a transaction to the primary.
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE ro_move (id int)").await;
    let s = sess(addr, "ro_move").await;
    assert!(is_standby(&s.read_node().await));
    s.expect(&n, "BEGIN READ ONLY", None, On::Standby).await;
    s.c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(s.read_node().await, PRIMARY);
    assert_eq!(s.one("SHOW transaction_isolation").await, "serializable");
    assert_eq!(s.one("SHOW transaction_read_only").await, "on");
    s.c.batch_execute("COMMIT").await.unwrap();
    s.expect(&n, "START TRANSACTION READ ONLY", None, On::Standby)
        .await;
    s.c.batch_execute("SET TRANSACTION READ WRITE")
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    s.c.batch_execute("INSERT INTO ro_move VALUES (1)")
        .await
        .unwrap();
    s.c.batch_execute("COMMIT").await.unwrap();
    let on_primary: i64 = n.su[0]
        .query_one("SELECT count(*) FROM ro_move", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_primary, 1);
    // Back to the standby for the next read, and a read-only SET TRANSACTION
    // keeps the transaction where it is.
    assert!(is_standby(&s.read_node().await));
    s.expect(&n, "BEGIN READ ONLY", None, On::Standby).await;
    s.c.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("COMMIT").await.unwrap();
    // Once the transaction has run a statement it has a snapshot: it stays,
    // and the server says why the mode cannot change.
    s.expect(&n, "BEGIN READ ONLY", None, On::Standby).await;
    assert!(is_standby(&s.read_node().await));
    let e =
        s.c.batch_execute("SET TRANSACTION READ WRITE")
            .await
            .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25001"), "{}", describe(&e));
    s.c.batch_execute("ROLLBACK").await.unwrap();
    // The same through the extended protocol (tokio-postgres parses the
    // statement in one batch, binds and executes it in the next), after a
    // simple-protocol BEGIN, then with the BEGIN itself extended too.
    for extended_begin in [false, true] {
        if extended_begin {
            assert!(is_standby(&s.read_node().await));
            s.c.execute("BEGIN READ ONLY", &[]).await.unwrap();
        } else {
            s.expect(&n, "BEGIN READ ONLY", None, On::Standby).await;
        }
        s.c.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[])
            .await
            .unwrap_or_else(|e| panic!("extended BEGIN {extended_begin}: {}", describe(&e)));
        assert_eq!(s.read_node().await, PRIMARY);
        assert_eq!(s.one("SHOW transaction_isolation").await, "serializable");
        assert_eq!(s.one("SHOW transaction_read_only").await, "on");
        s.c.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test]
async fn serializable_transactions_never_run_on_a_standby() {
    // A hot standby cannot run SERIALIZABLE transactions (0A000 "cannot use
    // serializable mode in a hot standby"): they need the primary even when READ
    // ONLY, e.g. pg_dump --serializable-deferrable.
    let addr = proxy().await;
    let n = nodes().await;
    let s = sess(addr, "serializable").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    for begin in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY",
        "START TRANSACTION READ ONLY ISOLATION LEVEL SERIALIZABLE",
    ] {
        s.expect(&n, begin, None, On::Primary).await;
        assert_eq!(s.read_node().await, PRIMARY, "{begin}");
        assert_eq!(s.one("SHOW transaction_isolation").await, "serializable");
        s.expect(&n, "COMMIT", None, On::Primary).await;
    }
    assert_eq!(s.read_node().await, standby);
    // A session whose default isolation is SERIALIZABLE: reads (implicit
    // serializable transactions) and read-only transactions need the primary.
    for set in [
        "SET default_transaction_isolation = 'serializable'",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ] {
        let s = sess(addr, "serializable_default").await;
        assert!(is_standby(&s.read_node().await));
        s.c.batch_execute(set).await.unwrap();
        assert_eq!(s.read_node().await, PRIMARY, "{set}");
        s.c.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert_eq!(s.read_node().await, PRIMARY, "{set}");
        s.c.batch_execute("COMMIT").await.unwrap();
    }
}

/// Session defaults given at connection time (startup `options`, like
/// `ALTER ROLE … SET`) are settings too: a serializable default must keep
/// reads off the standby, as `SET default_transaction_isolation` does.
#[tokio::test]
async fn a_serializable_default_from_startup_options_keeps_reads_off_the_standby() {
    let addr = proxy().await;
    let c = connect(
        addr,
        "options='-c default_transaction_isolation=serializable'",
    )
    .await;
    let msgs = c
        .simple_query(&format!("SELECT {WHERE}"))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(first(&msgs).as_deref(), Some(PRIMARY));
}

/// `disable_load_balance_on_write = "transaction"`: reads of a transaction go
/// to the standby until its first write, then everything goes to the primary;
/// the client sees status `T` throughout.
#[tokio::test]
async fn transaction_mode_balances_reads_until_the_first_write() {
    let n = nodes().await;
    n.setup("CREATE TABLE tm_t (id int, node text)").await;
    let mut cfg = routing_config();
    cfg.routing.disable_load_balance_on_write =
        pgpilot::router::policy::BalanceInTransaction::Transaction;
    let addr = proxy_with(cfg).await;
    let q = format!("SELECT {WHERE}");
    // Simple protocol, watching ReadyForQuery.
    let mut raw = Raw::login(addr).await;
    let standby = raw.query(&q).await.values[0].clone();
    assert!(is_standby(&standby));
    let r = raw.query("BEGIN").await;
    assert_eq!(r.status, 'T');
    for _ in 0..2 {
        let r = raw.query(&q).await;
        assert_eq!((r.values[0].as_str(), r.status), (standby.as_str(), 'T'));
    }
    let r = raw
        .query(&format!(
            "INSERT INTO tm_t VALUES (1, {WHERE}) RETURNING node"
        ))
        .await;
    assert_eq!((r.values[0].as_str(), r.status), (PRIMARY, 'T'), "{r:?}");
    for _ in 0..2 {
        let r = raw.query(&q).await;
        assert_eq!((r.values[0].as_str(), r.status), (PRIMARY, 'T'), "{r:?}");
    }
    let r = raw.query("COMMIT").await;
    assert_eq!((r.errors.len(), r.status), (0, 'I'));
    let r = raw.query(&q).await;
    assert_eq!((r.values[0].as_str(), r.status), (standby.as_str(), 'I'));
    // A rolled-back transaction: the write is gone.
    raw.query("BEGIN").await;
    assert_eq!(raw.query(&q).await.values, vec![standby.clone()]);
    raw.query("INSERT INTO tm_t VALUES (2, 'gone')").await;
    let r = raw.query("ROLLBACK").await;
    assert_eq!(r.status, 'I');
    // A batch whose Sync comes later (Flush-driven) is judged before its
    // write arrives: it must not be balanced, or the write follows it to the
    // standby (25006).
    raw.query("BEGIN").await;
    {
        use postgres_protocol::message::frontend;
        let mut buf = bytes::BytesMut::new();
        parse_bind_execute(&q, &mut buf);
        frontend::flush(&mut buf);
        raw.s.write_all(&buf).await.unwrap();
        while read_msg(&mut raw.s).await.0 != b'C' {}
        buf.clear();
        parse_bind_execute(
            &format!("INSERT INTO tm_t VALUES (4, {WHERE}) RETURNING node"),
            &mut buf,
        );
        frontend::sync(&mut buf);
        raw.s.write_all(&buf).await.unwrap();
        let r = raw.until_ready().await;
        assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'T'), "{r:?}");
        assert_eq!(r.values, vec![PRIMARY.to_string()]);
    }
    let r = raw.query("COMMIT").await;
    assert_eq!((r.errors.len(), r.status), (0, 'I'));
    // tokio-postgres Transaction (extended protocol).
    let mut c = connect(addr, "").await;
    let standby = c.query_one(&q, &[]).await.unwrap().get::<_, String>(0);
    let tx = c.transaction().await.unwrap();
    assert_eq!(
        tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        standby
    );
    tx.execute("INSERT INTO tm_t VALUES (3, 'x')", &[])
        .await
        .unwrap();
    assert_eq!(
        tx.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        PRIMARY
    );
    let mine: i64 = tx
        .query_one("SELECT count(*) FROM tm_t WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mine, 1, "after the write, reads see it");
    tx.commit().await.unwrap();
    let rows: Vec<(i32, String)> = n
        .app
        .query("SELECT id, node FROM tm_t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![(1, PRIMARY.into()), (3, "x".into()), (4, PRIMARY.into())]
    );
    // READ ONLY transactions still run wholly on the standby.
    let mut raw = Raw::login(addr).await;
    let standby = raw.query(&q).await.values[0].clone();
    assert_eq!(raw.query("BEGIN READ ONLY").await.status, 'T');
    let r = raw.query(&q).await;
    assert_eq!((r.values[0].as_str(), r.status), (standby.as_str(), 'T'));
    assert_eq!(raw.query("COMMIT").await.status, 'I');
}

/// In transaction mode a balanced read that fails must fail the client's
/// transaction, as PostgreSQL would: status `E`, later statements 25P02, and
/// COMMIT rolls back.
#[tokio::test]
async fn transaction_mode_an_error_in_a_balanced_read_fails_the_transaction() {
    let n = nodes().await;
    n.setup("CREATE TABLE tme_t (id int)").await;
    let mut cfg = routing_config();
    cfg.routing.disable_load_balance_on_write =
        pgpilot::router::policy::BalanceInTransaction::Transaction;
    let addr = proxy_with(cfg).await;
    let mut raw = Raw::login(addr).await;
    assert_eq!(raw.query("BEGIN").await.status, 'T');
    let r = raw.query("SELECT 1/0").await;
    assert_eq!(
        (r.errors.as_slice(), r.status),
        (&["22012".to_string()][..], 'E'),
        "{r:?}"
    );
    let r = raw.query("INSERT INTO tme_t VALUES (1)").await;
    assert_eq!(
        (r.errors.as_slice(), r.status),
        (&["25P02".to_string()][..], 'E'),
        "{r:?}"
    );
    // COMMIT of a failed transaction rolls it back, as PostgreSQL does.
    let r = raw.query("COMMIT").await;
    assert_eq!((r.errors.len(), r.status), (0, 'I'), "{r:?}");
    let r = raw.query("SELECT 1").await;
    assert_eq!((r.errors.len(), r.status), (0, 'I'), "{r:?}");
    let rows: i64 = n
        .app
        .query_one("SELECT count(*) FROM tme_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a transaction that failed must not commit");
}

// ---------------------------------------------------------------------------
// 3. Session consistency
// ---------------------------------------------------------------------------

/// `SHOW name` on the session's standby and, hinted, on the primary.
async fn show_both(s: &Sess, name: &str) -> (String, String) {
    let standby = s.one(&format!("SHOW {name}")).await;
    let primary = s.one(&format!("/* pgpilot:primary */ SHOW {name}")).await;
    (standby, primary)
}

fn both(v: &str) -> (String, String) {
    (v.to_string(), v.to_string())
}

#[tokio::test]
async fn set_applies_on_the_standby_and_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE SCHEMA sp_s;
         CREATE TABLE sp_s.sp_only (v text);
         INSERT INTO sp_s.sp_only VALUES ('seed')",
    )
    .await;
    // SET before the standby connection exists, and after both exist.
    let c = connect(addr, "").await;
    c.batch_execute("SET search_path = sp_s, public")
        .await
        .unwrap();
    let s = Sess {
        c,
        app: String::new(),
    };
    let read = format!("SELECT v, {WHERE} FROM sp_only");
    let msgs = s.c.simple_query(&read).await.unwrap();
    assert_eq!(first(&msgs).as_deref(), Some("seed"));
    let ins = format!(
        "INSERT INTO sp_only VALUES ('w') RETURNING {WHERE} || ' ' || current_setting('search_path')"
    );
    assert_eq!(s.one(&ins).await, "node0 sp_s, public");
    assert_eq!(show_both(&s, "search_path").await, both("sp_s, public"));
    s.c.batch_execute("SET work_mem = '5MB'").await.unwrap();
    s.c.batch_execute("SET statement_timeout TO 123456")
        .await
        .unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("5MB"));
    assert_eq!(show_both(&s, "statement_timeout").await, both("123456ms"));
    // Extended protocol sees the same settings.
    let row =
        s.c.query_one(
            "SELECT current_setting('work_mem'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, &str>(0), row.get::<_, &str>(1)),
        ("5MB", "sp_s, public")
    );
}

#[tokio::test]
async fn set_in_committed_transactions_persists_in_rolled_back_ones_does_not() {
    let addr = proxy().await;
    let s = sess(addr, "settx").await;
    assert!(is_standby(&s.read_node().await));
    assert_eq!(show_both(&s, "work_mem").await, both("4MB"));
    s.c.batch_execute("BEGIN").await.unwrap();
    s.c.batch_execute("SET work_mem = '7MB'").await.unwrap();
    s.c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("7MB"));
    s.c.batch_execute("BEGIN").await.unwrap();
    s.c.batch_execute("SET work_mem = '9MB'").await.unwrap();
    assert_eq!(s.one("SHOW work_mem").await, "9MB");
    s.c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("7MB"));
    // SET LOCAL ends with its transaction, committed or not.
    s.c.batch_execute("BEGIN").await.unwrap();
    s.c.batch_execute("SET LOCAL work_mem = '11MB'")
        .await
        .unwrap();
    assert_eq!(s.one("SHOW work_mem").await, "11MB");
    s.c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("7MB"));
    // SET LOCAL outside a transaction does nothing (a warning).
    s.c.batch_execute("SET LOCAL work_mem = '12MB'")
        .await
        .unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("7MB"));
    // tokio-postgres transaction, extended protocol.
    let mut s = s;
    let tx = s.c.transaction().await.unwrap();
    tx.batch_execute("SET work_mem = '8MB'").await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("7MB"));
    let tx = s.c.transaction().await.unwrap();
    tx.batch_execute("SET work_mem = '6MB'").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("6MB"));
}

#[tokio::test]
async fn set_rolled_back_to_a_savepoint_is_not_replayed() {
    let addr = proxy().await;
    let s = sess(addr, "setsp").await;
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("BEGIN").await.unwrap();
    s.c.batch_execute("SAVEPOINT a").await.unwrap();
    s.c.batch_execute("SET work_mem = '13MB'").await.unwrap();
    s.c.batch_execute("ROLLBACK TO SAVEPOINT a").await.unwrap();
    s.c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("4MB"));
}

#[tokio::test]
async fn set_in_a_failed_transaction_ended_by_commit_is_not_replayed() {
    let addr = proxy().await;
    let s = sess(addr, "setfail").await;
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("BEGIN").await.unwrap();
    s.c.batch_execute("SET work_mem = '15MB'").await.unwrap();
    assert!(s.c.batch_execute("SELECT 1/0").await.is_err());
    // COMMIT of a failed transaction rolls it back.
    let msgs = s.c.simple_query("COMMIT").await.unwrap();
    assert!(matches!(
        msgs.last(),
        Some(SimpleQueryMessage::CommandComplete(_))
    ));
    assert_eq!(show_both(&s, "work_mem").await, both("4MB"));
}

#[tokio::test]
async fn reset_and_discard_all_apply_on_both_nodes() {
    let addr = proxy().await;
    let s = sess(addr, "reset").await;
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("SET work_mem = '3MB'").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("3MB"));
    s.c.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("4MB"));
    s.c.batch_execute("SET work_mem = '5MB'").await.unwrap();
    s.c.batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    s.c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("4MB"));
    assert_eq!(show_both(&s, "statement_timeout").await, both("0"));
    // DISCARD ALL: settings and prepared statements, on both nodes.
    s.c.batch_execute("SET work_mem = '5MB'").await.unwrap();
    s.c.batch_execute(&format!("PREPARE d_q AS SELECT {WHERE}"))
        .await
        .unwrap();
    assert!(is_standby(&s.one("EXECUTE d_q").await));
    assert_eq!(s.one("/* pgpilot:primary */ EXECUTE d_q").await, PRIMARY);
    s.c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(show_both(&s, "work_mem").await, both("4MB"));
    for sql in ["EXECUTE d_q", "/* pgpilot:primary */ EXECUTE d_q"] {
        let e = s.c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{sql}");
    }
    // The name is free again everywhere.
    s.c.batch_execute("PREPARE d_q AS SELECT 'v2'")
        .await
        .unwrap();
    assert_eq!(s.one("EXECUTE d_q").await, "v2");
    assert_eq!(s.one("/* pgpilot:primary */ EXECUTE d_q").await, "v2");
}

#[tokio::test]
async fn sql_prepare_execute_and_deallocate_on_both_kinds_of_node() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE pe_t (id int, node text)").await;
    let s = sess(addr, "prepare").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    s.c.batch_execute(&format!("PREPARE pe_r(int) AS SELECT {WHERE}, $1 + 1"))
        .await
        .unwrap();
    s.c.batch_execute(&format!(
        "PREPARE pe_w(int) AS INSERT INTO pe_t VALUES ($1, {WHERE}) RETURNING node"
    ))
    .await
    .unwrap();
    assert_eq!(s.one("EXECUTE pe_r(41)").await, standby);
    assert_eq!(s.one("EXECUTE pe_w(1)").await, PRIMARY);
    // The read, prepared lazily on the primary when executed there.
    assert_eq!(
        s.one("/* pgpilot:primary */ EXECUTE pe_r(1)").await,
        PRIMARY
    );
    s.c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(s.one("EXECUTE pe_r(2)").await, PRIMARY);
    assert_eq!(s.one("EXECUTE pe_w(2)").await, PRIMARY);
    s.c.batch_execute("COMMIT").await.unwrap();
    // EXPLAIN ANALYZE runs it: the primary.
    s.c.batch_execute("EXPLAIN ANALYZE EXECUTE pe_w(4)")
        .await
        .unwrap();
    s.c.batch_execute("EXPLAIN ANALYZE EXECUTE pe_r(4)")
        .await
        .unwrap();
    // A standby hint never sends the prepared write to a standby.
    assert_eq!(
        s.one("/* pgpilot:standby */ EXECUTE pe_w(3)").await,
        PRIMARY
    );
    // DEALLOCATE forgets it on every node; the name can be reused.
    s.c.batch_execute("DEALLOCATE pe_r").await.unwrap();
    for sql in ["EXECUTE pe_r(1)", "/* pgpilot:primary */ EXECUTE pe_r(1)"] {
        let e = s.c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{sql}");
    }
    s.c.batch_execute("PREPARE pe_r AS SELECT 'again'")
        .await
        .unwrap();
    assert_eq!(s.one("EXECUTE pe_r").await, "again");
    assert_eq!(s.one("/* pgpilot:primary */ EXECUTE pe_r").await, "again");
    s.c.batch_execute("DEALLOCATE PREPARE ALL").await.unwrap();
    for sql in ["EXECUTE pe_r", "EXECUTE pe_w(9)"] {
        let e = s.c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{sql}");
    }
    let rows: i64 = n
        .app
        .query_one("SELECT count(*) FROM pe_t WHERE node = 'node0'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 4);
}

#[tokio::test]
async fn protocol_prepared_statements_run_on_both_kinds_of_node() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE pp_t (id int, node text)").await;
    let mut c = connect(addr, "").await;
    let q = format!("SELECT {WHERE}");
    let standby: String = c.query_one(&q, &[]).await.unwrap().get(0);
    assert!(is_standby(&standby));
    let read = c
        .prepare(&format!("SELECT {WHERE}, $1::int + 1"))
        .await
        .unwrap();
    let write = c
        .prepare(&format!(
            "INSERT INTO pp_t VALUES ($1, {WHERE}) RETURNING node"
        ))
        .await
        .unwrap();
    for i in 0..3i32 {
        let r = c.query_one(&read, &[&i]).await.unwrap();
        // (After the session's write, the read may run on the other standby
        // if that one replayed the write first.)
        assert!(is_standby(r.get::<_, &str>(0)));
        assert_eq!(r.get::<_, i32>(1), i + 1);
        let w = c.query_one(&write, &[&i]).await.unwrap();
        assert_eq!(w.get::<_, &str>(0), PRIMARY);
    }
    // The read statement on the primary (inside a transaction).
    let tx = c.transaction().await.unwrap();
    let r = tx.query_one(&read, &[&5i32]).await.unwrap();
    assert_eq!(r.get::<_, &str>(0), PRIMARY);
    tx.query_one(&write, &[&5i32]).await.unwrap();
    tx.commit().await.unwrap();
    // Back on the standby, still prepared there.
    let r = c.query_one(&read, &[&6i32]).await.unwrap();
    assert!(is_standby(r.get::<_, &str>(0)));
    // Closing (drop) then preparing again works on both nodes.
    drop(read);
    let read2 = c.prepare(&format!("SELECT {WHERE}, 'v2'")).await.unwrap();
    assert_eq!(
        c.query_one(&read2, &[]).await.unwrap().get::<_, &str>(0),
        standby
    );
    let tx = c.transaction().await.unwrap();
    assert_eq!(
        tx.query_one(&read2, &[]).await.unwrap().get::<_, &str>(0),
        PRIMARY
    );
    tx.commit().await.unwrap();
    let rows: i64 = n
        .app
        .query_one("SELECT count(*) FROM pp_t WHERE node = 'node0'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 4);
}

#[tokio::test]
async fn temp_tables_listen_and_session_advisory_locks_keep_the_session_on_the_primary() {
    let addr = proxy().await;
    for (what, sql) in [
        ("temp table", "CREATE TEMP TABLE st_tmp (a int)"),
        (
            "temp table (pg_temp)",
            "CREATE TABLE pg_temp.st_tmp (a int)",
        ),
        ("select into temp", "SELECT 1 AS a INTO TEMP st_tmp"),
        ("temp view", "CREATE TEMP VIEW st_tmp AS SELECT 1 AS a"),
        ("listen", "LISTEN st_chan"),
        ("advisory lock", "SELECT pg_advisory_lock(4242)"),
        (
            "try advisory lock",
            "SELECT pg_try_advisory_lock_shared(4243)",
        ),
        (
            "declare with hold",
            "DECLARE st_c CURSOR WITH HOLD FOR SELECT 1",
        ),
        ("set_config", "SELECT set_config('st.x', 'y', false)"),
    ] {
        let c = connect(addr, "").await;
        let s = Sess {
            c,
            app: String::new(),
        };
        assert!(is_standby(&s.read_node().await), "{what}");
        s.c.batch_execute(sql).await.unwrap();
        for _ in 0..3 {
            assert_eq!(s.read_node().await, PRIMARY, "after {what}");
        }
        assert_eq!(s.one("SHOW cluster_name").await, PRIMARY, "after {what}");
        if what.starts_with("temp") || what.starts_with("select") {
            let msgs = s.c.simple_query("SELECT count(*) FROM st_tmp").await;
            assert!(msgs.is_ok(), "{what}: the temp table is there");
        }
        let row =
            s.c.query_one(&format!("SELECT {WHERE}"), &[])
                .await
                .unwrap();
        assert_eq!(row.get::<_, &str>(0), PRIMARY, "{what}, extended protocol");
    }
    // Transaction-level advisory locks do not make the session sticky.
    let c = connect(addr, "").await;
    let s = Sess {
        c,
        app: String::new(),
    };
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("SELECT pg_advisory_xact_lock(4244)")
        .await
        .unwrap();
    assert!(is_standby(&s.read_node().await));
}

#[tokio::test]
async fn routing_hints_and_pgpilot_route() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE h_t (id int PRIMARY KEY, node text); CREATE SEQUENCE h_seq")
        .await;
    create_functions(&n).await;
    let s = sess(addr, "hints").await;
    let standby = s.read_node().await;
    assert!(is_standby(&standby));
    let q = format!("SELECT {WHERE}");
    assert_eq!(s.one(&format!("/* pgpilot:primary */ {q}")).await, PRIMARY);
    assert_eq!(s.one(&format!("/*pgpilot:PRIMARY*/{q}")).await, PRIMARY);
    assert_eq!(s.one(&format!("/* pgpilot:standby */ {q}")).await, standby);
    // The standby hint never sends a write to a standby.
    for sql in [
        format!("/* pgpilot:standby */ INSERT INTO h_t VALUES (1, {WHERE}) RETURNING node"),
        format!("/* pgpilot:standby */ SELECT {WHERE}, nextval('h_seq')"),
        format!("/* pgpilot:standby */ SELECT {WHERE} FROM h_t FOR UPDATE"),
        format!(
            "/* pgpilot:standby */ WITH u AS (UPDATE h_t SET node = 'u' RETURNING id) SELECT {WHERE} FROM u"
        ),
        format!("/* pgpilot:standby */ SELECT {WHERE}, pg_advisory_xact_lock(1)"),
        format!("/* pgpilot:standby */ SELECT {WHERE}; DELETE FROM h_t WHERE id = 99"),
    ] {
        assert_eq!(s.one(&sql).await, PRIMARY, "{sql}");
    }
    let row =
        s.c.query_one(
            &format!("/* pgpilot:standby */ INSERT INTO h_t VALUES ($1, {WHERE}) RETURNING node"),
            &[&2i32],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), PRIMARY);
    // It does override the volatility judgement of a function that only reads.
    assert_eq!(s.one("SELECT fn_volatile_noop()").await, PRIMARY);
    assert_eq!(
        s.one("/* pgpilot:standby */ SELECT fn_volatile_noop()")
            .await,
        standby
    );
    // The same over the extended protocol (a batch).
    for (sql, want) in [
        ("SELECT fn_volatile_noop()", PRIMARY),
        (
            "/* pgpilot:standby */ SELECT fn_volatile_noop()",
            standby.as_str(),
        ),
    ] {
        let row = s.c.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), want, "{sql}, extended protocol");
    }
    // SET pgpilot.route = 'primary' … RESET pgpilot.route.
    s.c.batch_execute("SET pgpilot.route = 'primary'")
        .await
        .unwrap();
    assert_eq!(s.one(&q).await, PRIMARY);
    assert_eq!(
        s.c.query_one(&q, &[]).await.unwrap().get::<_, &str>(0),
        PRIMARY
    );
    s.c.batch_execute("RESET pgpilot.route").await.unwrap();
    assert_eq!(s.one(&q).await, standby);
    s.c.batch_execute("SET pgpilot.route TO 'primary'")
        .await
        .unwrap();
    assert_eq!(s.one(&q).await, PRIMARY);
    s.c.batch_execute("SET pgpilot.route = 'auto'")
        .await
        .unwrap();
    assert_eq!(s.one(&q).await, standby);
    // A sticky session still honours a standby hint on a read.
    s.c.batch_execute("CREATE TEMP TABLE h_tmp (a int)")
        .await
        .unwrap();
    assert_eq!(s.one(&q).await, PRIMARY);
    assert_eq!(s.one(&format!("/* pgpilot:standby */ {q}")).await, standby);
}

// ---------------------------------------------------------------------------
// 4. Choosing the standby
// ---------------------------------------------------------------------------

/// The node of the first read of each of `sessions` new sessions.
async fn first_read_nodes(addr: SocketAddr, sessions: usize) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    let q = format!("SELECT {WHERE}");
    for _ in 0..sessions {
        let c = connect(addr, "").await;
        let msgs = c.simple_query(&q).await.unwrap();
        *count.entry(first(&msgs).unwrap()).or_insert(0) += 1;
        // The session keeps its node.
        let again = first(&c.simple_query(&q).await.unwrap());
        assert_eq!(again, first(&msgs));
    }
    count
}

#[tokio::test]
async fn reads_of_many_sessions_spread_over_both_standbys_by_weight() {
    let addr = proxy().await;
    let count = first_read_nodes(addr, 40).await;
    assert_eq!(count.get(PRIMARY), None, "{count:?}");
    assert!(count.get("node1") >= Some(&5), "{count:?}");
    assert!(count.get("node2") >= Some(&5), "{count:?}");
    // Weights 1 : 4. Lag does not scale them here: on a loaded machine a
    // standby replaying a second behind would lose half its weight (as it
    // should), which this test is not about (CI once saw 22 : 38).
    let mut cfg = routing_config();
    cfg.backends[1].weight = 1.0;
    cfg.backends[2].weight = 4.0;
    cfg.sr_check.half_weight_lag = Duration::ZERO;
    cfg.sr_check.half_weight_lag_bytes = 0;
    let addr = proxy_with(cfg).await;
    // 100 sessions: node1 expects 20 ± 4, and the check fails past 33.
    let count = first_read_nodes(addr, 100).await;
    let (one, two) = (
        count.get("node1").copied().unwrap_or(0),
        count.get("node2").copied().unwrap_or(0),
    );
    assert_eq!(one + two, 100, "{count:?}");
    assert!(two > 2 * one, "weights 1:4 gave {count:?}");
}

#[tokio::test]
async fn weight_zero_load_balance_off_and_primary_in_read_pool() {
    // weight = 0: never.
    let mut cfg = routing_config();
    cfg.backends[1].weight = 0.0;
    let addr = proxy_with(cfg).await;
    let count = first_read_nodes(addr, 15).await;
    assert_eq!(count.keys().collect::<Vec<_>>(), vec!["node2"], "{count:?}");
    // load_balance = false: everything on the primary.
    let mut cfg = routing_config();
    cfg.routing.load_balance = false;
    let addr = proxy_with(cfg).await;
    let count = first_read_nodes(addr, 5).await;
    assert_eq!(count.keys().collect::<Vec<_>>(), vec![PRIMARY], "{count:?}");
    let s = sess(addr, "nolb").await;
    for sql in [
        format!("/* pgpilot:standby */ SELECT {WHERE}"),
        "SHOW cluster_name".into(),
    ] {
        assert_eq!(s.one(&sql).await, PRIMARY, "{sql}");
    }
    s.c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(s.read_node().await, PRIMARY);
    s.c.batch_execute("COMMIT").await.unwrap();
    // primary_in_read_pool = true: the primary takes a share of the reads.
    let mut cfg = routing_config();
    cfg.routing.primary_in_read_pool = true;
    let addr = proxy_with(cfg).await;
    let count = first_read_nodes(addr, 30).await;
    assert!(count.get(PRIMARY) >= Some(&2), "{count:?}");
    assert!(count.get(PRIMARY) < Some(&30), "{count:?}");
}

// ---------------------------------------------------------------------------
// 5. The randomised classifier test
// ---------------------------------------------------------------------------
//
// Random SQL-ish strings through the classifier (never a panic, never a read for
// a string with a write keyword at a statement start, and never a standby from
// the routing policy for such a string):
// `random_sql_never_panics_and_write_starts_are_write` in
// `src/router/classify_tests.rs` (a unit test of the library).

// ---------------------------------------------------------------------------
// 6. A randomised mixed workload
// ---------------------------------------------------------------------------

/// What one workload client saw.
#[derive(Debug, Default)]
struct Tally {
    /// SQL statements executed (BEGIN/COMMIT/SET included).
    statements: usize,
    sessions: usize,
    /// Reads outside read-write transactions, by the node that ran them.
    reads: BTreeMap<String, usize>,
    /// Every error: "SQLSTATE message (what)".
    errors: Vec<String>,
    /// Statements that ran on the wrong kind of node.
    misrouted: Vec<String>,
}

impl Tally {
    fn error(&mut self, what: &str, e: &tokio_postgres::Error) {
        self.errors.push(format!("{} ({what})", describe(e)));
    }

    /// A read that must have run on `expected` (a node name), or on a standby
    /// when `expected` is None. A read expected on the session's standby may
    /// also run elsewhere: after the session wrote, read-your-writes sends it to
    /// whichever standby has replayed the write, or to the primary when none
    /// has within `consistency_wait` (the share of those is checked at the end).
    fn read_on(&mut self, what: &str, node: &str, expected: Option<&str>) {
        *self.reads.entry(node.to_string()).or_insert(0) += 1;
        let ok = match expected {
            Some(e) if e == PRIMARY => node == e,
            Some(_) => true,
            None => is_standby(node),
        };
        if !ok {
            self.misrouted
                .push(format!("{what}: ran on {node}, expected {expected:?}"));
        }
    }

    fn write_on(&mut self, what: &str, node: &str) {
        if node != PRIMARY {
            self.misrouted.push(format!("{what}: write ran on {node}"));
        }
    }
}

/// Statements per client session before it reconnects (sessions pick their
/// standby once, so many sessions spread reads over both).
const WORKLOAD_PER_SESSION: usize = 300;

async fn workload_client(addr: SocketAddr, id: i32, target: usize) -> Tally {
    let mut t = Tally::default();
    let mut rng = fastrand::Rng::with_seed(
        0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x1234_5678_9abc),
    );
    let q = format!("SELECT {WHERE}, count(*) FROM wl_t WHERE client = {id}");
    while t.statements < target {
        t.sessions += 1;
        let mut c = connect(addr, "").await;
        let read = c
            .prepare(&format!(
                "SELECT {WHERE}, (SELECT v FROM wl_t WHERE client = $1 AND k = $2)"
            ))
            .await
            .unwrap();
        let write = c
            .prepare(&format!(
                "INSERT INTO wl_t VALUES ($1, $2, 1, {WHERE}) ON CONFLICT (client, k) \
                 DO UPDATE SET v = wl_t.v + 1, node = excluded.node RETURNING node"
            ))
            .await
            .unwrap();
        c.batch_execute(&format!("PREPARE wl_read AS SELECT {WHERE}"))
            .await
            .unwrap();
        t.statements += 1;
        // Some sessions keep to the primary (temp table): all their reads too.
        let sticky = rng.u64(..8) == 0;
        if sticky {
            c.batch_execute("CREATE TEMP TABLE wl_tmp (a int)")
                .await
                .unwrap();
            t.statements += 1;
        }
        // The session's read node, learnt from its first read.
        let mut node: Option<String> = sticky.then(|| PRIMARY.to_string());
        let mut done = 0;
        while done < WORKLOAD_PER_SESSION && t.statements < target {
            let k = rng.u64(..40) as i32;
            let before = t.statements;
            let op = rng.u64(..100);
            match op {
                // Simple-protocol read.
                0..=24 => match c.simple_query(&q).await {
                    Ok(m) => {
                        let n = first(&m).unwrap();
                        t.read_on("simple read", &n, node.as_deref());
                        node.get_or_insert(n);
                    }
                    Err(e) => t.error("simple read", &e),
                },
                // Extended-protocol read of a prepared statement.
                25..=39 => match c.query_one(&read, &[&id, &k]).await {
                    // (The row's value may be stale on a standby: no freshness
                    // check, the node is the point.)
                    Ok(r) => t.read_on("prepared read", r.get(0), node.as_deref()),
                    Err(e) => t.error("prepared read", &e),
                },
                // SQL EXECUTE of a prepared read.
                40..=44 => match c.simple_query("EXECUTE wl_read").await {
                    Ok(m) => t.read_on("EXECUTE", &first(&m).unwrap(), node.as_deref()),
                    Err(e) => t.error("EXECUTE", &e),
                },
                // Pipelined reads.
                45..=49 => {
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &k];
                    let (a, b) = tokio::join!(c.query_one(&read, &params), c.simple_query(&q));
                    t.statements += 2;
                    match (a, b) {
                        (Ok(a), Ok(b)) => {
                            t.read_on("pipelined read", a.get(0), node.as_deref());
                            t.read_on("pipelined read", &first(&b).unwrap(), node.as_deref());
                        }
                        (Err(e), _) | (_, Err(e)) => t.error("pipelined reads", &e),
                    }
                }
                // Autocommit write, simple protocol.
                50..=59 => {
                    let sql = format!(
                        "INSERT INTO wl_t VALUES ({id}, {k}, 1, {WHERE}) ON CONFLICT (client, k) \
                         DO UPDATE SET v = wl_t.v + 1, node = excluded.node RETURNING node"
                    );
                    match c.simple_query(&sql).await {
                        Ok(m) => t.write_on("simple write", &first(&m).unwrap()),
                        Err(e) => t.error("simple write", &e),
                    }
                }
                // Autocommit write, extended protocol.
                60..=67 => match c.query_one(&write, &[&id, &k]).await {
                    Ok(r) => t.write_on("prepared write", r.get(0)),
                    Err(e) => t.error("prepared write", &e),
                },
                // Explicit read-write transaction (tokio-postgres): all on the primary.
                68..=77 => {
                    t.statements += 5; // BEGIN, read, write, read, COMMIT
                    let commit = rng.u64(..4) != 0;
                    let r: Result<(), tokio_postgres::Error> = async {
                        let tx = c.transaction().await?;
                        let a: String = tx.query_one(&read, &[&id, &k]).await?.get(0);
                        let w: String = tx.query_one(&write, &[&id, &k]).await?.get(0);
                        let b: String = tx.query_one(&read, &[&id, &k]).await?.get(0);
                        for (what, n) in [
                            ("tx read", &a),
                            ("tx write", &w),
                            ("tx read after write", &b),
                        ] {
                            if n != PRIMARY {
                                t.misrouted.push(format!("{what}: ran on {n}"));
                            }
                        }
                        if commit {
                            tx.commit().await
                        } else {
                            tx.rollback().await
                        }
                    }
                    .await;
                    if let Err(e) = r {
                        t.error("transaction", &e);
                    }
                }
                // Explicit transaction, simple protocol.
                78..=83 => {
                    t.statements += 4;
                    let r: Result<(), tokio_postgres::Error> = async {
                        c.batch_execute("BEGIN").await?;
                        let n = first(&c.simple_query(&format!("SELECT {WHERE}")).await?).unwrap();
                        let w = first(&c.simple_query(&format!(
                            "UPDATE wl_t SET v = v + 1 WHERE client = {id} AND k = {k} RETURNING {WHERE}"
                        )).await?);
                        c.batch_execute("COMMIT").await?;
                        if n != PRIMARY || w.is_some_and(|w| w != PRIMARY) {
                            t.misrouted.push(format!("simple transaction ran on {n}"));
                        }
                        Ok(())
                    }
                    .await;
                    if let Err(e) = r {
                        t.error("simple transaction", &e);
                    }
                }
                // READ ONLY transaction: wholly on the session's read node.
                84..=90 => {
                    t.statements += 4;
                    let r: Result<(String, String), tokio_postgres::Error> = async {
                        let tx = c.build_transaction().read_only(true).start().await?;
                        let a: String = tx.query_one(&format!("SELECT {WHERE}"), &[]).await?.get(0);
                        let b = first(&tx.simple_query(&q).await?).unwrap();
                        tx.commit().await?;
                        Ok((a, b))
                    }
                    .await;
                    match r {
                        Ok((a, b)) => {
                            t.read_on("read-only transaction", &a, node.as_deref());
                            node.get_or_insert(a.clone());
                            if a != b {
                                t.misrouted
                                    .push(format!("read-only transaction on {a} and {b}"));
                            }
                        }
                        Err(e) => t.error("read-only transaction", &e),
                    }
                }
                // SET (plain or in a committed transaction), seen on both nodes.
                91..=94 => {
                    let mb = 1 + rng.u64(..60);
                    let in_tx = rng.u64(..2) == 0;
                    let r: Result<(String, String), tokio_postgres::Error> = async {
                        if in_tx {
                            c.batch_execute("BEGIN").await?;
                        }
                        c.batch_execute(&format!("SET work_mem = '{mb}MB'")).await?;
                        if in_tx {
                            c.batch_execute("COMMIT").await?;
                        }
                        let a = first(&c.simple_query("SHOW work_mem").await?).unwrap();
                        let b = first(
                            &c.simple_query("/* pgpilot:primary */ SHOW work_mem")
                                .await?,
                        )
                        .unwrap();
                        Ok((a, b))
                    }
                    .await;
                    t.statements += if in_tx { 5 } else { 3 };
                    match r {
                        Ok((a, b)) => {
                            let want = format!("{mb}MB");
                            if a != want || b != want {
                                t.misrouted
                                    .push(format!("SET work_mem {want}: shows {a} / {b}"));
                            }
                        }
                        Err(e) => t.error("SET", &e),
                    }
                }
                // Multi-statement queries.
                95..=96 => {
                    t.statements += 4;
                    match c.simple_query(&format!("SELECT {WHERE}; SELECT 1")).await {
                        Ok(m) => {
                            t.read_on("multi-statement read", &first(&m).unwrap(), node.as_deref())
                        }
                        Err(e) => t.error("multi-statement read", &e),
                    }
                    let sql = format!(
                        "SELECT {WHERE}; UPDATE wl_t SET v = v + 1 WHERE client = {id} AND k = {k}"
                    );
                    match c.simple_query(&sql).await {
                        Ok(m) => t.write_on("multi-statement write", &first(&m).unwrap()),
                        Err(e) => t.error("multi-statement write", &e),
                    }
                }
                // A read and a write pipelined.
                97 => {
                    t.statements += 2;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &k];
                    let (a, b) =
                        tokio::join!(c.query_one(&read, &params), c.query_one(&write, &params));
                    match (a, b) {
                        (Ok(a), Ok(b)) => {
                            t.read_on("pipelined read", a.get(0), node.as_deref());
                            t.write_on("pipelined write", b.get(0));
                        }
                        (Err(e), _) | (_, Err(e)) => t.error("pipelined read + write", &e),
                    }
                }
                // Hints.
                _ => {
                    t.statements += 2;
                    match c
                        .simple_query(&format!("/* pgpilot:primary */ SELECT {WHERE}"))
                        .await
                    {
                        Ok(m) => t.write_on("primary hint", &first(&m).unwrap()),
                        Err(e) => t.error("primary hint", &e),
                    }
                    let sql = format!(
                        "/* pgpilot:standby */ UPDATE wl_t SET v = v + 1 WHERE client = {id} AND k = {k} RETURNING {WHERE}"
                    );
                    match c.simple_query(&sql).await {
                        Ok(m) => {
                            if let Some(n) = first(&m) {
                                t.write_on("standby-hinted write", &n);
                            }
                        }
                        Err(e) => t.error("standby-hinted write", &e),
                    }
                }
            }
            if t.statements == before {
                t.statements += 1; // the one-statement operations
            }
            done += t.statements - before;
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_never_sends_a_write_to_a_standby_and_spreads_reads() {
    const CLIENTS: i32 = 8;
    const STATEMENTS: usize = 20_000;
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE TABLE wl_t (client int, k int, v int, node text, PRIMARY KEY (client, k));
         INSERT INTO wl_t SELECT c, k, 0, 'seed' FROM generate_series(0, 7) c, generate_series(0, 39) k",
    )
    .await;
    let started = Instant::now();
    let per_client = STATEMENTS.div_ceil(CLIENTS as usize);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(workload_client(addr, id, per_client)))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        all.statements += t.statements;
        all.sessions += t.sessions;
        for (node, count) in t.reads {
            *all.reads.entry(node).or_insert(0) += count;
        }
        all.errors.extend(t.errors);
        all.misrouted.extend(t.misrouted);
    }
    eprintln!(
        "workload: {} statements in {} sessions in {:?}; reads by node {:?}; {} errors; {} misrouted",
        all.statements,
        all.sessions,
        started.elapsed(),
        all.reads,
        all.errors.len(),
        all.misrouted.len()
    );
    assert!(all.statements >= STATEMENTS, "{}", all.statements);
    let read_only_errors: Vec<&String> = all
        .errors
        .iter()
        .filter(|e| e.starts_with("25006"))
        .collect();
    assert!(
        read_only_errors.is_empty(),
        "25006 errors: {read_only_errors:#?}"
    );
    assert!(
        all.errors.is_empty(),
        "errors: {:#?}",
        &all.errors[..all.errors.len().min(20)]
    );
    assert!(
        all.misrouted.is_empty(),
        "misrouted: {:#?}",
        &all.misrouted[..all.misrouted.len().min(20)]
    );
    let standby_reads: usize = ["node1", "node2"]
        .iter()
        .map(|n| all.reads.get(*n).copied().unwrap_or(0))
        .sum();
    let primary_reads = all.reads.get(PRIMARY).copied().unwrap_or(0);
    assert!(
        standby_reads > 4 * primary_reads,
        "most reads must run on standbys: {:?}",
        all.reads
    );
    for s in ["node1", "node2"] {
        let share = all.reads.get(s).copied().unwrap_or(0) as f64 / standby_reads as f64;
        assert!(
            share > 0.15,
            "{s} got {:.0}% of the standby reads: {:?}",
            share * 100.0,
            all.reads
        );
    }
}
