//! Raw protocol clients for tests that need to see (or withhold) exact bytes.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{DB, PASSWORD, USER};

/// Read one backend message from a raw socket: (type, body).
pub async fn read_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let t = s.read_u8().await?;
    let len = s.read_i32().await? as usize;
    let mut body = vec![0; len.saturating_sub(4)];
    s.read_exact(&mut body).await?;
    Ok((t, body))
}

/// The SQLSTATE of an ErrorResponse body.
pub fn sqlstate_of(body: &[u8]) -> String {
    pgpilot::protocol::frame::ErrorFields::parse(body).code
}

/// Wait (at most `limit`) for the session to be ended by pgpilot with an
/// ErrorResponse; returns its SQLSTATE.
pub async fn ended_with(s: &mut TcpStream, limit: std::time::Duration) -> String {
    tokio::time::timeout(limit, async {
        loop {
            match read_msg(s).await {
                Ok((b'E', body)) => return sqlstate_of(&body),
                Ok(_) => {}
                Err(e) => panic!("closed without an error message: {e}"),
            }
        }
    })
    .await
    .expect("the session was not ended in time")
}

/// Log in over a raw socket with trust-free SCRAM via postgres-protocol; returns
/// the socket positioned after the first ReadyForQuery.
pub async fn login_raw(addr: std::net::SocketAddr) -> TcpStream {
    login_raw_with(addr, &[]).await.0
}

/// [`login_raw`], also returning the PID of the BackendKeyData the client got.
pub async fn login_raw_key(addr: std::net::SocketAddr) -> (TcpStream, i32) {
    let (s, after_auth) = login_raw_with(addr, &[]).await;
    let pid = after_auth
        .iter()
        .find(|(t, _)| *t == b'K')
        .map(|(_, body)| i32::from_be_bytes(body[..4].try_into().unwrap()))
        .expect("no BackendKeyData");
    (s, pid)
}

/// [`login_raw`] with more startup parameters; also returns every message
/// the login received after authentication (type, body), ReadyForQuery included.
pub async fn login_raw_with(
    addr: std::net::SocketAddr,
    params: &[(&str, &str)],
) -> (TcpStream, Vec<(u8, Vec<u8>)>) {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use postgres_protocol::message::frontend;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut startup = vec![("user", USER), ("database", DB)];
    startup.extend_from_slice(params);
    frontend::startup_message(startup, &mut buf).unwrap();
    s.write_all(&buf).await.unwrap();
    let mut scram = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let mut after_auth = Vec::new();
    loop {
        let (t, body) = read_msg(&mut s).await.unwrap();
        buf.clear();
        match (
            t,
            i32::from_be_bytes(body[..4.min(body.len())].try_into().unwrap_or([0; 4])),
        ) {
            (b'R', 10) => {
                frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut buf)
                    .unwrap();
                s.write_all(&buf).await.unwrap();
            }
            (b'R', 11) => {
                scram.update(&body[4..]).unwrap();
                frontend::sasl_response(scram.message(), &mut buf).unwrap();
                s.write_all(&buf).await.unwrap();
            }
            (b'R', 12) => scram.finish(&body[4..]).unwrap(),
            (b'R', _) => {}
            (b'Z', _) => {
                after_auth.push((t, body));
                return (s, after_auth);
            }
            (b'E', _) => panic!("login failed: {}", sqlstate_of(&body)),
            _ => after_auth.push((t, body)),
        }
    }
}

/// Send a simple Query on a raw socket.
pub async fn send_query(s: &mut TcpStream, sql: &str) {
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut buf).unwrap();
    s.write_all(&buf).await.unwrap();
}

/// Read messages until ReadyForQuery; returns the DataRow values of the first column.
pub async fn until_ready(s: &mut TcpStream) -> Vec<String> {
    let mut vals = vec![];
    loop {
        let (t, body) = read_msg(s).await.unwrap();
        match t {
            b'D' => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                vals.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
            }
            b'Z' => return vals,
            _ => {}
        }
    }
}
