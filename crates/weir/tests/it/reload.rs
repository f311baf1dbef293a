//! Change without downtime, through the `weir` binary against the real PostgreSQL: hot
//! reload by SIGHUP and `weir reload`, rejected reloads, rollback, live resize, and the
//! graceful shutdown on SIGTERM.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn config_path(db: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-reload-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{db}.toml"))
}

/// A transaction-mode config for `db` with `size` server connections.
fn config(pg: &PgServer, db: &str, size: u32, extra: &str) -> String {
    format!(
        "[pool]\nmode = \"transaction\"\nsize = {size}\nquery_wait_timeout = \"30s\"\n{extra}\n\
         [databases.app]\nurl = \"{}\"\n[admin]\nusers = [\"{}\"]\n",
        pg.url(SCRAM_USER, db),
        SCRAM_USER.user
    )
}

/// `weir reload` (with `extra` args) against a running Weir: (exit code, stdout + stderr).
fn weir_reload(admin: std::net::SocketAddr, extra: &[&str]) -> (i32, String) {
    let admin = admin.to_string();
    weir_cli(
        &[&["reload", "--admin", admin.as_str()], extra].concat(),
        &[],
    )
}

/// Polls the server until the pool's backends number `want`; returns how long it took.
fn converge(pg: &PgServer, db: &str, want: usize, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let n = pg.backends(db, Some(SCRAM_USER.user));
        if n == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "pool did not converge to {want} server connections within {limit:?} (now {n})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(weir: &WeirProcess, sig: libc::c_int) {
    // SAFETY: kill(2) with our own child's pid.
    assert_eq!(
        unsafe { libc::kill(weir.child.id() as libc::pid_t, sig) },
        0
    );
}

/// The pool's configured size as /health/pool reports it.
async fn pool_size(admin: std::net::SocketAddr) -> u64 {
    let (status, _, body) = http_get(admin, "/health/pool", None).await;
    assert_eq!(status, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    j["pools"][0]["metrics"]["pool_size"].as_u64().unwrap()
}

/// A small HTTP/1.1 POST: (status, body).
async fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: weir\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn reloads_resize_the_pool_under_pgbench_with_no_client_errors() {
    let pg = PgServer::shared();
    let db = unique_db("reload");
    pg.create_database(&db);
    let path = config_path(&db);
    write(&path, &config(pg, &db, 20, ""));
    let weir = WeirProcess::with_config(&path, &["--workers", "2"], &[]);
    let admin = weir.admin_addr();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", weir.port).parse().unwrap();

    // 100 clients of 10 ms transactions keep every server connection of the pool busy.
    let bench = std::thread::spawn({
        move || {
            pgbench_script(
                PgServer::shared(),
                addr,
                "app",
                SCRAM_USER,
                "SELECT pg_sleep(0.01);",
                &["-c", "100", "-j", "2", "-T", "16"],
            )
        }
    });
    let first = converge(pg, &db, 20, Duration::from_secs(10));

    write(&path, &config(pg, &db, 50, ""));
    let t = Instant::now();
    signal(&weir, libc::SIGHUP);
    let grow = converge(pg, &db, 50, Duration::from_secs(10));
    let grow_total = t.elapsed();

    write(&path, &config(pg, &db, 10, ""));
    let t = Instant::now();
    let (code, out) = weir_reload(admin, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("size 50 -> 10"), "{out}");
    let shrink = converge(pg, &db, 10, Duration::from_secs(10));
    let shrink_total = t.elapsed();

    let processed = bench.join().expect("pgbench reported no failed client");
    assert!(processed > 1000, "{processed} transactions");
    // Once the load is gone the pool stays at its new size, not above it.
    assert!(pg.backends(&db, Some(SCRAM_USER.user)) <= 10);
    eprintln!(
        "reload figures: 20 reached in {first:?}; 20 -> 50 converged {grow:?} after the poll began \
         ({grow_total:?} after SIGHUP); 50 -> 10 converged {shrink:?} ({shrink_total:?} after `weir reload` started); \
         {processed} transactions, 0 failed"
    );
    assert!(
        weir.log()
            .contains("reload: pool app/scram_user: size 20 -> 50"),
        "{}",
        weir.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_is_rejected_and_rollback_and_live_resize_work() {
    let pg = PgServer::shared();
    let db = unique_db("badreload");
    pg.create_database(&db);
    let path = config_path(&db);
    write(&path, &config(pg, &db, 4, ""));
    let weir = WeirProcess::with_config(&path, &[], &[]);
    let admin = weir.admin_addr();
    let url = weir.url(SCRAM_USER, "app");

    // Traffic that must not notice any of what follows.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, done, url) = (stop.clone(), done.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let c = connect(&url).await.expect("connect through weir");
            while !stop.load(Ordering::Relaxed) {
                let tx = c
                    .simple_query("BEGIN; SELECT pg_sleep(0.002); COMMIT")
                    .await;
                tx.map_err(|e| format!("{e} {}", code(&e)))?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool_size(admin).await, 4);

    // A bad value and a typo: rejected, every problem named, the old config serving on.
    write(
        &path,
        &config(pg, &db, 4, "min_size = \"lots\"\nquery_timout = \"5s\"")
            .replace("size = 4", "size = 0"),
    );
    let before = done.load(Ordering::Relaxed);
    let (code, out) = weir_reload(admin, &[]);
    assert_eq!(code, 1, "{out}");
    for want in [
        "rejected",
        "pool.size",
        "pool.min_size",
        "pool.query_timout",
        "did you mean",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    // SIGHUP with the same file: rejected too, logged.
    signal(&weir, libc::SIGHUP);
    eventually(
        "the SIGHUP reload is logged as rejected",
        Duration::from_secs(5),
        || weir.log().contains("SIGHUP reload rejected"),
    )
    .await;
    assert_eq!(pool_size(admin).await, 4, "the old config serves on");
    eventually("transactions kept flowing", Duration::from_secs(2), || {
        done.load(Ordering::Relaxed) > before + 50
    })
    .await;

    // A good reload, then rollback to the earlier size.
    write(&path, &config(pg, &db, 6, ""));
    let (code, out) = weir_reload(admin, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(pool_size(admin).await, 6);
    let (code, out) = weir_reload(admin, &["--rollback"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("size 6 -> 4"), "{out}");
    assert_eq!(pool_size(admin).await, 4);
    let _ = tokio::task::spawn_blocking({
        let db = db.clone();
        move || converge(PgServer::shared(), &db, 4, Duration::from_secs(10))
    })
    .await;

    // Live resize over HTTP, then with the console's SET; the next reload restores the file.
    let (status, body) = http_post(admin, "/api/pools/app/scram_user/size", "{\"size\": 2}").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(pool_size(admin).await, 2);
    let (status, body) = http_post(admin, "/api/pools/app/nobody/size", "{\"size\": 2}").await;
    assert_eq!(status, 404, "{body}");
    let console = weir.url(SCRAM_USER, "weir");
    let out = Command::new(pg.bindir.join("psql"))
        .args([
            console.as_str(),
            "-c",
            "SET pool_size = 3 FOR app/scram_user",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pool_size(admin).await, 3);
    let (code, out) = weir_reload(admin, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(pool_size(admin).await, 6);

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap().expect("no client saw an error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_transactions_finish_and_refuses_new_clients() {
    let pg = PgServer::shared();
    let db = unique_db("drain");
    pg.create_database(&db);
    let d = direct(&db).await;
    d.batch_execute(&format!(
        "CREATE TABLE t (client int, seq int, part int); GRANT ALL ON t TO {}",
        SCRAM_USER.user
    ))
    .await
    .unwrap();
    let path = config_path(&db);
    let timeout = Duration::from_secs(10);
    write(
        &path,
        &config(pg, &db, 8, "").replace("[pool]", "[proxy]\nshutdown_timeout = \"10s\"\n[pool]"),
    );
    let mut weir = WeirProcess::with_config(&path, &[], &[]);
    let url = weir.url(SCRAM_USER, "app");

    // Writers: each transaction writes two rows with a pause between, so most are in flight
    // when the signal comes. A writer stops at its first error.
    let signalled: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let mut writers = Vec::new();
    for client in 0..16 {
        let (url, signalled) = (url.clone(), signalled.clone());
        writers.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            let (mut acked, mut after_signal) = (Vec::new(), 0);
            for seq in 0.. {
                let sql = format!(
                    "BEGIN; INSERT INTO t VALUES ({client}, {seq}, 1); SELECT pg_sleep(0.05); \
                     INSERT INTO t VALUES ({client}, {seq}, 2); COMMIT"
                );
                match c.simple_query(&sql).await {
                    Ok(_) => {
                        acked.push(seq);
                        if signalled.lock().unwrap().is_some() {
                            after_signal += 1;
                        }
                    }
                    Err(e) => return (client, acked, after_signal, code(&e), c.is_closed()),
                }
            }
            unreachable!()
        }));
    }
    // Idle clients: told with an error, not dropped silently.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect(&url).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let t = Instant::now();
    *signalled.lock().unwrap() = Some(t);
    signal(&weir, libc::SIGTERM);
    eventually(
        "new connections are refused after SIGTERM",
        Duration::from_secs(1),
        || std::net::TcpStream::connect(("127.0.0.1", weir.port)).is_err(),
    )
    .await;

    let mut after = 0;
    for w in writers {
        let (client, acked, after_signal, code, closed) = w.await.unwrap();
        assert!(
            !acked.is_empty(),
            "writer {client} committed nothing: {code}"
        );
        assert!(
            code == "57P01" || closed,
            "writer {client} ended with {code} (closed: {closed})"
        );
        after += after_signal;
        // Every transaction whose COMMIT was acknowledged is in the database, whole.
        let rows = d
            .query_one(
                "SELECT count(DISTINCT seq), count(*) FROM t WHERE client = $1 AND seq = ANY($2)",
                &[&client, &acked],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.get::<_, i64>(0) as usize,
            acked.len(),
            "writer {client}"
        );
        assert_eq!(
            rows.get::<_, i64>(1) as usize,
            2 * acked.len(),
            "writer {client}"
        );
    }
    assert!(
        after > 0,
        "no transaction in flight at the signal was let finish"
    );
    // No half-finished transaction anywhere.
    let halves: i64 = d
        .query_one(
            "SELECT count(*) FROM (SELECT client, seq FROM t GROUP BY 1, 2 HAVING count(*) <> 2) h",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(halves, 0);
    for c in &idle {
        let e = c
            .simple_query("SELECT 1")
            .await
            .expect_err("an idle client was told");
        assert!(c.is_closed(), "{e}");
    }

    // Exit 0, well within shutdown_timeout.
    let status = loop {
        if let Some(s) = weir.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < timeout + Duration::from_secs(2),
            "weir still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}\n{}", weir.log());
    eprintln!(
        "drain figures: exited {:?} after SIGTERM; {after} transactions in flight at the signal committed",
        t.elapsed()
    );
    assert!(
        weir.log().contains("every client has left"),
        "{}",
        weir.log()
    );
    // Weir's server connections are gone too (their backends may take a moment to exit).
    eventually(
        "no server connection outlives weir",
        Duration::from_secs(5),
        || pg.backends(&db, Some(SCRAM_USER.user)) == 0,
    )
    .await;
}
