//! Tests of the classifier, one per rule (the randomised robustness test is
//! in `fuzz_tests.rs`).

use super::*;
use crate::router::relations::RelationName;

fn c(sql: &str) -> Classification {
    SqlParserClassifier::default().classify(sql)
}

fn with(policy: FunctionPolicy, sql: &str) -> Classification {
    SqlParserClassifier::new(policy).classify(sql)
}

#[track_caller]
fn write(sql: &str) {
    assert_eq!(c(sql).access, Access::Write, "expected Write: {sql}");
}

#[track_caller]
fn read(sql: &str) {
    let class = c(sql);
    assert_eq!(
        class.access,
        Access::Read,
        "expected Read: {sql}: {class:?}"
    );
    assert!(!class.parse_failed, "{sql}");
}

#[track_caller]
fn sticky(sql: &str, expected: bool) {
    assert_eq!(c(sql).sticky_primary, expected, "sticky_primary of {sql}");
}

#[test]
fn dml_is_write() {
    write("INSERT INTO t VALUES (1)");
    write("UPDATE t SET a = 1 WHERE b = 2");
    write("DELETE FROM t WHERE a = 1");
    write("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE");
    write("TRUNCATE t");
    write("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x");
}

#[test]
fn ddl_is_write() {
    write("CREATE TABLE t (a int)");
    write("CREATE INDEX ON t (a)");
    write("ALTER TABLE t ADD COLUMN b int");
    write("DROP TABLE t");
    write("COMMENT ON TABLE t IS 'x'");
    write("GRANT SELECT ON t TO u");
    write("REVOKE SELECT ON t FROM u");
    write("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END");
    write("CREATE EXTENSION foo");
    write("SECURITY LABEL ON TABLE t IS 'x'");
}

#[test]
fn copy_from_and_copy_to_file_are_write_copy_to_stdout_is_read() {
    write("COPY t FROM STDIN");
    write("COPY t FROM '/tmp/x'");
    write("COPY t TO '/tmp/x'");
    write("COPY t TO PROGRAM 'cat'");
    write("COPY (SELECT nextval('s')) TO STDOUT");
    read("COPY t TO STDOUT");
    read("COPY (SELECT * FROM t WHERE a = 1) TO STDOUT WITH (FORMAT csv)");
}

#[test]
fn call_do_lock_are_write() {
    write("CALL p(1)");
    write("DO $$ BEGIN PERFORM 1; END $$");
    write("LOCK TABLE t IN ACCESS EXCLUSIVE MODE");
}

#[test]
fn maintenance_is_write() {
    for sql in [
        "VACUUM t",
        "VACUUM (ANALYZE) t",
        "ANALYZE t",
        "CLUSTER t",
        "REINDEX TABLE t",
        "REFRESH MATERIALIZED VIEW v",
        "CHECKPOINT",
    ] {
        write(sql);
    }
}

#[test]
fn listen_unlisten_notify_are_write() {
    write("LISTEN ch");
    write("UNLISTEN ch");
    write("UNLISTEN *");
    write("NOTIFY ch, 'x'");
}

#[test]
fn cursors_are_write() {
    write("DECLARE c CURSOR FOR SELECT 1");
    write("FETCH 5 FROM c");
    write("MOVE NEXT FROM c");
    write("CLOSE c");
    write("CLOSE ALL");
}

#[test]
fn prepared_transactions_are_write_with_tx() {
    let p = c("PREPARE TRANSACTION 'gx1'");
    assert_eq!(
        (p.access, p.tx),
        (Access::Write, Some(TxControl::PrepareTransaction))
    );
    for sql in ["COMMIT PREPARED 'gx1'", "ROLLBACK PREPARED 'gx1'"] {
        let p = c(sql);
        assert_eq!(
            (p.access, p.tx),
            (Access::Write, Some(TxControl::CommitPrepared)),
            "{sql}"
        );
    }
}

#[test]
fn select_into_is_write() {
    write("SELECT * INTO t2 FROM t");
    write("SELECT a INTO UNLOGGED t2 FROM t");
    sticky("SELECT * INTO t2 FROM t", false);
    sticky("SELECT * INTO TEMP t2 FROM t", true);
    sticky("SELECT * INTO TEMPORARY TABLE t2 FROM t", true);
    sticky("SELECT * INTO pg_temp.t2 FROM t", true);
}

#[test]
fn every_locking_clause_is_write() {
    write("SELECT * FROM t FOR UPDATE");
    write("SELECT * FROM t FOR NO KEY UPDATE");
    write("SELECT * FROM t FOR SHARE");
    write("SELECT * FROM t FOR KEY SHARE");
    write("SELECT * FROM t WHERE a = 1 FOR UPDATE OF t SKIP LOCKED");
    write("SELECT * FROM t FOR SHARE NOWAIT");
    write("SELECT 1 FROM t WHERE a IN (SELECT b FROM u FOR UPDATE)");
    write("SELECT a FROM t UNION SELECT b FROM u FOR UPDATE");
    write("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x");
}

#[test]
fn writable_ctes_are_write_at_any_depth() {
    write("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x");
    write("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x");
    write("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x");
    write(
        "WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM t RETURNING *) SELECT * FROM c) SELECT * FROM b",
    );
    write(
        "SELECT * FROM (SELECT * FROM (WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x) y) z",
    );
    write("SELECT (WITH x AS (INSERT INTO t VALUES (1) RETURNING a) SELECT a FROM x)");
    read("WITH x AS (SELECT 1), y AS (SELECT * FROM x) SELECT * FROM y");
}

#[test]
fn explain_analyze_of_a_write_is_write() {
    write("EXPLAIN ANALYZE INSERT INTO t VALUES (1)");
    write("EXPLAIN (ANALYZE) DELETE FROM t");
    write("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1");
    write("EXPLAIN (ANALYZE true, BUFFERS) DELETE FROM t");
    write("EXPLAIN (ANALYSE) DELETE FROM t");
    write("EXPLAIN (ANALYZE 1) DELETE FROM t");
    write("EXPLAIN ANALYZE SELECT nextval('s')");
    write("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE");
}

#[test]
fn explain_without_analyze_is_read() {
    read("EXPLAIN INSERT INTO t VALUES (1)");
    read("EXPLAIN (VERBOSE, COSTS off) DELETE FROM t");
    read("EXPLAIN (ANALYZE false) DELETE FROM t");
    read("EXPLAIN (ANALYZE off) DELETE FROM t");
    read("EXPLAIN SELECT nextval('s')");
    read("EXPLAIN ANALYZE SELECT * FROM t");
    read("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t");
}

#[test]
fn explain_execute_names_its_statement_and_the_prepared_statements_view_is_the_primarys() {
    assert_eq!(c("EXPLAIN EXECUTE q(1)").execute.as_deref(), Some("q"));
    assert_eq!(
        c("EXPLAIN (COSTS OFF) EXECUTE \"Q\"").execute.as_deref(),
        Some("Q")
    );
    assert_eq!(c("EXPLAIN ANALYZE EXECUTE q").execute.as_deref(), Some("q"));
    read("EXPLAIN EXECUTE q(1)");
    write("SELECT name FROM pg_prepared_statements");
    write("SELECT * FROM pg_catalog.pg_prepared_statements p JOIN t ON true");
    write("SELECT (SELECT count(*) FROM PG_PREPARED_STATEMENTS)");
    read("SELECT * FROM my.pg_prepared_statements");
}

#[test]
fn write_functions_anywhere_are_write() {
    write("SELECT nextval('s')");
    write("SELECT pg_catalog.nextval('s')");
    write("SELECT NEXTVAL('s')");
    write("SELECT * FROM t WHERE a = nextval('s')");
    write("SELECT * FROM nextval('s')");
    write("SELECT * FROM t, LATERAL nextval('s') n");
    write("SELECT * FROM t WHERE a IN (SELECT setval('s', 1))");
    write("WITH x AS (SELECT currval('s')) SELECT * FROM x");
    write("SELECT coalesce(lastval(), 0)");
    write("SELECT lower(pg_notify('c', 'x'))");
    write("SELECT count(*) FILTER (WHERE txid_current() > 0) FROM t");
    write("SELECT row_number() OVER (ORDER BY nextval('s')) FROM t");
    write("VALUES (nextval('s'))");
    write("SELECT pg_advisory_xact_lock(1)");
}

#[test]
fn plain_reads_are_read() {
    read("SELECT 1");
    read("SELECT abalance FROM pgbench_accounts WHERE aid = 1");
    read(
        "select a, count(*) from t join u using (id) where b > 1 group by a order by 2 desc limit 10",
    );
    read("VALUES (1), (2)");
    read("TABLE t");
    read("SHOW search_path");
    read("SHOW ALL");
    read("SHOW TRANSACTION ISOLATION LEVEL");
    read("(SELECT 1) UNION (SELECT 2)");
    read("SELECT now(), current_timestamp, current_user, pg_sleep(0.1), random()");
    read("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), version()");
}

#[test]
fn transaction_control_is_read_with_tx() {
    let tx = |sql: &str| {
        let class = c(sql);
        assert_eq!(class.access, Access::Read, "{sql}");
        assert!(!class.parse_failed, "{sql}");
        class.tx
    };
    let begin = |read_only| Some(TxControl::Begin { read_only });
    assert_eq!(tx("BEGIN"), begin(false));
    assert_eq!(tx("BEGIN READ ONLY"), begin(true));
    assert_eq!(tx("BEGIN READ ONLY DEFERRABLE"), begin(true));
    assert_eq!(
        tx("START TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
        begin(false)
    );
    assert_eq!(
        tx("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
        begin(true)
    );
    assert_eq!(tx("COMMIT"), Some(TxControl::Commit));
    assert_eq!(tx("END"), Some(TxControl::Commit));
    assert_eq!(tx("COMMIT AND CHAIN"), Some(TxControl::Commit));
    assert_eq!(tx("ROLLBACK"), Some(TxControl::Rollback));
    assert_eq!(tx("ABORT"), Some(TxControl::Rollback));
    assert_eq!(tx("SAVEPOINT a"), Some(TxControl::Savepoint));
    assert_eq!(tx("RELEASE SAVEPOINT a"), Some(TxControl::Savepoint));
    assert_eq!(tx("RELEASE a"), Some(TxControl::Savepoint));
    assert_eq!(tx("ROLLBACK TO SAVEPOINT a"), Some(TxControl::Savepoint));
    assert_eq!(tx("ROLLBACK TO a"), Some(TxControl::Savepoint));
}

#[test]
fn begins_a_standby_cannot_start_are_write() {
    // READ WRITE (which wins over READ ONLY) and SERIALIZABLE: a hot standby
    // refuses both, so they need the primary even in a read-only-default session.
    for (sql, read_only) in [
        ("START TRANSACTION READ WRITE", false),
        ("BEGIN READ ONLY, READ WRITE", false),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", false),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", true),
        (
            "BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
            true,
        ),
        (
            "begin isolation level serializable read only deferrable",
            true,
        ),
        (
            "START TRANSACTION READ ONLY ISOLATION LEVEL SERIALIZABLE",
            true,
        ),
        ("START TRANSACTION READ WRITE, NOT DEFERRABLE", false),
    ] {
        let class = c(sql);
        assert_eq!(class.access, Access::Write, "{sql}");
        assert_eq!(class.tx, Some(TxControl::Begin { read_only }), "{sql}");
        assert!(!class.sticky_primary, "{sql}");
    }
}

#[test]
fn serializable_default_isolation_is_sticky() {
    sticky("SET default_transaction_isolation = 'serializable'", true);
    sticky("SET default_transaction_isolation TO serializable", true);
    sticky(
        "SET SESSION default_transaction_isolation = 'SERIALIZABLE'",
        true,
    );
    sticky("SET default_transaction_isolation = $$serializable$$", true);
    sticky(
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        true,
    );
    sticky(
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE",
        true,
    );
    sticky(
        "SET default_transaction_isolation = 'repeatable read'",
        false,
    );
    sticky(
        "SET default_transaction_isolation TO 'read committed'",
        false,
    );
    sticky("SET default_transaction_isolation TO DEFAULT", false);
    sticky("RESET default_transaction_isolation", false);
    sticky(
        "SET LOCAL default_transaction_isolation = 'serializable'",
        false,
    );
    sticky(
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        false,
    );
    // Not parsed by sqlparser: judged by its words.
    sticky(
        "SET default_transaction_isolation = serializable garbage",
        true,
    );
    let class = c("SET default_transaction_isolation = 'serializable'");
    assert!(class.access == Access::Read && class.session_state);
}

#[test]
fn tx_is_that_of_the_first_statement_with_one() {
    assert_eq!(
        c("BEGIN; SELECT 1").tx,
        Some(TxControl::Begin { read_only: false })
    );
    assert_eq!(c("SELECT 1; COMMIT; BEGIN").tx, Some(TxControl::Commit));
    // Even when a later statement does not parse.
    let class = c("BEGIN; SELECT * FROM t FOR NO KEY UPDATE");
    assert_eq!(
        (class.tx, class.access),
        (Some(TxControl::Begin { read_only: false }), Access::Write)
    );
}

#[test]
fn set_transaction_is_session_state() {
    for sql in [
        "SET TRANSACTION READ WRITE",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ] {
        let class = c(sql);
        assert!(class.session_state && class.access == Access::Read, "{sql}");
    }
}

#[test]
fn set_reset_discard_deallocate_are_read_session_state() {
    for sql in [
        "SET search_path TO a, b",
        "SET LOCAL statement_timeout = 5",
        "SET application_name = 'x'",
        "SET TIME ZONE 'UTC'",
        "SET ROLE bob",
        "SET SESSION AUTHORIZATION bob",
        "RESET search_path",
        "RESET ALL",
        "DISCARD ALL",
        "DISCARD TEMP",
        "DEALLOCATE p",
        "DEALLOCATE ALL",
    ] {
        let class = c(sql);
        assert_eq!(class.access, Access::Read, "{sql}");
        assert!(class.session_state, "{sql}");
    }
    read("SHOW search_path");
    assert!(!c("SHOW search_path").session_state);
    assert!(!c("SELECT 1").session_state);
}

#[test]
fn temp_objects_are_sticky() {
    sticky("CREATE TEMP TABLE x (a int)", true);
    sticky("CREATE TEMPORARY TABLE x AS SELECT 1", true);
    sticky("CREATE LOCAL TEMP TABLE x (a int)", true);
    sticky("CREATE TABLE pg_temp.x (a int)", true);
    sticky("CREATE TEMP VIEW v AS SELECT 1", true);
    sticky("CREATE TEMP SEQUENCE s", true);
    sticky("CREATE TABLE x (a int)", false);
    sticky("CREATE TABLE temp (a int)", false);
    assert_eq!(c("CREATE TEMP TABLE x (a int)").access, Access::Write);
}

#[test]
fn listen_and_declare_with_hold_are_sticky() {
    sticky("LISTEN ch", true);
    sticky("UNLISTEN ch", false);
    sticky("DECLARE c CURSOR WITH HOLD FOR SELECT 1", true);
    sticky("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", false);
}

#[test]
fn session_advisory_locks_are_sticky_xact_ones_are_not() {
    for f in SESSION_ADVISORY_LOCKS {
        let class = c(&format!("SELECT {f}(42)"));
        assert!(class.sticky_primary && class.access == Access::Write, "{f}");
    }
    sticky("SELECT pg_advisory_xact_lock(1)", false);
    sticky("SELECT pg_try_advisory_xact_lock_shared(1)", false);
    sticky("SELECT pg_advisory_unlock(1)", false);
    sticky(
        "SELECT * FROM t WHERE pg_catalog.pg_try_advisory_lock(id)",
        true,
    );
}

#[test]
fn set_config_is_write_and_sticky_unless_local() {
    let class = c("SELECT set_config('app.user', '42', false)");
    assert!(class.access == Access::Write && class.sticky_primary);
    sticky("SELECT set_config('app.user', '42', $1)", true);
    sticky("SELECT set_config('app.user', '42', true)", false);
    assert_eq!(
        c("SELECT set_config('app.user', '42', true)").access,
        Access::Write
    );
}

#[test]
fn unsafe_settings_are_sticky_search_path_is_not() {
    sticky("SET transaction_read_only = off", true);
    sticky("SET transaction_read_only = on", true);
    sticky("RESET transaction_read_only", true);
    sticky("SET session_replication_role = replica", true);
    sticky("RESET session_replication_role", true);
    sticky("SET default_transaction_read_only = off", true);
    sticky("SET default_transaction_read_only TO false", true);
    sticky("SET default_transaction_read_only = 'of'", true);
    sticky("SET default_transaction_read_only TO DEFAULT", true);
    sticky("RESET default_transaction_read_only", true);
    sticky("SET default_transaction_read_only = on", false);
    sticky("SET search_path = a", false);
    sticky("RESET ALL", false);
    sticky("DISCARD ALL", false);
}

#[test]
fn read_only_default_is_reported() {
    let ro = |sql: &str| c(sql).sets_read_only_default;
    assert_eq!(ro("SET default_transaction_read_only = on"), Some(true));
    assert_eq!(ro("SET default_transaction_read_only TO true"), Some(true));
    assert_eq!(ro("SET default_transaction_read_only = 1"), Some(true));
    assert_eq!(ro("SET default_transaction_read_only = 'yes'"), Some(true));
    assert_eq!(
        ro("SET SESSION default_transaction_read_only = on"),
        Some(true)
    );
    assert_eq!(
        ro("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
        Some(true)
    );
    assert_eq!(ro("SET default_transaction_read_only = off"), Some(false));
    assert_eq!(ro("SET default_transaction_read_only = 0"), Some(false));
    assert_eq!(
        ro("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"),
        Some(false)
    );
    assert_eq!(ro("RESET default_transaction_read_only"), Some(false));
    assert_eq!(ro("RESET ALL"), Some(false));
    assert_eq!(ro("DISCARD ALL"), Some(false));
    assert_eq!(ro("SET LOCAL default_transaction_read_only = on"), None);
    assert_eq!(ro("SET search_path = a"), None);
    assert_eq!(ro("SET TRANSACTION READ ONLY"), None);
    assert_eq!(
        ro("SET default_transaction_read_only = on; SET default_transaction_read_only = off"),
        Some(false)
    );
}

#[test]
fn prepare_reports_name_and_inner_access() {
    let p = c("PREPARE q (int) AS SELECT * FROM t WHERE a = $1");
    assert_eq!(
        (p.access, p.prepare),
        (Access::Read, Some(("q".into(), Access::Read)))
    );
    let p = c("PREPARE Ins AS INSERT INTO t VALUES ($1)");
    assert_eq!(
        (p.access, p.prepare),
        (Access::Read, Some(("ins".into(), Access::Write)))
    );
    let p = c(r#"PREPARE "Q" AS SELECT nextval('s')"#);
    assert_eq!(p.prepare, Some(("Q".into(), Access::Write)));
    let p = c("PREPARE q AS SELECT my_func(1)");
    assert_eq!(p.prepare, Some(("q".into(), Access::Write)));
    assert!(p.unknown_functions.is_empty());
    sticky("PREPARE q AS SELECT pg_advisory_lock(1)", true);
}

#[test]
fn execute_reports_name() {
    let e = c("EXECUTE q(1, 'a')");
    assert_eq!((e.access, e.execute), (Access::Read, Some("q".to_string())));
    assert_eq!(c(r#"EXECUTE "Q""#).execute, Some("Q".to_string()));
    assert_eq!(c("EXECUTE q(nextval('s'))").access, Access::Write);
    let e = c("EXPLAIN ANALYZE EXECUTE q");
    assert_eq!((e.access, e.execute), (Access::Read, Some("q".to_string())));
}

#[test]
fn deallocate_reports_name_or_all() {
    assert_eq!(c("DEALLOCATE q").deallocate, Some(Some("q".into())));
    assert_eq!(c("DEALLOCATE PREPARE Q").deallocate, Some(Some("q".into())));
    assert_eq!(
        c(r#"DEALLOCATE "all""#).deallocate,
        Some(Some("all".into()))
    );
    assert_eq!(c("DEALLOCATE ALL").deallocate, Some(None));
    assert_eq!(c("DEALLOCATE PREPARE ALL").deallocate, Some(None));
}

#[test]
fn second_prepare_execute_or_deallocate_in_one_string_is_write() {
    let class = c("EXECUTE a; EXECUTE b");
    assert_eq!(
        (class.access, class.execute),
        (Access::Write, Some("a".into()))
    );
    assert_eq!(c("DEALLOCATE a; DEALLOCATE b").access, Access::Write);
    assert_eq!(c("PREPARE a AS SELECT 1; EXECUTE a").access, Access::Read);
}

#[test]
fn multi_statement_is_read_only_if_every_part_is() {
    let class = c("SELECT 1; SELECT 2; SHOW x");
    assert_eq!((class.access, class.statements), (Access::Read, 3));
    let class = c("SELECT 1; INSERT INTO t VALUES (1); SELECT 2");
    assert_eq!((class.access, class.statements), (Access::Write, 3));
    let class = c("SET search_path = a; LISTEN x; SELECT 1");
    assert!(class.session_state && class.sticky_primary && class.access == Access::Write);
    assert_eq!(c("SELECT ';'; SELECT $$;$$ -- ;\n").statements, 2);
}

#[test]
fn empty_is_read_with_no_statements() {
    for sql in [
        "",
        "   ",
        ";",
        " ;; ; ",
        "-- only a comment",
        "/* c */ ; /* d /* nested */ */",
    ] {
        let class = c(sql);
        assert_eq!(class, Classification::empty(), "{sql:?}");
    }
}

#[test]
fn parse_failure_is_write() {
    for sql in [
        "SELEC 1",
        "SELECT (1",
        "SELECT 'unterminated",
        "SELECT * FROM ROWS FROM (generate_series(1, 2))",
        "FOO BAR",
        "SELECT 1 2 3",
    ] {
        let class = c(sql);
        assert!(class.access == Access::Write && class.parse_failed, "{sql}");
    }
    // One bad statement makes the string a write; the good ones still count.
    let class = c("SELECT 1; SELEC 2; SET search_path = a");
    assert!(class.parse_failed && class.session_state && class.access == Access::Write);
    assert_eq!(class.statements, 3);
}

#[test]
fn oversized_or_deeply_chained_input_is_write_without_panicking() {
    let huge = format!(
        "SELECT 1 FROM t WHERE a IN ({})",
        vec!["1"; MAX_PARSE_BYTES / 2].join(",")
    );
    let class = c(&huge);
    assert!(class.access == Access::Write && class.parse_failed);
    let chain = format!("SELECT 1{}", "+1".repeat(MAX_CHAIN_TOKENS + 1));
    assert_eq!(c(&chain).access, Access::Write);
    let ok_chain = format!("SELECT 1{}", "+1".repeat(500));
    read(&ok_chain);
    let parens = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
    assert_eq!(c(&parens).access, Access::Write);
    write(&format!("SELECT {}", "NOT ".repeat(3000)));
}

#[test]
fn first_word_must_allow_a_read() {
    // Whatever sqlparser makes of them, these can never be reads.
    write("LOAD 'auto_explain'");
    write("IMPORT FOREIGN SCHEMA s FROM SERVER x INTO y");
    write("REASSIGN OWNED BY a TO b");
    write("SECURITY LABEL FOR p ON TABLE t IS 'x'");
}

#[test]
fn unknown_functions_are_reported_by_policy() {
    let class = c("SELECT my_schema.my_func(a), Other(b), \"Quoted\"(c), count(*) FROM t");
    assert_eq!(class.access, Access::Read);
    assert_eq!(class.unknown_functions, ["Quoted", "my_func", "other"]);
    // A schema other than pg_catalog is never the built-in.
    assert_eq!(
        c("SELECT myschema.count(*) FROM t").unknown_functions,
        ["count"]
    );
    assert!(
        c("SELECT pg_catalog.count(*) FROM t")
            .unknown_functions
            .is_empty()
    );
    // Unknown functions of write statements are not reported.
    assert!(
        c("INSERT INTO t SELECT my_func(1)")
            .unknown_functions
            .is_empty()
    );

    let w = FunctionPolicy::with_lists(Vec::new(), None, UnknownIs::Write);
    let class = with(w, "SELECT my_func(1)");
    assert_eq!(
        (class.access, class.unknown_functions),
        (Access::Write, vec!["my_func".to_string()])
    );
    let r = FunctionPolicy::with_lists(Vec::new(), None, UnknownIs::Read);
    assert_eq!(with(r, "SELECT my_func(1)").access, Access::Read);
}

#[test]
fn allow_list_and_extra_write_functions() {
    let allow =
        FunctionPolicy::with_lists(Vec::new(), Some(vec!["my_func".into()]), UnknownIs::Read);
    assert_eq!(
        with(allow.clone(), "SELECT my_func(1), count(*) FROM t").access,
        Access::Read
    );
    assert_eq!(
        with(allow.clone(), "SELECT other_func(1)").access,
        Access::Write
    );
    assert_eq!(with(allow, "SELECT nextval('s')").access, Access::Write);
    let extra = FunctionPolicy::with_lists(vec!["Audit_Log".into()], None, UnknownIs::Read);
    assert_eq!(
        with(extra.clone(), "SELECT audit_log(1)").access,
        Access::Write
    );
    assert_eq!(with(extra, "SELECT nextval('s')").access, Access::Write);
}

#[test]
fn built_in_lists_are_sorted_and_disjoint() {
    assert!(READ_ONLY_FUNCTIONS.windows(2).all(|w| w[0] < w[1]));
    assert!(DEFAULT_WRITE_FUNCTIONS.windows(2).all(|w| w[0] < w[1]));
    for f in DEFAULT_WRITE_FUNCTIONS {
        assert!(!READ_ONLY_FUNCTIONS.contains(f), "{f}");
    }
}

#[test]
fn relations_of_reads_are_reported_and_ddl_is_a_catalog_change() {
    let rel = |schema: Option<&str>, name: &str| RelationName {
        schema: schema.map(str::to_string),
        name: name.to_string(),
    };
    let class = c("SELECT * FROM b JOIN s.\"A\" USING (x) WHERE y IN (SELECT y FROM a.b.c)");
    assert_eq!(
        class.relations,
        [rel(None, "b"), rel(Some("b"), "c"), rel(Some("s"), "A")]
    );
    assert_eq!(c("EXPLAIN SELECT * FROM t").relations, [rel(None, "t")]);
    assert!(c("INSERT INTO t SELECT * FROM u").relations.is_empty());
    for ddl in [
        "ALTER TABLE t SET UNLOGGED",
        "CREATE UNLOGGED TABLE t (a int)",
        "DROP TABLE t",
        "CREATE VIEW v AS SELECT 1",
        "DO $$ BEGIN END $$",
        "ALTER TABLE t SET UNLOGGED garbage (",
    ] {
        assert!(c(ddl).catalog_change, "{ddl}");
    }
    for dml in [
        "SELECT 1",
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "TRUNCATE t",
    ] {
        assert!(!c(dml).catalog_change, "{dml}");
    }
}

#[test]
fn node_local_views_and_functions_need_the_primary() {
    for sql in [
        "SELECT * FROM pg_stat_activity",
        "SELECT * FROM pg_catalog.pg_stat_user_tables",
        "SELECT * FROM pg_statio_user_tables",
        "SELECT count(*) FROM pg_locks",
        "SELECT * FROM pg_prepared_statements",
        "SELECT * FROM pg_cursors",
        "SELECT * FROM pg_prepared_xacts",
        "SELECT * FROM pg_replication_slots",
        "SELECT * FROM pg_stat_replication",
        "SELECT * FROM pg_stat_wal_receiver",
        "SELECT pg_stat_get_numscans(1)",
        "SELECT pg_backend_pid()",
        "SELECT pg_catalog.pg_current_wal_lsn()",
        "SELECT txid_current_if_assigned()",
        "SELECT pg_current_xact_id_if_assigned()",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM pg_locks)",
    ] {
        write(sql);
    }
    assert!(c("SELECT name FROM pg_catalog.pg_prepared_statements").lists_statements);
    assert!(!c("SELECT * FROM pg_locks").lists_statements);
    // Replicated catalogs, and user objects of those names in other schemas.
    for sql in [
        "SELECT * FROM pg_stats",
        "SELECT * FROM pg_statistic_ext",
        "SELECT * FROM app.pg_locks",
        "SELECT app.pg_backend_pid()",
        "SELECT pg_is_in_recovery()",
    ] {
        read(sql);
    }
    let p = FunctionPolicy {
        primary_relations: ["node_view", "s.other"].map(String::from).into(),
        ..FunctionPolicy::default()
    };
    for (sql, access) in [
        ("SELECT * FROM node_view", Access::Write),
        ("SELECT * FROM x.node_view", Access::Write),
        ("SELECT * FROM s.other", Access::Write),
        ("SELECT * FROM other", Access::Read),
        ("SELECT * FROM t.other", Access::Read),
    ] {
        assert_eq!(with(p.clone(), sql).access, access, "{sql}");
    }
}

/// PostgreSQL ends an operator where a comment starts; sqlparser may read
/// the comment as more operator, and so parse another statement than the
/// one PostgreSQL runs (found by the classify fuzz target). A doubt: write.
#[test]
fn a_comment_glued_to_an_operator_is_a_doubt() {
    write("SELECT 'x' ~~-- a");
    write("SELECT 2 ~~--'\n 3, nextval($$s$$) --'");
    write("SELECT 2 */* c */ 3");
    read("SELECT 2 * 3 -- c");
    read("SELECT 2 * /* c */ 3");
    read("SELECT '--' ~~ '/*', x->>'a' FROM t");
}

/// PostgreSQL ends a `--` comment at a carriage return: what follows runs.
#[test]
fn a_line_comment_ends_at_a_carriage_return() {
    write("SELECT 1; -- c\rDELETE FROM t");
}
