//! What must never cause a failover (anything a client does) and what must
//! not be promoted automatically (a lagging standby).

use super::*;

#[tokio::test]
async fn nothing_a_client_does_fails_over_a_healthy_primary() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let p = spawn_proxy_stoppable(h.config());
    all_in_service(&p, 0).await;
    let primary = "/* pgpilot:primary */";

    // A client kills its own backend on the primary, provokes a FATAL,
    // vanishes mid-query.
    common::client_misbehaviour(p.addr, primary).await;
    // A cancel of a query on the primary.
    let c = connect(p.addr, "").await;
    let token = c.cancel_token();
    let q = tokio::spawn(async move {
        c.simple_query(&format!("{primary} SELECT pg_sleep(5) AS cancel_target"))
            .await
    });
    let su = common::superusers().await;
    wait_until(
        "the query to cancel to run",
        Duration::from_secs(30),
        async || common::running(&su, "AS cancel_target").await,
    )
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = q.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    // Many clients terminating their backends at once.
    let mut kills = Vec::new();
    for _ in 0..10 {
        let addr = p.addr;
        kills.push(tokio::spawn(async move {
            let c = connect(addr, "").await;
            let _ = c
                .simple_query(&format!(
                    "{primary} SELECT pg_terminate_backend(pg_backend_pid())"
                ))
                .await;
        }));
    }
    for k in kills {
        k.await.unwrap();
    }
    // Health checks (and the probes session errors trigger) had their chance.
    common::health_rounds(&p.ctx, 3).await;
    let r = p.ctx.cluster.failover_report();
    assert_eq!(r.counts.get(Event::FailoverStarted), 0, "{r:?}");
    assert!(r.current.is_none() && r.blocked.is_none());
    let s = p.ctx.cluster.snapshot();
    assert_eq!(s.primary, Some(NodeId::new(0)));
    assert!(s.nodes.iter().all(|n| n.status.is_usable()));
    let c = connect(p.addr, "").await;
    let (_, rows) = show(&c, &format!("{primary} SELECT inet_server_port()")).await;
    assert_eq!(rows[0][0], h.ports[0].to_string());
}

#[tokio::test]
async fn a_lagging_candidate_is_refused_until_an_operator_promotes_it() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false, &[]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.max_lag_bytes = 1 << 20;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    // The standby stops receiving; the primary writes ~6 MB more.
    psql_in(
        &cluster,
        1,
        "postgres",
        "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1 user=postgres'",
    )
    .await;
    psql_in(&cluster, 1, "postgres", "SELECT pg_reload_conf()").await;
    psql(
        &cluster,
        0,
        "INSERT INTO t SELECT 'filler-' || g || repeat('x', 1000) FROM generate_series(1, 5000) g",
    )
    .await;
    let ctx = p.ctx.clone();
    wait_for("the standby's lag to show", Duration::from_secs(30), || {
        let lag = ctx.cluster.snapshot().nodes[1].repl.lag_bytes?;
        (lag > 4 << 20).then_some(())
    })
    .await;
    // An admin session whose last request ran on the standby survives the kill.
    let admin = connect(p.addr, "").await;
    show(&admin, "SELECT 1").await;
    kill_primary(&cluster, &p).await;
    let detail = wait_for(
        "the failover to refuse the candidate",
        Duration::from_secs(20),
        || {
            let r = ctx.cluster.failover_report();
            let t = r.current?;
            (t.phase.as_str() == "waiting").then_some(t.detail)
        },
    )
    .await;
    assert!(
        detail.contains("refused") && detail.contains("max_lag_bytes"),
        "{detail}"
    );
    // Time itself: the waiting failover retries its candidate every second;
    // two seconds of retries must not promote it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(psql(&cluster, 1, "SELECT pg_is_in_recovery()").await, "t");
    let (cols, rows) = show(&admin, "SHOW PGPILOT_FAILOVER").await;
    let col = |n: &str| rows[0][cols.iter().position(|c| c == n).unwrap()].clone();
    assert_eq!(
        (col("state"), col("phase")),
        ("failover".into(), "waiting".into())
    );
    assert!(
        col("detail").contains("PROMOTE NODE 1"),
        "{}",
        col("detail")
    );
    // The operator accepts the loss.
    let (_, rows) = show(&admin, "PROMOTE NODE 1").await;
    assert!(rows[0][1].contains("will promote node 1"), "{rows:?}");
    new_primary(&p, 1, Instant::now(), Duration::from_secs(30)).await;
    write_lands_on(&p, cluster.nodes[1].port, "after-forced").await;
    let r = ctx.cluster.failover_report();
    assert!(r.counts.get(Event::CandidateRefused) >= 1);
    assert_eq!(r.last.unwrap().target, Some(NodeId::new(1)));
}
