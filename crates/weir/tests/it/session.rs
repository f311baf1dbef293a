//! Session state: parameters carried to whichever server connection serves a client, session
//! mode, and a server connection never handed on dirty.

use std::time::{Duration, Instant};

use crate::common::*;

async fn show(c: &tokio_postgres::Client, what: &str) -> String {
    let rows = c.simple_query(&format!("show {what}")).await.unwrap();
    match &rows[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
        _ => match &rows[0] {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
            other => panic!("no row: {other:?}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_hold_on_a_shared_server_connection() {
    // One server connection shared by two clients with different settings.
    let s = Setup::new("params", 1, PoolMode::Transaction).await;
    s.sql("create schema app_a; create schema app_b; grant usage on schema app_a, app_b to public");
    let url = |tz: &str, path: &str, app: &str| {
        format!(
            "{} options='-c TimeZone={tz} -c search_path={path} -c DateStyle=German' application_name={app}",
            keyword_url(&s, SCRAM_USER)
        )
    };
    let a = connect(&url("Asia/Tokyo", "app_a", "client_a"))
        .await
        .unwrap();
    let b = connect(&url("America/New_York", "app_b", "client_b"))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(show(&a, "timezone").await, "Asia/Tokyo");
        assert_eq!(show(&b, "timezone").await, "America/New_York");
        assert_eq!(show(&a, "search_path").await, "app_a");
        assert_eq!(show(&b, "search_path").await, "app_b");
        assert_eq!(show(&a, "application_name").await, "client_a");
        assert_eq!(show(&b, "application_name").await, "client_b");
        assert!(show(&a, "datestyle").await.starts_with("German"));
    }
    // A SET of a reported parameter follows the client to its next transactions only.
    a.batch_execute("set timezone = 'Europe/Paris'")
        .await
        .unwrap();
    assert_eq!(show(&b, "timezone").await, "America/New_York");
    assert_eq!(show(&a, "timezone").await, "Europe/Paris");
    // Both really share one backend.
    let pa: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pb: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pa, pb);
}

/// A keyword/value connection string for a Weir client (options need this form).
fn keyword_url(s: &Setup, login: Login) -> String {
    let a = s.weir.local_addr();
    format!(
        "host={} port={} user={} password={} dbname={}",
        a.ip(),
        a.port(),
        login.user,
        login.password,
        s.db
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_state_then_resets_it() {
    let s = Setup::new("sessmode", 1, PoolMode::Session).await;
    let a = s.client().await;
    a.batch_execute("create temp table mine (x int); set work_mem = '7MB'; listen chan")
        .await
        .unwrap();
    for _ in 0..3 {
        a.batch_execute("insert into mine values (1)")
            .await
            .unwrap();
    }
    assert_eq!(show(&a, "work_mem").await, "7MB");
    let pid_a: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = s.client().await;
    let pid_b: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_a, pid_b, "the server connection was reused");
    assert_eq!(
        show(&b, "work_mem").await,
        "4MB",
        "DISCARD ALL reset the setting"
    );
    let t: Option<String> = b
        .query_one("select to_regclass('pg_temp.mine')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, None, "the temp table is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_inside_transaction_leaves_nothing_behind() {
    let s = Setup::new("dirty", 1, PoolMode::Transaction).await;
    s.sql("create table locked (x int); grant all on locked to public");
    for abrupt in [false, true] {
        let (a, conn) = connect_killable(&s.url(SCRAM_USER)).await;
        a.batch_execute(
            "begin; create temp table scratch (x int); lock table locked in access exclusive mode",
        )
        .await
        .unwrap();
        let pid_a: i32 = a
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        if abrupt {
            conn.abort(); // the socket closes without a Terminate
        } else {
            drop(a); // Terminate
        }
        let _ = conn.await;

        let b = s.client().await;
        let pid_b: i32 = b
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(pid_a, pid_b, "same server connection (abrupt={abrupt})");
        let xid: Option<String> = b
            .query_one("select pg_current_xact_id_if_assigned()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            xid, None,
            "no open transaction carried over (abrupt={abrupt})"
        );
        let rows = b
            .simple_query("select now() = statement_timestamp()")
            .await
            .unwrap();
        let fresh = rows.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")),
        );
        assert!(fresh, "a new transaction per statement (abrupt={abrupt})");
        let t: Option<String> = b
            .query_one("select to_regclass('pg_temp.scratch')::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(t, None, "no temp table (abrupt={abrupt})");
        let locks: i64 = b
            .query_one(
                "select count(*) from pg_locks where relation = 'locked'::regclass and pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(locks, 0, "no lock left (abrupt={abrupt})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_during_running_query_frees_its_locks() {
    let s = Setup::new("dirtyrun", 2, PoolMode::Transaction).await;
    s.sql("create table locked (x int); grant all on locked to public");
    let (a, conn) = connect_killable(&s.url(SCRAM_USER)).await;
    a.batch_execute("begin; lock table locked in access exclusive mode")
        .await
        .unwrap();
    let running = tokio::spawn(async move { a.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.abort();
    let _ = running.await;
    // Weir cancels the orphaned query and closes that server connection, so the lock goes.
    let b = s.client().await;
    let start = Instant::now();
    b.batch_execute("set lock_timeout = '5s'; lock table locked in access exclusive mode")
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "lock freed in {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_of_a_departed_client_do_not_leak() {
    // Transaction mode: A's startup search_path is set on the shared connection; A leaves
    // inside a transaction; B, with no search_path of its own, must get the default.
    let s = Setup::new("leak", 1, PoolMode::Transaction).await;
    s.sql("create schema tenant_a; grant usage on schema tenant_a to public");
    let a = connect(&format!(
        "{} options='-c search_path=tenant_a'",
        keyword_url(&s, SCRAM_USER)
    ))
    .await
    .unwrap();
    a.batch_execute("begin").await.unwrap();
    assert_eq!(show(&a, "search_path").await, "tenant_a");
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = s.client().await;
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reset_runs_after_a_client_leaves_mid_transaction() {
    let s = Setup::new("sessreset", 1, PoolMode::Session).await;
    let a = s.client().await;
    a.batch_execute("set work_mem = '9MB'; begin; create temp table t (x int)")
        .await
        .unwrap();
    let pid_a: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = s.client().await;
    let pid_b: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    if pid_a == pid_b {
        // Reused: ROLLBACK and then DISCARD ALL must both have run.
        assert_eq!(show(&b, "work_mem").await, "4MB");
        let t: Option<String> = b
            .query_one("select to_regclass('pg_temp.t')::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(t, None);
    }
    // Either way B starts clean.
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(
        pid_a, pid_b,
        "the connection was cleaned and reused, not thrown away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_a_session_mode_listener() {
    use futures_util::StreamExt;
    let s = Setup::new("notify", 2, PoolMode::Session).await;
    let (listener, mut conn) = tokio_postgres::connect(&s.url(SCRAM_USER), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("listen jobs").await.unwrap();
    let sender = s.client().await;
    sender
        .batch_execute("notify jobs, 'first'; select pg_notify('jobs', 'second')")
        .await
        .unwrap();
    for want in ["first", "second"] {
        let (channel, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((channel.as_str(), payload.as_str()), ("jobs", want));
    }
}
