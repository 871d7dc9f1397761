//! Classifier rules through pgpilot (section 1 of the routing issue): which
//! statements run on the primary, which may run on the session's standby,
//! and how pipelined requests for different nodes are ordered.

use super::*;

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
