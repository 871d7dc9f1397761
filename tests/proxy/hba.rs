//! Client authentication rules (`hba_file`) and login throttling, end to
//! end: clients connect from several loopback addresses (their socket bound
//! to 127.0.0.x, or ::1) and get the method, refusal or delay their address
//! earns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use pgpilot::config::Config;
use pgpilot::protocol::frame::ErrorFields;
use pgpilot::server::Proxy;
use tokio::net::TcpSocket;

use super::*;

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Whether this machine has IPv6 loopback.
fn has_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// A TCP connection to pgpilot's `port` from the loopback address `from`.
async fn connect_from(from: IpAddr, port: u16) -> TcpStream {
    let (socket, to) = match from {
        IpAddr::V4(_) => (TcpSocket::new_v4(), SocketAddr::from((v4(1), port))),
        IpAddr::V6(_) => (
            TcpSocket::new_v6(),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ),
    };
    let socket = socket.unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Log in from `from` with tokio-postgres and run a statement.
async fn login_from(
    from: IpAddr,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let stream = connect_from(from, port).await;
    let work = async {
        let (client, conn) = tokio_postgres::Config::new()
            .user(user)
            .password(password)
            .dbname(db)
            .connect_raw(stream, tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        client.simple_query("SELECT 1").await?;
        Ok(client)
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .expect("login answered in time")
}

/// The first message pgpilot answers a startup from `from` with: the
/// authentication request (its code), or the error.
async fn first_answer(from: IpAddr, port: u16, user: &str, db: &str) -> Result<i32, ErrorFields> {
    let mut s = connect_from(from, port).await;
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", user), ("database", db)],
        &mut buf,
    )
    .unwrap();
    s.write_all(&buf).await.unwrap();
    let (t, body) = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s))
        .await
        .expect("an answer")
        .unwrap();
    match t {
        b'R' => Ok(i32::from_be_bytes(body[..4].try_into().unwrap())),
        b'E' => Err(ErrorFields::parse(&body)),
        other => panic!("unexpected message {:?}", other as char),
    }
}

/// The SQLSTATE and message of a refused login.
fn refusal(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;

fn write_rules(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("pgpilot_hba.conf");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn hba_lines_choose_the_method_by_address_database_and_user() {
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let ipv6 = has_ipv6();
    let rules = write_rules(
        dir.path(),
        "# hostssl lines never match a plaintext client\n\
         hostssl all all all cert\n\
         host all all 127.0.0.2/32 reject\n\
         host app app 127.0.0.3/32 trust\n\
         host postgres app 127.0.0.1/32 scram-sha-256\n\
         hostnossl all app 127.0.0.1 255.255.255.255 md5\n\
         host all all ::1/128 password\n",
    );
    let mut cfg = h.config();
    if ipv6 {
        cfg.listen = "[::]:0".into();
    }
    cfg.hba_file = Some(rules);
    cfg.validate().expect("the rules load");
    let port = spawn_proxy(cfg).port();

    // 127.0.0.1, database app: the md5 line (the user has a clear-text password).
    assert_eq!(
        first_answer(v4(1), port, USER, DB).await.ok(),
        Some(AUTH_MD5)
    );
    login_from(v4(1), port, USER, PASSWORD, DB)
        .await
        .expect("md5 login");
    let e = login_from(v4(1), port, USER, "wrong", DB)
        .await
        .err()
        .unwrap();
    assert_eq!(refusal(&e).0, "28P01");
    // Database postgres: the scram-sha-256 line before it.
    assert_eq!(
        first_answer(v4(1), port, USER, "postgres").await.ok(),
        Some(AUTH_SASL)
    );
    login_from(v4(1), port, USER, PASSWORD, "postgres")
        .await
        .expect("scram login");
    // 127.0.0.2: rejected with PostgreSQL's message, before any password.
    let e = first_answer(v4(2), port, USER, DB).await.unwrap_err();
    assert_eq!(e.code, "28000");
    assert_eq!(
        e.message,
        format!(
            "pg_hba.conf rejects connection for host \"127.0.0.2\", user \"{USER}\", database \"{DB}\", no encryption"
        )
    );
    // 127.0.0.3: trusted for database app only, whatever the password.
    assert_eq!(
        first_answer(v4(3), port, USER, DB).await.ok(),
        Some(AUTH_OK)
    );
    login_from(v4(3), port, USER, "not the password", DB)
        .await
        .expect("trust login");
    let e = login_from(v4(3), port, USER, PASSWORD, "postgres")
        .await
        .err()
        .unwrap();
    assert_eq!(
        refusal(&e),
        (
            "28000".to_string(),
            format!(
                "no pg_hba.conf entry for host \"127.0.0.3\", user \"{USER}\", database \"postgres\", no encryption"
            )
        )
    );
    // 127.0.0.4 matches no line.
    let e = first_answer(v4(4), port, USER, DB).await.unwrap_err();
    assert_eq!(e.code, "28000");
    assert!(
        e.message
            .starts_with("no pg_hba.conf entry for host \"127.0.0.4\""),
        "{}",
        e.message
    );
    // Another user from 127.0.0.1 matches no line either.
    let e = first_answer(v4(1), port, "nobody", DB).await.unwrap_err();
    assert_eq!(e.code, "28000");
    if ipv6 {
        // ::1: the password in clear text.
        assert_eq!(
            first_answer(IpAddr::V6(Ipv6Addr::LOCALHOST), port, USER, DB)
                .await
                .ok(),
            Some(AUTH_CLEARTEXT)
        );
        login_from(IpAddr::V6(Ipv6Addr::LOCALHOST), port, USER, PASSWORD, DB)
            .await
            .expect("password login over IPv6");
        let e = login_from(IpAddr::V6(Ipv6Addr::LOCALHOST), port, USER, "wrong", DB)
            .await
            .err()
            .unwrap();
        assert_eq!(refusal(&e).0, "28P01");
    } else {
        eprintln!("no IPv6 loopback: the ::1 cases were skipped");
    }
}

/// A pgpilot reading its configuration from `path` and reloading it on SIGHUP.
pub(super) fn spawn_reloading(path: std::path::PathBuf) -> SocketAddr {
    let config = Config::load(&path).expect("valid config");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let proxy = Proxy::bind(config).await.unwrap().with_reload_from(path);
            tx.send(proxy.local_addr()).unwrap();
            proxy.run(std::future::pending()).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

pub(super) fn sighup() {
    // SAFETY: kill(2) on our own pid with a signal this process handles
    // (the test installs a handler first).
    unsafe {
        libc::kill(libc::getpid(), libc::SIGHUP);
    }
}

#[tokio::test]
async fn sighup_rereads_the_rules_and_a_broken_file_keeps_the_old_ones() {
    use tokio::signal::unix::{SignalKind, signal};
    // Handle SIGHUP in this process before sending any: its default kills.
    let _hup = signal(SignalKind::hangup()).unwrap();
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let cfg = h.config();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nhba_file = \"pgpilot_hba.conf\"\nadmin_users = [\"{USER}\"]\n"
    );
    for b in &cfg.backends {
        toml.push_str(&format!(
            "[[backends]]\nhost = \"{}\"\nport = {}\n",
            b.host, b.port
        ));
    }
    toml.push_str(&format!(
        "[[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n[monitor]\nuser = \"{}\"\n[metrics]\nlisten = \"\"\n",
        cfg.monitor.user
    ));
    let conf = dir.path().join("pgpilot.toml");
    std::fs::write(&conf, toml).unwrap();
    write_rules(dir.path(), "host all all 127.0.0.1/32 scram-sha-256\n");
    let port = spawn_reloading(conf.clone()).port();
    let refused = async |from: IpAddr| {
        first_answer(from, port, USER, DB)
            .await
            .err()
            .map(|e| e.code)
    };
    assert_eq!(refused(v4(2)).await.as_deref(), Some("28000"));

    // New rules let 127.0.0.2 in once a SIGHUP is handled.
    write_rules(dir.path(), "host all all 127.0.0.0/8 scram-sha-256\n");
    let deadline = Instant::now() + Duration::from_secs(15);
    while refused(v4(2)).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the new rules were never applied"
        );
        sighup();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    login_from(v4(2), port, USER, PASSWORD, DB)
        .await
        .expect("login under the reloaded rules");

    // A broken file: the reload fails naming the line, the rules stay.
    write_rules(
        dir.path(),
        "host all all 127.0.0.1/32 scram-sha-256\nhost all +admins 127.0.0.0/8 md5\n",
    );
    let e = Config::load(&conf).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("+admins"), "{e}");
    for _ in 0..5 {
        sighup();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        refused(v4(2)).await,
        None,
        "a broken file changed the rules"
    );
    login_from(v4(2), port, USER, PASSWORD, DB)
        .await
        .expect("the old rules still apply");

    // Fixed again: reloads still work.
    write_rules(dir.path(), "host all all 127.0.0.1/32 scram-sha-256\n");
    let deadline = Instant::now() + Duration::from_secs(15);
    while refused(v4(2)).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the fixed rules were never applied"
        );
        sighup();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    login_from(v4(1), port, USER, PASSWORD, DB)
        .await
        .expect("127.0.0.1 still logs in");
}

/// How long a failed login from `from` takes to be refused (28P01).
async fn failed_login(from: IpAddr, port: u16) -> Duration {
    let started = Instant::now();
    let e = login_from(from, port, USER, "wrong", DB)
        .await
        .err()
        .unwrap();
    assert_eq!(refusal(&e).0, "28P01");
    started.elapsed()
}

#[tokio::test]
async fn repeated_failures_are_answered_later_and_later_other_addresses_at_once() {
    let h = harness();
    let mut cfg = h.config();
    cfg.auth_failure_limit = 2;
    cfg.auth_failure_max_delay = Duration::from_secs(10);
    let p = common::spawn_proxy_full(cfg);
    let port = p.addr.port();
    // Within the limit: no delay to speak of.
    for _ in 0..2 {
        let took = failed_login(v4(2), port).await;
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
    // Then 100 ms, 200, 400, 800, 1600 …
    let mut waits = Vec::new();
    for _ in 0..4 {
        waits.push(failed_login(v4(2), port).await);
    }
    for (took, at_least) in waits.iter().zip([90, 190, 390, 790]) {
        assert!(*took >= Duration::from_millis(at_least), "{waits:?}");
    }
    // While 127.0.0.2 waits 1.6 s for its next answer, 127.0.0.3 fails and
    // logs in without waiting for it, and 127.0.0.2 logs in too.
    let slow = tokio::spawn(failed_login(v4(2), port));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    failed_login(v4(3), port).await;
    login_from(v4(3), port, USER, PASSWORD, DB)
        .await
        .expect("another address logs in");
    login_from(v4(2), port, USER, PASSWORD, DB)
        .await
        .expect("a right password is answered at once");
    let others = started.elapsed();
    let slow = slow.await.unwrap();
    assert!(slow >= Duration::from_millis(1500), "{slow:?}");
    assert!(
        others < slow,
        "other logins ({others:?}) waited for the throttled one ({slow:?})"
    );
    assert!(p.ctx.metrics.auth.failures_delayed() >= 5);
    let (_, text) = common::http_get(p.metrics.unwrap(), "/metrics").await;
    assert!(
        text.contains("pgpilot_auth_failures_delayed_total 5"),
        "{text}"
    );
}

#[tokio::test]
async fn a_throttled_answer_still_comes_by_the_authentication_timeout() {
    let h = harness();
    let mut cfg = h.config();
    cfg.auth_failure_limit = 1;
    cfg.auth_failure_max_delay = Duration::from_secs(30);
    cfg.timeouts.auth = Duration::from_secs(2);
    let port = spawn_proxy(cfg).port();
    // Delays 0, 100 ms, 200, 400, 800, 1600, then 3.2 s: over the limit.
    for _ in 0..6 {
        failed_login(v4(2), port).await;
    }
    let took = failed_login(v4(2), port).await;
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(2900),
        "{took:?}"
    );
}
