//! Read-your-writes by LSN, against a real primary + 2 streaming standbys with
//! load balancing on: a session (or, in global mode, anyone) reads back what was
//! acknowledged, even when the read goes to a standby. `stress.rs` repeats the
//! hand-offs by the hundred thousand under CPU contention.

#[path = "../common/mod.rs"]
mod common;
mod stress;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use pgpilot::config::{Config, ConsistencyMode};
use tokio::sync::Mutex;

/// These tests pause replay and load the cluster: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn config(mode: ConsistencyMode) -> Config {
    let mut cfg = harness().config();
    cfg.routing.consistency = mode;
    cfg
}

/// Counts of one insert-then-read workload.
#[derive(Debug, Default)]
struct Tally {
    iterations: AtomicU64,
    missing: AtomicU64,
    on_standby: AtomicU64,
}

/// Insert row `id` into `table`, acknowledged when this returns; `i` picks
/// the form, cycling through: simple autocommit, extended autocommit, simple
/// explicit transaction, extended explicit transaction.
async fn insert_row(client: &mut tokio_postgres::Client, table: &str, id: i64, i: u64) {
    match i % 4 {
        0 => client
            .simple_query(&format!("INSERT INTO {table} VALUES ({id})"))
            .await
            .map(drop)
            .unwrap(),
        1 => client
            .execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&id])
            .await
            .map(drop)
            .unwrap(),
        2 => client
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES ({id}); COMMIT"))
            .await
            .unwrap(),
        _ => {
            let tx = client.transaction().await.unwrap();
            tx.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&id])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    }
}

/// The read of the row whose id is `id` (a literal or `$1`): how many rows
/// it found, and the node that ran it.
fn read_sql(table: &str, id: &str) -> String {
    format!("SELECT count(*)::int, current_setting('cluster_name') FROM {table} WHERE id = {id}")
}

/// Read row `id` of `table` (simple protocol for even `i`, extended for odd)
/// and count the outcome in `tally`.
async fn read_row(client: &tokio_postgres::Client, table: &str, id: i64, i: u64, tally: &Tally) {
    let read = read_sql(table, "$1");
    let (found, node): (i32, String) = if i.is_multiple_of(2) {
        let msgs = client
            .simple_query(&read_sql(table, &id.to_string()))
            .await
            .unwrap();
        let (_, rows) = result_set(&msgs);
        (rows[0][0].parse().unwrap(), rows[0][1].clone())
    } else {
        let row = client.query_one(&read, &[&id]).await.unwrap();
        (row.get(0), row.get(1))
    };
    tally.record(found, &node);
}

/// (Re)create `table` (one bigint key) through `addr`.
async fn fresh_table(addr: std::net::SocketAddr, table: &str) {
    connect(addr, "")
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint primary key)"
        ))
        .await
        .unwrap();
}

impl Tally {
    /// A read of one row found `found` rows, on `node` (`cluster_name`).
    fn record(&self, found: i32, node: &str) {
        self.iterations.fetch_add(1, Ordering::Relaxed);
        if found != 1 {
            self.missing.fetch_add(1, Ordering::Relaxed);
        }
        if node != "node0" {
            self.on_standby.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `clients` sessions each insert a row and read it back at once, `per_client`
/// times, cycling through the forms of [`insert_row`] and [`read_row`].
async fn insert_then_read(
    addr: std::net::SocketAddr,
    table: &str,
    clients: usize,
    per_client: u64,
) -> Arc<Tally> {
    fresh_table(addr, table).await;
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for c in 0..clients as u64 {
        let tally = tally.clone();
        let table = table.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(addr, "").await;
            for i in 0..per_client {
                let id = (c * per_client + i) as i64;
                insert_row(&mut client, &table, id, i).await;
                read_row(&client, &table, id, i, &tally).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally
}

fn report(mode: &str, t: &Tally, took: Duration) {
    eprintln!(
        "{mode}: {} insert-then-read iterations in {took:?}: {} missing, {} reads on standbys",
        t.iterations.load(Ordering::Relaxed),
        t.missing.load(Ordering::Relaxed),
        t.on_standby.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_global_modes_never_miss_a_row_eventual_may() {
    let _serial = SERIAL.lock().await;
    for (mode, name) in [
        (ConsistencyMode::Session, "session"),
        (ConsistencyMode::Global, "global"),
        (ConsistencyMode::Eventual, "eventual"),
    ] {
        let addr = spawn_proxy(config(mode));
        let started = Instant::now();
        let tally = insert_then_read(addr, &format!("ryw_{name}"), 8, 1250).await;
        report(name, &tally, started.elapsed());
        assert_eq!(tally.iterations.load(Ordering::Relaxed), 10_000);
        if mode != ConsistencyMode::Eventual {
            assert_eq!(
                tally.missing.load(Ordering::Relaxed),
                0,
                "{name} mode lost reads"
            );
            // Most reads still ran on standbys (waiting a little beats the primary).
            assert!(
                tally.on_standby.load(Ordering::Relaxed) > 5_000,
                "{name}: reads mostly went to the primary"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_mode_covers_a_write_seen_through_another_connection() {
    let _serial = SERIAL.lock().await;
    let addr = spawn_proxy(config(ConsistencyMode::Global));
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    a.batch_execute("DROP TABLE IF EXISTS handoff; CREATE TABLE handoff (id int)")
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(1);
    let writer = tokio::spawn(async move {
        for id in 0..1000 {
            a.execute("INSERT INTO handoff VALUES ($1)", &[&id])
                .await
                .unwrap();
            tx.send(id).await.unwrap();
        }
    });
    let mut missing = 0;
    let mut on_standby = 0;
    while let Some(id) = rx.recv().await {
        let row = b
            .query_one(
                "SELECT count(*)::int, current_setting('cluster_name') FROM handoff WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        if row.get::<_, i32>(0) != 1 {
            missing += 1;
        }
        if row.get::<_, String>(1) != "node0" {
            on_standby += 1;
        }
    }
    writer.await.unwrap();
    eprintln!("global hand-off: 1000 reads, {missing} missing, {on_standby} on standbys");
    assert_eq!(missing, 0);
    // Not by sending every read to the primary.
    assert!(on_standby > 500, "{on_standby} of 1000 reads on standbys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_mode_reads_after_a_local_command_see_later_commits() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let addr = spawn_proxy(config(ConsistencyMode::Global));
    let a = connect(addr, "").await;
    let b = connect(addr, "").await;
    a.batch_execute("DROP TABLE IF EXISTS after_local; CREATE TABLE after_local (id int)")
        .await
        .unwrap();
    // A command pgpilot answers itself, after learning the position of the
    // session's own write from the primary.
    a.execute("INSERT INTO after_local VALUES (0)", &[])
        .await
        .unwrap();
    a.simple_query("SHOW pgpilot.last_commit_lsn")
        .await
        .unwrap();
    h.cluster.lock().unwrap().wait_replayed().unwrap();
    // Another session's commit that no standby replays.
    let _resume = [1, 2].map(|n| {
        h.psql(n, "SELECT pg_wal_replay_pause()");
        ResumeReplay(n)
    });
    b.execute("INSERT INTO after_local VALUES (1)", &[])
        .await
        .unwrap();
    // The next read must see it: the position fetched for the local command
    // is older than that commit.
    let msgs = a
        .simple_query(
            "SELECT count(*)::int, current_setting('cluster_name') FROM after_local WHERE id = 1",
        )
        .await
        .unwrap();
    let (_, rows) = result_set(&msgs);
    assert_eq!(
        rows[0][0], "1",
        "the read on {} missed the commit",
        rows[0][1]
    );
}

/// A new session through pgpilot and the node its first read ran on.
async fn new_session(addr: std::net::SocketAddr) -> (tokio_postgres::Client, String) {
    let c = connect(addr, "").await;
    let node: String = c
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await
        .unwrap()
        .get(0);
    (c, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_standby_never_serves_a_session_that_just_wrote() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let mut cfg = config(ConsistencyMode::Session);
    cfg.routing.consistency_wait = Duration::from_millis(5);
    let addr = spawn_proxy(cfg);
    // A session whose standby is the one about to be paused.
    let mut found = None;
    for _ in 0..50 {
        let (c, node) = new_session(addr).await;
        if node == "node2" {
            found = Some(c);
            break;
        }
    }
    let c = found.expect("a session reading on node2");
    c.batch_execute("DROP TABLE IF EXISTS paused; CREATE TABLE paused (id int)")
        .await
        .unwrap();
    h.psql(2, "SELECT pg_wal_replay_pause()");
    let resume = common::ResumeReplay(2);
    let mut by_node = std::collections::HashMap::<String, u32>::new();
    for id in 0..200 {
        c.execute("INSERT INTO paused VALUES ($1)", &[&id])
            .await
            .unwrap();
        let row = c
            .query_one(
                "SELECT count(*)::int, current_setting('cluster_name') FROM paused WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
        *by_node.entry(row.get(1)).or_default() += 1;
    }
    drop(resume);
    eprintln!("reads after writes with node2 paused: {by_node:?}");
    assert_eq!(by_node.get("node2"), None, "a paused standby served a read");
    // Once the session stops writing and replay resumes, reads return to both standbys.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    while Instant::now() < deadline && !(seen.contains("node1") && seen.contains("node2")) {
        // A new session picks its standby by weight: both get reads.
        seen.insert(new_session(addr).await.1);
    }
    assert!(
        seen.contains("node2"),
        "reads never returned to node2: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_databases_and_roles_are_usable_at_once() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    h.psql(0, "ALTER ROLE app CREATEROLE");
    let mut cfg = config(ConsistencyMode::Session);
    let tag = std::process::id();
    let (role, db) = (format!("fresh_role_{tag}"), format!("fresh_db_{tag}"));
    cfg.users.push(
        pgpilot::config::Config::from_toml(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\n[[users]]\nname = \"{role}\"\npassword = \"pw\"\n"
        ))
        .unwrap()
        .users
        .remove(0),
    );
    let addr = spawn_proxy(cfg);
    let c = connect(addr, "").await;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await
        .unwrap();
    c.batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await
        .unwrap();
    c.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    // A new connection to the new database, reads included, at once.
    let conninfo = |user: &str, pw: &str, dbname: &str| {
        format!(
            "host={} port={} user={user} password={pw} dbname={dbname} connect_timeout=10",
            addr.ip(),
            addr.port()
        )
    };
    let (d, conn) = tokio_postgres::connect(&conninfo(USER, PASSWORD, &db), tokio_postgres::NoTls)
        .await
        .expect("connect to a database created a moment ago");
    tokio::spawn(conn);
    let one: i32 = d.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // ... and as the new role.
    let (r, conn) = tokio_postgres::connect(&conninfo(&role, "pw", DB), tokio_postgres::NoTls)
        .await
        .expect("log in as a role created a moment ago");
    tokio::spawn(conn);
    let who: String = r
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, role);
    drop((d, r));
    wait_until(
        "the sessions of the new database and role to end",
        Duration::from_secs(30),
        async || {
            let (cols, rows) = show(&c, "SHOW POOL_PROCESSES").await;
            let col = |n: &str| cols.iter().position(|c| c == n).expect("a column");
            let (database, user) = (col("database"), col("username"));
            !rows.iter().any(|r| r[database] == db || r[user] == role)
        },
    )
    .await;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_tokens() {
    let _serial = SERIAL.lock().await;
    let addr = spawn_proxy(config(ConsistencyMode::Session));
    let c = connect(addr, "").await;
    c.batch_execute("DROP TABLE IF EXISTS tokens; CREATE TABLE tokens (id int)")
        .await
        .unwrap();
    let before: String = c
        .query_one(
            "/* pgpilot:primary */ SELECT pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.execute("INSERT INTO tokens VALUES (1)", &[])
        .await
        .unwrap();
    // Simple and extended protocol both answer the token.
    let msgs = c
        .simple_query("SHOW pgpilot.last_commit_lsn")
        .await
        .unwrap();
    let (cols, rows) = result_set(&msgs);
    assert_eq!(cols, vec!["last_commit_lsn"]);
    let lsn = rows[0][0].clone();
    let row = c
        .query_one("SHOW pgpilot.last_commit_lsn", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), lsn);
    let parse = |s: &str| pgpilot::cluster::replication::parse_lsn(s).unwrap();
    assert!(parse(&lsn) > parse(&before), "{lsn} is not after {before}");

    // Another connection carrying the token reads the row wherever it reads.
    let other = connect(addr, "").await;
    other
        .batch_execute(&format!("SET pgpilot.min_lsn = '{lsn}'"))
        .await
        .unwrap();
    let n: i64 = other
        .query_one("SELECT count(*) FROM tokens", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let shown: String = other
        .query_one("SHOW pgpilot.min_lsn", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, lsn);

    // A position no standby has reached yet: the read runs on the primary.
    other
        .batch_execute("SET pgpilot.min_lsn = 'FF/0'")
        .await
        .unwrap();
    let node: String = other
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(node, "node0");
    other.batch_execute("RESET pgpilot.min_lsn").await.unwrap();

    // Bad input is an error, not a silent ignore.
    let e = other
        .batch_execute("SET pgpilot.min_lsn = 'yesterday'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22P02"), "{e}");
    // The session is still usable.
    other.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_poller_sleeps_when_unneeded_and_wakes_for_a_read() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let mut cfg = config(ConsistencyMode::Session);
    let role = own_monitor_role(h, &mut cfg, "mon_lsn").await;
    let addr = spawn_proxy(cfg);
    let c = connect(addr, "").await;
    c.batch_execute("DROP TABLE IF EXISTS dormant; CREATE TABLE dormant (id int)")
        .await
        .unwrap();
    let read = "SELECT count(*)::int FROM dormant";
    // A read after a write needs positions: the poller runs.
    c.execute("INSERT INTO dormant VALUES (1)", &[])
        .await
        .unwrap();
    assert_eq!(c.query_one(read, &[]).await.unwrap().get::<_, i32>(0), 1);
    let lsn_conns = |node| monitor_backends(h, node, &role, "pgpilot-lsn");
    assert!(!lsn_conns(1).is_empty() || !lsn_conns(2).is_empty());
    // Nobody needs them for longer than DORMANT_AFTER: it stops asking.
    // Time itself: the poller must go dormant after DORMANT_AFTER.
    tokio::time::sleep(pgpilot::consistency::DORMANT_AFTER + Duration::from_secs(1)).await;
    let before = (lsn_conns(1), lsn_conns(2));
    // Time itself: a poller still awake would ask every IDLE_POLL (50 ms).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        (lsn_conns(1), lsn_conns(2)),
        before,
        "the poller kept polling"
    );
    // The next read after a write wakes it, and still sees the write.
    for i in 2..=20 {
        c.execute("INSERT INTO dormant VALUES ($1)", &[&i])
            .await
            .unwrap();
        assert_eq!(c.query_one(read, &[]).await.unwrap().get::<_, i32>(0), i);
    }
    assert_ne!(
        (lsn_conns(1), lsn_conns(2)),
        before,
        "the poller did not wake"
    );
}
