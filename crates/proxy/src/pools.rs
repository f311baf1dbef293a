//! The pools, one per (database, server user): how their server connections are made,
//! checked, retired and kept topped up, and the per-database connection cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rand::RngExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weir_config::{Config, PoolSettings, ServerLogin};
use weir_pool::{CloseReason, Manager, Meta, Pool, Verdict};
use weir_wire::backend::TxStatus;

use crate::metrics::{ConnInfo, PoolMetrics, Registry};
use crate::params::ParamSet;
use crate::server::{ServerConn, ServerError};

/// Since when a pool's server has been failing to accept connections, and why.
#[derive(Debug, Clone)]
pub struct Unreachable {
    pub since: SystemTime,
    pub since_instant: Instant,
    pub last_error: String,
}

/// Opens, checks and retires server connections for one pool, and remembers what the
/// server reported on the first one: the defaults clients are told at login.
#[derive(Debug)]
pub struct ServerManager {
    pub login: ServerLogin,
    /// For a user found by auth_query: the secret its server logins use, refreshed by each
    /// login of a client of it.
    pub fetched: Mutex<Option<crate::server::Fetched>>,
    tls: Arc<ArcSwap<crate::tls::TlsSetup>>,
    /// Swapped whole on reload and live resize (through [`ServerManager::set_settings`]);
    /// read without a lock.
    settings: ArcSwap<PoolSettings>,
    /// The few settings read on every transaction, copied out of `settings`.
    hot: HotSettings,
    name: String,
    next_id: Arc<AtomicU64>,
    defaults: Mutex<Option<Arc<ParamSet>>>,
    /// Connects in flight at once.
    connecting: Semaphore,
    db: Arc<DatabaseState>,
    unreachable: Mutex<Option<Unreachable>>,
    /// A login the server refused for good (wrong password, unknown database), remembered
    /// briefly so a crowd of clients does not become a crowd of failing logins.
    refused: Mutex<Option<(Instant, ServerError)>>,
    /// Open server connections, for SHOW SERVERS.
    pub servers: Arc<Registry>,
    /// Connections opened before this generation are closed when released (RECONNECT,
    /// PAUSE).
    pub generation: AtomicU64,
    /// While paused, released connections are closed (PAUSE drains the pool).
    pub paused: AtomicBool,
    /// Replaced by a reload (its login or shape changed, or its database was removed): every
    /// connection closes when released, and sessions move to the new pool at their next
    /// checkout.
    pub retired: AtomicBool,
}

/// How long a login the server refused for good is answered from memory.
const REFUSED_MEMORY: Duration = Duration::from_secs(5);

/// The settings the hot path reads on every transaction, as plain atomics (durations in
/// nanoseconds): an `ArcSwap` load walks a thread-local debt list and costs about as much
/// as the rest of a checkout. Written only by [`ServerManager::set_settings`], together with
/// the full settings; a reader may see one new value beside an old one for an instant,
/// which for timeouts and thresholds is harmless.
#[derive(Debug, Default)]
pub struct HotSettings {
    query_timeout: AtomicU64,
    idle_transaction_timeout: AtomicU64,
    client_idle_timeout: AtomicU64,
    slow_query_threshold: AtomicU64,
    /// How long a connection may sit idle before its check query runs; `u64::MAX` when
    /// there is no check query.
    server_check_delay: AtomicU64,
    server_max_uses: AtomicU64,
}

/// The session timeouts of [`HotSettings`], read together.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub query: Duration,
    pub idle_transaction: Duration,
    pub client_idle: Duration,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl HotSettings {
    fn store(&self, s: &PoolSettings) {
        let r = Ordering::Relaxed;
        self.query_timeout.store(nanos(s.query_timeout), r);
        self.idle_transaction_timeout
            .store(nanos(s.idle_transaction_timeout), r);
        self.client_idle_timeout
            .store(nanos(s.client_idle_timeout), r);
        self.slow_query_threshold
            .store(nanos(s.slow_query_threshold), r);
        let check = if s.server_check_query.is_empty() {
            u64::MAX
        } else {
            nanos(s.server_check_delay)
        };
        self.server_check_delay.store(check, r);
        self.server_max_uses.store(s.server_max_uses, r);
    }

    fn get(v: &AtomicU64) -> Duration {
        Duration::from_nanos(v.load(Ordering::Relaxed))
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            query: Self::get(&self.query_timeout),
            idle_transaction: Self::get(&self.idle_transaction_timeout),
            client_idle: Self::get(&self.client_idle_timeout),
        }
    }

    pub fn client_idle_timeout(&self) -> Duration {
        Self::get(&self.client_idle_timeout)
    }

    /// Zero: the slow-query log is off.
    pub fn slow_query_threshold(&self) -> Duration {
        Self::get(&self.slow_query_threshold)
    }
}

impl ServerManager {
    /// Installs new settings (reload, live resize).
    fn set_settings(&self, s: PoolSettings) {
        self.hot.store(&s);
        self.settings.store(Arc::new(s));
    }

    /// Since when connects have been failing, if they are.
    pub fn unreachable(&self) -> Option<Unreachable> {
        self.unreachable.lock().unwrap().clone()
    }

    fn mark_unreachable(&self, e: &ServerError) {
        let mut u = self.unreachable.lock().unwrap();
        match &mut *u {
            Some(u) => u.last_error = e.to_string(),
            None => {
                tracing::warn!(pool = %self.name, error = %e, "server unreachable; clients wait while Weir retries");
                *u = Some(Unreachable {
                    since: SystemTime::now(),
                    since_instant: Instant::now(),
                    last_error: e.to_string(),
                });
            }
        }
    }

    fn mark_reachable(&self) {
        if let Some(u) = self.unreachable.lock().unwrap().take() {
            tracing::info!(pool = %self.name, down_for = ?u.since_instant.elapsed(), "server reachable again");
        }
    }

    /// Exponential backoff with full jitter: uniform in [0, min(max, initial * multiplier^(n-1))].
    /// Computed in floating point and capped before it becomes a Duration, so no setting
    /// can overflow it.
    fn backoff(&self, attempt: u32) -> Duration {
        let s = self.settings.load();
        let exp = s
            .connect_retry_multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let cap =
            (s.connect_retry_initial.as_secs_f64() * exp).min(s.connect_retry_max.as_secs_f64());
        Duration::from_secs_f64(cap.max(0.0) * rand::rng().random_range(0.0..=1.0))
    }
}

impl Manager for ServerManager {
    type Object = ServerConn;
    type Error = ServerError;

    async fn create(&self) -> Result<ServerConn, ServerError> {
        if let Some((at, e)) = &*self.refused.lock().unwrap()
            && at.elapsed() < REFUSED_MEMORY
        {
            return Err(e.repeat());
        }
        let _slot = self.connecting.acquire().await.expect("never closed");
        let db_permit = self.db.acquire(&self.name).await;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let s = self.settings.load();
        let fetched = self.fetched.lock().unwrap().clone();
        match ServerConn::connect(
            &self.login,
            fetched.as_ref(),
            &self.tls.load(),
            s.connect_timeout,
            s.prepared_statements_cache as usize,
            id,
        )
        .await
        {
            Ok(mut conn) => {
                self.mark_reachable();
                *self.refused.lock().unwrap() = None;
                conn.db_permit = db_permit;
                conn.state
                    .statements
                    .share_plan_changes(self.db.plan_changes.clone());
                conn.generation = self.generation.load(Ordering::Acquire);
                let (database, user) = self.name.split_once('/').unwrap_or((&self.name, ""));
                conn.registration = Some(self.servers.register(ConnInfo::new(
                    id,
                    user.into(),
                    database.into(),
                    conn.stream.peer_addr(),
                    conn.stream.local_addr(),
                    "",
                    conn.key.pid,
                )));
                if !s.server_lifetime.is_zero() {
                    let lifetime = s
                        .server_lifetime
                        .mul_f64(1.0 - rand::rng().random_range(0.0..0.25));
                    conn.expires = Instant::now().checked_add(lifetime);
                }
                tracing::info!(pool = %self.name, server = %conn.addr, id, pid = conn.key.pid, "server connection opened");
                let mut d = self.defaults.lock().unwrap();
                if d.is_none() {
                    *d = Some(Arc::new(conn.state.params.reported.clone()));
                }
                Ok(conn)
            }
            Err(e) => {
                if e.is_transient() {
                    self.mark_unreachable(&e);
                } else {
                    tracing::error!(pool = %self.name, error = %e, "server refused the login; not retrying for {REFUSED_MEMORY:?}");
                    *self.refused.lock().unwrap() = Some((Instant::now(), e.repeat()));
                }
                Err(e)
            }
        }
    }

    fn retry_after(&self, e: &ServerError, attempt: u32) -> Option<Duration> {
        e.is_transient().then(|| self.backoff(attempt))
    }

    fn quick_check(
        &self,
        conn: &mut ServerConn,
        meta: &Meta,
        now: Instant,
    ) -> Option<Result<(), CloseReason>> {
        if !conn.is_alive() {
            return Some(Err(CloseReason::Dead));
        }
        if conn.expired(now) {
            return Some(Err(CloseReason::Lifetime));
        }
        let delay = self.hot.server_check_delay.load(Ordering::Relaxed);
        let due =
            delay != u64::MAX && nanos(now.saturating_duration_since(meta.last_used)) >= delay;
        // A check query to run means waiting: the full recycle does it.
        (!due).then_some(Ok(()))
    }

    async fn recycle(&self, conn: &mut ServerConn, meta: &Meta) -> Result<(), CloseReason> {
        if let Some(verdict) = self.quick_check(conn, meta, Instant::now()) {
            return verdict;
        }
        let s = self.settings.load();
        let checked =
            tokio::time::timeout(s.connect_timeout, conn.run(&s.server_check_query)).await;
        if !matches!(checked, Ok(Ok(TxStatus::Idle))) {
            return Err(CloseReason::CheckFailed);
        }
        Ok(())
    }

    fn on_release(&self, conn: &mut ServerConn, meta: &Meta) -> Result<(), CloseReason> {
        let max_uses = self.hot.server_max_uses.load(Ordering::Relaxed);
        if conn.state.broken {
            Err(CloseReason::Broken)
        } else if max_uses > 0 && meta.uses >= max_uses {
            Err(CloseReason::MaxUses)
        } else if conn.expired(meta.last_used) {
            Err(CloseReason::Lifetime)
        } else if self.paused.load(Ordering::Acquire)
            || self.retired.load(Ordering::Acquire)
            || conn.generation < self.generation.load(Ordering::Acquire)
        {
            Err(CloseReason::Drained)
        } else if self.db.others_blocked(&self.name) {
            // Another pool of this database waits on its cap: make room for it.
            Err(CloseReason::Evicted)
        } else {
            Ok(())
        }
    }

    fn home(&self, conn: &ServerConn) -> usize {
        conn.home
    }

    fn here(&self) -> usize {
        crate::workers::current()
    }

    fn closed(&self, conn: ServerConn, reason: CloseReason) {
        // Routine retirements are info; a connection that died or failed is a warning.
        let level_info = !matches!(
            reason,
            CloseReason::Dead | CloseReason::CheckFailed | CloseReason::Broken
        );
        if level_info {
            tracing::info!(pool = %self.name, id = conn.id, pid = conn.key.pid, %reason, "server connection closed");
        } else {
            tracing::warn!(pool = %self.name, id = conn.id, pid = conn.key.pid, %reason, "server connection closed");
        }
    }
}

/// What all pools of one database share: its connection cap.
#[derive(Debug)]
pub struct DatabaseState {
    max: u32,
    limit: Option<Arc<Semaphore>>,
    pools: Mutex<Vec<Weak<ServerPool>>>,
    /// Creates waiting on the cap, by pool: while another pool waits, connections released
    /// here are closed rather than reused, so one busy pool cannot starve the others.
    blocked: Mutex<HashMap<String, usize>>,
    /// The sum of `blocked`, so a release (every transaction) looks at the map only when
    /// some create is waiting.
    any_blocked: AtomicUsize,
    /// How many times a server connection to this database found prepared statements'
    /// plans out of date (a schema change): every connection of every pool of the database
    /// prepares its statements again (see [`crate::prepared::ServerStatements`]).
    plan_changes: Arc<AtomicU64>,
}

impl DatabaseState {
    fn new(max: u32) -> DatabaseState {
        DatabaseState {
            max,
            limit: (max > 0).then(|| Arc::new(Semaphore::new(max as usize))),
            pools: Mutex::new(Vec::new()),
            blocked: Mutex::new(HashMap::new()),
            any_blocked: AtomicUsize::new(0),
            plan_changes: Arc::default(),
        }
    }

    /// A permit under the database's cap (none if uncapped). At the cap, an idle connection of
    /// another pool of this database (above that pool's `min_size`) is closed to make room;
    /// with none, waits for one (the caller's deadline bounds the wait).
    async fn acquire(&self, requester: &str) -> Option<OwnedSemaphorePermit> {
        let limit = self.limit.as_ref()?;
        if let Ok(p) = limit.clone().try_acquire_owned() {
            return Some(p);
        }
        self.evict_one(requester);
        // One acquire for the whole wait: the semaphore is first come, first served across
        // the database's pools, and a waiter must not lose its place.
        let acquire = limit.clone().acquire_owned();
        tokio::pin!(acquire);
        let _blocked = Blocked::enter(self, requester);
        loop {
            tokio::select! {
                p = &mut acquire => return p.ok(),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    self.evict_one(requester);
                }
            }
        }
    }

    /// Whether a pool other than `me` is waiting on the cap. Asked at every release: the
    /// usual answer, from one load, is inline.
    #[inline]
    fn others_blocked(&self, me: &str) -> bool {
        self.any_blocked.load(Ordering::Acquire) != 0 && self.others_blocked_now(me)
    }

    #[inline(never)]
    fn others_blocked_now(&self, me: &str) -> bool {
        self.blocked
            .lock()
            .unwrap()
            .iter()
            .any(|(pool, n)| pool != me && *n > 0)
    }

    /// Whether every connection the cap allows exists.
    fn at_cap(&self) -> bool {
        self.limit
            .as_ref()
            .is_some_and(|l| l.available_permits() == 0)
    }

    /// Closes one idle connection of a pool other than `requester` (which would rather reuse
    /// its own), never below that pool's `min_size`.
    fn evict_one(&self, requester: &str) -> bool {
        let pools: Vec<_> = self
            .pools
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for p in pools.iter().filter(|p| p.pool.manager().name != requester) {
            let mut taken = false;
            let n = p.pool.reap(p.settings().min_size as usize, |_, _| {
                if taken {
                    Verdict::Keep
                } else {
                    taken = true;
                    Verdict::CloseAboveMin(CloseReason::Evicted)
                }
            });
            if n > 0 {
                return true;
            }
        }
        false
    }
}

/// Counts a create as waiting on the database's cap for as long as it waits.
struct Blocked<'a> {
    db: &'a DatabaseState,
    pool: &'a str,
}

impl<'a> Blocked<'a> {
    fn enter(db: &'a DatabaseState, pool: &'a str) -> Self {
        *db.blocked
            .lock()
            .unwrap()
            .entry(pool.to_string())
            .or_default() += 1;
        db.any_blocked.fetch_add(1, Ordering::AcqRel);
        Blocked { db, pool }
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.db.blocked.lock().unwrap().get_mut(self.pool) {
            *n -= 1;
        }
        self.db.any_blocked.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Utilisation levels, for warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Normal,
    Warning,
    Critical,
}

/// One pool: the database and server user it serves, its connections, its alert state.
#[derive(Debug)]
pub struct ServerPool {
    pub database: String,
    pub user: String,
    pub pool: Pool<ServerManager>,
    alert: Mutex<(Level, Option<Instant>)>,
    topping_up: AtomicBool,
    last_wait_warning: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
    pub metrics: PoolMetrics,
    /// Woken on RESUME (clients wait while the pool is paused).
    resumed: tokio::sync::Notify,
    probe: Mutex<Option<Probe>>,
    probing: AtomicBool,
    /// What the last login settled, reused by the next client sending the same startup
    /// parameters.
    pub logins: crate::params::LoginCache,
}

/// The last readiness probe of a pool: a `SELECT 1` round trip on one of its connections.
#[derive(Debug, Clone)]
pub struct Probe {
    pub at: Instant,
    pub result: Result<Duration, String>,
}

/// How often a level that persists is logged again.
const ALERT_REPEAT: Duration = Duration::from_secs(30);

impl ServerPool {
    /// The settings in force (a cheap, lock-free snapshot; a reload swaps them whole).
    pub fn settings(&self) -> arc_swap::Guard<Arc<PoolSettings>> {
        self.pool.manager().settings.load()
    }

    /// The settings read on every transaction, without the `ArcSwap` load.
    pub fn hot(&self) -> &HotSettings {
        &self.pool.manager().hot
    }

    /// Applies new settings that keep the pool's shape: timeouts and the like take effect at
    /// their next use, a new size at once (growing frees waiters; shrinking closes idle
    /// connections first and in-use ones as they are released, never inside a transaction).
    pub fn apply(&self, new: PoolSettings) {
        let size = new.size as usize;
        self.pool.manager().set_settings(new);
        if size != self.pool.max_size() {
            self.pool.resize(size);
        }
    }

    /// Live resize until the next reload.
    pub fn set_size(&self, size: u32) {
        let mut s = PoolSettings::clone(&self.settings());
        s.size = size;
        s.min_size = s.min_size.min(size);
        self.apply(s);
    }

    /// Whether a reload replaced this pool.
    pub fn is_retired(&self) -> bool {
        self.pool.manager().retired.load(Ordering::Acquire)
    }

    /// Replaced by a reload: idle connections close now, in-use ones when released.
    fn retire(&self) {
        self.pool.manager().retired.store(true, Ordering::Release);
        // Closing fails its waiters (their sessions move to the new pool) and closes idle
        // connections; connections in use close when released.
        self.pool.close();
        // Clients paused on it must not wait for a RESUME that will never come.
        self.resumed.notify_waiters();
    }

    /// Whether settings differ in a way that needs a new pool rather than an update in place.
    fn needs_new_pool(old: &PoolSettings, new: &PoolSettings) -> bool {
        old.mode != new.mode
            || old.reserve_size != new.reserve_size
            || old.reserve_timeout != new.reserve_timeout
            || old.connect_concurrency != new.connect_concurrency
            || old.max_db_connections != new.max_db_connections
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.database, self.user)
    }

    /// The parameters the server reports at login. Opens a connection if none was ever
    /// opened (one attempt), which also proves the server can be reached.
    pub async fn defaults(&self) -> Result<Arc<ParamSet>, weir_pool::GetError<ServerError>> {
        if let Some(d) = self.pool.manager().defaults.lock().unwrap().clone() {
            return Ok(d);
        }
        // A server never reached yet is most likely misconfigured: one attempt, so the client
        // hears why within connect_timeout instead of waiting out query_wait_timeout.
        let conn = self
            .pool
            .get_once(self.settings().query_wait_timeout)
            .await?;
        conn.release();
        Ok(self
            .pool
            .manager()
            .defaults
            .lock()
            .unwrap()
            .clone()
            .expect("set by the first connection"))
    }

    pub fn is_paused(&self) -> bool {
        self.pool.manager().paused.load(Ordering::Acquire)
    }

    /// PAUSE: new checkouts wait, idle connections close, connections in use close when
    /// released. Returns when none is left (or `limit` passed).
    pub async fn pause(&self, limit: Duration) -> bool {
        self.pool.manager().paused.store(true, Ordering::Release);
        let deadline = Instant::now() + limit;
        loop {
            self.pool
                .reap(0, |_, _| Verdict::Close(CloseReason::Drained));
            if self.pool.snapshot().size == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// RESUME: waiting clients proceed.
    pub fn resume(&self) {
        self.pool.manager().paused.store(false, Ordering::Release);
        self.resumed.notify_waiters();
    }

    /// Waits while the pool is paused, up to `until`; false if still paused then.
    pub async fn wait_resumed(&self, until: Instant) -> bool {
        loop {
            let woken = self.resumed.notified();
            // A retired pool's clients move to its successor rather than wait here.
            if !self.is_paused() || self.is_retired() {
                return true;
            }
            if tokio::time::timeout_at(until.into(), woken).await.is_err() {
                return !self.is_paused();
            }
        }
    }

    /// RECONNECT: every connection is closed once it is not in use, new ones replace them.
    pub fn reconnect(&self) {
        self.pool
            .manager()
            .generation
            .fetch_add(1, Ordering::AcqRel);
        self.pool
            .reap(0, |_, _| Verdict::Close(CloseReason::Drained));
    }

    /// KILL: every server connection closes (the console ends the database's client
    /// sessions through the client registry).
    pub fn kill(&self) {
        self.reconnect();
    }

    /// The last readiness probe, if any.
    pub fn probe(&self) -> Option<Probe> {
        self.probe.lock().unwrap().clone()
    }

    /// Starts a readiness probe in the background unless one is running. A pool whose
    /// connections are all busy with clients waiting is working: it is not probed.
    pub fn start_probe(self: &Arc<Self>) {
        let snap = self.pool.snapshot();
        if self.is_paused() {
            return;
        }
        if snap.idle == 0 && snap.active >= snap.max_size {
            // Every connection is serving clients: the server is evidently reachable, unless
            // connects have been failing meanwhile. Keep the last measured latency.
            if self.pool.manager().unreachable().is_none() {
                let last = self.probe().and_then(|p| p.result.ok()).unwrap_or_default();
                *self.probe.lock().unwrap() = Some(Probe {
                    at: Instant::now(),
                    result: Ok(last),
                });
            }
            return;
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let limit = me.settings().connect_timeout.min(Duration::from_secs(2));
            let t = Instant::now();
            let result = match me.pool.get_once(limit).await {
                Ok(mut conn) => {
                    let started = Instant::now();
                    match tokio::time::timeout(limit, conn.run("SELECT 1")).await {
                        Ok(Ok(_)) => {
                            let rtt = started.elapsed();
                            conn.release();
                            Ok(rtt)
                        }
                        Ok(Err(e)) => Err(format!("probe query failed: {e}")),
                        Err(_) => Err(format!("probe query took over {limit:?}")),
                    }
                }
                Err(weir_pool::GetError::Create(e)) => Err(e.to_string()),
                Err(weir_pool::GetError::Timeout {
                    last_error: Some(e),
                    ..
                }) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            *me.probe.lock().unwrap() = Some(Probe { at: t, result });
            me.probing.store(false, Ordering::Release);
        });
    }

    /// Percent of the pool's size in use.
    pub fn utilisation(&self) -> u32 {
        let s = self.pool.snapshot();
        (s.active * 100).checked_div(s.max_size.max(1)).unwrap_or(0) as u32
    }

    /// Whether a per-pool warning may be logged now (at most once a second).
    pub fn may_warn(&self) -> bool {
        let mut last = self.last_warning.lock().unwrap();
        let ok = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if ok {
            *last = Some(Instant::now());
        }
        ok
    }

    /// Logs a client's long wait, at most once a second per pool.
    pub fn note_wait(&self, waited: Duration) {
        if waited < Duration::from_secs(1) {
            return;
        }
        let mut last = self.last_wait_warning.lock().unwrap();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            let s = self.pool.snapshot();
            tracing::warn!(pool = %self.name(), waited = ?waited, size = s.max_size, waiting = s.waiting, "long wait for a server connection");
        }
    }

    /// One maintenance round: close dead, expired and long-idle connections (keeping
    /// `min_size`), and log utilisation crossing its thresholds.
    pub fn reap(&self) {
        let s = self.settings();
        let now = Instant::now();
        self.pool.reap(s.min_size as usize, |conn, meta| {
            if !conn.is_alive() {
                Verdict::Close(CloseReason::Dead)
            } else if conn.expired(now) {
                Verdict::Close(CloseReason::Lifetime)
            } else if !s.server_idle_timeout.is_zero()
                && now.saturating_duration_since(meta.last_used) >= s.server_idle_timeout
            {
                Verdict::CloseAboveMin(CloseReason::IdleTimeout)
            } else {
                Verdict::Keep
            }
        });
        self.check_utilisation(&s);
    }

    fn check_utilisation(&self, s: &PoolSettings) {
        let pct = self.utilisation();
        let mut alert = self.alert.lock().unwrap();
        let (prev, last) = *alert;
        // Hysteresis: a level is left downwards only 10 points below its threshold, so a pool
        // hovering at a threshold does not flap.
        let (warn, crit) = (s.utilisation_warning, s.utilisation_critical);
        let below = |t: u32| pct + 10 <= t;
        let level = if pct >= crit || (prev == Level::Critical && !below(crit)) {
            Level::Critical
        } else if pct >= warn || (prev >= Level::Warning && !below(warn)) {
            Level::Warning
        } else {
            Level::Normal
        };
        let due = last.is_none_or(|t| t.elapsed() >= ALERT_REPEAT);
        let escalated = level > prev;
        // Log an escalation at once; anything else (a change down, or the same raised level
        // persisting) at most every ALERT_REPEAT.
        let log = escalated || (due && (level != prev || level != Level::Normal));
        if !log {
            return;
        }
        let snap = self.pool.snapshot();
        match level {
            Level::Critical => {
                tracing::error!(pool = %self.name(), utilisation = pct, active = snap.active, size = snap.max_size, waiting = snap.waiting, "pool utilisation critical")
            }
            Level::Warning => {
                tracing::warn!(pool = %self.name(), utilisation = pct, active = snap.active, size = snap.max_size, waiting = snap.waiting, "pool utilisation high")
            }
            Level::Normal => {
                tracing::info!(pool = %self.name(), utilisation = pct, "pool utilisation back to normal")
            }
        }
        *alert = (level, Some(Instant::now()));
    }

    /// Opens connections up to `min_size` in the background (one round at a time).
    pub fn top_up(self: &Arc<Self>) {
        let min = self.settings().min_size as usize;
        // At the database's cap, top-up would have to wait or evict: clients come first.
        if min == 0 || self.pool.snapshot().size >= min || self.pool.manager().db.at_cap() {
            return;
        }
        if self.topping_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let limit = self.settings().connect_timeout * 2;
        tokio::spawn(async move {
            match tokio::time::timeout(limit, me.pool.top_up(min)).await {
                Ok(Err(e)) => {
                    tracing::debug!(pool = %me.name(), error = %e, "could not open min_size connections yet")
                }
                Err(_) => {
                    tracing::debug!(pool = %me.name(), "opening min_size connections timed out")
                }
                Ok(Ok(_)) => {}
            }
            me.topping_up.store(false, Ordering::Release);
        });
    }
}

/// Every pool, created on first use (or at start, for databases with a fixed server user).
#[derive(Debug, Default)]
pub struct Pools {
    /// TLS toward servers (and clients), swapped whole on reload.
    pub tls: Arc<ArcSwap<crate::tls::TlsSetup>>,
    map: Mutex<HashMap<(String, String), Arc<ServerPool>>>,
    databases: Mutex<HashMap<String, Arc<DatabaseState>>>,
    next_id: Arc<AtomicU64>,
}

impl Pools {
    /// The pool `user` gets for `database`, or `None` if the database is not configured.
    /// Pools are keyed by the server user, so all clients of a database with a fixed user
    /// share one pool.
    pub fn get(&self, config: &Config, database: &str, user: &str) -> Option<Arc<ServerPool>> {
        let login = config.server_login(database, user)?;
        let key = (database.to_string(), login.user.clone());
        let mut map = self.map.lock().unwrap();
        if let Some(p) = map.get(&key) {
            return Some(p.clone());
        }
        let settings = config.pool_settings(database, &login.user);
        let db = self
            .databases
            .lock()
            .unwrap()
            .entry(database.to_string())
            .or_insert_with(|| Arc::new(DatabaseState::new(settings.max_db_connections)))
            .clone();
        let name = format!("{database}/{}", login.user);
        let pool = Pool::with_reserve(
            ServerManager {
                connecting: Semaphore::new(settings.connect_concurrency.max(1) as usize),
                login,
                name,
                next_id: self.next_id.clone(),
                defaults: Mutex::new(None),
                db: db.clone(),
                unreachable: Mutex::new(None),
                refused: Mutex::new(None),
                servers: Arc::new(Registry::default()),
                generation: AtomicU64::new(0),
                paused: AtomicBool::new(false),
                retired: AtomicBool::new(false),
                hot: {
                    let hot = HotSettings::default();
                    hot.store(&settings);
                    hot
                },
                settings: ArcSwap::from_pointee(settings.clone()),
                tls: self.tls.clone(),
                fetched: Mutex::new(None),
            },
            settings.size as usize,
            settings.reserve_size as usize,
            settings.reserve_timeout,
        );
        let pool = Arc::new(ServerPool {
            database: database.into(),
            user: key.1.clone(),
            pool,
            alert: Mutex::new((Level::Normal, None)),
            topping_up: AtomicBool::new(false),
            last_wait_warning: Mutex::new(None),
            last_warning: Mutex::new(None),
            metrics: PoolMetrics::default(),
            resumed: tokio::sync::Notify::new(),
            probe: Mutex::new(None),
            probing: AtomicBool::new(false),
            logins: Default::default(),
        });
        db.pools.lock().unwrap().push(Arc::downgrade(&pool));
        map.insert(key, pool.clone());
        Some(pool)
    }

    /// Brings every pool in line with a new config: pools whose login and shape are unchanged
    /// take the new settings in place; the others are retired (they drain, and their
    /// clients move to a fresh pool at their next checkout, or are told the database is gone).
    /// Returns one line per change.
    pub fn reconfigure(&self, config: &Config) -> Vec<String> {
        let mut changes = Vec::new();
        let mut retired = Vec::new();
        {
            let mut map = self.map.lock().unwrap();
            map.retain(|(database, user), pool| {
                let name = pool.name();
                let Some(login) = config.server_login(database, user).filter(|l| &l.user == user)
                else {
                    changes.push(format!("pool {name}: removed; its connections drain"));
                    retired.push(pool.clone());
                    return false;
                };
                let new = config.pool_settings(database, user);
                let old = pool.settings();
                if login != pool.pool.manager().login {
                    changes.push(format!(
                        "pool {name}: server login changed; old connections drain after their current transaction"
                    ));
                } else if ServerPool::needs_new_pool(&old, &new) {
                    changes.push(format!(
                        "pool {name}: mode, reserve, connect_concurrency or max_db_connections changed; the pool is rebuilt"
                    ));
                } else {
                    if **old != new {
                        if old.size != new.size {
                            changes.push(format!("pool {name}: size {} -> {}", old.size, new.size));
                        } else {
                            changes.push(format!("pool {name}: settings updated"));
                        }
                        drop(old);
                        pool.apply(new);
                    }
                    return true;
                }
                retired.push(pool.clone());
                false
            });
        }
        {
            // A database whose cap changed gets a new cap for its new pools.
            let mut dbs = self.databases.lock().unwrap();
            dbs.retain(|name, state| {
                config.databases.contains_key(name)
                    && state.max == config.pool_settings(name, "").max_db_connections
            });
        }
        for p in retired {
            p.retire();
        }
        self.create_fixed(config);
        changes
    }

    /// Creates the pools that can exist before any client: databases with a fixed user.
    pub fn create_fixed(&self, config: &Config) {
        for (name, db) in &config.databases {
            if let Some(user) = &db.user {
                self.get(config, name, user);
            }
        }
    }

    pub fn all(&self) -> Vec<Arc<ServerPool>> {
        self.map.lock().unwrap().values().cloned().collect()
    }

    /// One maintenance round over every pool.
    pub fn maintain(&self) {
        for p in self.all() {
            p.reap();
            if !p.is_paused() {
                p.top_up();
            }
        }
    }

    /// Probes every pool's server (see [`ServerPool::start_probe`]).
    pub fn probe_all(&self) {
        for p in self.all() {
            p.start_probe();
        }
    }

    /// The pools of one database (all of them with `None`).
    pub fn of_database(&self, database: Option<&str>) -> Vec<Arc<ServerPool>> {
        self.all()
            .into_iter()
            .filter(|p| database.is_none_or(|d| p.database == d))
            .collect()
    }

    /// Closes every pool: waiters fail, idle connections close.
    pub fn close_all(&self) {
        for p in self.all() {
            p.pool.close();
        }
    }
}
