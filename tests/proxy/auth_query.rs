//! `auth_query`: roles that are not in pgpilot.toml, looked up on the
//! primary through the monitor role, log in as PostgreSQL would let them
//! (SCRAM and MD5 pass-through to every node), and are refused as PostgreSQL
//! would refuse them (wrong or expired password, unknown role, NOLOGIN).

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::{Harness, own_monitor_role};
use pgpilot::config::Config;

use super::*;

/// The README's lookup function, created once in the monitor's database.
fn lookup_function(h: &Harness) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        h.psql(
            0,
            "CREATE SCHEMA IF NOT EXISTS pgpilot;
             CREATE OR REPLACE FUNCTION pgpilot.get_auth(p_usename text)
             RETURNS TABLE (usename name, passwd text, valuntil timestamptz, canlogin boolean)
             LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog
             AS $$ SELECT rolname, rolpassword, rolvaliduntil, rolcanlogin
                   FROM pg_catalog.pg_authid WHERE rolname = p_usename $$;
             REVOKE ALL ON FUNCTION pgpilot.get_auth(text) FROM PUBLIC;",
        );
    });
}

/// Run `sql` (creating roles) on the primary and wait until `role` is on
/// every standby, with the primary's stored password.
async fn on_every_node(h: &Harness, sql: &str, role: &str) {
    h.psql(0, sql);
    let q = format!("SELECT coalesce(rolpassword, '-') FROM pg_authid WHERE rolname = '{role}'");
    let want = h.psql(0, &q);
    for node in 1..h.ports.len() {
        wait_until(
            &format!("{role} on node {node}"),
            Duration::from_secs(30),
            async || h.psql(node, &q) == want,
        )
        .await;
    }
}

/// A config with auth_query on and the given cache times.
fn config(h: &Harness, cache: Duration, negative: Duration) -> Config {
    lookup_function(h);
    let mut cfg = h.config();
    cfg.auth_query.enabled = true;
    cfg.auth_query.cache = cache;
    cfg.auth_query.negative_cache = negative;
    cfg.validate().expect("auth_query config");
    cfg
}

/// Log in through pgpilot at `addr` and run a statement.
async fn login(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let info = format!(
        "host={} port={} user={user} password={password} dbname={db} connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let (c, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await?;
    Ok(c)
}

/// The SQLSTATE and message of a refused login.
fn refused(r: Result<tokio_postgres::Client, tokio_postgres::Error>) -> (String, String) {
    let Err(e) = r else {
        panic!("the login succeeded");
    };
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// Let `role` log in with an MD5 password on every node (the cluster's
/// pg_hba.conf asks for SCRAM, which an MD5-stored password cannot answer).
async fn md5_line_for(h: &Harness, role: &str, password: &str) {
    let line = format!("host all {role} 127.0.0.1/32 md5\n");
    let dirs: Vec<_> = {
        let c = h.cluster.lock().unwrap();
        c.nodes
            .iter()
            .map(|n| n.data_dir.join("pg_hba.conf"))
            .collect()
    };
    for (node, path) in dirs.iter().enumerate() {
        let old = std::fs::read_to_string(path).unwrap();
        if !old.contains(&line) {
            std::fs::write(path, format!("{line}{old}")).unwrap();
        }
        h.psql(node, "SELECT pg_reload_conf()");
    }
    for (node, port) in h.ports.iter().enumerate() {
        let info =
            format!("host=127.0.0.1 port={port} user={role} password={password} dbname={DB}");
        wait_until(
            &format!("an md5 login of {role} on node {node}"),
            Duration::from_secs(30),
            async || {
                tokio_postgres::connect(&info, tokio_postgres::NoTls)
                    .await
                    .is_ok()
            },
        )
        .await;
    }
}

/// Whether the statement ran on a standby, and on the primary with a hint.
async fn reaches_primary_and_standby(c: &tokio_postgres::Client) {
    let q = async |sql: &str| -> bool { c.query_one(sql, &[]).await.expect(sql).get(0) };
    assert!(!q("/* pgpilot:primary */ SELECT pg_is_in_recovery()").await);
    assert!(q("SELECT pg_is_in_recovery()").await);
}

#[tokio::test]
async fn scram_and_md5_roles_log_in_and_reach_every_node() {
    let h = harness();
    on_every_node(
        h,
        "CREATE ROLE aq_scram LOGIN PASSWORD 'scram-pw'",
        "aq_scram",
    )
    .await;
    on_every_node(
        h,
        "SET password_encryption = 'md5'; CREATE ROLE aq_md5 LOGIN PASSWORD 'md5pw'",
        "aq_md5",
    )
    .await;
    md5_line_for(h, "aq_md5", "md5pw").await;
    let p = spawn_proxy_full(config(h, Duration::from_secs(60), Duration::from_secs(5)));

    let c = login(p.addr, "aq_scram", "scram-pw", DB)
        .await
        .expect("SCRAM role");
    reaches_primary_and_standby(&c).await;
    let c = login(p.addr, "aq_md5", "md5pw", DB)
        .await
        .expect("MD5 role");
    reaches_primary_and_standby(&c).await;

    // Wrong passwords and unknown roles: the same answer.
    let (code, wrong) = refused(login(p.addr, "aq_scram", "wrong", DB).await);
    assert_eq!(code, "28P01", "{wrong}");
    assert_eq!(
        wrong,
        "password authentication failed for user \"aq_scram\""
    );
    let (code, md5_wrong) = refused(login(p.addr, "aq_md5", "wrong", DB).await);
    assert_eq!(code, "28P01", "{md5_wrong}");
    let (code, unknown) = refused(login(p.addr, "aq_nobody", "scram-pw", DB).await);
    assert_eq!(code, "28P01", "{unknown}");
    assert_eq!(unknown, wrong.replace("aq_scram", "aq_nobody"));

    // A right password to a database that does not exist: PostgreSQL's 3D000.
    let (code, message) = refused(login(p.addr, "aq_scram", "scram-pw", "aq_no_such_db").await);
    assert_eq!(code, "3D000", "{message}");
    assert!(message.contains("aq_no_such_db"), "{message}");
}

#[tokio::test]
async fn expired_and_nologin_roles_are_refused_as_postgresql_does() {
    let h = harness();
    on_every_node(
        h,
        "CREATE ROLE aq_expired LOGIN PASSWORD 'pw' VALID UNTIL '2001-01-01';
         CREATE ROLE aq_nologin NOLOGIN PASSWORD 'pw';
         CREATE ROLE aq_valid LOGIN PASSWORD 'pw' VALID UNTIL 'infinity';
         CREATE ROLE aq_nopassword LOGIN;",
        "aq_nopassword",
    )
    .await;
    let p = spawn_proxy_full(config(h, Duration::from_secs(60), Duration::from_secs(5)));
    let (code, message) = refused(login(p.addr, "aq_expired", "pw", DB).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        (
            "28P01",
            "password authentication failed for user \"aq_expired\""
        )
    );
    let (code, message) = refused(login(p.addr, "aq_nopassword", "x", DB).await);
    assert_eq!(code, "28P01", "{message}");
    // NOLOGIN: a wrong password is a wrong password; the right one learns
    // that the role may not log in.
    let (code, _) = refused(login(p.addr, "aq_nologin", "wrong", DB).await);
    assert_eq!(code, "28P01");
    let (code, message) = refused(login(p.addr, "aq_nologin", "pw", DB).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("28000", "role \"aq_nologin\" is not permitted to log in")
    );
    login(p.addr, "aq_valid", "pw", "postgres")
        .await
        .expect("VALID UNTIL 'infinity' logs in");
}

#[tokio::test]
async fn a_changed_password_is_used_after_the_cache_time_or_on_sighup() {
    use tokio::signal::unix::{SignalKind, signal};
    // Handle SIGHUP in this process before sending any: its default kills.
    let _hup = signal(SignalKind::hangup()).unwrap();
    let h = harness();
    lookup_function(h);
    on_every_node(h, "CREATE ROLE aq_change LOGIN PASSWORD 'one'", "aq_change").await;
    // A pgpilot reading its file, with an hour's cache, reloaded by SIGHUP.
    let base = h.config();
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from("listen = \"127.0.0.1:0\"\n");
    for b in &base.backends {
        toml.push_str(&format!(
            "[[backends]]\nhost = \"{}\"\nport = {}\n",
            b.host, b.port
        ));
    }
    toml.push_str(&format!(
        "[monitor]\nuser = \"{}\"\n[metrics]\nlisten = \"\"\n\
         [auth_query]\nenabled = true\ncache = \"1h\"\n",
        base.monitor.user
    ));
    let conf = dir.path().join("pgpilot.toml");
    std::fs::write(&conf, toml).unwrap();
    let long = super::hba::spawn_reloading(conf);
    let short = spawn_proxy_full(config(h, Duration::from_secs(1), Duration::from_secs(1))).addr;
    for addr in [long, short] {
        login(addr, "aq_change", "one", "postgres")
            .await
            .expect("first password");
    }
    on_every_node(h, "ALTER ROLE aq_change PASSWORD 'two'", "aq_change").await;
    // The long cache still checks the old verifier; the new password fails.
    let (code, _) = refused(login(long, "aq_change", "two", "postgres").await);
    assert_eq!(code, "28P01");
    // The short one looks again once its answer is a second old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    login(short, "aq_change", "two", DB)
        .await
        .expect("new password after the cache time");
    // SIGHUP reloads the file, which forgets every answer.
    super::hba::sighup();
    wait_until(
        "the new password after SIGHUP",
        Duration::from_secs(30),
        async || login(long, "aq_change", "two", DB).await.is_ok(),
    )
    .await;
    let (code, _) = refused(login(long, "aq_change", "one", DB).await);
    assert_eq!(code, "28P01");
}

/// The monitor role's own `search_path` puts a schema anyone may write to
/// before pg_catalog, where a table named like the catalog holds a made-up
/// password: the lookup still reads the real catalog.
#[tokio::test]
async fn a_search_path_trick_cannot_change_the_lookup() {
    let h = harness();
    on_every_node(
        h,
        "CREATE ROLE aq_victim LOGIN PASSWORD 'real'",
        "aq_victim",
    )
    .await;
    let mut cfg = config(h, Duration::from_secs(60), Duration::from_secs(5));
    let monitor = own_monitor_role(h, &mut cfg, "aq_mon").await;
    let fake = postgres_protocol::password::md5(b"evil", "aq_victim");
    h.psql(
        0,
        &format!(
            "CREATE SCHEMA IF NOT EXISTS aq_trap;
             CREATE TABLE IF NOT EXISTS aq_trap.pg_authid AS
               SELECT 'aq_victim'::name AS rolname, '{fake}'::text AS rolpassword,
                      NULL::timestamptz AS rolvaliduntil, true AS rolcanlogin;
             ALTER ROLE {monitor} SET search_path = aq_trap, pg_catalog;"
        ),
    );
    // The trap works for a session that keeps the role's search_path.
    let info = format!(
        "host=127.0.0.1 port={} user={monitor} password=monpw dbname=postgres",
        h.ports[0]
    );
    let (direct, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let seen: String = direct
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'aq_victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, fake);
    cfg.auth_query.query = "SELECT rolname, rolpassword, rolvaliduntil, rolcanlogin \
                            FROM pg_authid WHERE rolname = $1"
        .into();
    let p = spawn_proxy_full(cfg);
    let (code, _) = refused(login(p.addr, "aq_victim", "evil", DB).await);
    assert_eq!(code, "28P01");
    login(p.addr, "aq_victim", "real", DB)
        .await
        .expect("the real password");
}

/// Many logins at once, of one name and of many unknown names: one lookup
/// per name, on one connection; a lookup that fails is not a wrong password.
#[tokio::test]
async fn lookups_are_shared_and_failures_are_not_wrong_passwords() {
    let h = harness();
    on_every_node(h, "CREATE ROLE aq_storm LOGIN PASSWORD 'pw'", "aq_storm").await;
    let mut cfg = config(h, Duration::from_secs(60), Duration::from_secs(30));
    let monitor = own_monitor_role(h, &mut cfg, "aq_storm_mon").await;
    let p = spawn_proxy_full(cfg);
    let logins = (0..10).map(|_| login(p.addr, "aq_storm", "pw", DB));
    for r in futures_util::future::join_all(logins).await {
        r.expect("concurrent logins of one role");
    }
    assert_eq!(p.ctx.auth_lookups_sent(), 1);
    let unknown = (0..40).map(|i| login(p.addr, format!("aq_ghost{}", i % 10).leak(), "pw", DB));
    for r in futures_util::future::join_all(unknown).await {
        assert_eq!(refused(r).0, "28P01");
    }
    assert_eq!(p.ctx.auth_lookups_sent(), 11);
    let connections = h.psql(
        0,
        &format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'pgpilot-auth-query' AND usename = '{monitor}'"
        ),
    );
    assert!(
        connections.parse::<u32>().unwrap() <= 1,
        "{connections} lookup connections"
    );

    let mut cfg = config(h, Duration::from_secs(60), Duration::from_secs(5));
    cfg.auth_query.query = "SELECT * FROM pgpilot.no_such_function($1)".into();
    let broken = spawn_proxy_full(cfg);
    let (code, message) = refused(login(broken.addr, "aq_storm", "pw", DB).await);
    assert_eq!(code, "57P03", "{message}");
    assert!(message.contains("no_such_function"), "{message}");
}
