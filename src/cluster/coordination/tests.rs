//! The etcd task's election against a real etcd (one member of Debian's
//! `etcd` on a loopback port; skipped when it is not installed): one
//! session driven step by step, so that the watch events that race with an
//! election in a running instance arrive here exactly when they did there.

use std::sync::Arc;

use arc_swap::ArcSwap;
use etcd_client::PutOptions;

use super::*;
use crate::localcluster::etcd::EtcdCluster;

/// A lease long enough that the test never has to renew it.
const TTL_SECONDS: i64 = 30;

/// etcd on a loopback port, a cluster of three nodes that is never
/// connected to (only its state is looked at), and a session of instance
/// `a` on that etcd with its lease granted. `None` without an etcd binary.
async fn setup() -> Option<(tempfile::TempDir, EtcdCluster, Arc<Cluster>, Session)> {
    let etcd_missing = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success());
    if std::env::var_os("PGPILOT_ETCD").is_none() && etcd_missing {
        eprintln!("skipping: no etcd binary (Debian: apt-get install etcd-server)");
        return None;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().to_path_buf();
    let etcd = tokio::task::spawn_blocking(move || EtcdCluster::start(1, &path))
        .await
        .expect("the blocking start")
        .expect("etcd starts");
    let toml = format!(
        "cluster_name = \"t{pid}\"\n\
         [[backends]]\nhost = \"127.0.0.1\"\nport = 1\n\
         [[backends]]\nhost = \"127.0.0.1\"\nport = 2\n\
         [[backends]]\nhost = \"127.0.0.1\"\nport = 3\n\
         [coordination]\netcd_endpoints = [\"{ep}\"]\ninstance_name = \"a\"\nlease_ttl = \"{TTL_SECONDS}s\"\n",
        pid = std::process::id(),
        ep = etcd.endpoints()[0],
    );
    let cfg = Config::from_toml(&toml).expect("the test config");
    let cluster = Arc::new(Cluster::new(&cfg.backends));
    let config = Arc::new(ArcSwap::from_pointee(cfg));
    let (_stop, shutdown) = watch::channel(false);
    // The task itself is not run: the test drives its session.
    drop(start(
        &cluster,
        config.clone(),
        "127.0.0.1:1".parse().expect("an address"),
        shutdown,
    ));
    let handle = cluster.coordination().expect("coordination on").clone();
    let mut s = Session::connect(&cluster, &config, &handle)
        .await
        .expect("a session");
    s.grant_lease(TTL_SECONDS).await.expect("a lease");
    Some((dir, etcd, cluster, s))
}

/// The leader key as etcd holds it.
async fn leader_key(s: &mut Session) -> etcd_client::KeyValue {
    let r = s
        .client
        .get(s.keys.leader.clone(), None)
        .await
        .expect("get");
    r.kvs().first().expect("a leader key").clone()
}

/// Whether node `n` is held (detached) on `cluster`.
fn held(cluster: &Cluster, n: usize) -> bool {
    cluster.lock().holds_with_reasons()[n].is_some()
}

/// The deletion of the leader key that this session freed before it won
/// (its own key from a session that ended) reaches its watch after it won:
/// campaigning again must not take over again, which re-applied etcd's
/// state over a DETACH made in between and not yet written.
#[tokio::test]
async fn a_stale_leader_key_deletion_keeps_the_leaders_unwritten_decisions() {
    let Some((_dir, _etcd, cluster, mut s)) = setup().await else {
        return;
    };
    s.campaign().await.expect("campaign");
    assert!(s.handle.decides(), "the only instance leads");
    let cfg = s.config.load_full();
    cluster
        .detach(NodeId::new(1), &cfg)
        .expect("DETACH NODE 1 on the leader");
    assert!(held(&cluster, 1));

    // The watch delivers the deletion (the key is what it was, re-created).
    let kv = leader_key(&mut s).await;
    s.on_event(&kv, false).await.expect("the event");
    assert!(s.handle.decides(), "still leading");
    assert_eq!(*lock(&s.handle.leader_name), "a");
    assert!(
        held(&cluster, 1),
        "the DETACH was undone by a second takeover"
    );

    // And the followers get it: the state written now records it.
    assert!(s.publish().await.expect("publish"), "etcd took the write");
    let r = s.client.get(s.keys.state.clone(), None).await.expect("get");
    let state: SharedState = serde_json::from_slice(r.kvs()[0].value()).expect("the state parses");
    assert!(
        state
            .holds
            .iter()
            .any(|h| h.node == 1 && h.kind == "detached"),
        "{state:?}"
    );
}

/// The leader key deleted and taken by another lease while this instance
/// led: campaigning finds it held by another, and this instance stops
/// deciding at once (its writes would be refused by the lease check).
#[tokio::test]
async fn a_leader_whose_key_another_holds_steps_down() {
    let Some((_dir, _etcd, _cluster, mut s)) = setup().await else {
        return;
    };
    s.campaign().await.expect("campaign");
    assert!(s.handle.decides());
    let ghost = s
        .client
        .lease_grant(TTL_SECONDS, None)
        .await
        .expect("lease");
    let key = s.keys.leader.clone();
    s.client.delete(key.clone(), None).await.expect("delete");
    let opts = PutOptions::new().with_lease(ghost.id());
    s.client
        .put(key, "ghost", Some(opts))
        .await
        .expect("the other's key");

    let kv = leader_key(&mut s).await;
    s.on_event(&kv, false).await.expect("the event");
    assert!(!s.handle.decides(), "decides while another holds the key");
    assert!(!s.handle.is_leader());
    assert_eq!(*lock(&s.handle.leader_name), "ghost");
}
