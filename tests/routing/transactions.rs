//! Transactions (section 2): an explicit transaction runs on one node, the
//! primary unless it is read-only; `disable_load_balance_on_write =
//! "transaction"`.

use super::*;

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
