//! What Weir measures, named once here; the admin crate and the console read it at scrape
//! time. Hot-path updates are atomic adds; those made on every transaction go to the calling
//! thread's shard (`weir_pool::Counter`, `weir_pool::Histogram`). The locks here are taken
//! only at connect, disconnect, on errors and on slow statements.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Waker};
use std::time::{Duration, Instant, SystemTime};

use weir_pool::{Counter, Histogram};
use weir_wire::SqlState;

/// Per-pool measurements beyond the pool's own counters (see `weir_pool::Stats`).
#[derive(Debug, Default)]
pub struct PoolMetrics {
    /// Transactions: from the start of a request outside a transaction to ReadyForQuery idle.
    pub transactions: Histogram,
    /// Requests: from a client's message to the last reply it is owed.
    pub queries: Histogram,
    /// Bytes from clients to the server, and from the server to clients.
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    /// Server connections a checkout moved to its own worker thread (see `crate::workers`).
    pub server_moves: AtomicU64,
    /// Sessions that moved to another worker thread between transactions (see
    /// `crate::limits::ClientCounts::settle`).
    pub client_moves: AtomicU64,
    /// Gauge: clients logged in to this pool.
    pub clients: AtomicUsize,
    /// ErrorResponses clients got, by SQLSTATE (the server's and Weir's own).
    errors: Mutex<BTreeMap<String, u64>>,
}

/// Distinct SQLSTATEs counted per pool; later new ones count as `other` (but for Weir's own,
/// `OWN_CODES`). A client can raise any of some 60 million codes (`RAISE ... USING
/// ERRCODE`), and each would otherwise be a map entry and a Prometheus series for good.
pub const MAX_ERROR_CODES: usize = 100;

/// The codes Weir raises itself (docs/ARCHITECTURE.md, "Errors Weir raises"): counted under
/// their own name, so that clients' invented codes never hide Weir's behind `other`.
const OWN_CODES: [&[u8; 5]; 17] = [
    b"08P01", b"08006", b"08001", b"28000", b"28P01", b"3D000", b"53300", b"54000", b"57014",
    b"57P01", b"57P03", b"57P05", b"25P03", b"0A000", b"22023", b"26000", b"XX000",
];

impl PoolMetrics {
    pub fn error(&self, code: SqlState) {
        let mut errors = self.errors.lock().unwrap();
        let code = code.to_string();
        let key = if errors.len() < MAX_ERROR_CODES
            || errors.contains_key(&code)
            || OWN_CODES.iter().any(|c| code.as_bytes() == *c)
        {
            code
        } else {
            "other".to_string()
        };
        *errors.entry(key).or_default() += 1;
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap().clone()
    }
}

/// A statement slower than its pool's `slow_query_threshold`.
#[derive(Debug, Clone)]
pub struct SlowQuery {
    pub at: SystemTime,
    pub database: String,
    pub user: String,
    pub client: String,
    pub duration: Duration,
    /// The text, cut to [`SLOW_QUERY_TEXT`] characters. Parameters are never recorded.
    pub query: String,
}

/// Longest query text kept for a slow statement.
pub const SLOW_QUERY_TEXT: usize = 1000;

/// The latest slow statements, bounded.
#[derive(Debug)]
pub struct SlowLog {
    entries: Mutex<VecDeque<SlowQuery>>,
    capacity: usize,
}

impl Default for SlowLog {
    fn default() -> Self {
        SlowLog {
            entries: Mutex::new(VecDeque::new()),
            capacity: 200,
        }
    }
}

impl SlowLog {
    pub fn record(&self, q: SlowQuery) {
        tracing::warn!(
            database = %q.database,
            user = %q.user,
            client = %q.client,
            duration_ms = q.duration.as_millis() as u64,
            query = %q.query,
            "slow query"
        );
        let mut e = self.entries.lock().unwrap();
        if e.len() == self.capacity {
            e.pop_front();
        }
        e.push_back(q);
    }

    /// Newest first.
    pub fn list(&self) -> Vec<SlowQuery> {
        self.entries.lock().unwrap().iter().rev().cloned().collect()
    }
}

/// Cuts `text` to at most `max` characters, on a character boundary.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// What a connection is doing, for SHOW CLIENTS / SHOW SERVERS and the state gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl ConnState {
    fn from_u8(v: u8) -> ConnState {
        match v {
            1 => ConnState::Waiting,
            2 => ConnState::Active,
            _ => ConnState::Idle,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Idle => "idle",
            ConnState::Waiting => "waiting",
            ConnState::Active => "active",
        }
    }
}

/// Microseconds since the Unix epoch (0: never).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// [`unix_micros`] of a monotonic clock reading, through one pairing of the two clocks made
/// at first use: the hot path reads the clock once per event and turns that reading into
/// the wall time the console shows, instead of reading the wall clock a second time. A
/// wall clock stepped since then (not slewed) shifts the times shown by the step.
pub fn unix_micros_at(t: Instant) -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (i0, u0) = *BASE.get_or_init(|| (Instant::now(), unix_micros(SystemTime::now())));
    match t.checked_duration_since(i0) {
        Some(d) => u0.saturating_add(d.as_micros() as u64),
        None => u0.saturating_sub(i0.duration_since(t).as_micros() as u64),
    }
}

/// One connection (client or server) as the console and the API show it.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    /// Shared, not copied: a client's are the connection-limit counters' own keys.
    pub user: Arc<str>,
    pub database: Arc<str>,
    /// The peer's and our own address (a Unix socket has none). Kept compact and turned into
    /// text only when listed: no string per connection.
    peer: Addr,
    local: Addr,
    /// When it connected, in [`unix_micros`].
    connect_time: u64,
    pub application_name: String,
    /// Server connections: the backend's process id.
    pub remote_pid: i32,
    state: AtomicU8,
    request_time: AtomicU64,
    wait_since: AtomicU64,
    /// The connection it is paired with right now (a client's server, a server's client).
    link: AtomicU64,
    /// What operators asked of this connection from outside it ([`signal`] bits), and the
    /// task to wake when they do: one word and one waker per client, polled with no lock,
    /// where a `Notify` future per client took its waiter-list lock on every poll.
    signals: AtomicU8,
    /// The session's task, kept from its first poll on and woken by reference, so it is
    /// never used up: a waker taken by each wake (an `AtomicWaker`) had to be registered
    /// again at every poll, twice per transaction. The lock is taken only to keep it, to
    /// wake it, and when the session moves to another worker's task ([`ConnInfo::forget_task`]);
    /// `has_task` tells a poll, without it, whether one is kept.
    task: Mutex<Option<Waker>>,
    has_task: AtomicBool,
}

/// A socket address in 20 bytes, where `Option<SocketAddr>` takes 32: every client's
/// registry entry holds two, and with these the entry fits the allocator's 192-byte class
/// instead of its 224-byte one (issue 8's budget of 2 KB per idle client). An IPv6 address's
/// flow label and scope id are not kept: the console shows neither.
#[derive(Debug, Clone, Copy)]
struct Addr {
    ip: [u8; 16],
    port: u16,
    /// 0: none (a Unix socket), 4 or 6.
    family: u8,
}

impl Addr {
    fn new(a: Option<std::net::SocketAddr>) -> Addr {
        use std::net::IpAddr;
        let mut ip = [0; 16];
        let (family, port) = match a {
            None => (0, 0),
            Some(a) => match a.ip() {
                IpAddr::V4(v4) => {
                    ip[..4].copy_from_slice(&v4.octets());
                    (4, a.port())
                }
                IpAddr::V6(v6) => {
                    ip = v6.octets();
                    (6, a.port())
                }
            },
        };
        Addr { ip, port, family }
    }

    fn get(&self) -> Option<std::net::SocketAddr> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(
                self.ip[0], self.ip[1], self.ip[2], self.ip[3],
            )),
            6 => IpAddr::V6(Ipv6Addr::from(self.ip)),
            _ => return None,
        };
        Some(std::net::SocketAddr::new(ip, self.port))
    }
}

/// Requests raised on a client session from outside it.
pub mod signal {
    /// KILL of its database: the session ends now.
    pub const KILL: u8 = 1;
    /// Graceful shutdown: the session ends at its next transaction boundary.
    pub const DRAIN: u8 = 2;
}

impl ConnInfo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        user: Arc<str>,
        database: Arc<str>,
        peer: Option<std::net::SocketAddr>,
        local: Option<std::net::SocketAddr>,
        application_name: &str,
        remote_pid: i32,
    ) -> ConnInfo {
        let now = unix_micros(SystemTime::now());
        ConnInfo {
            id,
            user,
            database,
            peer: Addr::new(peer),
            local: Addr::new(local),
            connect_time: now,
            application_name: application_name.into(),
            remote_pid,
            state: AtomicU8::new(ConnState::Idle as u8),
            request_time: AtomicU64::new(now),
            wait_since: AtomicU64::new(0),
            link: AtomicU64::new(0),
            signals: AtomicU8::new(0),
            task: Mutex::new(None),
            has_task: AtomicBool::new(false),
        }
    }

    /// Raises `signals` and wakes the task that polls them.
    pub fn raise(&self, signals: u8) {
        self.signals
            .fetch_or(signals, std::sync::atomic::Ordering::AcqRel);
        // The lock orders this with the poll that keeps a task: either that poll, locking
        // after, then loads these bits, or this finds its task.
        if let Some(task) = self.task.lock().unwrap().as_ref() {
            task.wake_by_ref();
        }
    }

    /// The signals raised so far; the first poll keeps the polling task to be woken by the
    /// next (kept first, so a signal raised in between is seen now or wakes it). Every poll
    /// must come from the same task until [`ConnInfo::forget_task`]: a session's all do (its
    /// task runs it until it ends or moves to another worker, and nothing inside it polls
    /// with a waker of its own).
    ///
    /// Inline, with the first poll's work out of line: it runs at every wait of every
    /// session, and the usual call is two loads.
    #[inline]
    pub fn poll_signals(&self, cx: &mut Context<'_>) -> u8 {
        debug_assert!(
            !self.has_task.load(Relaxed)
                || self
                    .task
                    .lock()
                    .unwrap()
                    .as_ref()
                    .is_none_or(|t| t.will_wake(cx.waker())),
            "signals polled from a second task"
        );
        // Only the polling task sets or clears the flag, so a relaxed load sees its own.
        if !self.has_task.load(Relaxed) {
            self.keep_task(cx);
        }
        self.signals.load(Acquire)
    }

    #[cold]
    #[inline(never)]
    fn keep_task(&self, cx: &Context<'_>) {
        *self.task.lock().unwrap() = Some(cx.waker().clone());
        self.has_task.store(true, Relaxed);
    }

    /// Drops the task kept by [`ConnInfo::poll_signals`]: the session is about to continue
    /// in a task on another worker, whose first poll keeps that one. A signal raised in
    /// between finds no task to wake, and that first poll sees it.
    pub fn forget_task(&self) {
        *self.task.lock().unwrap() = None;
        self.has_task.store(false, Relaxed);
    }

    pub fn signals(&self) -> u8 {
        self.signals.load(Acquire)
    }

    /// The peer's IP address, or `unix`.
    pub fn addr(&self) -> String {
        self.peer
            .get()
            .map_or_else(|| "unix".into(), |a| a.ip().to_string())
    }

    /// The peer's port (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        self.peer.get().map_or(0, |a| a.port())
    }

    /// The peer's address and port (`None` for a Unix socket, or a TCP peer whose address
    /// could not be read).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer.get()
    }

    /// When it connected, in [`unix_micros`].
    pub fn connect_time(&self) -> u64 {
        self.connect_time
    }

    /// Our own IP address, or `unix`.
    pub fn local_addr(&self) -> String {
        self.local
            .get()
            .map_or_else(|| "unix".into(), |a| a.ip().to_string())
    }

    pub fn local_port(&self) -> u16 {
        self.local.get().map_or(0, |a| a.port())
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Relaxed))
    }

    /// Records a change of state at `now` (the caller's clock reading).
    pub fn set_state(&self, s: ConnState, now: Instant) {
        let at = match s {
            ConnState::Idle => 0,
            _ => unix_micros_at(now),
        };
        self.set_state_at(s, at);
    }

    /// [`ConnInfo::set_state`] at a time already in [`unix_micros`] (one conversion for the
    /// client and its server at a checkout).
    pub fn set_state_at(&self, s: ConnState, at: u64) {
        self.state.store(s as u8, Relaxed);
        match s {
            ConnState::Waiting => self.wait_since.store(at, Relaxed),
            ConnState::Active => {
                self.wait_since.store(0, Relaxed);
                self.request_time.store(at, Relaxed);
            }
            ConnState::Idle => self.wait_since.store(0, Relaxed),
        }
    }

    pub fn request_time(&self) -> u64 {
        self.request_time.load(Relaxed)
    }

    /// How long it has been waiting (zero if not waiting).
    pub fn waiting_for(&self) -> Duration {
        let since = self.wait_since.load(Relaxed);
        if since == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(unix_micros_at(Instant::now()).saturating_sub(since))
    }

    pub fn set_link(&self, other: u64) {
        self.link.store(other, Relaxed);
    }

    pub fn link(&self) -> u64 {
        self.link.load(Relaxed)
    }
}

/// Live connections of one kind, by id.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<u64, Arc<ConnInfo>>>,
    /// Signals every connection gets, including those registered later (shutdown).
    standing: AtomicU8,
}

impl Registry {
    /// Adds a connection; it is removed when the returned entry drops.
    pub fn register(self: &Arc<Self>, info: ConnInfo) -> Registered {
        let info = Arc::new(info);
        let mut map = self.map.lock().unwrap();
        // Read under the lock that `raise_standing` holds: no connection misses a shutdown.
        let standing = self.standing.load(Relaxed);
        if standing != 0 {
            info.raise(standing);
        }
        map.insert(info.id, info.clone());
        drop(map);
        Registered {
            registry: self.clone(),
            info,
        }
    }

    /// Raises `signals` on the connections `which` selects.
    pub fn raise(&self, signals: u8, which: impl Fn(&ConnInfo) -> bool) {
        for c in self.map.lock().unwrap().values() {
            if which(c) {
                c.raise(signals);
            }
        }
    }

    /// Raises `signals` on every connection, now and registered from now on.
    pub fn raise_standing(&self, signals: u8) {
        let map = self.map.lock().unwrap();
        self.standing.fetch_or(signals, Relaxed);
        for c in map.values() {
            c.raise(signals);
        }
    }

    pub fn list(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's place in a [`Registry`].
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Registry>,
    pub info: Arc<ConnInfo>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.map.lock().unwrap().remove(&self.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_log_is_bounded_and_newest_first() {
        let log = SlowLog {
            entries: Mutex::new(VecDeque::new()),
            capacity: 2,
        };
        for i in 0..3 {
            log.record(SlowQuery {
                at: SystemTime::now(),
                database: "d".into(),
                user: "u".into(),
                client: "c".into(),
                duration: Duration::from_secs(i),
                query: format!("q{i}"),
            });
        }
        let l = log.list();
        assert_eq!(
            l.iter().map(|q| q.query.as_str()).collect::<Vec<_>>(),
            vec!["q2", "q1"]
        );
    }

    #[test]
    fn error_codes_beyond_the_cap_count_as_other() {
        let m = PoolMetrics::default();
        let code = |i: usize| SqlState(format!("Q{i:04}").as_bytes().try_into().unwrap());
        for i in 0..MAX_ERROR_CODES + 50 {
            m.error(code(i));
        }
        // Codes already counted keep counting under their own name.
        m.error(code(0));
        let e = m.errors();
        assert_eq!(e.len(), MAX_ERROR_CODES + 1);
        assert_eq!(e["other"], 50);
        assert_eq!(e["Q0000"], 2);
        assert_eq!(e[&format!("Q{:04}", MAX_ERROR_CODES - 1)], 1);
        // Weir's own codes keep their names past the cap.
        m.error(SqlState::TOO_MANY_CONNECTIONS);
        assert_eq!(m.errors()["53300"], 1);
        assert_eq!(m.errors()["other"], 50);
    }

    #[test]
    fn a_monotonic_reading_maps_to_the_wall_clock() {
        let before = unix_micros(SystemTime::now());
        let now = Instant::now();
        let mapped = unix_micros_at(now);
        let after = unix_micros(SystemTime::now());
        // Within the two wall readings, give or take the first call's own pairing.
        assert!(
            mapped + 1_000 >= before && mapped <= after + 1_000,
            "{before} {mapped} {after}"
        );
        let later = unix_micros_at(now + Duration::from_secs(2));
        // (Microseconds are whole: a reading either side of the pairing rounds its own way.)
        assert!(
            (later - mapped).abs_diff(2_000_000) <= 1,
            "{mapped} {later}"
        );
        let earlier = unix_micros_at(now - Duration::from_millis(1));
        assert!(earlier < mapped);
    }

    #[test]
    fn a_registry_entry_fits_the_192_byte_allocation_class() {
        // Arc's two counters plus the entry: one per logged-in client (see `Addr`).
        assert!(
            std::mem::size_of::<ConnInfo>() + 16 <= 192,
            "ConnInfo is {} bytes",
            std::mem::size_of::<ConnInfo>()
        );
        for a in [
            None,
            Some("127.0.0.1:6432".parse().unwrap()),
            Some("[2001:db8::1]:5432".parse().unwrap()),
        ] {
            assert_eq!(Addr::new(a).get(), a, "round trip of {a:?}");
        }
    }

    #[test]
    fn cut_respects_characters() {
        assert_eq!(cut("héllo", 2), "hé…");
        assert_eq!(cut("hi", 5), "hi");
    }

    #[test]
    fn registry_entries_leave_on_drop() {
        let r = Arc::new(Registry::default());
        let a = r.register(ConnInfo::new(
            1,
            "u".into(),
            "d".into(),
            None,
            None,
            "app",
            0,
        ));
        assert_eq!(r.len(), 1);
        a.info.set_state(ConnState::Waiting, Instant::now());
        assert_eq!(r.list()[0].state(), ConnState::Waiting);
        drop(a);
        assert!(r.is_empty());
    }
}
