//! The failover modes other than `pg_promote`: a trigger file, a
//! pgpool-style `failover_command`, and `none` (an outside promotion).

use super::*;

#[tokio::test]
async fn trigger_file_mode_promotes_through_promote_trigger_file() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false, &["promote_trigger_file = 'promote.trigger'"]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.mode = FailoverMode::TriggerFile;
    for b in &mut cfg.backends {
        b.trigger_file = "promote.trigger".into();
    }
    cfg.validate().expect("valid config");
    let trigger = cfg.backends[1].trigger_path().unwrap();
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let killed = kill_primary(&cluster, &p).await;
    let took = new_primary(&p, 1, killed, Duration::from_secs(40)).await;
    eprintln!("trigger_file mode: node 1 primary {took:?} after the kill");
    assert!(!trigger.exists(), "PostgreSQL consumes the trigger file");
    write_lands_on(&p, cluster.nodes[1].port, "via-trigger-file").await;
    assert_eq!(psql(&cluster, 1, "SELECT pg_is_in_recovery()").await, "f");
}

#[tokio::test]
async fn command_mode_runs_pgpool_scripts_with_placeholders_expanded() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false, &[]).await;
    create_table(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let psql_bin = cluster.bindir.join("psql").display().to_string();
    // pgpool's failover.sh / follow_primary.sh argument order.
    let failover_sh = format!(
        "#!/bin/sh\necho \"$@\" > {d}/failover.args\n\
         exec {psql_bin} -X -q -d \"host=$6 port=$9 user=postgres dbname=postgres\" -c 'SELECT pg_promote()'\n"
    );
    let follow_sh = format!(
        "#!/bin/sh\necho \"$@\" >> {d}/follow.args\n\
         {psql_bin} -X -q -d \"host=$2 port=$3 user=postgres dbname=postgres\" \
           -c \"ALTER SYSTEM SET primary_conninfo = 'host=$6 port=$9 user=postgres application_name=node$1'\" && \
         {psql_bin} -X -q -d \"host=$2 port=$3 user=postgres dbname=postgres\" -c 'SELECT pg_reload_conf()'\n"
    );
    for (name, text) in [("failover.sh", &failover_sh), ("follow.sh", &follow_sh)] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cfg = config_for(&cluster);
    cfg.failover.mode = FailoverMode::Command;
    cfg.failover.command = format!("{d}/failover.sh %d %h %p %D %m %H %M %P %r %R %N %S %%");
    cfg.failover.follow_primary_command = format!("{d}/follow.sh %d %h %p %D %m %H %M %P %r %R");
    // Node 1 may never be promoted: node 2 is the candidate.
    cfg.backends[1].no_failover = true;
    cfg.validate().expect("valid config");
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    let killed = kill_primary(&cluster, &p).await;
    let ctx = p.ctx.clone();
    let new = wait_for("a new primary", Duration::from_secs(30), || {
        ctx.cluster
            .snapshot()
            .primary
            .filter(|&n| n != NodeId::new(0))
    })
    .await;
    eprintln!(
        "command mode: node {new} primary {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(new, NodeId::new(2), "node 1 has no_failover = true");
    let n = |i: usize| &cluster.nodes[i];
    let args = std::fs::read_to_string(dir.path().join("failover.args")).unwrap();
    let want = format!(
        "0 127.0.0.1 {} {} {new} 127.0.0.1 0 0 {} {} 127.0.0.1 {} %",
        n(0).port,
        n(0).data_dir.display(),
        n(new.index()).port,
        n(new.index()).data_dir.display(),
        n(0).port
    );
    assert_eq!(args.trim(), want);
    // The remaining standby was re-pointed by follow_primary_command.
    let other = 3 - new.index();
    wait_for(
        "follow_primary_command to finish",
        Duration::from_secs(30),
        || {
            let c = ctx.cluster.failover_report().counts;
            (c.get(Event::Follow) >= 1).then_some(())
        },
    )
    .await;
    let follow = std::fs::read_to_string(dir.path().join("follow.args")).unwrap();
    let want = format!(
        "{other} 127.0.0.1 {} {} {new} 127.0.0.1 0 0 {} {}",
        n(other).port,
        n(other).data_dir.display(),
        n(new.index()).port,
        n(new.index()).data_dir.display()
    );
    assert_eq!(follow.trim(), want);
    write_lands_on(&p, n(new.index()).port, "via-command").await;
    replicated_to(&cluster, other, "via-command").await;
}

#[tokio::test]
async fn none_mode_waits_for_an_outside_promotion_and_clients_wait_too() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false, &[]).await;
    create_table(&cluster).await;
    let mut cfg = config_for(&cluster);
    cfg.failover.mode = FailoverMode::None;
    // Eventual reads: a session can write and then read on the standby without
    // learning its commit position first (the admin session below).
    cfg.routing.consistency = ConsistencyMode::Eventual;
    let p = spawn_proxy_stoppable(cfg);
    all_in_service(&p, 0).await;
    // A session whose last request ran on the standby.
    let reading = connect(p.addr, "").await;
    let (_, rows) = show(&reading, "SELECT inet_server_port()").await;
    assert_eq!(rows[0][0], cluster.nodes[1].port.to_string());
    // An admin session that wrote (its commit position is then unknown) and
    // then read on the standby (so the primary's death does not end it).
    let admin = connect(p.addr, "").await;
    admin
        .batch_execute("INSERT INTO t VALUES ('admin-wrote')")
        .await
        .unwrap();
    let (_, rows) = show(&admin, "SELECT inet_server_port()").await;
    assert_eq!(rows[0][0], cluster.nodes[1].port.to_string());
    let killed = kill_primary(&cluster, &p).await;
    let ctx = p.ctx.clone();
    wait_for("a failover in progress", Duration::from_secs(10), || {
        ctx.cluster.failover_in_progress().then_some(())
    })
    .await;
    // With no primary to ask its position, admin commands are still answered.
    let t0 = Instant::now();
    let (_, nodes) = tokio::time::timeout(Duration::from_secs(10), show(&admin, "SHOW POOL_NODES"))
        .await
        .expect("SHOW POOL_NODES answered without a primary");
    assert_eq!(nodes.len(), 2);
    eprintln!(
        "none mode: SHOW POOL_NODES without a primary took {:?}",
        t0.elapsed()
    );
    // An admin who logs in now is let in at once, with no server connection,
    // and sees the dead primary (a login waits up to client_wait_timeout for a
    // primary otherwise: 30 s by default).
    let t0 = Instant::now();
    let late_admin = tokio::time::timeout(Duration::from_secs(10), connect(p.addr, ""))
        .await
        .expect("an admin logs in while there is no primary");
    let (cols, nodes) = show(&late_admin, "SHOW POOL_NODES").await;
    let status = cols.iter().position(|c| c == "status").unwrap();
    assert_eq!(nodes[0][status], "down", "{nodes:?}");
    eprintln!(
        "none mode: an admin login and SHOW POOL_NODES without a primary took {:?}",
        t0.elapsed()
    );
    // Its next write, and a new connection, wait for a primary instead of failing.
    let insert = |c: tokio_postgres::Client, key: &'static str| async move {
        let t0 = Instant::now();
        let sql = format!("INSERT INTO t VALUES ('{key}') RETURNING inet_server_port()");
        let r = c.simple_query(&sql).await;
        (r.map(|m| result_set(&m).1[0][0].clone()), t0.elapsed())
    };
    let old_session = tokio::spawn(insert(reading, "old-session"));
    let addr = p.addr;
    let new_session = tokio::spawn(async move {
        let t0 = Instant::now();
        let c = connect(addr, "").await;
        let (r, _) = insert(c, "new-session").await;
        (r, t0.elapsed())
    });
    // Time itself: without a primary, writes wait (for 2 s here, asserted
    // below) instead of failing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!old_session.is_finished() && !new_session.is_finished());
    assert_eq!(
        psql(&cluster, 1, "SELECT pg_is_in_recovery()").await,
        "t",
        "pgpilot promoted nothing"
    );
    assert_eq!(ctx.cluster.snapshot().primary, None);
    let c = cluster.clone();
    blocking(move || c.promote(1))
        .await
        .expect("promote by hand");
    let took = new_primary(&p, 1, killed, Duration::from_secs(30)).await;
    let port = cluster.nodes[1].port.to_string();
    for (what, task) in [
        ("existing session", old_session),
        ("new session", new_session),
    ] {
        let (r, waited) = task.await.unwrap();
        eprintln!(
            "none mode: node 1 noticed {took:?} after the kill; the {what}'s write waited {waited:?}"
        );
        assert_eq!(r.unwrap_or_else(|e| panic!("{what}: {e}")), port);
        assert!(waited > Duration::from_secs(2), "{what} waited {waited:?}");
    }
    let last = ctx.cluster.failover_report().last.unwrap();
    assert_eq!(
        (last.old_primary, last.target),
        (Some(NodeId::new(0)), Some(NodeId::new(1)))
    );
    // The admin who logged in without a server writes on the new primary.
    let (_, rows) = show(
        &late_admin,
        "INSERT INTO t VALUES ('late-admin') RETURNING inet_server_port()",
    )
    .await;
    assert_eq!(rows[0][0], port);
}
