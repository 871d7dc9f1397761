//! Several pgpilots, one truth: instances in front of the same cluster
//! agree through etcd on who decides and on the cluster's state.
//!
//! Off unless `[coordination] etcd_endpoints` is set. Keys, under
//! `prefix` (default `/pgpilot/<cluster_name>`):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `leader` | the leading instance's name | its lease |
//! | `state` | [`shared_state::SharedState`] (JSON): primary, timeline, holds, epoch, failover record | none |
//! | `members/<name>` | [`peers::Member`] (JSON): address, cancel tag, heartbeat, applied epoch | its lease |
//! | `tags/<n>` | the name holding cancel tag `n` | its lease |
//! | `requests/<id>` | an admin command sent by a follower | none (the leader deletes it) |
//! | `results/<id>` | the leader's outcome of that command ([`requests::Outcome`]) | the follower's (it deletes it) |
//!
//! # Who decides
//!
//! Each instance holds a lease of `lease_ttl` and renews it every third of
//! it. The leader is the instance whose lease the `leader` key is bound to,
//! created by a transaction that succeeds only while the key does not exist
//! (`create_revision == 0`, [`election`]). Only the leader with a live lease
//! ([`Handle::decides`]) runs the failover coordinator's decisions
//! (`failover.rs` checks [`super::Cluster::may_decide`] before a transition
//! step, `switchover.rs` and the admin commands forward to the leader), and
//! "live" is judged locally and conservatively: until a quarter TTL before
//! the lease can expire on etcd, counted from when the last renewal was
//! *sent*. A leader whose process stalls past that stops deciding before
//! etcd can elect another.
//!
//! # What is written, and why a stale leader cannot write
//!
//! The leader writes the whole state to one key with a transaction that
//! compares the key's `mod_revision` with the one it last read or wrote *and*
//! that the `leader` key is still bound to its lease. A deposed leader (lease
//! expired, another elected) therefore cannot overwrite its successor's
//! state, and two writers cannot interleave. Before a promotion is sent
//! (`pg_promote`, trigger file, command) the leader records the failover
//! (old primary, candidate, epoch) with that transaction; if the record is
//! refused, nothing is promoted (`failover.rs`, `switchover.rs` call
//! [`super::Cluster::record_promotion`]).
//!
//! # What followers do
//!
//! Followers watch the prefix and apply each state write to their
//! [`super::Cluster`] within one watch round trip
//! (`state_machine/shared.rs` says why routing then never follows a decision of its
//! own). Losing etcd (lease lost, etcd unreachable) keeps the last applied
//! state: writes go to the last confirmed primary only while it answers as
//! a primary on a timeline not older than the recorded one, and to no other
//! node; otherwise they fail with 57P03.
//!
//! # Leader loss mid-failover
//!
//! A new leader that finds a failover record finishes that failover
//! ([`resume`]): it waits for the recorded candidate to report primary
//! (promoting it again if it is still a standby) and never promotes another
//! standby while the record stands.

pub mod election;
mod liveness;
pub mod peers;
mod requests;
mod resume;
pub mod shared_state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use etcd_client::{Client, ConnectOptions, EventType, WatchOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Cluster, CommandError};
use crate::config::{Config, NodeId};
pub use peers::PeerView;
use requests::{AdminRequest, Outcome};
use shared_state::{Keys, SharedState};

/// Longest wait for one etcd call before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before reconnecting after an error.
const BACKOFF: Duration = Duration::from_millis(250);

/// What the etcd task is asked to do by the rest of the cluster layer.
enum Request {
    /// Write the cluster's current state now; the answer says whether etcd
    /// took it (the promotion record must be written before promoting).
    Publish(oneshot::Sender<Result<(), String>>),
    /// An admin command on a follower, for the leader, under this id; the
    /// outcome is awaited through [`Handle`]'s pending answers.
    Forward(String, AdminRequest),
}

/// The coordination state the rest of pgpilot reads (cheap: atomics and
/// short locks), shared with the etcd task.
pub struct Handle {
    /// This instance's name.
    pub name: String,
    /// The client address peers forward cancel requests to.
    pub address: String,
    /// The key prefix.
    pub prefix: String,
    leader: AtomicBool,
    /// The lease is live (judged locally) until then.
    lease_until: Mutex<Option<Instant>>,
    /// A new leader is finishing its predecessor's failover.
    resuming: AtomicBool,
    /// This instance's cancel tag (0: none yet).
    tag: AtomicU8,
    /// The leader's name as etcd last said.
    leader_name: Mutex<String>,
    /// The peers as etcd last listed them.
    peers: Mutex<Vec<peers::Member>>,
    /// Epoch of the state last applied or written here.
    applied_epoch: AtomicU64,
    /// When (µs since the Unix epoch) this instance, leading, sent the state
    /// write that started the current epoch (0: none).
    recorded_at_us: AtomicU64,
    /// When (µs since the Unix epoch) this instance first published, as its
    /// primary, the primary the current epoch names (0: not yet).
    routed_at_us: AtomicU64,
    /// The lease TTL (how long a forwarded command is waited for follows it).
    lease_ttl: Duration,
    /// Forwarded commands waiting for the leader's outcome, by request id.
    pending: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    /// Round-trip time of the latest etcd call, in microseconds.
    rtt_micros: AtomicU64,
    /// etcd calls that failed.
    errors: AtomicU64,
    /// Which endpoint to connect to next.
    next_endpoint: std::sync::atomic::AtomicUsize,
    /// The member the lease and the watch are on ("" between sessions).
    endpoint: Mutex<String>,
    /// To the etcd task.
    tx: mpsc::UnboundedSender<Request>,
}

impl Handle {
    /// Whether this instance may decide now: leader, lease live, not busy
    /// finishing its predecessor's failover.
    pub fn decides(&self) -> bool {
        self.leader.load(Ordering::Acquire)
            && !self.resuming.load(Ordering::Acquire)
            && self.lease_live()
    }

    /// Whether this instance leads (its lease may still have to be renewed).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire) && self.lease_live()
    }

    fn lease_live(&self) -> bool {
        lock(&self.lease_until).is_some_and(|t| Instant::now() < t)
    }

    /// Whether this instance holds no live etcd lease (cut off from etcd,
    /// or not connected yet): it cannot confirm that the primary it knows
    /// is still the one etcd records.
    pub fn cut_off(&self) -> bool {
        !self.lease_live()
    }

    /// Why no primary is published, when this instance is [cut
    /// off](Handle::cut_off) (the 57P03 message names etcd).
    pub fn no_primary_reason(&self) -> Option<String> {
        self.cut_off().then(|| {
            "pgpilot lost its etcd lease and cannot confirm the primary; writes are refused until etcd is reachable again (the leading pgpilot decides)".to_string()
        })
    }

    /// Unix time (seconds) at which this instance, leading, sent the write
    /// that started the current epoch; 0 if it wrote none.
    pub fn epoch_recorded_at(&self) -> f64 {
        self.recorded_at_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Unix time (seconds) at which this instance first routed writes to the
    /// primary the current epoch names; 0 if not yet.
    pub fn epoch_routed_at(&self) -> f64 {
        self.routed_at_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// How long a follower waits for the leader to confirm a forwarded
    /// command: twice the lease TTL, so a leader lost meanwhile is replaced
    /// (its lease expires, a successor is elected and runs the commands
    /// still recorded) within the wait; at least twice an etcd call's limit.
    pub fn confirm_limit(&self) -> Duration {
        (self.lease_ttl * 2).max(CALL_TIMEOUT * 2)
    }

    /// The cancel tag of this instance (0 until claimed).
    pub fn tag(&self) -> u8 {
        self.tag.load(Ordering::Relaxed)
    }

    /// The epoch of the state last applied here.
    pub fn applied_epoch(&self) -> u64 {
        self.applied_epoch.load(Ordering::Relaxed)
    }

    /// Seconds of the latest etcd round trip.
    pub fn rtt_seconds(&self) -> f64 {
        self.rtt_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// etcd calls that failed so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The etcd endpoint this instance's lease and watch are on; empty
    /// while it has no working session.
    pub fn endpoint(&self) -> String {
        lock(&self.endpoint).clone()
    }

    /// The client address of the peer holding cancel tag `tag`.
    pub fn peer_address_for_tag(&self, tag: u8) -> Option<std::net::SocketAddr> {
        lock(&self.peers)
            .iter()
            .find(|m| m.tag == tag && m.name != self.name)
            .and_then(|m| m.address.parse().ok())
    }

    /// Every instance etcd lists, for `SHOW PGPILOT_PEERS`.
    pub fn peers(&self) -> Vec<PeerView> {
        let leader = lock(&self.leader_name).clone();
        let mut v: Vec<PeerView> = lock(&self.peers)
            .iter()
            .map(|m| PeerView {
                name: m.name.clone(),
                address: m.address.clone(),
                leader: m.name == leader,
                heartbeat: SystemTime::UNIX_EPOCH + Duration::from_millis(m.heartbeat_ms),
                applied_epoch: m.applied_epoch,
                this: m.name == self.name,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn note_rtt(&self, since: Instant) {
        self.rtt_micros
            .store(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn note_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn set_lease_until(&self, t: Option<Instant>) {
        *lock(&self.lease_until) = t;
    }
}

/// Microseconds since the Unix epoch.
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// Whether this instance may make decisions: always without
    /// coordination, only as the leader with it, never in Patroni mode
    /// (Patroni decides; see `cluster::patroni`).
    pub fn may_decide(&self) -> bool {
        self.patroni.get().is_none() && self.coord.get().is_none_or(|h| h.decides())
    }

    /// The coordination handle, when coordination is on.
    pub fn coordination(&self) -> Option<&Arc<Handle>> {
        self.coord.get()
    }

    /// Before a promotion is sent: record it in etcd (see the module docs).
    /// Always `Ok` without coordination.
    pub(super) async fn record_promotion(&self) -> Result<(), String> {
        let Some(h) = self.coord.get() else {
            return Ok(());
        };
        if !h.decides() {
            return Err("this pgpilot no longer leads (lease lost)".into());
        }
        let (tx, rx) = oneshot::channel();
        h.tx.send(Request::Publish(tx))
            .map_err(|_| "the etcd task has ended".to_string())?;
        match tokio::time::timeout(CALL_TIMEOUT * 2, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the etcd task dropped the request".into()),
            Err(_) => Err("etcd did not confirm the record in time".into()),
        }
    }

    /// Whether an admin command (`ATTACH`, `DETACH`, `PROMOTE NODE`) given
    /// here must go to the leading pgpilot: coordination is on and this
    /// instance does not decide. Then [`Cluster::forward_to_leader`] runs it.
    pub fn forwards_commands(&self) -> bool {
        self.coord.get().is_some_and(|h| !h.decides())
    }

    /// Reached by a command that [`Cluster::forwards_commands`] sent here
    /// while this instance decided, and it stopped deciding since: refused
    /// (the caller retries and it is forwarded). `None`: run it here.
    pub(super) fn forward_if_follower(
        &self,
        _command: &'static str,
        _node: NodeId,
    ) -> Option<Result<String, CommandError>> {
        let h = self.coord.get()?;
        if h.decides() {
            return None;
        }
        Some(Err(CommandError::Coordination {
            message: "this pgpilot stopped leading as the command arrived; retry (it then goes to the leading pgpilot)".into(),
        }))
    }

    /// An admin command on an instance that does not decide: hand it to the
    /// leader through etcd (`requests/<id>`) and wait until the leader has
    /// run it and recorded its effect, and this instance has applied that
    /// record, or [`Handle::confirm_limit`]. The answer is the leader's:
    /// its message, or its refusal ([`CommandError::RefusedByLeader`]);
    /// silence within the limit is [`CommandError::LeaderSilent`].
    ///
    /// Why the effect is visible here when the answer comes: the leader
    /// writes the state before the outcome (`requests.rs`), etcd's watch
    /// delivers them in revision order, and the etcd task applies a state
    /// write before it reads the next event.
    pub(crate) async fn forward_to_leader(
        &self,
        command: &'static str,
        node: NodeId,
    ) -> Result<String, CommandError> {
        let Some(h) = self.coord.get() else {
            return Err(CommandError::Coordination {
                message: "coordination through etcd is off".into(),
            });
        };
        let leader = lock(&h.leader_name).clone();
        if leader.is_empty() || leader == h.name {
            return Err(CommandError::Coordination {
                message: "no leading pgpilot is known (etcd unreachable or an election in progress); retry".into(),
            });
        }
        let id = requests::new_id(&h.name);
        let req = AdminRequest {
            command: command.to_string(),
            node: node.index(),
            from: h.name.clone(),
            lease: 0,
        };
        let (tx, rx) = oneshot::channel();
        lock(&h.pending).insert(id.clone(), tx);
        if h.tx.send(Request::Forward(id.clone(), req)).is_err() {
            lock(&h.pending).remove(&id);
            return Err(CommandError::Coordination {
                message: "the etcd task has ended".into(),
            });
        }
        let waited = h.confirm_limit();
        match tokio::time::timeout(waited, rx).await {
            Ok(Ok(o)) if o.ok => Ok(format!(
                "{} (run by the leading pgpilot {})",
                o.message, o.leader
            )),
            Ok(Ok(o)) => Err(CommandError::RefusedByLeader {
                leader: o.leader,
                message: o.message,
            }),
            Ok(Err(_)) => Err(CommandError::Coordination {
                message: "etcd could not be told (it is unreachable); the command was not sent"
                    .into(),
            }),
            Err(_) => {
                lock(&h.pending).remove(&id);
                Err(CommandError::LeaderSilent { leader, waited })
            }
        }
    }
}

/// Turn coordination on for `cluster` (before its first health check:
/// until etcd's state is read, no primary is published) and return the
/// task to run. `None` when `[coordination]` is off.
pub fn start(
    cluster: &Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    listen: std::net::SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let cfg = config.load_full();
    let c = &cfg.coordination;
    // In Patroni mode every instance follows Patroni's leader key itself.
    if !c.enabled() || cfg.failover.mode == crate::config::FailoverMode::Patroni {
        return None;
    }
    let address = if c.advertise_address.is_empty() {
        listen.to_string()
    } else {
        c.advertise_address.clone()
    };
    let name = if c.instance_name.is_empty() {
        address.clone()
    } else {
        c.instance_name.clone()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Arc::new(Handle {
        name,
        address,
        prefix: c.prefix_for(&cfg.cluster_name),
        leader: AtomicBool::new(false),
        lease_until: Mutex::new(None),
        resuming: AtomicBool::new(false),
        tag: AtomicU8::new(0),
        leader_name: Mutex::new(String::new()),
        peers: Mutex::new(Vec::new()),
        applied_epoch: AtomicU64::new(0),
        recorded_at_us: AtomicU64::new(0),
        routed_at_us: AtomicU64::new(0),
        lease_ttl: Duration::from_secs(c.ttl_seconds() as u64),
        pending: Mutex::new(HashMap::new()),
        rtt_micros: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        next_endpoint: Default::default(),
        endpoint: Mutex::new(String::new()),
        tx,
    });
    if cluster.coord.set(handle.clone()).is_err() {
        return None;
    }
    // Nothing is routed until etcd's state is read.
    let adm = super::state_machine::Admission::from(&*cfg);
    cluster.update(|o| o.apply_external(Default::default(), o.holds_with_reasons(), &adm));
    let cluster = cluster.clone();
    // Several instances may log to one place (the tests run two in one
    // process): each line of the etcd task names its instance.
    let span = tracing::info_span!("coordination", instance = %handle.name);
    Some(tracing::Instrument::instrument(
        run(cluster, config, handle, rx, shutdown),
        span,
    ))
}

/// The etcd task: connect, hold a lease, campaign, watch; on any error
/// step down and start again.
async fn run(
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    handle: Arc<Handle>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let r = match Session::connect(&cluster, &config, &handle).await {
            Ok(mut s) => {
                let r = s.serve(&mut rx, &mut shutdown).await;
                s.step_down();
                if r.is_ok() {
                    // Stopping: give the lease back so a peer leads at once.
                    let lease = s.lease;
                    let _ = tokio::time::timeout(CALL_TIMEOUT, s.client.lease_revoke(lease)).await;
                    return;
                }
                r
            }
            Err(e) => Err(e),
        };
        let endpoint = std::mem::take(&mut *lock(&handle.endpoint));
        if let Err(e) = r {
            handle.note_error();
            tracing::warn!(error = %e, endpoint, "etcd coordination: no working connection; this pgpilot decides nothing until it is back");
        }
        // Requests made meanwhile cannot be honoured.
        while let Ok(req) = rx.try_recv() {
            match req {
                Request::Publish(reply) => {
                    let _ = reply.send(Err("etcd is unreachable".into()));
                }
                // Dropping its answer tells the waiting command it was not sent.
                Request::Forward(id, _) => drop(lock(&handle.pending).remove(&id)),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(BACKOFF) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Why a session with etcd ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum CoordError {
    /// An etcd call failed.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// An etcd call took longer than its limit.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// The lease expired on etcd (a renewal came too late).
    #[error("the lease expired")]
    LeaseExpired,
    /// The watch stream ended.
    #[error("the watch stream ended")]
    WatchEnded,
    /// A write of this instance did not come back through the watch.
    #[error(
        "the watch delivered nothing for {0:?} (this instance's own heartbeat did not come back)"
    )]
    WatchStalled(Duration),
}

/// Run one etcd call within [`CALL_TIMEOUT`], timing it.
async fn call<T>(
    handle: &Handle,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CoordError> {
    let t0 = Instant::now();
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => {
            handle.note_rtt(t0);
            Ok(v)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(CoordError::Timeout(CALL_TIMEOUT)),
    }
}

/// One connection to etcd with one lease.
pub(super) struct Session {
    cluster: Arc<Cluster>,
    config: Arc<ArcSwap<Config>>,
    handle: Arc<Handle>,
    keys: Keys,
    client: Client,
    /// The lease id.
    lease: i64,
    /// The state as last read or written.
    state: SharedState,
    /// Its `mod_revision` (0: the key does not exist).
    state_rev: i64,
    /// The epoch whose primary this instance last routed writes to.
    routed_epoch: u64,
    /// A forwarded request arrived while this instance did not decide (a
    /// follower, or a leader finishing its predecessor's failover): look
    /// for requests again once it decides.
    unrun_requests: bool,
}

impl Session {
    async fn connect(
        cluster: &Arc<Cluster>,
        config: &Arc<ArcSwap<Config>>,
        handle: &Arc<Handle>,
    ) -> Result<Session, CoordError> {
        let cfg = config.load_full();
        let endpoints = &cfg.coordination.etcd_endpoints;
        // One member at a time, starting after the last one that failed:
        // a balanced channel over every endpoint keeps sending calls to a
        // dead member, so the session ends and the next member is tried.
        let mut last = None;
        for _ in 0..endpoints.len() {
            let i = handle.next_endpoint.fetch_add(1, Ordering::Relaxed) % endpoints.len();
            let opts = ConnectOptions::new()
                .with_connect_timeout(CALL_TIMEOUT)
                .with_timeout(CALL_TIMEOUT);
            let attempt = async {
                let mut client =
                    call(handle, Client::connect([endpoints[i].as_str()], Some(opts))).await?;
                call(
                    handle,
                    client.get(format!("{}/leader", handle.prefix), None),
                )
                .await?;
                Ok::<_, CoordError>(client)
            };
            match attempt.await {
                Ok(client) => {
                    // Stay on this member until it fails.
                    handle.next_endpoint.fetch_sub(1, Ordering::Relaxed);
                    tracing::info!(endpoint = %endpoints[i], "etcd coordination: connected; the lease and the watch are on this member");
                    *lock(&handle.endpoint) = endpoints[i].clone();
                    return Ok(Session::new(cluster, config, handle, client));
                }
                Err(e) => {
                    handle.note_error();
                    tracing::debug!(endpoint = %endpoints[i], error = %e, "etcd member unreachable");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(CoordError::Timeout(CALL_TIMEOUT)))
    }

    fn new(
        cluster: &Arc<Cluster>,
        config: &Arc<ArcSwap<Config>>,
        handle: &Arc<Handle>,
        client: Client,
    ) -> Session {
        Session {
            cluster: cluster.clone(),
            config: config.clone(),
            handle: handle.clone(),
            keys: Keys::new(&handle.prefix),
            client,
            lease: 0,
            state: SharedState::default(),
            state_rev: 0,
            routed_epoch: 0,
            unrun_requests: false,
        }
    }

    /// Lease, registration, campaign, then react to renewals, watch events,
    /// cluster changes and requests until shutdown (`Ok`) or an error.
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Request>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), CoordError> {
        let ttl = self.config.load().coordination.ttl_seconds();
        let (mut keeper, mut renewals) = self.grant_lease(ttl).await?;
        self.claim_tag().await?;
        self.heartbeat().await?;
        // Watched from here on: this session's writes under the prefix
        // must come back through it (`liveness.rs`).
        let mut echo = liveness::Echo::default();
        let (_watcher, mut events) = call(
            &self.handle,
            self.client
                .watch(self.keys.root(), Some(WatchOptions::new().with_prefix())),
        )
        .await?
        .split();
        self.read_state().await?;
        self.refresh_peers().await?;
        // Outcomes written while this instance was not watching.
        for kv in self.list(self.keys.results.clone()).await? {
            self.on_result(&kv).await?;
        }
        self.campaign().await?;
        let mut renew = tokio::time::interval(Duration::from_secs(ttl as u64) / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.cluster.subscribe();
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    let limit = Duration::from_secs(ttl as u64);
                    if let Some(late) = echo.stalled(Instant::now(), limit) {
                        return Err(CoordError::WatchStalled(late));
                    }
                    self.renew(&mut keeper, &mut renewals, ttl).await?;
                    let rev = self.heartbeat().await?;
                    echo.sent(rev, Instant::now());
                }
                m = events.message() => {
                    let Some(resp) = m? else { return Err(CoordError::WatchEnded) };
                    if resp.canceled() {
                        return Err(CoordError::WatchEnded);
                    }
                    let delivered = resp.events().iter().filter_map(|ev| ev.kv()).map(|kv| kv.mod_revision());
                    echo.seen(delivered.chain(resp.header().map(|h| h.revision())).max().unwrap_or(0));
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let put = ev.event_type() == EventType::Put;
                        self.on_event(kv, put).await?;
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    if self.handle.decides() {
                        self.publish().await?;
                        if std::mem::take(&mut self.unrun_requests) {
                            for kv in self.list(self.keys.requests.clone()).await? {
                                self.on_request(&kv).await?;
                            }
                        }
                    }
                    self.note_routed();
                }
                Some(req) = rx.recv() => match req {
                    Request::Publish(reply) => {
                        let r = self.publish().await;
                        let answer = match &r {
                            Ok(true) => Ok(()),
                            Ok(false) => Err("etcd refused the write: this pgpilot no longer leads".to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        let _ = reply.send(answer);
                        r?;
                    }
                    Request::Forward(id, req) => self.forward(id, req).await?,
                },
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// One watch event under the prefix.
    async fn on_event(&mut self, kv: &etcd_client::KeyValue, put: bool) -> Result<(), CoordError> {
        let key = kv.key();
        if key == self.keys.state.as_bytes() {
            if put && kv.mod_revision() > self.state_rev {
                self.state_changed(kv);
            }
        } else if key == self.keys.leader.as_bytes() {
            if put {
                *lock(&self.handle.leader_name) = String::from_utf8_lossy(kv.value()).into_owned();
                self.refresh_peers().await?;
            } else {
                lock(&self.handle.leader_name).clear();
                self.campaign().await?;
            }
        } else if key.starts_with(self.keys.members.as_bytes()) {
            self.refresh_peers().await?;
        } else if put && key.starts_with(self.keys.requests.as_bytes()) {
            self.on_request(kv).await?;
        } else if put && key.starts_with(self.keys.results.as_bytes()) {
            self.on_result(kv).await?;
        }
        Ok(())
    }

    /// If this instance now publishes, as its primary, the primary the
    /// current epoch names, for the first time in that epoch: note when
    /// (`pgpilot_coordination_epoch_routed_timestamp_seconds`). Called after
    /// each applied or written state and each published snapshot, since a
    /// follower's own checks may confirm the node a little later.
    fn note_routed(&mut self) {
        let epoch = self.state.epoch;
        if epoch <= self.routed_epoch || self.handle.applied_epoch() != epoch {
            return;
        }
        let Some(p) = self.state.primary else { return };
        if self.cluster.snapshot().primary == Some(NodeId::new(p)) {
            self.routed_epoch = epoch;
            self.handle
                .routed_at_us
                .store(unix_micros(), Ordering::Relaxed);
        }
    }

    /// Not the leader any more: keep the last state etcd confirmed, decide
    /// nothing (see `state_machine/shared.rs`).
    fn step_down(&mut self) {
        let was = self.handle.leader.swap(false, Ordering::AcqRel);
        self.handle.set_lease_until(None);
        if was {
            tracing::warn!("this pgpilot no longer leads");
        }
        self.apply(self.state.clone());
    }
}
