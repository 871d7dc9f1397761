//! Client load for failover tests: autocommit writers and a reader going
//! through pgpilot, recording every acknowledged write (key, node port,
//! time) and every error they saw.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// What one client has seen so far: it adds to it as it goes, the test
/// looks at it while the load runs ([`Load::count`]).
type Shared = Arc<Mutex<Seen>>;

/// Clients writing (or reading) through pgpilot until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<(tokio::task::JoinHandle<()>, Shared)>,
}

impl Load {
    /// `writers` autocommit clients inserting `(writer, seq)` rows, one
    /// every `pause`; with `reconnect`, a client whose connection broke
    /// reconnects (as applications do), else it keeps its one connection.
    pub fn writers(addr: SocketAddr, writers: usize, pause: Duration, reconnect: bool) -> Load {
        Load::start(writers, |w, stop, seen| {
            write_loop(addr, w, pause, reconnect, stop, seen)
        })
    }

    /// Like [`Load::writers`], the writers numbered from `first` (so loads
    /// through several pgpilots write distinct keys).
    #[allow(dead_code)]
    pub fn writers_from(addr: SocketAddr, first: usize, writers: usize, pause: Duration) -> Load {
        Load::start(writers, |w, stop, seen| {
            write_loop(addr, first + w, pause, true, stop, seen)
        })
    }

    /// One client reading in autocommit every 20 ms on one connection.
    pub fn reader(addr: SocketAddr) -> Load {
        Load::start(1, |_, stop, seen| read_loop(addr, stop, seen))
    }

    fn start<F: Future<Output = ()> + Send + 'static>(
        clients: usize,
        run: impl Fn(usize, Arc<AtomicBool>, Shared) -> F,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|i| {
                let seen = Shared::default();
                (tokio::spawn(run(i, stop.clone(), seen.clone())), seen)
            })
            .collect();
        Load { stop, clients }
    }

    /// Per client, how many of its acknowledgements so far match `f`.
    pub fn count(&self, f: impl Fn(&Ack) -> bool) -> Vec<usize> {
        self.clients
            .iter()
            .map(|(_, seen)| seen.lock().unwrap().acks.iter().filter(|a| f(a)).count())
            .collect()
    }

    /// Stop the clients and collect what they saw.
    pub async fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for (task, seen) in self.clients {
            task.await.expect("client task");
            out.push(std::mem::take(&mut *seen.lock().unwrap()));
        }
        out
    }
}

fn record(seen: &Shared, e: &tokio_postgres::Error) {
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string());
    seen.lock()
        .unwrap()
        .errors
        .push((Instant::now(), sqlstate(e).unwrap_or_default(), msg));
}

fn ack(seen: &Shared, key: String, port: u16) {
    seen.lock().unwrap().acks.push(Ack {
        key,
        port,
        at: Instant::now(),
    });
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
async fn record_query_error(seen: &Shared, e: &tokio_postgres::Error, task: &mut ConnTask) {
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
    seen: Shared,
) {
    let mut client: Option<(tokio_postgres::Client, ConnTask)> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match connect_writer(addr).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    record(&seen, &e);
                    // An application's pause before it connects again.
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
                ack(&seen, key, rows[0][0].parse().expect("port"));
            }
            Err(e) => {
                record_query_error(&seen, &e, task).await;
                if reconnect || c.is_closed() {
                    client = None;
                }
            }
        }
        // The load's rate: one write per `pause` and client.
        tokio::time::sleep(pause).await;
    }
}

async fn read_loop(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Shared) {
    let c = connect(addr, "application_name=reader").await;
    while !stop.load(Ordering::Relaxed) {
        match c
            .simple_query("SELECT count(*), inet_server_port() FROM t")
            .await
        {
            Ok(msgs) => {
                let (_, rows) = result_set(&msgs);
                ack(&seen, String::new(), rows[0][1].parse().expect("port"));
            }
            Err(e) => record(&seen, &e),
        }
        // The load's rate: one read every 20 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
