//! From TOML text (or the quick-start flags) to a validated [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::Deserialize;

use crate::layers::Input;
use crate::model::*;
use crate::problem::{Problem, Problems};

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    pool: PoolOverrides,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    databases: BTreeMap<String, RawDatabase>,
    #[serde(default)]
    users: BTreeMap<String, RawUser>,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    server_tls: RawServerTls,
    #[serde(default)]
    access: Vec<RawAccess>,
}

#[derive(Deserialize, Default)]
struct RawTls {
    mode: Option<ClientTlsMode>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct RawServerTls {
    mode: Option<ServerTlsMode>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Action {
    Allow,
    Reject,
}

#[derive(Deserialize)]
struct RawAccess {
    name: Option<String>,
    action: Action,
    address: Option<String>,
    database: Option<OneOrMany>,
    user: Option<OneOrMany>,
    #[serde(default)]
    require_tls: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct RawProxy {
    listen: Option<OneOrMany>,
    unix_socket_dir: Option<PathBuf>,
    workers: Option<usize>,
    max_message_size: Option<u32>,
    max_client_conn: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    shutdown_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    client_login_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
struct RawAdmin {
    /// An address, or "" / "off" to turn the listener off.
    listen: Option<String>,
    token: Option<Secret>,
    #[serde(default)]
    users: Vec<String>,
}

#[derive(Deserialize, Default)]
struct RawAuth {
    #[serde(rename = "type")]
    kind: Option<AuthType>,
    file: Option<PathBuf>,
    user: Option<String>,
    query: Option<String>,
    #[serde(default, with = "humantime_serde")]
    cache_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    failed_login_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    failed_login_delay_max: Option<Duration>,
}

#[derive(Deserialize, Default)]
struct RawDatabase {
    url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    dbname: Option<String>,
    user: Option<String>,
    password: Option<Secret>,
    auth: Option<AuthType>,
    #[serde(default)]
    pool: PoolOverrides,
    #[serde(default)]
    max_client_conn: u32,
}

#[derive(Deserialize, Default)]
struct RawUser {
    password: Option<Secret>,
    auth: Option<AuthType>,
    #[serde(default)]
    pool: PoolOverrides,
    #[serde(default)]
    max_client_conn: u32,
}

pub(crate) const TOP_KEYS: &[&str] = &[
    "proxy",
    "admin",
    "pool",
    "auth",
    "databases",
    "users",
    "tls",
    "server_tls",
    "access",
];
pub(crate) const TLS_KEYS: &[&str] = &["mode", "cert_file", "key_file"];
pub(crate) const SERVER_TLS_KEYS: &[&str] = &["mode", "ca_file", "cert_file", "key_file"];
pub(crate) const ACCESS_KEYS: &[&str] = &[
    "name",
    "action",
    "address",
    "database",
    "user",
    "require_tls",
];
pub(crate) const ADMIN_KEYS: &[&str] = &["listen", "token", "users"];
pub(crate) const PROXY_KEYS: &[&str] = &[
    "listen",
    "unix_socket_dir",
    "workers",
    "max_message_size",
    "max_client_conn",
    "shutdown_timeout",
    "client_login_timeout",
];
const POOL_KEYS: &[&str] = PoolOverrides::KEYS;
pub(crate) const AUTH_KEYS: &[&str] = &[
    "type",
    "file",
    "user",
    "query",
    "cache_ttl",
    "failed_login_delay",
    "failed_login_delay_max",
];
pub(crate) const DATABASE_KEYS: &[&str] = &[
    "url",
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "auth",
    "pool",
    "max_client_conn",
];
pub(crate) const USER_KEYS: &[&str] = &["password", "auth", "pool", "max_client_conn"];

/// The keys allowed at a dotted path's parent, for "did you mean".
fn known_keys(path: &[&str]) -> &'static [&'static str] {
    match path {
        [_] => TOP_KEYS,
        ["proxy", _] => PROXY_KEYS,
        ["admin", _] => ADMIN_KEYS,
        ["pool", _] => POOL_KEYS,
        ["auth", _] => AUTH_KEYS,
        ["tls", _] => TLS_KEYS,
        ["server_tls", _] => SERVER_TLS_KEYS,
        ["access", _, _] => ACCESS_KEYS,
        ["databases", _, "pool", _] | ["users", _, "pool", _] => POOL_KEYS,
        ["databases", _, _] => DATABASE_KEYS,
        ["users", _, _] => USER_KEYS,
        _ => &[],
    }
}

/// The candidate closest to `key` by edit distance, if close enough to be a likely typo.
pub(crate) fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .map(|(_, k)| k)
}

fn unknown_key(path: &str) -> Problem {
    let parts: Vec<&str> = path.split('.').collect();
    let key = parts.last().copied().unwrap_or_default();
    let p = Problem::error(path, format!("unknown key `{key}`"));
    match closest(key, known_keys(&parts)) {
        Some(k) => p.fix(format!("did you mean `{k}`?")),
        None => p.fix(format!(
            "remove it; allowed here: {}",
            known_keys(&parts).join(", ")
        )),
    }
}

/// How to load a config: the file, the profile and the `--set` overrides. The environment
/// is given at load time, so a reload reads it afresh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub file: Option<PathBuf>,
    pub profile: Option<String>,
    pub sets: Vec<String>,
}

impl Source {
    /// Loads and validates every layer (see [`crate::layers`]).
    pub fn load(&self, env: &[(String, String)]) -> Result<(Config, Problems), Problems> {
        let text = match &self.file {
            None => None,
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                Problems(vec![
                    Problem::error(
                        path.display().to_string(),
                        format!("cannot read config file: {e}"),
                    )
                    .fix("check the path given to --config (or WEIR_CONFIG)"),
                ])
            })?),
        };
        let name = self
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(no file)".into());
        load(&Input {
            text: text.as_deref(),
            file_name: &name,
            base_dir: self.file.as_deref().and_then(Path::parent),
            profile: self.profile.as_deref(),
            env,
            sets: &self.sets,
        })
    }
}

/// Reads and validates a config file alone (no profile, environment or overrides).
/// Relative paths inside it (auth file, socket dir) are taken relative to its directory.
pub fn from_file(path: &Path) -> Result<(Config, Problems), Problems> {
    Source {
        file: Some(path.to_path_buf()),
        ..Default::default()
    }
    .load(&[])
}

/// Parses and validates TOML text alone. On success returns the config with any warnings;
/// on failure every problem found (errors and warnings).
pub fn from_toml_str(text: &str, base_dir: Option<&Path>) -> Result<(Config, Problems), Problems> {
    load(&Input {
        text: Some(text),
        file_name: "config",
        base_dir,
        ..Default::default()
    })
}

/// Merges the layers, types them, resolves and validates. Every problem names the key and,
/// where known, the layer its value came from.
pub fn load(input: &Input<'_>) -> Result<(Config, Problems), Problems> {
    let mut problems = Problems::default();
    let merged = crate::layers::merge(input, &mut problems);
    let raw = deserialize(merged.table, &mut problems);
    let mut config = resolve(raw, input.base_dir, &mut problems);
    config.profile = merged.profile;
    validate(&config, &mut problems);
    for p in &mut problems.0 {
        if let Some(o) = crate::layers::origin_of(&merged.origins, &p.path) {
            p.message = format!("{} (from {o})", p.message);
        }
    }
    if problems.has_errors() {
        Err(problems)
    } else {
        Ok((config, problems))
    }
}

/// Types the merged table. A value of the wrong type is reported and dropped, and typing
/// tries again, so every such problem is found in one pass.
fn deserialize(mut table: toml::Table, problems: &mut Problems) -> RawConfig {
    for _ in 0..64 {
        let mut unknown: Vec<String> = Vec::new();
        let mut note = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
        let de = serde_ignored::Deserializer::new(toml::Value::Table(table.clone()), &mut note);
        match serde_path_to_error::deserialize::<_, RawConfig>(de) {
            Ok(raw) => {
                for path in unknown {
                    problems.push(unknown_key(&path));
                }
                return raw;
            }
            Err(e) => {
                let keys: Vec<String> = e
                    .path()
                    .iter()
                    .map_while(|seg| match seg {
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        _ => None,
                    })
                    .collect();
                problems.push(type_problem(&keys.join("."), e.inner()));
                if !remove_key(&mut table, &keys) {
                    return RawConfig::default();
                }
            }
        }
    }
    RawConfig::default()
}

fn remove_key(t: &mut toml::Table, keys: &[String]) -> bool {
    match keys {
        [] => false,
        [last] => t.remove(last).is_some(),
        [first, rest @ ..] => match t.get_mut(first) {
            Some(toml::Value::Table(inner)) => remove_key(inner, rest),
            _ => false,
        },
    }
}

fn type_problem(path: &str, e: &toml::de::Error) -> Problem {
    let key = path.rsplit('.').next().unwrap_or(path);
    let raw = e.message().trim();
    let msg = if crate::layers::SECRET_KEYS.contains(&key) {
        // The message would quote the value.
        "wrong type: a secret is a string (value not shown)".to_string()
    } else if crate::layers::looks_secret(raw) {
        // A URL with credentials (or the like) where a table was expected, say.
        "wrong type (the value looks like it holds a credential, so it is not shown)".to_string()
    } else {
        raw.to_string()
    };
    let kind = PoolOverrides::TYPES
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, t)| *t)
        .or(matches!(key, "shutdown_timeout" | "client_login_timeout").then_some("Duration"));
    let fix = match kind {
        Some("Duration") => "write a duration in quotes, such as \"5s\" or \"250ms\"",
        Some("u32" | "u64") => "write a whole number without quotes",
        Some("f64") => "write a number such as 2.0",
        Some("PoolMode") => "write \"session\" or \"transaction\"",
        Some("String") => "write text in quotes",
        _ => "see weir.example.toml for this key's form",
    };
    let path = if path.is_empty() { "(top level)" } else { path };
    Problem::error(path, msg).fix(fix)
}

fn resolve(raw: RawConfig, base_dir: Option<&Path>, problems: &mut Problems) -> Config {
    let rel = |p: PathBuf| match base_dir {
        Some(b) if p.is_relative() => b.join(p),
        _ => p,
    };
    let defaults = ProxySettings::default();
    let listen = match raw.proxy.listen {
        None => defaults.listen.clone(),
        Some(l) => {
            let list = match l {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
            list.iter()
                .enumerate()
                .filter_map(|(i, s)| match s.parse::<SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        problems.push(
                            Problem::error(
                                format!("proxy.listen[{i}]"),
                                format!("`{s}` is not an address:port"),
                            )
                            .fix("write it like \"127.0.0.1:6432\" or \"0.0.0.0:6432\""),
                        );
                        None
                    }
                })
                .collect()
        }
    };
    let proxy = ProxySettings {
        listen,
        unix_socket_dir: raw.proxy.unix_socket_dir.map(rel),
        workers: raw.proxy.workers.unwrap_or(defaults.workers),
        max_message_size: raw
            .proxy
            .max_message_size
            .unwrap_or(defaults.max_message_size),
        max_client_conn: raw
            .proxy
            .max_client_conn
            .unwrap_or(defaults.max_client_conn),
        shutdown_timeout: raw
            .proxy
            .shutdown_timeout
            .unwrap_or(defaults.shutdown_timeout),
        client_login_timeout: raw
            .proxy
            .client_login_timeout
            .unwrap_or(defaults.client_login_timeout),
    };

    let admin = AdminSettings {
        listen: match raw.admin.listen.as_deref() {
            None => AdminSettings::default().listen,
            Some("" | "off") => None,
            Some(a) => match a.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problems.push(
                        Problem::error("admin.listen", format!("`{a}` is not an address:port"))
                            .fix("write it like \"127.0.0.1:9930\", or \"off\""),
                    );
                    None
                }
            },
        },
        token: raw.admin.token,
        users: raw.admin.users,
    };

    let mut databases = BTreeMap::new();
    for (name, d) in raw.databases {
        if let Some(db) = resolve_database(&name, d, problems) {
            databases.insert(name, db);
        }
    }
    let mut users: BTreeMap<String, User> = raw
        .users
        .into_iter()
        .map(|(name, u)| {
            (
                name,
                User {
                    password: u.password,
                    auth: u.auth,
                    pool: u.pool,
                    max_client_conn: u.max_client_conn,
                },
            )
        })
        .collect();

    let auth_file = raw.auth.file.map(rel);
    if let Some(path) = &auth_file {
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(
                Problem::error("auth.file", format!("cannot read {}: {e}", path.display()))
                    .fix("point auth.file at a readable userlist.txt, or remove it"),
            ),
            Ok(text) => match parse_auth_file(&text) {
                Err(p) => problems.push(p),
                Ok(entries) => {
                    for (user, secret) in entries {
                        let u = users.entry(user).or_default();
                        if u.password.is_none() {
                            u.password = Some(Secret::new(secret));
                        }
                    }
                }
            },
        }
    }

    let defaults = Config::default();
    let auth_query = raw.auth.user.map(|user| AuthQuery {
        user,
        query: raw
            .auth
            .query
            .unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_string()),
        cache_ttl: raw.auth.cache_ttl.unwrap_or(Duration::from_secs(60)),
    });
    let tls = ClientTls {
        // A certificate turns TLS on unless the mode says otherwise.
        mode: raw.tls.mode.unwrap_or(if raw.tls.cert_file.is_some() {
            ClientTlsMode::Prefer
        } else {
            ClientTlsMode::Disable
        }),
        cert_file: raw.tls.cert_file.map(rel),
        key_file: raw.tls.key_file.map(rel),
    };
    let server_tls = ServerTls {
        mode: raw.server_tls.mode.unwrap_or(defaults.server_tls.mode),
        ca_file: raw.server_tls.ca_file.map(rel),
        cert_file: raw.server_tls.cert_file.map(rel),
        key_file: raw.server_tls.key_file.map(rel),
    };
    let access = raw
        .access
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| resolve_access(i, r, problems))
        .collect();

    Config {
        profile: None,
        proxy,
        admin,
        pool: raw.pool,
        auth_type: raw.auth.kind.unwrap_or(AuthType::ScramSha256),
        auth_file,
        auth_query,
        failed_login_delay: raw
            .auth
            .failed_login_delay
            .unwrap_or(defaults.failed_login_delay),
        failed_login_delay_max: raw
            .auth
            .failed_login_delay_max
            .unwrap_or(defaults.failed_login_delay_max),
        tls,
        server_tls,
        access,
        databases,
        users,
    }
}

fn resolve_access(i: usize, r: RawAccess, problems: &mut Problems) -> Option<AccessRule> {
    let list = |v: Option<OneOrMany>| -> Vec<String> {
        let v = match v {
            None => return Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        };
        if v.iter().any(|s| s == "all") {
            Vec::new()
        } else {
            v
        }
    };
    let (address, local) = match r.address.as_deref().map(str::trim) {
        None | Some("all") => (None, false),
        Some("local") => (None, true),
        Some(a) => match IpRange::parse(a) {
            Some(range) => (Some(range), false),
            None => {
                problems.push(
                    Problem::error(
                        format!("access[{i}].address"),
                        format!("`{a}` is not an address range"),
                    )
                    .fix("write an address or range like \"10.0.0.0/8\", \"::1\", \"all\" or \"local\""),
                );
                return None;
            }
        },
    };
    Some(AccessRule {
        name: r.name.unwrap_or_else(|| format!("access[{i}]")),
        allow: r.action == Action::Allow,
        address,
        local,
        databases: list(r.database),
        users: list(r.user),
        require_tls: r.require_tls,
    })
}

fn resolve_database(name: &str, d: RawDatabase, problems: &mut Problems) -> Option<Database> {
    let mut db = Database {
        host: "127.0.0.1".into(),
        port: 5432,
        dbname: name.to_string(),
        user: None,
        password: None,
        auth: d.auth,
        pool: d.pool,
        max_client_conn: d.max_client_conn,
    };
    if let Some(url) = &d.url {
        match parse_url(url) {
            Ok(u) => {
                db.host = u.host;
                db.port = u.port;
                if let Some(n) = u.dbname {
                    db.dbname = n;
                }
                db.user = u.user;
                db.password = u.password;
            }
            Err(msg) => {
                problems.push(
                    Problem::error(format!("databases.{name}.url"), msg)
                        .fix("use postgres://USER:PASSWORD@HOST:PORT/DBNAME"),
                );
                return None;
            }
        }
    }
    if let Some(h) = d.host {
        db.host = h;
    }
    if let Some(p) = d.port {
        db.port = p;
    }
    if let Some(n) = d.dbname {
        db.dbname = n;
    }
    if d.user.is_some() {
        db.user = d.user;
    }
    if d.password.is_some() {
        db.password = d.password;
    }
    Some(db)
}

/// The parts of a `postgres://` URL Weir uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub host: String,
    pub port: u16,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<Secret>,
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses `postgres://[user[:password]@][host][:port][/dbname][?host=/socket/dir]`.
pub fn parse_url(s: &str) -> Result<ServerUrl, String> {
    let url = url::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme `{}` is not postgres:// or postgresql://",
            url.scheme()
        ));
    }
    let mut host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .map(|h| decode(h.trim_matches(['[', ']'])));
    for (k, v) in url.query_pairs() {
        match &*k {
            "host" => host = Some(v.into_owned()),
            "sslmode" | "application_name" | "connect_timeout" => {}
            other => return Err(format!("unsupported URL parameter `{other}`")),
        }
    }
    let dbname = url.path().trim_start_matches('/');
    Ok(ServerUrl {
        host: host.unwrap_or_else(|| "127.0.0.1".into()),
        port: url.port().unwrap_or(5432),
        dbname: (!dbname.is_empty()).then(|| decode(dbname)),
        user: (!url.username().is_empty()).then(|| decode(url.username())),
        password: url.password().map(|p| Secret::new(decode(p))),
    })
}

/// Parses PgBouncer's `userlist.txt`: one `"user" "secret"` per line, `""` for a quote inside
/// a field, lines starting with `;` or `#` ignored.
pub fn parse_auth_file(text: &str) -> Result<Vec<(String, String)>, Problem> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let bad = || {
            Problem::error(
                format!("auth.file line {}", n + 1),
                "expected two quoted fields: \"user\" \"secret\"",
            )
            .fix("quote both fields and double any quote inside them")
        };
        let mut fields = Vec::new();
        let mut chars = line.chars().peekable();
        while fields.len() < 2 {
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.next() != Some('"') {
                return Err(bad());
            }
            let mut field = String::new();
            loop {
                match chars.next() {
                    None => return Err(bad()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
        let secret = fields.pop().unwrap();
        out.push((fields.pop().unwrap(), secret));
    }
    Ok(out)
}

/// Semantic checks over the resolved config; every problem is collected.
fn validate(c: &Config, problems: &mut Problems) {
    validate_security(c, problems);
    if c.proxy.listen.is_empty() && c.proxy.unix_socket_dir.is_none() {
        problems.push(
            Problem::error("proxy.listen", "no listen address")
                .fix("set proxy.listen = \"127.0.0.1:6432\""),
        );
    }
    if c.proxy.max_client_conn == 0 {
        problems.push(
            Problem::error("proxy.max_client_conn", "0 refuses every client")
                .fix("use a positive number (default 5000)"),
        );
    }
    if c.proxy.client_login_timeout < Duration::from_millis(100) {
        problems.push(
            Problem::error(
                "proxy.client_login_timeout",
                format!(
                    "{} leaves no time to log in",
                    humantime::format_duration(c.proxy.client_login_timeout)
                ),
            )
            .fix("use a duration such as \"30s\" (at least 100ms)"),
        );
    }
    if c.proxy.max_message_size < 8192 {
        problems.push(
            Problem::error(
                "proxy.max_message_size",
                format!("{} bytes is too small", c.proxy.max_message_size),
            )
            .fix("use at least 8192 (default 67108864)"),
        );
    }
    if c.databases.is_empty() {
        problems.push(
            Problem::warning(
                "databases",
                "no databases are defined: every client will get 3D000",
            )
            .fix("add a [databases.NAME] table with a url"),
        );
    }
    if c.admin
        .token
        .as_ref()
        .is_some_and(|t| t.expose().is_empty())
    {
        problems.push(
            Problem::error(
                "admin.token",
                "empty: an empty bearer token would be accepted",
            )
            .fix("set a long random token, or remove the key to leave the routes open"),
        );
    }
    for reserved in ["weir", "pgbouncer"] {
        if c.databases.contains_key(reserved) {
            problems.push(
                Problem::error(
                    format!("databases.{reserved}"),
                    format!("`{reserved}` is the admin console's database name"),
                )
                .fix(format!("rename the entry and set dbname = \"{reserved}\" in it to reach a server database of that name")),
            );
        }
    }
    validate_pool("pool", &c.pool, problems);
    for (server, n) in c.server_demand() {
        if n > 100 {
            problems.push(
                Problem::warning(
                    "databases",
                    format!("the pools for server {server} may open up to {n} server connections; PostgreSQL's default max_connections is 100"),
                )
                .fix("compare with the server's limit: weir check --online; or lower pool sizes"),
            );
        }
    }
    for (name, db) in &c.databases {
        validate_pool(&format!("databases.{name}.pool"), &db.pool, problems);
        if db.host.is_empty() {
            problems.push(Problem::error(
                format!("databases.{name}.host"),
                "empty host",
            ));
        }
        if db.port == 0 {
            problems.push(
                Problem::error(format!("databases.{name}.port"), "port 0")
                    .fix("use the server's port, e.g. 5432"),
            );
        }
    }
    for (name, db) in &c.databases {
        if let Some(fixed) = &db.user {
            for (user, u) in &c.users {
                if user != fixed && u.pool != PoolOverrides::default() {
                    problems.push(
                        Problem::warning(
                            format!("users.{user}.pool"),
                            format!("ignored for database {name}: all its clients share the pool of its fixed user {fixed}"),
                        )
                        .fix(format!("set it in databases.{name}.pool or users.{fixed}.pool")),
                    );
                }
            }
        }
        validate_resolved(
            &format!("databases.{name}.pool"),
            &c.pool_settings(name, ""),
            problems,
        );
        for (user, u) in &c.users {
            if u.pool != PoolOverrides::default() {
                validate_resolved(
                    &format!("users.{user}.pool"),
                    &c.pool_settings(name, user),
                    problems,
                );
            }
        }
    }
    for (name, u) in &c.users {
        if u.pool.max_db_connections.is_some() {
            problems.push(
                Problem::error(
                    format!("users.{name}.pool.max_db_connections"),
                    "max_db_connections caps a database, not a user",
                )
                .fix("set it in [pool] or [databases.NAME.pool]"),
            );
        }
        validate_pool(&format!("users.{name}.pool"), &u.pool, problems);
        if let Some(pw) = &u.password
            && weir_wire::scram::Verifier::is_verifier(pw.expose())
            && pw.expose().parse::<weir_wire::scram::Verifier>().is_err()
        {
            problems.push(
                Problem::error(
                    format!("users.{name}.password"),
                    "malformed SCRAM-SHA-256 verifier",
                )
                .fix("copy it whole from pg_authid.rolpassword, or give the plain password"),
            );
        }
        let needs_password = u.auth.unwrap_or(c.auth_type) != AuthType::Trust;
        if needs_password && u.password.is_none() {
            problems.push(
                Problem::error(format!("users.{name}.password"), "missing: this user cannot log in")
                    .fix("set a password (plain, md5 or SCRAM verifier), list it in auth.file, or set auth = \"trust\""),
            );
        }
        if u.auth == Some(AuthType::Md5)
            && u.password
                .as_ref()
                .is_some_and(|p| weir_wire::scram::Verifier::is_verifier(p.expose()))
        {
            problems.push(
                Problem::error(
                    format!("users.{name}.auth"),
                    "md5 login needs a plain or md5 password, not a SCRAM verifier",
                )
                .fix("use auth = \"scram-sha-256\" or store the password in plain or md5 form"),
            );
        }
    }
}

fn validate_pool(path: &str, p: &PoolOverrides, problems: &mut Problems) {
    if p.size == Some(0) {
        problems.push(
            Problem::error(format!("{path}.size"), "0 server connections").fix("use 1 or more"),
        );
    }
    if let Some(s) = p.size
        && s > 100
    {
        problems.push(
            Problem::warning(
                format!("{path}.size"),
                format!("{s} server connections in one pool"),
            )
            .fix("a pool above 100 rarely helps; check the server's max_connections"),
        );
    }
    let floor = |key: &str, v: Option<Duration>, zero_ok: bool, problems: &mut Problems| {
        if let Some(d) = v
            && d.as_millis() < 10
            && !(zero_ok && d.is_zero())
        {
            let what = if zero_ok { " (0 turns it off)" } else { "" };
            problems.push(
                Problem::error(
                    format!("{path}.{key}"),
                    format!(
                        "{} is below the 10ms floor{what}",
                        humantime::format_duration(d)
                    ),
                )
                .fix("use a duration such as \"5s\""),
            );
        }
    };
    floor("query_wait_timeout", p.query_wait_timeout, false, problems);
    floor("connect_timeout", p.connect_timeout, false, problems);
    floor("reserve_timeout", p.reserve_timeout, false, problems);
    floor("connect_retry_max", p.connect_retry_max, false, problems);
    if p.connect_retry_initial
        .is_some_and(|d| d < Duration::from_millis(1))
    {
        problems.push(
            Problem::error(
                format!("{path}.connect_retry_initial"),
                "below 1ms: failed connects would be retried in a tight loop",
            )
            .fix("use a pause such as \"50ms\""),
        );
    }
    floor("server_check_delay", p.server_check_delay, true, problems);
    for (key, v) in [
        ("query_timeout", p.query_timeout),
        ("idle_transaction_timeout", p.idle_transaction_timeout),
        ("client_idle_timeout", p.client_idle_timeout),
        ("server_idle_timeout", p.server_idle_timeout),
        ("server_lifetime", p.server_lifetime),
    ] {
        floor(key, v, true, problems);
    }
    if let Some(m) = p.connect_retry_multiplier
        && !(1.0..=10.0).contains(&m)
    {
        problems.push(
            Problem::error(
                format!("{path}.connect_retry_multiplier"),
                format!("{m} is out of range"),
            )
            .fix("use a factor from 1.0 (constant pause) to 10.0"),
        );
    }
    if p.connect_concurrency == Some(0) {
        problems.push(
            Problem::error(
                format!("{path}.connect_concurrency"),
                "0 connects allowed at once",
            )
            .fix("use 1 or more (default 4)"),
        );
    }
    for (key, v) in [
        ("utilisation_warning", p.utilisation_warning),
        ("utilisation_critical", p.utilisation_critical),
    ] {
        if let Some(pct) = v
            && !(1..=100).contains(&pct)
        {
            problems.push(
                Problem::error(
                    format!("{path}.{key}"),
                    format!("{pct}% is not a percentage"),
                )
                .fix("use 1 to 100"),
            );
        }
    }
}

/// Checks that only make sense once the layers are combined.
fn validate_resolved(path: &str, s: &PoolSettings, problems: &mut Problems) {
    if s.max_db_connections > 0 && s.min_size > s.max_db_connections {
        problems.push(
            Problem::error(
                format!("{path}.min_size"),
                format!(
                    "min_size {} is above max_db_connections {}",
                    s.min_size, s.max_db_connections
                ),
            )
            .fix("lower min_size or raise max_db_connections"),
        );
    }
    if s.reserve_size > 0 && s.reserve_timeout >= s.query_wait_timeout {
        problems.push(
            Problem::warning(
                format!("{path}.reserve_timeout"),
                "not below query_wait_timeout: clients time out before the reserve can serve them",
            )
            .fix("make reserve_timeout shorter than query_wait_timeout"),
        );
    }
    if s.min_size > s.size {
        problems.push(
            Problem::error(
                format!("{path}.min_size"),
                format!("min_size {} is above size {}", s.min_size, s.size),
            )
            .fix("lower min_size or raise size"),
        );
    }
    if s.utilisation_warning >= s.utilisation_critical {
        problems.push(
            Problem::error(
                format!("{path}.utilisation_warning"),
                format!(
                    "warning at {}% is not below critical at {}%",
                    s.utilisation_warning, s.utilisation_critical
                ),
            )
            .fix("e.g. utilisation_warning = 70, utilisation_critical = 90"),
        );
    }
    if s.connect_retry_initial > s.connect_retry_max {
        problems.push(
            Problem::error(
                format!("{path}.connect_retry_initial"),
                "the first pause is longer than connect_retry_max",
            )
            .fix("make connect_retry_initial at most connect_retry_max"),
        );
    }
}

/// The no-file quick start: one database, one user whose password is the server's.
pub struct QuickStart {
    pub listen: SocketAddr,
    pub server_url: String,
    pub pool_size: u32,
    pub pool_mode: PoolMode,
    /// The HTTP admin listener (`None`: the default address).
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
}

impl QuickStart {
    pub fn build(&self) -> Result<Config, Problems> {
        let mut problems = Problems::default();
        let url = parse_url(&self.server_url).map_err(|m| {
            Problems(vec![
                Problem::error("--server", m).fix("use postgres://USER:PASSWORD@HOST:PORT/DBNAME"),
            ])
        })?;
        let Some(user) = url.user.clone() else {
            return Err(Problems(vec![
                Problem::error("--server", "the URL names no user")
                    .fix("postgres://USER:PASSWORD@HOST:PORT/DBNAME"),
            ]));
        };
        let dbname = url.dbname.clone().unwrap_or_else(|| user.clone());
        let pool = PoolOverrides {
            mode: Some(self.pool_mode),
            size: Some(self.pool_size),
            ..Default::default()
        };
        let mut config = Config {
            proxy: ProxySettings {
                listen: vec![self.listen],
                ..Default::default()
            },
            pool: pool.clone(),
            ..Default::default()
        };
        let auth = if url.password.is_some() {
            None
        } else {
            Some(AuthType::Trust)
        };
        config.databases.insert(
            dbname.clone(),
            Database {
                host: url.host,
                port: url.port,
                dbname,
                user: Some(user.clone()),
                password: url.password.clone(),
                auth,
                pool: PoolOverrides::default(),
                max_client_conn: 0,
            },
        );
        config.admin.users = vec![user.clone()];
        if let Some(a) = self.admin_listen {
            config.admin.listen = Some(a);
        }
        config.admin.token = self.admin_token.clone().map(Secret::new);
        config.users.insert(
            user,
            User {
                password: url.password,
                auth,
                pool: PoolOverrides::default(),
                max_client_conn: 0,
            },
        );
        validate(&config, &mut problems);
        if problems.has_errors() {
            Err(problems)
        } else {
            Ok(config)
        }
    }
}

#[cfg(test)]
mod tests;

/// TLS files present where a mode needs them, and auth settings that fit together.
fn validate_security(c: &Config, problems: &mut Problems) {
    let readable = |key: &str, path: &Option<PathBuf>, problems: &mut Problems| {
        if let Some(p) = path
            && let Err(e) = std::fs::metadata(p)
        {
            problems.push(
                Problem::error(key, format!("cannot read {}: {e}", p.display()))
                    .fix("point it at a readable PEM file"),
            );
        }
    };
    if c.tls.mode != ClientTlsMode::Disable {
        for (key, v) in [
            ("tls.cert_file", &c.tls.cert_file),
            ("tls.key_file", &c.tls.key_file),
        ] {
            if v.is_none() {
                problems.push(
                    Problem::error(key, format!("tls.mode = \"{}\" needs it", c.tls.mode))
                        .fix("give the PEM file, or set tls.mode = \"disable\""),
                );
            }
        }
    }
    readable("tls.cert_file", &c.tls.cert_file, problems);
    readable("tls.key_file", &c.tls.key_file, problems);
    let s = &c.server_tls;
    if matches!(s.mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull) && s.ca_file.is_none()
    {
        problems.push(
            Problem::error(
                "server_tls.ca_file",
                format!(
                    "server_tls.mode = \"{}\" checks certificates against it",
                    s.mode
                ),
            )
            .fix("give the PEM file of the servers' certificate authority"),
        );
    }
    if matches!(s.mode, ServerTlsMode::Prefer | ServerTlsMode::Require) && s.ca_file.is_some() {
        problems.push(
            Problem::warning(
                "server_tls.ca_file",
                format!(
                    "server_tls.mode = \"{}\" does not check certificates, so ca_file is unused",
                    s.mode
                ),
            )
            .fix("use mode = \"verify-ca\" or \"verify-full\" to check the server"),
        );
    }
    if s.cert_file.is_some() != s.key_file.is_some() {
        problems.push(
            Problem::error(
                "server_tls.key_file",
                "a client certificate needs both files",
            )
            .fix("set server_tls.cert_file and server_tls.key_file together"),
        );
    }
    readable("server_tls.ca_file", &s.ca_file, problems);
    readable("server_tls.cert_file", &s.cert_file, problems);
    readable("server_tls.key_file", &s.key_file, problems);
    if let Some(q) = &c.auth_query {
        let has_pw = c.users.get(&q.user).is_some_and(|u| u.password.is_some());
        if !has_pw {
            problems.push(
                Problem::error(
                    "auth.user",
                    format!("auth_query user `{}` has no password in [users]", q.user),
                )
                .fix(format!("add [users.{}] password = ...", q.user)),
            );
        }
        if !q.query.contains("$1") {
            problems.push(
                Problem::error("auth.query", "the query does not use $1 (the user name)")
                    .fix(format!("for example: {DEFAULT_AUTH_QUERY}")),
            );
        }
    }
    if c.failed_login_delay > c.failed_login_delay_max {
        problems.push(
            Problem::error(
                "auth.failed_login_delay",
                "the first delay is above auth.failed_login_delay_max",
            )
            .fix("make failed_login_delay_max at least failed_login_delay"),
        );
    }
    // The pause comes out of the login's own time.
    if c.failed_login_delay_max >= c.proxy.client_login_timeout {
        problems.push(
            Problem::warning(
                "auth.failed_login_delay_max",
                format!(
                    "not below proxy.client_login_timeout ({}): after a few failed attempts \
                     from an address, every login from it times out, right password or not",
                    humantime::format_duration(c.proxy.client_login_timeout)
                ),
            )
            .fix("keep it well below client_login_timeout (defaults: 2s and 30s)"),
        );
    }
}
