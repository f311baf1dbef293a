//! Cancel requests reach only the query of the client that sent them.

use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_its_own_query() {
    let s = Setup::new("cancel", 2, PoolMode::Transaction).await;
    let victim = s.client().await;
    let bystander = s.client().await;
    let token = victim.cancel_token();

    let other = tokio::spawn(async move {
        let start = Instant::now();
        bystander
            .simple_query("select pg_sleep(2)")
            .await
            .map(|_| start.elapsed())
    });
    let sleeper = tokio::spawn(async move {
        let r = victim.simple_query("select pg_sleep(30)").await;
        (r, Instant::now())
    });
    // Weir can pass a cancel on only once a query runs on a server connection; both run,
    // so a cancel sent to the wrong one would show.
    eventually("both sleeps are running", Duration::from_secs(10), || {
        s.sql(
            "select count(*) from pg_stat_activity \
             where datname = current_database() and state = 'active' \
             and query in ('select pg_sleep(30)', 'select pg_sleep(2)')",
        ) == "2"
    })
    .await;
    let sent = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, ended) = sleeper.await.unwrap();
    let e = r.expect_err("the sleep was cancelled");
    assert_eq!(code(&e), "57014");
    assert!(
        ended - sent < Duration::from_secs(1),
        "cancelled in {:?}",
        ended - sent
    );
    let took = other
        .await
        .unwrap()
        .expect("the other client's query was not cancelled");
    assert!(
        took >= Duration::from_millis(1900),
        "the bystander's sleep ran its course: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_does_nothing() {
    let s = Setup::new("cancelkey", 1, PoolMode::Transaction).await;
    let c = s.client().await;
    // A raw CancelRequest with a made-up key: Weir drops it.
    let addr = s.weir.local_addr();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let mut p = vec![0, 0, 0, 16];
        p.extend_from_slice(&80877102u32.to_be_bytes());
        p.extend_from_slice(&12345i32.to_be_bytes());
        p.extend_from_slice(&999i32.to_be_bytes());
        sock.write_all(&p).unwrap();
    })
    .await
    .unwrap();
    let rows = c.simple_query("select pg_sleep(0.5)").await;
    assert!(rows.is_ok());
}
