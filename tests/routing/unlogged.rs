//! Reads a hot standby refuses (issue 28): unlogged relations go to the
//! primary, whatever names them, and a refusal the lookup did not predict is
//! retried there.

use super::*;

/// Every kind of read of an unlogged table works (on the primary), from a
/// session that has a standby for its reads.
#[tokio::test]
async fn reads_of_unlogged_tables_run_on_the_primary() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE UNLOGGED TABLE unl_a (x int);
         INSERT INTO unl_a VALUES (1);
         CREATE TABLE unl_logged (x int);
         INSERT INTO unl_logged VALUES (2);
         CREATE VIEW unl_view AS SELECT x FROM unl_a;
         CREATE VIEW unl_view2 AS SELECT v.x FROM unl_view v JOIN unl_logged USING (x);
         CREATE TABLE unl_parted (x int) PARTITION BY RANGE (x);
         CREATE UNLOGGED TABLE unl_part1 PARTITION OF unl_parted FOR VALUES FROM (0) TO (10);
         CREATE SCHEMA unl_s;
         CREATE UNLOGGED TABLE unl_s.\"Quoted\" (x int);",
    )
    .await;
    let s = sess(addr, "unl").await;
    assert!(is_standby(&s.read_node().await));
    for sql in [
        "SELECT x FROM unl_a",
        "SELECT x FROM public.unl_a WHERE x = 1",
        "SELECT x FROM unl_view",
        "SELECT count(*) FROM unl_view2",
        "SELECT count(*) FROM unl_parted",
        "SELECT count(*) FROM unl_s.\"Quoted\"",
        "SELECT (SELECT max(x) FROM unl_a), count(*) FROM unl_logged",
        "WITH w AS (SELECT x FROM unl_a) SELECT count(*) FROM w",
        "TABLE unl_a",
        "EXPLAIN SELECT * FROM unl_a",
    ] {
        s.expect(&n, sql, None, On::Primary).await;
    }
    // A logged table still reads on the standby.
    s.expect(&n, "SELECT x FROM unl_logged", None, On::Standby)
        .await;
    // In a string of several statements.
    let msgs =
        s.c.simple_query("SELECT 1; SELECT x FROM unl_a")
            .await
            .unwrap_or_else(|e| panic!("multi-statement: {}", describe(&e)));
    assert_eq!(column(&msgs), ["1", "1"]);
    // Over the extended protocol: the client's prepared statement, and a batch.
    let row = s.c.query_one("SELECT x FROM unl_a", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    let mut raw = Raw::login(addr).await;
    let r = raw
        .batch(&["SELECT x FROM unl_logged", "SELECT x FROM unl_a"])
        .await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, ["2", "1"]);
    // A new session (no memo, nothing looked up by it).
    let s2 = sess(addr, "unl_new").await;
    s2.expect(&n, "SELECT x FROM unl_a", None, On::Primary)
        .await;
}

/// A table read on a standby, then made unlogged through pgpilot: the next
/// read goes to the primary (the cached answer is forgotten at the DDL).
#[tokio::test]
async fn a_table_set_unlogged_through_pgpilot_moves_its_reads() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup("CREATE TABLE unl_switch (x int); INSERT INTO unl_switch VALUES (7)")
        .await;
    let s = sess(addr, "unl_switch").await;
    // Each read has its own text: pg_stat_activity tells where each ran.
    let sql = "SELECT x FROM unl_switch";
    assert_eq!(
        s.expect(&n, sql, None, On::Standby).await.as_deref(),
        Some("7")
    );
    let sql = "SELECT x AS y FROM unl_switch";
    // Another session changes it, inside a transaction.
    let other = sess(addr, "unl_switch_ddl").await;
    other
        .c
        .batch_execute("BEGIN; ALTER TABLE unl_switch SET UNLOGGED; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        s.expect(&n, sql, None, On::Primary).await.as_deref(),
        Some("7")
    );
    // And back: logged again, the reads return to the standby.
    other
        .c
        .batch_execute("ALTER TABLE unl_switch SET LOGGED")
        .await
        .unwrap();
    n.wait_replayed().await;
    let sql = "SELECT x AS z FROM unl_switch";
    s.expect(&n, sql, None, On::Standby).await;
}

/// The retries counted so far by the pgpilot whose metrics are at `metrics`.
async fn retried(metrics: SocketAddr) -> f64 {
    let (_, body) = common::http_get(metrics, "/metrics").await;
    common::parse_metrics(&body)
        .get("pgpilot_standby_refusals_retried_total")
        .copied()
        .unwrap_or(0.0)
}

/// Refusals the unlogged lookup cannot predict (a function reading an
/// unlogged table, a function a standby cannot run) are run again on the
/// primary, once per statement shape; inside a read-only transaction on a
/// standby the refusal reaches the client, as from the standby itself.
#[tokio::test]
async fn a_read_a_standby_refuses_runs_again_on_the_primary() {
    let p = spawn_proxy_full(routing_config());
    nodes_in_service(&p).await;
    let (addr, metrics) = (p.addr, p.metrics.expect("metrics on"));
    let n = nodes().await;
    n.setup(
        "CREATE UNLOGGED TABLE unl_net (x int);
         INSERT INTO unl_net VALUES (1), (2);
         CREATE FUNCTION unl_net_count() RETURNS bigint STABLE LANGUAGE sql
             AS 'SELECT count(*) FROM unl_net';",
    )
    .await;
    let s = sess(addr, "unl_net").await;
    assert!(is_standby(&s.read_node().await));
    let before = retried(metrics).await;
    // Simple protocol: the answer comes from the primary, the refusal is not seen.
    let sql = format!("SELECT unl_net_count() + 0, {WHERE}");
    let msgs =
        s.c.simple_query(&sql)
            .await
            .expect("retried on the primary");
    let row = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string()))
            }
            _ => None,
        })
        .expect("a row");
    assert_eq!(row, ("2".to_string(), PRIMARY.to_string()));
    assert_eq!(retried(metrics).await, before + 1.0);
    // The shape is remembered: the next one goes to the primary directly
    // (the standby never sees it).
    let sql = format!("SELECT unl_net_count() + 1, {WHERE}");
    s.expect(&n, &sql, None, On::Primary).await;
    assert_eq!(retried(metrics).await, before + 1.0);
    // A recovery-only function (55000 on a standby), over the extended protocol:
    // a prepared statement, and an unnamed Parse/Bind/Execute/Sync batch.
    let lsn =
        s.c.query_one("SELECT pg_walfile_name('0/1000000')", &[])
            .await;
    assert!(lsn.is_ok(), "{:?}", lsn.err().map(|e| describe(&e)));
    let mut raw = Raw::login(addr).await;
    let r = raw
        .batch(&["SELECT pg_walfile_name('0/1000000') AS batched"])
        .await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values.len(), 1);
    assert_eq!(r.status, 'I');
    assert_eq!(retried(metrics).await, before + 3.0);
    // Inside BEGIN READ ONLY on a standby: no retry, the client gets the error.
    s.c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let node = s.one(&format!("SELECT {WHERE}")).await;
    assert!(is_standby(&node), "{node}");
    let e =
        s.c.simple_query("SELECT pg_walfile_name('0/1000000') AS in_tx")
            .await
            .expect_err("refused in the transaction");
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{}", describe(&e));
    let e =
        s.c.simple_query("SELECT x FROM unl_net")
            .await
            .expect_err("aborted transaction");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{}", describe(&e));
    s.c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(retried(metrics).await, before + 3.0);
}
