//! Admin commands given to any instance take effect on all; every instance
//! lists its peers; a 3-member etcd keeps working with one member gone.

use super::*;

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

    // DETACH on the follower: forwarded to the leader, applied on both.
    let rows = admin(follow.addr, "DETACH NODE 2").await;
    assert!(rows[0][1].contains("leading pgpilot"), "{rows:?}");
    until_on(lead, "node 2 detached on the leader", |s| detached(s, 2)).await;
    until_on(follow, "node 2 detached on the follower", |s| {
        detached(s, 2)
    })
    .await;

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
