//! Listening sockets and the state every session shares.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
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
    /// The worker threads, for a session that moves to another ([`crate::workers`]).
    pub workers: Arc<Workers>,
}

impl Shared {
    /// The shared state of a proxy serving its clients on `workers`.
    pub fn new(config: Config, workers: Arc<Workers>) -> Shared {
        Shared {
            users: ArcSwap::from_pointee(UserDirectory::new(&config)),
            config: ArcSwap::from_pointee(config),
            pools: Pools::default(),
            cancel: Arc::new(CancelRegistry::default()),
            clients: Arc::new(ClientCounts::new(workers.len())),
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
            workers,
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

    /// [`Proxy::start`], serving clients on `workers`. The accept loops, maintenance and the
    /// caller's own tasks run on the calling runtime, worker 0.
    pub async fn start_on(config: Config, workers: Arc<Workers>) -> io::Result<ProxyHandle> {
        let tls = crate::tls::TlsSetup::from_config(&config).map_err(io::Error::other)?;
        let shared = Arc::new(Shared::new(config.clone(), workers.clone()));
        shared.pools.tls.store(Arc::new(tls));
        // Every socket is bound and registered before any accept loop starts: a failure
        // leaves nothing running behind the error.
        let mut tcp = Vec::new();
        let mut addrs = Vec::new();
        for addr in &config.proxy.listen {
            let l = bind_tcp(*addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            let bound = l.local_addr()?;
            addrs.push(bound);
            // `to_canonical`: `[::ffff:0.0.0.0]` is a wildcard too.
            let local = (!bound.ip().to_canonical().is_unspecified()).then_some(bound);
            tcp.push((watch(mio::net::TcpListener::from_std(l))?, local));
        }
        let mut unix = None;
        if let Some(dir) = &config.proxy.unix_socket_dir {
            let port = addrs.first().map_or(6432, |a| a.port());
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let _ = std::fs::remove_file(&path);
            let l = mio::net::UnixListener::bind(&path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", path.display()),
                )
            })?;
            // A socket file nothing listens on is not left behind.
            let l = watch(l).inspect_err(|_| {
                let _ = std::fs::remove_file(&path);
            })?;
            unix = Some((l, path));
        }
        let mut accept = Vec::new();
        for (l, local) in tcp {
            accept.push(tokio::spawn(accept_loop(l, local, shared.clone())));
        }
        let mut unix_path = None;
        if let Some((l, path)) = unix {
            accept.push(tokio::spawn(accept_loop(l, None, shared.clone())));
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

/// A listening socket that Tokio watches for readiness but that is accepted from directly:
/// an accepted socket is then registered once, with the runtime of the worker that serves
/// it. Accepting through Tokio's listener would register it with the accepting runtime
/// first, and moving it to another worker would cost two more `epoll_ctl` calls.
///
/// # Safety
/// An implementor owns its descriptor and returns that same one from every `as_raw_fd`
/// until it is dropped (what [`AsyncFd::register_with_interest`] asks of it).
unsafe trait Listen: AsRawFd + Send + Sync + 'static {
    /// Accepts one connection (non-blocking, close-on-exec) and the client's address.
    fn accept_raw(&self) -> io::Result<(Raw, Option<SocketAddr>)>;
}

// SAFETY: a mio listener owns its descriptor for its whole life.
unsafe impl Listen for mio::net::TcpListener {
    fn accept_raw(&self) -> io::Result<(Raw, Option<SocketAddr>)> {
        let (sock, peer) = self.accept()?;
        let _ = sock.set_nodelay(true);
        Ok((Raw::Tcp(sock.into()), Some(peer)))
    }
}

// SAFETY: as for the TCP listener.
unsafe impl Listen for mio::net::UnixListener {
    fn accept_raw(&self) -> io::Result<(Raw, Option<SocketAddr>)> {
        let (sock, _) = self.accept()?;
        Ok((Raw::Unix(sock.into()), None))
    }
}

/// Registers a listener with the calling runtime, for readability only.
fn watch<L: Listen>(l: L) -> io::Result<AsyncFd<L>> {
    // SAFETY: `Listen` promises a descriptor that stays the listener's own until it is
    // dropped, and only the `AsyncFd` drops it.
    Ok(unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }?)
}

/// An accepted socket not yet registered with any runtime.
enum Raw {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Raw {
    /// Registers the socket with the calling thread's runtime.
    fn register(self) -> io::Result<Stream> {
        Ok(match self {
            Raw::Tcp(s) => Stream::Tcp(tokio::net::TcpStream::from_std(s)?),
            Raw::Unix(s) => Stream::Unix(tokio::net::UnixStream::from_std(s)?),
        })
    }
}

/// Accepts until the proxy stops. `local` is the address the listener is bound to unless
/// that is a wildcard, so a session need not ask the kernel for it.
async fn accept_loop<L: Listen>(l: AsyncFd<L>, local: Option<SocketAddr>, shared: Arc<Shared>) {
    loop {
        let mut ready = match l.readable().await {
            Ok(r) => r,
            Err(e) => {
                // Only a runtime shutting down says this, and it does not change its mind.
                tracing::debug!(error = %e, "accept loop ends");
                return;
            }
        };
        match ready.try_io(|l| l.get_ref().accept_raw()) {
            Ok(Ok((sock, peer))) => {
                hand_to_worker(&shared, sock, session::Ends { peer, local });
                // Waiting for readiness spends none of the task's budget, and readiness
                // stays set while connections queue: without this, a burst of connections
                // would keep the other tasks of this worker (its clients, the admin API,
                // signals, maintenance) waiting until the queue is empty.
                tokio::task::coop::consume_budget().await;
            }
            Ok(Err(e)) => accept_error(e).await,
            // Readiness was stale: `try_io` cleared it, so the next wait is a real one.
            Err(_would_block) => {}
        }
    }
}

/// The listen queue of each listening socket: a burst of a thousand clients connecting at
/// once fits (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

/// Binds and listens on `addr`.
fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restart need not wait for the last one's connections to leave TIME_WAIT.
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)?.into_std()
}

/// Starts the session of a client accepted on this worker, on the worker
/// [`crate::limits::ClientCounts::worker_for`] picks, registering its socket with that
/// worker's runtime.
fn hand_to_worker(shared: &Arc<Shared>, sock: Raw, ends: session::Ends) {
    let w = shared.clients.worker_for(crate::workers::current());
    // Counted on `w` now, so a burst of accepts, which may run before any of their sessions
    // starts, sees each one placed.
    let slot = shared
        .clients
        .enter(w, shared.config.load().proxy.max_client_conn);
    let start = {
        let shared = shared.clone();
        async move {
            match sock.register() {
                Ok(s) => session::serve(shared, s, ends, slot).await,
                Err(e) => tracing::warn!(error = %e, "could not register an accepted connection"),
            }
        }
    };
    drop(shared.workers.spawn(w, start));
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

/// A connection that failed while it queued (reset by the client, or a network error
/// accept(2) passes on) costs nothing but a debug line: the next one is accepted at once.
/// Anything else, such as running out of descriptors, is logged and backed off from for
/// 100 ms instead of spinning.
async fn accept_error(e: io::Error) {
    let queued = matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    );
    if queued {
        tracing::debug!(error = %e, "skipping a connection that failed before its accept");
        return;
    }
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
        // An aborted task drops its listener when it next runs, on its worker: wait for
        // that, so a connection made after this returns is refused. A worker's tasks yield
        // often, so this takes a round or two of the 1 ms poll; a worker stuck for a second
        // is reported and not waited for (the shutdown's own time limit starts after this).
        let since = std::time::Instant::now();
        while !self.accept.iter().all(JoinHandle::is_finished) {
            if since.elapsed() > std::time::Duration::from_secs(1) {
                tracing::warn!("a listener is still open 1 s after the drain began");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
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
