//! The two-instance mode of the failover benchmark (`INSTANCES=2`): each
//! round a fresh cluster (as in single-instance mode), a real 1-member etcd
//! (`localcluster::etcd`) and two pgpilots coordinating through it, each on
//! its own runtime thread as separate processes would be, with default
//! settings (lease_ttl 5 s). The writers are split between the two
//! instances; the primary is stopped with `pg_ctl stop -m immediate`.
//! Measured per round:
//! * the write downtime seen through each instance (kill → the first write
//!   through it acknowledged by the new primary);
//! * leader decision → follower switch: the leader's
//!   `pgpilot_coordination_epoch_recorded_timestamp_seconds` (when it sent the
//!   etcd write naming the new primary) to the follower's
//!   `pgpilot_coordination_epoch_routed_timestamp_seconds` (when it first
//!   routed writes to it), both read from `/metrics` once the two report the
//!   same `pgpilot_coordination_epoch`;
//! * acknowledged writes missing on the new primary;
//! * promotions by either pgpilot, nodes answering as primary, and the new
//!   primary's timeline (one promotion from timeline 1 makes timeline 2).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use pgpilot::cluster::events::Event;
use pgpilot::config::{Config, NodeId};
use pgpilot::context::ProxyContext;
use pgpilot::localcluster::LocalCluster;
use pgpilot::localcluster::etcd::EtcdCluster;
use pgpilot::server::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Ack, PASSWORD, USER, start_cluster, write_loop};

/// One pgpilot on its own runtime thread, stopped on drop.
struct Instance {
    addr: SocketAddr,
    metrics: SocketAddr,
    ctx: Arc<ProxyContext>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    fn start(cfg: Config) -> Result<Instance, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let proxy = match Proxy::bind(cfg).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let started = (proxy.local_addr(), proxy.metrics_addr(), proxy.context());
                let _ = tx.send(Ok(started));
                proxy
                    .run(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let (addr, metrics, ctx) = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| format!("pgpilot did not start: {e}"))??;
        Ok(Instance {
            addr,
            metrics: metrics.ok_or("metrics endpoint off")?,
            ctx,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn leads(&self) -> bool {
        self.ctx
            .cluster
            .coordination()
            .is_some_and(|h| h.is_leader())
    }

    fn promotions(&self) -> u64 {
        self.ctx
            .cluster
            .failover_report()
            .counts
            .get(Event::Promotion)
    }

    fn primary(&self) -> Option<NodeId> {
        self.ctx.cluster.snapshot().primary
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops the writers on every path out of a round.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `GET /metrics` from `addr`: every sample without labels, by name.
async fn scrape(addr: SocketAddr) -> Result<HashMap<String, f64>, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: pgpilot\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect())
}

/// What one round measured.
struct Round {
    /// Downtime through the leader, through the follower.
    downtime: [Duration; 2],
    /// Leader decision → follower switch.
    lag: Duration,
    lost: usize,
    acked: usize,
    promotions: u64,
    primaries: usize,
    timeline: String,
}

/// Run `rounds` rounds and print each and the medians.
pub(super) async fn run(sync: bool, rounds: usize, writers: usize, fast: bool, label: &str) {
    let label = format!("{label}, 2 instances");
    let mut leader_dt = Vec::new();
    let mut follower_dt = Vec::new();
    let mut lags = Vec::new();
    let mut lost_max = 0;
    let mut promotions = Vec::new();
    for round in 1..=rounds {
        match run_round(sync, writers.max(2), fast).await {
            Ok(r) => {
                println!(
                    "{label} round {round}: downtime through the leader {:.0} ms, through the follower {:.0} ms; leader decision -> follower switch {:.1} ms; {} of {} acknowledged writes lost; {} promotion(s), {} node(s) answering as primary, new primary on timeline {}",
                    ms(r.downtime[0]),
                    ms(r.downtime[1]),
                    r.lag.as_secs_f64() * 1000.0,
                    r.lost,
                    r.acked,
                    r.promotions,
                    r.primaries,
                    r.timeline,
                );
                leader_dt.push(r.downtime[0]);
                follower_dt.push(r.downtime[1]);
                lags.push(r.lag);
                lost_max = lost_max.max(r.lost);
                promotions.push(r.promotions);
            }
            Err(e) => println!("{label} round {round}: failed: {e}"),
        }
    }
    if lags.is_empty() {
        return;
    }
    println!(
        "{label}: median downtime through the leader {:.0} ms, through the follower {:.0} ms; median leader decision -> follower switch {:.1} ms (max {:.1}); lost acknowledged writes: max {lost_max}; promotions per round: {:?} ({} rounds)",
        ms(median(&mut leader_dt)),
        ms(median(&mut follower_dt)),
        median(&mut lags).as_secs_f64() * 1000.0,
        lags.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        promotions,
        lags.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
}

/// Poll `f` every 20 ms until it returns `Some`, or fail after `limit`.
async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_round(sync: bool, writers: usize, fast: bool) -> Result<Round, String> {
    let cluster = start_cluster(sync).await?;
    let c = cluster.clone();
    let etcd = blocking(move || EtcdCluster::start_for(1, &c))
        .await?
        .map_err(|e| e.to_string())?;
    let r = with_instances(&cluster, &etcd, writers, fast).await;
    drop(etcd);
    let mut cluster = Arc::try_unwrap(cluster).map_err(|_| "cluster still shared")?;
    blocking(move || cluster.shutdown()).await?;
    r
}

async fn with_instances(
    cluster: &Arc<LocalCluster>,
    etcd: &EtcdCluster,
    writers: usize,
    fast: bool,
) -> Result<Round, String> {
    let config = |name: &str| {
        let mut cfg = pgpilot::demo::config_for(cluster, "127.0.0.1:0", &[(USER, PASSWORD)]);
        cfg.metrics.listen = "127.0.0.1:0".into();
        cfg.failover.detect_on_session_error = fast;
        cfg.coordination.etcd_endpoints = etcd.endpoints();
        cfg.coordination.instance_name = name.into();
        cfg
    };
    let a = Instance::start(config("a"))?;
    let b = Instance::start(config("b"))?;
    // Both route to node 0, every node in service and streaming, one leads.
    wait_for("both in service", Duration::from_secs(30), async || {
        let ready = [&a, &b].iter().all(|i| {
            let s = i.ctx.cluster.snapshot();
            s.primary == Some(NodeId::new(0))
                && s.nodes.iter().all(|n| n.status.is_usable())
                && s.nodes[1..].iter().all(|n| n.repl.state == "streaming")
        });
        (ready && a.leads() != b.leads()).then_some(())
    })
    .await?;
    let (leader, follower) = if a.leads() { (&a, &b) } else { (&b, &a) };

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_writers = StopOnDrop(stop.clone());
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let via = if w % 2 == 0 { leader } else { follower };
            tokio::spawn(write_loop(via.addr.to_string(), w, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    let killed_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs_f64();
    let c = cluster.clone();
    blocking(move || c.stop_node(0, "immediate"))
        .await?
        .map_err(|e| e.to_string())?;
    let new = wait_for(
        "a new primary on both",
        Duration::from_secs(30),
        async || {
            let (l, f) = (leader.primary()?, follower.primary()?);
            (l != NodeId::new(0) && l == f).then_some(l)
        },
    )
    .await?;
    let new_port = cluster.nodes[new.index()].port;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks: Vec<(usize, Ack)> = Vec::new();
    for (w, t) in tasks.into_iter().enumerate() {
        acks.extend(
            t.await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|a| (w % 2, a)),
        );
    }
    let mut downtime = [Duration::ZERO; 2];
    for (i, d) in downtime.iter_mut().enumerate() {
        let first = acks
            .iter()
            .filter(|(via, (_, port, at))| *via == i && *port == new_port && *at > killed)
            .map(|(_, (_, _, at))| *at)
            .min()
            .ok_or("writes did not resume through both instances")?;
        *d = first - killed;
    }

    // The decision and the switch, as each instance exposes them.
    let (recorded, routed) = wait_for(
        "the follower on the leader's epoch",
        Duration::from_secs(10),
        async || {
            let l = scrape(leader.metrics).await.ok()?;
            let f = scrape(follower.metrics).await.ok()?;
            let epoch = "pgpilot_coordination_epoch";
            let recorded = l.get("pgpilot_coordination_epoch_recorded_timestamp_seconds")?;
            let routed = f.get("pgpilot_coordination_epoch_routed_timestamp_seconds")?;
            let same = l.get(epoch)? == f.get(epoch)?;
            (same && *recorded > killed_unix && *routed > killed_unix)
                .then_some((*recorded, *routed))
        },
    )
    .await?;
    let lag = Duration::from_secs_f64((routed - recorded).max(0.0));

    let c = cluster.clone();
    let present: HashSet<String> =
        blocking(move || c.psql_db(new.index(), USER, "SELECT k FROM t"))
            .await?
            .map_err(|e| e.to_string())?
            .lines()
            .map(str::to_string)
            .collect();
    let lost = acks
        .iter()
        .filter(|(_, (k, _, _))| !present.contains(k))
        .count();
    let c = cluster.clone();
    let (primaries, timeline) = blocking(move || {
        let primaries = (0..c.nodes.len())
            .filter(|&n| {
                c.psql_db(n, "postgres", "SELECT pg_is_in_recovery()").ok() == Some("f".into())
            })
            .count();
        let sql = "CHECKPOINT; SELECT timeline_id FROM pg_control_checkpoint()";
        let tl = c
            .psql_db(new.index(), "postgres", sql)
            .unwrap_or_else(|e| e.to_string());
        (primaries, tl)
    })
    .await?;
    Ok(Round {
        downtime,
        lag,
        lost,
        acked: acks.len(),
        promotions: leader.promotions() + follower.promotions(),
        primaries,
        timeline,
    })
}
