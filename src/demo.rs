//! `pgpilot demo`: a live local cluster (primary + streaming standbys, real
//! PostgreSQL in a temp dir on loopback) with pgpilot in front, until Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::localcluster::{ClusterError, ClusterSpec, LocalCluster};
use crate::server::{Proxy, ServerError};

/// Why the demo could not run; the CLI prints it after `pgpilot demo: `.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--metrics-listen` is not an address.
    #[error("--metrics-listen: {0}")]
    MetricsListen(#[source] ConfigError),
    /// The local cluster could not be built.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// pgpilot could not listen.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A blocking task (building or stopping the cluster) panicked.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    /// Stopping the cluster took longer than a minute.
    #[error("timed out stopping the cluster")]
    StopTimeout,
}

/// Demo user, password and database.
pub(crate) const DEMO_USER: &str = "demo";
/// Demo password.
pub(crate) const DEMO_PASSWORD: &str = "demo";

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
/// Returns what failed, for the CLI to print.
pub async fn run(listen: &str, metrics_listen: &str, standbys: usize) -> Result<(), DemoError> {
    // Checked before the cluster is built.
    let metrics = crate::config::MetricsConfig {
        listen: metrics_listen.to_string(),
    };
    metrics.addr().map_err(DemoError::MetricsListen)?;
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
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(spec)).await??;
    println!("  PostgreSQL binaries: {}", cluster.bindir.display());
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
    let proxy = Proxy::bind(config).await?;
    let stop_primary = cluster.stop_command_line(0, "immediate");
    print!(
        "{}",
        banner(proxy.local_addr(), proxy.metrics_addr(), &stop_primary)
    );
    proxy
        .run(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                // Without the handler the demo cannot wait for Ctrl-C: it
                // stops now rather than run with no way to stop it cleanly.
                tracing::warn!(error = %e, "cannot listen for Ctrl-C; stopping the demo");
            }
        })
        .await;
    println!("stopping the demo cluster ...");
    let mut cluster = cluster;
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || cluster.shutdown()),
    )
    .await
    .map_err(|_| DemoError::StopTimeout)??;
    println!("pgpilot demo: stopped; the cluster and its files are removed.");
    Ok(())
}

/// What the demo prints once pgpilot listens: how to connect, that the demo
/// user is an admin, where metrics and health are served, how to stop the
/// primary (`stop_primary`, the exact command for this machine) and what a
/// failover then looks like to clients, and how to stop the demo.
fn banner(addr: SocketAddr, metrics: Option<SocketAddr>, stop_primary: &str) -> String {
    let (ip, port) = (addr.ip(), addr.port());
    let mut b = format!(
        "\npgpilot is listening on {addr}. Connect with:\n  \
         psql \"host={ip} port={port} user={DEMO_USER} password={DEMO_PASSWORD} dbname={DEMO_USER}\"\n\
         The demo user is an admin user (admin_users = [\"{DEMO_USER}\"]), so it may also run\n  \
         SHOW POOL_NODES;  SHOW PGPILOT_NODES;  SHOW PGPILOT_FAILOVER;\n"
    );
    if let Some(m) = metrics {
        b.push_str(&format!(
            "Metrics: curl http://{m}/metrics   Health: curl http://{m}/healthz\n"
        ));
    }
    b.push_str(&format!(
        "\nTo watch a failover, stop the primary (node 0) in another terminal:\n  \
         {stop_primary}\n\
         A standby is promoted within about a second and writes go on there. Sessions that\n\
         were connected get FATAL 57P01 (psql reconnects by itself). The old primary is fenced:\n\
         SHOW POOL_NODES shows node 0 down, SHOW PGPILOT_NODES shows its role as fenced and,\n\
         in held_out, how it comes back (rebuilt as a standby, then ATTACH NODE 0).\n\
         \nPress Ctrl-C to stop; the cluster and its files are removed.\n"
    ));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The banner answers what a newcomer would otherwise guess: the admin
    /// user, the metrics and health URLs, the exact stop command, what a
    /// failover does to open sessions, and how to stop.
    #[test]
    fn banner_says_what_to_expect() {
        let stop =
            "runuser -u postgres -- /opt/pg/bin/pg_ctl stop -m immediate -D /tmp/x/node0/data";
        let b = banner(
            "127.0.0.1:9999".parse().unwrap(),
            Some("127.0.0.1:9930".parse().unwrap()),
            stop,
        );
        for want in [
            "psql \"host=127.0.0.1 port=9999 user=demo password=demo dbname=demo\"",
            "admin_users = [\"demo\"]",
            "http://127.0.0.1:9930/metrics",
            "http://127.0.0.1:9930/healthz",
            stop,
            "57P01",
            "ATTACH NODE 0",
            "Ctrl-C",
        ] {
            assert!(b.contains(want), "banner lacks {want:?}:\n{b}");
        }
        let b = banner("127.0.0.1:9999".parse().unwrap(), None, stop);
        assert!(!b.contains("/metrics"), "{b}");
    }
}
