//! One client's life: startup, login, then the relay loop.
//!
//! While the client holds no server connection the session waits for the client's socket
//! only, holding no server and no read buffer of a server. When a message needs a server,
//! it checks one out (FIFO, up to `query_wait_timeout`), brings the server's session
//! parameters in line with the client's, and relays in both directions with non-blocking
//! writes, so a slow side never stalls the other into a deadlock. In transaction mode the
//! server connection goes back to the pool as soon as [`Relay::is_idle`] says so.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use weir_config::{AuthType, PoolMode};
use weir_pool::{GetError, Pooled};
use weir_wire::backend::{self, Authentication, TxStatus};
use weir_wire::frame;
use weir_wire::frontend::Startup;
use weir_wire::scram::Verifier;
use weir_wire::{ErrorResponse, Severity, SqlState};

use crate::auth::{self, AuthError};
use crate::cancel::Registration;
use crate::limits::ClientSlot;
use crate::listener::Shared;
use crate::metrics::{ConnInfo, ConnState, Registered, SLOW_QUERY_TEXT, SlowQuery, cut, signal};
use crate::params::ClientParams;
use crate::pools::{ServerManager, ServerPool};
use crate::prepared::ClientStatements;
use crate::relay::{ClientProtocolError, ClientStep, Relay, ServerProtocolError};
use crate::server::{READ_CHUNK, ServerError, send_cancel};
use crate::startup::{self, Hello};
use crate::stream::Stream;

/// Stop reading from a side whose output is this far behind.
const HIGH_WATER: usize = 256 * 1024;
/// Client read size.
const CLIENT_CHUNK: usize = 16 * 1024;
/// Replies a client may have outstanding before Weir stops reading its messages.
const MAX_OWED: usize = 4096;
/// Time allowed to clean a server connection when a client leaves.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Read buffers of idle sessions, kept per worker thread for the next session with data to
/// read: an idle client holds no buffer, and a busy one does not go to the allocator for each
/// transaction. Bounded: at most [`spare::KEEP`] buffers of at most [`spare::MAX_KEPT`] bytes a
/// thread.
mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::CLIENT_CHUNK;

    pub const KEEP: usize = 64;
    /// The largest buffer kept.
    pub const MAX_KEPT: usize = 4 * CLIENT_CHUNK;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer with room for at least [`CLIENT_CHUNK`] bytes.
    pub fn take() -> BytesMut {
        SPARE
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(CLIENT_CHUNK))
    }

    /// Keeps `buf` for [`take`] if it is a usual size and there is room; frees it otherwise
    /// (the small one login used, or one that grew for a large message).
    pub fn give(mut buf: BytesMut) {
        buf.clear();
        // `capacity()` counts only the space after the read position. Asking for one byte
        // more than it rewinds an advanced buffer to the start of its allocation (nothing to
        // copy: it is empty) and leaves one never advanced as it is, so either way it then
        // shows the allocation's size. That holds for a buffer that alone owns its allocation
        // and whose view runs to its end, as the session's buffers do (the front part of a
        // split, or a buffer still shared, would show less). One `try_reclaim`, which never
        // allocates, where asking for the two limits took two.
        let _ = buf.try_reclaim(buf.capacity() + 1);
        if !(CLIENT_CHUNK..=MAX_KEPT).contains(&buf.capacity()) {
            return;
        }
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(buf);
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use bytes::Buf;

        fn kept() -> usize {
            SPARE.with(|s| s.borrow().len())
        }

        #[test]
        fn keeps_usual_buffers_and_frees_small_and_grown_ones() {
            let mut b = take();
            b.extend_from_slice(&[1; 100]);
            b.advance(100);
            let ptr = b.as_ptr();
            give(b);
            assert_eq!(kept(), 1, "a used chunk is kept");
            let again = take();
            assert!(again.is_empty() && again.capacity() >= CLIENT_CHUNK);
            assert_eq!(kept(), 0);
            assert!(
                again.as_ptr() <= ptr,
                "the same allocation, read position rewound"
            );

            give(BytesMut::with_capacity(1024));
            assert_eq!(kept(), 0, "login's small buffer is not kept");

            // Grown for a large message and read most of the way: little space shows after
            // the read position, yet the allocation is far over the limit.
            let mut big = BytesMut::with_capacity(256 * 1024);
            big.extend_from_slice(&vec![0; 200 * 1024]);
            big.advance(200 * 1024);
            assert!((CLIENT_CHUNK..=MAX_KEPT).contains(&big.capacity()));
            give(big);
            assert_eq!(kept(), 0, "a grown buffer is freed");

            give(BytesMut::with_capacity(CLIENT_CHUNK));
            assert_eq!(kept(), 1, "a chunk never read into is kept");
            give(BytesMut::with_capacity(MAX_KEPT + 1));
            assert_eq!(kept(), 1, "a buffer never read into but too large is freed");
        }
    }
}

/// The two ends of an accepted connection, as far as the accept call told them: the
/// client's address comes with the accept, and ours is the listener's unless it listens on
/// a wildcard address (`None` for a Unix socket, or where unknown).
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    pub peer: Option<std::net::SocketAddr>,
    pub local: Option<std::net::SocketAddr>,
}

/// Serves one accepted connection to the end, holding `slot`, its place under the global
/// connection limit (or the refusal to give it one) taken when it was accepted.
pub async fn serve(
    shared: Arc<Shared>,
    mut client: Stream,
    ends: Ends,
    slot: Result<ClientSlot, crate::limits::Refused>,
) {
    let peer = PeerAddr(ends.peer);
    let mut buf = BytesMut::with_capacity(1024);
    // One deadline for the whole login (`proxy.client_login_timeout`): startup, TLS,
    // authentication and the first server connect, or the admin console's authentication.
    let deadline = tokio::time::Instant::now() + shared.config.load().proxy.client_login_timeout;
    let hello = loop {
        let tls = shared.pools.tls.load_full();
        // Never on a Unix socket, where PostgreSQL offers no TLS either.
        let offer_tls = tls.accepts() && client.is_plain_tcp();
        let hello = tokio::time::timeout_at(
            deadline,
            Box::pin(startup::read_hello(&mut client, &mut buf, offer_tls)),
        )
        .await;
        match hello {
            Err(_) => {
                send_fatal(
                    &mut client,
                    ErrorResponse::fatal(SqlState::PROTOCOL_VIOLATION, "startup timed out"),
                )
                .await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "startup failed");
                if let Some(r) = e.to_response() {
                    send_fatal(&mut client, r).await;
                }
                return;
            }
            Ok(Ok(h @ (Hello::SslRequest | Hello::DirectTls))) => {
                let direct = matches!(h, Hello::DirectTls);
                if !direct && client.write_all(b"S").await.is_err() {
                    return;
                }
                // A failed handshake has no channel left to carry an error.
                match tokio::time::timeout_at(
                    deadline,
                    Box::pin(tls.accept(client, &mut buf, direct)),
                )
                .await
                {
                    Ok(Ok(encrypted)) => client = encrypted,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake with a client failed");
                        return;
                    }
                    Err(_) => return,
                }
            }
            Ok(Ok(h)) => break h,
        }
    };
    match hello {
        Hello::Cancel(key) => {
            if let Some(t) = shared.cancel.target(key) {
                let timeout = shared.config.load().pool_settings("", "").connect_timeout;
                if let Err(e) = Box::pin(send_cancel(&t.addr, t.key, timeout)).await {
                    tracing::warn!(server = %t.addr, error = %e, "could not forward cancel request");
                }
            }
        }
        Hello::SslRequest | Hello::DirectTls => unreachable!("handled while negotiating"),
        Hello::Startup(startup) => {
            let slot = match slot {
                Ok(s) => s,
                Err(refused) => {
                    if shared.clients.may_log_refusal() {
                        tracing::warn!(%peer, "{refused}");
                    }
                    let e =
                        ErrorResponse::fatal(SqlState::TOO_MANY_CONNECTIONS, refused.to_string());
                    send_fatal(&mut client, e).await;
                    return;
                }
            };
            if crate::console::DATABASES.contains(&startup.get("database").unwrap_or("")) {
                Box::pin(crate::console::serve(
                    shared,
                    client,
                    buf,
                    startup,
                    slot,
                    ends.peer.map(|a| a.ip()),
                    deadline,
                ))
                .await;
                return;
            }
            // Boxed: the login's state (authentication, the first connect) is large and lives
            // only for the login, so it should not size every idle session's task.
            let mut authenticated = false;
            let login = tokio::time::timeout_at(
                deadline,
                Box::pin(login(
                    &shared,
                    &mut client,
                    ends,
                    &mut buf,
                    &startup,
                    slot,
                    &mut authenticated,
                )),
            )
            .await;
            let session = match login {
                Err(_) => {
                    send_login_fatal(
                        &mut client,
                        authenticated,
                        ErrorResponse::fatal(SqlState::PROTOCOL_VIOLATION, "login timed out"),
                    )
                    .await;
                    return;
                }
                Ok(Err(Some(e))) => {
                    tracing::info!(%peer, error = %e.message, code = %e.code, "login refused");
                    send_login_fatal(&mut client, authenticated, e).await;
                    return;
                }
                Ok(Err(None)) => return,
                Ok(Ok(s)) => s,
            };
            // The logged-in session continues in a task of its own: this one's state (the
            // startup and login machinery) would otherwise stay in every idle client's task.
            tokio::spawn(live(Session::new(shared, client, session, buf), false));
        }
    }
}

/// A logged-in client, to the end or until it moves to another worker. Its future is what
/// an idle client costs, so it holds only the session and the relay loop's state. `moved`:
/// the session comes from another worker, and its client's socket is registered with this
/// one's runtime first.
#[allow(clippy::manual_async_fn)] // the async fn form is what costs the extra copy
fn live(mut session: Session, moved: bool) -> impl std::future::Future<Output = ()> + Send {
    // An async block, not an async fn: an async fn would copy its argument into the
    // future a second time. The loop's future sits beside the session directly, not inside
    // a wrapper holding `&mut session` once more.
    async move {
        let end = if moved && session.rehome().is_err() {
            End::ClientGone
        } else {
            session.relay_loop().await
        };
        if let End::Moved(w) = end {
            return move_to_worker(session, w);
        }
        // Boxed: the ending runs once, and its state (the `End` held across the farewell
        // and the cleanup) would otherwise sit beside the relay loop in every client's task.
        Box::pin(session.conclude(end)).await;
    }
}

/// Continues `session`, between two transactions, in a new task on worker `w` (see
/// [`crate::workers`]). Its timer belongs to this worker's timer wheel and its signal word
/// wakes this task, so both are let go: the new task sets them up again on its first wait.
/// Its sockets are registered with `w`'s runtime when the new task starts
/// ([`Session::rehome`]).
fn move_to_worker(mut session: Session, w: usize) {
    session.timer = None;
    session.info.info.forget_task();
    session.slot.move_to(w);
    session
        .pool
        .metrics
        .client_moves
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let workers = session.shared.workers.clone();
    drop(workers.spawn(w, live(session, true)));
}

/// After how many rounds of its relay loop (about one to three a transaction) a session asks
/// whether it should move to another worker ([`crate::limits::ClientCounts::settle`]): first
/// after a few, so a client that connects for a transaction or two never moves, then now and
/// then, so clients that stay remain spread out as others come and go.
const SETTLE_FIRST: u8 = 8;
const SETTLE_AGAIN: u8 = 64;

/// What login settles for a session.
struct Login {
    pool: Arc<ServerPool>,
    params: ClientParams,
    cancel: Registration,
    slot: ClientSlot,
    /// In SHOW CLIENTS; also holds the client's database, user and address, and the
    /// signals (KILL, shutdown) raised on it.
    info: Registered,
}

/// Checks the database, authenticates, and sends the client the welcome messages.
/// `Err(None)` means the client went away.
async fn login(
    shared: &Arc<Shared>,
    client: &mut Stream,
    ends: Ends,
    buf: &mut BytesMut,
    startup: &Startup,
    mut slot: ClientSlot,
    authenticated: &mut bool,
) -> Result<Login, Option<ErrorResponse>> {
    let Some(user) = startup.get("user").filter(|u| !u.is_empty()) else {
        return Err(Some(ErrorResponse::fatal(
            SqlState::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )));
    };
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    if startup
        .get("replication")
        .is_some_and(|r| r != "false" && r != "off" && r != "0")
    {
        return Err(Some(ErrorResponse::fatal(
            SqlState::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported through weir",
        )));
    }
    let config = shared.config.load_full();
    if !config.databases.contains_key(database) {
        return Err(Some(
            ErrorResponse::fatal(
                SqlState::INVALID_CATALOG_NAME,
                format!("database \"{database}\" does not exist"),
            )
            .with_hint("weir serves only the databases in its configuration"),
        ));
    }
    let ip = ends.peer.map(|a| a.ip());
    crate::access::admit(&config, shared.tls().required(), client, ip, database, user)
        .map_err(Some)?;
    // Recent failures from this address pause the attempt before anything is looked up or
    // exchanged.
    let (pause, _paused) = shared
        .failed_logins
        .pause(ip, config.failed_login_delay, config.failed_login_delay_max)
        .map_err(Some)?;
    if !pause.is_zero() {
        tracing::debug!(peer = ?ip, user, pause = ?pause, "pausing a login after failed attempts");
        tokio::time::sleep(pause).await;
    }
    let users = shared.users.load_full();
    let method = config.auth_type(database, user);
    let mut found = None;
    if users.get(user).is_none() && config.auth_query.is_some() && method != AuthType::Trust {
        let tls = shared.pools.tls.load_full();
        match Box::pin(shared.auth_cache.lookup(&config, &tls, database, user)).await {
            Ok(secret) => {
                // Only a hash or a verifier: anything else (an empty string, a custom query's
                // odd column) would be taken for a plain password.
                found = secret
                    .filter(|s| weir_wire::md5::is_stored_secret(s) || Verifier::is_verifier(s))
                    .map(|s| auth::UserSecret::from_config(user, &s));
            }
            Err(e) => {
                // The details (server, auth user, its error) are for the operator only.
                tracing::error!(user, database, error = %e, "auth_query lookup failed");
                return Err(Some(ErrorResponse::fatal(
                    SqlState::CANNOT_CONNECT,
                    "weir could not check this login with the server; see weir's log",
                )));
            }
        }
    }
    let client_key =
        match auth::authenticate(client, buf, method, user, &users, found.as_ref()).await {
            Ok(k) => k,
            Err(e) => {
                if let AuthError::Failed(_) = e {
                    // The next login from this address waits (see FailedLogins).
                    shared.failed_logins.failed(ip);
                    tracing::warn!(peer = ?ip, user, database, "password authentication failed");
                }
                return Err(e.to_response());
            }
        };
    // From here an error follows an AuthenticationOk (sent with it, see send_login_fatal).
    *authenticated = true;

    let db_max = config
        .databases
        .get(database)
        .map_or(0, |d| d.max_client_conn);
    let user_max = config.users.get(user).map_or(0, |u| u.max_client_conn);
    slot.login(database, db_max, user, user_max).map_err(|r| {
        Some(ErrorResponse::fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            r.to_string(),
        ))
    })?;
    // Read again: authentication waited on the client, and a reload may have replaced the
    // pools meanwhile (a pool made from the old config would outlive it).
    let config = shared.config.load_full();
    let pool = shared.pools.get(&config, database, user).ok_or_else(|| {
        Some(ErrorResponse::fatal(
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{database}\" does not exist"),
        ))
    })?;
    if let Some(secret) = &found {
        // The pool's server logins use what this login revealed (the newest wins).
        let fetched = match (client_key, &secret.scram, &secret.md5) {
            (Some(client_key), Some(verifier), _) => Some(crate::server::Fetched::Scram {
                client_key,
                verifier: verifier.clone(),
            }),
            (_, _, Some(hash)) => Some(crate::server::Fetched::Md5(hash.clone())),
            _ => None,
        };
        if fetched.is_some() {
            *pool.pool.manager().fetched.lock().unwrap() = fetched;
        }
    }
    let defaults = pool
        .defaults()
        .await
        .map_err(|e| Some(checkout_error(&pool, e).into_fatal()))?;
    let (params, reported) = pool
        .logins
        .settle(&defaults, &startup.params)
        .map_err(|m| Some(ErrorResponse::fatal(SqlState(*b"22023"), m)))?;
    let cancel = shared.cancel.register();

    let mut out = BytesMut::with_capacity(reported.len() + 64);
    Authentication::Ok.encode(&mut out);
    out.extend_from_slice(&reported);
    let key = cancel.key();
    backend::BackendKey {
        pid: key.pid,
        secret: key.secret,
    }
    .encode(&mut out);
    TxStatus::Idle.encode(&mut out);
    client.write_all(&out).await.map_err(|_| None)?;
    // The limit counters' own copies of the names, shared rather than copied again.
    let (db_name, user_name) = slot
        .names()
        .unwrap_or_else(|| (database.into(), user.into()));
    let info = shared.clients_registry.register(ConnInfo::new(
        shared
            .next_client_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        user_name,
        db_name,
        ends.peer,
        // Asked of the kernel only when the listener's address is a wildcard.
        ends.local.or_else(|| client.local_addr()),
        startup.get("application_name").unwrap_or(""),
        0,
    ));
    pool.metrics
        .clients
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Login {
        pool,
        params,
        cancel,
        slot,
        info,
    })
}

/// Boxed: it runs at most once per connection, and inline its state would size every idle
/// client's task.
fn send_fatal(
    client: &mut Stream,
    e: ErrorResponse,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    send_login_fatal(client, false, e)
}

/// [`send_fatal`] for a login that may have passed authentication: then AuthenticationOk
/// goes first, in the same write, as PostgreSQL orders it. (libpq takes an error that comes
/// while it still waits on authentication for a refusal of the connection attempt, and with
/// `sslmode=prefer` tries again, unencrypted.)
fn send_login_fatal(
    client: &mut Stream,
    authenticated: bool,
    e: ErrorResponse,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let mut out = BytesMut::new();
        if authenticated {
            Authentication::Ok.encode(&mut out);
        }
        e.encode(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&out)).await;
    })
}

/// An error Weir raises for a checkout that failed.
struct CheckoutFailure(ErrorResponse);

impl CheckoutFailure {
    fn into_fatal(mut self) -> ErrorResponse {
        self.0.severity = Severity::Fatal;
        self.0
    }
}

fn checkout_error(pool: &ServerPool, e: GetError<ServerError>) -> CheckoutFailure {
    let name = pool.name();
    CheckoutFailure(match e {
        GetError::Timeout {
            waited,
            max_size,
            queued,
            last_error,
        } => {
            // "Unreachable" only when this wait ended retrying a connect, or the pool has no
            // connection at all: a flag left from an old failure must not turn a busy pool's
            // timeout into a report of an outage.
            let unreachable = pool
                .pool
                .manager()
                .unreachable()
                .filter(|_| last_error.is_some() || pool.pool.snapshot().size == 0);
            match (unreachable, last_error) {
                (Some(u), last) => {
                    let since = humantime::format_rfc3339_seconds(u.since);
                    let last = last.map_or(u.last_error, |e| e.to_string());
                    ErrorResponse::error(
                        SqlState::CANNOT_CONNECT,
                        format!(
                            "server for pool \"{name}\" unreachable since {since} ({:.1}s); waited {:.1}s: {last}",
                            u.since_instant.elapsed().as_secs_f64(),
                            waited.as_secs_f64()
                        ),
                    )
                    .with_hint("Weir keeps retrying; check that PostgreSQL is running and reachable")
                }
                (None, _) => ErrorResponse::error(
                    SqlState::TOO_MANY_CONNECTIONS,
                    format!(
                        "query_wait_timeout: no server connection for pool \"{name}\" after {:.1}s (pool_size {max_size}, {queued} other clients waiting)",
                        waited.as_secs_f64()
                    ),
                )
                .with_hint("raise pool_size or query_wait_timeout for this pool, or shorten transactions"),
            }
        }
        GetError::Closed => ErrorResponse::error(
            SqlState::ADMIN_SHUTDOWN,
            format!("pool \"{name}\" is shutting down"),
        ),
        GetError::Create(err) => {
            let code = match &err {
                ServerError::Rejected { error, .. } => error.code,
                _ => SqlState::CANNOT_CONNECT,
            };
            ErrorResponse::error(
                code,
                format!("weir could not open a server connection for pool \"{name}\": {err}"),
            )
            .with_hint("check that the server is running and the pool's login is right")
        }
    })
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Client closed its socket or sent Terminate.
    ClientGone,
    /// The server connection failed while the client was using it.
    ServerLost(String),
    /// The client broke the protocol.
    ClientProtocol(ClientProtocolError),
    ServerProtocol(ServerProtocolError),
    /// Weir ends the session itself (a timeout), with this error for the client.
    Closed(ErrorResponse),
    /// Not an end: the session continues on this worker (see [`move_to_worker`]).
    Moved(usize),
}

impl From<ClientProtocolError> for End {
    fn from(e: ClientProtocolError) -> Self {
        End::ClientProtocol(e)
    }
}

impl From<ServerProtocolError> for End {
    fn from(e: ServerProtocolError) -> Self {
        End::ServerProtocol(e)
    }
}

/// How a session ends when Weir shuts down gracefully (what PostgreSQL says on a smart
/// shutdown: 57P01).
fn shutting_down() -> End {
    End::Closed(
        ErrorResponse::fatal(
            SqlState(*b"57P01"),
            "terminating connection because weir is shutting down",
        )
        .with_hint("reconnect: another weir instance or the restarted one will serve you"),
    )
}

/// The error a session ends with when an operator KILLs its database.
fn killed() -> End {
    End::Closed(ErrorResponse::fatal(
        SqlState::ADMIN_SHUTDOWN,
        "terminating connection: database killed by an administrator (KILL)",
    ))
}

/// The session's one timer, set to fire at `at`: made on first use and reset after, so no
/// timer is built per wait, and a session with no timeout configured that never waited for
/// a connection holds none (a `Sleep` inline would add its size to every idle client's task).
fn arm(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    at: Instant,
) -> Pin<&mut tokio::time::Sleep> {
    let at = tokio::time::Instant::from_std(at);
    match timer {
        Some(t) if t.deadline() == at => {}
        Some(t) => t.as_mut().reset(at),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    timer.as_mut().expect("set above").as_mut()
}

/// [`arm`] for a caller that reads the clock when the timer fires and arms it again if that
/// was early: a timer already set to fire no later than `at`, and not fired yet, is left as
/// it is. A session that waits for a server connection at every transaction (100 clients on
/// a pool of 20) reset its timer at every wait, usually to a later deadline: Tokio then only
/// extends the entry, but converting the deadline to its tick and extending took about 80
/// instructions a wait. Left set, the timer costs one early wakeup (and one real reset) per
/// `query_wait_timeout` instead; a session that rarely waits pays that wakeup where Tokio
/// would have refiled the entry silently, once per wait at most.
fn arm_by(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    at: Instant,
) -> Pin<&mut tokio::time::Sleep> {
    let by = tokio::time::Instant::from_std(at);
    let keep = timer
        .as_ref()
        .is_some_and(|t| !t.is_elapsed() && t.deadline() <= by);
    if keep {
        return timer.as_mut().expect("checked").as_mut();
    }
    arm(timer, at)
}

/// A client's address for logs: `host:port`, `[v6]:port` or `unix`, from its registry
/// entry (the session keeps no copy).
struct Peer<'a>(&'a ConnInfo);

impl std::fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        PeerAddr(self.0.peer()).fmt(f)
    }
}

/// A client's address for logs, written only if a log line is. Every TCP client has one (the
/// accept call gives it), so a missing one means a Unix socket.
#[derive(Clone, Copy)]
struct PeerAddr(Option<std::net::SocketAddr>);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("unix"),
        }
    }
}

/// Socket events the relay loop reacts to.
enum Event {
    ServerReadable(io::Result<()>),
    ServerWritable(io::Result<()>),
    ClientReadable(io::Result<()>),
    ClientWritable(io::Result<()>),
    Timeout(Phase),
    /// [`signal`] bits raised on the session.
    Signal(u8),
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::ServerReadable(_) => "server readable",
            Event::ServerWritable(_) => "server writable",
            Event::ClientReadable(_) => "client readable",
            Event::ClientWritable(_) => "client writable",
            Event::Timeout(_) => "timeout",
            Event::Signal(_) => "signal",
        }
    }
}

struct Session {
    client: Stream,
    pool: Arc<ServerPool>,
    mode: PoolMode,
    server: Option<Pooled<ServerManager>>,
    relay: Relay,
    statements: ClientStatements,
    params: ClientParams,
    cancel: Registration,
    /// Client bytes read, not yet handled.
    cbuf: BytesMut,
    /// Bytes for the server the socket has not taken yet.
    to_server: BytesMut,
    /// Bytes for the client the socket has not taken yet.
    to_client: BytesMut,
    /// Where rewritten server output is assembled.
    scratch: BytesMut,
    /// What the session is waiting on (for the timeouts). Kept apart from `phase_since` so
    /// that the one-byte field packs with the flags below (a tuple took eight bytes).
    phase: Phase,
    /// When the phase (re)started.
    phase_since: Instant,
    /// Replies owed when the phase last (re)started: each completed reply restarts the
    /// query_timeout, so a pipelined stream of fast statements is not one long statement.
    phase_owed: usize,
    /// The running statement was already cancelled for query_timeout.
    cancelled: bool,
    /// A query_timeout cancel may still be on its way to this server connection (the
    /// statement ended before a 57014 came back): do not hand the connection to anyone else.
    suspect: bool,
    /// Holds the client's place under the connection limits, counted on its worker.
    slot: ClientSlot,
    /// Relay rounds until the session next asks whether to move to another worker.
    settle_in: u8,
    /// This client in the registry (SHOW CLIENTS): its database, user and address, and
    /// the signals an operator raises on it (KILL, graceful shutdown).
    info: Registered,
    /// The timer of whichever timeout applies (see [`arm`]).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Shutting down: the session ends at its next transaction boundary.
    draining: bool,
    /// The request in flight: when it started, what it was, whether it reached a server.
    request: Option<(Instant, QueryLabel, bool)>,
    /// When the current transaction started.
    tx_start: Option<Instant>,
    /// Reused buffer for the slow-query label: a Query's or Parse's text, or the statement
    /// name a Bind gives (see `QueryLabel`).
    query_text: Vec<u8>,
    shared: Arc<Shared>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.pool
            .metrics
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a request ran, for the slow-query log, kept cheaply until needed.
#[derive(Debug, Clone)]
enum QueryLabel {
    /// The text is in the session's `query_text` buffer.
    Text,
    /// A Bind: the statement's name is in `query_text`, looked up only if the request turns
    /// out slow (a lookup and a reference count per request otherwise, for nothing).
    Bound,
    Other,
}

/// What a session with a server connection is waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The server owes replies: a statement is running.
    Server,
    /// Waiting on the client: COPY data to come, or, with nothing owed, replies it has not
    /// read yet. No timer runs; a slow client is not an idle one.
    Client,
    /// Nothing owed, a transaction open: the client's turn.
    InTransaction,
    /// Nothing owed, no transaction.
    Idle,
}

impl Session {
    fn new(shared: Arc<Shared>, client: Stream, login: Login, cbuf: BytesMut) -> Session {
        let settings = login.pool.settings().clone();
        let max_message_size = shared.config.load().proxy.max_message_size;
        let mut relay = Relay::new(settings.mode == PoolMode::Transaction, max_message_size);
        relay.max_statement_bytes =
            usize::try_from(settings.max_client_prepared_bytes).unwrap_or(usize::MAX);
        Session {
            client,
            mode: settings.mode,
            relay,
            pool: login.pool,
            server: None,
            statements: ClientStatements::default(),
            params: login.params,
            cancel: login.cancel,
            cbuf,
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            scratch: BytesMut::new(),
            phase: Phase::Idle,
            phase_since: Instant::now(),
            phase_owed: 0,
            cancelled: false,
            suspect: false,
            info: login.info,
            draining: false,
            timer: None,
            request: None,
            tx_start: None,
            query_text: Vec::new(),
            shared: shared.clone(),
            slot: login.slot,
            settle_in: SETTLE_FIRST,
        }
    }

    /// The deadline of the timeout that applies now, if any: query_timeout while the server
    /// owes replies, idle_transaction_timeout while a transaction waits on the client,
    /// client_idle_timeout otherwise.
    fn deadline(&mut self) -> Option<(Instant, Phase)> {
        let t = self.pool.hot().timeouts();
        let (query, in_tx, idle) = (t.query, t.idle_transaction, t.client_idle);
        if query.is_zero() && in_tx.is_zero() && idle.is_zero() {
            return None;
        }
        let owed = self.relay.owed();
        // Only a client that owes input (COPY data, the rest of a message) stops the
        // statement's clock. A server message half read, or results the client has not read
        // yet, do not: the statement holds its server connection all the same, as
        // PostgreSQL's statement_timeout would count it. (Restarting the clock at each of
        // these let a statement streaming rows run for ever.)
        let phase = if !self.relay.nothing_owed() {
            if self.relay.waits_on_client() {
                Phase::Client
            } else {
                Phase::Server
            }
        } else if !self.to_client.is_empty() {
            Phase::Client
        } else if self.relay.status() != TxStatus::Idle {
            Phase::InTransaction
        } else {
            Phase::Idle
        };
        let reply_done = phase == Phase::Server && owed < self.phase_owed;
        if phase != self.phase || reply_done {
            if self.phase == Phase::Server && phase != Phase::Server {
                self.settle_cancel();
            }
            self.phase = phase;
            self.phase_since = Instant::now();
            self.phase_owed = owed;
            self.cancelled = false;
        }
        let limit = match phase {
            Phase::Server if !self.cancelled => query,
            Phase::Server | Phase::Client => Duration::ZERO,
            Phase::InTransaction => in_tx,
            Phase::Idle => idle,
        };
        (!limit.is_zero()).then(|| (self.phase_since + limit, phase))
    }

    /// The statement Weir cancelled is over. If its 57014 never came, the cancel may still
    /// reach this server connection later: it must not serve another client.
    fn settle_cancel(&mut self) {
        if self.relay.cancel_note.take().is_some() {
            self.suspect = true;
        }
    }

    /// Fresh timers for a server connection attached at `now`.
    fn reset_phase(&mut self, now: Instant) {
        self.phase = Phase::Idle;
        self.phase_since = now;
        self.phase_owed = 0;
        self.cancelled = false;
        self.relay.cancel_note = None;
    }

    /// A timeout fired.
    fn on_timeout(&mut self, phase: Phase) -> Result<(), End> {
        let s = self.pool.settings();
        match phase {
            Phase::Server => {
                let limit = humantime::format_duration(s.query_timeout);
                tracing::info!(peer = %Peer(&self.info.info), pool = %self.pool.name(), "cancelling a statement past query_timeout ({limit})");
                self.relay.cancel_note = Some(format!(
                    "canceling statement due to query_timeout ({limit})"
                ));
                self.cancelled = true;
                if let Some(server) = &self.server {
                    self.cancel_on(server);
                }
                Ok(())
            }
            Phase::Client => Ok(()),
            Phase::InTransaction => Err(End::Closed(ErrorResponse::fatal(
                SqlState(*b"25P03"),
                format!(
                    "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout {})",
                    humantime::format_duration(s.idle_transaction_timeout)
                ),
            ))),
            Phase::Idle => Err(End::Closed(ErrorResponse::fatal(
                SqlState(*b"57P05"),
                format!(
                    "terminating connection due to idle-session timeout (client_idle_timeout {})",
                    humantime::format_duration(s.client_idle_timeout)
                ),
            ))),
        }
    }

    /// Tells the client why its session ends, if it is still there, and cleans up.
    async fn conclude(&mut self, end: End) {
        match &end {
            // `live` continues a moved session instead of concluding it.
            End::ClientGone | End::Moved(_) => {}
            End::ServerLost(why) => {
                tracing::warn!(peer = %Peer(&self.info.info), pool = %self.pool.name(), %why, "server connection lost under a client");
                if !self.relay.fatal_relayed {
                    let e = ErrorResponse::fatal(
                        SqlState::CONNECTION_FAILURE,
                        format!("server connection lost: {why}"),
                    )
                    .with_hint("the transaction in progress, if any, did not complete; reconnect and retry");
                    self.fatal(e).await;
                }
            }
            End::ClientProtocol(e) => {
                let code = match e {
                    ClientProtocolError::Frame(weir_wire::FrameError::TooLarge { .. })
                    | ClientProtocolError::TooManyStatements(_) => SqlState::PROGRAM_LIMIT_EXCEEDED,
                    _ => SqlState::PROTOCOL_VIOLATION,
                };
                let what = if code == SqlState::PROGRAM_LIMIT_EXCEEDED {
                    "closing client: over a limit"
                } else {
                    "closing client: protocol violation"
                };
                tracing::info!(peer = %Peer(&self.info.info), pool = %self.pool.name(), error = %e, "{what}");
                self.fatal(ErrorResponse::fatal(code, e.to_string())).await;
            }
            End::Closed(e) => {
                tracing::info!(peer = %Peer(&self.info.info), pool = %self.pool.name(), reason = %e.message, "closing client");
                self.fatal(e.clone()).await;
            }
            End::ServerProtocol(e) => {
                tracing::error!(peer = %Peer(&self.info.info), pool = %self.pool.name(), error = %e, "server protocol error");
                if let Some(s) = &mut self.server {
                    s.state.broken = true;
                }
                self.fatal(ErrorResponse::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("server protocol error: {e}"),
                ))
                .await;
            }
        }
        self.finish().await;
    }

    /// Boxed for the same reason as [`send_fatal`].
    fn fatal(
        &mut self,
        e: ErrorResponse,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.pool.metrics.error(e.code);
            let pending = std::mem::take(&mut self.to_client);
            let flushed =
                tokio::time::timeout(Duration::from_secs(1), self.client.write_all(&pending)).await;
            // Where the client's stream now stops inside a message, the error would be read as
            // that message's rest: then the connection only closes. That is so when the owed
            // bytes were not all taken within the second (a client that does not read), and
            // when the relay had passed on only the start of a server message (a session
            // killed, or its server lost, in the middle of a large row).
            if matches!(flushed, Ok(Ok(()))) && !self.relay.mid_message_to_client() {
                send_fatal(&mut self.client, e).await;
            }
        })
    }

    async fn relay_loop(&mut self) -> End {
        loop {
            let r = if self.server.is_none() {
                self.idle_step().await
            } else {
                self.busy_step().await
            };
            if let Err(end) = r {
                return end;
            }
            // Shutting down with a server attached (session mode, or a transaction that just
            // ended): leave at the boundary, never inside a transaction.
            if self.draining && self.server.is_some() && self.at_boundary() {
                return shutting_down();
            }
            // A session-mode session keeps its server connection: it moves with it.
            if self.server.is_some()
                && self.mode == PoolMode::Session
                && let Some(w) = self.settle()
            {
                return End::Moved(w);
            }
        }
    }

    /// Counts down to the session's next look at the workers' counts; then, once it is
    /// between transactions with nothing owed or half-read either way, the worker it should
    /// move to, if any ([`crate::limits::ClientCounts::settle`]).
    fn settle(&mut self) -> Option<usize> {
        if self.settle_in > 0 {
            self.settle_in -= 1;
            return None;
        }
        if !self.cbuf.is_empty() || !self.at_boundary() {
            return None;
        }
        // A session-mode server connection with part of a message read, or TLS bytes unsent:
        // wait for a quieter boundary (its state would move with it, but there is no need).
        if let Some(s) = &self.server
            && (!s.rbuf.is_empty() || s.stream.wants_flush())
        {
            return None;
        }
        self.settle_in = SETTLE_AGAIN;
        self.shared.clients.settle(self.slot.worker())
    }

    /// Registers the client's socket, and the server connection's if the session holds one,
    /// with the calling worker's runtime: the session has just moved here. A server
    /// connection that cannot move still works from where it is (see [`Session::attach`]).
    /// (`server_moves` counts moves at checkout only: these follow their client.)
    fn rehome(&mut self) -> io::Result<()> {
        self.client.rehome()?;
        if let Some(s) = &mut self.server
            && let Err(e) = s.rehome()
        {
            tracing::debug!(server = s.id, error = %e, "could not move a server connection with its client");
        }
        Ok(())
    }

    /// Nothing owed either way, no transaction open, and no extended-protocol batch waiting
    /// for its Sync (ending there would commit half of an implicit transaction).
    fn at_boundary(&self) -> bool {
        self.relay.is_idle()
            && self.relay.nothing_owed()
            && self.to_client.is_empty()
            && self.to_server.is_empty()
            && !self.client.wants_flush()
    }

    /// No server connection: write what the client is owed, then wait for it to send.
    ///
    /// The waits are `poll_fn`s over the session's own fields rather than `select!` over
    /// futures: no future is built per wait, and the task holds a few references across it
    /// rather than the futures' state.
    async fn idle_step(&mut self) -> Result<(), End> {
        if !self.to_client.is_empty() || self.client.wants_flush() {
            self.flush_client().await?;
        }
        let signals = self.info.info.signals();
        if signals & signal::KILL != 0 {
            return Err(killed());
        }
        if self.draining || signals & signal::DRAIN != 0 {
            return Err(shutting_down());
        }
        if let Some(w) = self.settle() {
            return Err(End::Moved(w));
        }
        if !self.relay.client_ready(&self.cbuf) {
            let idle_limit = self.pool.hot().client_idle_timeout();
            let timed = !idle_limit.is_zero();
            if timed {
                arm(&mut self.timer, Instant::now() + idle_limit);
            }
            // Nothing half-read: wait for the client without holding buffers, so a client
            // idle between transactions costs no buffer memory. The buffers go to this
            // thread's spares and one comes back when data arrives: no allocation per
            // transaction either.
            let between = self.cbuf.is_empty();
            if between {
                if self.cbuf.capacity() > 0 {
                    spare::give(std::mem::take(&mut self.cbuf));
                }
                if self.scratch.capacity() > 0 {
                    spare::give(std::mem::take(&mut self.scratch));
                }
            }
            // poll_read_ready keeps the waker in the socket's one reader slot; a
            // `readable()` future would enter and leave its waiter list every time.
            let (client, info, timer) = (&self.client, &self.info.info, &mut self.timer);
            let ev = std::future::poll_fn(move |cx| {
                use std::task::Poll::{Pending, Ready};
                let raised = info.poll_signals(cx);
                if raised != 0 {
                    return Ready(Event::Signal(raised));
                }
                if let Ready(r) = client.poll_read_ready(cx) {
                    return Ready(Event::ClientReadable(r));
                }
                if timed
                    && let Some(t) = timer.as_mut()
                    && t.as_mut().poll(cx).is_ready()
                {
                    return Ready(Event::Timeout(Phase::Idle));
                }
                Pending
            })
            .await;
            match ev {
                Event::Signal(raised) if raised & signal::KILL != 0 => return Err(killed()),
                Event::Signal(_) => return Err(shutting_down()),
                Event::Timeout(phase) => return self.on_timeout(phase),
                Event::ClientReadable(r) => r.map_err(|_| End::ClientGone)?,
                _ => unreachable!("the idle wait gives no other event"),
            }
            if between {
                self.cbuf = spare::take();
            } else if self.cbuf.capacity() - self.cbuf.len() < 1024 {
                self.cbuf.reserve(CLIENT_CHUNK);
            }
            match self.client.try_read_buf(&mut self.cbuf) {
                Ok(0) => return Err(End::ClientGone),
                Ok(_) => {}
                // A spurious wakeup: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(End::ClientGone),
            }
        }
        self.handle_client().await
    }

    /// Writes what the client is owed, and over TLS what rustls still holds, waiting for the
    /// socket as needed. Frees the buffer after, so an idle client holds none.
    ///
    /// A client that reads nothing would keep this waiting for good, so the wait also watches
    /// for KILL. A drain does not end it: the transaction is over and what it owes the client
    /// is the rest of its results, which the drain delivers until `shutdown_timeout`.
    async fn flush_client(&mut self) -> Result<(), End> {
        let (client, pending, info) = (&self.client, &mut self.to_client, &self.info.info);
        std::future::poll_fn(move |cx| {
            use std::task::Poll::{Pending, Ready};
            loop {
                if pending.is_empty() && !client.wants_flush() {
                    return Ready(Ok(()));
                }
                match client.poll_write_ready(cx) {
                    Pending if info.poll_signals(cx) & signal::KILL != 0 => {
                        return Ready(Err(killed()));
                    }
                    Pending => return Pending,
                    Ready(Err(_)) => return Ready(Err(End::ClientGone)),
                    Ready(Ok(())) => {}
                }
                if flush_pending(client, pending).is_err() {
                    return Ready(Err(End::ClientGone));
                }
            }
        })
        .await?;
        if self.to_client.capacity() > 0 {
            self.to_client = BytesMut::new();
        }
        Ok(())
    }

    /// With a server connection: one round of whichever socket is ready.
    async fn busy_step(&mut self) -> Result<(), End> {
        // Only the phase is kept across the wait: the timer holds the deadline.
        let timed = self.deadline().map(|(at, phase)| {
            arm(&mut self.timer, at);
            phase
        });
        let ev = {
            let server = self
                .server
                .as_ref()
                .expect("busy means a server is attached");
            let read_server = self.to_client.len() < HIGH_WATER;
            // What stays in cbuf is one incomplete message, bounded by the relay's size limit,
            // so it never holds the client back. Output not yet taken by either side, or too
            // many replies owed (a flood of messages Weir answers itself), does.
            let read_client = self.to_server.len() < HIGH_WATER
                && self.to_client.len() < HIGH_WATER
                && self.relay.owed() < MAX_OWED;
            // TLS may still hold encrypted output the socket did not take.
            let write_server = !self.to_server.is_empty() || server.stream.wants_flush();
            let write_client = !self.to_client.is_empty() || self.client.wants_flush();
            let client = &self.client;
            let info = &self.info.info;
            let timer = &mut self.timer;
            // Once draining, the drain bit stays raised and no longer wakes the session.
            let watched = if self.draining {
                signal::KILL
            } else {
                signal::KILL | signal::DRAIN
            };
            // Polled directly rather than through select!: no readiness future is built and
            // torn down (with the waiter-list lock) per socket per round, and the task holds
            // references across the wait rather than futures. The timer is polled, and so
            // registered, last; one that has already fired is looked at first.
            std::future::poll_fn(move |cx| {
                use std::task::Poll::Ready;
                let raised = info.poll_signals(cx) & watched;
                if raised != 0 {
                    return Ready(Event::Signal(raised));
                }
                // A timer that has fired goes first: a server streaming rows faster than they
                // are relayed keeps its socket readable, and would otherwise hold off
                // query_timeout for good.
                if let Some(phase) = timed
                    && timer.as_ref().is_some_and(|t| t.is_elapsed())
                {
                    return Ready(Event::Timeout(phase));
                }
                if read_server && let Ready(r) = server.stream.poll_read_ready(cx) {
                    return Ready(Event::ServerReadable(r));
                }
                if write_server && let Ready(r) = server.stream.poll_write_ready(cx) {
                    return Ready(Event::ServerWritable(r));
                }
                if write_client && let Ready(r) = client.poll_write_ready(cx) {
                    return Ready(Event::ClientWritable(r));
                }
                if read_client && let Ready(r) = client.poll_read_ready(cx) {
                    return Ready(Event::ClientReadable(r));
                }
                if let Some(phase) = timed
                    && let Some(t) = timer.as_mut()
                    && t.as_mut().poll(cx).is_ready()
                {
                    return Ready(Event::Timeout(phase));
                }
                std::task::Poll::Pending
            })
            .await
        };
        tracing::trace!(peer = %Peer(&self.info.info), event = ev.name(), "busy");
        // Whether client bytes arrived to handle. The handling is awaited after the match, so
        // that neither the event nor the read's result sits in the task across the wait.
        let arrived = match ev {
            Event::Signal(raised) if raised & signal::KILL != 0 => return Err(killed()),
            Event::Signal(_) => {
                self.draining = true;
                false
            }
            Event::Timeout(phase) => {
                self.on_timeout(phase)?;
                false
            }
            Event::ServerReadable(r) => {
                r.map_err(|e| End::ServerLost(e.to_string()))?;
                self.on_server_readable()?;
                false
            }
            Event::ServerWritable(r) => {
                r.map_err(|e| End::ServerLost(e.to_string()))?;
                let server = self.server.as_ref().expect("attached");
                flush_pending(&server.stream, &mut self.to_server)
                    .map_err(|e| End::ServerLost(e.to_string()))?;
                self.maybe_release(Instant::now());
                false
            }
            Event::ClientWritable(r) => {
                r.map_err(|_| End::ClientGone)?;
                flush_pending(&self.client, &mut self.to_client).map_err(|_| End::ClientGone)?;
                false
            }
            Event::ClientReadable(r) => {
                r.map_err(|_| End::ClientGone)?;
                if self.cbuf.capacity() - self.cbuf.len() < 1024 {
                    self.cbuf.reserve(CLIENT_CHUNK);
                }
                match self.client.try_read_buf(&mut self.cbuf) {
                    Ok(0) => return Err(End::ClientGone),
                    Ok(_) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(_) => return Err(End::ClientGone),
                }
            }
        };
        if arrived {
            self.handle_client().await
        } else {
            Ok(())
        }
    }

    fn on_server_readable(&mut self) -> Result<(), End> {
        let server: &mut crate::server::ServerConn = self.server.as_mut().expect("attached");
        if server.rbuf.capacity() - server.rbuf.len() < READ_CHUNK / 4 {
            server.rbuf.reserve(READ_CHUNK);
        }
        match server.stream.try_read_buf(&mut server.rbuf) {
            Ok(0) => return Err(End::ServerLost("server closed the connection".into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(End::ServerLost(e.to_string())),
        }
        self.scratch.clear();
        tracing::trace!(peer = %Peer(&self.info.info), server = server.id, bytes = ?summarize(&server.rbuf), "from server");
        let (n, copied) = self.relay.from_server(
            &server.rbuf,
            &mut server.state,
            &mut self.params,
            &mut self.statements,
            &mut self.scratch,
        )?;
        tracing::trace!(peer = %Peer(&self.info.info), out = ?summarize(if copied { &self.scratch[..] } else { &server.rbuf[..n] }), status = ?self.relay.status(), owed = self.relay.owed(), "to client");
        // Counted, timed and (if slow) logged before the client sees the replies, so a
        // client that reads its answer and then asks the admin API finds the request there.
        let m = &self.pool.metrics;
        for code in self.relay.errors.drain(..) {
            m.error(code);
        }
        // The one clock reading for this event.
        let now = Instant::now();
        self.settle_request(now);
        let server = self.server.as_mut().expect("attached");
        let data = if copied {
            &self.scratch[..]
        } else {
            &server.rbuf[..n]
        };
        let sent = send(&self.client, &mut self.to_client, data);
        // Consumed whether or not the client could take it: the relay has counted these
        // replies, and a departed client's cleanup must not read them a second time.
        consume(&mut server.rbuf, n);
        sent.map_err(|_| End::ClientGone)?;
        self.pool.metrics.bytes_sent.add(n as u64);
        self.maybe_release(now);
        Ok(())
    }

    /// Transaction mode: hand the server connection back once nothing ties it to this client.
    fn maybe_release(&mut self, now: Instant) {
        if self.mode != PoolMode::Transaction || !self.relay.is_idle() || !self.to_server.is_empty()
        {
            return;
        }
        let Some(server) = self.server.take() else {
            return;
        };
        if !server.rbuf.is_empty() {
            self.server = Some(server);
            return;
        }
        self.cancel.detach();
        self.info.info.set_state(ConnState::Idle, now);
        self.info.info.set_link(0);
        if let Some(r) = &server.registration {
            r.info.set_state(ConnState::Idle, now);
            r.info.set_link(0);
        }
        tracing::trace!(peer = %Peer(&self.info.info), server = server.id, "released");
        self.settle_cancel();
        if server.state.broken || std::mem::take(&mut self.suspect) {
            server.discard(weir_pool::CloseReason::Broken);
        } else {
            server.release_at(now);
        }
    }

    /// Handles the complete messages in `cbuf`, checking out a server when one is needed.
    async fn handle_client(&mut self) -> Result<(), End> {
        tracing::trace!(peer = %Peer(&self.info.info), bytes = ?summarize(&self.cbuf), "from client");
        // The one clock reading for this event (read again only after waiting for a server).
        let mut now = Instant::now();
        if self.request.is_none()
            && self.relay.nothing_owed()
            && self.relay.client_ready(&self.cbuf)
        {
            let label = self.label_request();
            self.request = Some((now, label, false));
            if self.tx_start.is_none() && self.relay.status() == TxStatus::Idle {
                self.tx_start = Some(now);
            }
        }
        let queued_before = self.to_server.len();
        let received_before = self.cbuf.len();
        loop {
            let server = self.server.as_mut().map(|s| &mut s.state);
            let step = self.relay.from_client(
                &self.cbuf,
                &mut self.statements,
                server,
                &mut self.to_server,
                &mut self.to_client,
            )?;
            match step {
                ClientStep::Done(n) => {
                    consume(&mut self.cbuf, n);
                    break;
                }
                ClientStep::Terminate(n) => {
                    self.cbuf.advance(n);
                    self.flush_to_server()?;
                    return Err(End::ClientGone);
                }
                ClientStep::NeedServer(n) => {
                    self.cbuf.advance(n);
                    let got = match self.try_checkout(now) {
                        Ok(()) => Ok(()),
                        // Boxed: the waiting's state would otherwise sit in every idle
                        // client's task. In memory kept by this thread: when clients
                        // outnumber the pool, most checkouts wait.
                        Err(looked) => {
                            crate::reuse::Reused::new(self.checkout_waiting(&mut now, looked))
                                .await?
                        }
                    };
                    if let Err(failure) = got {
                        // Answer this batch with the error and carry on: the client may retry.
                        failure.0.encode(&mut self.to_client);
                        let n = self.relay.fail_batch(&self.cbuf, &mut self.to_client);
                        self.cbuf.advance(n);
                    }
                }
            }
        }
        self.pool
            .metrics
            .bytes_received
            .add(received_before.saturating_sub(self.cbuf.len()) as u64);
        if self.to_server.len() > queued_before
            && let Some(r) = &mut self.request
        {
            r.2 = true;
        }
        self.flush_to_server()?;
        self.settle_request(now);
        if !self.to_client.is_empty() && self.server.is_some() {
            let pending = std::mem::take(&mut self.to_client);
            send(&self.client, &mut self.to_client, &pending).map_err(|_| End::ClientGone)?;
        }
        // A client message can end what held the connection (CopyDone after a COPY the
        // server already aborted, say) without any reply from the server.
        self.maybe_release(now);
        Ok(())
    }

    /// What the request starting at the front of `cbuf` runs, for the slow-query log: the
    /// text of a simple query or Parse, or the name of the statement a Bind runs, copied
    /// into a reused buffer (the name's text is looked up in `settle_request`, only if the
    /// request is slow). Costs nothing when the log is off.
    fn label_request(&mut self) -> QueryLabel {
        if self.pool.hot().slow_query_threshold().is_zero() {
            return QueryLabel::Other;
        }
        let Ok(Some((h, body))) = frame::complete(&self.cbuf, u32::MAX) else {
            return QueryLabel::Other;
        };
        let text = match h.tag {
            // The text up to the terminating NUL, without a scan for it: the relay checks the
            // message when it handles it, and this copy is only ever shown.
            weir_wire::frontend::tag::QUERY => Some(body.strip_suffix(&[0]).unwrap_or(body)),
            weir_wire::frontend::tag::PARSE => weir_wire::frontend::Parse::decode(body)
                .ok()
                .map(|p| p.query),
            weir_wire::frontend::tag::BIND => {
                let Ok(b) = weir_wire::frontend::Bind::decode(body) else {
                    return QueryLabel::Other;
                };
                // Names are tracked only where Weir maps them (transaction mode), and the
                // unnamed statement never is: nothing to look up later. A name longer than
                // any text kept is not worth keeping either.
                if b.statement.is_empty()
                    || !self.relay.mapping
                    || b.statement.len() > SLOW_QUERY_TEXT * 4
                {
                    return QueryLabel::Other;
                }
                self.query_text.clear();
                self.query_text.extend_from_slice(b.statement);
                return QueryLabel::Bound;
            }
            _ => None,
        };
        match text {
            Some(t) => {
                self.query_text.clear();
                // Enough bytes for the characters kept (UTF-8 is at most 4 bytes each); kept
                // as bytes, decoded only if the request turns out slow.
                let t = &t[..t.len().min(SLOW_QUERY_TEXT * 4)];
                self.query_text.extend_from_slice(t);
                QueryLabel::Text
            }
            None => QueryLabel::Other,
        }
    }

    /// The request in flight has all its replies (by `now`): time it, and the transaction if
    /// it ended.
    fn settle_request(&mut self, now: Instant) {
        if self.request.is_none() || !self.relay.nothing_owed() || !self.to_server.is_empty() {
            return;
        }
        let (start, label, touched) = self.request.take().expect("checked");
        let ended = self.relay.status() == TxStatus::Idle;
        if !touched {
            // Answered by Weir alone (a prepared Parse, a Sync): no server work to time.
            if ended {
                self.tx_start = None;
            }
            return;
        }
        let took = now.saturating_duration_since(start);
        let m = &self.pool.metrics;
        match self.tx_start.take_if(|_| ended) {
            // A transaction of one request (autocommit) started with it: one subtraction,
            // one bucket search.
            Some(t) if t == start => m.queries.observe_with(&m.transactions, took),
            Some(t) => {
                m.queries.observe(took);
                m.transactions.observe(now.saturating_duration_since(t));
            }
            None => m.queries.observe(took),
        }
        let threshold = self.pool.hot().slow_query_threshold();
        if !threshold.is_zero() && took >= threshold {
            let text = match &label {
                QueryLabel::Text => String::from_utf8_lossy(&self.query_text).into_owned(),
                // The statement the name maps to now: the one the Bind ran, unless messages
                // pipelined after it in the same request closed it (then the name is shown)
                // or closed and parsed it again (then the new text is).
                QueryLabel::Bound => self
                    .statements
                    .get(&self.query_text)
                    .and_then(|st| weir_wire::frame::complete(&st.parse, u32::MAX).ok())
                    .flatten()
                    .and_then(|(_, body)| weir_wire::frontend::Parse::decode(body).ok())
                    .map_or_else(
                        || {
                            format!(
                                "(prepared statement \"{}\")",
                                String::from_utf8_lossy(&self.query_text)
                            )
                        },
                        |p| String::from_utf8_lossy(p.query).into_owned(),
                    ),
                QueryLabel::Other => "(extended protocol)".to_string(),
            };
            self.shared.slow.record(SlowQuery {
                at: std::time::SystemTime::now(),
                database: self.pool.database.clone(),
                user: self.info.info.user.to_string(),
                client: Peer(&self.info.info).to_string(),
                duration: took,
                query: cut(&text, SLOW_QUERY_TEXT),
            });
        }
    }

    fn flush_to_server(&mut self) -> Result<(), End> {
        if let Some(server) = &mut self.server
            && !self.to_server.is_empty()
        {
            if std::mem::take(&mut server.just_moved) {
                match server.stream.send_unready(&self.to_server) {
                    Ok(n) => consume(&mut self.to_server, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(End::ServerLost(e.to_string())),
                }
            }
            flush_pending(&server.stream, &mut self.to_server)
                .map_err(|e| End::ServerLost(e.to_string()))?;
        }
        Ok(())
    }

    /// The checkout's fast path: a connection free, nothing to wait for, time or allocate.
    /// `Err(looked)` when the session must wait, `looked` saying whether it looked in the
    /// pool and found nothing free. A plain function, so handle_client holds no checkout
    /// future of its own beside the boxed wait.
    fn try_checkout(&mut self, now: Instant) -> Result<(), bool> {
        let looked = !self.pool.is_retired() && !self.pool.is_paused();
        if looked && let Some(server) = self.pool.pool.try_get(now) {
            self.attach(server, now);
            return Ok(());
        }
        Err(looked)
    }

    /// Attaches a server connection, waiting for one while watching the client (a client that
    /// leaves stops waiting). The outer error ends the session; the inner one is for the
    /// client. `now` is the caller's clock reading, brought up to date by the wait.
    /// `looked`: `try_checkout` has just looked in this pool and found nothing free. The queue
    /// itself grants a connection released since (`Pool::ticket`), so it needs no second look.
    async fn checkout_waiting(
        &mut self,
        now: &mut Instant,
        mut looked: bool,
    ) -> Result<Result<(), CheckoutFailure>, End> {
        loop {
            if self.pool.is_retired() {
                self.follow_reload()?;
                looked = false;
            }
            match self
                .checkout_from_pool(now, std::mem::take(&mut looked))
                .await?
            {
                // The pool was retired while this client waited on it: wait on its successor.
                Err(CheckoutFailure(_)) if self.pool.is_retired() => continue,
                r => return Ok(r),
            }
        }
    }

    /// A reload replaced this session's pool: move to the pool the running config gives
    /// its database and user, or end if the database was removed.
    fn follow_reload(&mut self) -> Result<(), End> {
        use std::sync::atomic::Ordering::Relaxed;
        let config = self.shared.config.load();
        let (database, user) = (&self.info.info.database, &self.info.info.user);
        let Some(next) = self.shared.pools.get(&config, database, user) else {
            return Err(End::Closed(
                ErrorResponse::fatal(
                    SqlState::INVALID_CATALOG_NAME,
                    format!(
                        "database \"{}\" was removed from weir's configuration",
                        self.info.info.database
                    ),
                )
                .with_hint("a reload removed it; connect to a database weir still serves"),
            ));
        };
        tracing::debug!(peer = %Peer(&self.info.info), from = %self.pool.name(), to = %next.name(), "moving to the reloaded pool");
        self.pool.metrics.clients.fetch_sub(1, Relaxed);
        next.metrics.clients.fetch_add(1, Relaxed);
        self.pool = next;
        Ok(())
    }

    /// Waits in the pool's queue for a server connection while still reading what the client
    /// sends (a client that leaves stops waiting). Polled by hand with the session's own timer
    /// for the deadline. A wait costs a place in the queue and the box `handle_client` puts the
    /// waiting in, both from what this thread kept from earlier waits (`reuse`); no timer
    /// built and no second look in the idle list.
    async fn wait_in_queue(
        &mut self,
        pool: &ServerPool,
        start: Instant,
        deadline: Instant,
    ) -> Result<Result<Pooled<ServerManager>, GetError<ServerError>>, End> {
        use std::future::Future;
        use std::task::Poll;
        use weir_pool::Granted;
        enum Wait {
            Granted(Result<Granted<ServerManager>, GetError<ServerError>>),
            Client(io::Result<()>),
            Timer,
            Killed,
        }
        let mut ticket = pool.pool.ticket_reusing(start, crate::reuse::waiter());
        let granted = loop {
            let watch = self.cbuf.len() < HIGH_WATER;
            let wake_at = ticket.reserve_at().map_or(deadline, |r| r.min(deadline));
            let client = &self.client;
            let info = &self.info.info;
            let mut timer = arm_by(&mut self.timer, wake_at);
            let ev = std::future::poll_fn(|cx| {
                // A KILL first: the query this client sent before it must not run after it,
                // on a connection the KILL itself freed.
                if info.poll_signals(cx) & signal::KILL != 0 {
                    return Poll::Ready(Wait::Killed);
                }
                // The clock only matters while the reserve is still to open.
                let now = if ticket.reserve_at().is_some() {
                    Instant::now()
                } else {
                    start
                };
                // The pool first: when a connection is free, the client is not looked at.
                if let Poll::Ready(r) = ticket.poll(cx, now) {
                    return Poll::Ready(Wait::Granted(r));
                }
                if watch && let Poll::Ready(r) = client.poll_read_ready(cx) {
                    return Poll::Ready(Wait::Client(r));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wait::Timer);
                }
                Poll::Pending
            })
            .await;
            match ev {
                Wait::Granted(r) => {
                    crate::reuse::keep_waiter(ticket.recycle());
                    break r;
                }
                Wait::Killed => return Err(killed()),
                Wait::Client(r) => self.read_while_waiting(r)?,
                // The deadline; or the reserve opening to this waiter, or a timer left set
                // earlier (`arm_by`): polled again above.
                Wait::Timer if Instant::now() >= deadline => break ticket.give_up(),
                Wait::Timer => {}
            }
        };
        let permit = match granted {
            Ok(Granted::Object(server)) => return Ok(Ok(server)),
            Ok(Granted::Capacity(permit)) => permit,
            Err(e) => return Ok(Err(e)),
        };
        // Capacity without a connection: an idle one to check, or one to open (the pool is
        // growing, or the server is coming back). Boxed, as rarer and larger than the rest;
        // the client is still watched, so one that leaves stops the connect.
        let mut fill = Box::pin(pool.pool.fill(permit, deadline, true));
        loop {
            let watch = self.cbuf.len() < HIGH_WATER;
            let client = &self.client;
            let info = &self.info.info;
            let ev = std::future::poll_fn(|cx| {
                if info.poll_signals(cx) & signal::KILL != 0 {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(r) = fill.as_mut().poll(cx) {
                    return Poll::Ready(Some(Ok(r)));
                }
                if watch && let Poll::Ready(r) = client.poll_read_ready(cx) {
                    return Poll::Ready(Some(Err(r)));
                }
                Poll::Pending
            })
            .await;
            match ev {
                None => return Err(killed()),
                Some(Ok(r)) => return Ok(r),
                Some(Err(r)) => self.read_while_waiting(r)?,
            }
        }
    }

    /// The client socket became readable while the session waits for a server: reads what
    /// it sent (kept for after the wait), or ends the session if it left.
    fn read_while_waiting(&mut self, ready: io::Result<()>) -> Result<(), End> {
        ready.map_err(|_| End::ClientGone)?;
        self.cbuf.reserve(CLIENT_CHUNK);
        match self.client.try_read_buf(&mut self.cbuf) {
            Ok(0) => Err(End::ClientGone),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(End::ClientGone),
        }
    }

    async fn checkout_from_pool(
        &mut self,
        now: &mut Instant,
        looked: bool,
    ) -> Result<Result<(), CheckoutFailure>, End> {
        let pool = self.pool.clone();
        // The first look at this pool after a reload or a pause.
        let free = if looked || pool.is_paused() {
            None
        } else {
            pool.pool.try_get(*now)
        };
        let result = match free {
            Some(server) => Ok(server),
            None => {
                let timeout = pool.settings().query_wait_timeout;
                let asked = *now;
                self.info.info.set_state(ConnState::Waiting, asked);
                // Boxed, as rare and larger than the rest of the checkout.
                if pool.is_paused() && !Box::pin(pool.wait_resumed(asked + timeout)).await {
                    *now = Instant::now();
                    self.info.info.set_state(ConnState::Idle, *now);
                    let e = ErrorResponse::error(
                        SqlState::TOO_MANY_CONNECTIONS,
                        format!(
                            "pool \"{}\" is paused; waited {:.1}s for RESUME",
                            pool.name(),
                            timeout.as_secs_f64()
                        ),
                    );
                    return Ok(Err(CheckoutFailure(e)));
                }
                let r = self.wait_in_queue(&pool, asked, asked + timeout).await?;
                *now = Instant::now();
                pool.note_wait(now.saturating_duration_since(asked));
                r
            }
        };
        match result {
            Ok(server) => {
                self.attach(server, *now);
                Ok(Ok(()))
            }
            Err(e) => {
                self.info.info.set_state(ConnState::Idle, *now);
                let failure = checkout_error(&pool, e);
                pool.metrics.error(failure.0.code);
                if pool.may_warn() {
                    tracing::warn!(peer = %Peer(&self.info.info), pool = %pool.name(), error = %failure.0.message, "checkout failed");
                }
                Ok(Err(failure))
            }
        }
    }

    /// Makes `server`, just checked out at `now`, this session's server connection.
    fn attach(&mut self, mut server: Pooled<ServerManager>, now: Instant) {
        self.relay.attached();
        // Registered with another worker's runtime: move it to this one, so its replies wake
        // this thread. Should that fail (no file descriptor to spare), it still works from
        // where it is, only with a detour through the other worker.
        match server.rehome() {
            Ok(true) => {
                self.pool
                    .metrics
                    .server_moves
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(server = server.id, error = %e, "could not move a server connection to this worker")
            }
        }
        if let Some(q) = server.state.params.sync_query(&self.params) {
            self.relay.inject_query(&q, &mut self.to_server);
        }
        self.cancel.attach(&server.addr, server.key);
        let at = crate::metrics::unix_micros_at(now);
        self.info.info.set_state_at(ConnState::Active, at);
        if let Some(r) = &server.registration {
            r.info.set_state_at(ConnState::Active, at);
            r.info.set_link(self.info.info.id);
            self.info.info.set_link(r.info.id);
        }
        self.reset_phase(now);
        tracing::trace!(peer = %Peer(&self.info.info), server = server.id, "checked out");
        self.server = Some(server);
    }

    /// The client is gone: leave its server connection clean for the next client, or close it.
    async fn finish(&mut self) {
        self.cancel.detach();
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.settle_cancel();
        if server.state.broken || self.suspect {
            return;
        }
        if self.relay.copying() {
            // Half a COPY cannot be finished for nobody: stop it and close the connection.
            self.cancel_on(&server);
            tracing::debug!(peer = %Peer(&self.info.info), "client left during COPY; server connection closed");
            return;
        }
        if self.relay.unsynced() {
            if self.relay.status() == TxStatus::Idle {
                // An implicit transaction the client never synced: a Sync would commit it,
                // where PostgreSQL would roll it back when the client vanished. Close the
                // connection instead, so the server rolls it back.
                tracing::debug!(peer = %Peer(&self.info.info), "client left inside an unsynced batch; server connection closed");
                return;
            }
            // Inside an explicit transaction: end the batch, then the ROLLBACK below.
            self.relay.inject_sync(&mut self.to_server);
        }
        let owed =
            !self.relay.nothing_owed() || !self.to_server.is_empty() || !server.rbuf.is_empty();
        if owed && !self.drain(&mut server).await {
            tracing::debug!(peer = %Peer(&self.info.info), "could not drain replies for a departed client; server connection closed");
            return;
        }
        // Each its own Query: DISCARD ALL cannot run inside the implicit transaction of a
        // multi-statement query.
        if self.relay.status() != TxStatus::Idle && !run_cleanup_ok(&mut server, "ROLLBACK").await {
            return;
        }
        let reset = &self.pool.settings().reset_query;
        if self.mode == PoolMode::Session && !reset.is_empty() {
            if !run_cleanup_ok(&mut server, reset).await {
                return;
            }
            // The reset query (DISCARD ALL by default) undid Weir's SETs as well.
            server.state.params.forget_sets();
            server.state.statements.clear();
        }
        server.release();
    }
}

impl Session {
    /// Reads and drops what the server still owes a departed client. A query still running
    /// after a short grace period is cancelled. True if the connection ended up owing nothing.
    async fn drain(&mut self, server: &mut Pooled<ServerManager>) -> bool {
        let quick = tokio::time::timeout(Duration::from_millis(200), self.drain_owed(server)).await;
        match quick {
            Ok(r) => return r.is_ok(),
            Err(_) => self.cancel_on(server),
        }
        matches!(
            tokio::time::timeout(CLEANUP_TIMEOUT, self.drain_owed(server)).await,
            Ok(Ok(()))
        )
    }

    async fn drain_owed(&mut self, server: &mut Pooled<ServerManager>) -> io::Result<()> {
        let server: &mut crate::server::ServerConn = server;
        if !self.to_server.is_empty() {
            let pending = std::mem::take(&mut self.to_server);
            server.stream.write_all(&pending).await?;
        }
        loop {
            if !server.rbuf.is_empty() {
                self.scratch.clear();
                let (n, _) = self
                    .relay
                    .from_server(
                        &server.rbuf,
                        &mut server.state,
                        &mut self.params,
                        &mut self.statements,
                        &mut self.scratch,
                    )
                    .map_err(io::Error::other)?;
                server.rbuf.advance(n);
            }
            if self.relay.nothing_owed() && server.rbuf.is_empty() {
                return Ok(());
            }
            server.rbuf.reserve(READ_CHUNK);
            if server.stream.read_buf(&mut server.rbuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Asks the server to cancel whatever this connection is running, without waiting.
    fn cancel_on(&self, server: &crate::server::ServerConn) {
        let (addr, key) = (server.addr.clone(), server.key);
        let timeout = self.pool.settings().connect_timeout;
        tokio::spawn(async move {
            let _ = send_cancel(&addr, key, timeout).await;
        });
    }
}

/// Runs a cleanup query within [`CLEANUP_TIMEOUT`]; true if it succeeded and left the
/// connection idle.
async fn run_cleanup_ok(server: &mut Pooled<ServerManager>, sql: &str) -> bool {
    matches!(
        tokio::time::timeout(CLEANUP_TIMEOUT, server.run(sql)).await,
        Ok(Ok(TxStatus::Idle))
    )
}

/// Writes what the socket takes now; keeps the rest in `pending`, in order.
fn send(stream: &Stream, pending: &mut BytesMut, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if !pending.is_empty() {
        pending.extend_from_slice(data);
        return Ok(());
    }
    match stream.try_write(data) {
        Ok(n) => pending.extend_from_slice(&data[n..]),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => pending.extend_from_slice(data),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Drops the first `n` bytes of `buf`. When that is all of them (the usual case: a whole
/// message handled, a whole write taken) the buffer is emptied in place, its view left where
/// it is (the start of the allocation, unless an earlier partial consume moved it): `advance`
/// would move the view to the end, and the next append would have `reserve` move it back.
#[inline]
fn consume(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

fn flush_pending(stream: &Stream, pending: &mut BytesMut) -> io::Result<()> {
    while !pending.is_empty() {
        match stream.try_write(pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => consume(pending, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Message tags in a buffer, for trace logs.
fn summarize(buf: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = buf;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        out.push(rest[0] as char);
        if rest.len() < len + 1 {
            out.push('…');
            break;
        }
        rest = &rest[len + 1..];
    }
    out
}

#[cfg(test)]
mod size_tests {
    /// Every logged-in client's task holds the `live` future for its whole life, idle or
    /// not, so its size is most of what an idle client costs (issue 8's target: 2 KB per idle
    /// client). Rarely used states (login, cleanup, fatal errors, the wait for a connection)
    /// are boxed or run in the accepting task; this fails if one creeps back in.
    #[test]
    fn an_idle_clients_task_stays_small() {
        fn future_size<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        // With Tokio's task header and trailer, a future up to 864 bytes makes a task of at
        // most 1,024 bytes, aligned to 128. mimalloc serves that from its 1,024-byte class,
        // a power of two whose blocks are naturally aligned; a smaller task of another size
        // (896, say) gains nothing, as mimalloc over-allocates by the alignment for a class
        // whose blocks are not (measured: the future at 736 bytes, 10,000 idle clients still
        // read 1,599 bytes each). One byte over 864 makes a 1,152-byte task, served from the
        // 1,280-byte class. The bound that matters is the release build's, which
        // scripts/test.sh checks with `--release`. The test profile lays the future out
        // differently, so there the limit has a margin.
        let limit = if cfg!(debug_assertions) { 872 } else { 864 };
        let size = future_size(super::live);
        assert!(size <= limit, "the live future is {size} bytes");
        let session = std::mem::size_of::<super::Session>();
        assert!(session <= 768, "Session is {session} bytes");
    }
}

#[cfg(test)]
mod timer_tests {
    use super::{arm, arm_by};
    use std::time::{Duration, Instant};

    #[tokio::test(start_paused = true)]
    async fn a_wait_leaves_an_earlier_timer_and_moves_a_later_or_fired_one() {
        let mut timer = None;
        let t0 = Instant::now();
        let at = |s: u64| tokio::time::Instant::from_std(t0 + Duration::from_secs(s));
        arm(&mut timer, t0 + Duration::from_secs(10));
        arm_by(&mut timer, t0 + Duration::from_secs(20));
        assert_eq!(
            timer.as_ref().unwrap().deadline(),
            at(10),
            "an earlier timer is left"
        );
        arm_by(&mut timer, t0 + Duration::from_secs(5));
        assert_eq!(
            timer.as_ref().unwrap().deadline(),
            at(5),
            "a later one is moved"
        );
        // Fired: it cannot wake the waiter again, so it is set anew.
        timer.as_mut().unwrap().as_mut().await;
        arm_by(&mut timer, t0 + Duration::from_secs(30));
        assert_eq!(timer.as_ref().unwrap().deadline(), at(30));
        assert!(!timer.as_ref().unwrap().is_elapsed());
    }
}
