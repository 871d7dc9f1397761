//! Logging in through pgpilot: wrong passwords, unknown users, and users
//! configured with only a SCRAM verifier (pass-through to the nodes).

use super::*;

#[tokio::test]
async fn wrong_password_and_unknown_user_get_28p01() {
    let h = harness();
    let addr = h.proxy;
    let bad = format!(
        "host={} port={} user={USER} password=wrong dbname={DB}",
        addr.ip(),
        addr.port()
    );
    let e = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let unknown = format!(
        "host={} port={} user=nobody password={PASSWORD} dbname={DB}",
        addr.ip(),
        addr.port()
    );
    let e2 = tokio_postgres::connect(&unknown, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e2).as_deref(), Some("28P01"), "{e2}");
    // Same message shape for both: no user enumeration.
    let m1 = e.as_db_error().unwrap().message().replace(USER, "U");
    let m2 = e2.as_db_error().unwrap().message().replace("nobody", "U");
    assert_eq!(m1, m2);
}

/// A user configured with only a SCRAM verifier (no password): pgpilot logs
/// in to the nodes with the keys the client's own SCRAM login proved, on the
/// primary and on a standby. A node that stores another verifier for the user
/// refuses, and the client is told why.
#[tokio::test]
async fn a_user_with_only_a_scram_verifier_reaches_primary_and_standby() {
    let h = harness();
    h.psql(0, "CREATE ROLE scram_only LOGIN PASSWORD 'pw1'");
    let verifier = h.psql(
        0,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_only'",
    );
    let replayed = async |verifier: &str| {
        let sql = "SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_only'";
        for node in 1..3 {
            wait_until(
                &format!("node {node} to replay the role"),
                Duration::from_secs(30),
                async || h.psql(node, sql).trim() == verifier.trim(),
            )
            .await;
        }
    };
    replayed(&verifier).await;
    let mut cfg = h.config();
    let mut user = cfg.users[0].clone();
    user.name = "scram_only".into();
    user.password = None;
    user.scram_verifier = Some(verifier.trim().to_string());
    cfg.users.push(user);
    cfg.validate().expect("a verifier-only user is valid");
    let addr = spawn_proxy(cfg);
    let login = async |password: &str, db: &str| {
        let info = format!(
            "host={} port={} user=scram_only password={password} dbname={db} connect_timeout=10",
            addr.ip(),
            addr.port()
        );
        let (c, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.map(|_| c)
    };
    let c = login("pw1", DB).await.expect("log in through pgpilot");
    let in_recovery = async |sql: &str| -> bool { c.query_one(sql, &[]).await.expect(sql).get(0) };
    assert!(!in_recovery("/* pgpilot:primary */ SELECT pg_is_in_recovery()").await);
    assert!(in_recovery("SELECT pg_is_in_recovery()").await);
    let Err(e) = login("wrong", DB).await else {
        panic!("a wrong password logged in");
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    // The nodes now store another verifier (a new salt): a new server login
    // (another database: another pool) is refused, saying so.
    h.psql(0, "ALTER ROLE scram_only PASSWORD 'pw1'");
    let changed = h.psql(
        0,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_only'",
    );
    assert_ne!(changed, verifier);
    replayed(&changed).await;
    let Err(e) = login("pw1", "postgres").await else {
        panic!("a node with another verifier let pgpilot in");
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("scram_verifier"), "{message}");
}
