//! The resolved configuration. Every field here has passed validation.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A secret from the config (a password, md5 hash or SCRAM verifier). Never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps its server connection until it disconnects.
    Session,
    /// A client holds a server connection only while a transaction is open.
    Transaction,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

/// How clients prove who they are to Weir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
            AuthType::Trust => "trust",
        })
    }
}

/// Settings of one pool, after defaults and overrides are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    /// Server connections this pool may hold at once.
    pub size: u32,
    /// How long a client may wait for a server connection before it gets 53300.
    pub query_wait_timeout: Duration,
    /// How long opening one server connection (TCP + login) may take.
    pub connect_timeout: Duration,
    /// Run when a session-mode client leaves; empty for none.
    pub reset_query: String,
    /// Prepared statements kept per server connection (transaction mode).
    pub prepared_statements_cache: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            mode: PoolMode::Transaction,
            size: 20,
            query_wait_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            reset_query: "DISCARD ALL".into(),
            prepared_statements_cache: 256,
        }
    }
}

/// Optional pool settings: the `[pool]` section, `databases.<name>.pool` and
/// `users.<name>.pool` each override the layer below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PoolOverrides {
    pub mode: Option<PoolMode>,
    pub size: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub query_wait_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    pub reset_query: Option<String>,
    pub prepared_statements_cache: Option<u32>,
}

impl PoolOverrides {
    pub fn apply(&self, s: &mut PoolSettings) {
        if let Some(v) = self.mode {
            s.mode = v;
        }
        if let Some(v) = self.size {
            s.size = v;
        }
        if let Some(v) = self.query_wait_timeout {
            s.query_wait_timeout = v;
        }
        if let Some(v) = self.connect_timeout {
            s.connect_timeout = v;
        }
        if let Some(v) = &self.reset_query {
            s.reset_query = v.clone();
        }
        if let Some(v) = self.prepared_statements_cache {
            s.prepared_statements_cache = v;
        }
    }
}

/// The `[proxy]` section: where Weir listens and how it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    /// Directory for a Unix socket `.s.PGSQL.<port>` (port of the first listen address).
    pub unix_socket_dir: Option<PathBuf>,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Largest message Weir buffers whole (everything but CopyData, which streams).
    pub max_message_size: u32,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 6432))],
            unix_socket_dir: None,
            workers: 0,
            max_message_size: 64 << 20,
        }
    }
}

/// A client-facing database name and the server behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    /// Host name or address; a value starting with `/` is a Unix socket directory.
    pub host: String,
    pub port: u16,
    /// Database name on the server.
    pub dbname: String,
    /// If set, every client of this database logs in to the server as this user.
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub auth: Option<AuthType>,
    pub pool: PoolOverrides,
}

/// A user known to Weir: how it logs in, and pool overrides for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// A plain password, an md5 secret (`md5...`) or a SCRAM verifier (`SCRAM-SHA-256$...`).
    pub password: Option<Secret>,
    pub auth: Option<AuthType>,
    pub pool: PoolOverrides,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy: ProxySettings,
    pub pool: PoolOverrides,
    pub auth_type: AuthType,
    pub auth_file: Option<PathBuf>,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy: ProxySettings::default(),
            pool: PoolOverrides::default(),
            auth_type: AuthType::ScramSha256,
            auth_file: None,
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
        }
    }
}

/// Where a pool's server connections log in, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLogin {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Option<Secret>,
}

impl Config {
    /// Settings for the pool of `database` used by `user`: built-in defaults, then `[pool]`,
    /// then the database's, then the user's.
    pub fn pool_settings(&self, database: &str, user: &str) -> PoolSettings {
        let mut s = PoolSettings::default();
        self.pool.apply(&mut s);
        if let Some(db) = self.databases.get(database) {
            db.pool.apply(&mut s);
        }
        if let Some(u) = self.users.get(user) {
            u.pool.apply(&mut s);
        }
        s
    }

    /// How `user` must authenticate to reach `database`: the user's setting, else the
    /// database's, else `[auth] type`.
    pub fn auth_type(&self, database: &str, user: &str) -> AuthType {
        self.users
            .get(user)
            .and_then(|u| u.auth)
            .or_else(|| self.databases.get(database).and_then(|d| d.auth))
            .unwrap_or(self.auth_type)
    }

    /// The server login for a pool. The database's forced user wins; otherwise the client's
    /// own name with the password Weir holds for it.
    pub fn server_login(&self, database: &str, user: &str) -> Option<ServerLogin> {
        let db = self.databases.get(database)?;
        let (user, password) = match &db.user {
            Some(forced) => {
                let pw = db
                    .password
                    .clone()
                    .or_else(|| self.users.get(forced).and_then(|u| u.password.clone()));
                (forced.clone(), pw)
            }
            None => (
                user.to_string(),
                self.users.get(user).and_then(|u| u.password.clone()),
            ),
        };
        Some(ServerLogin {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone(),
            user,
            password,
        })
    }
}
