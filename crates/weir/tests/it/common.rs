//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use weir_testkit::*;

/// A fresh database name per test, so pg_stat_activity counts are per test.
pub fn unique_db(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Like [`connect`], but returns the connection task so a test can kill the socket abruptly.
pub async fn connect_killable(url: &str) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

/// The SQLSTATE of a tokio-postgres error, as text.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

/// A direct superuser connection to the shared server (not through Weir).
pub async fn direct(db: &str) -> tokio_postgres::Client {
    connect(&PgServer::shared().url(SUPERUSER, db))
        .await
        .expect("direct connection")
}

/// The shared PostgreSQL, with a fresh database of its own for the calling test.
pub async fn shared_pg_database(prefix: &str) -> (&'static PgServer, String) {
    let db = unique_db(prefix);
    let db2 = db.clone();
    let pg = tokio::task::spawn_blocking(move || {
        let pg = PgServer::shared();
        pg.create_database(&db2);
        pg
    })
    .await
    .unwrap();
    (pg, db)
}

/// A database and Weir in front of the shared server.
pub struct Setup {
    pub pg: &'static PgServer,
    pub db: String,
    pub weir: weir_proxy::ProxyHandle,
}

impl Setup {
    pub async fn new(prefix: &str, pool_size: u32, mode: PoolMode) -> Setup {
        Self::with_config(prefix, |pg, db| weir_config(pg, db, pool_size, mode)).await
    }

    pub async fn with_config(prefix: &str, f: impl FnOnce(&PgServer, &str) -> Config) -> Setup {
        let (pg, db) = shared_pg_database(prefix).await;
        let config = f(pg, &db);
        let weir = start_weir(config).await;
        Setup { pg, db, weir }
    }

    pub fn url(&self, login: Login) -> String {
        weir_url(&self.weir, login, &self.db)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url(SCRAM_USER))
            .await
            .expect("connect through weir")
    }

    /// Runs SQL directly on the server as superuser, in this test's database.
    pub fn sql(&self, sql: &str) -> String {
        self.pg.psql_script(&self.db, sql)
    }

    /// psql through Weir as `login`.
    pub fn psql(&self, login: Login) -> Command {
        let a = self.weir.local_addr();
        let mut c = Command::new(self.pg.bindir.join("psql"));
        c.args([
            "-X",
            "-h",
            &a.ip().to_string(),
            "-p",
            &a.port().to_string(),
            "-U",
            login.user,
            "-d",
            &self.db,
        ])
        .env("PGPASSWORD", login.password)
        .env("PGCONNECT_TIMEOUT", "10");
        c
    }

    /// Server backends connected to this test's database.
    pub fn backends(&self) -> usize {
        self.pg.backends(&self.db, None)
    }
}

/// Runs the `weir` binary to completion with `args` and `env` added, without the `WEIR_*`
/// variables that steer it from the test's own environment: (exit code, stdout + stderr).
pub fn weir_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env_remove("WEIR_CONFIG")
        .env_remove("WEIR_PROFILE")
        .env_remove("WEIR_ADMIN_TOKEN")
        .env_remove("WEIR_ADMIN_ADDR")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `weir` binary, started with the quick-start flags on a free port. Killed on drop.
pub struct WeirProcess {
    pub child: Child,
    pub port: u16,
    pub stderr_path: std::path::PathBuf,
    pub stdout_path: std::path::PathBuf,
}

/// Checks `check` every 20 ms until it holds, and fails naming `what` if it still does not
/// after `limit`. For state that settles just after a client has its answer: a server
/// connection released after the reply was sent, a PostgreSQL backend still exiting.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl WeirProcess {
    pub fn quick_start(server_url: &str, pool_size: u32) -> WeirProcess {
        let size = pool_size.to_string();
        WeirProcess::start(&[
            "--server",
            server_url,
            "--pool-size",
            &size,
            "--pool-mode",
            "transaction",
            "--workers",
            "2",
            // Its own admin port: tests run side by side, and the default 9930 fits only one.
            "--admin-listen",
            "127.0.0.1:0",
        ])
    }

    /// `weir run --listen <free port>` followed by `args`.
    pub fn start(args: &[&str]) -> WeirProcess {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["run", "--listen", &listen];
        all.extend_from_slice(args);
        WeirProcess::spawn(&all, &[], port)
    }

    /// `weir run --config <file>` on a free port (set with `--set proxy.listen`), with the
    /// admin listener on another free port, then `args`, with `env` added to the environment.
    pub fn with_config(file: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> WeirProcess {
        let port = free_port();
        let listen = format!("proxy.listen=127.0.0.1:{port}");
        let admin = format!("admin.listen=127.0.0.1:{}", free_port());
        let file = file.to_str().unwrap();
        let mut all = vec!["run", "--config", file, "--set", &listen, "--set", &admin];
        all.extend_from_slice(args);
        WeirProcess::spawn(&all, env, port)
    }

    /// The admin address, as printed by `weir run` ("admin on http://ADDR").
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        for _ in 0..200 {
            if let Ok(out) = std::fs::read_to_string(&self.stdout_path)
                && let Some(line) = out.lines().find(|l| l.starts_with("admin on http://"))
            {
                return line["admin on http://".len()..].parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("weir printed no admin address: {}", self.log());
    }

    pub fn spawn(args: &[&str], env: &[(&str, &str)], port: u16) -> WeirProcess {
        let stderr_path =
            std::env::temp_dir().join(format!("weir-test-{}-{port}.log", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let stdout_path = stderr_path.with_extension("out");
        let stdout = std::fs::File::create(&stdout_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(args)
            .env("WEIR_LOG", "info")
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn weir");
        let mut w = WeirProcess {
            child,
            port,
            stderr_path,
            stdout_path,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return w;
            }
            if !w.is_running() {
                panic!("weir exited: {}", w.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("weir did not start listening: {}", w.log());
    }

    pub fn url(&self, login: Login, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            login.user, login.password, self.port, db
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
        let _ = std::fs::remove_file(&self.stdout_path);
    }
}

/// A tiny HTTP/1.1 GET (Connection: close): status, headers (lower-cased names), body.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin listener");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: weir\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, headers, body)
}

/// Runs pgbench with a one-statement script through Weir; returns transactions processed.
pub fn pgbench_script(
    pg: &PgServer,
    weir: std::net::SocketAddr,
    db: &str,
    login: Login,
    sql: &str,
    args: &[&str],
) -> u64 {
    let script = std::env::temp_dir().join(format!(
        "weir-pgbench-{}-{}.sql",
        std::process::id(),
        weir.port()
    ));
    std::fs::write(&script, format!("{sql}\n")).unwrap();
    let out = Command::new(pg.bindir.join("pgbench"))
        .args([
            "-n",
            "-f",
            script.to_str().unwrap(),
            "-h",
            &weir.ip().to_string(),
            "-p",
            &weir.port().to_string(),
            "-U",
            login.user,
        ])
        .args(args)
        .arg(db)
        .env("PGPASSWORD", login.password)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed:")
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.parse().ok())
        .expect("processed count")
}
