//! pgpilot in Patroni mode (`failover.mode = "patroni"`) in front of a real
//! 3-member cluster managed by Debian's `patroni` on loopback, with a real
//! etcd (`localcluster::patroni`): writes follow Patroni's leader key, reads
//! go to its replicas, `PROMOTE NODE` is a Patroni switchover, and when
//! Patroni fails over pgpilot follows with no promotion of its own.
//!
//! One test, its phases in order (a cluster costs ~20 s to build).

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    DB, PASSWORD, StoppableProxy, USER, connect, error_text, show, spawn_proxy_stoppable, wait_for,
    write_through,
};
use etcd_client::{Client, EventType, WatchOptions};
use pgpilot::cluster::events::Event;
use pgpilot::config::{Config, NodeId};
use pgpilot::localcluster::patroni::{NAMESPACE, PatroniCluster, SCOPE};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

type Shared = Arc<Mutex<PatroniCluster>>;

/// psql as the superuser on member `i`, database `db`.
async fn psql(pc: &Shared, i: usize, db: &str, sql: &str) -> String {
    let (pc, db, sql) = (pc.clone(), db.to_string(), sql.to_string());
    blocking(move || pc.lock().unwrap().psql_db(i, &db, &sql))
        .await
        .unwrap_or_else(|e| panic!("psql on member {i}: {e}"))
}

/// The member holding Patroni's leader lock (REST API), waited for.
async fn leader(pc: &Shared) -> usize {
    let pc2 = pc.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pc3 = pc2.clone();
        if let Some(l) = blocking(move || pc3.lock().unwrap().leader_index()).await {
            return l;
        }
        assert!(Instant::now() < deadline, "no Patroni leader within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// pgpilot in Patroni mode, one backend per member (same order).
fn config_for(pc: &PatroniCluster) -> Config {
    let mut toml = format!("listen = \"127.0.0.1:0\"\nadmin_users = [\"{USER}\"]\n");
    for m in &pc.members {
        toml.push_str(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\nport = {}\napplication_name = \"{}\"\n",
            m.pg_port, m.name
        ));
    }
    let endpoints: Vec<String> = pc
        .etcd_endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let rest: Vec<String> = pc
        .members
        .iter()
        .map(|m| format!("\"{}\"", m.rest_url()))
        .collect();
    toml.push_str(&format!(
        "[[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n\
         [monitor]\nuser = \"postgres\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [failover]\nmode = \"patroni\"\nclient_wait_timeout = \"10s\"\n\
         [patroni]\nscope = \"{SCOPE}\"\nnamespace = \"{NAMESPACE}\"\n\
         etcd_endpoints = [{}]\nrest_urls = [{}]\ntimeout = \"5s\"\n",
        endpoints.join(", "),
        rest.join(", ")
    ));
    Config::from_toml(&toml).expect("a valid Patroni-mode configuration")
}

/// Wait until `p` publishes node `n` as the primary.
async fn routes_to(p: &StoppableProxy, n: usize) {
    let ctx = p.ctx.clone();
    wait_for(
        &format!("pgpilot routing writes to node {n}"),
        Duration::from_secs(60),
        || (ctx.cluster.snapshot().primary == Some(NodeId::new(n))).then_some(()),
    )
    .await;
}

/// The port a read through a new session of `addr` runs on.
async fn read_port(addr: SocketAddr) -> u16 {
    let c = connect(addr, "").await;
    let msgs = c
        .simple_query("SELECT inet_server_port()::text")
        .await
        .unwrap_or_else(|e| panic!("a read: {}", error_text(&e)));
    let (_, rows) = common::result_set(&msgs);
    rows[0][0].parse().expect("a port")
}

/// Promotions pgpilot itself ran, failovers and switchovers it finished,
/// standbys it re-pointed.
fn own_promotions(p: &StoppableProxy) -> (u64, u64, u64) {
    let r = p.ctx.cluster.failover_report();
    (
        r.counts.get(Event::Promotion),
        r.counts.get(Event::FailoverFinished) + r.counts.get(Event::SwitchoverFinished),
        r.counts.get(Event::Follow),
    )
}

/// Watch Patroni's leader key: each new value with when it arrived.
async fn watch_leader(
    endpoints: Vec<String>,
) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, Option<String>)> {
    let mut client = Client::connect(endpoints, None).await.expect("etcd");
    let key = format!("{NAMESPACE}/{SCOPE}/leader");
    let (watcher, mut stream) = client
        .watch(key, Some(WatchOptions::new()))
        .await
        .expect("watch")
        .split();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = watcher;
        while let Ok(Some(resp)) = stream.message().await {
            let at = Instant::now();
            for ev in resp.events() {
                let v = (ev.event_type() == EventType::Put)
                    .then(|| {
                        ev.kv()
                            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    })
                    .flatten();
                if tx.send((at, v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The leader key's value now.
async fn leader_key(endpoints: &[String]) -> Option<String> {
    let mut client = Client::connect(endpoints, None).await.expect("etcd");
    let r = client
        .get(format!("{NAMESPACE}/{SCOPE}/leader"), None)
        .await
        .expect("get");
    r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// When `p` first published node `n` as the primary, polled every 1 ms
/// from now (up to 90 s).
fn published_at(p: &StoppableProxy, n: usize) -> tokio::task::JoinHandle<Option<Instant>> {
    let ctx = p.ctx.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if ctx.cluster.snapshot().primary == Some(NodeId::new(n)) {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    })
}

/// When the server on `port` first answers `pg_is_in_recovery() = false`,
/// asked directly (no pgpilot) every 5 ms for up to 90 s.
fn out_of_recovery_at(port: u16) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut client = None;
        while Instant::now() < deadline {
            if client.is_none()
                && let Ok((c, conn)) =
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                client = Some(c);
            }
            if let Some(c) = &client {
                match c.simple_query("SELECT pg_is_in_recovery()::text").await {
                    Ok(msgs) if common::result_set(&msgs).1[0][0] == "false" => {
                        return Some(Instant::now());
                    }
                    Ok(_) => {}
                    // Restarted (Patroni re-points replicas): connect again.
                    Err(_) => client = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgpilot_follows_patroni() {
    common::init_logs();
    let pc = blocking(|| PatroniCluster::start(3))
        .await
        .expect("start a 3-member Patroni cluster");
    let ports: Vec<u16> = pc.members.iter().map(|m| m.pg_port).collect();
    let endpoints = pc.etcd_endpoints();
    let cfg = config_for(&pc);
    let pc: Shared = Arc::new(Mutex::new(pc));
    let first = leader(&pc).await;
    psql(
        &pc,
        first,
        "postgres",
        &format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"),
    )
    .await;
    psql(
        &pc,
        first,
        "postgres",
        &format!("CREATE DATABASE {DB} OWNER {USER}"),
    )
    .await;
    psql(
        &pc,
        first,
        DB,
        &format!("CREATE TABLE t (k text PRIMARY KEY); ALTER TABLE t OWNER TO {USER}"),
    )
    .await;
    let p = spawn_proxy_stoppable(cfg);

    // (a) Writes go to Patroni's leader, reads to its replicas.
    routes_to(&p, first).await;
    assert_eq!(
        leader_key(&endpoints).await.as_deref(),
        Some(format!("m{first}").as_str())
    );
    {
        let ctx = p.ctx.clone();
        wait_for("every node in service", Duration::from_secs(30), || {
            let s = ctx.cluster.snapshot();
            s.nodes.iter().all(|n| n.status.is_usable()).then_some(())
        })
        .await;
    }
    assert_eq!(write_through(p.addr, "a1").await, Ok(ports[first]));
    for _ in 0..4 {
        let r = read_port(p.addr).await;
        assert!(r != ports[first] && ports.contains(&r), "read on port {r}");
    }

    // DETACH / ATTACH NODE only change pgpilot's routing.
    let (r1, r2) = ((first + 1) % 3, (first + 2) % 3);
    let c = connect(p.addr, "").await;
    show(&c, &format!("DETACH NODE {r1}")).await;
    for _ in 0..4 {
        assert_eq!(read_port(p.addr).await, ports[r2], "node {r1} is detached");
    }
    show(&c, &format!("ATTACH NODE {r1}")).await;
    {
        let ctx = p.ctx.clone();
        wait_for(
            "the attached node in service",
            Duration::from_secs(30),
            || {
                let s = ctx.cluster.snapshot();
                s.nodes[r1].status.is_usable().then_some(())
            },
        )
        .await;
    }

    // (c) PROMOTE NODE n is a Patroni switchover.
    let target = (first + 1) % 3;
    let c = connect(p.addr, "").await;
    let t0 = Instant::now();
    let (_, rows) = show(&c, &format!("PROMOTE NODE {target}")).await;
    tracing::warn!(took = ?t0.elapsed(), answer = %rows[0][1], "PROMOTE NODE through pgpilot");
    assert!(
        rows[0][1].contains("Patroni switchover") && rows[0][1].contains("Successfully"),
        "{rows:?}"
    );
    assert_eq!(
        leader_key(&endpoints).await.as_deref(),
        Some(format!("m{target}").as_str())
    );
    routes_to(&p, target).await;
    assert_eq!(write_through(p.addr, "c1").await, Ok(ports[target]));
    // A refusal is the command's error, through the extended protocol too
    // (a new session: the one above was on the old primary, which Patroni
    // restarted).
    let e = connect(p.addr, "")
        .await
        .query(&format!("PROMOTE NODE {target}"), &[])
        .await
        .expect_err("the leader cannot be promoted");
    assert_eq!(e.code().map(|c| c.code()), Some("55000"), "{e:?}");
    assert!(error_text(&e).contains("already the primary"), "{e:?}");
    assert_eq!(own_promotions(&p), (0, 0, 0), "pgpilot promoted by itself");

    // (b) The leader dies under writes: Patroni fails over, pgpilot follows.
    let old = target;
    let mut leader_events = watch_leader(endpoints.clone()).await;
    let promoted: Vec<_> = (0..3)
        .map(|i| (i != old).then(|| out_of_recovery_at(ports[i])))
        .collect();
    let writer = {
        let addr = p.addr;
        let ports = ports.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let stop = Instant::now() + Duration::from_secs(90);
            for i in 0.. {
                let r = write_through(addr, &format!("b{i}")).await;
                out.push((Instant::now(), r));
                if Instant::now() > stop {
                    break;
                }
                if let Some((_, Ok(port))) = out.last()
                    && *port != ports[old]
                {
                    // A few more on the new leader, then stop.
                    if out
                        .iter()
                        .filter(|(_, r)| matches!(r, Ok(p) if *p != ports[old]))
                        .count()
                        >= 5
                    {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let pc = pc.clone();
        blocking(move || pc.lock().unwrap().kill_member(old))
            .await
            .expect("kill the leader's Patroni and PostgreSQL");
    }
    let killed_at = Instant::now();
    let (changed_at, new_name) = loop {
        let (at, v) = tokio::time::timeout(Duration::from_secs(60), leader_events.recv())
            .await
            .expect("Patroni elects a new leader within 60 s")
            .expect("the watch runs");
        if let Some(v) = v
            && v != format!("m{old}")
        {
            break (at, v);
        }
    };
    let new: usize = new_name[1..].parse().expect("member name m<i>");
    let published = published_at(&p, new)
        .await
        .expect("join")
        .expect("pgpilot publishes the new leader");
    let writes = writer.await.expect("writer");
    let first_new = writes
        .iter()
        .find(|(_, r)| *r == Ok(ports[new]))
        .map(|(t, _)| *t)
        .expect("writes reach the new leader");
    let mut promoted_at = None;
    for (i, h) in promoted.into_iter().enumerate() {
        if let Some(h) = h {
            if i == new {
                promoted_at = h.await.expect("join");
            } else {
                h.abort();
            }
        }
    }
    let promoted_at = promoted_at.expect("the new leader leaves recovery");
    let switch_ms = published.saturating_duration_since(changed_at).as_millis();
    let write_ms = first_new.saturating_duration_since(changed_at).as_millis();
    let promote_ms = promoted_at
        .saturating_duration_since(changed_at)
        .as_millis();
    let own_ms = published.saturating_duration_since(promoted_at).as_millis();
    tracing::warn!(
        killed_to_key_change_ms = changed_at.duration_since(killed_at).as_millis() as u64,
        key_change_to_pgpilot_primary_ms = switch_ms as u64,
        key_change_to_out_of_recovery_ms = promote_ms as u64,
        out_of_recovery_to_pgpilot_primary_ms = own_ms as u64,
        key_change_to_first_write_acknowledged_ms = write_ms as u64,
        "Patroni failover followed"
    );
    eprintln!(
        "Patroni failover: leader key m{old} -> {new_name} {} ms after the kill; pgpilot routed writes to it {switch_ms} ms after the key changed ({promote_ms} ms until the new leader left recovery, then {own_ms} ms); first write acknowledged there after {write_ms} ms",
        changed_at.duration_since(killed_at).as_millis()
    );
    // No acknowledged write went anywhere but a Patroni leader, and every
    // write after the switch went to the new one.
    for (t, r) in &writes {
        if let Ok(port) = r {
            assert!(
                *port == ports[old] || *port == ports[new],
                "write on {port}"
            );
            if *t > first_new {
                assert_eq!(*port, ports[new]);
            }
        }
    }
    assert_eq!(own_promotions(&p), (0, 0, 0), "pgpilot promoted by itself");
    let (_, rows) = show(&connect(p.addr, "").await, "SHOW PGPILOT_FAILOVER").await;
    assert_eq!(
        rows[0][11], "0",
        "SHOW PGPILOT_FAILOVER promotions: {rows:?}"
    );

    // (d) No leader key at all (every Patroni gone, PostgreSQL left
    // running): writes are refused naming Patroni, reads keep going to the
    // standby; pgpilot does not pick a primary itself. First the remaining
    // replica streams from the new leader (Patroni re-points it).
    let deadline = Instant::now() + Duration::from_secs(60);
    while psql(
        &pc,
        new,
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
    )
    .await
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the replica does not follow {new_name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    {
        let pc = pc.clone();
        blocking(move || {
            let mut pc = pc.lock().unwrap();
            for i in 0..3 {
                pc.kill_patroni(i);
            }
        })
        .await;
    }
    let ctx = p.ctx.clone();
    wait_for("the leader key to expire", Duration::from_secs(30), || {
        (ctx.cluster.patroni().is_some_and(|h| h.leader().is_none())).then_some(())
    })
    .await;
    let e = write_through(p.addr, "d1")
        .await
        .expect_err("no leader: no write");
    assert!(
        e.starts_with("57P03") && e.contains("Patroni has no leader"),
        "{e}"
    );
    let r = read_port(p.addr).await;
    assert!(r != ports[new] && r != ports[old], "read on port {r}");
    assert_eq!(p.ctx.cluster.snapshot().primary, None);
    assert_eq!(own_promotions(&p), (0, 0, 0), "pgpilot promoted by itself");
    drop(p);
}
