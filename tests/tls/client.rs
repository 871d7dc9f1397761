//! TLS between clients and pgpilot.

use std::time::Duration;

use super::*;

#[tokio::test]
async fn psql_logs_in_with_require_verify_full_and_channel_binding() {
    let h = harness();
    let addr = proxy("", "");
    let ca = h.files.ca_cert.display().to_string();
    // sslmode=require: TLS, no verification.
    let info = psql(addr, "sslmode=require", "\\conninfo").expect("sslmode=require");
    assert!(info.contains("SSL connection"), "{info}");
    // verify-full: the chain to the test CA and 127.0.0.1 in the certificate.
    let out = psql(
        addr,
        &format!("sslmode=verify-full sslrootcert={ca}"),
        "SELECT current_user",
    )
    .expect("sslmode=verify-full");
    assert_eq!(out, USER);
    // channel_binding=require: only SCRAM-SHA-256-PLUS satisfies libpq.
    let out = psql(
        addr,
        &format!("sslmode=verify-full sslrootcert={ca} channel_binding=require"),
        "SELECT 1",
    )
    .expect("channel_binding=require");
    assert_eq!(out, "1");
    // Without TLS, libpq refuses to log in when binding is required.
    let e = psql(addr, "sslmode=disable channel_binding=require", "SELECT 1").unwrap_err();
    assert!(e.contains("channel binding"), "{e}");
    // Plaintext still works under mode allow.
    assert_eq!(psql(addr, "sslmode=disable", "SELECT 2").unwrap(), "2");
}

#[tokio::test]
async fn tokio_postgres_over_rustls_relays_large_messages_both_ways() {
    let h = harness();
    let addr = proxy("", "");
    let c = connect_tls(addr, &h.files.ca_cert, "channel_binding=require")
        .await
        .expect("TLS login with channel binding");
    // A 3 MiB statement: many TLS records towards pgpilot.
    let big = "x".repeat(3 << 20);
    let n: i32 = tokio::time::timeout(
        Duration::from_secs(30),
        c.query_one("SELECT length($1::text)", &[&big]),
    )
    .await
    .expect("a 3 MiB parameter is relayed over TLS, not stalled")
    .unwrap()
    .get(0);
    assert_eq!(n, 3 << 20);
    // A large answer: pgpilot's writes to a TLS client fill the socket and
    // wait on its backlog.
    let rows = tokio::time::timeout(
        Duration::from_secs(30),
        c.query(
            "SELECT g, repeat('y', 200) FROM generate_series(1, 100000) g",
            &[],
        ),
    )
    .await
    .expect("a large answer is relayed over TLS, not stalled")
    .unwrap();
    assert_eq!(rows.len(), 100_000);
    // Many small round trips (each a few records).
    for i in 0..200i32 {
        let v: i32 = c.query_one("SELECT $1::int4", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
    }
}

#[tokio::test]
async fn mode_require_refuses_plaintext_with_28000() {
    let h = harness();
    let addr = proxy("", "mode = \"require\"");
    let Err(e) = common::try_connect(addr, "").await else {
        panic!("plaintext accepted under mode require");
    };
    assert_eq!(common::sqlstate(&e).as_deref(), Some("28000"), "{e}");
    let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    assert!(message.contains("TLS is required"), "{message}");
    let c = connect_tls(addr, &h.files.ca_cert, "")
        .await
        .expect("TLS login");
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    // The admin subcommands (`pgpilot nodes` ...) read the same file and
    // connect over TLS.
    let cfg = {
        let cluster = h.cluster.lock().unwrap();
        let tls = tls_section(&h.files, "mode = \"require\"");
        Config::from_toml(&toml_for(&cluster, &tls)).unwrap()
    };
    let target = pgpilot::admin::cli::Target {
        port: Some(addr.port()),
        ..Default::default()
    };
    pgpilot::admin::cli::run(&cfg, &target, pgpilot::admin::cli::Action::Nodes)
        .await
        .expect("pgpilot nodes over TLS");
}

/// Write `text` to `dir/name` readable by its owner only (libpq insists for
/// keys).
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test]
async fn client_certificates_and_hostssl_hostnossl_cert_rules() {
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let rules = private_file(
        dir.path(),
        "hba.conf",
        "hostssl all all 127.0.0.1/32 cert\nhostnossl all all 127.0.0.1/32 scram-sha-256\n",
    );
    let ca = h.files.ca_cert.display().to_string();
    let addr = proxy(
        &format!("hba_file = {:?}", rules.display().to_string()),
        &format!("ca_file = {ca:?}"),
    );
    // The harness's client certificate names the user: in, no password.
    let (cert, key) = (
        h.files.client_cert.display().to_string(),
        h.files.client_key.display().to_string(),
    );
    let with_cert = format!("sslmode=verify-full sslrootcert={ca} sslcert={cert} sslkey={key}");
    let out = psql(
        addr,
        &format!("{with_cert} password=wrong"),
        "SELECT current_user",
    )
    .expect("cert login");
    assert_eq!(out, USER);
    // TLS without a certificate: the cert line refuses.
    let e = psql(
        addr,
        &format!("sslmode=require sslrootcert={ca} sslcert=/nonexistent"),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(
        e.contains("connection requires a valid client certificate"),
        "{e}"
    );
    // Plaintext: the hostnossl line asks for the password.
    assert_eq!(psql(addr, "sslmode=disable", "SELECT 3").unwrap(), "3");
    // A certificate from another CA: a TLS alert, no login, no harm done.
    let rogue = pgpilot::localcluster::TestCa::new("rogue CA").unwrap();
    let issued = rogue.client(USER).unwrap();
    let rcert = private_file(dir.path(), "rogue.pem", &issued.cert_pem);
    let rkey = private_file(dir.path(), "rogue.key", &issued.key_pem);
    let e = psql(
        addr,
        &format!(
            "sslmode=require sslcert={} sslkey={}",
            rcert.display(),
            rkey.display()
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("alert"),
        "{e}"
    );
    // pgpilot is unharmed.
    let out = psql(addr, &with_cert, "SELECT 4").expect("still serving");
    assert_eq!(out, "4");
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    let h = harness();
    let addr = proxy("", "");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .user(USER)
        .password(PASSWORD)
        .dbname(DB)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    // With ALPN "postgresql": a whole login and a query over direct TLS.
    let alpn = client_config(&h.files.ca_cert, None, Some(b"postgresql"));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(alpn)
        .connect(name.clone(), tcp)
        .await
        .expect("direct TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let (c, conn) = tokio::time::timeout(
        Duration::from_secs(20),
        config.connect_raw(tls, tokio_postgres::NoTls),
    )
    .await
    .unwrap()
    .expect("login over direct TLS");
    tokio::spawn(conn);
    let v: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    // Without ALPN: the handshake may finish, but no login follows.
    let plain = client_config(&h.files.ca_cert, None, None);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    if let Ok(tls) = tokio_rustls::TlsConnector::from(plain)
        .connect(name, tcp)
        .await
    {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            config.connect_raw(tls, tokio_postgres::NoTls),
        )
        .await
        .unwrap();
        let Err(e) = r else {
            panic!("a login without ALPN");
        };
        assert_eq!(common::sqlstate(&e).as_deref(), Some("08P01"), "{e}");
    }
}

#[tokio::test]
async fn sighup_serves_new_certificates_to_new_connections_only() {
    use tokio::signal::unix::{SignalKind, signal};
    // Handle SIGHUP in this process before sending any: its default kills.
    let _hup = signal(SignalKind::hangup()).unwrap();
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let first = pgpilot::localcluster::TestCa::new("first CA").unwrap();
    let second = pgpilot::localcluster::TestCa::new("second CA").unwrap();
    let write = |ca: &pgpilot::localcluster::TestCa, tag: &str| {
        let issued = ca.server("localhost").unwrap();
        private_file(dir.path(), "server.pem", &issued.cert_pem);
        private_file(dir.path(), "server.key", &issued.key_pem);
        private_file(dir.path(), &format!("{tag}.pem"), &ca.cert_pem())
    };
    let ca1 = write(&first, "ca1");
    let toml = toml_for(
        &h.cluster.lock().unwrap(),
        "[tls]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\n",
    );
    let conf = dir.path().join("pgpilot.toml");
    std::fs::write(&conf, toml).unwrap();
    let addr = spawn_reloading(conf);
    let old = connect_tls(addr, &ca1, "")
        .await
        .expect("TLS with the first CA");
    let ca2 = write(&second, "ca2");
    // SAFETY: kill(2) on our own pid with a signal this process handles.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGHUP);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while connect_tls(addr, &ca2, "").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        connect_tls(addr, &ca1, "").await.is_err(),
        "the old certificate is still served"
    );
    // The session opened before the reload goes on.
    let v: i32 = old.query_one("SELECT 6", &[]).await.unwrap().get(0);
    assert_eq!(v, 6);
}

/// A pgpilot reading its configuration from `path` and reloading it on SIGHUP.
fn spawn_reloading(path: PathBuf) -> SocketAddr {
    let config = Config::load(&path).expect("valid config");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let proxy = pgpilot::server::Proxy::bind(config)
                .await
                .unwrap()
                .with_reload_from(path);
            tx.send(proxy.local_addr()).unwrap();
            proxy.run(std::future::pending()).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}
