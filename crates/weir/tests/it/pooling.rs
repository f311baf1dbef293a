//! Transaction pooling under load: pgbench through a pool smaller than its client count.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// Runs pgbench through Weir while sampling pg_stat_activity; returns (processed, failed,
/// max server connections seen).
async fn pgbench_through_weir(mode: &str) -> (u64, u64, usize) {
    let s = Setup::new(&format!("pgb_{mode}"), 10, PoolMode::Transaction).await;
    let pg = s.pg;
    let db = s.db.clone();
    // Initialise directly on the server: this is setup, not the subject.
    let init = pg.bindir.join("pgbench");
    let status = Command::new(&init)
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            pg.socket_dir.to_str().unwrap(),
            "-p",
            &pg.port.to_string(),
        ])
        .args(["-U", SUPERUSER.user, &db])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    s.sql("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC");

    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, max_seen, db) = (stop.clone(), max_seen.clone(), db.clone());
        tokio::spawn(async move {
            let admin = direct("postgres").await;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = admin
                    .query_one(
                        "select count(*) from pg_stat_activity where datname = $1 and usename = $2",
                        &[&db, &SCRAM_USER.user],
                    )
                    .await
                    .unwrap()
                    .get(0);
                max_seen.fetch_max(n as usize, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let a = s.weir.local_addr();
    let mut cmd = Command::new(&init);
    cmd.args(["-c", "100", "-j", "2", "-T", "15", "-M", mode, "-n"])
        .args([
            "-h",
            &a.ip().to_string(),
            "-p",
            &a.port().to_string(),
            "-U",
            SCRAM_USER.user,
            &db,
        ])
        .env("PGPASSWORD", SCRAM_USER.password);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench -M {mode} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in pgbench output:\n{stdout}"))
    };
    let processed = field("number of transactions actually processed:");
    let failed = field("number of failed transactions:");
    (processed, failed, max_seen.load(Ordering::Relaxed))
}

async fn check_pgbench(mode: &str) {
    let (processed, failed, max_seen) = pgbench_through_weir(mode).await;
    eprintln!(
        "pgbench -M {mode}: {processed} transactions, {failed} failed, at most {max_seen} server connections"
    );
    assert_eq!(failed, 0, "no failed transactions");
    assert!(processed > 1000, "pgbench made progress ({processed})");
    assert!(
        max_seen <= 10,
        "pool_size 10 exceeded: {max_seen} server connections"
    );
    assert!(max_seen >= 1, "the sampler saw the pool at work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_100_clients_pool_10() {
    check_pgbench("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_100_clients_pool_10() {
    check_pgbench("extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_100_clients_pool_10() {
    check_pgbench("prepared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_a_clear_error_after_query_wait_timeout() {
    let s = Setup::with_config("waitto", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.query_wait_timeout = Some(Duration::from_millis(500));
        c
    })
    .await;
    let holder = s.client().await;
    holder.batch_execute("begin; select 1").await.unwrap();
    let waiter = s.client().await;
    let start = Instant::now();
    let e = waiter.simple_query("select 1").await.unwrap_err();
    let waited = start.elapsed();
    assert_eq!(code(&e), "53300");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains(&s.db) && msg.contains("pool_size 1") && msg.contains("0.5s"),
        "message names pool and figures: {msg}"
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    // The same client may retry once the holder is done, with extended protocol too.
    holder.batch_execute("commit").await.unwrap();
    assert_eq!(
        waiter
            .query_one("select 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );
    // An extended-protocol batch that times out is answered and the client carries on.
    holder.batch_execute("begin").await.unwrap();
    let e = waiter.query("select $1::int", &[&1i32]).await.unwrap_err();
    assert_eq!(code(&e), "53300");
    holder.batch_execute("commit").await.unwrap();
    assert_eq!(
        waiter
            .query_one("select $1::int", &[&8i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_first_come_first_served() {
    let s = Setup::new("fifo", 1, PoolMode::Transaction).await;
    s.sql("create sequence turn; grant all on turn to public");
    let holder = s.client().await;
    holder.batch_execute("begin").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..5i64 {
        let c = s.client().await;
        // The server numbers the waiters in the order they got the connection. One round
        // trip each (simple protocol), so each waiter checks out exactly once.
        tasks.push(tokio::spawn(async move {
            let rows = c.simple_query("select nextval('turn')").await.unwrap();
            let turn: i64 = rows
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        r.get(0).map(|v| v.parse().unwrap())
                    }
                    _ => None,
                })
                .unwrap();
            (i, turn)
        }));
        // Each waiter queues before the next is started.
        let pool = s.weir.shared().pools.all().pop().unwrap();
        eventually("the waiter queued", Duration::from_secs(5), || {
            pool.pool.snapshot().waiting == i as usize + 1
        })
        .await;
    }
    holder.batch_execute("commit").await.unwrap();
    for t in tasks {
        let (i, turn) = t.await.unwrap();
        assert_eq!(turn, i + 1, "waiter {i} was served out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_few_servers() {
    let s = Setup::new("many", 3, PoolMode::Transaction).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = s.url(SCRAM_USER);
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            for j in 0..5 {
                let v: i32 = c
                    .query_one("select $1::int", &[&(i * 10 + j)])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, i * 10 + j);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(s.backends() <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_server_connection_is_replaced_unseen() {
    let s = Setup::new("terminated", 1, PoolMode::Transaction).await;
    let c = s.client().await;
    let admin = direct("postgres").await;
    for round in 0..3 {
        let pid: i32 = c
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        // The connection sits idle in Weir's pool; the server ends it.
        admin
            .execute("select pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        while admin
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let next: i32 = c
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: the client saw the dead connection: {e}"))
            .get(0);
        assert_ne!(next, pid, "a new server connection");
    }
}
