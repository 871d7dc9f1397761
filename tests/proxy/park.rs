//! Parked sessions (`pool.park_idle_after`) behave exactly like idle ones:
//! queries, prepared statements and pgpilot's own session state survive
//! parking; the idle limit, the stop and cancels reach a parked client; a
//! parked client that leaves is unregistered.

use super::*;

/// Transaction pooling, parking after 50 ms idle.
fn parking_config() -> pgpilot::config::Config {
    let mut cfg = harness().config();
    cfg.pool.mode = pgpilot::config::PoolMode::Transaction;
    cfg.pool.park_idle_after = Duration::from_millis(50);
    cfg
}

/// Wait until `n` clients of `ctx` are parked.
async fn parked(ctx: &pgpilot::context::ProxyContext, n: i64) {
    wait_until(
        &format!("{n} parked clients"),
        Duration::from_secs(10),
        async || ctx.metrics.clients_parked() == n,
    )
    .await;
}

#[tokio::test]
async fn a_parked_client_runs_queries_and_keeps_its_statements_and_state() {
    let p = spawn_proxy_full(parking_config());
    let c = connect(p.addr, "").await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS parked_rt (v int)")
        .await
        .unwrap();
    // Prepared through the extended protocol (Parse, Describe, Sync): a
    // protocol-level statement does not pin the session, so it parks.
    let plus_one = c.prepare("SELECT $1::int + 1").await.unwrap();
    c.execute("INSERT INTO parked_rt VALUES (1)", &[])
        .await
        .unwrap();
    let lsn = common::show(&c, "SHOW pgpilot.last_commit_lsn").await.1;
    assert_ne!(lsn[0][0], "", "a commit position is known");
    parked(&p.ctx, 1).await;
    assert_eq!(p.ctx.sessions.len(), 1, "a parked client is still listed");
    // Bind/Execute of the statement prepared before parking.
    let row = c.query_one(&plus_one, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // Read-your-writes state kept: the session's last commit position.
    assert_eq!(
        common::show(&c, "SHOW pgpilot.last_commit_lsn").await.1,
        lsn
    );
    // Parks again, and wakes again for a simple query.
    parked(&p.ctx, 1).await;
    let n = c
        .simple_query("SELECT count(*) FROM parked_rt")
        .await
        .unwrap();
    assert!(matches!(&n[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) != Some("0")));
    // A statement prepared after the wake-up works across the next parking.
    let twice = c.prepare("SELECT $1::int * 2").await.unwrap();
    parked(&p.ctx, 1).await;
    let row = c.query_one(&twice, &[&21i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let row = c.query_one(&plus_one, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}

#[tokio::test]
async fn a_session_with_settings_keeps_its_connection_and_its_settings() {
    // A SET pins the session to its server connection (transaction
    // pooling's rule): it is never parked, and keeps the setting.
    let p = spawn_proxy_full(parking_config());
    let c = connect(p.addr, "").await;
    c.batch_execute("SET statement_timeout = '4321ms'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.ctx.metrics.clients_parked(), 0);
    let v = common::show(&c, "SHOW statement_timeout").await.1;
    assert_eq!(v[0][0], "4321ms");
    // A plain client beside it parks.
    let _other = connect(p.addr, "").await;
    parked(&p.ctx, 1).await;
}

#[tokio::test]
async fn the_idle_limit_closes_a_parked_client_with_57p05() {
    let mut cfg = parking_config();
    cfg.timeouts.client_idle = Duration::from_millis(700);
    let p = spawn_proxy_full(cfg);
    let mut s = login_raw(p.addr).await;
    let quiet = Instant::now();
    parked(&p.ctx, 1).await;
    assert!(quiet.elapsed() < Duration::from_millis(600), "parked late");
    assert_eq!(ended_with(&mut s, Duration::from_secs(3)).await, "57P05");
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    wait_until(
        "the client unregistered",
        Duration::from_secs(5),
        async || p.ctx.sessions.is_empty() && p.ctx.metrics.clients_parked() == 0,
    )
    .await;
}

#[tokio::test]
async fn stopping_pgpilot_ends_parked_sessions_with_57p01() {
    let p = common::spawn_proxy_stoppable(parking_config());
    let mut a = login_raw(p.addr).await;
    let mut b = login_raw(p.addr).await;
    parked(&p.ctx, 2).await;
    let started = Instant::now();
    let stopper = tokio::task::spawn_blocking(move || drop(p));
    assert_eq!(ended_with(&mut a, Duration::from_secs(2)).await, "57P01");
    assert_eq!(ended_with(&mut b, Duration::from_secs(2)).await, "57P01");
    stopper.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stop took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_parked_client_that_leaves_is_unregistered() {
    let p = spawn_proxy_full(parking_config());
    let s = login_raw(p.addr).await;
    let mut t = login_raw(p.addr).await;
    parked(&p.ctx, 2).await;
    assert_eq!(p.ctx.sessions.len(), 2);
    // One hangs up without a Terminate, the other says goodbye.
    drop(s);
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::terminate(&mut buf);
    t.write_all(&buf).await.unwrap();
    wait_until(
        "both clients unregistered",
        Duration::from_secs(5),
        async || p.ctx.sessions.is_empty() && p.ctx.metrics.clients_parked() == 0,
    )
    .await;
    let mut rest = Vec::new();
    assert_eq!(t.read_to_end(&mut rest).await.unwrap(), 0, "closed");
}

#[tokio::test]
async fn cancelling_a_parked_session_is_harmless() {
    let p = spawn_proxy_full(parking_config());
    let c = connect(p.addr, "").await;
    parked(&p.ctx, 1).await;
    c.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    // Still parked, and then answers as usual.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.ctx.metrics.clients_parked(), 1);
    let v = common::show(&c, "SELECT 7").await.1;
    assert_eq!(v[0][0], "7");
}
