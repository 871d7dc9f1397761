//! An instance cut off from etcd (a forwarder between it and etcd, then
//! closed): when the primary dies, the leader fails over; the cut-off
//! instance promotes nothing and writes to no other node.

use super::*;

#[tokio::test]
async fn an_instance_cut_off_from_etcd_neither_promotes_nor_writes_elsewhere() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, true).await;
    let etcd = new_etcd(&cluster, 1).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    wait_until("a leads", Duration::from_secs(30), async || leads(&a)).await;
    let to: SocketAddr = format!("127.0.0.1:{}", etcd.members[0].client_port)
        .parse()
        .unwrap();
    let fwd = Forwarder::start(to).await;
    let b = start_instance(&cluster, "b", &[fwd.endpoint()], 0).await;
    assert!(!leads(&b));
    assert_eq!(
        write_through(b.addr, "before-cut").await,
        Ok(cluster.nodes[0].port)
    );

    fwd.close();
    kill_primary(&cluster).await;
    let ctx_a = a.ctx.clone();
    let new = wait_for("a new primary on a", Duration::from_secs(30), || {
        ctx_a
            .cluster
            .snapshot()
            .primary
            .map(NodeId::index)
            .filter(|&n| n != 0)
    })
    .await;
    // b had its chance: several health rounds after a's failover.
    common::health_rounds(&b.ctx, 3).await;
    let s = b.ctx.cluster.snapshot();
    assert!(
        s.primary.is_none_or(|p| p.index() == 0),
        "b routes to {:?}",
        s.primary
    );
    assert_eq!(promotions(&b), 0, "the cut-off instance promoted");
    match write_through(b.addr, "after-cut").await {
        Ok(port) => panic!("a write through the cut-off instance landed on port {port}"),
        Err(e) => assert!(
            e.starts_with("57P03: "),
            "refused as 'cannot connect now': {e}"
        ),
    }
    // The refusal names the cause.
    let message = match tokio_postgres::connect(
        &common::Harness::conninfo(b.addr, ""),
        tokio_postgres::NoTls,
    )
    .await
    {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            let e = client
                .simple_query("INSERT INTO t VALUES ('after-cut-2')")
                .await
                .expect_err("a write through the cut-off instance");
            e.as_db_error().expect("from pgpilot").message().to_string()
        }
        Err(e) => e.as_db_error().expect("from pgpilot").message().to_string(),
    };
    assert!(
        message.contains("pgpilot lost its etcd lease and cannot confirm the primary"),
        "{message}"
    );
    assert_eq!(primaries(&cluster).await, vec![new]);
    assert_eq!(promotions(&a), 1);
    drop((a, b, fwd, etcd));
}
