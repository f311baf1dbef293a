//! Clients spread over worker threads (one single-threaded runtime each) share the pools:
//! a server connection moves to the worker of the client that checks it out, and every
//! transaction still runs whole on one connection. Worker 0 accepts every client and serves
//! the short-lived ones; clients that stay move between transactions until the workers serve
//! about as many each, and carry on there as they were.

use std::sync::atomic::Ordering::Relaxed;

use crate::common::*;

type TwoWorkers = (
    String,
    weir_proxy::ProxyHandle,
    std::sync::Arc<weir_proxy::workers::Workers>,
);

/// A Weir with two workers (the test's runtime is worker 0, one extra thread worker 1) and a
/// pool of `pool_size` in transaction mode, in front of a fresh database.
async fn two_workers(prefix: &str, pool_size: u32) -> TwoWorkers {
    two_workers_with(prefix, pool_size, PoolMode::Transaction, |_| {}).await
}

/// [`two_workers`] in `mode`, with `edit` applied to the config first.
async fn two_workers_with(
    prefix: &str,
    pool_size: u32,
    mode: PoolMode,
    edit: impl FnOnce(&mut weir_config::Config),
) -> TwoWorkers {
    let (pg, db) = shared_pg_database(prefix).await;
    let mut config = weir_config(pg, &db, pool_size, mode);
    edit(&mut config);
    let workers = weir_proxy::workers::Workers::start(2).expect("start a worker thread");
    let weir = weir_proxy::Proxy::start_on(config, workers.clone())
        .await
        .expect("start weir");
    (db, weir, workers)
}

/// Connects clients one at a time until one has landed on each worker (worker 0 hands a
/// client to worker 1 once it serves 16 more), closes the others, and returns those two,
/// (on worker 0, on worker 1), each then alone on its worker, so neither moves.
async fn one_client_per_worker(
    url: &str,
    weir: &weir_proxy::ProxyHandle,
) -> (tokio_postgres::Client, tokio_postgres::Client) {
    let mut on: [Option<tokio_postgres::Client>; 2] = [None, None];
    let mut others = Vec::new();
    for _ in 0..64 {
        let (c, w) = connect_counted(url, weir).await;
        match &on[w] {
            None => on[w] = Some(c),
            Some(_) => others.push(c),
        }
        if let [Some(_), Some(_)] = &on {
            drop(others);
            let counts = &weir.shared().clients;
            eventually(
                "one client left on each worker",
                std::time::Duration::from_secs(10),
                || counts.on_worker(0) == 1 && counts.on_worker(1) == 1,
            )
            .await;
            let [a, b] = on;
            return (a.unwrap(), b.unwrap());
        }
    }
    panic!("64 clients in a row were all served by one worker");
}

/// Connects one client, and gives the worker that serves it: the one whose count of clients
/// it raised.
async fn connect_counted(
    url: &str,
    weir: &weir_proxy::ProxyHandle,
) -> (tokio_postgres::Client, usize) {
    let counts = &weir.shared().clients;
    let before = [counts.on_worker(0), counts.on_worker(1)];
    let c = connect(url).await.unwrap();
    let after = [counts.on_worker(0), counts.on_worker(1)];
    let w = match (after[0] - before[0], after[1] - before[1]) {
        (1, 0) => 0,
        (0, 1) => 1,
        other => panic!("one connection, counted on the workers as {other:?}"),
    };
    (c, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_0_serves_clients_that_come_for_one_transaction() {
    let (pg, db) = shared_pg_database("workers_port").await;
    let mut config = weir_config(pg, &db, 2, PoolMode::Transaction);
    config.proxy.listen = vec![format!("127.0.0.1:{}", free_port()).parse().unwrap()];
    let workers = weir_proxy::workers::Workers::start(2).expect("start a worker thread");
    let weir = weir_proxy::Proxy::start_on(config.clone(), workers.clone())
        .await
        .expect("start weir");
    let others = weir_proxy::workers::Workers::start(2).expect("start a worker thread");
    let err = match weir_proxy::Proxy::start_on(config, others.clone()).await {
        Ok(_) => panic!("a second Weir started on the port of a running one"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot listen on"), "{err}");
    others.stop();
    let port = weir.local_addr().port();
    assert_eq!(listening_sockets(port), 1, "one listener on port {port}");

    // A connection per transaction, a few at a time: all served where they are accepted, on
    // one event loop, none handed to the other worker's thread.
    let url = weir_url(&weir, SCRAM_USER, &db);
    let counts = &weir.shared().clients;
    for round in 0..10i32 {
        let mut batch = Vec::new();
        for _ in 0..3 {
            let (c, w) = connect_counted(&url, &weir).await;
            assert_eq!(w, 0, "a client of round {round} served by worker {w}");
            batch.push(c);
        }
        for (i, c) in batch.iter().enumerate() {
            let want = round * 10 + i as i32;
            let got: i32 = c
                .query_one("select $1::int", &[&want])
                .await
                .unwrap()
                .get(0);
            assert_eq!(got, want);
        }
        drop(batch);
        eventually(
            "the closed clients no longer counted",
            std::time::Duration::from_secs(10),
            || counts.total() == 0,
        )
        .await;
    }
    weir.stop();
    workers.stop();
}

/// Sockets listening on 127.0.0.1:`port`, from /proc/net/tcp.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // `st` 0A is LISTEN.
            f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_workers_share_one_server_connection() {
    let (db, weir, workers) = two_workers("workers_one", 1).await;
    let url = weir_url(&weir, SCRAM_USER, &db);
    let (a, b) = one_client_per_worker(&url, &weir).await;
    for i in 0..40i32 {
        let x: i32 = a.query_one("select $1::int", &[&i]).await.unwrap().get(0);
        let y: i32 = b
            .query_one("select $1::int + 1000", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!((x, y), (i, i + 1000));
    }
    // A transaction on one worker holds the only connection; the other worker's client
    // waits for it and then gets it, with nothing of the first transaction left on it.
    b.batch_execute("begin; set local application_name = 'held by b'")
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        a.query_one("select current_setting('application_name')", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "a waits while b's transaction runs");
    b.batch_execute("commit").await.unwrap();
    assert_ne!(waiting.await.unwrap(), "held by b");

    let pools = weir.shared().pools.all();
    let pool = &pools[0];
    let s = pool.pool.snapshot();
    assert_eq!(s.created, 1, "one server connection served both workers");
    let moves = pool.metrics.server_moves.load(Relaxed);
    assert!(
        moves >= 40,
        "the connection moved between the workers at checkouts: {moves} moves"
    );
    drop(b);
    weir.stop();
    workers.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_from_many_clients_on_two_workers_stay_whole() {
    let (db, weir, workers) = two_workers("workers_many", 3).await;
    let url = weir_url(&weir, SCRAM_USER, &db);
    let setup = connect(&url).await.unwrap();
    setup
        .batch_execute(
            "create table counters (id int primary key, n int not null);
             insert into counters select g, 0 from generate_series(0, 7) g",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for id in 0..8i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            for _ in 0..50 {
                // Read, then write what was read plus one, in one transaction: if any
                // statement landed on another server connection, or another client's
                // statement landed inside it, counts would go missing.
                c.batch_execute("begin").await.unwrap();
                let n: i32 = c
                    .query_one("select n from counters where id = $1 for update", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                c.execute("update counters set n = $2 where id = $1", &[&id, &(n + 1)])
                    .await
                    .unwrap();
                c.batch_execute("commit").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: i64 = setup
        .query_one("select sum(n) from counters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 8 * 50);
    let s = weir.shared().pools.all()[0].pool.snapshot();
    assert!(
        s.created <= 3,
        "{} server connections for a pool of 3",
        s.created
    );
    drop(setup);
    weir.stop();
    workers.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stay_end_up_spread_evenly_over_the_workers() {
    let (db, weir, workers) = two_workers("workers_even", 4).await;
    let url = weir_url(&weir, SCRAM_USER, &db);
    let counts = &weir.shared().clients;
    let mut clients = Vec::new();
    // Connecting, worker 0 keeps each client until it serves 16 more than worker 1.
    for n in 1..=100usize {
        clients.push(connect(&url).await.unwrap());
        let (a, b) = (counts.on_worker(0), counts.on_worker(1));
        assert_eq!(a + b, n, "every logged-in client is counted on one worker");
        assert!(
            a >= b && a - b <= 16,
            "after {n} clients: {a} on worker 0, {b} on worker 1"
        );
    }
    let b0 = counts.on_worker(1);
    assert!(
        counts.on_worker(0) - counts.on_worker(1) >= 10,
        "the connecting clients started mostly on worker 0: {} and {}",
        counts.on_worker(0),
        counts.on_worker(1)
    );
    // Running transactions, the clients on the busier worker move until the two are within
    // one of each other, and every transaction still gets its own answer.
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let stmt = c
                .prepare("select $1::int8 * 1000 + $2::int8")
                .await
                .unwrap();
            for j in 0..12i64 {
                let got: i64 = c.query_one(&stmt, &[&(i as i64), &j]).await.unwrap().get(0);
                assert_eq!(got, i as i64 * 1000 + j);
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let (a, b) = (counts.on_worker(0), counts.on_worker(1));
    assert_eq!(a + b, 100);
    let moved = weir.shared().pools.all()[0]
        .metrics
        .client_moves
        .load(Relaxed);
    assert_eq!(
        moved as usize,
        b - b0,
        "every move went from worker 0 to worker 1, and each counted once"
    );
    assert!(
        a.abs_diff(b) <= 1,
        "after 12 transactions each: {a} on worker 0, {b} on worker 1"
    );
    drop(clients);
    // Each slot is given back from the count of the worker that served its client last:
    // both counts return to zero.
    eventually(
        "both workers' counts back to zero",
        std::time::Duration::from_secs(10),
        || counts.on_worker(0) == 0 && counts.on_worker(1) == 0,
    )
    .await;
    weir.stop();
    workers.stop();
}

/// Runs `select 1` on `mover` until it has moved to worker 1: it and one other, idle, client
/// were on worker 0, none on worker 1. Only the mover's session runs, so only it looks at the
/// counts and moves; the other stays.
async fn until_one_moves(
    mover: &tokio_postgres::Client,
    counts: &weir_proxy::limits::ClientCounts,
) {
    assert_eq!(counts.on_worker(0) + counts.on_worker(1), 2);
    let mut i = 0;
    while counts.on_worker(1) == 0 {
        i += 1;
        assert!(i <= 20, "no move after {i} transactions");
        mover.simple_query("select 1").await.unwrap();
    }
    // The slot is counted on worker 1 before it leaves worker 0's count.
    eventually(
        "the mover counted on worker 1 only",
        std::time::Duration::from_secs(5),
        || (counts.on_worker(0), counts.on_worker(1)) == (1, 1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_moves_keeps_its_statements_timeouts_and_signals() {
    let (db, weir, workers) = two_workers_with("workers_move", 2, PoolMode::Transaction, |c| {
        c.pool.client_idle_timeout = Some(std::time::Duration::from_millis(2000));
    })
    .await;
    let url = weir_url(&weir, SCRAM_USER, &db);
    let counts = &weir.shared().clients;
    let (mover, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let mover_ended = tokio::spawn(conn);
    let _stayer = connect(&url).await.unwrap();
    let stmt = mover.prepare("select $1::int + 1").await.unwrap();
    until_one_moves(&mover, counts).await;
    // The statement prepared on worker 0 runs on worker 1, and so do new ones.
    for j in 0..5 {
        let got: i32 = mover.query_one(&stmt, &[&j]).await.unwrap().get(0);
        assert_eq!(got, j + 1);
    }
    let got: String = mover
        .query_one("select $1::text || 'b'", &[&"a"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, "ab");
    // The idle timeout still ends it, from worker 1's timer.
    let since = std::time::Instant::now();
    let e = tokio::time::timeout(std::time::Duration::from_secs(6), mover_ended)
        .await
        .expect("the moved idle client was timed out")
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "57P05", "{e}");
    assert!(since.elapsed() >= std::time::Duration::from_millis(1600));
    eventually(
        "both timed-out clients no longer counted",
        std::time::Duration::from_secs(5),
        || counts.total() == 0,
    )
    .await;

    // KILL wakes a moved session that waits for its client: its signal word wakes the new
    // task, which has waited there since its last query. (The stayer has been idle long
    // enough to be timed out too by now: two fresh clients.)
    let _stayer = connect(&url).await.unwrap();
    let (mover, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let mover_ended = tokio::spawn(conn);
    until_one_moves(&mover, counts).await;
    mover.simple_query("select 2").await.unwrap();
    weir.shared()
        .clients_registry
        .raise(weir_proxy::metrics::signal::KILL, |c| *c.database == *db);
    let e = tokio::time::timeout(std::time::Duration::from_secs(1), mover_ended)
        .await
        .expect("KILL ended the moved idle session at once")
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "57P01", "{e}");
    weir.stop();
    workers.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_client_moves_with_its_server_connection() {
    let (db, weir, workers) =
        two_workers_with("workers_session", 4, PoolMode::Session, |_| {}).await;
    let url = weir_url(&weir, SCRAM_USER, &db);
    let counts = &weir.shared().clients;
    let mover = connect(&url).await.unwrap();
    let _stayer = connect(&url).await.unwrap();
    let backend: i32 = mover
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    mover
        .batch_execute("set application_name = 'kept'; create temp table t (x int)")
        .await
        .unwrap();
    until_one_moves(&mover, counts).await;
    // The same backend, with the session's settings and temporary table, serves it on
    // worker 1: its server connection moved with it.
    let row = mover
        .query_one(
            "select pg_backend_pid(), current_setting('application_name'), \
             (select count(*) from t)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), backend);
    assert_eq!(row.get::<_, String>(1), "kept");
    assert_eq!(row.get::<_, i64>(2), 0);
    mover
        .execute("insert into t values (1)", &[])
        .await
        .unwrap();
    let n: i64 = mover
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    weir.stop();
    workers.stop();
}
