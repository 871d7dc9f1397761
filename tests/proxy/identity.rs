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
