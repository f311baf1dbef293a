use super::*;
use std::time::Duration;

const EXAMPLE: &str = r#"
[proxy]
listen = ["127.0.0.1:6432", "[::1]:6432"]

[pool]
mode = "transaction"
size = 10
query_wait_timeout = "2s"

[auth]
type = "md5"

[databases.app]
url = "postgres://app_owner:p%40ss@db.internal:5433/app_prod"
pool.size = 5

[databases.reports]
host = "/var/run/postgresql"
auth = "scram-sha-256"

[users.alice]
password = "secret"
pool.mode = "session"

[users.bob]
password = "md532e12f215ba27cb750c9e093ce4b5127"
"#;

#[test]
fn example_resolves_with_layers() {
    let (c, warnings) = from_toml_str(EXAMPLE, None).unwrap();
    assert!(!warnings.has_errors());
    assert_eq!(c.proxy.listen.len(), 2);
    let app = &c.databases["app"];
    assert_eq!(
        (app.host.as_str(), app.port, app.dbname.as_str()),
        ("db.internal", 5433, "app_prod")
    );
    assert_eq!(app.user.as_deref(), Some("app_owner"));
    assert_eq!(app.password.as_ref().unwrap().expose(), "p@ss");
    assert_eq!(c.databases["reports"].dbname, "reports");

    // defaults < [pool] < database < user
    let s = c.pool_settings("app", "bob");
    assert_eq!(
        (s.size, s.mode, s.query_wait_timeout),
        (5, PoolMode::Transaction, Duration::from_secs(2))
    );
    let s = c.pool_settings("app", "alice");
    assert_eq!((s.size, s.mode), (5, PoolMode::Session));
    let s = c.pool_settings("reports", "bob");
    assert_eq!(s.size, 10);
    assert_eq!(s.connect_timeout, PoolSettings::default().connect_timeout);

    assert_eq!(c.auth_type("app", "bob"), AuthType::Md5);
    assert_eq!(c.auth_type("reports", "bob"), AuthType::ScramSha256);

    let login = c.server_login("app", "bob").unwrap();
    assert_eq!(login.user, "app_owner", "the database's user is forced");
    let login = c.server_login("reports", "alice").unwrap();
    assert_eq!(
        (login.user.as_str(), login.password.unwrap().expose()),
        ("alice", "secret")
    );
}

#[test]
fn unknown_keys_are_all_reported_with_suggestions() {
    let text = "[pool]\nsise = 3\nquery_wait_timout = \"1s\"\n[databases.app]\nurl = \"postgres://u:p@h/d\"\npool.mod = \"session\"\n";
    let err = from_toml_str(text, None).unwrap_err();
    let msgs: Vec<String> = err.errors().map(|p| p.to_string()).collect();
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("pool.sise") && m.contains("`size`")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("pool.query_wait_timout") && m.contains("`query_wait_timeout`"))
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("databases.app.pool.mod") && m.contains("`mode`"))
    );
}

#[test]
fn wrong_type_names_the_key_and_line() {
    let err = from_toml_str("[pool]\nsize = \"ten\"\n", None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("size") && msg.contains("line 2"), "{msg}");
}

#[test]
fn semantic_errors_are_collected_together() {
    let text = "[proxy]\nlisten = \"nowhere\"\n[pool]\nsize = 0\nconnect_timeout = \"1ms\"\n[users.x]\nauth = \"md5\"\n";
    let err = from_toml_str(text, None).unwrap_err();
    let paths: Vec<&str> = err.errors().map(|p| p.path.as_str()).collect();
    for want in [
        "proxy.listen[0]",
        "pool.size",
        "pool.connect_timeout",
        "users.x.password",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn bad_url_is_an_error_with_fix() {
    let err = from_toml_str("[databases.a]\nurl = \"mysql://x@y/z\"\n", None).unwrap_err();
    let p = err.errors().next().unwrap();
    assert_eq!(p.path, "databases.a.url");
    assert!(p.fix.as_deref().unwrap().contains("postgres://"));
}

#[test]
fn big_pool_is_a_warning_not_an_error() {
    let (_, problems) = from_toml_str("[pool]\nsize = 150\n[databases.a]\n", None).unwrap();
    assert_eq!(problems.warnings().count(), 1);
}

#[test]
fn url_forms() {
    let u = parse_url("postgresql://u@%2Ftmp/db").unwrap();
    assert_eq!(u.host, "/tmp");
    let u = parse_url("postgres:///db?host=/run/pg").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.dbname.as_deref()),
        ("/run/pg", 5432, Some("db"))
    );
    assert!(u.user.is_none() && u.password.is_none());
    assert!(parse_url("postgres://h/db?weird=1").is_err());
}

#[test]
fn auth_file_format() {
    let text = "; comment\n\"alice\" \"secret\"\n  \"b\"\"ob\" \"md5abc\"\n\n";
    let entries = parse_auth_file(text).unwrap();
    assert_eq!(
        entries,
        vec![
            ("alice".into(), "secret".into()),
            ("b\"ob".into(), "md5abc".into())
        ]
    );
    let err = parse_auth_file("alice secret\n").unwrap_err();
    assert_eq!(err.path, "auth.file line 1");
}

#[test]
fn auth_file_fills_users() {
    let dir = std::env::temp_dir().join(format!("weir-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("userlist.txt"), "\"carol\" \"pw\"\n").unwrap();
    let (c, _) = from_toml_str(
        "[auth]\nfile = \"userlist.txt\"\n[databases.a]\n",
        Some(&dir),
    )
    .unwrap();
    assert_eq!(c.users["carol"].password.as_ref().unwrap().expose(), "pw");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_do_not_print() {
    let (c, _) = from_toml_str(EXAMPLE, None).unwrap();
    let dump = format!("{c:?}");
    assert!(!dump.contains("secret") && !dump.contains("p@ss"), "{dump}");
}

#[test]
fn quick_start_serves_one_database() {
    let c = QuickStart {
        listen: "127.0.0.1:0".parse().unwrap(),
        server_url: "postgres://app:pw@127.0.0.1:5432/appdb".into(),
        pool_size: 7,
        pool_mode: PoolMode::Transaction,
        admin_listen: None,
        admin_token: None,
    }
    .build()
    .unwrap();
    assert_eq!(c.pool_settings("appdb", "app").size, 7);
    assert_eq!(c.users["app"].password.as_ref().unwrap().expose(), "pw");
    assert_eq!(c.server_login("appdb", "app").unwrap().user, "app");
}

#[test]
fn shipped_example_config_is_valid() {
    let text = include_str!("../../../../weir.example.toml");
    let (c, problems) =
        from_toml_str(text, None).unwrap_or_else(|p| panic!("weir.example.toml: {p}"));
    assert!(problems.0.is_empty(), "{problems}");
    assert_eq!(
        c.pool_settings("app", "app"),
        PoolSettings::default(),
        "the example documents the defaults"
    );
}

#[test]
fn pool_settings_cross_checks() {
    let text = "[pool]\nsize = 5\nmin_size = 6\nutilisation_warning = 95\nconnect_retry_multiplier = 0.5\n\
                [databases.a]\n[users.u]\npassword = \"x\"\npool.max_db_connections = 3\n";
    let err = from_toml_str(text, None).unwrap_err();
    let paths: Vec<&str> = err.errors().map(|p| p.path.as_str()).collect();
    for want in [
        "databases.a.pool.min_size",
        "databases.a.pool.utilisation_warning",
        "pool.connect_retry_multiplier",
        "users.u.pool.max_db_connections",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn zero_turns_timeouts_off_but_tiny_values_are_errors() {
    let (c, _) = from_toml_str("[pool]\nquery_timeout = \"0s\"\n[databases.a]\n", None).unwrap();
    assert!(c.pool_settings("a", "").query_timeout.is_zero());
    let err = from_toml_str("[pool]\nquery_timeout = \"1ms\"\n[databases.a]\n", None).unwrap_err();
    assert!(err.to_string().contains("0 turns it off"), "{err}");
}

#[test]
fn lifecycle_contradictions_are_reported() {
    let text = "[proxy]\nmax_client_conn = 0\n[pool]\nmin_size = 5\nmax_db_connections = 3\nconnect_retry_initial = \"0s\"\n\
                reserve_size = 2\nreserve_timeout = \"40s\"\n[databases.a]\nurl = \"postgres://owner:pw@h/a\"\n\
                [users.alice]\npassword = \"x\"\npool.mode = \"session\"\n";
    let err = from_toml_str(text, None).unwrap_err();
    let all: Vec<String> = err.0.iter().map(|p| format!("{p}")).collect();
    let has =
        |path: &str, level: &str| all.iter().any(|m| m.starts_with(level) && m.contains(path));
    assert!(has("proxy.max_client_conn", "error"), "{all:?}");
    assert!(has("databases.a.pool.min_size", "error"), "{all:?}");
    assert!(has("pool.connect_retry_initial", "error"), "{all:?}");
    assert!(
        has("databases.a.pool.reserve_timeout", "warning"),
        "{all:?}"
    );
    assert!(
        has("users.alice.pool", "warning"),
        "ignored overrides for a fixed-user database: {all:?}"
    );
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn layered(
    text: &str,
    profile: Option<&str>,
    vars: &[(&str, &str)],
    sets: &[&str],
) -> Result<(Config, Problems), Problems> {
    let vars = env(vars);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    load(&Input {
        text: Some(text),
        file_name: "weir.toml",
        profile,
        env: &vars,
        sets: &sets,
        ..Default::default()
    })
}

const LAYERED: &str = "[pool]\nsize = 11\n[databases.app]\nurl = \"postgres://o:pw@h/app\"\n\
                       [profiles.production.pool]\nsize = 22\n";

#[test]
fn precedence_is_file_then_profile_then_environment_then_command_line() {
    let size = |c: &Config| c.pool_settings("app", "o").size;
    let (c, _) = layered(LAYERED, None, &[], &[]).unwrap();
    assert_eq!(size(&c), 11, "the file");
    let (c, _) = layered(LAYERED, Some("production"), &[], &[]).unwrap();
    assert_eq!(size(&c), 22, "the file's profile beats the file");
    assert_eq!(c.profile.as_deref(), Some("production"));
    assert_eq!(
        c.pool_settings("app", "o").min_size,
        2,
        "the built-in production defaults apply where the file is silent"
    );
    let e = [("WEIR_POOL_SIZE", "33")];
    let (c, _) = layered(LAYERED, Some("production"), &e, &[]).unwrap();
    assert_eq!(size(&c), 33, "the environment beats the profile");
    let (c, _) = layered(LAYERED, Some("production"), &e, &["pool.size=44"]).unwrap();
    assert_eq!(size(&c), 44, "the command line beats the environment");
    // A built-in profile's defaults sit below the file.
    let (c, _) = layered(LAYERED, Some("development"), &[], &[]).unwrap();
    assert_eq!(size(&c), 11, "the file beats a built-in profile's defaults");
    assert_eq!(
        c.pool_settings("app", "o").slow_query_threshold,
        Duration::from_millis(200)
    );
}

#[test]
fn environment_reaches_every_section_and_named_tables() {
    let text =
        "[databases.App_DB]\nurl = \"postgres://o:pw@h/app\"\n[users.alice]\npassword = \"x\"\n";
    let e = [
        ("WEIR_PROXY_LISTEN", "0.0.0.0:7000,127.0.0.1:7001"),
        ("WEIR_ADMIN_TOKEN", "12345"),
        ("WEIR_ADMIN_USERS", "alice,bob"),
        ("WEIR_POOL_QUERY_WAIT_TIMEOUT", "7s"),
        ("WEIR_DATABASES_APP_DB_POOL_SIZE", "9"),
        ("WEIR_DATABASES_APP_DB_PORT", "5544"),
        ("WEIR_USERS_ALICE_PASSWORD", "007"),
        ("WEIR_USERS_BOB_PASSWORD", "b0b"),
        ("WEIR_LOG", "debug"),
    ];
    let (c, warnings) = layered(text, None, &e, &[]).unwrap();
    assert!(warnings.0.is_empty(), "{warnings}");
    assert_eq!(c.proxy.listen.len(), 2);
    assert_eq!(c.admin.token.as_ref().unwrap().expose(), "12345");
    assert_eq!(c.admin.users, vec!["alice", "bob"]);
    assert_eq!(
        c.databases["App_DB"].port, 5544,
        "names match case-insensitively"
    );
    assert_eq!(c.pool_settings("App_DB", "o").size, 9);
    assert_eq!(
        c.pool_settings("App_DB", "o").query_wait_timeout,
        Duration::from_secs(7)
    );
    assert_eq!(c.users["alice"].password.as_ref().unwrap().expose(), "007");
    assert_eq!(
        c.users["bob"].password.as_ref().unwrap().expose(),
        "b0b",
        "a user may be defined by the environment alone"
    );
}

#[test]
fn environment_typos_are_named_with_a_suggestion() {
    let err = layered(LAYERED, None, &[("WEIR_POOL_SIZ", "3")], &[]).unwrap_err();
    let p = err.errors().next().unwrap();
    assert_eq!(p.path, "environment WEIR_POOL_SIZ");
    assert!(p.fix.as_deref().unwrap().contains("WEIR_POOL_SIZE"), "{p}");
    let (_, w) = layered(LAYERED, None, &[("WEIR_POLL_SIZE", "3")], &[]).unwrap();
    assert!(w.to_string().contains("WEIR_POLL_SIZE"), "{w}");
}

#[test]
fn wrong_values_from_any_layer_name_the_key_the_value_and_the_source() {
    let err = layered(
        "[pool]\nconnect_timeout = 5\n[databases.app]\n",
        None,
        &[("WEIR_POOL_SIZE", "lots")],
        &["pool.mode=sometimes"],
    )
    .unwrap_err();
    let all = err.to_string();
    for want in [
        "pool.connect_timeout",
        "weir.toml line 2",
        "pool.size",
        "\"lots\"",
        "WEIR_POOL_SIZE",
        "pool.mode",
        "sometimes",
        "--set pool.mode=sometimes",
    ] {
        assert!(all.contains(want), "missing {want}:\n{all}");
    }
    assert_eq!(err.errors().count(), 3, "every wrong value at once:\n{all}");
}

#[test]
fn unknown_profile_suggests_the_closest() {
    let err = layered(LAYERED, Some("prodution"), &[], &[]).unwrap_err();
    let p = err.errors().next().unwrap();
    assert_eq!(p.path, "profile");
    assert!(p.fix.as_deref().unwrap().contains("`production`"), "{p}");
}

#[test]
fn secrets_come_from_the_environment_or_a_file() {
    let dir = std::env::temp_dir().join(format!("weir-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "from-a-file\n").unwrap();
    let text = "[admin]\ntoken = { file = \"token\" }\n[databases.app]\nurl = { env = \"APP_URL\" }\n\
                [users.u]\npassword = { env = \"U_PW\" }\n";
    let vars = env(&[
        ("APP_URL", "postgres://o:s3cret@db:5433/app"),
        ("U_PW", "pw"),
    ]);
    let (c, _) = load(&Input {
        text: Some(text),
        file_name: "weir.toml",
        base_dir: Some(&dir),
        env: &vars,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.admin.token.as_ref().unwrap().expose(), "from-a-file");
    assert_eq!(c.databases["app"].port, 5433);
    assert_eq!(
        c.databases["app"].password.as_ref().unwrap().expose(),
        "s3cret"
    );
    assert_eq!(c.users["u"].password.as_ref().unwrap().expose(), "pw");
    let err = load(&Input {
        text: Some(text),
        file_name: "weir.toml",
        base_dir: Some(&dir),
        env: &vars[..1],
        ..Default::default()
    })
    .unwrap_err();
    let p = err.errors().next().unwrap();
    assert_eq!(p.path, "users.u.password");
    assert!(p.message.contains("U_PW"), "{p}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pools_beyond_what_a_server_takes_are_a_warning() {
    let text = "[pool]\nsize = 40\n[databases.a]\nhost = \"db\"\n[databases.b]\nhost = \"db\"\n\
                [users.x]\npassword = \"p\"\n[users.y]\npassword = \"p\"\n";
    let (c, w) = from_toml_str(text, None).unwrap();
    assert_eq!(c.server_demand()["db:5432"], 160);
    assert!(w.to_string().contains("160"), "{w}");
    let capped = format!("{text}[databases.a.pool]\nmax_db_connections = 10\n");
    let (c, _) = from_toml_str(&capped, None).unwrap();
    assert_eq!(c.server_demand()["db:5432"], 90);
}

#[test]
fn every_key_is_in_the_config_reference() {
    use crate::load::{
        ACCESS_KEYS, ADMIN_KEYS, AUTH_KEYS, DATABASE_KEYS, PROXY_KEYS, SERVER_TLS_KEYS, TLS_KEYS,
        USER_KEYS,
    };
    let doc = include_str!("../../../../docs/CONFIG.md");
    let mut missing = Vec::new();
    let sections: [(&str, &[&str]); 9] = [
        ("tls.", TLS_KEYS),
        ("server_tls.", SERVER_TLS_KEYS),
        ("access[].", ACCESS_KEYS),
        ("proxy.", PROXY_KEYS),
        ("admin.", ADMIN_KEYS),
        ("auth.", AUTH_KEYS),
        ("pool.", PoolOverrides::KEYS),
        ("databases.NAME.", DATABASE_KEYS),
        ("users.NAME.", USER_KEYS),
    ];
    for (prefix, keys) in sections {
        for key in keys {
            let row = format!("| `{prefix}{key}` |");
            if !doc.contains(&row) {
                missing.push(row);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/CONFIG.md lacks a row for: {missing:?}"
    );
    // And no row for a key Weir does not accept.
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let key = line[3..].split('`').next().unwrap();
        let known = sections
            .iter()
            .any(|(prefix, keys)| key.strip_prefix(prefix).is_some_and(|k| keys.contains(&k)))
            || key == "profiles.NAME"
            || !key.contains('.');
        assert!(
            known,
            "docs/CONFIG.md documents `{key}`, which Weir does not accept"
        );
    }
}

#[test]
fn a_url_with_credentials_under_the_wrong_key_is_not_repeated() {
    // A URL given where a database table belongs: the type error must not quote it.
    let err = layered(
        "[databases.app]\nurl = \"postgres://o:pw@h/app\"\n",
        None,
        &[],
        &["databases.app=postgres://u:hunter2@h/db"],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("databases.app"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn the_login_timeout_is_checked_against_its_floor_and_the_failed_login_pause() {
    let (c, problems) = from_toml_str("[databases.a]\n", None).unwrap();
    assert_eq!(c.proxy.client_login_timeout, Duration::from_secs(30));
    assert_eq!(problems.warnings().count(), 0);
    let (c, _) = from_toml_str(
        "[proxy]\nclient_login_timeout = \"5s\"\n[databases.a]\n",
        None,
    )
    .unwrap();
    assert_eq!(c.proxy.client_login_timeout, Duration::from_secs(5));
    let err = from_toml_str(
        "[proxy]\nclient_login_timeout = \"10ms\"\n[databases.a]\n",
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("proxy.client_login_timeout"),
        "{err}"
    );
    let (_, problems) = from_toml_str(
        "[proxy]\nclient_login_timeout = \"2s\"\n[databases.a]\n",
        None,
    )
    .unwrap();
    let all: Vec<String> = problems.0.iter().map(|p| format!("{p}")).collect();
    assert!(
        all.iter()
            .any(|m| m.starts_with("warning") && m.contains("auth.failed_login_delay_max")),
        "{all:?}"
    );
}
