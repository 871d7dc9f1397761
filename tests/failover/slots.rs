//! Standbys that stream through physical replication slots (`pg_basebackup
//! -R -C -S nodeN`): slots are not replicated, so after a failover the new
//! primary has none; pgpilot creates each standby's slot there before
//! re-pointing it, and the standby streams again without a gap.

use super::*;

/// `sql` on `node` as the superuser, `None` while the node does not answer.
async fn try_psql(c: &Arc<LocalCluster>, node: usize, sql: &str) -> Option<String> {
    let (c, sql) = (c.clone(), sql.to_string());
    blocking(move || c.psql_db(node, "postgres", &sql))
        .await
        .ok()
}

#[tokio::test]
async fn a_standby_with_a_slot_streams_from_the_new_primary_after_a_failover() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(2, false, &[], true).await;
    create_table(&cluster).await;
    let p = spawn_proxy_stoppable(config_for(&cluster));
    all_in_service(&p, 0).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();

    let load = Load::writers(p.addr, 2, Duration::from_millis(5), true);
    wait_until(
        "every writer's first 25 writes",
        Duration::from_secs(30),
        async || load.count(|_| true).iter().all(|&n| n >= 25),
    )
    .await;
    let (killed, new, published) = fail_primary_over(&cluster, &p).await;
    let ctx = p.ctx.clone();
    wait_until(
        "every writer's write on the new primary",
        Duration::from_secs(30),
        async || {
            load.count(|a| a.port == ports[new] && a.at > killed)
                .iter()
                .all(|&n| n > 0)
        },
    )
    .await;

    // The other standby streams from the new primary, through its slot there.
    let other = 3 - new;
    let slot = format!("node{other}");
    let receiver = "SELECT status || ' from ' || sender_port FROM pg_stat_wal_receiver";
    let streaming = format!("streaming from {}", ports[new]);
    let through_slot = format!(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s \
         ON s.active_pid = r.pid WHERE s.slot_name = '{slot}' AND s.active \
         AND r.application_name = '{slot}' AND r.state = 'streaming'"
    );
    wait_until(
        &format!("node {other} streaming from node {new} through slot {slot}"),
        Duration::from_secs(20),
        async || {
            let got = try_psql(&cluster, other, receiver).await;
            got.as_deref() == Some(streaming.as_str())
                && try_psql(&cluster, new, &through_slot).await.as_deref() == Some("1")
        },
    )
    .await;
    let streams_after = killed.elapsed();
    eprintln!(
        "node {new} published {published:?} after the kill; node {other} streams from it \
         through slot {slot} {streams_after:?} after the kill"
    );

    assert!(
        streams_after < published + Duration::from_secs(5),
        "node {other} streamed only {streams_after:?} after the kill"
    );

    // Rows written after the failover reach it.
    let seen = load.finish().await;
    let c = connect(p.addr, "").await;
    c.simple_query("INSERT INTO t VALUES ('after-failover')")
        .await
        .unwrap();
    replicated_to(&cluster, other, "after-failover").await;
    let on_other = keys_on(&cluster, other).await;
    let written_after: Vec<&str> = seen
        .iter()
        .flat_map(|s| &s.acks)
        .filter(|a| a.port == ports[new])
        .map(|a| a.key.as_str())
        .collect();
    assert!(!written_after.is_empty());
    let missing: Vec<&&str> = written_after
        .iter()
        .filter(|k| !on_other.contains(**k))
        .collect();
    assert!(
        missing.is_empty(),
        "rows written on node {new} after the failover missing on node {other}: {missing:?}"
    );
    wait_for("the follow counted", Duration::from_secs(10), || {
        (ctx.cluster.failover_report().counts.get(Event::Follow) >= 1).then_some(())
    })
    .await;
}

/// `SHOW PGPILOT_SLOTS` as slot name → (node_id, active, retained_bytes,
/// stale_seconds).
async fn slots_view(
    c: &tokio_postgres::Client,
) -> HashMap<String, (String, String, String, String)> {
    let (cols, rows) = show(c, "SHOW PGPILOT_SLOTS").await;
    assert_eq!(
        cols,
        [
            "slot_name",
            "node_id",
            "active",
            "retained_bytes",
            "stale_seconds"
        ]
    );
    rows.into_iter()
        .map(|r| {
            (
                r[0].clone(),
                (r[1].clone(), r[2].clone(), r[3].clone(), r[4].clone()),
            )
        })
        .collect()
}

#[tokio::test]
async fn slots_of_nodes_that_are_gone_are_reported_then_dropped() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(2, false, &[], true).await;
    let mut cfg = config_for(&cluster);
    let after = Duration::from_secs(6);
    cfg.failover.drop_stale_slots_after = after;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    // A slot no configured node uses, as an old standby leaves behind.
    psql_in(
        &cluster,
        0,
        "postgres",
        "SELECT pg_create_physical_replication_slot('gone', true)",
    )
    .await;
    let c = connect(p.addr, "").await;
    let mut view = HashMap::new();
    wait_until(
        "SHOW PGPILOT_SLOTS lists the standbys' slots and the stale one",
        Duration::from_secs(15),
        async || {
            view = slots_view(&c).await;
            view.len() == 3 && !view["gone"].3.is_empty()
        },
    )
    .await;
    assert_eq!(view["node1"].0, "1", "{view:?}");
    assert_eq!(view["node2"].0, "2", "{view:?}");
    for s in ["node1", "node2"] {
        assert_eq!((&*view[s].1, &*view[s].3), ("true", ""), "{view:?}");
    }
    assert_eq!((&*view["gone"].0, &*view["gone"].1), ("", "false"));
    assert!(view["gone"].2.parse::<u64>().is_ok(), "{view:?}");

    // Node 2 goes away: its slot turns stale once it is out of service.
    let c2 = cluster.clone();
    blocking(move || c2.stop_node(2, "fast"))
        .await
        .expect("stop node 2");
    let stopped = Instant::now();
    wait_until(
        "slot node2 reported stale",
        Duration::from_secs(30),
        async || {
            view = slots_view(&c).await;
            view.get("node2").is_some_and(|s| !s.3.is_empty())
        },
    )
    .await;
    let m = metrics(&p).await;
    assert_eq!(m["pgpilot_replication_slot_stale{slot=\"node2\"}"], 1.0);
    assert_eq!(m["pgpilot_replication_slot_stale{slot=\"node1\"}"], 0.0);
    assert!(m.contains_key("pgpilot_replication_slot_retained_bytes{slot=\"node2\"}"));

    // After drop_stale_slots_after, both stale slots are dropped; node 1's stays.
    let listed = "SELECT string_agg(slot_name || ':' || active, ',' ORDER BY slot_name) \
                  FROM pg_replication_slots";
    wait_until(
        "the stale slots dropped on the primary",
        Duration::from_secs(30),
        async || try_psql(&cluster, 0, listed).await.as_deref() == Some("node1:true"),
    )
    .await;
    assert!(
        stopped.elapsed() >= after,
        "dropped {:?} after node 2 stopped",
        stopped.elapsed()
    );
    wait_until(
        "SHOW PGPILOT_SLOTS without the dropped slots",
        Duration::from_secs(10),
        async || slots_view(&c).await.into_keys().collect::<Vec<_>>() == ["node1"],
    )
    .await;
    let m = metrics(&p).await;
    assert!(!m.contains_key("pgpilot_replication_slot_stale{slot=\"node2\"}"));
}

#[tokio::test]
async fn a_standby_down_during_a_failover_follows_the_new_primary_when_it_returns() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster_with(2, false, &[], true).await;
    create_table(&cluster).await;
    let p = spawn_proxy_stoppable(config_for(&cluster));
    all_in_service(&p, 0).await;
    let ctx = p.ctx.clone();

    // Node 2 is down while node 0 fails and node 1 is promoted.
    let c = cluster.clone();
    blocking(move || c.stop_node(2, "fast"))
        .await
        .expect("stop node 2");
    psql(&cluster, 0, "INSERT INTO t VALUES ('before-failover')").await;
    let c = cluster.clone();
    blocking(move || c.wait_replayed())
        .await
        .expect("node 1 replays");
    let killed = kill_primary(&cluster, &p).await;
    new_primary(&p, 1, killed, Duration::from_secs(30)).await;
    write_lands_on(&p, cluster.nodes[1].port, "after-failover").await;

    // It comes back with its old primary_conninfo (node 0) and slot name.
    let c = cluster.clone();
    blocking(move || c.start_node(2))
        .await
        .expect("restart node 2");
    let started = Instant::now();
    let receiver = "SELECT status || ' from ' || sender_port FROM pg_stat_wal_receiver";
    let streaming = format!("streaming from {}", cluster.nodes[1].port);
    let through_slot = "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s \
                        ON s.active_pid = r.pid WHERE s.slot_name = 'node2' \
                        AND r.application_name = 'node2' AND r.state = 'streaming'";
    wait_until(
        "node 2 streaming from node 1 through slot node2",
        Duration::from_secs(30),
        async || {
            let got = try_psql(&cluster, 2, receiver).await;
            got.as_deref() == Some(streaming.as_str())
                && try_psql(&cluster, 1, through_slot).await.as_deref() == Some("1")
        },
    )
    .await;
    eprintln!(
        "node 2 streams from node 1 {:?} after it restarted",
        started.elapsed()
    );
    replicated_to(&cluster, 2, "after-failover").await;
    wait_for(
        "node 2 back in service for reads",
        Duration::from_secs(30),
        || {
            let n = &ctx.cluster.snapshot().nodes[2];
            (n.status.is_usable() && n.effective_weight > 0.0 && !n.repl.timeline_mismatch)
                .then_some(())
        },
    )
    .await;
    assert_eq!(ctx.cluster.snapshot().primary, Some(NodeId::new(1)));
}
