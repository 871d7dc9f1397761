//! The primary killed under write load: the most advanced standby is
//! promoted, acknowledged writes survive, clients see a short outage.

use super::*;

#[tokio::test]
async fn killing_the_primary_under_write_load_promotes_the_most_advanced_standby() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, true, &[]).await;
    create_table(&cluster).await;
    let p = spawn_proxy_stoppable(config_for(&cluster));
    all_in_service(&p, 0).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();

    let load = Load::writers(p.addr, 4, Duration::from_millis(5), true);
    let reads = Load::reader(p.addr);
    wait_until(
        "every writer's first 25 writes and a read",
        Duration::from_secs(30),
        async || load.count(|_| true).iter().all(|&n| n >= 25) && reads.count(|_| true)[0] > 0,
    )
    .await;

    let (killed, new, published) = fail_primary_over(&cluster, &p).await;
    let ctx = p.ctx.clone();
    wait_until(
        "every writer's write on the new primary and a read after it was published",
        Duration::from_secs(30),
        async || {
            let on_new = |a: &Ack| a.port == ports[new] && a.at > killed;
            load.count(on_new).iter().all(|&n| n > 0)
                && reads.count(|a| a.at > killed + published)[0] > 0
        },
    )
    .await;
    let seen = load.finish().await;
    let read_seen = reads.finish().await.remove(0);

    // Downtime: kill → first write acknowledged by the new primary.
    let first_new = seen
        .iter()
        .flat_map(|s| &s.acks)
        .filter(|a| a.port == ports[new] && a.at > killed)
        .map(|a| a.at)
        .min()
        .unwrap_or_else(|| {
            let ports: Vec<(u16, usize)> = seen
                .iter()
                .map(|s| (s.acks.last().map_or(0, |a| a.port), s.acks.len()))
                .collect();
            panic!(
                "writes did not resume on node {new}: last ports/acks {ports:?}; errors {:?}",
                seen.iter()
                    .map(|s| s.errors.iter().rev().take(3).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            )
        });
    let downtime = first_new - killed;
    let acked: Vec<&Ack> = seen.iter().flat_map(|s| &s.acks).collect();
    let on_new = keys_on(&cluster, new).await;
    let lost: Vec<&str> = acked
        .iter()
        .filter(|a| !on_new.contains(&a.key))
        .map(|a| a.key.as_str())
        .collect();
    let errors: Vec<_> = seen.iter().flat_map(|s| &s.errors).collect();
    eprintln!(
        "failover to node {new}: new primary published {published:?} after the kill, \
         write downtime {downtime:?}; {} writes acknowledged, {} lost; {} client errors; \
         reader: {} reads, {} errors",
        acked.len(),
        lost.len(),
        errors.len(),
        read_seen.acks.len(),
        read_seen.errors.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new primary: {lost:?}"
    );
    assert!(downtime < Duration::from_secs(10), "downtime {downtime:?}");
    // Sessions whose backend died were told a failover is in progress.
    assert!(
        errors
            .iter()
            .any(|(_, code, msg)| code == "57P01" && msg.contains("failover in progress")),
        "{errors:?}"
    );
    for (_, code, msg) in &errors {
        assert!(
            ["57P01", "08006", ""].contains(&code.as_str()),
            "unexpected client error {code} {msg}"
        );
    }
    assert!(
        read_seen.errors.is_empty(),
        "reader errors: {:?}",
        read_seen.errors
    );
    assert!(read_seen.acks.iter().any(|a| a.at > killed + published));

    // The most advanced standby (with synchronous replication both are
    // complete; ties go to the lower id) was promoted; the other follows.
    let other = 3 - new;
    let s = p.ctx.cluster.snapshot();
    assert_eq!(s.primary, Some(NodeId::new(new)));
    let c = connect(p.addr, "").await;
    c.simple_query("INSERT INTO t VALUES ('after-failover')")
        .await
        .unwrap();
    let took = replicated_to(&cluster, other, "after-failover").await;
    eprintln!("node {other} follows node {new}: a new row arrived after {took:?}");
    wait_for(
        "the other standby to serve reads again",
        Duration::from_secs(30),
        || {
            let n = &ctx.cluster.snapshot().nodes[other];
            (n.status.is_usable() && n.effective_weight > 0.0 && !n.repl.timeline_mismatch)
                .then_some(())
        },
    )
    .await;
    let r = connect(p.addr, "").await;
    let (_, rows) = show(
        &r,
        "SELECT inet_server_port(), count(*) FROM t WHERE k = 'after-failover'",
    )
    .await;
    assert_eq!(rows[0], vec![ports[other].to_string(), "1".to_string()]);

    // The old primary restarted as it was is fenced: a false primary.
    let c2 = cluster.clone();
    blocking(move || c2.start_node(0))
        .await
        .expect("restart node 0");
    wait_for(
        "node 0 fenced as a false primary",
        Duration::from_secs(30),
        || {
            let n = &ctx.cluster.snapshot().nodes[0];
            n.held_out
                .as_deref()
                .filter(|h| h.starts_with("false primary") && !n.status.is_usable())
                .map(|_| ())
        },
    )
    .await;
    let before = activity(&cluster, 0).await;
    assert!(
        before.ends_with("/0"),
        "sessions in the fenced node: {before}"
    );
    for i in 0..10 {
        let c = connect(p.addr, "").await;
        c.simple_query(&format!("INSERT INTO t VALUES ('fenced-{i}')"))
            .await
            .unwrap();
        c.simple_query("SELECT count(*) FROM t").await.unwrap();
        c.simple_query("/* pgpilot:primary */ SELECT 1")
            .await
            .unwrap();
    }
    // Time itself: a stray transaction shows in pg_stat_database only once
    // its backend flushes its statistics (at most once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = activity(&cluster, 0).await;
    assert_eq!(before, after, "a statement reached the fenced old primary");
    assert_eq!(psql_in(&cluster, 0, "postgres", "SELECT 1").await, "1");
    assert_eq!(
        psql(
            &cluster,
            0,
            "SELECT count(*) FROM t WHERE k LIKE 'fenced-%'"
        )
        .await,
        "0"
    );
    assert_eq!(
        psql(
            &cluster,
            new,
            "SELECT count(*) FROM t WHERE k LIKE 'fenced-%'"
        )
        .await,
        "10"
    );

    // What operators see.
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    assert_eq!(
        (&*rows[0][3], &*rows[0][7]),
        ("down", "primary"),
        "{rows:?}"
    );
    assert_eq!(rows[new][6], "primary");
    let (cols, rows) = show(&c, "SHOW PGPILOT_NODES").await;
    let held = cols.iter().position(|c| c == "held_out").unwrap();
    assert!(rows[0][held].contains("false primary") && rows[0][held].contains("ATTACH NODE 0"));
    // pgpool's column says `standby` for every node but the primary; pgpilot's
    // own view names the fenced old primary.
    let role = cols.iter().position(|c| c == "role").unwrap();
    assert_eq!(rows[0][role], "fenced", "{rows:?}");
    let (cols, rows) = show(&c, "SHOW PGPILOT_FAILOVER").await;
    let col = |n: &str| rows[0][cols.iter().position(|c| c == n).unwrap()].clone();
    assert_eq!((col("state"), col("phase")), ("idle".into(), "done".into()));
    assert_eq!(
        (col("old_primary"), col("new_primary")),
        ("0".into(), new.to_string())
    );
    let e = c.simple_query("ATTACH NODE 0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let m = metrics(&p).await;
    for (event, want) in [
        ("failover_started", 1.0),
        ("failover_finished", 1.0),
        ("promotion", 1.0),
    ] {
        assert_eq!(
            m[&format!("pgpilot_failover_events_total{{event=\"{event}\"}}")],
            want,
            "{event}"
        );
    }
    assert!(m["pgpilot_failover_events_total{event=\"fenced\"}"] >= 1.0);
    assert!(m["pgpilot_failover_events_total{event=\"follow\"}"] >= 1.0);
    assert_eq!(m["pgpilot_failover_in_progress"], 0.0);
    assert_eq!(
        p.ctx
            .cluster
            .failover_report()
            .counts
            .get(Event::FailoverFailed),
        0
    );
}
