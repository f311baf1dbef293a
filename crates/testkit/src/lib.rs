//! A throwaway PostgreSQL for tests and the demo.
//!
//! - [`PgServer::shared`] starts one server per test process on first use and keeps it
//!   until the process exits; [`PgServer::start`] gives a test its own (to stop or restart).
//! - The server runs from the system's binaries (`pg_config --bindir`, else the newest
//!   `/usr/lib/postgresql/*/bin`, else `PATH`). As root it runs as `postgres` (or `nobody`),
//!   since PostgreSQL refuses to run as root.
//! - Every server is started by a keeper thread that lives as long as the server, with the
//!   parent-death signal set, so a test process that dies takes its servers with it.
//! - Logins: see [`Login`]; `pg_hba.conf` gives each user the method its name says.
//!
//! [`weir_config`] builds a Weir config in front of a server; [`start_weir`] runs it
//! in-process on port 0.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use weir_config::{Config, PoolMode};

/// A login set up in every test server.
#[derive(Debug, Clone, Copy)]
pub struct Login {
    pub user: &'static str,
    pub password: &'static str,
}

/// Superuser, SCRAM login.
pub const SUPERUSER: Login = Login {
    user: "weir_test",
    password: "weir_test_pw",
};
/// Ordinary user, password stored as SCRAM, SCRAM login.
pub const SCRAM_USER: Login = Login {
    user: "scram_user",
    password: "scram_pw",
};
/// Ordinary user, password stored as md5, md5 login.
pub const MD5_USER: Login = Login {
    user: "md5_user",
    password: "md5_pw",
};
/// Ordinary user, cleartext (`password`) login.
pub const CLEARTEXT_USER: Login = Login {
    user: "cleartext_user",
    password: "clear_pw",
};
/// Ordinary user, trusted without a password.
pub const TRUST_USER: Login = Login {
    user: "trust_user",
    password: "",
};

/// Where the system's PostgreSQL server binaries are.
pub fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    if let Some(p) = candidates.pop() {
        return p;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        if Path::new(dir).join("initdb").exists() {
            return PathBuf::from(dir);
        }
    }
    panic!(
        "PostgreSQL server binaries not found: install the postgresql package (scripts/setup.sh does)"
    );
}

/// The account the server runs as when we are root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: getpwnam reads a NUL-terminated name; the result is copied out before any
        // other call could overwrite it.
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: pw is non-null and points at a valid passwd entry.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid));
        }
    }
    panic!(
        "running as root and neither a `postgres` nor a `nobody` account exists to run PostgreSQL"
    );
}

fn chown(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown test directory");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const BASE: &str = "weir-testkit";

/// Removes server directories left by test processes that no longer exist.
fn sweep_stale(base: &Path) {
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

enum KeeperCmd {
    Start(mpsc::Sender<Result<(), String>>),
    Stop {
        mode: &'static str,
        done: mpsc::Sender<()>,
    },
    Exit,
}

/// A running PostgreSQL server owned by this process.
pub struct PgServer {
    pub port: u16,
    pub dir: PathBuf,
    pub socket_dir: PathBuf,
    pub bindir: PathBuf,
    keeper: Mutex<mpsc::Sender<KeeperCmd>>,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();

impl PgServer {
    /// The server shared by every test in this process, started on first use.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(PgServer::start)
    }

    /// A new server of its own. Stopped when dropped.
    pub fn start() -> PgServer {
        let bindir = pg_bindir();
        let owner = run_as();
        let base = std::env::temp_dir().join(BASE);
        std::fs::create_dir_all(&base).unwrap();
        sweep_stale(&base);
        let dir = base.join(format!("{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir, owner);
        let data = dir.join("data");
        let port = free_port();

        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                SUPERUSER.user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 500\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nlog_min_messages = warning\n\
             logging_collector = off\nshared_buffers = 64MB\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all trust_user 127.0.0.1/32 trust\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all cleartext_user 127.0.0.1/32 password\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        chown(&data.join("pg_hba.conf"), owner);

        let (tx, rx) = mpsc::channel();
        let keeper_bindir = bindir.clone();
        let keeper_data = data.clone();
        let log = dir.join("server.log");
        std::thread::Builder::new()
            .name(format!("pg-keeper-{port}"))
            .spawn(move || keeper(rx, keeper_bindir, keeper_data, log, owner))
            .unwrap();
        let server = PgServer {
            port,
            socket_dir: dir.clone(),
            dir,
            bindir,
            keeper: Mutex::new(tx),
        };
        server.start_process().expect("start PostgreSQL");
        server.psql_script(
            "postgres",
            &format!(
                "ALTER USER {su} PASSWORD '{supw}';\n\
                 CREATE USER {scram} PASSWORD '{scrampw}';\n\
                 SET password_encryption = 'md5';\n\
                 CREATE USER {md5} PASSWORD '{md5pw}';\n\
                 RESET password_encryption;\n\
                 CREATE USER {clear} PASSWORD '{clearpw}';\n\
                 CREATE USER {trust};\n",
                su = SUPERUSER.user,
                supw = SUPERUSER.password,
                scram = SCRAM_USER.user,
                scrampw = SCRAM_USER.password,
                md5 = MD5_USER.user,
                md5pw = MD5_USER.password,
                clear = CLEARTEXT_USER.user,
                clearpw = CLEARTEXT_USER.password,
                trust = TRUST_USER.user,
            ),
        );
        server
    }

    fn start_process(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.keeper
            .lock()
            .unwrap()
            .send(KeeperCmd::Start(tx))
            .map_err(|e| e.to_string())?;
        rx.recv().map_err(|e| e.to_string())??;
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let ok = Command::new(self.bindir.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    self.socket_dir.to_str().unwrap(),
                    "-p",
                    &self.port.to_string(),
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                return Err(format!(
                    "PostgreSQL did not become ready in {limit:?}; log:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server: `"fast"` (SIGINT: sessions are terminated with 57P01),
    /// `"immediate"` (SIGQUIT) or `"smart"` (SIGTERM).
    pub fn stop(&self, mode: &'static str) {
        let (tx, rx) = mpsc::channel();
        self.keeper
            .lock()
            .unwrap()
            .send(KeeperCmd::Stop { mode, done: tx })
            .unwrap();
        let _ = rx.recv();
    }

    /// Starts the server again after [`PgServer::stop`].
    pub fn start_again(&self) {
        self.start_process().expect("restart PostgreSQL");
    }

    /// Address for a client: `postgres://user:password@127.0.0.1:port/db`.
    pub fn url(&self, login: Login, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            login.user, login.password, self.port, db
        )
    }

    /// Runs a SQL script as the superuser over the Unix socket; panics on error.
    pub fn psql_script(&self, db: &str, sql: &str) -> String {
        let out = self
            .psql(db)
            .args(["-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed for {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A psql command as the superuser over the Unix socket (no password needed).
    pub fn psql(&self, db: &str) -> Command {
        let mut c = Command::new(self.bindir.join("psql"));
        c.args([
            "-X",
            "-h",
            self.socket_dir.to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-U",
            SUPERUSER.user,
            "-d",
            db,
        ]);
        c
    }

    /// Turns TLS on (ssl = on with this certificate and key, PEM files) and reloads the
    /// server's configuration. Plain connections keep working.
    pub fn enable_tls(&self, cert: &Path, key: &Path) {
        let owner = run_as();
        let data = self.dir.join("data");
        for (src, name) in [(cert, "server.crt"), (key, "server.key")] {
            let dst = data.join(name);
            std::fs::copy(src, &dst).unwrap();
            std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            chown(&dst, owner);
        }
        self.psql_script("postgres", "ALTER SYSTEM SET ssl = on");
        self.psql_script("postgres", "SELECT pg_reload_conf()");
        let start = Instant::now();
        while self.psql_script("postgres", "SHOW ssl") != "on" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ssl did not turn on"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates a database (dropping any of the same name) owned by `owner`, with CONNECT and
    /// CREATE granted to every test user.
    pub fn create_database(&self, name: &str) {
        self.psql_script(
            "postgres",
            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        );
        self.psql_script("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.psql_script(name, "GRANT ALL ON SCHEMA public TO PUBLIC");
    }

    /// How many server processes are connected to `db` as `user` (or any user).
    pub fn backends(&self, db: &str, user: Option<&str>) -> usize {
        let filter = user
            .map(|u| format!(" AND usename = '{u}'"))
            .unwrap_or_default();
        self.psql_script(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'{filter}"),
        )
        .parse()
        .unwrap()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let (tx, rx) = mpsc::channel();
        let k = self.keeper.lock().unwrap();
        if k.send(KeeperCmd::Stop {
            mode: "immediate",
            done: tx,
        })
        .is_ok()
        {
            let _ = rx.recv();
        }
        let _ = k.send(KeeperCmd::Exit);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
    }
}

/// Owns the postgres child process. Runs on its own long-lived thread: the parent-death
/// signal is tied to the thread that forked, so that thread must outlive the server.
fn keeper(
    rx: mpsc::Receiver<KeeperCmd>,
    bindir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    owner: Option<(u32, u32)>,
) {
    let mut child: Option<Child> = None;
    let stop = |child: &mut Option<Child>, sig: i32| {
        if let Some(mut c) = child.take() {
            // SAFETY: sending a signal to our own child process id.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    };
    for cmd in rx {
        match cmd {
            KeeperCmd::Start(reply) => {
                stop(&mut child, libc::SIGQUIT);
                let logf = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap();
                chown(&log, owner);
                let mut c = Command::new(bindir.join("postgres"));
                c.args(["-D", data.to_str().unwrap()])
                    .stdout(logf.try_clone().unwrap())
                    .stderr(logf);
                as_owner(&mut c, owner);
                {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: prctl is async-signal-safe; it only sets this process's
                    // parent-death signal.
                    unsafe {
                        c.pre_exec(|| {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                            Ok(())
                        });
                    }
                }
                let r = c
                    .spawn()
                    .map(|c| child = Some(c))
                    .map_err(|e| format!("spawn postgres: {e}"));
                let _ = reply.send(r);
            }
            KeeperCmd::Stop { mode, done } => {
                let sig = match mode {
                    "smart" => libc::SIGTERM,
                    "fast" => libc::SIGINT,
                    _ => libc::SIGQUIT,
                };
                stop(&mut child, sig);
                let _ = done.send(());
            }
            KeeperCmd::Exit => break,
        }
    }
    stop(&mut child, libc::SIGQUIT);
}

/// A Weir config in front of `pg` serving `database` to every test login, each logging in
/// to the server as itself. `auth.type` is SCRAM, md5 for the md5 user, trust for the trust
/// user.
pub fn weir_config(pg: &PgServer, database: &str, pool_size: u32, mode: PoolMode) -> Config {
    let users: String = [SUPERUSER, SCRAM_USER, MD5_USER, CLEARTEXT_USER]
        .iter()
        .map(|l| {
            let auth = if l.user == MD5_USER.user {
                "md5"
            } else {
                "scram-sha-256"
            };
            format!(
                "[users.{}]\npassword = \"{}\"\nauth = \"{auth}\"\n",
                l.user, l.password
            )
        })
        .collect();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\nusers = [\"{su}\"]\n\n[pool]\nmode = \"{mode}\"\nsize = {pool_size}\nquery_wait_timeout = \"20s\"\n\n\
         [databases.{database}]\nhost = \"127.0.0.1\"\nport = {port}\n\n{users}\n[users.trust_user]\nauth = \"trust\"\n",
        port = pg.port,
        su = SUPERUSER.user,
    );
    weir_config::from_toml_str(&text, None)
        .unwrap_or_else(|p| panic!("test config invalid: {p}\n{text}"))
        .0
}

/// Starts Weir in-process on port 0.
pub async fn start_weir(config: Config) -> weir_proxy::ProxyHandle {
    weir_proxy::Proxy::start(config).await.expect("start weir")
}

/// Starts the admin listener of a Weir started by [`start_weir`], on its configured address
/// (port 0 in [`weir_config`]).
pub async fn start_admin(weir: &weir_proxy::ProxyHandle) -> weir_admin::AdminHandle {
    let addr = weir
        .shared()
        .config
        .load()
        .admin
        .listen
        .expect("admin.listen is set");
    weir_admin::start(weir.shared().clone(), addr)
        .await
        .expect("start the admin listener")
}

/// A connection string for a client of Weir.
pub fn weir_url(weir: &weir_proxy::ProxyHandle, login: Login, db: &str) -> String {
    let a = weir.local_addr();
    format!(
        "postgres://{}:{}@{}:{}/{}",
        login.user,
        login.password,
        a.ip(),
        a.port(),
        db
    )
}

/// A certificate authority made for one test, writing PEM files into `dir`.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA certificate: what clients trust.
    pub cert: PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let cert = dir.join(format!("{name}.crt"));
        std::fs::write(&cert, issuer.pem()).unwrap();
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            issuer,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA: (cert, key)
    /// PEM files named after `file`.
    pub fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}
