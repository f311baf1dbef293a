//! Secrets never leave Weir: with trace logging on, after good and bad logins (configured
//! users, a URL with a password, an auth_query user), a config typo next to a password, the
//! console's SHOW CONFIG and /api/config, no password, token or private key appears in what
//! Weir printed or answered.

use std::process::Command;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_show_config_or_the_api() {
    let pg = PgServer::shared();
    let aq_user = format!("aq_secret_{}", std::process::id());
    let aq_password = "aq-SENTINEL-pw";
    let token = "tok-SENTINEL-admin";
    pg.psql_script(
        "postgres",
        &format!(
            "DROP ROLE IF EXISTS {aq_user}; CREATE ROLE {aq_user} LOGIN PASSWORD '{aq_password}'"
        ),
    );
    let dir = pg.dir.join(format!("secrets-{}", std::process::id()));
    let ca = TestCa::new(&dir, "ca");
    let (cert, key) = ca.issue("weir", &["localhost"]);
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap().to_string();
    let file = dir.join("weir.toml");
    std::fs::write(
        &file,
        format!(
            r#"
            [admin]
            token = "{token}"
            users = ["{su}"]
            [auth]
            user = "{su}"
            [tls]
            cert_file = "{cert}"
            key_file = "{key}"
            [databases.app]
            host = "127.0.0.1"
            port = {port}
            dbname = "postgres"
            [databases.viaurl]
            url = "postgres://{scram}:{scram_pw}@127.0.0.1:{port}/postgres"
            [users.{su}]
            password = "{su_pw}"
            [users.{scram}]
            password = "{scram_pw}"
            "#,
            su = SUPERUSER.user,
            su_pw = SUPERUSER.password,
            scram = SCRAM_USER.user,
            scram_pw = SCRAM_USER.password,
            cert = cert.display(),
            key = key.display(),
            port = pg.port,
        ),
    )
    .unwrap();
    let weir = WeirProcess::with_config(&file, &[], &[("WEIR_LOG", "trace")]);
    let admin = weir.admin_addr();
    let aq = Login {
        user: Box::leak(aq_user.clone().into_boxed_str()),
        password: aq_password,
    };
    let wrong = |user: &'static str| Login {
        user,
        password: "wrong-SENTINEL-guess",
    };
    for (login, db, ok) in [
        (SCRAM_USER, "app", true),
        (SCRAM_USER, "viaurl", true),
        (aq, "app", true),
        (wrong(SCRAM_USER.user), "app", false),
        (wrong(aq.user), "app", false),
    ] {
        let r = async {
            let c = connect(&weir.url(login, db)).await?;
            c.simple_query("SELECT 1").await
        }
        .await;
        assert_eq!(r.is_ok(), ok, "{} on {db}: {r:?}", login.user);
    }
    let show = Command::new(pg.bindir.join("psql"))
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &weir.port.to_string()])
        .args(["-U", SUPERUSER.user, "-d", "weir", "-c", "SHOW CONFIG"])
        .env("PGPASSWORD", SUPERUSER.password)
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(show.contains("admin.token|<redacted>"), "{show}");
    let (status, _, api) = http_get(admin, "/api/config", Some(token)).await;
    assert_eq!(status, 200);
    assert!(api.contains("<redacted>") && api.contains("tls"), "{api}");

    // A typo beside a secret: `weir check` names the key, not the value.
    let typo = dir.join("typo.toml");
    std::fs::write(
        &typo,
        "[users.x]\npasswrd = \"typo-SENTINEL-pw\"\n[databases.app]\nurl = 12\n",
    )
    .unwrap();
    let (code, check) = weir_cli(&["check", "--config", typo.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{check}");
    assert!(check.contains("users.x.passwrd"), "{check}");

    let log = weir.log() + &std::fs::read_to_string(&weir.stdout_path).unwrap();
    assert!(
        log.contains("password authentication failed"),
        "the failures were logged: {log}"
    );
    for (what, text) in [
        ("log", &log),
        ("SHOW CONFIG", &show),
        ("/api/config", &api),
        ("check", &check),
    ] {
        for secret in [
            SCRAM_USER.password,
            SUPERUSER.password,
            aq_password,
            token,
            "wrong-SENTINEL-guess",
            "typo-SENTINEL-pw",
            key_line.as_str(),
        ] {
            assert!(!text.contains(secret), "{what} shows a secret ({secret})");
        }
    }
    pg.psql_script("postgres", &format!("DROP ROLE IF EXISTS {aq_user}"));
}
