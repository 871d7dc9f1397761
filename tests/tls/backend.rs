//! TLS between pgpilot and the nodes: `[backend_tls]` against a cluster
//! whose pg_hba accepts TCP connections over TLS only (`hostssl`).

use std::time::Duration;

use super::*;

/// A hostssl-only cluster of its own (the shared one accepts plaintext).
struct Strict(LocalCluster);

impl Drop for Strict {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

fn strict_cluster() -> Strict {
    common::init_logs();
    let tls = TlsSpec {
        hostssl_only: true,
        client_name: USER.into(),
    };
    Strict(LocalCluster::start_tls(spec(1), tls).expect("start a hostssl-only cluster"))
}

/// Whether a query through pgpilot at `addr` gets an answer (an admin user
/// may log in while no node can be reached, so the login alone says little).
async fn serves_queries(addr: SocketAddr) -> bool {
    let Ok(c) = common::try_connect(addr, "connect_timeout=5").await else {
        return false;
    };
    let q = c.query_one("/* pgpilot:primary */ SELECT 1", &[]);
    matches!(
        tokio::time::timeout(Duration::from_secs(20), q).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_verify_full_reaches_hostssl_only_nodes() {
    let strict = tokio::task::spawn_blocking(strict_cluster).await.unwrap();
    let files = strict.0.tls.clone().unwrap();
    let ca = files.ca_cert.display().to_string();
    // Without backend TLS the nodes refuse pgpilot: the check below is real.
    let plain = common::spawn_proxy_full(
        Config::from_toml(&toml_for(&strict.0, "")).expect("valid config"),
    );
    assert!(
        !serves_queries(plain.addr).await,
        "a hostssl-only node let a plaintext login in"
    );
    // verify-full with the test CA: the monitor role's checks (health,
    // replication) and the pooled connections all go over TLS.
    let section = format!("[backend_tls]\nmode = \"verify-full\"\nroot_cert_file = {ca:?}\n");
    let p = common::spawn_proxy_full(
        Config::from_toml(&toml_for(&strict.0, &section)).expect("valid config"),
    );
    common::nodes_in_service(&p).await;
    let c = common::connect(p.addr, "").await;
    let on_primary: String = c
        .query_one(
            "/* pgpilot:primary */ SELECT current_setting('cluster_name')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_primary, "node0");
    // The node sees pgpilot's connection encrypted.
    let ssl: bool = c
        .query_one(
            "/* pgpilot:primary */ SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    // A large answer through a TLS server connection.
    let rows = tokio::time::timeout(
        Duration::from_secs(30),
        c.query(
            "/* pgpilot:primary */ SELECT g, repeat('z', 300) FROM generate_series(1, 50000) g",
            &[],
        ),
    )
    .await
    .expect("a large answer over backend TLS is not stalled")
    .unwrap();
    assert_eq!(rows.len(), 50_000);
    // A read on the standby, also over TLS.
    let on_standby: String = c
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        on_standby == "node1" || on_standby == "node0",
        "{on_standby}"
    );
    // verify-full with another CA: the certificate is refused.
    let rogue = pgpilot::localcluster::TestCa::new("rogue CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rogue_ca = dir.path().join("rogue.pem");
    std::fs::write(&rogue_ca, rogue.cert_pem()).unwrap();
    let section = format!(
        "[backend_tls]\nmode = \"verify-full\"\nroot_cert_file = {:?}\n",
        rogue_ca.display().to_string()
    );
    let wrong = common::spawn_proxy_full(
        Config::from_toml(&toml_for(&strict.0, &section)).expect("valid config"),
    );
    assert!(
        !serves_queries(wrong.addr).await,
        "a node certificate from an untrusted CA was accepted"
    );
    cert_auth_at_the_node(&strict.0, &files).await;
}

/// The primary takes the application role by certificate only
/// (`hostssl ... cert`): pgpilot logs in with `[backend_tls]`'s client
/// certificate (common name = the role), without a valid password.
async fn cert_auth_at_the_node(cluster: &LocalCluster, files: &TlsFiles) {
    let hba = cluster.nodes[0].data_dir.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    let text = format!("hostssl all {USER} 127.0.0.1/32 cert\n{text}");
    std::fs::write(&hba, text).unwrap();
    cluster.psql(0, "SELECT pg_reload_conf()").unwrap();
    let show = |v: &std::path::PathBuf| format!("{:?}", v.display().to_string());
    let verify = format!(
        "[backend_tls]\nmode = \"verify-full\"\nroot_cert_file = {}\n",
        show(&files.ca_cert)
    );
    // The node no longer takes the password: without a certificate, no login.
    let p = common::spawn_proxy_full(Config::from_toml(&toml_for(cluster, &verify)).unwrap());
    common::nodes_in_service(&p).await;
    assert!(
        !serves_queries(p.addr).await,
        "the node's cert line let a login without a certificate in"
    );
    // With the client certificate, in; the password pgpilot holds is not
    // even the right one for the node.
    let with_cert = format!(
        "{verify}cert_file = {}\nkey_file = {}\n",
        show(&files.client_cert),
        show(&files.client_key)
    );
    let mut cfg = Config::from_toml(&toml_for(cluster, &with_cert)).unwrap();
    cfg.users[0].password = Some("not-the-nodes-password".into());
    cfg.validate().unwrap();
    let p = common::spawn_proxy_full(cfg);
    common::nodes_in_service(&p).await;
    let c = common::try_connect(p.addr, "password=not-the-nodes-password")
        .await
        .expect("login to pgpilot");
    let who: String = c
        .query_one("/* pgpilot:primary */ SELECT current_user", &[])
        .await
        .expect("the node took pgpilot's client certificate")
        .get(0);
    assert_eq!(who, USER);
}
