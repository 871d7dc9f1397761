//! Statements that read the state of the server itself (issue 21, item 5):
//! statistics, activity and locks, the session's own prepared statements and
//! cursors, replication, and the functions describing the answering backend
//! run on the primary, one test per family.

use super::*;

/// A session with a standby for its reads, and direct connections.
async fn reading_session(tag: &str) -> (Sess, Nodes) {
    let addr = proxy().await;
    let s = sess(addr, tag).await;
    assert!(is_standby(&s.read_node().await));
    (s, nodes().await)
}

/// Run each of `sqls` and check it ran on the primary.
async fn all_on_primary(s: &Sess, n: &Nodes, sqls: &[&str]) {
    for sql in sqls {
        s.expect(n, sql, None, On::Primary).await;
    }
}

#[tokio::test]
async fn statistics_views_and_functions_run_on_the_primary() {
    let (s, n) = reading_session("nl_stats").await;
    n.setup("CREATE TABLE nl_stats_t (x int)").await;
    all_on_primary(
        &s,
        &n,
        &[
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'nl_stats_t'",
            "SELECT count(*) FROM pg_catalog.pg_statio_user_tables",
            "SELECT count(*) FROM pg_stat_database",
            "SELECT pg_stat_get_numscans('nl_stats_t'::regclass)",
        ],
    )
    .await;
}

#[tokio::test]
async fn activity_and_the_backend_pid_are_the_primarys() {
    let (s, n) = reading_session("nl_activity").await;
    // The session's own backend is found where the session writes.
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid()";
    assert_eq!(
        s.expect(&n, sql, None, On::Primary).await.as_deref(),
        Some("1")
    );
    s.expect(&n, "SELECT pg_backend_pid()", None, On::Primary)
        .await;
}

#[tokio::test]
async fn locks_prepared_statements_and_cursors_are_the_sessions_own() {
    let (s, n) = reading_session("nl_locks").await;
    s.c.batch_execute("PREPARE nl_p AS SELECT 1").await.unwrap();
    let sql = "SELECT count(*) FROM pg_prepared_statements WHERE name = 'nl_p'";
    assert_eq!(
        s.expect(&n, sql, None, On::Primary).await.as_deref(),
        Some("1")
    );
    all_on_primary(
        &s,
        &n,
        &[
            "SELECT count(*) FROM pg_locks",
            "SELECT count(*) FROM pg_cursors",
            "SELECT count(*) FROM pg_prepared_xacts",
        ],
    )
    .await;
}

#[tokio::test]
async fn replication_views_run_on_the_primary() {
    let (s, n) = reading_session("nl_repl").await;
    // Both standbys stream from the primary: only it has their rows.
    let sql = "SELECT count(*) FROM pg_stat_replication";
    assert_eq!(
        s.expect(&n, sql, None, On::Primary).await.as_deref(),
        Some("2")
    );
    all_on_primary(
        &s,
        &n,
        &[
            "SELECT count(*) FROM pg_replication_slots",
            "SELECT count(*) FROM pg_stat_wal_receiver",
        ],
    )
    .await;
}

#[tokio::test]
async fn wal_and_transaction_functions_run_on_the_primary() {
    let (s, n) = reading_session("nl_wal").await;
    all_on_primary(
        &s,
        &n,
        &[
            "SELECT pg_current_wal_lsn()",
            "SELECT pg_current_wal_insert_lsn() IS NOT NULL",
            "SELECT txid_current_if_assigned() IS NULL",
            "SELECT pg_current_xact_id_if_assigned() IS NULL",
        ],
    )
    .await;
}

#[tokio::test]
async fn primary_relations_extends_the_list() {
    let mut cfg = routing_config();
    cfg.routing.primary_relations = vec!["nl_local_view".into(), "nl_s.nl_other".into()];
    let addr = proxy_with(cfg).await;
    let n = nodes().await;
    n.setup(
        "CREATE VIEW nl_local_view AS SELECT 1 AS one;
         CREATE SCHEMA nl_s;
         CREATE VIEW nl_s.nl_other AS SELECT 2 AS two;
         CREATE VIEW nl_other AS SELECT 3 AS three;",
    )
    .await;
    let s = sess(addr, "nl_config").await;
    assert!(is_standby(&s.read_node().await));
    s.expect(&n, "SELECT one FROM nl_local_view", None, On::Primary)
        .await;
    s.expect(&n, "SELECT two FROM nl_s.nl_other", None, On::Primary)
        .await;
    s.expect(&n, "SELECT three FROM nl_other", None, On::Standby)
        .await;
}
