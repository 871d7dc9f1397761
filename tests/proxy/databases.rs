//! Statements that need a database without other sessions (`DROP DATABASE`,
//! `ALTER DATABASE … RENAME`, `CREATE DATABASE … TEMPLATE`) while pgpilot
//! holds idle pooled connections to it, on the primary and on a standby.

use super::*;
use common::show;

/// pgpilot's pooled connections to `database` (node id, status), from
/// `SHOW POOL_POOLS`.
async fn pooled(admin: &tokio_postgres::Client, database: &str) -> Vec<(String, String)> {
    let (cols, rows) = show(admin, "SHOW POOL_POOLS").await;
    let col = |n: &str| {
        cols.iter()
            .position(|c| c == n)
            .expect("a POOL_POOLS column")
    };
    let (node, db, status) = (col("node_id"), col("database"), col("status"));
    rows.into_iter()
        .filter(|r| r[db] == database)
        .map(|r| (r[node].clone(), r[status].clone()))
        .collect()
}

/// Wait until pgpilot has idle pooled connections to `database` on the
/// primary and on a standby.
async fn wait_idle_on_primary_and_standby(admin: &tokio_postgres::Client, database: &str) {
    wait_until(
        &format!("idle connections to {database} on the primary and a standby"),
        Duration::from_secs(30),
        async || {
            let idle: Vec<String> = pooled(admin, database)
                .await
                .into_iter()
                .filter(|(_, s)| s == "idle")
                .map(|(n, _)| n)
                .collect();
            idle.iter().any(|n| n == "0") && idle.iter().any(|n| n != "0")
        },
    )
    .await;
}

/// Wait until `database` exists on every standby (a client may be balanced there).
async fn wait_replicated(database: &str) {
    let h = harness();
    let sql = format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'");
    for node in 1..h.ports.len() {
        wait_until(
            &format!("{database} on node {node}"),
            Duration::from_secs(30),
            async || h.psql(node, &sql) == "1",
        )
        .await;
    }
}

/// A client of `database` that reads (on its standby) and writes (on the
/// primary), then stays connected.
async fn use_database(database: &str) -> tokio_postgres::Client {
    let c = connect(harness().proxy, &format!("dbname={database}")).await;
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("CREATE TABLE IF NOT EXISTS t (x int)")
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn a_database_pgpilot_pools_connections_to_can_be_dropped_renamed_and_copied() {
    let h = harness();
    let admin = connect(h.proxy, "").await;
    let (dropped, db, renamed, copy) = ("dropme_i21", "db_i21", "renamed_i21", "copy_i21");
    let run = |sql: String| {
        let admin = &admin;
        async move { admin.simple_query(&sql).await }
    };
    for d in [dropped, db, renamed, copy] {
        run(format!("DROP DATABASE IF EXISTS {d}")).await.unwrap();
    }

    // A client used the database and left: pgpilot's idle connections to it
    // do not stop its drop.
    run(format!("CREATE DATABASE {dropped}")).await.unwrap();
    wait_replicated(dropped).await;
    drop(use_database(dropped).await);
    wait_idle_on_primary_and_standby(&admin, dropped).await;
    run(format!("DROP DATABASE {dropped}")).await.unwrap();

    // A client still connected: PostgreSQL's own error, and the client's
    // connections are left alone. Once it leaves, the rename goes through.
    run(format!("CREATE DATABASE {db}")).await.unwrap();
    wait_replicated(db).await;
    let user = use_database(db).await;
    let e = run(format!("ALTER DATABASE {db} RENAME TO {renamed}"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55006"), "{e}");
    user.simple_query("SELECT 1").await.unwrap();
    drop(user);
    run(format!("ALTER DATABASE {db} RENAME TO {renamed}"))
        .await
        .unwrap();
    wait_replicated(renamed).await;

    // Copied, through the extended protocol.
    drop(use_database(renamed).await);
    wait_idle_on_primary_and_standby(&admin, renamed).await;
    admin
        .execute(&format!("CREATE DATABASE {copy} TEMPLATE {renamed}"), &[])
        .await
        .unwrap();

    // Dropped the moment the client leaves (its connections may be on their
    // way back to the pool), through the extended protocol.
    drop(use_database(renamed).await);
    admin
        .execute(&format!("DROP DATABASE {renamed}"), &[])
        .await
        .unwrap();
    run(format!("DROP DATABASE {copy}")).await.unwrap();
    // None kept, on the primary or the standbys (which end their own
    // sessions of a database as they replay its drop).
    for d in [dropped, db, renamed, copy] {
        wait_until(
            &format!("no pooled connection to {d}"),
            Duration::from_secs(30),
            async || pooled(&admin, d).await.is_empty(),
        )
        .await;
    }
}
