//! What a client learns of its own connection through pgpilot matches what
//! it sees elsewhere in the protocol (issue 21, items 2 and 3).

use super::*;

/// The PID of the next NotificationResponse on `s` (within 10 s), and the
/// messages read before it.
async fn next_notification_pid(s: &mut TcpStream) -> i32 {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (t, body) = read_msg(s).await.unwrap();
            if t == b'A' {
                return i32::from_be_bytes(body[..4].try_into().unwrap());
            }
        }
    })
    .await
    .expect("a notification in time")
}

/// A notification names the notifying session by the PID its client got in
/// BackendKeyData (pgpilot's), not the server process's, so an application
/// can tell its own notifications from others'.
#[tokio::test]
async fn notifications_name_the_notifying_session_by_its_pgpilot_pid() {
    let h = harness();
    let (mut a, pid_a) = common::raw::login_raw_key(h.proxy).await;
    let (mut b, pid_b) = common::raw::login_raw_key(h.proxy).await;
    assert_ne!(pid_a, pid_b);
    send_query(&mut a, "LISTEN identity_ch").await;
    until_ready(&mut a).await;
    // Its own: delivered before the NOTIFY's ReadyForQuery.
    send_query(&mut a, "NOTIFY identity_ch, 'own'").await;
    assert_eq!(next_notification_pid(&mut a).await, pid_a);
    until_ready(&mut a).await;
    // Another session's, delivered to the idle listener.
    send_query(&mut b, "NOTIFY identity_ch, 'other'").await;
    until_ready(&mut b).await;
    assert_eq!(next_notification_pid(&mut a).await, pid_b);
}

/// Wait (bounded) until server process `pid` is gone from the primary.
async fn wait_gone(h: &common::Harness, pid: i32) {
    common::wait_for(
        "the terminated backend to exit",
        Duration::from_secs(20),
        || {
            let n = h.psql(
                0,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            );
            (n.trim() == "0").then_some(())
        },
    )
    .await;
}

/// An administrator terminates the server process that carries a session
/// (its primary connection, idle while the session reads on a standby): the
/// client gets the server's 57P01 and its connection closes, as with
/// PostgreSQL, instead of going on silently on a new server process without
/// its session.
#[tokio::test]
async fn a_terminated_backend_ends_the_clients_session() {
    let h = harness();
    let c = connect(h.proxy, "application_name=terminated_victim").await;
    c.batch_execute("SET work_mem = '5MB'").await.unwrap();
    let pid = c
        .query_one("/* pgpilot:primary */ SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    // A read on a standby leaves the primary's connection idle. Other tests
    // share the cluster (a standby may lag past the threshold for a moment
    // on a loaded machine), so read until one lands there.
    common::wait_until(
        "a read to run on a standby",
        Duration::from_secs(30),
        async || {
            let read: String = c
                .query_one("SELECT current_setting('cluster_name')", &[])
                .await
                .unwrap()
                .get(0);
            read != "node0"
        },
    )
    .await;
    h.psql(0, &format!("SELECT pg_terminate_backend({pid})"));
    wait_gone(h, pid).await;
    let e = c
        .simple_query("/* pgpilot:primary */ SELECT 1")
        .await
        .expect_err("the session's backend is gone");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    common::wait_for(
        "the client's connection to close",
        Duration::from_secs(10),
        || c.is_closed().then_some(()),
    )
    .await;
}
