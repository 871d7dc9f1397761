//! Session consistency (section 3): settings (`SET`, startup options) apply
//! on every node a session uses, as the transaction that made them ended.

use super::*;

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

/// A batch that arrives in two reads is routed on its first part (to the
/// primary: it might still write). A named statement its second part binds,
/// which the session had prepared on its standby only, is prepared on the
/// primary before the batch starts, so the Bind finds it there.
#[tokio::test]
async fn a_batch_split_across_reads_binds_a_statement_prepared_on_another_node() {
    use postgres_protocol::message::frontend;
    let addr = proxy().await;
    let mut raw = Raw::login(addr).await;
    let mut buf = bytes::BytesMut::new();
    // Prepared by a read-only batch: on the session's standby alone.
    frontend::parse(
        "split_s",
        &format!("SELECT {WHERE}"),
        std::iter::empty(),
        &mut buf,
    )
    .unwrap();
    frontend::sync(&mut buf);
    raw.s.write_all(&buf).await.unwrap();
    let r = raw.until_ready().await;
    assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'I'), "{r:?}");
    let r = raw.run_statement("split_s").await;
    assert_eq!(r.errors, Vec::<String>::new());
    assert!(is_standby(&r.values[0]), "{r:?}");
    // The batch's first part, answered (Flush) before its second is sent.
    buf.clear();
    parse_bind_execute(&format!("SELECT {WHERE}"), &mut buf);
    frontend::flush(&mut buf);
    raw.s.write_all(&buf).await.unwrap();
    assert_eq!(raw.until_complete().await, vec![PRIMARY.to_string()]);
    let r = raw.run_statement("split_s").await;
    assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'I'), "{r:?}");
    assert_eq!(r.values, vec![PRIMARY.to_string()]);
    // And the session's statement still runs on its standby afterwards.
    let r = raw.run_statement("split_s").await;
    assert_eq!(r.errors, Vec::<String>::new());
    assert!(is_standby(&r.values[0]), "{r:?}");
}

/// A batch split across reads inside a transaction block (on the primary)
/// binds, in its second read, a named statement and the unnamed one that
/// the session prepared on its standby alone: pgpilot puts the session's
/// Parses in front of the Binds, and the client sees only its own answers.
#[tokio::test]
async fn a_split_batch_in_a_transaction_binds_named_and_unnamed_statements_from_a_standby() {
    use postgres_protocol::message::frontend;
    let addr = proxy().await;
    let mut raw = Raw::login(addr).await;
    let mut buf = bytes::BytesMut::new();
    // A Parse-only batch reads nothing: it goes to the session's standby.
    for (name, sql) in [
        ("tx_split_a", format!("SELECT {WHERE}")),
        ("tx_split_b", format!("SELECT 'b ' || {WHERE}")),
        ("", format!("SELECT 'unnamed ' || {WHERE}")),
    ] {
        frontend::parse(name, &sql, std::iter::empty(), &mut buf).unwrap();
    }
    frontend::sync(&mut buf);
    raw.s.write_all(&buf).await.unwrap();
    let r = raw.until_ready().await;
    assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'I'), "{r:?}");
    // Simple Queries: an unnamed Parse would replace the session's.
    let r = raw.simple("BEGIN").await;
    assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'T'), "{r:?}");
    // The batch's first part, answered (Flush) before its second is sent.
    buf.clear();
    bind_execute("tx_split_a", &mut buf);
    frontend::flush(&mut buf);
    raw.s.write_all(&buf).await.unwrap();
    assert_eq!(raw.until_complete().await, vec![PRIMARY.to_string()]);
    buf.clear();
    bind_execute("tx_split_b", &mut buf);
    bind_execute("", &mut buf);
    frontend::sync(&mut buf);
    raw.s.write_all(&buf).await.unwrap();
    let r = raw.until_ready().await;
    assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'T'), "{r:?}");
    assert_eq!(
        r.values,
        vec![format!("b {PRIMARY}"), format!("unnamed {PRIMARY}")]
    );
    // BindComplete, DataRow, CommandComplete twice: no answer of pgpilot's
    // own Parses reaches the client.
    assert_eq!(r.tags, b"2DC2DCZ".to_vec(), "{r:?}");
    let r = raw.simple("COMMIT").await;
    assert_eq!((r.errors.as_slice(), r.status), (&[][..], 'I'), "{r:?}");
    // The session's statements still run, on its standby.
    for (name, want) in [("tx_split_b", "b "), ("", "unnamed ")] {
        let r = raw.run_statement(name).await;
        assert_eq!(r.errors, Vec::<String>::new(), "{name:?}");
        let node = r.values[0].strip_prefix(want).unwrap_or_default();
        assert!(is_standby(node), "{name:?}: {r:?}");
    }
}
