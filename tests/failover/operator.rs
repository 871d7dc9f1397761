//! What an operator does by hand: a planned switchover (`PROMOTE NODE`),
//! detaching and re-attaching a standby.

use super::*;

#[tokio::test]
async fn promote_node_switches_over_without_client_errors() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false, &[]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.switchover_timeout = Duration::from_secs(2);
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let dir = tempfile::tempdir().unwrap();
    let conf = cli_config(dir.path(), &p, &ports);
    let conf = conf.to_str().unwrap();

    // A client that names itself like pgpilot's own checks and holds a write
    // transaction open: the drain must not overlook it (it is terminated at
    // switchover_timeout, so it never commits on the old primary).
    let sneaky = connect(p.addr, "application_name=pgpilot-health").await;
    sneaky
        .batch_execute("BEGIN; INSERT INTO t VALUES ('sneaky')")
        .await
        .unwrap();

    // Light load: clients between transactions most of the time.
    let load = Load::writers(p.addr, 3, Duration::from_millis(20), false);
    // What SHOW POOL_NODES says as the switchover goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let primaries = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (stop, addr, seen) = (stop.clone(), p.addr, primaries.clone());
        tokio::spawn(async move {
            let c = connect(addr, "").await;
            while !stop.load(Ordering::Relaxed) {
                let (_, rows) = show(&c, "SHOW POOL_NODES").await;
                let primary = rows
                    .iter()
                    .find(|r| r[6] == "primary")
                    .map_or("none".to_string(), |r| r[0].clone());
                {
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&primary) {
                        seen.push(primary);
                    }
                }
                // Sampling: often enough to see the moment without a primary.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let last_primary = || primaries.lock().unwrap().last().cloned();
    wait_until(
        "every writer's first 10 writes and the watcher's first look",
        Duration::from_secs(30),
        async || {
            load.count(|_| true).iter().all(|&n| n >= 10) && last_primary().as_deref() == Some("0")
        },
    )
    .await;
    let t0 = Instant::now();
    let (ok, out) = cli(&["promote", "1", "--config", conf]).await;
    let took = t0.elapsed();
    assert!(ok, "pgpilot promote failed:\n{out}");
    wait_until(
        "every writer's write on node 1 and the watcher to see it the primary",
        Duration::from_secs(30),
        async || {
            load.count(|a| a.port == ports[1]).iter().all(|&n| n > 0)
                && last_primary().as_deref() == Some("1")
        },
    )
    .await;
    let seen = load.finish().await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let primaries = primaries.lock().unwrap().clone();
    let acked: Vec<&Ack> = seen.iter().flat_map(|s| &s.acks).collect();
    let errors: Vec<_> = seen.iter().flat_map(|s| &s.errors).collect();
    let on_new = keys_on(&cluster, 1).await;
    let lost = acked.iter().filter(|a| !on_new.contains(&a.key)).count();
    eprintln!(
        "switchover in {took:?} (CLI):\n{out}\n{} writes acknowledged, {lost} lost, {} failed; SHOW POOL_NODES primary went {primaries:?}",
        acked.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "client errors during the switchover: {errors:?}"
    );
    assert_eq!(lost, 0);
    assert!(
        acked.iter().any(|a| a.port == ports[1]),
        "writes moved to node 1"
    );
    assert_eq!(primaries, ["0", "none", "1"]);
    assert!(out.contains("done"), "{out}");
    assert!(
        sneaky.batch_execute("COMMIT").await.is_err(),
        "a transaction open across the switchover committed"
    );
    assert_eq!(
        psql(&cluster, 0, "SELECT count(*) FROM t WHERE k = 'sneaky'").await,
        "0"
    );

    // The old primary is fenced and read-only; node 2 follows node 1.
    let n0 = p.ctx.cluster.snapshot().nodes[0].clone();
    assert!(!n0.status.is_usable());
    assert!(
        n0.held_out.as_deref().unwrap_or("").contains("fenced"),
        "{:?}",
        n0.held_out
    );
    assert_eq!(
        psql(&cluster, 0, "SHOW default_transaction_read_only").await,
        "on"
    );
    write_lands_on(&p, ports[1], "after-switchover").await;
    replicated_to(&cluster, 2, "after-switchover").await;
    let (ok, nodes) = cli(&["nodes", "--config", conf]).await;
    assert!(ok, "{nodes}");
    let row1 = nodes
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_default();
    assert!(row1.contains("primary"), "{nodes}");
    let last = p.ctx.cluster.failover_report().last.unwrap();
    assert_eq!(last.kind.as_str(), "switchover");
    // A second PROMOTE NODE to the fenced node is refused.
    let (ok, out) = cli(&["promote", "0", "--config", conf]).await;
    assert!(!ok && out.contains("not an in-service standby"), "{out}");
}

#[tokio::test]
async fn detach_and_attach_a_standby() {
    let _serial = SERIAL.lock().await;
    let h = harness();
    let p = spawn_proxy_stoppable(h.config());
    all_in_service(&p, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = cli_config(dir.path(), &p, &h.ports);
    let conf = conf.to_str().unwrap();
    let reads_on = |addr| async move {
        let mut ports = HashSet::new();
        for _ in 0..20 {
            let c = connect(addr, "").await;
            let (_, rows) = show(&c, "SELECT inet_server_port()").await;
            ports.insert(rows[0][0].parse::<u16>().unwrap());
        }
        ports
    };

    // Through the extended protocol: Describe must not run it twice.
    let c = connect(p.addr, "").await;
    let rows = c.query("DETACH NODE 2", &[]).await.unwrap();
    let msg: String = rows[0].get("result");
    assert!(msg.contains("detached"), "{msg}");
    assert_eq!(p.ctx.cluster.failover_report().counts.get(Event::Detach), 1);
    let (_, rows) = show(&c, "SHOW POOL_NODES").await;
    assert_eq!(rows[2][3], "down");
    let (cols, rows) = show(&c, "SHOW PGPILOT_NODES").await;
    let held = cols.iter().position(|c| c == "held_out").unwrap();
    assert!(rows[2][held].contains("detached by operator"), "{rows:?}");
    let ports = reads_on(p.addr).await;
    assert!(
        !ports.contains(&h.ports[2]),
        "a detached standby got reads: {ports:?}"
    );
    assert!(ports.contains(&h.ports[1]), "{ports:?}");
    // Still detached after its next health checks.
    common::health_rounds(&p.ctx, 3).await;
    assert!(!p.ctx.cluster.snapshot().nodes[2].status.is_usable());

    let e = c.simple_query("DETACH NODE 0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let e = c.simple_query("ATTACH NODE 7").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");

    let (ok, out) = cli(&["attach", "2", "--config", conf]).await;
    assert!(ok && out.contains("attached"), "{out}");
    assert!(p.ctx.cluster.snapshot().nodes[2].status.is_usable());
    let ports = reads_on(p.addr).await;
    assert!(
        ports.contains(&h.ports[2]),
        "reads reach node 2 again: {ports:?}"
    );

    // Only admin users.
    let mut cfg = h.config();
    cfg.admin_users.clear();
    let q = spawn_proxy_stoppable(cfg);
    let c = connect(q.addr, "").await;
    for sql in [
        "DETACH NODE 2",
        "ATTACH NODE 2",
        "PROMOTE NODE 1",
        "SHOW PGPILOT_FAILOVER",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e}");
    }
    assert_eq!(q.ctx.cluster.failover_report().counts.get(Event::Detach), 0);
}
