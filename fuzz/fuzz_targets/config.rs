//! The config parser: arbitrary text as a TOML config file, a `postgres://` URL and a
//! `userlist.txt`, then, when the input holds NUL separators, the layered loader with the
//! environment, `--set` overrides and a profile taken from the input:
//!
//!     TOML \0 VAR=VALUE lines \0 --set KEY=VALUE lines \0 profile
//!
//! A config that loads is queried the way the proxy queries it. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_config::layers::Input;
use weir_config::load::{self, from_toml_str, parse_auth_file, parse_url};
use weir_config::model::Config;
use weir_config::problem::Problems;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Secrets and auth.file may name a file, which the loader reads; keep the fuzzer away
    // from endless or blocking ones (/dev/zero, /dev/stdin, /proc/...), including paths
    // spelled with TOML unicode escapes.
    if ["/dev", "/proc", "/sys", "\\u", "\\U"]
        .iter()
        .any(|s| text.contains(s))
    {
        return;
    }

    let _ = parse_url(&text);
    let _ = parse_auth_file(&text).map_err(|p| p.to_string());
    check(from_toml_str(&text, None));

    let mut parts = text.split('\0');
    let toml = parts.next().unwrap_or_default();
    let Some(env) = parts.next() else { return };
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sets: Vec<String> = parts
        .next()
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    let profile = parts.next();
    check(load::load(&Input {
        text: Some(toml),
        file_name: "fuzz.toml",
        base_dir: None,
        profile,
        env: &env,
        sets: &sets,
    }));
});

fn check(result: Result<(Config, Problems), Problems>) {
    let (config, problems) = match result {
        Ok(ok) => ok,
        Err(problems) => return drop(problems.to_string()),
    };
    let _ = (problems.to_string(), format!("{config:?}"));
    let _ = config.server_demand();
    let users: Vec<&str> = config
        .users
        .keys()
        .map(String::as_str)
        .chain([""])
        .collect();
    for db in config.databases.keys().map(String::as_str).chain(["nope"]) {
        for user in &users {
            let _ = config.pool_settings(db, user).clone();
            let _ = config.auth_type(db, user).to_string();
            let _ = config.server_login(db, user);
        }
    }
}
