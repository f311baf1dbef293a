//! Listening sockets and the state every session shares.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use weir_config::Config;

use crate::auth::UserDirectory;
use crate::cancel::CancelRegistry;
use crate::limits::ClientCounts;
use crate::metrics::{Registry, SlowLog};
use crate::pools::Pools;
use crate::session;
use crate::stream::Stream;
use crate::workers::Workers;
use std::sync::atomic::AtomicU64;

/// State shared by every session, passed as a handle (no globals), so several proxies can
/// run in one process, as the tests do.
#[derive(Debug)]
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub users: ArcSwap<UserDirectory>,
    pub pools: Pools,
    pub cancel: Arc<CancelRegistry>,
    pub clients: Arc<ClientCounts>,
    /// Logged-in clients, for SHOW CLIENTS.
    pub clients_registry: Arc<Registry>,
    pub next_client_id: AtomicU64,
    pub slow: SlowLog,
    pub started: std::time::SystemTime,
    /// Signalled when an operator asks the process to stop (console SHUTDOWN).
    pub shutdown: tokio::sync::Notify,
    /// Set once the process is stopping.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Cancelled when a graceful shutdown begins: sessions end at their next transaction
    /// boundary.
    pub drain: tokio_util::sync::CancellationToken,
    /// How the running config was loaded (none for a quick start): what a reload reads.
    pub source: std::sync::Mutex<Option<weir_config::Source>>,
    /// The config before the last reload, for rollback.
    pub previous: std::sync::Mutex<Option<Arc<Config>>>,
    /// Held while a reload applies, so two never interleave.
    pub reloading: std::sync::Mutex<()>,
    /// Recent failed logins per client address, to slow guessing down.
    pub failed_logins: crate::access::FailedLogins,
    /// Secrets found by auth_query.
    pub auth_cache: crate::auth_query::AuthCache,
}

impl Shared {
    pub fn new(config: Config) -> Shared {
        Shared {
            users: ArcSwap::from_pointee(UserDirectory::new(&config)),
            config: ArcSwap::from_pointee(config),
            pools: Pools::default(),
            cancel: Arc::new(CancelRegistry::default()),
            clients: Arc::new(ClientCounts::default()),
            clients_registry: Arc::new(Registry::default()),
            next_client_id: AtomicU64::new(1),
            slow: SlowLog::default(),
            started: std::time::SystemTime::now(),
            shutdown: tokio::sync::Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            drain: tokio_util::sync::CancellationToken::new(),
            source: std::sync::Mutex::new(None),
            previous: std::sync::Mutex::new(None),
            reloading: std::sync::Mutex::new(()),
            failed_logins: crate::access::FailedLogins::default(),
            auth_cache: crate::auth_query::AuthCache::default(),
        }
    }

    /// TLS settings in force.
    pub fn tls(&self) -> arc_swap::Guard<Arc<crate::tls::TlsSetup>> {
        self.pools.tls.load()
    }
}

/// Builds a running proxy.
pub struct Proxy;

impl Proxy {
    /// Binds every listen address (port 0 picks a free port) and starts accepting, serving
    /// every client on the calling runtime. Must be called inside a Tokio runtime.
    pub async fn start(config: Config) -> io::Result<ProxyHandle> {
        Self::start_on(config, Workers::single()).await
    }

    /// [`Proxy::start`], spreading clients over `workers` (the accept loops, maintenance
    /// and the caller's own tasks run on the calling runtime, worker 0).
    pub async fn start_on(config: Config, workers: Arc<Workers>) -> io::Result<ProxyHandle> {
        let tls = crate::tls::TlsSetup::from_config(&config).map_err(io::Error::other)?;
        let shared = Arc::new(Shared::new(config.clone()));
        shared.pools.tls.store(Arc::new(tls));
        let mut accept = Vec::new();
        let mut addrs = Vec::new();
        for addr in &config.proxy.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            addrs.push(l.local_addr()?);
            accept.push(tokio::spawn(accept_tcp(l, shared.clone(), workers.clone())));
        }
        let mut unix_path = None;
        if let Some(dir) = &config.proxy.unix_socket_dir {
            let port = addrs.first().map_or(6432, |a| a.port());
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", path.display()),
                )
            })?;
            accept.push(tokio::spawn(accept_unix(
                l,
                shared.clone(),
                workers.clone(),
            )));
            unix_path = Some(path);
        }
        shared.pools.create_fixed(&config);
        let maintenance = tokio::spawn(maintain(shared.clone()));
        for a in &addrs {
            tracing::info!(listen = %a, "weir is accepting connections");
        }
        Ok(ProxyHandle {
            addrs,
            unix_path,
            unix_removed: std::sync::atomic::AtomicBool::new(false),
            shared,
            accept,
            maintenance,
        })
    }
}

async fn accept_tcp(l: TcpListener, shared: Arc<Shared>, workers: Arc<Workers>) {
    loop {
        match l.accept().await {
            Ok((sock, _)) => {
                let _ = sock.set_nodelay(true);
                hand_to_worker(&shared, &workers, sock);
            }
            Err(e) => accept_error(e).await,
        }
    }
}

async fn accept_unix(l: UnixListener, shared: Arc<Shared>, workers: Arc<Workers>) {
    loop {
        match l.accept().await {
            Ok((sock, _)) => hand_to_worker(&shared, &workers, sock),
            Err(e) => accept_error(e).await,
        }
    }
}

/// An accepted socket, as it moves from the accepting runtime to its worker's.
trait Accepted: Sized + Send + 'static {
    type Std: Send + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
    fn from_std(s: Self::Std) -> io::Result<Self>;
    fn stream(self) -> Stream;
}

impl Accepted for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
    fn stream(self) -> Stream {
        Stream::Tcp(self)
    }
}

impl Accepted for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
    fn stream(self) -> Stream {
        Stream::Unix(self)
    }
}

/// Starts the session of an accepted client on the next worker: here if that is this
/// thread, else deregistered from this runtime and registered with that worker's.
fn hand_to_worker<S: Accepted>(shared: &Arc<Shared>, workers: &Workers, sock: S) {
    let w = workers.next();
    let shared = shared.clone();
    if w == crate::workers::current() {
        tokio::spawn(session::serve(shared, sock.stream()));
        return;
    }
    match sock.into_std() {
        Ok(sock) => drop(workers.handle(w).spawn(async move {
            match S::from_std(sock) {
                Ok(s) => session::serve(shared, s.stream()).await,
                Err(e) => tracing::warn!(error = %e, "could not register an accepted connection"),
            }
        })),
        Err(e) => tracing::warn!(error = %e, "could not hand an accepted connection to a worker"),
    }
}

/// Every second: close dead, expired and long-idle server connections, open `min_size`
/// ones, and log pool utilisation crossing its thresholds.
async fn maintain(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        shared.pools.maintain();
        if n.is_multiple_of(2) {
            shared.pools.probe_all();
        }
        n += 1;
    }
}

/// Out of file descriptors and the like: say so and back off instead of spinning.
async fn accept_error(e: io::Error) {
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// A running proxy.
pub struct ProxyHandle {
    pub addrs: Vec<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    /// Set once the socket file is removed: removing it again could delete the socket of a
    /// newer instance that bound the same path meanwhile (a rolling restart).
    unix_removed: std::sync::atomic::AtomicBool,
    shared: Arc<Shared>,
    accept: Vec<JoinHandle<()>>,
    maintenance: JoinHandle<()>,
}

impl ProxyHandle {
    /// The first TCP address (the one to connect to in tests).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Graceful shutdown, first half: close the listening sockets (new connections are
    /// refused), and tell every session to end at its next transaction boundary: idle
    /// clients at once with FATAL 57P01, the others when their transaction ends.
    pub async fn begin_drain(&self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for t in &self.accept {
            t.abort();
        }
        // An aborted task drops its listener when it next runs: wait for that, so a
        // connection made after this returns is refused.
        while !self.accept.iter().all(JoinHandle::is_finished) {
            tokio::task::yield_now().await;
        }
        self.remove_unix_socket();
        self.shared.drain.cancel();
        self.shared
            .clients_registry
            .raise_standing(crate::metrics::signal::DRAIN);
    }

    fn remove_unix_socket(&self) {
        if let Some(p) = &self.unix_path
            && !self
                .unix_removed
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Returns once no client is connected.
    pub async fn drained(&self) {
        while self.shared.clients.total() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops accepting and closes the pools. Sessions still running end as their server
    /// connections close.
    pub fn stop(&self) {
        for t in &self.accept {
            t.abort();
        }
        self.maintenance.abort();
        self.shared.pools.close_all();
        self.remove_unix_socket();
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
