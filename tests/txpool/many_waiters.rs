//! Many clients, few server connections: connections pass from session to
//! session through the pool's queue, and every client must get exactly its
//! own answers while some waiters give up (`pool.acquire_timeout`) around
//! them and the connections they left behind go to the next in line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::join_all;

use super::common::{sqlstate, wait_until};
use super::{connect_within, tx_config};
use pgpilot::config::NodeId;

/// Clients, server connections, statements per client.
const CLIENTS: usize = 200;
const SERVER_CONNS: usize = 2;
const ROUNDS: usize = 25;

/// `select <id>` until it has answered `ROUNDS` times; each answer must be
/// `id`. A request refused because the session waited too long (53300)
/// ends that session: the client logs in again. Returns how many times
/// that happened.
async fn own_answers(addr: std::net::SocketAddr, id: usize) -> usize {
    let login = Duration::from_secs(60);
    let mut c = connect_within(addr, login).await;
    let sql = format!("select {id}");
    let (mut answered, mut refused) = (0, 0);
    while answered < ROUNDS {
        match c.simple_query(&sql).await {
            Ok(msgs) => {
                let (_, rows) = super::common::result_set(&msgs);
                assert_eq!(
                    rows,
                    vec![vec![id.to_string()]],
                    "client {id} got another's answer"
                );
                answered += 1;
            }
            Err(e) if sqlstate(&e).as_deref() == Some("53300") => {
                refused += 1;
                c = connect_within(addr, login).await;
            }
            Err(e) => panic!("client {id}: {e}"),
        }
    }
    refused
}

#[tokio::test]
async fn every_client_gets_its_own_answers_among_many_waiters() {
    let p = super::common::spawn_proxy_full(tx_config(SERVER_CONNS, Duration::from_millis(300)));
    let addr = p.addr;
    // Two sleepers hold both connections now and then for longer than the
    // others may wait: those queued then give up.
    let stop = AtomicBool::new(false);
    let sleeper = async || {
        let mut c = connect_within(addr, Duration::from_secs(60)).await;
        let mut slept = 0;
        while !stop.load(Ordering::Relaxed) {
            match c.simple_query("select pg_sleep(0.5)").await {
                Ok(_) => slept += 1,
                Err(e) if sqlstate(&e).as_deref() == Some("53300") => {
                    c = connect_within(addr, Duration::from_secs(60)).await;
                }
                Err(e) => panic!("sleeper: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slept
    };
    let clients = async {
        let each = (0..CLIENTS).map(|id| own_answers(addr, 1000 + id));
        let refused: usize = join_all(each).await.into_iter().sum();
        stop.store(true, Ordering::Relaxed);
        refused
    };
    let (refused, slept) = tokio::join!(clients, join_all((0..SERVER_CONNS).map(|_| sleeper())));
    let slept: usize = slept.into_iter().sum();
    let st = p.ctx.pool.stats(NodeId::new(0));
    eprintln!("{refused} requests refused after waiting, {slept} sleeps");
    // The path under test was taken: waiters gave up.
    assert!(refused > 0, "no waiter gave up");
    assert!(st.open <= SERVER_CONNS, "{st:?}");
    // Nothing is left half-answered on the pooled connections: a new
    // client, and every connection in turn, answers cleanly.
    wait_until("the queue to empty", Duration::from_secs(10), async || {
        p.ctx.pool.stats(NodeId::new(0)).waiting == 0
    })
    .await;
    let c = connect_within(addr, Duration::from_secs(10)).await;
    for i in 0..2 * SERVER_CONNS {
        let msgs = c.simple_query(&format!("select {i}")).await.unwrap();
        let (_, rows) = super::common::result_set(&msgs);
        assert_eq!(rows, vec![vec![i.to_string()]]);
    }
}
