//! The admin surfaces: health, readiness, pool JSON, Prometheus metrics, the token, the
//! PgBouncer-compatible console, slow queries and the dashboard.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::protocol::{read_msg, startup_packet};

async fn pool_json(addr: std::net::SocketAddr, token: Option<&str>) -> Value {
    let (status, _, body) = http_get(addr, "/health/pool", token).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_health_agrees_with_postgres_and_flips_at_thresholds() {
    let s = Setup::with_config("adminpool", |pg, db| {
        let mut c = weir_config(pg, db, 10, PoolMode::Transaction);
        c.pool.utilisation_warning = Some(30);
        c.pool.utilisation_critical = Some(60);
        c
    })
    .await;
    let admin = start_admin(&s.weir).await;
    // Deterministic utilisation: clients holding open transactions each hold a connection.
    let mut holders = Vec::new();
    for (n, want) in [(2, "normal"), (4, "warning"), (7, "critical")] {
        while holders.len() < n {
            let c = s.client().await;
            c.batch_execute("begin").await.unwrap();
            holders.push(c);
        }
        let j = pool_json(admin.addr, None).await;
        let p = &j["pools"][0];
        assert_eq!(p["status"], want, "{n} of 10 in use: {p}");
        assert_eq!(p["metrics"]["active"], n);
        assert_eq!(
            p["utilisation"]["percent"].as_f64().unwrap(),
            n as f64 * 10.0
        );
        assert_eq!(j["status"], want);
    }
    drop(holders);

    // Under a pgbench run, Weir's figures and pg_stat_activity agree.
    let (pg, addr, db) = (s.pg, s.weir.local_addr(), s.db.clone());
    let bench = tokio::task::spawn_blocking(move || {
        pgbench_script(
            pg,
            addr,
            &db,
            SCRAM_USER,
            "select pg_sleep(0.002);",
            &["-c", "20", "-j", "2", "-T", "4"],
        )
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut agreed = 0;
    for _ in 0..20 {
        let j = pool_json(admin.addr, None).await;
        let m = &j["pools"][0]["metrics"];
        let (active, idle, total, size) = (
            m["active"].as_u64().unwrap(),
            m["idle"].as_u64().unwrap(),
            m["total"].as_u64().unwrap(),
            m["pool_size"].as_u64().unwrap(),
        );
        assert_eq!(active + idle, total);
        assert!(total <= size, "{total} > pool_size {size}");
        let backends = s.pg.backends(&s.db, Some(SCRAM_USER.user)) as u64;
        let again = pool_json(admin.addr, None).await["pools"][0]["metrics"]["total"]
            .as_u64()
            .unwrap();
        if backends == total && again == total {
            agreed += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bench.await.unwrap();
    assert!(
        agreed >= 15,
        "pg_stat_activity agreed with /health/pool in {agreed} of 20 samples"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_server() {
    let pg = std::sync::Arc::new(tokio::task::spawn_blocking(PgServer::start).await.unwrap());
    let p2 = pg.clone();
    tokio::task::spawn_blocking(move || p2.create_database("app"))
        .await
        .unwrap();
    let weir = start_weir(weir_config(&pg, "app", 2, PoolMode::Transaction)).await;
    let admin = start_admin(&weir).await;
    let c = connect(&weir_url(&weir, SCRAM_USER, "app")).await.unwrap();
    c.simple_query("select 1").await.unwrap();
    let wait_for = |want: u16| {
        let addr = admin.addr;
        async move {
            let t = Instant::now();
            loop {
                let (status, _, body) = http_get(addr, "/health/ready", None).await;
                if status == want {
                    return body;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "readiness stayed {status}: {body}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_for(200).await;
    let p2 = pg.clone();
    tokio::task::spawn_blocking(move || p2.stop("fast"))
        .await
        .unwrap();
    let body = wait_for(503).await;
    assert!(
        body.contains("\"ready\":false") && body.contains("app"),
        "{body}"
    );
    let p2 = pg.clone();
    tokio::task::spawn_blocking(move || p2.start_again())
        .await
        .unwrap();
    wait_for(200).await;
    assert_eq!(http_get(admin.addr, "/health/live", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_histograms_count_every_transaction() {
    let s = Setup::new("adminmetrics", 4, PoolMode::Transaction).await;
    let admin = start_admin(&s.weir).await;
    let (pg, addr, db) = (s.pg, s.weir.local_addr(), s.db.clone());
    let run = tokio::task::spawn_blocking(move || {
        pgbench_script(
            pg,
            addr,
            &db,
            SCRAM_USER,
            "select 1;",
            &["-c", "4", "-j", "2", "-t", "250"],
        )
    })
    .await
    .unwrap();
    assert_eq!(run, 1000);
    let (status, headers, body) = http_get(admin.addr, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.contains("openmetrics-text"))
    );
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let pool = |m: &prometheus_parse::Sample| m.labels.get("database") == Some(s.db.as_str());
    let histogram_count = |name: &str| -> u64 {
        let sample = scrape
            .samples
            .iter()
            .find(|m| m.metric == name && pool(m))
            .unwrap_or_else(|| panic!("no {name}"));
        match &sample.value {
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count as u64).max().unwrap()
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    };
    assert_eq!(
        histogram_count("weir_transaction_duration_seconds"),
        1000,
        "one per transaction pgbench ran"
    );
    assert_eq!(histogram_count("weir_query_duration_seconds"), 1000);
    assert!(histogram_count("weir_pool_wait_seconds") >= 1000);
    let gauge = |name: &str, state: &str| {
        scrape
            .samples
            .iter()
            .find(|m| m.metric == name && pool(m) && m.labels.get("state") == Some(state))
            .map(|m| match m.value {
                prometheus_parse::Value::Gauge(v) => v,
                _ => panic!("{name} is not a gauge"),
            })
    };
    assert!(gauge("weir_pool_server_connections", "idle").unwrap() >= 1.0);
    assert!(scrape.samples.iter().any(|m| m.metric == "weir_server_connects_total" || m.metric == "weir_server_connects"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_all_but_liveness_and_readiness() {
    let s = Setup::with_config("admintoken", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.admin.token = Some(weir_config::Secret::new("s3cret"));
        c
    })
    .await;
    let admin = start_admin(&s.weir).await;
    assert_eq!(http_get(admin.addr, "/health/live", None).await.0, 200);
    assert_ne!(http_get(admin.addr, "/health/ready", None).await.0, 401);
    for path in [
        "/health/pool",
        "/metrics",
        "/api/config",
        "/api/slow-queries",
        "/",
    ] {
        let (status, headers, _) = http_get(admin.addr, path, None).await;
        assert_eq!(status, 401, "{path} without a token");
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "www-authenticate" && v.starts_with("Bearer")),
            "{path}"
        );
        assert_eq!(
            http_get(admin.addr, path, Some("wrong")).await.0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            http_get(admin.addr, path, Some("s3cret")).await.0,
            200,
            "{path} with the token"
        );
    }
    let sep = if "/health/pool".contains('?') {
        '&'
    } else {
        '?'
    };
    assert_eq!(
        http_get(admin.addr, &format!("/health/pool{sep}token=s3cret"), None)
            .await
            .0,
        200,
        "token in the query"
    );
    // Secrets never show in the config view.
    let (_, _, config) = http_get(admin.addr, "/api/config", Some("s3cret")).await;
    assert!(
        !config.contains("s3cret") && !config.contains(SCRAM_USER.password),
        "{config}"
    );
    assert!(config.contains("<redacted>"));
}

/// PgBouncer 1.18's console columns (name, type OID), captured from `pgbouncer` 1.18.0.
const PGBOUNCER_COLUMNS: &[(&str, &[(&str, u32)])] = &[
    (
        "SHOW POOLS",
        &[
            ("database", 25),
            ("user", 25),
            ("cl_active", 23),
            ("cl_waiting", 23),
            ("cl_active_cancel_req", 23),
            ("cl_waiting_cancel_req", 23),
            ("sv_active", 23),
            ("sv_active_cancel", 23),
            ("sv_being_canceled", 23),
            ("sv_idle", 23),
            ("sv_used", 23),
            ("sv_tested", 23),
            ("sv_login", 23),
            ("maxwait", 23),
            ("maxwait_us", 23),
            ("pool_mode", 25),
        ],
    ),
    (
        "SHOW STATS",
        &[
            ("database", 25),
            ("total_xact_count", 1700),
            ("total_query_count", 1700),
            ("total_received", 1700),
            ("total_sent", 1700),
            ("total_xact_time", 1700),
            ("total_query_time", 1700),
            ("total_wait_time", 1700),
            ("avg_xact_count", 1700),
            ("avg_query_count", 1700),
            ("avg_recv", 1700),
            ("avg_sent", 1700),
            ("avg_xact_time", 1700),
            ("avg_query_time", 1700),
            ("avg_wait_time", 1700),
        ],
    ),
    (
        "SHOW CLIENTS",
        &[
            ("type", 25),
            ("user", 25),
            ("database", 25),
            ("state", 25),
            ("addr", 25),
            ("port", 23),
            ("local_addr", 25),
            ("local_port", 23),
            ("connect_time", 25),
            ("request_time", 25),
            ("wait", 23),
            ("wait_us", 23),
            ("close_needed", 23),
            ("ptr", 25),
            ("link", 25),
            ("remote_pid", 23),
            ("tls", 25),
            ("application_name", 25),
        ],
    ),
    (
        "SHOW SERVERS",
        &[
            ("type", 25),
            ("user", 25),
            ("database", 25),
            ("state", 25),
            ("addr", 25),
            ("port", 23),
            ("local_addr", 25),
            ("local_port", 23),
            ("connect_time", 25),
            ("request_time", 25),
            ("wait", 23),
            ("wait_us", 23),
            ("close_needed", 23),
            ("ptr", 25),
            ("link", 25),
            ("remote_pid", 23),
            ("tls", 25),
            ("application_name", 25),
        ],
    ),
    (
        "SHOW DATABASES",
        &[
            ("name", 25),
            ("host", 25),
            ("port", 23),
            ("database", 25),
            ("force_user", 25),
            ("pool_size", 23),
            ("min_pool_size", 23),
            ("reserve_pool", 23),
            ("pool_mode", 25),
            ("max_connections", 23),
            ("current_connections", 23),
            ("paused", 23),
            ("disabled", 23),
        ],
    ),
    (
        "SHOW CONFIG",
        &[
            ("key", 25),
            ("value", 25),
            ("default", 25),
            ("changeable", 25),
        ],
    ),
    ("SHOW LISTS", &[("list", 25), ("items", 23)]),
    ("SHOW VERSION", &[("version", 25)]),
    ("SHOW TOTALS", &[("name", 25), ("value", 1700)]),
];

/// Columns (name, type OID), rows, command tag.
type ConsoleReply = (Vec<(String, u32)>, Vec<Vec<Option<String>>>, String);

/// Logs in to the console over a raw socket and runs one command; returns the columns
/// (name, type OID), the rows and the command tag, or the error's SQLSTATE.
fn console(port: u16, db: &str, sql: &str) -> Result<ConsoleReply, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_packet(
        0,
        &[("user", TRUST_USER.user), ("database", db)],
    ))
    .unwrap();
    loop {
        let (t, body) = read_msg(&mut s).expect("login");
        if t == b'E' {
            return Err(weir_wire::ErrorResponse::decode(&body)
                .unwrap()
                .code
                .to_string());
        }
        if t == b'Z' {
            break;
        }
    }
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    s.write_all(&q).unwrap();
    let (mut cols, mut rows, mut tag, mut err) = (Vec::new(), Vec::new(), String::new(), None);
    loop {
        let (t, b) = read_msg(&mut s).expect("reply");
        match t {
            b'T' => {
                let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                let mut p = 2;
                for _ in 0..n {
                    let end = p + b[p..].iter().position(|c| *c == 0).unwrap();
                    let name = String::from_utf8(b[p..end].to_vec()).unwrap();
                    p = end + 1;
                    let oid = u32::from_be_bytes(b[p + 6..p + 10].try_into().unwrap());
                    p += 18;
                    cols.push((name, oid));
                }
            }
            b'D' => {
                let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                let mut p = 2;
                let mut row = Vec::new();
                for _ in 0..n {
                    let len = i32::from_be_bytes(b[p..p + 4].try_into().unwrap());
                    p += 4;
                    if len < 0 {
                        row.push(None);
                    } else {
                        row.push(Some(
                            String::from_utf8_lossy(&b[p..p + len as usize]).into_owned(),
                        ));
                        p += len as usize;
                    }
                }
                rows.push(row);
            }
            b'C' => tag = String::from_utf8_lossy(&b[..b.len() - 1]).into_owned(),
            b'E' => {
                err = Some(
                    weir_wire::ErrorResponse::decode(&b)
                        .unwrap()
                        .code
                        .to_string(),
                )
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink);
    match err {
        Some(e) => Err(e),
        None => Ok((cols, rows, tag)),
    }
}

async fn console_setup(prefix: &str) -> Setup {
    Setup::with_config(prefix, |pg, db| {
        let mut c = weir_config(pg, db, 2, PoolMode::Transaction);
        c.admin.users = vec![TRUST_USER.user.into()];
        c
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_answers_with_pgbouncers_columns() {
    let s = console_setup("console").await;
    let c = s.client().await;
    c.simple_query("select 1").await.unwrap();
    let port = s.weir.local_addr().port();
    tokio::task::spawn_blocking(move || {
        for db in ["pgbouncer", "weir"] {
            for (cmd, want) in PGBOUNCER_COLUMNS {
                let (cols, rows, tag) =
                    console(port, db, cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
                let want: Vec<(String, u32)> =
                    want.iter().map(|(n, o)| (n.to_string(), *o)).collect();
                assert_eq!(
                    cols, want,
                    "{cmd} on {db}: PgBouncer's columns, order and types"
                );
                assert_eq!(tag, "SHOW");
                assert!(rows.iter().all(|r| r.len() == want.len()));
                if *cmd == "SHOW POOLS" || *cmd == "SHOW SERVERS" || *cmd == "SHOW CLIENTS" {
                    assert!(!rows.is_empty(), "{cmd} has rows");
                }
            }
        }
        // Users not in admin.users are refused.
        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.write_all(&startup_packet(
            0,
            &[("user", "scram_user"), ("database", "pgbouncer")],
        ))
        .unwrap();
        let (t, body) = read_msg(&mut sock).unwrap();
        assert_eq!(t, b'E');
        assert_eq!(
            weir_wire::ErrorResponse::decode(&body)
                .unwrap()
                .code
                .to_string(),
            "28000"
        );
        assert_eq!(console(port, "weir", "SHOW NOTHING").unwrap_err(), "42601");
    })
    .await
    .unwrap();
    // psql against the console.
    let out = s
        .psql(TRUST_USER)
        .args(["-d", "pgbouncer", "-c", "SHOW POOLS"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cl_active"));
}

/// Both ends of a client's connection, as SHOW CLIENTS lists them, are the ones the client
/// sees: its own address and port, and the address and port it connected to, whether Weir
/// listens on that address or on the wildcard one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_clients_names_both_ends_of_each_client() {
    for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
        let s = Setup::with_config("clientends", |pg, db| {
            let mut c = weir_config(pg, db, 2, PoolMode::Transaction);
            c.admin.users = vec![TRUST_USER.user.into()];
            c.proxy.listen = vec![listen.parse().unwrap()];
            c
        })
        .await;
        let port = s.weir.local_addr().port();
        let db = s.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(&startup_packet(
                0,
                &[("user", TRUST_USER.user), ("database", &db)],
            ))
            .unwrap();
            while read_msg(&mut c).expect("login").0 != b'Z' {}
            // One query answered: the session is past its login, and so listed.
            c.write_all(b"Q\0\0\0\x0dselect 1\0").unwrap();
            while read_msg(&mut c).expect("reply").0 != b'Z' {}
            let mine = c.local_addr().unwrap();
            let (cols, rows, _) = console(port, "pgbouncer", "SHOW CLIENTS").unwrap();
            let col = |name: &str| cols.iter().position(|(n, _)| n == name).unwrap();
            let row = rows
                .iter()
                .find(|r| r[col("port")].as_deref() == Some(&mine.port().to_string()))
                .unwrap_or_else(|| panic!("{listen}: no client from {mine} in {rows:?}"));
            let field = |name: &str| row[col(name)].as_deref().unwrap_or("NULL");
            assert_eq!(field("database"), db, "{listen}");
            assert_eq!(field("addr"), "127.0.0.1", "{listen}");
            assert_eq!(field("local_addr"), "127.0.0.1", "{listen}");
            assert_eq!(field("local_port"), port.to_string(), "{listen}");
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_makes_queries_wait_until_resume_without_error() {
    let s = console_setup("pause").await;
    let c = s.client().await;
    c.simple_query("select 1").await.unwrap();
    let (port, db) = (s.weir.local_addr().port(), s.db.clone());
    let d2 = db.clone();
    let (_, _, tag) =
        tokio::task::spawn_blocking(move || console(port, "pgbouncer", &format!("PAUSE {d2}")))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(tag, "PAUSE");
    let pool = s.weir.shared().pools.all().pop().unwrap();
    assert_eq!(pool.pool.snapshot().size, 0, "PAUSE answers once drained");
    // Weir has closed them; the backends may take a moment to exit.
    eventually(
        "server connections drained to zero",
        Duration::from_secs(5),
        || s.backends() == 0,
    )
    .await;
    let started = Instant::now();
    let waiting =
        tokio::spawn(async move { c.simple_query("select 42").await.map(|_| started.elapsed()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "the query waits while paused");
    tokio::task::spawn_blocking(move || {
        console(port, "pgbouncer", &format!("RESUME {db}")).unwrap()
    })
    .await
    .unwrap();
    let took = waiting.await.unwrap().expect("no error after RESUME");
    assert!(took >= Duration::from_secs(1));
}

/// Runs `KILL db` on the console.
async fn kill(port: u16, db: &str) {
    let cmd = format!("KILL {db}");
    tokio::task::spawn_blocking(move || console(port, "weir", &cmd).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_and_kill() {
    let s = console_setup("killrec").await;
    let c = s.client().await;
    let pid = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap()
    };
    let before = pid(c.simple_query("select pg_backend_pid()").await.unwrap());
    let (port, db) = (s.weir.local_addr().port(), s.db.clone());
    let d2 = db.clone();
    tokio::task::spawn_blocking(move || console(port, "weir", &format!("RECONNECT {d2}")).unwrap())
        .await
        .unwrap();
    let after = pid(c.simple_query("select pg_backend_pid()").await.unwrap());
    assert_ne!(before, after, "RECONNECT replaced the server connection");
    kill(port, &db).await;
    // The idle session is woken by the KILL itself: the client sees its connection closed
    // without sending anything.
    eventually(
        "the killed idle client's connection closed",
        Duration::from_secs(5),
        || c.is_closed(),
    )
    .await;
    assert!(
        c.simple_query("select 1").await.is_err(),
        "KILL ended the session"
    );
    let fresh = s.client().await;
    assert!(
        fresh.simple_query("select 1").await.is_ok(),
        "new clients are served"
    );
    // A session in the middle of a query is woken by the KILL too, not by the reply.
    let busy = s.client().await;
    let query = tokio::spawn(async move {
        let r = busy.simple_query("select pg_sleep(10)").await;
        (r.is_err(), Instant::now())
    });
    eventually("the long query running", Duration::from_secs(5), || {
        s.sql(
            "select count(*) from pg_stat_activity where datname = current_database() \
             and state = 'active' and query = 'select pg_sleep(10)'",
        ) == "1"
    })
    .await;
    kill(port, &s.db).await;
    let killed = Instant::now();
    let (failed, ended) = query.await.unwrap();
    assert!(failed, "the killed query's client got an error");
    let after = ended.saturating_duration_since(killed);
    assert!(
        after < Duration::from_secs(3),
        "KILL ended the busy session at once, not when its query finished ({after:?} after)"
    );
}

/// Logs `sock` in to `db` as the trust user; returns it ready for a query.
fn raw_login(mut sock: TcpStream, db: &str) -> TcpStream {
    sock.write_all(&startup_packet(
        0,
        &[("user", TRUST_USER.user), ("database", db)],
    ))
    .unwrap();
    while read_msg(&mut sock).expect("login").0 != b'Z' {}
    sock
}

/// A simple Query message.
fn query_message(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}

/// Reads until the connection ends (closed or reset): the bytes that arrived, or what else
/// happened (a read timing out: the connection did not end).
fn read_until_closed(sock: &mut TcpStream) -> Result<Vec<u8>, String> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(format!("{e} after {} bytes", got.len())),
        }
    }
}

/// A connection to `port` with a receive buffer of a few kilobytes, set before it connects
/// so that the window it offers stays small. (The sender's own buffer still grows, up to the
/// kernel's `tcp_wmem` limit.)
fn small_window_connect(port: u16) -> TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    // SAFETY: `socket` returns a new descriptor (checked), owned from then on; the other
    // calls get pointers to live values of the sizes they are told.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(raw);
        let size: libc::c_int = 4096;
        let r = libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            raw,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd.into_raw_fd())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_session_whose_client_reads_nothing_of_its_results() {
    let s = console_setup("killflush").await;
    let (port, db) = (s.weir.local_addr().port(), s.db.clone());
    // Replies of about 200 kB: each less than a session buffers for its client (256 kB), so
    // each query's server connection goes back to the pool when its reply is complete, the
    // session keeping what the socket would not take. One query at a time, each counted by
    // a sequence, until one is not run: the session is then stuck writing the replies before
    // (the sockets between hold a few megabytes), and reads nothing more from the client.
    s.sql(&format!(
        "create sequence killflush; grant usage on sequence killflush to {}",
        TRUST_USER.user
    ));
    const QUERY: &str =
        "select repeat('x', 1000) from generate_series(1, 200), (select nextval('killflush')) n";
    let mut sock = tokio::task::spawn_blocking(move || raw_login(small_window_connect(port), &db))
        .await
        .unwrap();
    let q = query_message(QUERY);
    let mut sent = 0;
    let ran = loop {
        assert!(sent < 200, "200 replies of 200 kB never filled the sockets");
        sock.write_all(&q).unwrap();
        sent += 1;
        let mut ran = 0;
        let since = Instant::now();
        while since.elapsed() < Duration::from_secs(2) {
            ran = s
                .sql("select case when is_called then last_value else 0 end from killflush")
                .parse::<usize>()
                .unwrap();
            if ran == sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if ran < sent {
            break ran;
        }
    };
    // Not merely slow: the last query still has not run a while later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.sql("select case when is_called then last_value else 0 end from killflush"),
        ran.to_string(),
        "the session reads no more queries while the client reads nothing"
    );
    // No server connection is in use: the session only waits for the client to take what it
    // is owed.
    let db = s.db.clone();
    let mut active = String::new();
    for _ in 0..100 {
        let d = db.clone();
        let (cols, rows, _) = tokio::task::spawn_blocking(move || {
            console(port, "weir", "SHOW POOLS").unwrap_or_else(|e| panic!("SHOW POOLS: {e}"))
        })
        .await
        .unwrap();
        let col = |name: &str| cols.iter().position(|(n, _)| n == name).unwrap();
        let row = rows
            .iter()
            .find(|r| r[col("database")].as_deref() == Some(d.as_str()))
            .expect("a pool for the database");
        active = format!("{:?}", row[col("sv_active")]);
        if active == "Some(\"0\")" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        active, "Some(\"0\")",
        "sv_active: the server connection went back to the pool with the reply complete"
    );
    kill(port, &db).await;
    // The session ends while the client still reads nothing.
    let d = s.db.clone();
    let clients = move || {
        let (cols, rows, _) =
            console(port, "weir", "SHOW CLIENTS").unwrap_or_else(|e| panic!("SHOW CLIENTS: {e}"));
        let col = cols.iter().position(|(n, _)| n == "database").unwrap();
        rows.iter()
            .filter(|r| r[col].as_deref() == Some(d.as_str()))
            .count()
    };
    let mut left = usize::MAX;
    for _ in 0..100 {
        let count = clients.clone();
        left = tokio::task::spawn_blocking(count).await.unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        left, 0,
        "KILL ended the session of a client that reads nothing of what it is owed"
    );
    // Closed with the client's unread query in its receive queue, the socket was reset
    // rather than shut; either way the client sees the connection end.
    let ended = tokio::task::spawn_blocking(move || read_until_closed(&mut sock))
        .await
        .unwrap();
    assert!(ended.is_ok(), "the client's connection ended: {ended:?}");
    let fresh = s.client().await;
    assert!(
        fresh.simple_query("select 1").await.is_ok(),
        "others are served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_in_the_middle_of_a_row_closes_without_an_error_inside_it() {
    let s = console_setup("killrow").await;
    let (port, db) = (s.weir.local_addr().port(), s.db.clone());
    // One row of 50 MB: the relay passes it on in pieces as it arrives.
    const ROW: usize = 50_000_000;
    let (mut sock, mut got) = tokio::task::spawn_blocking(move || {
        let mut sock = raw_login(TcpStream::connect(("127.0.0.1", port)).unwrap(), &db);
        sock.write_all(&query_message(&format!("select repeat('x', {ROW})")))
            .unwrap();
        // The first megabyte, then nothing: the session is held in the middle of the row.
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
        while got.len() < 1 << 20 {
            let n = sock.read(&mut buf).unwrap();
            assert!(n > 0, "the row arrives");
            got.extend_from_slice(&buf[..n]);
        }
        (sock, got)
    })
    .await
    .unwrap();
    kill(port, &s.db).await;
    let rest = tokio::task::spawn_blocking(move || read_until_closed(&mut sock))
        .await
        .unwrap()
        .expect("KILL ended the connection");
    got.extend_from_slice(&rest);
    assert!(
        got.len() < ROW,
        "the row was cut short ({} bytes arrived)",
        got.len()
    );
    // The stream stops inside the DataRow: an ErrorResponse after it would be read as the
    // row's rest, so none is sent.
    assert!(
        !got.windows(5).any(|w| w == b"57P01"),
        "no ErrorResponse (57P01) written into the cut row"
    );
    let fresh = s.client().await;
    assert!(
        fresh.simple_query("select 1").await.is_ok(),
        "others are served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_client_queued_for_a_connection_before_its_query_runs() {
    let s = Setup::with_config("killqueue", |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.admin.users = vec![TRUST_USER.user.into()];
        c
    })
    .await;
    s.sql(&format!(
        "create table t (n int); grant all on t to {}",
        SCRAM_USER.user
    ));
    let holder = s.client().await;
    let queued = s.client().await;
    // The pool's only connection, held by an open transaction.
    holder.batch_execute("begin; select 1").await.unwrap();
    let insert = tokio::spawn(async move {
        queued
            .simple_query("insert into t values (1)")
            .await
            .map(|_| ())
    });
    eventually("the insert queued", Duration::from_secs(5), || {
        s.weir.shared().pools.all()[0].pool.snapshot().waiting == 1
    })
    .await;
    kill(s.weir.local_addr().port(), &s.db).await;
    // The KILL ends the holder, which frees the connection; the queued client must end
    // too, not take it and run what it sent before the KILL.
    let err = insert
        .await
        .unwrap()
        .expect_err("the queued client was killed");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{err}"
    );
    assert_eq!(
        s.sql("select count(*) from t"),
        "0",
        "the queued insert never ran"
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_queries_are_logged_and_listed() {
    let (pg, db) = shared_pg_database("slow").await;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let weir = WeirProcess::start(&[
        "--server",
        &pg.url(SCRAM_USER, &db),
        "--pool-mode",
        "transaction",
        "--admin-listen",
        &format!("127.0.0.1:{admin_port}"),
    ]);
    let c = connect(&weir.url(SCRAM_USER, &db)).await.unwrap();
    c.simple_query("select 'fast'").await.unwrap();
    c.simple_query("select pg_sleep(1.1), 'the slow one'")
        .await
        .unwrap();
    // A prepared statement run again is a request that starts with its Bind: the log shows
    // the statement's text, not just that it was the extended protocol.
    let st = c
        .prepare("select pg_sleep($1::float8), 'the slow prepared one'")
        .await
        .unwrap();
    c.query(&st, &[&0.0f64]).await.unwrap();
    c.query(&st, &[&1.1f64]).await.unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let (status, _, body) = http_get(admin, "/api/slow-queries", None).await;
    assert_eq!(status, 200);
    let j: Value = serde_json::from_str(&body).unwrap();
    let list = j["slow_queries"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    // Newest first.
    let query = |i: usize| list[i]["query"].as_str().unwrap();
    assert!(query(0).contains("'the slow prepared one'"), "{body}");
    assert!(query(1).contains("the slow one"), "{body}");
    assert!(list[0]["duration_ms"].as_f64().unwrap() >= 1100.0);
    assert!(list[1]["duration_ms"].as_f64().unwrap() >= 1100.0);
    assert!(
        weir.log().contains("slow query"),
        "the log names it:\n{}",
        weir.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_figures_in_headless_chromium() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect(
            "Chromium is needed for the dashboard test: apt-get install chromium (.ci/run does)",
        );
    let s = Setup::new("dashboard", 4, PoolMode::Transaction).await;
    let admin = start_admin(&s.weir).await;
    let url = s.url(SCRAM_USER);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.simple_query("select pg_sleep(0.002)").await.unwrap();
            }
        })
    };
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let page = format!("http://{}/", admin.addr);
    let dump = |shot: Option<std::path::PathBuf>| {
        let (chromium, page) = (chromium.to_string(), page.clone());
        let profile = std::env::temp_dir().join(format!(
            "weir-chromium-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(chromium);
            cmd.args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
            ])
            .args([
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=4000", "--window-size=1280,1100"]);
            match &shot {
                Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
                None => cmd.arg("--dump-dom"),
            };
            let out = cmd.arg(&page).output().expect("run chromium");
            let _ = std::fs::remove_dir_all(&profile);
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let figure = |dom: &str| -> u64 {
        let at = dom
            .find("id=\"t-xacts\">")
            .unwrap_or_else(|| panic!("no transactions figure in the page:\n{dom}"));
        let rest = &dom[at + "id=\"t-xacts\">".len()..];
        rest[..rest.find('<').unwrap()]
            .replace([',', '\u{a0}', ' '], "")
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {}", &rest[..20]))
    };
    let first = figure(&dump(None).await.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = figure(&dump(None).await.unwrap());
    assert!(
        second > first,
        "the dashboard's transaction count moves under load: {first} then {second}"
    );
    let shot = artifacts.join("dashboard.png");
    dump(Some(shot.clone())).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot saved at {}",
        shot.display()
    );
}

/// A client that stops answering its password challenge is closed at
/// `proxy.client_login_timeout` with 08P01, whether it logs in to a database or to the admin
/// console (whose login had no deadline: such clients held their connection slots for good),
/// and other clients log in and run queries meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_stops_answering_is_closed_at_the_login_timeout() {
    let s = Setup::with_config("logintimeout", |pg, db| {
        let mut c = weir_config(pg, db, 2, PoolMode::Transaction);
        c.admin.users = vec![SCRAM_USER.user.into()];
        c.proxy.client_login_timeout = Duration::from_secs(1);
        c
    })
    .await;
    let port = s.weir.local_addr().port();
    let db = s.db.clone();
    let stalled = tokio::task::spawn_blocking(move || {
        [db.as_str(), "pgbouncer"].map(|database| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(&startup_packet(
                0,
                &[("user", SCRAM_USER.user), ("database", database)],
            ))
            .unwrap();
            let (t, _) = read_msg(&mut c).expect("a password challenge");
            assert_eq!(t, b'R', "{database}");
            let asked = Instant::now();
            // Never answered.
            let (t, body) = read_msg(&mut c).expect("an error before the close");
            let waited = asked.elapsed();
            let text = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(t, b'E', "{database}: {text}");
            assert!(
                text.contains("08P01") && text.contains("login timed out"),
                "{database}: {text}"
            );
            assert!(read_msg(&mut c).is_none(), "{database}: closed after it");
            waited
        })
    });
    let c = s.client().await;
    assert_eq!(
        c.query_one("select 6 * 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    for waited in stalled.await.unwrap() {
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }
}
