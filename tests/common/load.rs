//! Client load for failover tests: autocommit writers and a reader going
//! through pgpilot, recording every acknowledged write (key, node port,
//! time) and every error they saw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Harness, connect, result_set, sqlstate};

/// One acknowledged write.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The row's key.
    pub key: String,
    /// `inet_server_port()` of the node that acknowledged it.
    pub port: u16,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Acknowledged writes (or answered reads).
    pub acks: Vec<Ack>,
    /// (when, SQLSTATE, message)
    pub errors: Vec<(Instant, String, String)>,
}

/// Clients writing (or reading) through pgpilot until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    /// `writers` autocommit clients inserting `(writer, seq)` rows, one
    /// every `pause`; with `reconnect`, a client whose connection broke
    /// reconnects (as applications do), else it keeps its one connection.
    pub fn writers(addr: SocketAddr, writers: usize, pause: Duration, reconnect: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|w| {
                let stop = stop.clone();
                tokio::spawn(async move { write_loop(addr, w, pause, reconnect, stop).await })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stop the clients and collect what they saw.
    pub async fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.expect("client task"));
        }
        out
    }
}

fn record(seen: &mut Seen, e: &tokio_postgres::Error) {
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string());
    seen.errors
        .push((Instant::now(), sqlstate(e).unwrap_or_default(), msg));
}

/// The connection task of a client: its result is an error the server sent
/// while no query was waiting (pgpilot's FATAL between two writes), which
/// the client's next query reports only as "connection closed".
type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Connect a writer, keeping its connection task's result.
async fn connect_writer(
    addr: SocketAddr,
) -> Result<(tokio_postgres::Client, ConnTask), tokio_postgres::Error> {
    let info = Harness::conninfo(addr, "application_name=writer");
    let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// Record `e`, or, if the connection had closed, the error that closed it.
async fn record_query_error(seen: &mut Seen, e: &tokio_postgres::Error, task: &mut ConnTask) {
    if e.is_closed()
        && let Ok(Ok(Err(cause))) = tokio::time::timeout(Duration::from_secs(1), task).await
        && cause.as_db_error().is_some()
    {
        record(seen, &cause);
    } else {
        record(seen, e);
    }
}

async fn write_loop(
    addr: SocketAddr,
    w: usize,
    pause: Duration,
    reconnect: bool,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut client: Option<(tokio_postgres::Client, ConnTask)> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match connect_writer(addr).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    record(&mut seen, &e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let (c, task) = client.as_mut().expect("connected");
        let key = format!("{w}:{seq}");
        seq += 1;
        let sql = format!("INSERT INTO t (k) VALUES ('{key}') RETURNING inet_server_port()");
        match c.simple_query(&sql).await {
            Ok(msgs) => {
                let (_, rows) = result_set(&msgs);
                let port = rows[0][0].parse().expect("port");
                seen.acks.push(Ack {
                    key,
                    port,
                    at: Instant::now(),
                });
            }
            Err(e) => {
                record_query_error(&mut seen, &e, task).await;
                if reconnect || c.is_closed() {
                    client = None;
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
    seen
}

/// A client reading in autocommit every 20 ms on one connection.
pub fn reader(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let c = connect(addr, "application_name=reader").await;
        while !stop.load(Ordering::Relaxed) {
            match c
                .simple_query("SELECT count(*), inet_server_port() FROM t")
                .await
            {
                Ok(msgs) => {
                    let (_, rows) = result_set(&msgs);
                    seen.acks.push(Ack {
                        key: String::new(),
                        port: rows[0][1].parse().expect("port"),
                        at: Instant::now(),
                    });
                }
                Err(e) => record(&mut seen, &e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}
