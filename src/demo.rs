//! `pgpilot demo`: a live local cluster (primary + streaming standbys, real
//! PostgreSQL in a temp dir on loopback) with pgpilot in front, until Ctrl-C.

use std::time::Duration;

use crate::config::Config;
use crate::localcluster::{ClusterSpec, LocalCluster};
use crate::server::Proxy;

/// Demo user, password and database.
pub const DEMO_USER: &str = "demo";
/// Demo password.
pub const DEMO_PASSWORD: &str = "demo";

/// Build the pgpilot configuration for a running local cluster, with `users`
/// (name, password) allowed through and allowed to run admin commands.
pub fn config_for(cluster: &LocalCluster, listen: &str, users: &[(&str, &str)]) -> Config {
    let mut toml = format!("listen = \"{listen}\"\n");
    let admins: Vec<String> = users.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    toml.push_str(&format!("admin_users = [{}]\n", admins.join(", ")));
    for n in &cluster.nodes {
        toml.push_str(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\nport = {}\napplication_name = \"{}\"\ndata_directory = \"{}\"\n",
            n.port,
            n.application_name,
            n.data_dir.display()
        ));
    }
    for (name, password) in users {
        toml.push_str(&format!(
            "[[users]]\nname = \"{name}\"\npassword = \"{password}\"\n"
        ));
    }
    toml.push_str(&format!("[monitor]\nuser = \"{}\"\n", cluster.superuser()));
    Config::from_toml(&toml).expect("the demo configuration is valid")
}

/// Run the demo until Ctrl-C, serving metrics on `metrics_listen` ("" = off).
/// Returns an error message for the CLI to print.
pub async fn run(listen: &str, metrics_listen: &str, standbys: usize) -> Result<(), String> {
    // Checked before the cluster is built.
    let metrics = crate::config::MetricsConfig {
        listen: metrics_listen.to_string(),
    };
    metrics
        .addr()
        .map_err(|e| format!("--metrics-listen: {e}"))?;
    let spec = ClusterSpec {
        standbys,
        users: vec![(DEMO_USER.into(), DEMO_PASSWORD.into())],
        databases: vec![(DEMO_USER.into(), DEMO_USER.into())],
        // Room for pgpilot's pools beside other poolers and direct clients
        // (benches/e2e.sh runs several against one demo cluster).
        extra_conf: vec!["max_connections = 200".into()],
        ..ClusterSpec::default()
    };
    println!(
        "pgpilot demo: creating a primary and {standbys} streaming standbys (real PostgreSQL) ..."
    );
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(spec))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    for n in &cluster.nodes {
        println!(
            "  node {}: 127.0.0.1:{} ({}) data in {}",
            n.node_id,
            n.port,
            if n.node_id == 0 { "primary" } else { "standby" },
            n.data_dir.display()
        );
    }
    let mut config = config_for(&cluster, listen, &[(DEMO_USER, DEMO_PASSWORD)]);
    config.metrics = metrics;
    let proxy = match Proxy::bind(config).await {
        Ok(p) => p,
        Err(e) => return Err(e.to_string()),
    };
    let addr = proxy.local_addr();
    let metrics = proxy.metrics_addr();
    println!();
    println!("pgpilot is listening on {addr}. Connect with:");
    println!(
        "  psql \"host={} port={} user={DEMO_USER} password={DEMO_PASSWORD} dbname={DEMO_USER}\"",
        addr.ip(),
        addr.port()
    );
    println!("  then: SHOW POOL_NODES;  SHOW PGPILOT_NODES;");
    if let Some(m) = metrics {
        println!("Metrics: curl http://{m}/metrics   Health: curl http://{m}/healthz");
    }
    println!("Press Ctrl-C to stop; the cluster and its files are removed.");
    proxy
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    println!("stopping the demo cluster ...");
    let mut cluster = cluster;
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || cluster.shutdown()),
    )
    .await
    .map_err(|_| "timed out stopping the cluster".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(())
}
