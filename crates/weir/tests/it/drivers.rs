//! Real drivers other than tokio-postgres through transaction pooling with a pool smaller
//! than the client count: asyncpg and psycopg 3 (Python), pgjdbc (Java), node-postgres, sqlx
//! (Rust).
//! Each runs a script from `crates/weir/tests/drivers` that checks every answer it gets and
//! exits non-zero on the first wrong one; the scripts also pass run straight against
//! PostgreSQL. `scripts/setup.sh --with-drivers` installs the drivers (`scripts/test.sh` and
//! `.ci/run` call it): the Python and Node packages and the sqlx client (its own cargo
//! project in `tests/drivers/sqlx_client`) under `target/drivers`, pgjdbc and the runtimes
//! from the system's packages.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Where `scripts/setup.sh --with-drivers` installed the Python and Node packages.
fn installed() -> PathBuf {
    std::env::var_os("WEIR_TEST_DRIVERS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/drivers"),
        PathBuf::from,
    )
}

/// A database whose tables the test user may create, behind a transaction-mode pool of 3.
async fn setup(prefix: &str) -> Setup {
    let s = Setup::new(prefix, 3, PoolMode::Transaction).await;
    s.sql(&format!(
        "grant create on schema public to {}",
        SCRAM_USER.user
    ));
    s
}

/// The longest a driver script may run before it is killed (each takes seconds): a hang
/// fails the test rather than the whole suite's time limit.
const SCRIPT_LIMIT: &str = "180";

/// Runs `program` with `args`, the Weir URL and the client count, under `timeout`; panics
/// with its output unless it exits 0 and says `ok`. Then no more than the pool's 3 server
/// connections were open.
async fn run(
    s: &Setup,
    program: &str,
    args: &[&std::ffi::OsStr],
    env: Option<(&str, PathBuf)>,
    clients: u32,
    needs: &str,
) {
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", SCRIPT_LIMIT, program])
        .args(args)
        .arg(s.url(SCRAM_USER))
        .arg(clients.to_string());
    if let Some((name, value)) = env {
        cmd.env(name, value);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start the driver's runtime ({e}): {needs}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("clients ok"),
        "driver script failed ({}):\n{stdout}\n{stderr}\n(if a module is missing: {needs})",
        out.status
    );
    assert!(s.backends() <= 3, "{} server connections", s.backends());
}

async fn python(s: &Setup, script: &str, clients: u32) {
    let path = scripts().join(script);
    let env = Some(("PYTHONPATH", installed().join("python")));
    run(s, "python3", &[path.as_os_str()], env, clients, SETUP).await;
}

const SETUP: &str = "run scripts/setup.sh --with-drivers";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_named_statements_portals_copy_cancel_and_a_schema_change() {
    let s = setup("drv_asyncpg").await;
    python(&s, "asyncpg_client.py", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_pipelines_cursors_copy_and_cancel() {
    let s = setup("drv_psycopg").await;
    python(&s, "psycopg_client.py", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_named_statements_batches_fetch_size_copy_and_query_timeout() {
    let s = setup("drv_jdbc").await;
    let path = scripts().join("JdbcClient.java");
    let args = [
        "-cp".as_ref(),
        "/usr/share/java/postgresql.jar".as_ref(),
        path.as_os_str(),
    ];
    run(&s, "java", &args, None, 10, SETUP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_statements_errors_and_transactions() {
    let s = setup("drv_node").await;
    let path = scripts().join("node_pg_client.js");
    let env = Some(("NODE_PATH", installed().join("node/node_modules")));
    run(&s, "node", &[path.as_os_str()], env, 10, SETUP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_statement_cache_evictions_transactions_copy_and_its_pool() {
    let s = setup("drv_sqlx").await;
    let bin = installed().join("sqlx/debug/weir-sqlx-client");
    run(&s, bin.to_str().unwrap(), &[], None, 10, SETUP).await;
}
