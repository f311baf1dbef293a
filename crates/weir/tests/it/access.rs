//! Who may log in: `[[access]]` rules by address range, database and user, and the slowdown
//! of repeated failed logins from one address.

use std::time::{Duration, Instant};

use weir_config::PoolMode;

use crate::common::*;

/// Adds the `[[access]]` rules (and auth settings) of `extra` TOML to a test config.
fn with(mut c: weir_config::Config, extra: &str) -> weir_config::Config {
    let parsed = weir_config::from_toml_str(extra, None)
        .unwrap_or_else(|p| panic!("{p}"))
        .0;
    c.access = parsed.access;
    c.failed_login_delay = parsed.failed_login_delay;
    c.failed_login_delay_max = parsed.failed_login_delay_max;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_reject_one_combination_and_allow_the_others() {
    let s = Setup::with_config("access", |pg, db| {
        let mut c = weir_config(pg, db, 4, PoolMode::Transaction);
        // A second database name for the same server database.
        let mut other = c.databases[db].clone();
        other.dbname = db.to_string();
        c.databases.insert(format!("{db}_ro"), other);
        with(
            c,
            &format!(
                r#"
                [[access]]
                name = "md5-user-not-on-main"
                action = "reject"
                address = "127.0.0.0/8"
                database = "{db}"
                user = "{md5}"
                [[access]]
                name = "elsewhere"
                action = "reject"
                address = "10.0.0.0/8"
                [[access]]
                name = "loopback"
                action = "allow"
                address = "127.0.0.1/32"
                user = ["{scram}", "{md5}"]
                "#,
                md5 = MD5_USER.user,
                scram = SCRAM_USER.user,
            ),
        )
    })
    .await;
    let url = |login: Login, db: &str| weir_url(&s.weir, login, db);
    let ro = format!("{}_ro", s.db);

    // The rejected combination: 28000 naming the rule, user, database and address.
    let e = connect(&url(MD5_USER, &s.db)).await.expect_err("rejected");
    assert_eq!(code(&e), "28000");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("access rule \"md5-user-not-on-main\" rejects the connection")
            && msg.contains("host \"127.0.0.1\"")
            && msg.contains(&format!("user \"{}\"", MD5_USER.user))
            && msg.contains(&format!("database \"{}\"", s.db)),
        "{msg}"
    );
    // The same user on the other database, and the other user on this one: allowed.
    let c = connect(&url(MD5_USER, &ro)).await.expect("md5_user on _ro");
    assert_eq!(one(&c, "SELECT current_user").await, MD5_USER.user);
    let c = connect(&url(SCRAM_USER, &s.db)).await.expect("scram_user");
    assert_eq!(one(&c, "SELECT current_user").await, SCRAM_USER.user);
    // A user no rule covers: rejected, before any password is asked (so it need not be right).
    let wrong = Login {
        user: SUPERUSER.user,
        password: "not-even-checked",
    };
    let e = connect(&url(wrong, &s.db)).await.expect_err("no rule");
    assert_eq!(code(&e), "28000");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("no access rule allows"),
        "{e:?}"
    );
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// After a failed login, the next login from the same address waits before its password
/// exchange, twice as long per further failure, up to the cap; the right password waits too
/// (a guesser gains nothing by giving up early on a slow answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_are_answered_ever_more_slowly() {
    let s = Setup::with_config("slowdown", |pg, db| {
        with(
            weir_config(pg, db, 2, PoolMode::Transaction),
            "[auth]\nfailed_login_delay = \"200ms\"\nfailed_login_delay_max = \"800ms\"\n",
        )
    })
    .await;
    let bad = Login {
        user: SCRAM_USER.user,
        password: "guess",
    };
    let mut took = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        let e = connect(&s.url(bad)).await.expect_err("wrong password");
        assert_eq!(code(&e), "28P01");
        took.push(t.elapsed());
    }
    // No pause for the first attempt, then 200, 400, 800 ms.
    assert!(took[0] < Duration::from_millis(150), "{took:?}");
    for (t, least) in took.iter().zip([0, 200, 400, 800]) {
        assert!(*t >= Duration::from_millis(least), "{took:?}");
    }
    // The right password waits the capped pause too, then logs in.
    let t = Instant::now();
    s.client().await;
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(800), "{waited:?}");
    assert!(
        waited < Duration::from_millis(800 + 1500),
        "capped: {waited:?}"
    );
}
