//! Client authentication at Weir, server authentication behind it, and clear errors.

use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_login_method_both_sides() {
    let s = Setup::new("auth", 2, PoolMode::Transaction).await;
    // scram_user: SCRAM to Weir, SCRAM to the server. md5_user: md5 both sides.
    // cleartext_user: SCRAM to Weir, cleartext to the server. trust_user: trust both.
    for login in [SCRAM_USER, MD5_USER, CLEARTEXT_USER, TRUST_USER] {
        let c = connect(&s.url(login))
            .await
            .unwrap_or_else(|e| panic!("{} cannot log in: {e}", login.user));
        let who: String = c
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, login.user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_28p01() {
    let s = Setup::new("authbad", 1, PoolMode::Transaction).await;
    for login in [SCRAM_USER, MD5_USER] {
        let bad = Login {
            user: login.user,
            password: "wrong",
        };
        let e = connect(&s.url(bad)).await.unwrap_err();
        assert_eq!(code(&e), "28P01", "{}", login.user);
    }
    let nobody = Login {
        user: "no_such_user",
        password: "x",
    };
    assert_eq!(
        code(&connect(&s.url(nobody)).await.unwrap_err()),
        "28P01",
        "unknown users look like bad passwords"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_3d000() {
    let s = Setup::new("authdb", 1, PoolMode::Transaction).await;
    let a = s.weir.local_addr();
    let url = format!(
        "postgres://{}:{}@{}:{}/not_there",
        SCRAM_USER.user,
        SCRAM_USER.password,
        a.ip(),
        a.port()
    );
    let e = connect(&url).await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    assert!(e.as_db_error().unwrap().message().contains("not_there"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_is_a_clear_error_within_connect_timeout() {
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // This one accepts and then never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    for (port, expect) in [
        (closed, "cannot reach server"),
        (silent_port, "did not complete login"),
    ] {
        let s = Setup::with_config("authdown", |pg, db| {
            let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
            c.databases.get_mut(db).unwrap().port = port;
            c.pool.connect_timeout = Some(Duration::from_secs(1));
            c
        })
        .await;
        let start = Instant::now();
        let e = connect(&s.url(SCRAM_USER)).await.unwrap_err();
        let took = start.elapsed();
        assert_eq!(code(&e), "08001");
        let msg = e.as_db_error().unwrap().message().to_string();
        assert!(msg.contains(expect), "{msg}");
        assert!(
            took < Duration::from_secs(3),
            "error after {took:?}, connect_timeout is 1 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_binary_serves_one_database() {
    let pg = tokio::task::spawn_blocking(PgServer::shared).await.unwrap();
    let db = unique_db("quick");
    let d2 = db.clone();
    tokio::task::spawn_blocking(move || PgServer::shared().create_database(&d2))
        .await
        .unwrap();
    let weir = WeirProcess::quick_start(&pg.url(SCRAM_USER, &db), 2);
    let c = connect(&weir.url(SCRAM_USER, &db)).await.unwrap();
    assert_eq!(
        c.query_one("select 11", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        11
    );
    let bad = Login {
        user: SCRAM_USER.user,
        password: "nope",
    };
    assert_eq!(
        code(&connect(&weir.url(bad, &db)).await.unwrap_err()),
        "28P01"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_file_secrets_and_a_forced_server_user() {
    // Clients alice (SCRAM verifier) and bob (md5 secret) exist only in Weir's userlist;
    // every client logs in to the server as scram_user, whose password the database holds.
    let dir = std::env::temp_dir().join(format!("weir-userlist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let verifier = postgres_protocol::password::scram_sha_256(b"alice_pw");
    let md5 = postgres_protocol::password::md5(b"bob_pw", "bob");
    std::fs::write(
        dir.join("userlist.txt"),
        format!("\"alice\" \"{verifier}\"\n\"bob\" \"{md5}\"\n"),
    )
    .unwrap();
    let d2 = dir.clone();
    let s = Setup::with_config("authfile", move |pg, db| {
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[auth]\nfile = \"userlist.txt\"\n\
             [databases.{db}]\nurl = \"postgres://{}:{}@127.0.0.1:{}/{db}\"\n[users.bob]\nauth = \"md5\"\n",
            SCRAM_USER.user, SCRAM_USER.password, pg.port
        );
        weir_config::from_toml_str(&text, Some(&d2)).unwrap().0
    })
    .await;
    for (user, pw) in [("alice", "alice_pw"), ("bob", "bob_pw")] {
        let c = connect(&s.url(Login { user, password: pw }))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let who: String = c
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, SCRAM_USER.user, "{user} runs as the database's user");
        let bad = Login {
            user,
            password: "wrong",
        };
        assert_eq!(code(&connect(&s.url(bad)).await.unwrap_err()), "28P01");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// auth_query: a user that exists only in the server logs in through Weir with its own
/// password (Weir holds none for it), a wrong one gets 28P01, and dropping the user takes
/// effect once the cached secret is older than `auth.cache_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_lets_server_users_in_with_their_own_password() {
    let s = Setup::with_config("authq", |pg, db| {
        let mut c = weir_config(pg, db, 4, PoolMode::Transaction);
        c.auth_query = Some(weir_config::AuthQuery {
            user: SUPERUSER.user.into(),
            query: weir_config::DEFAULT_AUTH_QUERY.into(),
            cache_ttl: Duration::from_secs(1),
        });
        c
    })
    .await;
    let name = format!("aq_{}", std::process::id());
    s.sql(&format!(
        "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN PASSWORD 'own-secret'"
    ));
    assert!(
        !s.weir.shared().config.load().users.contains_key(&name),
        "the config knows nothing of the user"
    );
    let url = |pw: &str| {
        let a = s.weir.local_addr();
        format!("postgres://{name}:{pw}@{}:{}/{}", a.ip(), a.port(), s.db)
    };

    // Three clients at once, each in a transaction, so the pool opens three server
    // connections, all logging in as the user with the key its first login revealed.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = connect(&url("own-secret"))
            .await
            .expect("login via auth_query");
        c.batch_execute("BEGIN").await.unwrap();
        clients.push(c);
    }
    let mut pids = std::collections::HashSet::new();
    for c in &clients {
        let row = c
            .query_one("SELECT current_user::text, pg_backend_pid()", &[])
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, String>(0),
            name,
            "the server session is the user's own"
        );
        pids.insert(row.get::<_, i32>(1));
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(pids.len(), 3, "three server logins as the user");

    let e = connect(&url("wrong")).await.expect_err("wrong password");
    assert_eq!(code(&e), "28P01");

    drop(clients);
    s.sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
    ));
    s.sql(&format!("DROP ROLE {name}"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let e = connect(&url("own-secret"))
        .await
        .expect_err("the dropped user is gone once the cache expires");
    assert_eq!(code(&e), "28P01");
}
