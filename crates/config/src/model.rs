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

/// Declares every pool setting once: the resolved [`PoolSettings`] (with its default), the
/// optional [`PoolOverrides`] layer read from TOML, how a layer applies, and the list of keys
/// (for "did you mean").
macro_rules! pool_settings {
    ($(
        $(#[doc = $doc:literal])*
        $(@serde($($serde:tt)*))?
        $field:ident : $ty:ty = $default:expr;
    )*) => {
        /// Settings of one pool, after defaults and overrides are applied.
        #[derive(Debug, Clone, PartialEq)]
        pub struct PoolSettings {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for PoolSettings {
            fn default() -> Self {
                PoolSettings { $( $field: $default, )* }
            }
        }

        /// Optional pool settings: the `[pool]` section, `databases.<name>.pool` and
        /// `users.<name>.pool` each override the layer below.
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        pub struct PoolOverrides {
            $( $(#[doc = $doc])* $(#[serde($($serde)*)])? pub $field: Option<$ty>, )*
        }

        impl PoolOverrides {
            pub fn apply(&self, s: &mut PoolSettings) {
                $( if let Some(v) = &self.$field { s.$field = v.clone(); } )*
            }

            /// Every key of a pool table.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Every key with its Rust type's name (`Duration`, `u32`, ...).
            pub const TYPES: &'static [(&'static str, &'static str)] =
                &[$((stringify!($field), stringify!($ty))),*];
        }

        impl PoolSettings {
            /// Every setting as (key, value as written in TOML).
            pub fn entries(&self) -> Vec<(&'static str, String)> {
                vec![$((stringify!($field), ShowValue::show(&self.$field))),*]
            }
        }
    };
}

/// A setting's value as written in TOML.
pub trait ShowValue {
    fn show(&self) -> String;
}

impl ShowValue for Duration {
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl ShowValue for PoolMode {
    fn show(&self) -> String {
        self.to_string()
    }
}

macro_rules! show_plain {
    ($($t:ty),*) => { $(impl ShowValue for $t { fn show(&self) -> String { self.to_string() } })* };
}
show_plain!(u32, u64, f64, String);

pool_settings! {
    /// `session` or `transaction`: when a client gives its server connection back.
    mode: PoolMode = PoolMode::Transaction;
    /// Server connections this pool may hold at once.
    size: u32 = 20;
    /// Server connections opened at start (or first use) and kept open.
    min_size: u32 = 0;
    /// Extra connections a client may get once it has waited `reserve_timeout`.
    reserve_size: u32 = 0;
    /// How long a client waits before the reserve may serve it.
    @serde(default, with = "humantime_serde")
    reserve_timeout: Duration = Duration::from_secs(5);
    /// Cap on server connections across every pool of one database (0: none).
    max_db_connections: u32 = 0;
    /// How long a client may wait for a server connection before it gets an error.
    @serde(default, with = "humantime_serde")
    query_wait_timeout: Duration = Duration::from_secs(30);
    /// How long opening one server connection (TCP + login) may take.
    @serde(default, with = "humantime_serde")
    connect_timeout: Duration = Duration::from_secs(5);
    /// First pause before retrying a failed connect; doubles (see multiplier) up to the max.
    @serde(default, with = "humantime_serde")
    connect_retry_initial: Duration = Duration::from_millis(50);
    /// Longest pause between connect attempts (the pause is drawn uniformly up to it).
    @serde(default, with = "humantime_serde")
    connect_retry_max: Duration = Duration::from_millis(500);
    /// Growth of the pause after each failed connect.
    connect_retry_multiplier: f64 = 2.0;
    /// Connects in flight at once per pool, so a storm of clients is not a storm of logins.
    connect_concurrency: u32 = 4;
    /// An idle server connection is closed after this long (0: never).
    @serde(default, with = "humantime_serde")
    server_idle_timeout: Duration = Duration::from_secs(600);
    /// A server connection is closed after this age, when not in use, with up to 25% jitter
    /// earlier so connections are not all replaced at once (0: never).
    @serde(default, with = "humantime_serde")
    server_lifetime: Duration = Duration::from_secs(3600);
    /// A server connection is closed after serving this many clients' transactions (0: no limit).
    server_max_uses: u64 = 0;
    /// A connection idle longer than this is checked with `server_check_query` before use.
    @serde(default, with = "humantime_serde")
    server_check_delay: Duration = Duration::from_secs(30);
    /// Query for that check ("" checks the socket only).
    server_check_query: String = "SELECT 1".into();
    /// A statement running longer is cancelled and the client gets 57014 naming this (0: off).
    @serde(default, with = "humantime_serde")
    query_timeout: Duration = Duration::ZERO;
    /// A client idle inside a transaction longer is disconnected with 25P03 (0: off).
    @serde(default, with = "humantime_serde")
    idle_transaction_timeout: Duration = Duration::ZERO;
    /// A client idle outside a transaction longer is disconnected with 57P05 (0: off).
    @serde(default, with = "humantime_serde")
    client_idle_timeout: Duration = Duration::ZERO;
    /// Run when a session-mode client leaves; empty for none.
    reset_query: String = "DISCARD ALL".into();
    /// Prepared statements kept per server connection (transaction mode).
    prepared_statements_cache: u32 = 256;
    /// Bytes of named prepared statements (names and text) Weir keeps for one client in
    /// transaction mode; a Parse beyond it closes the client with 54000 (0: no limit).
    max_client_prepared_bytes: u64 = 16 << 20;
    /// A statement slower than this is logged and kept for `/api/slow-queries` (0: off).
    @serde(default, with = "humantime_serde")
    slow_query_threshold: Duration = Duration::from_secs(1);
    /// Utilisation (percent of `size` in use) logged as a warning.
    utilisation_warning: u32 = 70;
    /// Utilisation logged as critical.
    utilisation_critical: u32 = 90;
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
    /// Client connections Weir accepts at once; one more gets 53300 at once.
    pub max_client_conn: u32,
    /// On SIGTERM/SIGINT, how long transactions in flight may take to finish before Weir exits.
    pub shutdown_timeout: Duration,
    /// How long a new connection may take from connecting to logged in (startup, TLS,
    /// authentication, the admin console's too); past it, it is closed with an error.
    pub client_login_timeout: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 6432))],
            unix_socket_dir: None,
            workers: 0,
            max_message_size: 64 << 20,
            max_client_conn: 5000,
            shutdown_timeout: Duration::from_secs(30),
            client_login_timeout: Duration::from_secs(30),
        }
    }
}

/// A client-facing database name and the server behind it.
#[derive(Debug, Clone, PartialEq)]
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
    /// Client connections to this database at once (0: no limit but the global one).
    pub max_client_conn: u32,
}

/// A user known to Weir: how it logs in, and pool overrides for it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct User {
    /// A plain password, an md5 secret (`md5...`) or a SCRAM verifier (`SCRAM-SHA-256$...`).
    pub password: Option<Secret>,
    pub auth: Option<AuthType>,
    pub pool: PoolOverrides,
    /// Client connections of this user at once (0: no limit but the global one).
    pub max_client_conn: u32,
}

/// The `[admin]` section: the HTTP admin listener and who may use the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Address of the HTTP admin listener (health, metrics, API, dashboard); `None` turns it off.
    pub listen: Option<SocketAddr>,
    /// Bearer token for every route but liveness and readiness; `None` leaves them open.
    pub token: Option<Secret>,
    /// Users that may connect to the admin console (databases `weir` and `pgbouncer`).
    pub users: Vec<String>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9930))),
            token: None,
            users: Vec::new(),
        }
    }
}

/// `[tls]`: TLS toward clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'; only plain connections.
    Disable,
    /// TLS when the client asks, plain otherwise (the same as `prefer` on this side).
    Allow,
    /// TLS when the client asks, plain otherwise.
    Prefer,
    /// A client that does not use TLS gets 28000.
    Require,
}

impl fmt::Display for ClientTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientTlsMode::Disable => "disable",
            ClientTlsMode::Allow => "allow",
            ClientTlsMode::Prefer => "prefer",
            ClientTlsMode::Require => "require",
        })
    }
}

/// `[server_tls]`: TLS toward PostgreSQL, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    /// TLS if the server offers it, without checking its certificate; plain otherwise.
    Prefer,
    /// TLS or no connection, without checking the certificate.
    Require,
    /// TLS with the certificate checked against `ca_file`, not the host name.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host Weir connects to.
    VerifyFull,
}

impl fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        })
    }
}

/// TLS toward clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    /// PEM certificate chain Weir presents (leaf first).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key_file: Option<PathBuf>,
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls {
            mode: ClientTlsMode::Disable,
            cert_file: None,
            key_file: None,
        }
    }
}

/// TLS toward servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    /// PEM certificates of the authorities that sign the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) to present to servers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for ServerTls {
    fn default() -> Self {
        ServerTls {
            // Not libpq's `prefer`: a server that offers TLS would then change how every
            // existing deployment connects (and a failed handshake is not retried in plain).
            mode: ServerTlsMode::Disable,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// An address range: an IP address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpRange {
    /// `10.0.0.0/8`, `::1/128`, or a bare address (all bits).
    pub fn parse(s: &str) -> Option<IpRange> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(IpRange { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One `[[access]]` rule. Rules are tried in order; the first whose address, database and
/// user all match decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    /// What errors and logs call the rule: its `name`, else `access[N]`.
    pub name: String,
    pub allow: bool,
    /// `None`: any address. Unix-socket clients match only rules without an address (or
    /// with `address = "local"`, see [`AccessRule::local`]).
    pub address: Option<IpRange>,
    /// Matches Unix-socket clients only.
    pub local: bool,
    /// Empty: every database.
    pub databases: Vec<String>,
    /// Empty: every user.
    pub users: Vec<String>,
    /// An allowing rule that matched a client not using TLS rejects it instead.
    pub require_tls: bool,
}

impl AccessRule {
    /// Whether the rule applies to a client (`ip` is `None` for a Unix socket).
    pub fn matches(&self, ip: Option<std::net::IpAddr>, database: &str, user: &str) -> bool {
        let addr_ok = match ip {
            None => self.address.is_none(),
            Some(ip) => !self.local && self.address.is_none_or(|r| r.contains(ip)),
        };
        addr_ok
            && (self.databases.is_empty() || self.databases.iter().any(|d| d == database))
            && (self.users.is_empty() || self.users.iter().any(|u| u == user))
    }
}

/// `auth.user`: look up users Weir does not know with a query on the server.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthQuery {
    /// The user that runs the query; its password is `users.NAME.password`.
    pub user: String,
    /// Takes the user name as `$1`; returns (name, secret) with the secret an md5 hash or
    /// SCRAM verifier (as `pg_shadow.passwd`).
    pub query: String,
    /// How long a fetched secret (or "no such user") is reused.
    pub cache_ttl: Duration,
}

/// The default `auth.query`, PgBouncer's.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The profile the config was loaded with, if any.
    pub profile: Option<String>,
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub pool: PoolOverrides,
    pub auth_type: AuthType,
    pub auth_file: Option<PathBuf>,
    /// Users not in the config are looked up on the server.
    pub auth_query: Option<AuthQuery>,
    /// First pause before answering a failed login from an address; doubles per further
    /// failure from it (forgotten after a minute without one), up to the max. 0: off.
    pub failed_login_delay: Duration,
    pub failed_login_delay_max: Duration,
    pub tls: ClientTls,
    pub server_tls: ServerTls,
    /// Empty: every client may try to log in.
    pub access: Vec<AccessRule>,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            profile: None,
            proxy: ProxySettings::default(),
            admin: AdminSettings::default(),
            pool: PoolOverrides::default(),
            auth_type: AuthType::ScramSha256,
            auth_file: None,
            auth_query: None,
            failed_login_delay: Duration::from_millis(100),
            failed_login_delay_max: Duration::from_secs(2),
            tls: ClientTls::default(),
            server_tls: ServerTls::default(),
            access: Vec::new(),
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

    /// The most server connections each server (`host:port`) can be asked for when every
    /// configured pool is full (size plus reserve, within each database's cap). Pools of
    /// databases without a fixed user are counted once per configured user.
    pub fn server_demand(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (name, db) in &self.databases {
            let users: Vec<&str> = match &db.user {
                Some(u) => vec![u.as_str()],
                None => self.users.keys().map(String::as_str).collect(),
            };
            let mut sum = 0u64;
            for u in users {
                let s = self.pool_settings(name, u);
                sum += (s.size + s.reserve_size) as u64;
            }
            let cap = self.pool_settings(name, "").max_db_connections as u64;
            if cap > 0 {
                sum = sum.min(cap);
            }
            *out.entry(format!("{}:{}", db.host, db.port)).or_default() += sum;
        }
        out
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
