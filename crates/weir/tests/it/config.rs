//! Config layering and `weir check`, through the `weir` binary.

use serde_json::Value;

use crate::common::*;

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-config-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `weir check` with `args` and extra environment: (exit code, stdout).
fn check(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    weir_cli(&[&["check"], args].concat(), env)
}

#[test]
fn check_gives_the_documented_exit_codes_and_names_every_problem() {
    let good = write_config(
        "good.toml",
        "[pool]\nsize = 10\n[databases.app]\nurl = \"postgres://app:pw@127.0.0.1:5432/app\"\n",
    );
    let (code, out) = check(&["--config", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.trim_end().ends_with("weir check: OK: no problems"),
        "{out}"
    );

    let bad = write_config(
        "bad.toml",
        "[pool]\nsize = 0\nquery_wait_timout = \"5s\"\nconnect_timeout = 5\nmin_size = 3\n\
         [databases.app]\nurl = \"mysql://app@db/app\"\n",
    );
    let (code, out) = check(&["--config", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    for want in [
        "pool.size",
        "pool.query_wait_timout",
        "did you mean `query_wait_timeout`?",
        "pool.connect_timeout",
        "line 4",
        "databases.app.url",
        "fix:",
    ] {
        assert!(out.contains(want), "missing {want:?}:\n{out}");
    }
    assert!(out.contains("weir check: FAILED: 4 errors"), "{out}");

    let risky = write_config(
        "risky.toml",
        "[pool]\nsize = 150\n[databases.app]\nurl = \"postgres://app:pw@127.0.0.1:5432/app\"\n",
    );
    let (code, out) = check(&["--config", risky.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("PASSED WITH WARNINGS"), "{out}");

    // The environment and --set are checked too; --json gives the same verdict.
    let (code, out) = check(
        &[
            "--config",
            good.to_str().unwrap(),
            "--json",
            "--set",
            "pool.size=many",
        ],
        &[("WEIR_POOL_SIZ", "3")],
    );
    assert_eq!(code, 1, "{out}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["exit_code"], 1);
    let paths: Vec<&str> = j["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec!["environment WEIR_POOL_SIZ", "pool.size"],
        "{out}"
    );

    let (code, out) = check(&["--config", "/nonexistent/weir.toml"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot read config file"), "{out}");
    let (code, _) = check(&["--no-such-flag"], &[]);
    assert_eq!(code, 64, "a usage error is not 'warnings only'");
}

#[test]
fn check_online_measures_the_server_and_tries_each_login() {
    let pg = PgServer::shared();
    let db = unique_db("check");
    pg.create_database(&db);
    let url = pg.url(SCRAM_USER, &db);
    let cfg = |size: u32, password: &str| {
        format!(
            "[pool]\nsize = {size}\n[databases.app]\nurl = \"{}\"\n",
            url.replace(SCRAM_USER.password, password)
        )
    };
    let fits = write_config("fits.toml", &cfg(5, SCRAM_USER.password));
    let (code, out) = check(
        &["--config", fits.to_str().unwrap(), "--online", "--json"],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let j: Value = serde_json::from_str(&out).unwrap();
    let server = &j["servers"][0];
    let max: i64 = pg
        .psql_script(&db, "show max_connections")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(server["max_connections"].as_i64().unwrap(), max);
    assert_eq!(server["weir_max_total"], 5);
    assert_eq!(j["logins"][0]["ok"], true, "{out}");

    // 300 connections a copy, two copies: beyond the server's 500.
    let (code, out) = check(
        &[
            "--config",
            fits.to_str().unwrap(),
            "--online",
            "--instances",
            "2",
            "--set",
            "pool.size=300",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("exceed the server's capacity"), "{out}");
    assert!(out.contains("2 instances x 300 = 600"), "{out}");

    // One copy of 300 fits, but without headroom once the reserved ones are counted? No:
    // 300 of ~497 leaves plenty; 460 does not leave 10%.
    let (code, out) = check(
        &[
            "--config",
            fits.to_str().unwrap(),
            "--online",
            "--set",
            "pool.size=460",
        ],
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("headroom"), "{out}");

    let wrong = write_config("wrong.toml", &cfg(5, "not-the-password"));
    let (code, out) = check(&["--config", wrong.to_str().unwrap(), "--online"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("login scram_user to app: FAILED") && out.contains("28P01"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_in_every_layer_resolves_file_profile_environment_command_line() {
    let pg = PgServer::shared();
    let db = unique_db("layers");
    pg.create_database(&db);
    let file = write_config(
        &format!("{db}.toml"),
        &format!(
            "[pool]\nsize = 1\n[databases.app]\nurl = \"{}\"\n[profiles.staging.pool]\nsize = 2\n",
            pg.url(SCRAM_USER, &db)
        ),
    );
    let size_of = |args: &[&str], env: &[(&str, &str)]| {
        let weir = WeirProcess::with_config(&file, args, env);
        let admin = weir.admin_addr();
        async move {
            let (status, _, body) = http_get(admin, "/api/config", None).await;
            assert_eq!(status, 200, "{body}");
            let j: Value = serde_json::from_str(&body).unwrap();
            let size = j["databases"]["app"]["pool"]["size"]
                .as_str()
                .unwrap()
                .to_string();
            drop(weir);
            size
        }
    };
    assert_eq!(size_of(&[], &[]).await, "1", "the file");
    assert_eq!(
        size_of(&["--profile", "staging"], &[]).await,
        "2",
        "the profile"
    );
    let env = [("WEIR_PROFILE", "staging"), ("WEIR_POOL_SIZE", "3")];
    assert_eq!(size_of(&[], &env).await, "3", "the environment");
    assert_eq!(
        size_of(&["--set", "pool.size=4"], &env).await,
        "4",
        "the command line"
    );
}
