//! The client side of `benches/clients.sh`: open N connections to a pooler,
//! log each in (whatever the pooler asks: SCRAM in the benchmark), run
//! `select 1` on each, then hold them all idle until stdin is closed, and
//! close them.
//!
//! One loopback source address serves at most ~28,000 connections to one
//! port (the ephemeral port range), so connection i binds to source address
//! `127.1.x.y` with x.y = i / 20,000 (Linux routes all of 127.0.0.0/8 to
//! loopback), which lets 100,000 clients reach one listener.
//!
//! Usage: `idle_clients PORT USER PASSWORD DBNAME N [CONCURRENCY]`
//! Prints `opened N in S s (errors E)`, then `ready`; stdin EOF → `closed`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

/// Connections per source address: below the ephemeral port range's size.
const PER_SOURCE: usize = 20_000;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: idle_clients PORT USER PASSWORD DBNAME N [CONCURRENCY]");
        std::process::exit(2);
    }
    let port: u16 = args[0].parse().expect("PORT");
    let n: usize = args[4].parse().expect("N");
    let concurrency: usize = args.get(5).and_then(|a| a.parse().ok()).unwrap_or(64);
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&args[1])
        .password(&args[2])
        .dbname(&args[3])
        .connect_timeout(Duration::from_secs(30));
    let cfg = Arc::new(cfg);

    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut opening = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = cfg.clone();
        let gate = gate.clone();
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            open_one(&cfg, port, i).await
        }));
    }
    let mut clients = Vec::with_capacity(n);
    let mut errors = 0usize;
    let mut first_error = None;
    for task in opening {
        match task.await {
            Ok(Some(Ok(c))) => clients.push(c),
            Ok(Some(Err(e))) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            _ => errors += 1,
        }
    }
    println!(
        "opened {} in {:.2} s (errors {errors})",
        clients.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = first_error {
        println!("first error: {e}");
    }
    println!("ready");

    // Hold every connection until the script closes stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(clients);
    println!("closed");
}

/// Open connection `i` from its source address, log in, run `select 1`.
async fn open_one(
    cfg: &tokio_postgres::Config,
    port: u16,
    i: usize,
) -> Option<Result<tokio_postgres::Client, String>> {
    let block = (i / PER_SOURCE) as u16;
    let source = Ipv4Addr::new(127, 1, (block >> 8) as u8, (block & 0xff) as u8 + 1);
    let result = async {
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .map_err(|e| e.to_string())?;
        let stream = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (client, conn) = cfg
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("login: {e}"))?;
        tokio::spawn(conn);
        client
            .simple_query("select 1")
            .await
            .map_err(|e| format!("select 1: {e}"))?;
        Ok(client)
    }
    .await;
    Some(result)
}
