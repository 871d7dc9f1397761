//! Rejoining the fenced old primary as a standby of the new one
//! (`failover.rejoin = "pg_rewind"`): after it wrote transactions no standby
//! received (asynchronous replication), it is rewound, streams from the new
//! primary through its own slot, and has the new rows, not the lost ones.
//! With synchronous replication and an unknown end of WAL it is refused. A
//! standby that returns ahead of the new primary on the old timeline is held
//! as diverged at once, and rewound the same way.

use pgpilot::config::RejoinMode;

use super::*;

/// `sql` on `node` in the test database, `None` while it does not answer.
async fn try_psql(c: &Arc<LocalCluster>, node: usize, sql: &str) -> Option<String> {
    let (c, sql) = (c.clone(), sql.to_string());
    blocking(move || c.psql_db(node, DB, &sql)).await.ok()
}

/// Node 1 stops receiving WAL (its WAL receiver is switched off), node 0
/// commits `keys` that only it has, then node 0 is killed and node 1
/// promoted; node 1's primary_conninfo is put back (a new primary keeps the
/// one it had as a standby). Returns when node 1 is the published primary
/// and a write through pgpilot landed there.
async fn fail_over_with_unstreamed_writes(
    c: &Arc<LocalCluster>,
    p: &StoppableProxy,
    keys: &[&str],
) {
    psql(c, 0, "INSERT INTO t VALUES ('before')").await;
    let cc = c.clone();
    blocking(move || cc.wait_replayed())
        .await
        .expect("node 1 replays");
    let conninfo = psql_in(c, 1, "postgres", "SHOW primary_conninfo").await;
    psql_in(c, 1, "postgres", "ALTER SYSTEM SET primary_conninfo = ''").await;
    psql_in(c, 1, "postgres", "SELECT pg_reload_conf()").await;
    wait_until(
        "node 1's WAL receiver stopped",
        Duration::from_secs(20),
        async || {
            try_psql(c, 1, "SELECT count(*) FROM pg_stat_wal_receiver")
                .await
                .as_deref()
                == Some("0")
        },
    )
    .await;
    for k in keys {
        psql(c, 0, &format!("INSERT INTO t VALUES ('{k}')")).await;
    }
    let killed = kill_primary(c, p).await;
    new_primary(p, 1, killed, Duration::from_secs(30)).await;
    let set = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    );
    psql_in(c, 1, "postgres", &set).await;
    write_lands_on(p, c.nodes[1].port, "after-failover").await;
}

/// Wait until node 0 streams from node 1 through its slot `node0`.
async fn streams_from_node1(c: &Arc<LocalCluster>, limit: Duration) {
    let receiver = "SELECT status || ' from ' || sender_port FROM pg_stat_wal_receiver";
    let streaming = format!("streaming from {}", c.nodes[1].port);
    let through_slot = "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s \
                        ON s.active_pid = r.pid WHERE s.slot_name = 'node0' \
                        AND r.application_name = 'node0' AND r.state = 'streaming'";
    wait_until(
        "node 0 streaming from node 1 through slot node0",
        limit,
        async || {
            try_psql(c, 0, receiver).await.as_deref() == Some(streaming.as_str())
                && try_psql(c, 1, through_slot).await.as_deref() == Some("1")
        },
    )
    .await;
}

/// Node 0 is in service as a standby, not fenced, with the new rows and
/// without the lost ones.
async fn rejoined_as_standby(c: &Arc<LocalCluster>, p: &StoppableProxy, lost: &[&str]) {
    replicated_to(c, 0, "after-failover").await;
    let keys = keys_on(c, 0).await;
    assert!(keys.contains("before"), "{keys:?}");
    for k in lost {
        assert!(!keys.contains(*k), "lost row {k} still on node 0: {keys:?}");
    }
    assert_eq!(
        psql_in(c, 0, "postgres", "SELECT pg_is_in_recovery()").await,
        "t"
    );
    let ctx = p.ctx.clone();
    wait_for(
        "node 0 in service as a standby",
        Duration::from_secs(30),
        || {
            let s = ctx.cluster.snapshot();
            let n = &s.nodes[0];
            (s.primary == Some(NodeId::new(1)) && n.status.is_usable() && n.held_out.is_none())
                .then_some(())
        },
    )
    .await;
    let admin = connect(p.addr, "").await;
    let (cols, rows) = show(&admin, "SHOW PGPILOT_NODES").await;
    let role = cols.iter().position(|c| c == "role").unwrap();
    assert_eq!(rows[0][role], "standby", "{rows:?}");
    let m = metrics(p).await;
    assert_eq!(m["pgpilot_failover_events_total{event=\"rejoin\"}"], 1.0);
}

#[tokio::test]
async fn the_old_primary_is_rewound_and_streams_from_the_new_primary() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(1, false, &["wal_log_hints = on"], true).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.rejoin = RejoinMode::PgRewind;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let lost = ["unstreamed-1", "unstreamed-2", "unstreamed-3"];
    fail_over_with_unstreamed_writes(&cluster, &p, &lost).await;

    let admin = connect(p.addr, "").await;
    let (_, rows) = show(&admin, "REJOIN NODE 0").await;
    assert!(rows[0][1].contains("rejoin of node 0 started"), "{rows:?}");
    // A second one while it runs is refused.
    let again = admin.simple_query("REJOIN NODE 0").await.unwrap_err();
    assert_eq!(sqlstate(&again).as_deref(), Some("55000"), "{again}");
    let started = Instant::now();
    streams_from_node1(&cluster, Duration::from_secs(90)).await;
    eprintln!(
        "node 0 streams from node 1 {:?} after REJOIN NODE 0",
        started.elapsed()
    );
    rejoined_as_standby(&cluster, &p, &lost).await;
    // Nothing else to rejoin now.
    let e = admin.simple_query("REJOIN NODE 0").await.unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        msg.as_deref()
            .is_some_and(|m| m.contains("nothing to rejoin")),
        "{msg:?}"
    );
}

#[tokio::test]
async fn auto_rejoin_brings_the_old_primary_back_without_an_operator() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(1, false, &["wal_log_hints = on"], true).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.rejoin = RejoinMode::PgRewind;
    cfg.failover.auto_rejoin = true;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let lost = ["unstreamed-a"];
    let t0 = Instant::now();
    fail_over_with_unstreamed_writes(&cluster, &p, &lost).await;
    streams_from_node1(&cluster, Duration::from_secs(90)).await;
    eprintln!(
        "node 0 streams from node 1 {:?} after the failover began",
        t0.elapsed()
    );
    rejoined_as_standby(&cluster, &p, &lost).await;
}

#[tokio::test]
async fn a_rejoin_that_could_lose_acknowledged_writes_is_refused() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(1, true, &["wal_log_hints = on"], true).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.rejoin = RejoinMode::PgRewind;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    psql(&cluster, 0, "INSERT INTO t VALUES ('acknowledged')").await;
    let killed = kill_primary(&cluster, &p).await;
    new_primary(&p, 1, killed, Duration::from_secs(30)).await;

    // `pgpilot rejoin 0` follows it to the refusal and fails with it.
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let conf = cli_config(dir.path(), &p, &ports);
    let (ok, out) = cli(&["rejoin", "0", "--config", conf.to_str().unwrap()]).await;
    assert!(!ok && out.contains("rejoin refused"), "{out}");
    let ctx = p.ctx.clone();
    let why = wait_for("the rejoin refused", Duration::from_secs(60), || {
        let n = &ctx.cluster.snapshot().nodes[0];
        n.held_out.clone().filter(|h| h.contains("rejoin refused"))
    })
    .await;
    assert!(why.contains("synchronous replication"), "{why}");
    assert!(why.contains("acknowledged writes"), "{why}");
    assert!(why.starts_with("fenced"), "{why}");
    // Untouched: still stopped, still fenced, no traffic.
    assert_eq!(try_psql(&cluster, 0, "SELECT 1").await, None);
    let s = ctx.cluster.snapshot();
    assert!(!s.nodes[0].status.is_usable());
    let m = metrics(&p).await;
    assert_eq!(
        m["pgpilot_failover_events_total{event=\"rejoin_failed\"}"],
        1.0
    );
}

#[tokio::test]
async fn a_standby_ahead_on_the_old_timeline_is_held_as_diverged_then_rewound() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(2, false, &["wal_log_hints = on"], true).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.rejoin = RejoinMode::PgRewind;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let ctx = p.ctx.clone();

    // Node 1 stops receiving; node 2 receives rows node 1 never gets, then
    // is stopped; node 0 dies, so node 1 (the only candidate) is promoted
    // behind node 2.
    let conninfo = psql_in(&cluster, 1, "postgres", "SHOW primary_conninfo").await;
    psql_in(
        &cluster,
        1,
        "postgres",
        "ALTER SYSTEM SET primary_conninfo = ''",
    )
    .await;
    psql_in(&cluster, 1, "postgres", "SELECT pg_reload_conf()").await;
    wait_until(
        "node 1's WAL receiver stopped",
        Duration::from_secs(20),
        async || {
            try_psql(&cluster, 1, "SELECT count(*) FROM pg_stat_wal_receiver")
                .await
                .as_deref()
                == Some("0")
        },
    )
    .await;
    psql(&cluster, 0, "INSERT INTO t VALUES ('only-on-node2')").await;
    replicated_to(&cluster, 2, "only-on-node2").await;
    let c = cluster.clone();
    blocking(move || c.stop_node(2, "fast"))
        .await
        .expect("stop node 2");
    let killed = kill_primary(&cluster, &p).await;
    new_primary(&p, 1, killed, Duration::from_secs(30)).await;
    let set = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    );
    psql_in(&cluster, 1, "postgres", &set).await;
    write_lands_on(&p, cluster.nodes[1].port, "after-failover").await;
    let follows = ctx.cluster.failover_report().counts.get(Event::Follow);

    // Node 2 returns: recognised as diverged up front, not re-pointed.
    let c = cluster.clone();
    blocking(move || c.start_node(2))
        .await
        .expect("restart node 2");
    let why = wait_for("node 2 held as diverged", Duration::from_secs(30), || {
        ctx.cluster.snapshot().nodes[2]
            .held_out
            .clone()
            .filter(|h| h.contains("diverged"))
    })
    .await;
    assert!(why.starts_with("cannot follow: diverged"), "{why}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        ctx.cluster.failover_report().counts.get(Event::Follow),
        follows
    );
    assert!(!ctx.cluster.snapshot().nodes[2].status.is_usable());

    // REJOIN NODE 2 rewinds it: it streams from node 1, without the row.
    let admin = connect(p.addr, "").await;
    show(&admin, "REJOIN NODE 2").await;
    let streaming = format!("streaming from {}", cluster.nodes[1].port);
    wait_until(
        "node 2 streaming from node 1",
        Duration::from_secs(90),
        async || {
            try_psql(
                &cluster,
                2,
                "SELECT status || ' from ' || sender_port FROM pg_stat_wal_receiver",
            )
            .await
            .as_deref()
                == Some(streaming.as_str())
        },
    )
    .await;
    replicated_to(&cluster, 2, "after-failover").await;
    assert!(!keys_on(&cluster, 2).await.contains("only-on-node2"));
    wait_for("node 2 back in service", Duration::from_secs(30), || {
        let n = &ctx.cluster.snapshot().nodes[2];
        (n.status.is_usable() && n.held_out.is_none()).then_some(())
    })
    .await;
}
