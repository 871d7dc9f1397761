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
//! Sections follow the routing issue, one module each: 1. classifier rules
//! (`classifier.rs`), 2. transactions (`transactions.rs`), 3. session
//! consistency (`session_settings.rs`), 4. choosing the standby and 6. a
//! randomised mixed workload (`balancing.rs`); 5., the randomised classifier
//! test, is a unit test of the library
//! (`random_sql_never_panics_and_write_starts_are_write` in
//! `src/router/classify/tests.rs`). This file holds the shared helpers.

#[path = "../common/mod.rs"]
mod common;

mod balancing;
mod classifier;
mod node_local;
mod session_settings;
mod shapes;
mod sql_prepare;
mod transactions;
mod unlogged;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    DB, PASSWORD, Spawned, USER, connect, harness, nodes_in_service, spawn_proxy_full, sqlstate,
    wait_until,
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
        for s in &self.su[1..] {
            wait_until(
                &format!("a standby to replay {lsn}"),
                Duration::from_secs(30),
                async || {
                    s.query_one(
                        "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                        &[&lsn],
                    )
                    .await
                    .unwrap()
                    .get(0)
                },
            )
            .await;
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
    /// The type byte of every message, in order.
    tags: Vec<u8>,
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
            r.tags.push(t);
            match t {
                b'D' => r.values.push(first_value(&body)),
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
    /// Read up to the next CommandComplete (what a Flush got of a batch):
    /// the first-column values. Panics on an error.
    async fn until_complete(&mut self) -> Vec<String> {
        let mut values = Vec::new();
        loop {
            let (t, body) = read_msg(&mut self.s).await;
            match t {
                b'C' => return values,
                b'D' => values.push(first_value(&body)),
                b'E' => panic!("error: {:?}", common::raw::sqlstate_of(&body)),
                _ => {}
            }
        }
    }

    /// Bind and Execute of statement `name`, then Sync: its answer.
    async fn run_statement(&mut self, name: &str) -> Reply {
        let mut buf = bytes::BytesMut::new();
        bind_execute(name, &mut buf);
        postgres_protocol::message::frontend::sync(&mut buf);
        self.s.write_all(&buf).await.unwrap();
        self.until_ready().await
    }

    /// A simple Query of `sql`.
    async fn simple(&mut self, sql: &str) -> Reply {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut buf).unwrap();
        self.s.write_all(&buf).await.unwrap();
        self.until_ready().await
    }

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

/// The first column of a DataRow body, as text ("NULL" for null).
fn first_value(body: &[u8]) -> String {
    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
    if len < 0 {
        "NULL".to_string()
    } else {
        String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
    }
}

/// Parse, Bind and Execute of `sql` (unnamed statement and portal, no parameters).
fn parse_bind_execute(sql: &str, buf: &mut bytes::BytesMut) {
    postgres_protocol::message::frontend::parse("", sql, std::iter::empty(), buf).unwrap();
    bind_execute("", buf);
}

/// Bind and Execute of statement `name` (unnamed portal, no parameters).
fn bind_execute(name: &str, buf: &mut bytes::BytesMut) {
    use postgres_protocol::message::frontend;
    frontend::bind(
        "",
        name,
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
