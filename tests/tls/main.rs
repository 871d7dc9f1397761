//! TLS end to end, against a real primary + standby started with `ssl = on`
//! and certificates from a test CA (made by the harness with rcgen): psql
//! with `sslmode=require`, `verify-full` and `channel_binding=require`,
//! tokio-postgres over rustls, direct TLS with ALPN, client certificates and
//! hba `hostssl` / `hostnossl` / `cert`, `mode = "require"`, certificates
//! re-read on SIGHUP, and pgpilot's own connections to nodes that accept
//! TLS only.

#[path = "../common/mod.rs"]
mod common;

mod backend;
mod client;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{DB, PASSWORD, USER, spawn_proxy};
use pgpilot::config::Config;
use pgpilot::localcluster::{ClusterSpec, LocalCluster, TlsFiles, TlsSpec};

/// The TLS cluster: nodes with `ssl = on`, plaintext still allowed (pgpilot's
/// own node connections are tested against a `hostssl`-only cluster in
/// [`backend`]).
struct TlsHarness {
    cluster: Mutex<LocalCluster>,
    files: TlsFiles,
    bindir: PathBuf,
}

static HARNESS: OnceLock<TlsHarness> = OnceLock::new();

extern "C" fn stop_cluster_at_exit() {
    if let Some(h) = HARNESS.get() {
        h.cluster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }
}

fn spec(standbys: usize) -> ClusterSpec {
    ClusterSpec {
        standbys,
        users: vec![(USER.into(), PASSWORD.into())],
        databases: vec![(DB.into(), USER.into())],
        ..ClusterSpec::default()
    }
}

fn harness() -> &'static TlsHarness {
    HARNESS.get_or_init(|| {
        common::init_logs();
        let tls = TlsSpec {
            hostssl_only: false,
            client_name: USER.into(),
        };
        let cluster = LocalCluster::start_tls(spec(1), tls).expect("start a TLS cluster");
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_cluster_at_exit);
        }
        TlsHarness {
            files: cluster.tls.clone().expect("certificates"),
            bindir: cluster.bindir.clone(),
            cluster: Mutex::new(cluster),
        }
    })
}

/// pgpilot's configuration for `cluster`, with `extra` TOML appended (a
/// `[tls]` section, `hba_file`...).
fn toml_for(cluster: &LocalCluster, extra: &str) -> String {
    let mut toml = format!("listen = \"127.0.0.1:0\"\nadmin_users = [\"{USER}\"]\n{extra}\n");
    for n in &cluster.nodes {
        toml.push_str(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\nport = {}\n",
            n.port
        ));
    }
    toml.push_str(&format!(
        "[[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n\
         [monitor]\nuser = \"{}\"\n[metrics]\nlisten = \"\"\n",
        "postgres"
    ));
    toml
}

/// A `[tls]` section serving the harness's server certificate.
fn tls_section(files: &TlsFiles, more: &str) -> String {
    format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n{more}\n",
        files.server_cert.display().to_string(),
        files.server_key.display().to_string()
    )
}

/// Start a pgpilot in front of the TLS cluster with `top` (top-level keys)
/// and `tls` (the `[tls]` section's body).
fn proxy(top: &str, tls: &str) -> SocketAddr {
    let h = harness();
    let cluster = h.cluster.lock().unwrap();
    let toml = toml_for(&cluster, &format!("{top}\n{}", tls_section(&h.files, tls)));
    spawn_proxy(Config::from_toml(&toml).expect("valid config"))
}

/// psql through pgpilot at `addr` with connection options `opts`; its
/// output, or its error text.
fn psql(addr: SocketAddr, opts: &str, sql: &str) -> Result<String, String> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={USER} dbname={DB} connect_timeout=10 {opts}",
        addr.port()
    );
    let out = std::process::Command::new("timeout")
        .arg("30")
        .arg(harness().bindir.join("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(&conninfo)
        .args(["-c", sql])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The roots of a PEM file.
fn roots(ca: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// A rustls client configuration trusting `ca`, presenting `identity`
/// (certificate, key) when given, announcing `alpn`.
fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: Option<&[u8]>,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let builder = rustls::ClientConfig::builder_with_provider(pgpilot::config::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca));
    let mut config = match identity {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    Arc::new(config)
}

/// tokio-postgres through pgpilot over TLS (rustls, verifying with `ca`).
async fn connect_tls(
    addr: SocketAddr,
    ca: &Path,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = pgpilot::net::PgTls::new(client_config(ca, None, None));
    let conninfo = format!(
        "{} sslmode=require {extra}",
        common::Harness::conninfo(addr, "")
    );
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_postgres::connect(&conninfo, tls),
    )
    .await
    .expect("a TLS login does not hang")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
