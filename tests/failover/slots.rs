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
    let killed = Instant::now();
    let c = cluster.clone();
    blocking(move || c.stop_node(0, "immediate"))
        .await
        .expect("stop the primary");
    let ctx = p.ctx.clone();
    let new = wait_for("a new primary", Duration::from_secs(30), || {
        ctx.cluster.snapshot().primary.filter(|&n| n != 0)
    })
    .await;
    let published = killed.elapsed();
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
