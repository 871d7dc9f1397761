//! The primary killed in front of two pgpilots: one promotion, both route
//! to it, no acknowledged write lost; the leader killed mid-failover: the
//! next leader finishes that failover, promoting nothing else.

use std::collections::HashSet;

use etcd_client::{Client, EventType, WatchOptions};

use super::*;
use common::load::{Ack, Load};

#[tokio::test]
async fn killing_the_primary_under_writes_through_two_instances_promotes_once() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, true).await;
    let etcd = new_etcd(&cluster, 1).await;
    let a = start_instance(&cluster, "a", &etcd.endpoints(), 0).await;
    let b = start_instance(&cluster, "b", &etcd.endpoints(), 0).await;
    one_leader(&[&a, &b]).await;

    let load_a = Load::writers_from(a.addr, 0, 2, Duration::from_millis(5));
    let load_b = Load::writers_from(b.addr, 10, 2, Duration::from_millis(5));
    wait_until("writes through both", Duration::from_secs(30), async || {
        load_a.count(|_| true).iter().all(|&n| n >= 20)
            && load_b.count(|_| true).iter().all(|&n| n >= 20)
    })
    .await;
    kill_primary(&cluster).await;

    // When each instance switched: the leader when it decided, the
    // follower when etcd's watch told it (polled every millisecond).
    let leader_is_a = leads(&a);
    let (mut at_a, mut at_b) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while at_a.is_none() || at_b.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no new primary on both in 30s"
        );
        let now = std::time::Instant::now();
        if at_a.is_none()
            && a.ctx
                .cluster
                .snapshot()
                .primary
                .is_some_and(|n| n.index() != 0)
        {
            at_a = Some(now);
        }
        if at_b.is_none()
            && b.ctx
                .cluster
                .snapshot()
                .primary
                .is_some_and(|n| n.index() != 0)
        {
            at_b = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (decided, followed) = if leader_is_a {
        (at_a, at_b)
    } else {
        (at_b, at_a)
    };
    let lag = followed
        .unwrap()
        .saturating_duration_since(decided.unwrap());
    eprintln!("leader decision -> follower switch: {lag:?}");
    // The same two instants, as the instances expose them: the leader's
    // write naming the new primary, the follower's first write routed there.
    let (lead, follow) = if leader_is_a { (&a, &b) } else { (&b, &a) };
    let (recorded, routed) = wait_for_metrics(lead, follow).await;
    eprintln!(
        "from /metrics: leader decision -> follower switch {:.1} ms",
        (routed - recorded) * 1000.0
    );
    assert!(
        routed >= recorded && routed - recorded < 5.0,
        "recorded {recorded}, routed {routed}"
    );
    let new = a
        .ctx
        .cluster
        .snapshot()
        .primary
        .expect("a new primary")
        .index();
    routes_to(&b, new).await;
    let port = cluster.nodes[new].port;
    wait_until(
        "writes on the new primary through both",
        Duration::from_secs(30),
        async || {
            load_a.count(|a| a.port == port).iter().all(|&n| n > 0)
                && load_b.count(|a| a.port == port).iter().all(|&n| n > 0)
        },
    )
    .await;
    let seen: Vec<_> = load_a
        .finish()
        .await
        .into_iter()
        .chain(load_b.finish().await)
        .collect();

    assert_eq!(promotions(&a) + promotions(&b), 1, "exactly one promotion");
    assert_eq!(primaries(&cluster).await, vec![new], "one primary");
    let acked: Vec<&Ack> = seen.iter().flat_map(|s| &s.acks).collect();
    let on_new: HashSet<String> = psql(&cluster, new, "SELECT k FROM t")
        .await
        .lines()
        .map(str::to_string)
        .collect();
    let lost: Vec<&str> = acked
        .iter()
        .filter(|a| !on_new.contains(&a.key))
        .map(|a| a.key.as_str())
        .collect();
    eprintln!(
        "two instances: node {new} promoted once; {} writes acknowledged, {} lost",
        acked.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // Every acknowledged write after the switch went to the new primary.
    for s in &seen {
        let ports: Vec<u16> = s.acks.iter().map(|a| a.port).collect();
        if let Some(i) = ports.iter().position(|&p| p == port) {
            assert!(
                ports[i..].iter().all(|&p| p == port),
                "writes went back: {ports:?}"
            );
        }
    }
    drop((a, b, etcd));
}

/// Once `lead` and `follow` report the same epoch, with both instants of
/// it set: the leader's recorded and the follower's routed timestamps.
async fn wait_for_metrics(lead: &StoppableProxy, follow: &StoppableProxy) -> (f64, f64) {
    let scrape = async |p: &StoppableProxy| {
        let (code, body) = common::http_get(p.metrics.expect("metrics on"), "/metrics").await;
        assert_eq!(code, 200);
        common::parse_metrics(&body)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (l, f) = (scrape(lead).await, scrape(follow).await);
        let epoch = "pgpilot_coordination_epoch";
        let recorded = l["pgpilot_coordination_epoch_recorded_timestamp_seconds"];
        let routed = f["pgpilot_coordination_epoch_routed_timestamp_seconds"];
        if l[epoch] == f[epoch] && l[epoch] > 0.0 && recorded > 0.0 && routed > 0.0 {
            return (recorded, routed);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "epochs {} / {}, recorded {recorded}, routed {routed}",
            l[epoch],
            f[epoch]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn the_next_leader_finishes_a_failover_its_predecessor_recorded() {
    let _serial = SERIAL.lock().await;
    let cluster = new_cluster(2, true).await;
    let etcd = new_etcd(&cluster, 1).await;
    let first = start_instance(&cluster, "first", &etcd.endpoints(), 0).await;
    wait_until("first leads", Duration::from_secs(30), async || {
        leads(&first)
    })
    .await;
    let second = start_instance(&cluster, "second", &etcd.endpoints(), 0).await;

    // Watch the state key: the moment the leader records its promotion,
    // the leader is stopped.
    let mut client = Client::connect(etcd.endpoints(), None).await.expect("etcd");
    let key = format!("/pgpilot/test{}/state", std::process::id());
    let (_w, mut events) = client
        .watch(key, Some(WatchOptions::new()))
        .await
        .expect("watch")
        .split();
    kill_primary(&cluster).await;
    let record = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let resp = events.message().await.expect("watch").expect("watching");
            for ev in resp.events() {
                if ev.event_type() != EventType::Put {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_slice(ev.kv().expect("kv").value()).expect("json");
                if let Some(c) = v["failover"]["candidate"].as_u64() {
                    return c as usize;
                }
            }
        }
    })
    .await
    .expect("the leader records its promotion");
    drop(first);

    // The second instance takes over and finishes with the same candidate.
    wait_until("second leads", Duration::from_secs(30), async || {
        leads(&second)
    })
    .await;
    routes_to(&second, record).await;
    assert_eq!(
        primaries(&cluster).await,
        vec![record],
        "one primary: the recorded candidate"
    );
    assert_eq!(
        write_through(second.addr, "after-takeover").await,
        Ok(cluster.nodes[record].port)
    );
    drop((second, etcd));
}
