//! A prepared statement keeps the shape its client was told (issue 21, item
//! 1): parsed again on another node after a schema change, it fails as
//! PostgreSQL's cached statement does (`0A000`), never returning rows of
//! another shape for the client to decode with the old types.

use super::*;

/// The SQLSTATE of a query's error, or the values it returned.
async fn values(
    c: &Client,
    stmt: &tokio_postgres::Statement,
) -> Result<(String, i32, String), String> {
    match c.query(stmt, &[]).await {
        Ok(rows) => {
            let r = &rows[0];
            // Column b decoded with the type the statement was described with.
            let b = match r.columns()[2].type_() {
                &tokio_postgres::types::Type::INT4 => r.get::<_, i32>(2).to_string(),
                _ => r.get::<_, f32>(2).to_string(),
            };
            Ok((r.get(0), r.get(1), b))
        }
        Err(e) => Err(sqlstate(&e).unwrap_or_else(|| e.to_string())),
    }
}

/// tokio-postgres prepares (Parse + Describe) on a standby; the column's type
/// changes; the statement, run inside a transaction, is parsed again on the
/// primary, where its result is now `real`: the client gets 0A000, as from
/// PostgreSQL directly, and its statement prepared again returns 2.0.
#[tokio::test]
async fn a_statement_described_on_a_standby_fails_on_the_primary_after_its_type_changed() {
    let addr = proxy().await;
    let n = nodes().await;
    n.setup(
        "DROP TABLE IF EXISTS shape_t, shape_direct;
         CREATE TABLE shape_t (a int, b int); INSERT INTO shape_t VALUES (1, 2);
         CREATE TABLE shape_direct (a int, b int); INSERT INTO shape_direct VALUES (1, 2);",
    )
    .await;
    let sql = format!("SELECT {WHERE}, a, b FROM shape_t");
    // What PostgreSQL itself answers, directly.
    let direct = &n.app;
    let d = direct
        .prepare(&sql.replace("shape_t", "shape_direct"))
        .await
        .unwrap();
    assert!(values(direct, &d).await.is_ok());
    direct
        .batch_execute("ALTER TABLE shape_direct ALTER COLUMN b TYPE real")
        .await
        .unwrap();
    assert_eq!(values(direct, &d).await, Err("0A000".to_string()));

    let c = connect(addr, "application_name=shape_standby").await;
    let stmt = c.prepare(&sql).await.unwrap();
    let (node, a, b) = values(&c, &stmt).await.unwrap();
    assert!(is_standby(&node), "prepared and run on a standby: {node}");
    assert_eq!((a, b.as_str()), (1, "2"));
    c.batch_execute("ALTER TABLE shape_t ALTER COLUMN b TYPE real")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        values(&c, &stmt).await,
        Err("0A000".to_string()),
        "the statement parsed again on the primary has another result type"
    );
    // The error aborted the transaction, as PostgreSQL's does.
    let in_failed = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&in_failed).as_deref(), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
    // Prepared again, it returns the new type's value.
    let again = c.prepare(&sql).await.unwrap();
    let (_, a, b) = values(&c, &again).await.unwrap();
    assert_eq!((a, b.as_str()), (1, "2"));
    assert_eq!(
        again.columns()[2].type_(),
        &tokio_postgres::types::Type::FLOAT4
    );
    // And the old statement keeps failing, wherever it runs.
    assert_eq!(values(&c, &stmt).await, Err("0A000".to_string()));
}
