//! The failover benchmark behind `benches/failover.sh`: `ROUNDS` times, build
//! a real cluster (primary + 2 standbys, synchronous or asynchronous
//! replication), put pgpilot with default settings in front, run `WRITERS`
//! autocommit clients inserting through pgpilot, stop the primary with
//! `pg_ctl stop -m immediate`, and measure
//! * downtime: the kill → the first write acknowledged by the new primary;
//! * lost writes: acknowledged writes missing on the new primary;
//! * follow: the kill → every surviving standby streams from the new primary;
//! * rejoin: the kill → the old primary streams from the new primary again
//!   (`failover.rejoin = "pg_rewind"`, `auto_rejoin = true`; with synchronous
//!   replication the rejoin is refused: the old primary stopped uncleanly and
//!   could hold acknowledged writes).
//!
//! The cluster is built as in production: each standby streams through a
//! physical replication slot, `wal_log_hints = on`.
//!
//! Prints one line per round and the medians. Usage:
//! `cargo run --release --example failover_bench -- [sync|async] [rounds] [writers] [session|health] [1|2]`
//! (`health`: `failover.detect_on_session_error = false`, detection by the
//! health checks' retries alone; `2`: two pgpilots coordinating through
//! etcd, see `failover_bench/two.rs`).

#[path = "failover_bench/two.rs"]
mod two;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgpilot::config::NodeId;
use pgpilot::localcluster::{ClusterSpec, LocalCluster};
use pgpilot::server::Proxy;
use tokio_postgres::SimpleQueryMessage;

const USER: &str = "bench";
const PASSWORD: &str = "bench";

/// One acknowledged write: its key, the port of the node that acknowledged
/// it, and when.
type Ack = (String, u16, Instant);

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sync = args.first().is_none_or(|a| a != "async");
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let writers: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4);
    let fast = args.get(3).is_none_or(|a| a != "health");
    let instances: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1);
    let label = match (sync, fast) {
        (true, true) => "sync",
        (false, true) => "async",
        (true, false) => "sync, health-check detection",
        (false, false) => "async, health-check detection",
    };
    if instances == 2 {
        return two::run(sync, rounds, writers, fast, label).await;
    }
    let mut downtimes = Vec::new();
    let mut losses = Vec::new();
    let mut follows = Vec::new();
    let mut rejoins = Vec::new();
    let ms = |d: Option<Duration>| {
        d.map_or("not within 60 s".to_string(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1000.0)
        })
    };
    for round in 1..=rounds {
        match run_round(sync, writers, fast).await {
            Ok(r) => {
                println!(
                    "{label} round {round}: downtime {:.0} ms, {} of {} acknowledged writes lost; standbys stream from the new primary after {}; old primary streams again after {}",
                    r.downtime.as_secs_f64() * 1000.0,
                    r.lost,
                    r.acked,
                    ms(r.follow),
                    r.rejoin
                        .map_or_else(|| format!("never: {}", r.old_held), |d| ms(Some(d))),
                );
                downtimes.push(r.downtime);
                losses.push(r.lost);
                follows.extend(r.follow);
                rejoins.extend(r.rejoin);
            }
            Err(e) => println!("{label} round {round}: failed: {e}"),
        }
    }
    downtimes.sort();
    losses.sort();
    if let (Some(d), Some(l)) = (
        downtimes.get(downtimes.len() / 2),
        losses.get(losses.len() / 2),
    ) {
        println!(
            "{label}: median downtime {:.0} ms (min {:.0}, max {:.0}); lost acknowledged writes: median {l}, max {} ({} rounds)",
            d.as_secs_f64() * 1000.0,
            downtimes[0].as_secs_f64() * 1000.0,
            downtimes[downtimes.len() - 1].as_secs_f64() * 1000.0,
            losses[losses.len() - 1],
            downtimes.len()
        );
    }
    follows.sort();
    rejoins.sort();
    println!(
        "{label}: median time until every surviving standby streams from the new primary: {} ({} rounds); until the old primary streams again (auto_rejoin): {} ({} rounds)",
        ms(follows.get(follows.len() / 2).copied()),
        follows.len(),
        ms(rejoins.get(rejoins.len() / 2).copied()),
        rejoins.len()
    );
}

/// What one round measured.
struct Round {
    downtime: Duration,
    lost: usize,
    acked: usize,
    /// Kill → every surviving standby streams from the new primary.
    follow: Option<Duration>,
    /// Kill → the old primary streams from the new primary.
    rejoin: Option<Duration>,
    /// Why the old primary is held, when it did not rejoin.
    old_held: String,
}

/// How long after `since` every node of `nodes` streams from `port`
/// (`None`: not within `limit`).
async fn streaming_from(
    cluster: Arc<LocalCluster>,
    nodes: Vec<usize>,
    port: u16,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let sql = "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'";
    while since.elapsed() < limit {
        let c = cluster.clone();
        let nodes = nodes.clone();
        let all = tokio::task::spawn_blocking(move || {
            nodes
                .iter()
                .all(|&n| c.psql_db(n, "postgres", sql).ok() == Some(port.to_string()))
        })
        .await
        .unwrap_or(false);
        if all {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A fresh cluster (primary + 2 standbys streaming through slots,
/// `wal_log_hints = on`) with table `t` owned by the bench user.
async fn start_cluster(sync: bool) -> Result<Arc<LocalCluster>, String> {
    let spec = ClusterSpec {
        standbys: 2,
        users: vec![(USER.into(), PASSWORD.into())],
        databases: vec![(USER.into(), USER.into())],
        extra_conf: vec!["wal_log_hints = on".into()],
        synchronous: sync,
        slots: true,
    };
    let cluster = Arc::new(
        tokio::task::spawn_blocking(move || LocalCluster::start(spec))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?,
    );
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || {
        c.psql_db(
            0,
            USER,
            "CREATE TABLE t (k text PRIMARY KEY); ALTER TABLE t OWNER TO bench",
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(cluster)
}

async fn run_round(sync: bool, writers: usize, fast: bool) -> Result<Round, String> {
    let cluster = start_cluster(sync).await?;
    let mut cfg = pgpilot::demo::config_for(&cluster, "127.0.0.1:0", &[(USER, PASSWORD)]);
    cfg.metrics.listen = String::new();
    cfg.failover.detect_on_session_error = fast;
    cfg.failover.rejoin = pgpilot::config::RejoinMode::PgRewind;
    cfg.failover.auto_rejoin = true;
    let proxy = Proxy::bind(cfg).await.map_err(|e| e.to_string())?;
    let addr = proxy.local_addr();
    let ctx = proxy.context();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = stop_rx.await;
    }));
    // Every node in service and streaming.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = ctx.cluster.snapshot();
        let ready = s.primary == Some(NodeId::new(0))
            && s.nodes.iter().all(|n| n.status.is_usable())
            && s.nodes[1..].iter().all(|n| n.repl.state == "streaming");
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err("cluster not in service".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..writers)
        .map(|w| tokio::spawn(write_loop(addr.to_string(), w, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop_node(0, "immediate"))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        if let Some(p) = ctx
            .cluster
            .snapshot()
            .primary
            .filter(|&p| p != NodeId::new(0))
        {
            break p;
        }
        if Instant::now() > deadline {
            return Err("no new primary within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_port = cluster.nodes[new.index()].port;
    let others: Vec<usize> = (1..cluster.nodes.len())
        .filter(|&n| n != new.index())
        .collect();
    let limit = Duration::from_secs(60);
    let follow = tokio::spawn(streaming_from(
        cluster.clone(),
        others,
        new_port,
        killed,
        limit,
    ));
    let rejoin = tokio::spawn(streaming_from(
        cluster.clone(),
        vec![0],
        new_port,
        killed,
        if sync { Duration::from_secs(15) } else { limit },
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks: Vec<Ack> = Vec::new();
    for t in tasks {
        acks.extend(t.await.map_err(|e| e.to_string())?);
    }
    let first = acks
        .iter()
        .filter(|(_, port, at)| *port == new_port && *at > killed)
        .map(|(_, _, at)| *at)
        .min()
        .ok_or("writes did not resume")?;
    let c = cluster.clone();
    let present: HashSet<String> =
        tokio::task::spawn_blocking(move || c.psql_db(new.index(), USER, "SELECT k FROM t"))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .lines()
            .map(str::to_string)
            .collect();
    let lost = acks.iter().filter(|(k, _, _)| !present.contains(k)).count();
    let follow = follow.await.map_err(|e| e.to_string())?;
    let rejoin = rejoin.await.map_err(|e| e.to_string())?;
    let old_held = ctx.cluster.snapshot().nodes[0]
        .held_out
        .clone()
        .unwrap_or_default();
    let _ = stop_tx.send(());
    let _ = server.await;
    let mut cluster = Arc::try_unwrap(cluster).map_err(|_| "cluster still shared")?;
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Round {
        downtime: first - killed,
        lost,
        acked: acks.len(),
        follow,
        rejoin,
        old_held,
    })
}

/// Insert rows until stopped, reconnecting after errors as applications do.
async fn write_loop(addr: String, w: usize, stop: Arc<AtomicBool>) -> Vec<Ack> {
    let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "9999"));
    let conninfo = format!(
        "host={host} port={port} user={USER} password={PASSWORD} dbname={USER} connect_timeout=10"
    );
    let mut acks = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let key = format!("{w}:{seq}");
        seq += 1;
        let sql = format!("INSERT INTO t VALUES ('{key}') RETURNING inet_server_port()");
        let Some(c) = client.as_ref() else { continue };
        match c.simple_query(&sql).await {
            Ok(msgs) => {
                let port = msgs.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(|p| p.parse().ok()),
                    _ => None,
                });
                acks.push((key, port.unwrap_or(0), Instant::now()));
            }
            Err(_) => client = None,
        }
    }
    acks
}
