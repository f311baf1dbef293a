//! Pools that heal and hold: restarts, outages, lifetimes, limits and timeouts against a real
//! PostgreSQL (a dedicated one where the test stops or restarts it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;
use weir_pool::CloseReason;

use crate::common::*;

/// A PostgreSQL of the test's own (to stop and restart) with Weir in front.
struct Dedicated {
    pg: Arc<PgServer>,
    db: String,
    weir: weir_proxy::ProxyHandle,
}

impl Dedicated {
    async fn new(pool_size: u32, tweak: impl FnOnce(&mut Config)) -> Dedicated {
        let pg = Arc::new(tokio::task::spawn_blocking(PgServer::start).await.unwrap());
        let db = "app".to_string();
        let p2 = pg.clone();
        tokio::task::spawn_blocking(move || p2.create_database("app"))
            .await
            .unwrap();
        let mut config = weir_config(&pg, &db, pool_size, PoolMode::Transaction);
        tweak(&mut config);
        let weir = start_weir(config).await;
        Dedicated { pg, db, weir }
    }

    fn url(&self) -> String {
        weir_url(&self.weir, SCRAM_USER, &self.db)
    }

    async fn stop(&self, mode: &'static str) {
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.stop(mode))
            .await
            .unwrap();
    }

    /// Starts the server again; returns when it accepts connections.
    async fn start(&self) -> Instant {
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again())
            .await
            .unwrap();
        Instant::now()
    }

    fn pool(&self) -> Arc<weir_proxy::pools::ServerPool> {
        self.weir
            .shared()
            .pools
            .all()
            .into_iter()
            .next()
            .expect("a pool exists")
    }
}

fn first_value(rows: &[SimpleQueryMessage]) -> String {
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

fn error_kind(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None if e.is_closed() => "closed".into(),
        None => format!("other: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_only_cuts_transactions_in_flight() {
    let d = Dedicated::new(10, |c| {
        c.pool.query_wait_timeout = Some(Duration::from_secs(30))
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let successes = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (url, stop, errors, successes) =
            (d.url(), stop.clone(), errors.clone(), successes.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    client.simple_query("begin").await?;
                    client.simple_query("select pg_sleep(0.005)").await?;
                    client.simple_query("commit").await
                }
                .await;
                match r {
                    Ok(_) => successes.lock().unwrap().push(Instant::now()),
                    Err(e) => {
                        errors.lock().unwrap().push(error_kind(&e));
                        // The session was cut: a driver's retry logic reconnects.
                        client = loop {
                            match connect(&url).await {
                                Ok(c) => break c,
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        };
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 50 clients on 10 server connections: at most 10 transactions are inside the server
    // when it stops, so at most 10 clients may see an error; the 40 queued must not.
    let in_flight = d.pool().pool.snapshot().max_size;
    assert_eq!(in_flight, 10);
    d.stop("fast").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = d.start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let resumed = successes
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t > ready)
        .min()
        .copied()
        .expect("service resumed");
    let resume_after = resumed - ready;
    eprintln!(
        "restart: {} errors {:?} from {} server connections, service resumed {:?} after the server accepted connections",
        errors.len(),
        errors,
        in_flight,
        resume_after
    );
    for e in &errors {
        assert!(
            matches!(e.as_str(), "57P01" | "08006" | "closed"),
            "unexpected error {e}"
        );
    }
    assert!(
        errors.len() <= in_flight,
        "{} errors, but at most {in_flight} clients were inside a transaction",
        errors.len()
    );
    assert!(
        resume_after < Duration::from_secs(1),
        "service resumed after {resume_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_ride_out_an_outage_within_query_wait_timeout() {
    let d = Dedicated::new(4, |c| {
        c.pool.query_wait_timeout = Some(Duration::from_secs(10))
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = connect(&d.url()).await.unwrap();
        c.simple_query("select 1").await.unwrap();
        clients.push(c);
    }
    d.stop("fast").await;
    let started = Instant::now();
    let waits: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move { c.simple_query("select 42").await.map(|r| first_value(&r)) })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    d.start().await;
    for w in waits {
        assert_eq!(
            w.await
                .unwrap()
                .expect("a waiting query completes once the server is back"),
            "42"
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(5));
    let s = d.pool().pool.snapshot();
    assert!(s.retries > 0, "connects were retried: {s:?}");

    // With a wait shorter than the outage, the documented error at about the timeout.
    let d2 = Dedicated::new(2, |c| {
        c.pool.query_wait_timeout = Some(Duration::from_secs(2))
    })
    .await;
    let c = connect(&d2.url()).await.unwrap();
    c.simple_query("select 1").await.unwrap();
    d2.stop("fast").await;
    let t = Instant::now();
    let e = c.simple_query("select 1").await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(code(&e), "08001");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("unreachable since"), "{msg}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "error after {took:?}"
    );
    d2.start().await;
    assert_eq!(
        first_value(&c.simple_query("select 7").await.unwrap()),
        "7",
        "the same client carries on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_connect_is_retried_stops_the_retries() {
    let d = Dedicated::new(2, |c| {
        c.pool.query_wait_timeout = Some(Duration::from_secs(30))
    })
    .await;
    let (c, conn) = connect_killable(&d.url()).await;
    c.simple_query("select 1").await.unwrap();
    d.stop("fast").await;
    // Its next query needs a new server connection: Weir retries the connect with backoff.
    let query = tokio::spawn(async move { c.simple_query("select 1").await.map(|_| ()) });
    let pool = d.pool();
    let t = Instant::now();
    while pool.pool.snapshot().retries == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no connect retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client goes away mid-wait: its session ends at once, not at query_wait_timeout.
    conn.abort();
    let _ = query.await;
    let clients = &d.weir.shared().clients;
    let t = Instant::now();
    while clients.total() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the session outlived its client by {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And nobody retries on its behalf any more.
    let retries = pool.pool.snapshot().retries;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = pool.pool.snapshot();
    assert_eq!(
        s.retries, retries,
        "connects retried for a client that left: {s:?}"
    );
    d.start().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_connections_spread_out_without_errors() {
    let s = Setup::with_config("lifetime", |pg, db| {
        let mut c = weir_config(pg, db, 3, PoolMode::Transaction);
        c.pool.server_lifetime = Some(Duration::from_secs(2));
        c
    })
    .await;
    let seen = Arc::new(std::sync::Mutex::new(HashMap::<String, Instant>::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (url, seen) = (s.url(SCRAM_USER), seen.clone());
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            while start.elapsed() < Duration::from_secs(8) {
                let pid = first_value(
                    &c.simple_query("select pg_backend_pid()")
                        .await
                        .expect("no client error"),
                );
                seen.lock().unwrap().entry(pid).or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let mut firsts: Vec<Duration> = seen.values().map(|t| *t - start).collect();
    firsts.sort();
    let replacements: Vec<Duration> = firsts
        .iter()
        .copied()
        .filter(|d| *d > Duration::from_millis(1500))
        .collect();
    eprintln!(
        "lifetime 2s: {} backends seen; replacements first seen at {replacements:?}",
        seen.len()
    );
    assert!(
        seen.len() >= 6,
        "connections were replaced: {} backends",
        seen.len()
    );
    let span = *replacements.last().unwrap() - replacements[0];
    assert!(
        span > Duration::from_millis(500),
        "replacements spread out, not all at once: {replacements:?}"
    );
    let pool = s.weir.shared().pools.all().pop().unwrap();
    assert!(pool.pool.stats().closed(CloseReason::Lifetime) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_max_uses_bounds_transactions_per_connection() {
    let s = Setup::with_config("maxuses", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.server_max_uses = Some(5);
        c
    })
    .await;
    let c = s.client().await;
    let mut per_pid: HashMap<String, usize> = HashMap::new();
    for _ in 0..23 {
        *per_pid
            .entry(first_value(
                &c.simple_query("select pg_backend_pid()").await.unwrap(),
            ))
            .or_default() += 1;
    }
    assert!(per_pid.values().all(|n| *n <= 5), "{per_pid:?}");
    assert!(per_pid.len() >= 5, "{per_pid:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_is_kept_after_start_and_after_idle_timeouts() {
    let s = Setup::with_config("minpool", |pg, db| {
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[pool]\nsize = 10\nmin_size = 3\nserver_idle_timeout = \"1s\"\n\
             [databases.{db}]\nurl = \"postgres://{}:{}@127.0.0.1:{}/{db}\"\n",
            SCRAM_USER.user, SCRAM_USER.password, pg.port
        );
        weir_config::from_toml_str(&text, None).unwrap().0
    })
    .await;
    let wait_for = |want: usize| {
        let s = &s;
        async move {
            let t = Instant::now();
            loop {
                let n = s.backends();
                if n == want {
                    return t.elapsed();
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "expected {want} server connections, have {n}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(3).await;
    // Load opens more (eight clients each holding a transaction open)...
    let mut busy = Vec::new();
    for _ in 0..8 {
        let c = s.client().await;
        c.batch_execute("begin; select 1").await.unwrap();
        busy.push(c);
    }
    assert!(s.backends() >= 8);
    for c in &busy {
        c.batch_execute("commit").await.unwrap();
    }
    drop(busy);
    // ...which idle out down to min_size, not below.
    wait_for(3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.backends(), 3, "min_size stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_and_the_connection_serves_on() {
    let s = Setup::with_config("qtimeout", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.query_timeout = Some(Duration::from_millis(500));
        c
    })
    .await;
    let a = s.client().await;
    let pid_before = first_value(&a.simple_query("select pg_backend_pid()").await.unwrap());
    let t = Instant::now();
    let e = a.simple_query("select pg_sleep(5)").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancelled after {:?}",
        t.elapsed()
    );
    assert_eq!(code(&e), "57014");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("query_timeout") && msg.contains("500ms"),
        "{msg}"
    );
    let b = s.client().await;
    assert_eq!(
        first_value(&b.simple_query("select pg_backend_pid()").await.unwrap()),
        pid_before,
        "same connection"
    );
    assert_eq!(first_value(&b.simple_query("select 5").await.unwrap()), "5");
    assert_eq!(
        first_value(&a.simple_query("select 6").await.unwrap()),
        "6",
        "the cancelled client carries on"
    );
}

/// A statement streaming rows is cancelled at query_timeout too. Its replies arrive in reads
/// that end inside a message, and the clock restarted at each of them, so before 2026-12-02
/// such a statement ran to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_a_statement_streaming_rows() {
    let s = Setup::with_config("qtimeout_stream", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.query_timeout = Some(Duration::from_millis(500));
        c
    })
    .await;
    let a = s.client().await;
    let t = Instant::now();
    let stream = a
        .query_raw(
            // In the select list, so the rows stream: in FROM the series is built whole first.
            "select repeat('x', 100), generate_series(1, 1000000000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut rows = 0u64;
    let e = loop {
        match futures_util::TryStreamExt::try_next(&mut stream).await {
            Ok(Some(_)) => rows += 1,
            Ok(None) => panic!("the statement ran to its end"),
            Err(e) => break e,
        }
    };
    assert_eq!(code(&e), "57014", "{e}");
    assert!(rows > 0, "no row came before the cancel");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cancelled after {:?} and {rows} rows",
        t.elapsed()
    );
    assert_eq!(first_value(&a.simple_query("select 7").await.unwrap()), "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limits_refuse_at_once() {
    let s = Setup::with_config("maxclients", |pg, db| {
        let mut c = weir_config(pg, db, 2, PoolMode::Transaction);
        c.proxy.max_client_conn = 3;
        c
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(s.client().await);
    }
    let t = Instant::now();
    let e = connect(&s.url(SCRAM_USER)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(code(&e), "53300");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("max_client_conn")
    );
    drop(held.pop());
    // Room again once Weir has seen that client leave.
    let url = s.url(SCRAM_USER);
    let mut again = None;
    let start = Instant::now();
    while again.is_none() {
        match connect(&url).await {
            Ok(c) => again = Some(c),
            Err(e) => {
                assert_eq!(code(&e), "53300", "{e}");
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "no room after 5 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_caps_two_users_pools() {
    let s = Setup::with_config("maxdb", |pg, db| {
        let mut c = weir_config(pg, db, 5, PoolMode::Transaction);
        c.databases.get_mut(db).unwrap().pool.max_db_connections = Some(3);
        c
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for login in [SCRAM_USER, MD5_USER] {
        for _ in 0..5 {
            let (url, stop, done) = (s.url(login), stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let c = connect(&url).await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    c.simple_query("select pg_sleep(0.05)").await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let (mut max_open, mut over) = (0, 0);
    let admin = direct("postgres").await;
    let by_user =
        "select usename::text, count(*) from pg_stat_activity where datname = $1 group by 1";
    let mut users_seen = std::collections::HashSet::new();
    for _ in 0..30 {
        // Weir's own count of open server connections to the database...
        let open: usize = (s.weir.shared().pools.all().iter())
            .filter(|p| p.database == s.db)
            .map(|p| p.pool.snapshot().size)
            .sum();
        max_open = max_open.max(open);
        // ...and PostgreSQL's, which may still list a backend that is exiting after Weir
        // closed it to make room for the other user's pool.
        let rows = admin.query(by_user, &[&s.db]).await.unwrap();
        let total: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
        over += usize::from(total > 3);
        users_seen.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        (1..=3).contains(&max_open),
        "{max_open} server connections for a cap of 3"
    );
    assert!(
        over <= 3,
        "PostgreSQL saw more than 3 backends in {over} of 30 samples"
    );
    assert!(
        users_seen.contains(SCRAM_USER.user) && users_seen.contains(MD5_USER.user),
        "both pools served"
    );
    assert!(done.load(Ordering::Relaxed) > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeouts_end_sessions_with_their_codes() {
    let s = Setup::with_config("idletimeouts", |pg, db| {
        let mut c = weir_config(pg, db, 2, PoolMode::Transaction);
        c.pool.idle_transaction_timeout = Some(Duration::from_millis(300));
        c.pool.client_idle_timeout = Some(Duration::from_millis(600));
        c
    })
    .await;
    // Idle inside a transaction: the session ends with 25P03 and the transaction is rolled back.
    let (a, conn) = tokio_postgres::connect(&s.url(SCRAM_USER), tokio_postgres::NoTls)
        .await
        .unwrap();
    let ended = tokio::spawn(conn);
    a.batch_execute("begin; create temp table t (x int)")
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(3), ended)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "25P03", "{e}");
    // Idle outside a transaction: 57P05.
    let (b, conn) = tokio_postgres::connect(&s.url(SCRAM_USER), tokio_postgres::NoTls)
        .await
        .unwrap();
    let ended = tokio::spawn(conn);
    b.simple_query("select 1").await.unwrap();
    let t = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(3), ended)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "57P05", "{e}");
    assert!(t.elapsed() >= Duration::from_millis(500));
    // A busy client is not idle.
    let c = s.client().await;
    c.simple_query("select pg_sleep(0.8)")
        .await
        .expect("a running query is not idleness");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_serves_a_client_that_waited() {
    let s = Setup::with_config("reserve", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.reserve_size = Some(1);
        c.pool.reserve_timeout = Some(Duration::from_millis(300));
        c
    })
    .await;
    let holder = s.client().await;
    holder.batch_execute("begin").await.unwrap();
    let b = s.client().await;
    let t = Instant::now();
    b.simple_query("select 1").await.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    let pool = s.weir.shared().pools.all().pop().unwrap();
    // Released (and so closed) just after the reply went out.
    eventually(
        "the reserve connection closed when it came back over size",
        Duration::from_secs(5),
        || pool.pool.snapshot().size == 1,
    )
    .await;
    assert_eq!(
        pool.pool.snapshot().created,
        2,
        "one pool connection plus one from the reserve"
    );
    assert_eq!(pool.pool.stats().closed(CloseReason::Shrink), 1);
    holder.batch_execute("commit").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_replaces_connections_unseen() {
    let s = Setup::with_config("healthcheck", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.server_check_delay = Some(Duration::ZERO);
        c.pool.server_check_query = Some("select 1/0".into());
        c
    })
    .await;
    let c = s.client().await;
    for i in 0..4 {
        assert_eq!(
            first_value(&c.simple_query(&format!("select {i}")).await.unwrap()),
            i.to_string()
        );
    }
    let pool = s.weir.shared().pools.all().pop().unwrap();
    assert!(pool.pool.stats().closed(CloseReason::CheckFailed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_times_each_statement_not_the_session() {
    use futures_util::SinkExt;
    let s = Setup::with_config("qtimeout2", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.query_timeout = Some(Duration::from_millis(500));
        c
    })
    .await;
    let c = s.client().await;
    c.simple_query("select 1").await.unwrap();
    // A pause longer than the timeout, then a statement shorter than it: not cancelled.
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.simple_query("select pg_sleep(0.2)")
        .await
        .expect("a short statement after a long pause runs");
    // And the timeout still works afterwards.
    assert_eq!(
        code(&c.simple_query("select pg_sleep(3)").await.unwrap_err()),
        "57014"
    );
    // Fast statements one after another for longer than the timeout, in one transaction.
    c.batch_execute("begin").await.unwrap();
    for _ in 0..8 {
        c.simple_query("select pg_sleep(0.1)")
            .await
            .expect("each statement is timed on its own");
    }
    c.batch_execute("commit").await.unwrap();
    // A COPY the client feeds slowly: the server waits on the client, which is not a slow statement.
    c.batch_execute("create temp table slow_copy (x int)")
        .await
        .unwrap_or(());
    s.sql("create table slow_copy (x int); grant all on slow_copy to public");
    let sink = c.copy_in("copy slow_copy from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..4 {
        sink.send(bytes::Bytes::from(format!("{i}\n")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        sink.finish().await.expect("a slow COPY is not cancelled"),
        4
    );
}
