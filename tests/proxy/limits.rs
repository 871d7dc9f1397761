//! Limits that keep one client from hurting others: large pipelines both
//! ways, idle limits, the write limit, and ending sessions on stop.

use super::*;

#[tokio::test]
async fn large_pipelines_flow_both_ways_without_deadlock() {
    // A client that writes a long pipeline while reading results concurrently (as
    // libpq's pipeline mode and JDBC batches do). Results are much larger than the
    // socket buffers, so a proxy that blocks on one direction would stall here.
    let h = harness();
    let s = login_raw(h.proxy).await;
    let (mut rd, mut wr) = s.into_split();
    const N: usize = 3000;
    let writer = tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        for _ in 0..N {
            postgres_protocol::message::frontend::query("SELECT repeat('x', 20000)", &mut buf)
                .unwrap();
        }
        wr.write_all(&buf).await.unwrap();
        wr
    });
    let reader = async {
        let mut ready = 0;
        let mut bytes_seen = 0usize;
        while ready < N {
            let t = rd.read_u8().await.unwrap();
            let len = rd.read_i32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            rd.read_exact(&mut body).await.unwrap();
            bytes_seen += len;
            if t == b'Z' {
                ready += 1;
            }
        }
        bytes_seen
    };
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("pipeline stalled");
    assert!(seen > N * 20_000);
    let _ = writer.await.unwrap();
}

#[tokio::test]
async fn idle_limits_end_idle_sessions_but_never_busy_ones() {
    let h = harness();
    let mut cfg = h.config();
    cfg.timeouts.client_idle = Duration::from_millis(1500);
    cfg.timeouts.idle_in_transaction = Duration::from_millis(1000);
    let addr = spawn_proxy(cfg);
    // A query running longer than the idle limit is not idleness.
    let mut busy = login_raw(addr).await;
    send_query(&mut busy, "SELECT pg_sleep(2)::text").await;
    assert_eq!(until_ready(&mut busy).await, vec![String::new()]);
    // Then nothing: 57P05 after the idle limit, measured from the last answer.
    let quiet = Instant::now();
    assert_eq!(ended_with(&mut busy, Duration::from_secs(5)).await, "57P05");
    assert!(
        quiet.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        quiet.elapsed()
    );
    // Idle inside a transaction has its own, shorter limit.
    let mut in_tx = login_raw(addr).await;
    send_query(&mut in_tx, "BEGIN").await;
    until_ready(&mut in_tx).await;
    let quiet = Instant::now();
    assert_eq!(
        ended_with(&mut in_tx, Duration::from_secs(5)).await,
        "25P03"
    );
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1400),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_write_limit() {
    let h = harness();
    let mut cfg = h.config();
    cfg.timeouts.write = Duration::from_secs(1);
    let p = spawn_proxy_full(cfg);
    let addr = p.addr;
    let mut s = login_raw(addr).await;
    // About 64 MB of answer, far more than the socket buffers hold.
    send_query(
        &mut s,
        "/* pgpilot:primary */ SELECT repeat('x', 65536) FROM generate_series(1, 1024)",
    )
    .await;
    // The client reads nothing until pgpilot has ended its session.
    wait_until(
        "pgpilot to cut off the client that stopped reading",
        Duration::from_secs(30),
        async || p.ctx.sessions.is_empty(),
    )
    .await;
    // What was buffered still arrives, then the connection ends early.
    let mut rows = 0;
    let read_all = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok((t, _)) = read_msg(&mut s).await {
            rows += usize::from(t == b'D');
            assert_ne!(
                t, b'Z',
                "the whole answer was delivered to a client that stopped reading"
            );
        }
    });
    read_all.await.expect("the connection was not closed");
    assert!(rows < 1024, "{rows} rows");
    // The proxy keeps serving.
    let c = connect(addr, "").await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn stopping_pgpilot_ends_idle_sessions_with_57p01() {
    let h = harness();
    let p = common::spawn_proxy_stoppable(h.config());
    // Accepted first, never sends a startup packet: the stop must not wait
    // the drain timeout (5 s) for it.
    let _silent = TcpStream::connect(p.addr).await.unwrap();
    let mut idle = login_raw(p.addr).await;
    let mut in_tx = login_raw(p.addr).await;
    send_query(&mut in_tx, "BEGIN").await;
    until_ready(&mut in_tx).await;
    // Both sessions now wait for their client; only the stop can wake them.
    let started = Instant::now();
    let stopper = tokio::task::spawn_blocking(move || drop(p));
    assert_eq!(ended_with(&mut idle, Duration::from_secs(2)).await, "57P01");
    assert_eq!(
        ended_with(&mut in_tx, Duration::from_secs(2)).await,
        "57P01"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    stopper.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stop took {:?}",
        started.elapsed()
    );
}
