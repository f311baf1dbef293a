//! Where each setting comes from, and which source wins.
//!
//! Lowest to highest:
//! 1. built-in defaults (in [`crate::model`]);
//! 2. the built-in defaults of the chosen profile (`development`, `test`, `production`);
//! 3. the config file;
//! 4. the file's own `[profiles.NAME]` table for the chosen profile;
//! 5. the environment: `WEIR_<SECTION>_<KEY>`, e.g. `WEIR_POOL_SIZE=30`,
//!    `WEIR_DATABASES_APP_URL=postgres://...`, `WEIR_USERS_APP_POOL_SIZE=5`;
//! 6. the command line: `--set pool.size=30`.
//!
//! Layers are merged as TOML tables before anything is typed, so one deserializer checks
//! them all and every problem can say where its value came from. A secret (a password,
//! `admin.token`, a database `url`) may be written as `{ env = "VAR" }` or
//! `{ file = "/run/secrets/x" }` instead of the value itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::model::PoolOverrides;
use crate::problem::{Problem, Problems};

/// The profiles Weir knows without a file saying anything about them.
pub const BUILTIN_PROFILES: &[(&str, &str)] = &[
    (
        "development",
        // Small pools, fail fast, and show slow statements early.
        "[pool]\nsize = 5\nquery_wait_timeout = \"5s\"\nslow_query_threshold = \"200ms\"\n\
         server_idle_timeout = \"1m\"\n",
    ),
    (
        "test",
        // Small pools, fail fast, no connection kept open between test runs.
        "[pool]\nsize = 5\nmin_size = 0\nquery_wait_timeout = \"5s\"\nconnect_timeout = \"2s\"\n\
         server_idle_timeout = \"10s\"\nslow_query_threshold = \"0s\"\n",
    ),
    (
        "production",
        // The built-in defaults, plus warm connections so the first requests after a
        // deploy do not pay for logins.
        "[pool]\nmin_size = 2\n",
    ),
];

/// Environment variables named `WEIR_*` that are not settings.
const NOT_SETTINGS: &[&str] = &["WEIR_PROFILE", "WEIR_CONFIG", "WEIR_LOG", "WEIR_ADMIN_ADDR"];

/// Whether a value looks like it carries a credential (a URL with a user or password), so it
/// is not repeated in messages whatever key it was given under.
pub(crate) fn looks_secret(value: &str) -> bool {
    value.contains("://") && value.contains('@')
}

/// Keys whose value is a secret: never merged key by key, may point at env or a file.
pub(crate) const SECRET_KEYS: &[&str] = &["password", "token", "url"];

/// Keys whose value stays a string when it comes from the environment or `--set`, even if
/// it looks like a number (a password of digits, a port-only listen address).
const STRING_KEYS: &[&str] = &[
    "listen",
    "shutdown_timeout",
    "client_login_timeout",
    "unix_socket_dir",
    "token",
    "type",
    "file",
    "url",
    "host",
    "dbname",
    "user",
    "password",
    "auth",
    "mode",
    "cert_file",
    "key_file",
    "ca_file",
    "query",
];

/// Where one setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in defaults of a profile.
    BuiltinProfile(String),
    /// The config file (line, if known).
    File { name: String, line: Option<usize> },
    /// The file's `[profiles.NAME]` table.
    FileProfile {
        name: String,
        profile: String,
        line: Option<usize>,
    },
    /// An environment variable.
    Env(String),
    /// A `--set KEY=VALUE` argument.
    Cli(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::BuiltinProfile(p) => write!(f, "profile {p}'s defaults"),
            Origin::File {
                name,
                line: Some(l),
            } => write!(f, "{name} line {l}"),
            Origin::File { name, line: None } => write!(f, "{name}"),
            Origin::FileProfile {
                name,
                profile,
                line,
            } => {
                write!(f, "{name} [profiles.{profile}]")?;
                if let Some(l) = line {
                    write!(f, " line {l}")?;
                }
                Ok(())
            }
            Origin::Env(var) => write!(f, "environment {var}"),
            Origin::Cli(arg) => write!(f, "--set {arg}"),
        }
    }
}

/// Everything a config is built from. The environment is passed in, so loading stays pure.
#[derive(Debug, Clone, Default)]
pub struct Input<'a> {
    /// The file's text, and its name for messages.
    pub text: Option<&'a str>,
    pub file_name: &'a str,
    /// Relative paths in the file are taken from here.
    pub base_dir: Option<&'a Path>,
    pub profile: Option<&'a str>,
    pub env: &'a [(String, String)],
    /// `KEY=VALUE` pairs from `--set`.
    pub sets: &'a [String],
}

/// The merged table, where each leaf came from, and the problems found merging.
pub struct Merged {
    pub table: Table,
    pub origins: BTreeMap<String, Origin>,
    pub profile: Option<String>,
}

/// Merges every layer. Errors here (invalid TOML, an unknown profile, a missing secret) are
/// collected in `problems`; the merge carries on with what it could read.
pub fn merge(input: &Input<'_>, problems: &mut Problems) -> Merged {
    let mut origins = BTreeMap::new();
    let mut file = match input.text {
        None => Table::new(),
        Some(text) => match text.parse::<Table>() {
            Ok(t) => t,
            Err(e) => {
                problems.push(
                    Problem::error(input.file_name, format!("invalid TOML: {e}"))
                        .fix("correct the syntax at the line shown"),
                );
                Table::new()
            }
        },
    };
    let lines = input.text.map(key_lines).unwrap_or_default();
    let file_profiles = match file.remove("profiles") {
        None => Table::new(),
        Some(Value::Table(t)) => t,
        Some(_) => {
            problems.push(
                Problem::error("profiles", "must be a table of profiles")
                    .fix("write [profiles.production] and the settings under it"),
            );
            Table::new()
        }
    };

    let mut merged = Table::new();
    let profile = input.profile.filter(|p| !p.is_empty());
    if let Some(name) = profile {
        let builtin = BUILTIN_PROFILES.iter().find(|(n, _)| *n == name);
        if builtin.is_none() && !file_profiles.contains_key(name) {
            let mut known: Vec<&str> = BUILTIN_PROFILES.iter().map(|(n, _)| *n).collect();
            known.extend(file_profiles.keys().map(String::as_str));
            let p = Problem::error("profile", format!("unknown profile `{name}`"));
            problems.push(match crate::load::closest(name, &known) {
                Some(k) => p.fix(format!("did you mean `{k}`? known: {}", known.join(", "))),
                None => p.fix(format!(
                    "use one of {}, or add [profiles.{name}] to the file",
                    known.join(", ")
                )),
            });
        }
        if let Some((_, text)) = builtin {
            let t: Table = text.parse().expect("built-in profiles are valid TOML");
            overlay(&mut merged, t, "", &mut origins, &|_| {
                Origin::BuiltinProfile(name.to_string())
            });
        }
    }
    let name = input.file_name.to_string();
    overlay(&mut merged, file, "", &mut origins, &|path| Origin::File {
        name: name.clone(),
        line: lines.get(path).copied(),
    });
    if let Some(p) = profile {
        match file_profiles.get(p) {
            Some(Value::Table(t)) => overlay(&mut merged, t.clone(), "", &mut origins, &|path| {
                Origin::FileProfile {
                    name: name.clone(),
                    profile: p.to_string(),
                    line: lines.get(&format!("profiles.{p}.{path}")).copied(),
                }
            }),
            Some(_) => problems.push(
                Problem::error(format!("profiles.{p}"), "must be a table")
                    .fix(format!("write [profiles.{p}] and the settings under it")),
            ),
            None => {}
        }
    }
    for (var, path, value) in env_settings(input.env, &merged, problems) {
        set_path(&mut merged, &path, value);
        origins.retain(|k: &String, _| k != &path && !k.starts_with(&format!("{path}.")));
        origins.insert(path, Origin::Env(var));
    }
    for arg in input.sets {
        let Some((path, raw)) = arg.split_once('=') else {
            problems.push(
                Problem::error(format!("--set {arg}"), "expected KEY=VALUE")
                    .fix("write it like --set pool.size=30"),
            );
            continue;
        };
        let path = path.trim().to_string();
        let parts: Vec<&str> = path.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            problems.push(
                Problem::error(format!("--set {path}=..."), "empty key segment")
                    .fix("write a dotted key like pool.size or databases.app.pool.size"),
            );
            continue;
        }
        set_path(
            &mut merged,
            &path,
            typed_value(parts.last().unwrap(), &path, raw.trim()),
        );
        origins.retain(|k: &String, _| k != &path && !k.starts_with(&format!("{path}.")));
        let shown = if SECRET_KEYS.contains(parts.last().unwrap()) || looks_secret(raw) {
            format!("{path}=<redacted>")
        } else {
            arg.clone()
        };
        origins.insert(path, Origin::Cli(shown));
    }
    resolve_secret_refs(&mut merged, "", input, &origins, problems);
    Merged {
        table: merged,
        origins,
        profile: profile.map(str::to_string),
    }
}

/// Lays `top` over `base`: tables merge key by key, anything else replaces. Records the
/// origin of every leaf of `top`.
fn overlay(
    base: &mut Table,
    top: Table,
    prefix: &str,
    origins: &mut BTreeMap<String, Origin>,
    origin: &dyn Fn(&str) -> Origin,
) {
    for (k, v) in top {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let is_secret = SECRET_KEYS.contains(&k.as_str());
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(t)) if !is_secret => {
                overlay(b, t, &path, origins, origin);
            }
            (_, Value::Table(t)) if !is_secret => {
                let mut fresh = Table::new();
                overlay(&mut fresh, t, &path, origins, origin);
                base.insert(k, Value::Table(fresh));
            }
            (_, v) => {
                origins.retain(|o, _| o != &path && !o.starts_with(&format!("{path}.")));
                origins.insert(path.clone(), origin(&path));
                base.insert(k, v);
            }
        }
    }
}

/// Sets a dotted path, creating tables on the way (a non-table in the way is replaced).
fn set_path(t: &mut Table, path: &str, value: Value) {
    let mut parts = path.split('.').peekable();
    let mut cur = t;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_string(), value);
            return;
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        cur = entry.as_table_mut().unwrap();
    }
}

/// A value from the environment or `--set`, typed by its key: strings stay strings for
/// keys that hold text, lists split at commas, numbers become numbers.
fn typed_value(key: &str, path: &str, raw: &str) -> Value {
    if path == "admin.users" || (path == "proxy.listen" && raw.contains(',')) {
        return Value::Array(
            raw.split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        );
    }
    let kind = PoolOverrides::TYPES
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, t)| *t);
    let text_like = STRING_KEYS.contains(&key) || matches!(kind, Some("Duration" | "String"));
    if !text_like {
        if let Ok(i) = raw.parse::<i64>() {
            return Value::Integer(i);
        }
        if let Ok(f) = raw.parse::<f64>() {
            return Value::Float(f);
        }
        if let Ok(b) = raw.parse::<bool>() {
            return Value::Boolean(b);
        }
    }
    Value::String(raw.to_string())
}

/// `WEIR_<SECTION>_<KEY>` variables as (variable, dotted path, value). Names of databases
/// and users match those already configured case-insensitively, else are taken lower-cased.
fn env_settings(
    env: &[(String, String)],
    merged: &Table,
    problems: &mut Problems,
) -> Vec<(String, String, Value)> {
    use crate::load::{
        ADMIN_KEYS, AUTH_KEYS, DATABASE_KEYS, PROXY_KEYS, SERVER_TLS_KEYS, TLS_KEYS, USER_KEYS,
    };
    let names = |section: &str| -> Vec<String> {
        merged
            .get(section)
            .and_then(Value::as_table)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut sorted: Vec<&(String, String)> = env.iter().collect();
    sorted.sort();
    for (var, raw) in sorted {
        let Some(rest) = var.strip_prefix("WEIR_") else {
            continue;
        };
        if NOT_SETTINGS.contains(&var.as_str()) {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let (section, key) = match rest.strip_prefix("server_tls_") {
            Some(key) => ("server_tls", key),
            None => rest.split_once('_').unwrap_or((&rest, "")),
        };
        let path = match section {
            "proxy" | "admin" | "pool" | "auth" | "tls" | "server_tls" => {
                let keys: &[&str] = match section {
                    "proxy" => PROXY_KEYS,
                    "admin" => ADMIN_KEYS,
                    "pool" => PoolOverrides::KEYS,
                    "tls" => TLS_KEYS,
                    "server_tls" => SERVER_TLS_KEYS,
                    _ => AUTH_KEYS,
                };
                if !keys.contains(&key) {
                    let p = Problem::error(
                        format!("environment {var}"),
                        format!("`{key}` is not a key of [{section}]"),
                    );
                    problems.push(match crate::load::closest(key, keys) {
                        Some(k) => p.fix(format!(
                            "did you mean WEIR_{}_{}?",
                            section.to_uppercase(),
                            k.to_uppercase()
                        )),
                        None => p.fix(format!("allowed: {}", keys.join(", "))),
                    });
                    continue;
                }
                format!("{section}.{key}")
            }
            "databases" | "users" => {
                let own: &[&str] = if section == "databases" {
                    DATABASE_KEYS
                } else {
                    USER_KEYS
                };
                // The longest known key at the end wins: `..._POOL_SIZE` before `..._SIZE`.
                let pool_key = PoolOverrides::KEYS
                    .iter()
                    .filter(|k| key.ends_with(&format!("_pool_{k}")))
                    .max_by_key(|k| k.len())
                    .map(|k| format!("pool.{k}"));
                let own_key = own
                    .iter()
                    .filter(|k| **k != "pool" && key.ends_with(&format!("_{k}")))
                    .max_by_key(|k| k.len())
                    .map(|k| k.to_string());
                let Some(leaf) = pool_key.or(own_key) else {
                    problems.push(
                        Problem::error(
                            format!("environment {var}"),
                            format!("no key of [{section}.NAME] ends this name"),
                        )
                        .fix(format!(
                            "write WEIR_{}_<NAME>_<KEY> with KEY one of {}",
                            section.to_uppercase(),
                            own.join(", ").to_uppercase()
                        )),
                    );
                    continue;
                };
                let name_len = key.len() - leaf.len() - 1;
                let lower = &key[..name_len];
                if lower.is_empty() {
                    problems.push(
                        Problem::error(format!("environment {var}"), "no name before the key").fix(
                            format!(
                                "write WEIR_{}_<NAME>_{}",
                                section.to_uppercase(),
                                leaf.replace('.', "_").to_uppercase()
                            ),
                        ),
                    );
                    continue;
                }
                let name = names(section)
                    .into_iter()
                    .find(|n| n.eq_ignore_ascii_case(lower))
                    .unwrap_or_else(|| lower.to_string());
                format!("{section}.{name}.{leaf}")
            }
            _ => {
                problems.push(
                    Problem::warning(format!("environment {var}"), "not a Weir setting: ignored")
                        .fix(
                            "settings are WEIR_PROXY_*, WEIR_ADMIN_*, WEIR_POOL_*, WEIR_AUTH_*, \
                         WEIR_DATABASES_*, WEIR_USERS_*",
                        ),
                );
                continue;
            }
        };
        let leaf = path.rsplit('.').next().unwrap().to_string();
        out.push((var.clone(), path.clone(), typed_value(&leaf, &path, raw)));
    }
    out
}

/// Replaces `{ env = "VAR" }` and `{ file = "PATH" }` under secret keys with the secret.
fn resolve_secret_refs(
    t: &mut Table,
    prefix: &str,
    input: &Input<'_>,
    origins: &BTreeMap<String, Origin>,
    problems: &mut Problems,
) {
    for (k, v) in t.iter_mut() {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let Value::Table(inner) = v else { continue };
        if !SECRET_KEYS.contains(&k.as_str()) {
            resolve_secret_refs(inner, &path, input, origins, problems);
            continue;
        }
        let from = origins
            .get(&path)
            .map(|o| format!(" (set in {o})"))
            .unwrap_or_default();
        let resolved = match (inner.get("env"), inner.get("file"), inner.len()) {
            (Some(Value::String(var)), None, 1) => match input.env.iter().find(|(k, _)| k == var) {
                Some((_, val)) => Ok(val.clone()),
                None => Err(Problem::error(
                    path.clone(),
                    format!("environment variable {var} is not set{from}"),
                )
                .fix(format!("export {var}, or write the value in the file"))),
            },
            (None, Some(Value::String(file)), 1) => {
                let p = PathBuf::from(file);
                let p = match input.base_dir {
                    Some(b) if p.is_relative() => b.join(p),
                    _ => p,
                };
                std::fs::read_to_string(&p)
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                    .map_err(|e| {
                        Problem::error(
                            path.clone(),
                            format!("cannot read {}: {e}{from}", p.display()),
                        )
                        .fix("point it at a readable file holding only the secret")
                    })
            }
            _ => Err(Problem::error(
                path.clone(),
                format!("a secret is a string, {{ env = \"VAR\" }} or {{ file = \"PATH\" }}{from}"),
            )
            .fix(format!("write {k} = {{ env = \"MY_SECRET\" }}"))),
        };
        match resolved {
            Ok(s) => *v = Value::String(s),
            Err(p) => {
                problems.push(p);
                *v = Value::String(String::new());
            }
        }
    }
}

/// The line of every key in a TOML text, by dotted path.
fn key_lines(text: &str) -> BTreeMap<String, usize> {
    fn walk(
        t: &toml::de::DeTable<'_>,
        prefix: &str,
        text: &str,
        out: &mut BTreeMap<String, usize>,
    ) {
        for (k, v) in t.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            let at = k.span().start.min(text.len());
            let line = text[..at].bytes().filter(|b| *b == b'\n').count() + 1;
            out.entry(path.clone()).or_insert(line);
            if let toml::de::DeValue::Table(inner) = v.get_ref() {
                walk(inner, &path, text, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(t) = toml::de::DeTable::parse(text) {
        walk(t.get_ref(), "", text, &mut out);
    }
    out
}

/// Where a problem's value came from: the origin of its path or of the nearest parent.
pub fn origin_of<'a>(origins: &'a BTreeMap<String, Origin>, path: &str) -> Option<&'a Origin> {
    let mut p = path.split('[').next().unwrap_or(path);
    loop {
        if let Some(o) = origins.get(p) {
            return Some(o);
        }
        p = p.rsplit_once('.')?.0;
    }
}
