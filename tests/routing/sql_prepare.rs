//! SQL-level PREPARE behaves as on one server (issue 21, item 4): a statement
//! prepared with `PREPARE` can be deallocated, listed, explained and used by
//! any other SQL of the session (`CREATE TABLE … AS EXECUTE`, a PL/pgSQL
//! `EXECUTE 'EXECUTE q'`), whichever node prepared it and whichever runs
//! that SQL; a PREPARE that cannot be prepared fails at once.

use super::*;

/// The names `pg_prepared_statements` lists for the session, sorted.
async fn listed(s: &Sess) -> Vec<String> {
    let sql = "SELECT name FROM pg_prepared_statements ORDER BY name";
    column(
        &s.c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e))),
    )
}

#[tokio::test]
async fn sql_prepared_statements_are_listed_and_deallocated_as_on_one_server() {
    let addr = proxy().await;
    let s = sess(addr, "sqlprep_list").await;
    assert!(is_standby(&s.read_node().await));
    // Prepared outside a transaction, in a read-write transaction (on the
    // primary) and in a read-only one (on the standby).
    s.c.batch_execute(&format!("PREPARE l_read AS SELECT {WHERE}"))
        .await
        .unwrap();
    s.c.batch_execute("BEGIN; PREPARE l_rw(int) AS SELECT $1 * 2; COMMIT")
        .await
        .unwrap();
    s.c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute("PREPARE l_ro AS SELECT 'ro'")
        .await
        .unwrap();
    s.c.batch_execute("COMMIT").await.unwrap();
    // One that cannot be prepared fails at once and is not made.
    let e =
        s.c.simple_query("PREPARE l_bad AS SELECT * FROM l_no_such_table")
            .await
            .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"), "{e}");
    assert_eq!(listed(&s).await, ["l_read", "l_ro", "l_rw"]);
    // Executed on the session's standby: still listed once.
    assert!(is_standby(&s.one("EXECUTE l_read").await));
    assert_eq!(s.one("EXECUTE l_rw(4)").await, "8");
    assert_eq!(listed(&s).await, ["l_read", "l_ro", "l_rw"]);
    // Statements never executed are deallocated; one executed on a standby
    // too (and is gone there).
    s.c.batch_execute("DEALLOCATE l_ro").await.unwrap();
    assert_eq!(listed(&s).await, ["l_read", "l_rw"]);
    s.c.batch_execute("DEALLOCATE PREPARE l_read")
        .await
        .unwrap();
    assert_eq!(listed(&s).await, ["l_rw"]);
    for sql in [
        "EXECUTE l_read",
        "/* pgpilot:primary */ EXECUTE l_read",
        "EXECUTE l_ro",
        "EXECUTE l_bad",
    ] {
        let e = s.c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{sql}");
    }
    // A name never prepared: PostgreSQL's error.
    let e = s.c.simple_query("DEALLOCATE l_never").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    // Prepared twice: the second PREPARE fails as on one server.
    let e =
        s.c.simple_query("PREPARE l_rw AS SELECT 2")
            .await
            .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42P05"), "{e}");
    assert_eq!(s.one("EXECUTE l_rw(1)").await, "2");
    s.c.batch_execute("DEALLOCATE ALL").await.unwrap();
    assert_eq!(listed(&s).await, Vec::<String>::new());
}

#[tokio::test]
async fn other_sql_of_the_session_uses_its_sql_prepared_statements() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "CREATE FUNCTION u_run(name text) RETURNS text LANGUAGE plpgsql AS $$ \
         DECLARE r text; BEGIN EXECUTE format('EXECUTE %I(7)', name) INTO r; RETURN r; END $$",
    )
    .await;
    let s = sess(addr, "sqlprep_use").await;
    assert!(is_standby(&s.read_node().await));
    s.c.batch_execute(&format!(
        "PREPARE u_q(int) AS SELECT $1 + 1 AS v, {WHERE} AS node"
    ))
    .await
    .unwrap();
    // Explained, with or without running it.
    for explain in ["EXPLAIN", "EXPLAIN ANALYZE", "EXPLAIN (COSTS OFF)"] {
        let sql = format!("{explain} EXECUTE u_q(1)");
        let plan = s.c.simple_query(&sql).await;
        plan.unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }
    // Run by a function (volatile: the primary) and by a DO block.
    assert_eq!(s.one("SELECT u_run('u_q')").await, "8");
    s.c.batch_execute(
        "DO $$ DECLARE r int; BEGIN EXECUTE 'EXECUTE u_q(2)' INTO r; \
         IF r <> 3 THEN RAISE 'got %', r; END IF; END $$",
    )
    .await
    .unwrap();
    // Stored by CREATE TABLE … AS EXECUTE.
    s.c.batch_execute("CREATE TABLE u_copy AS EXECUTE u_q(41)")
        .await
        .unwrap();
    assert_eq!(
        s.one("/* pgpilot:primary */ SELECT v || ' ' || node FROM u_copy")
            .await,
        "42 node0"
    );
    // Executed on the standby, then deallocated: gone for every use.
    assert_eq!(s.one("EXECUTE u_q(1)").await, "2");
    s.c.batch_execute("DEALLOCATE u_q").await.unwrap();
    for sql in [
        "SELECT u_run('u_q')",
        "EXPLAIN EXECUTE u_q(1)",
        "EXECUTE u_q(1)",
    ] {
        let e = s.c.simple_query(sql).await.unwrap_err();
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("26000"),
            "{sql}: {}",
            describe(&e)
        );
    }
}
