//! What a client's session keeps across a failover: its prepared statements'
//! shapes (issue 21, item 1).

use super::*;

/// Column `b` of table `shape_f` on `node`, by type name.
async fn type_of_b(c: &Arc<LocalCluster>, node: usize) -> String {
    psql(
        c,
        node,
        "SELECT format_type(atttypid, NULL) FROM pg_attribute \
         WHERE attrelid = 'shape_f'::regclass AND attname = 'b'",
    )
    .await
}

/// tokio-postgres describes a statement on a standby; the column's type
/// changes; the primary fails over. The statement, parsed on the new primary,
/// has another result type: the client gets 0A000 (as PostgreSQL's cached
/// statement would), not values decoded with the old type.
#[tokio::test]
async fn a_statement_parsed_on_the_new_primary_after_a_failover_keeps_its_shape() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false, &[]).await;
    psql(
        &cluster,
        0,
        "CREATE TABLE shape_f (a int, b int); INSERT INTO shape_f VALUES (1, 2); \
         ALTER TABLE shape_f OWNER TO app",
    )
    .await;
    let mut cfg = config_for(&cluster);
    // Reads on node 2, which is never promoted: node 1 becomes the primary
    // and has never seen the statement.
    cfg.backends[1].weight = 0.0;
    cfg.backends[2].no_failover = true;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    // Node 2 serves the first prepare: it must have replayed the table.
    wait_until(
        "node 2 to replay the table",
        Duration::from_secs(30),
        async || psql(&cluster, 2, "SELECT to_regclass('shape_f') IS NOT NULL").await == "t",
    )
    .await;
    let c = connect(p.addr, "application_name=shape_failover").await;
    let sql = "SELECT current_setting('cluster_name'), a, b FROM shape_f";
    let stmt = c.prepare(sql).await.unwrap();
    let row = c.query_one(&stmt, &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "node2");
    assert_eq!(row.get::<_, i32>(2), 2);
    psql(&cluster, 0, "ALTER TABLE shape_f ALTER COLUMN b TYPE real").await;
    // Both standbys replay the ALTER before the primary dies: the statement
    // prepared again afterwards (on node 2) must see the new type.
    for node in [1, 2] {
        wait_until(
            &format!("node {node} to replay the ALTER"),
            Duration::from_secs(30),
            async || type_of_b(&cluster, node).await == "real",
        )
        .await;
    }
    let since = kill_primary(&cluster, &p).await;
    new_primary(&p, 1, since, Duration::from_secs(60)).await;
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .query(&stmt, &[])
        .await
        .expect_err("parsed on node 1, the statement returns real");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    let again = c.prepare(sql).await.unwrap();
    let row = c.query_one(&again, &[]).await.unwrap();
    assert_eq!(row.get::<_, f32>(2), 2.0);
}
