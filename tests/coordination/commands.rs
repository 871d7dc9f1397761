//! Admin commands given to any instance take effect on all, and a
//! follower answers one only once the leader has run it (with the leader's
//! outcome); every instance lists its peers; a 3-member etcd keeps working
//! with one member gone, and an instance whose member dies keeps following.

use etcd_client::{Client, PutOptions};

use super::*;

/// Node `n`'s `status` in `SHOW POOL_NODES` on `c`.
async fn pool_status(c: &tokio_postgres::Client, n: usize) -> String {
    let (cols, rows) = show(c, "SHOW POOL_NODES").await;
    let status = cols.iter().position(|c| c == "status").expect("status");
    rows[n][status].clone()
}

/// Run `sql` through `c` and return its error: (SQLSTATE, message).
async fn refused(c: &tokio_postgres::Client, sql: &str) -> (String, String) {
    match c.simple_query(sql).await {
        Ok(m) => panic!("{sql} was accepted: {:?}", common::result_set(&m).1),
        Err(e) => {
            let db = e.as_db_error().expect("an error from pgpilot");
            (db.code().code().to_string(), db.message().to_string())
        }
    }
}

/// Whether node `n` is kept out of service on `s`.
fn detached(s: &pgpilot::cluster::ClusterSnapshot, n: usize) -> bool {
    !s.nodes[n].status.is_usable()
        && s.nodes[n]
            .held_out
            .as_deref()
            .is_some_and(|h| h.contains("detached"))
}

#[tokio::test]
async fn detach_on_one_instance_is_applied_on_the_other() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false).await;
    let etcd = new_etcd(&cluster, 1).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    let b = start_instance(&cluster, "b", &etcd.endpoints(), 0).await;
    let leader = one_leader(&[&a, &b]).await;
    let (lead, follow) = if leader == 0 { (&a, &b) } else { (&b, &a) };

    // Both list both, and agree on the leader.
    for p in [&a, &b] {
        let addr = p.addr;
        wait_until("both peers listed", Duration::from_secs(30), async || {
            let rows = peers(addr).await;
            rows.len() == 2 && rows.iter().filter(|(_, l)| l == "true").count() == 1
        })
        .await;
    }

    // Metrics say who leads.
    for (p, want) in [(lead, 1.0), (follow, 0.0)] {
        let (code, body) = common::http_get(p.metrics.expect("metrics on"), "/metrics").await;
        assert_eq!(code, 200);
        let m = common::parse_metrics(&body);
        assert_eq!(
            m.get("pgpilot_coordination_leader"),
            Some(&want),
            "{}",
            p.addr
        );
        assert!(m.contains_key("pgpilot_coordination_etcd_rtt_seconds"));
    }

    // DETACH on the follower: forwarded to the leader, applied on both;
    // answered once the follower itself shows it.
    let c = connect(follow.addr, "").await;
    assert_ne!(pool_status(&c, 2).await, "down");
    let (_, rows) = show(&c, "DETACH NODE 2").await;
    assert!(rows[0][1].contains("leading pgpilot"), "{rows:?}");
    assert_eq!(pool_status(&c, 2).await, "down", "answered before applied");
    assert!(detached(&follow.ctx.cluster.snapshot(), 2));
    assert!(detached(&lead.ctx.cluster.snapshot(), 2));

    // ATTACH on the leader: applied on both.
    admin(lead.addr, "ATTACH NODE 2").await;
    for p in [lead, follow] {
        until_on(p, "node 2 back in service", |s| {
            s.nodes[2].status.is_usable()
        })
        .await;
    }

    // DETACH on the leader: applied on the follower.
    admin(lead.addr, "DETACH NODE 1").await;
    until_on(follow, "node 1 detached on the follower", |s| {
        detached(s, 1)
    })
    .await;
    drop((a, b, etcd));
}

#[tokio::test]
async fn a_command_through_the_follower_answers_the_leaders_outcome() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, false).await;
    let etcd = new_etcd(&cluster, 1).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    let b = start_instance(&cluster, "b", &etcd.endpoints(), 0).await;
    let leader = one_leader(&[&a, &b]).await;
    let (lead_name, follow) = if leader == 0 { ("a", &b) } else { ("b", &a) };
    let c = connect(follow.addr, "").await;

    // The leader's refusals, as the leader words them.
    for (sql, why) in [
        ("PROMOTE NODE 0", "node 0 is already the primary"),
        ("PROMOTE NODE 7", "there is no node 7"),
        ("DETACH NODE 0", "node 0 is the primary"),
    ] {
        let (code, message) = refused(&c, sql).await;
        assert_eq!(code, "55000", "{sql}: {message}");
        let want = format!("the leading pgpilot {lead_name} refused it: {why}");
        assert!(message.contains(&want), "{sql}: {message}");
    }
    assert_eq!(promotions(&a) + promotions(&b), 0);

    // Through the extended protocol too, answered once applied here.
    let rows = c.query("DETACH NODE 1", &[]).await.expect("DETACH NODE 1");
    let result: String = rows[0].get(1);
    assert!(result.contains(lead_name), "{result}");
    assert_eq!(pool_status(&c, 1).await, "down", "answered before applied");
    drop((a, b, etcd));
}

#[tokio::test]
async fn a_leader_that_does_not_answer_is_reported_after_twice_the_lease_ttl() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false).await;
    let etcd = new_etcd(&cluster, 1).await;
    // A leader that never runs anything: its key and a state naming node 0.
    let prefix = format!("/pgpilot/test{}", std::process::id());
    let mut client = Client::connect(etcd.endpoints(), None).await.expect("etcd");
    let lease = client.lease_grant(300, None).await.expect("lease").id();
    let opts = PutOptions::new().with_lease(lease);
    client
        .put(format!("{prefix}/leader"), "ghost", Some(opts))
        .await
        .expect("leader key");
    let state =
        r#"{"epoch":1,"primary":0,"timeline":null,"holds":[],"failover":null,"leader":"ghost"}"#;
    client
        .put(format!("{prefix}/state"), state, None)
        .await
        .expect("state key");
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    assert!(!leads(&a));

    let c = connect(a.addr, "").await;
    let t0 = std::time::Instant::now();
    let (code, message) = refused(&c, "DETACH NODE 1").await;
    let waited = t0.elapsed();
    assert_eq!(code, "55000", "{message}");
    // lease_ttl is 2 s in these tests: the wait is 4 s.
    assert!(
        message.contains("the leading pgpilot ghost did not confirm within 4 s"),
        "{message}"
    );
    assert!(message.contains("may still be applied"), "{message}");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert!(a.ctx.cluster.snapshot().nodes[1].status.is_usable());
    drop((a, etcd));
}

#[tokio::test]
async fn three_member_etcd_survives_one_member_lost() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false).await;
    let mut etcd = new_etcd(&cluster, 3).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    let b = start_instance(&cluster, "b", &etcd.endpoints(), 0).await;
    one_leader(&[&a, &b]).await;
    // One member of three gone: the other two keep a quorum.
    etcd.kill(0);
    one_leader(&[&a, &b]).await;
    admin_ok(a.addr, "DETACH NODE 1").await;
    for p in [&a, &b] {
        until_on(p, "node 1 detached with one etcd member down", |s| {
            !s.nodes[1].status.is_usable()
        })
        .await;
    }
    one_leader(&[&a, &b]).await;
    admin_ok(b.addr, "ATTACH NODE 1").await;
    for p in [&a, &b] {
        until_on(p, "node 1 attached again", |s| {
            s.nodes[1].status.is_usable()
        })
        .await;
    }
    drop((a, b, etcd));
}

/// The etcd member a follower's lease and watch are on is killed: every
/// instance on it moves to another member, and the follower then follows
/// the leader's next decision within a few seconds (lease TTL 2 s here).
#[tokio::test]
async fn a_follower_whose_etcd_member_dies_follows_within_seconds() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false).await;
    let mut etcd = new_etcd(&cluster, 3).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    let b = start_instance(&cluster, "b", &etcd.endpoints(), 0).await;
    let leader = one_leader(&[&a, &b]).await;
    let handles = [&a, &b].map(|p| p.ctx.cluster.coordination().expect("coordination").clone());
    let on = handles[1 - leader].endpoint();
    let member = etcd
        .endpoints()
        .iter()
        .position(|e| *e == on)
        .unwrap_or_else(|| panic!("the follower's endpoint {on:?} is a member"));
    etcd.kill(member);
    wait_until(
        "both instances on a live etcd member",
        Duration::from_secs(10),
        async || {
            handles
                .iter()
                .all(|h| !h.endpoint().is_empty() && h.endpoint() != on)
        },
    )
    .await;
    let leader = one_leader(&[&a, &b]).await;
    let (lead, follow) = if leader == 0 { (&a, &b) } else { (&b, &a) };
    admin_ok(lead.addr, "DETACH NODE 1").await;
    let ctx = follow.ctx.clone();
    wait_until(
        "node 1 detached on the follower",
        Duration::from_secs(6),
        async || !ctx.cluster.snapshot().nodes[1].status.is_usable(),
    )
    .await;
    drop((a, b, etcd));
}

#[tokio::test]
async fn a_cancel_sent_to_another_instance_reaches_the_session() {
    use common::raw::{login_raw_with, read_msg, send_query, sqlstate_of};
    use tokio::io::AsyncWriteExt;
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(1, false).await;
    let etcd = new_etcd(&cluster, 1).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    let b = start_instance(&cluster, "b", &etcd.endpoints(), 0).await;
    one_leader(&[&a, &b]).await;
    // Both registered with their cancel tags.
    wait_until(
        "both peers listed on b",
        Duration::from_secs(30),
        async || peers(b.addr).await.len() == 2,
    )
    .await;

    // A session on a, cancelled through b.
    let (mut s, after_auth) = login_raw_with(a.addr, &[]).await;
    let key = after_auth
        .iter()
        .find(|(t, _)| *t == b'K')
        .map(|(_, body)| body.clone())
        .expect("BackendKeyData");
    send_query(&mut s, "SELECT pg_sleep(60)").await;
    // The query runs on a server connection before the cancel is sent.
    wait_until(
        "the sleep is running",
        Duration::from_secs(30),
        async || {
            let q = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'";
            psql(&cluster, 0, q).await == "1" || psql(&cluster, 1, q).await == "1"
        },
    )
    .await;
    let mut cancel = Vec::with_capacity(16);
    cancel.extend_from_slice(&16i32.to_be_bytes());
    cancel.extend_from_slice(&80877102i32.to_be_bytes());
    cancel.extend_from_slice(&key[..8]);
    let mut c = tokio::net::TcpStream::connect(b.addr)
        .await
        .expect("connect to b");
    c.write_all(&cancel).await.expect("send the cancel");
    let code = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (t, body) = read_msg(&mut s).await.expect("read");
            if t == b'E' {
                return sqlstate_of(&body);
            }
        }
    })
    .await
    .expect("the query was cancelled through the other instance");
    assert_eq!(code, "57014");
    drop((a, b, etcd));
}
