//! A generic async pool.
//!
//! Layout (public API, behaviour and locked state kept apart):
//! - [`Pool`] (this file): checkout, release, resize, top-up, reaping, statistics.
//! - [`Manager`]: what the pooled objects are: how to create one, check one before reuse,
//!   decide at release whether to keep it, and whether a failed create is worth retrying.
//! - [`Pooled`]: the RAII guard for a checked-out object. Dropping it *discards* the object;
//!   only [`Pooled::release`] puts it back. A task cancelled mid-transaction therefore can never
//!   return a dirty object to the pool.
//! - [`Ticket`]: a place in the queue of waiting checkouts, for a caller that does its own
//!   waiting ([`Pool::get`] is built on it).
//! - `Core`: the locked state: free permits, idle objects and the queue, under one lock.
//! - [`stats`]: counters kept with atomics (and a wait-time histogram) read at scrape time.
//!
//! Capacity is `max_size` permits, plus `reserve_size` reserve permits a waiter may draw on
//! once it has waited `reserve_timeout`. A checked-out object, or one being created, holds a
//! permit; idle objects hold none. A checkout takes the core lock once; so does a release.
//! A release with checkouts queued hands its object (or, when the object closes, its permit)
//! straight to the first waiter that may have it: waiters are served first come, first served,
//! a newcomer cannot overtake the queue, and the waiter gets an object that was in use a moment
//! ago without a second look in the idle list. The semaphore this replaces cost a lock per
//! release, a timer and a queue node per wait, and a second pass through the idle list; this is
//! the hot path of every transaction in transaction pooling, so it is written by hand.
//!
//! Dropping a [`Ticket`] (or the future of [`Pool::get`]) at any point leaves the queue and
//! passes on whatever it was handed meanwhile: neither a permit nor an object leaks.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub mod stats;
pub use stats::{
    BUCKETS, BUCKETS_US, CloseReason, Counter, Histogram, HistogramSnapshot, Snapshot, Stats,
};

/// Creates and checks the pooled objects.
pub trait Manager: Send + Sync + 'static {
    type Object: Send + 'static;
    type Error: Send + 'static;

    /// Opens a new object: one attempt. Called with a permit held, so at most the capacity exist.
    fn create(&self) -> impl Future<Output = Result<Self::Object, Self::Error>> + Send;

    /// Whether a failed create should be tried again, and after what pause. `attempt` counts
    /// from 1. `None` gives the error to the caller.
    fn retry_after(&self, _error: &Self::Error, _attempt: u32) -> Option<Duration> {
        None
    }

    /// Checks an idle object about to be handed out. An error discards it with that reason and
    /// the checkout tries the next one (or creates one).
    fn recycle(
        &self,
        _object: &mut Self::Object,
        _meta: &Meta,
    ) -> impl Future<Output = Result<(), CloseReason>> + Send {
        async { Ok(()) }
    }

    /// The part of [`Manager::recycle`] that needs no waiting, for the checkout fast path:
    /// `Some` when it decides alone, `None` when the full `recycle` must run. `now` is the
    /// caller's clock reading (the hot path reads the clock once per event, not per check).
    fn quick_check(
        &self,
        _object: &mut Self::Object,
        _meta: &Meta,
        _now: Instant,
    ) -> Option<Result<(), CloseReason>> {
        None
    }

    /// Decides at release whether to keep the object. An error closes it with that reason.
    /// `meta.last_used` is the time of this release.
    fn on_release(&self, _object: &mut Self::Object, _meta: &Meta) -> Result<(), CloseReason> {
        Ok(())
    }

    /// Receives every object the pool closes, with the reason (to log it); dropping it closes it.
    fn closed(&self, _object: Self::Object, _reason: CloseReason) {}

    /// Where an object lives (a worker thread, say), for callers that are better served by
    /// objects that live where they run: see [`Manager::here`].
    fn home(&self, _object: &Self::Object) -> usize {
        0
    }

    /// Where the calling task runs: a small index (a worker's number), as the queue keeps a
    /// line per value up to the largest seen. A checkout prefers an idle object whose
    /// [`Manager::home`] is here, and a release hands its object to a waiter from its home
    /// unless the first waiter has waited much longer (see [`affinity_slack`]).
    fn here(&self) -> usize {
        0
    }
}

/// How much longer than a waiter from an object's home the first waiter may have waited,
/// `age` into its wait, before a release serves it instead: half its wait so far, and at
/// least [`MIN_AFFINITY_SLACK`]. A window in time, not in places: a window of places fills
/// with the waiters of the home that holds fewer objects, and from then on every release
/// moves an object; in time, objects follow demand (a home whose queue runs dry passes its
/// objects on), and no waiter waits more than about half as long again as strict arrival
/// order would have made it wait. Measured with pgbench over two worker threads and a pool of
/// 20: a fixed 2 ms moved an object at about one checkout in eight with 100 clients and with
/// 1,000; a fixed 20 ms at one in 200 and one in 35, but the p99 latency with 100 clients grew
/// from 10-13 ms to 15-16 ms; half the first waiter's wait moves one in twelve with 100
/// clients and one in 120 with 1,000.
pub fn affinity_slack(age: Duration) -> Duration {
    (age / 2).max(MIN_AFFINITY_SLACK)
}

/// See [`affinity_slack`].
pub const MIN_AFFINITY_SLACK: Duration = Duration::from_millis(1);

/// Facts about a pooled object that lifetime policies need.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub created: Instant,
    pub last_used: Instant,
    /// Completed checkouts.
    pub uses: u64,
}

/// An object and its facts. Boxed once when the object is created and moved by pointer
/// from then on, so a checkout moves eight bytes and an empty `Option<Pooled>` (a client
/// between transactions) costs a word, not the object's size.
struct Slot<T> {
    object: T,
    meta: Meta,
}

/// Why a checkout failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError<E> {
    #[error(
        "timed out after {waited:?} waiting for a connection (pool size {max_size}, {queued} waiting)"
    )]
    Timeout {
        waited: Duration,
        max_size: usize,
        queued: usize,
        /// The last failed create while waiting, if the wait ended retrying one.
        last_error: Option<E>,
    },
    #[error("pool is closed")]
    Closed,
    #[error("could not create a connection")]
    Create(#[source] E),
}

/// What the reaper should do with one idle object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Close(CloseReason),
    /// Close only while the pool holds more than its minimum.
    CloseAboveMin(CloseReason),
}

/// Which kind of permit a checkout holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Main,
    Reserve,
}

/// What the pool hands a waiter.
enum Grant<T> {
    /// An object that was just released, with its permit.
    Object(Box<Slot<T>>, Kind),
    /// A permit alone: the waiter takes an idle object or opens one.
    Permit(Kind),
    Closed,
}

/// A waiter's side of the queue: what it was handed, and the task to wake. Locked after the
/// core lock, never before it.
struct WaitState<T> {
    grant: Option<Grant<T>>,
    waker: Option<Waker>,
}

struct Waiter<T> {
    state: Mutex<WaitState<T>>,
}

/// One place in the queue.
struct Entry<T> {
    waiter: Arc<Waiter<T>>,
    /// Has waited `reserve_timeout`: may take a reserve permit.
    reserve_ok: bool,
    /// When it joined the queue.
    since: Instant,
    /// Its place in arrival order across homes.
    seq: u64,
}

/// The waiters, a first-in-first-out line per home, with a sequence number that keeps the
/// arrival order across them. A release that prefers a waiter from its object's home (see
/// [`affinity_slack`]) finds it at the front of that home's line: one look, not a scan of the
/// shared line, and a removal from the front, not from the middle. With 1,000 clients on two
/// workers one shared line held runs of waiters from one worker (each worker queues a batch
/// of clients per wakeup), and the scan and the removal's move cost up to some 1,300
/// instructions per transaction: 8,350-9,713 in all before, 8,110-8,216 after (callgrind,
/// a window that includes pgbench's logins; docs/BENCHMARKS.md, 2026-12-03 13:10-14:45).
struct Queue<T> {
    homes: Vec<VecDeque<Entry<T>>>,
    len: usize,
    next_seq: u64,
}

impl<T> Queue<T> {
    fn new() -> Self {
        Queue {
            homes: Vec::new(),
            len: 0,
            next_seq: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push_back(&mut self, waiter: Arc<Waiter<T>>, reserve_ok: bool, home: usize, since: Instant) {
        if self.homes.len() <= home {
            self.homes.resize_with(home + 1, VecDeque::new);
        }
        self.homes[home].push_back(Entry {
            waiter,
            reserve_ok,
            since,
            seq: self.next_seq,
        });
        self.next_seq += 1;
        self.len += 1;
    }

    /// The home whose line holds the first waiter in arrival order.
    fn first_home(&self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.homes
            .iter()
            .enumerate()
            .filter_map(|(h, q)| q.front().map(|e| (e.seq, h)))
            .min()
            .map(|(_, h)| h)
    }

    fn pop_from(&mut self, home: usize) -> Option<Entry<T>> {
        let e = self.homes.get_mut(home)?.pop_front()?;
        self.len -= 1;
        Some(e)
    }

    fn pop_front(&mut self) -> Option<Entry<T>> {
        let h = self.first_home()?;
        self.pop_from(h)
    }

    /// Where the entry of `waiter` is: its home and its index in that home's line.
    fn find(&self, waiter: &Arc<Waiter<T>>) -> Option<(usize, usize)> {
        self.homes.iter().enumerate().find_map(|(h, q)| {
            q.iter()
                .position(|e| Arc::ptr_eq(&e.waiter, waiter))
                .map(|i| (h, i))
        })
    }

    fn remove(&mut self, (home, i): (usize, usize)) -> Option<Entry<T>> {
        let e = self.homes.get_mut(home)?.remove(i)?;
        self.len -= 1;
        Some(e)
    }

    /// The first waiter in arrival order that may take a reserve permit.
    fn first_reserve_ok(&self) -> Option<(usize, usize)> {
        self.homes
            .iter()
            .enumerate()
            .filter_map(|(h, q)| {
                let i = q.iter().position(|e| e.reserve_ok)?;
                Some((q[i].seq, (h, i)))
            })
            .min()
            .map(|(_, at)| at)
    }
}

/// The state a checkout and a release change, under one lock.
struct Core<T> {
    /// Idle objects, most recently released at the back.
    idle: VecDeque<Box<Slot<T>>>,
    /// Main permits no one holds.
    free: usize,
    /// Reserve permits no one holds.
    reserve_free: usize,
    /// Main permits to swallow as they come back, after a shrink below the number in use.
    to_forget: usize,
    queue: Queue<T>,
    closed: bool,
}

/// Wakers to wake and objects to close once the core lock is let go (neither runs under it:
/// a close may log, and a woken task may run on this thread at once).
struct After<T> {
    wake: Option<Waker>,
    close: Option<(T, CloseReason)>,
}

impl<T> After<T> {
    fn none() -> Self {
        After {
            wake: None,
            close: None,
        }
    }
}

impl<T> Core<T> {
    /// Removes the first waiter that may have a permit of `kind`; for an object from `home`
    /// at `now`, the first from the same home if it joined within [`affinity_slack`] of the
    /// first.
    fn next_waiter(
        &mut self,
        kind: Kind,
        home: Option<(usize, Instant)>,
    ) -> Option<Arc<Waiter<T>>> {
        let q = &mut self.queue;
        let entry = match kind {
            Kind::Main => {
                let first = q.first_home()?;
                let from = match home {
                    Some((h, now)) if h != first => {
                        let since = q.homes[first][0].since;
                        let limit = since + affinity_slack(now.saturating_duration_since(since));
                        match q.homes.get(h).and_then(|l| l.front()) {
                            Some(e) if e.since <= limit => h,
                            _ => first,
                        }
                    }
                    _ => first,
                };
                q.pop_from(from)
            }
            Kind::Reserve => {
                let at = q.first_reserve_ok()?;
                q.remove(at)
            }
        };
        entry.map(|e| e.waiter)
    }

    /// Hands `grant` to `waiter`; returns the waker to wake.
    fn give(waiter: &Waiter<T>, grant: Grant<T>) -> Option<Waker> {
        let mut st = waiter.state.lock().unwrap();
        st.grant = Some(grant);
        st.waker.take()
    }

    /// A permit comes back: to pay shrink debt, to the first waiter that may have it, or to
    /// the free count.
    fn return_permit(&mut self, kind: Kind, stats: &Stats) -> Option<Waker> {
        if kind == Kind::Main && self.to_forget > 0 {
            self.to_forget -= 1;
            return None;
        }
        if !self.closed
            && let Some(w) = self.next_waiter(kind, None)
        {
            stats.waiting.fetch_sub(1, Relaxed);
            return Self::give(&w, Grant::Permit(kind));
        }
        self.free_permit(kind, stats);
        None
    }

    /// A permit no waiter may have goes to the free count.
    fn free_permit(&mut self, kind: Kind, stats: &Stats) {
        match kind {
            Kind::Main => self.free += 1,
            Kind::Reserve => {
                self.reserve_free += 1;
                stats.reserve_used.fetch_sub(1, Relaxed);
            }
        }
    }

    /// A healthy object from `home` comes back with its permit: to the first waiter that may
    /// have it (preferring one from the same home), or to the idle list (the permit to the
    /// free count).
    fn put_back(
        &mut self,
        slot: Box<Slot<T>>,
        home: usize,
        now: Instant,
        kind: Kind,
        stats: &Stats,
    ) -> After<T> {
        if let Some(w) = self.next_waiter(kind, Some((home, now))) {
            stats.waiting.fetch_sub(1, Relaxed);
            return After {
                wake: Self::give(&w, Grant::Object(slot, kind)),
                close: None,
            };
        }
        self.idle.push_back(slot);
        // As `return_permit`, less its look for a waiter: the one above found none that may
        // have this permit.
        if kind == Kind::Main && self.to_forget > 0 {
            self.to_forget -= 1;
        } else {
            self.free_permit(kind, stats);
        }
        After::none()
    }
}

struct Inner<M: Manager> {
    manager: M,
    core: Mutex<Core<M::Object>>,
    /// Mirrors `Core::closed`, for a look without the lock.
    closed: AtomicBool,
    reserve_size: usize,
    reserve_timeout: Duration,
    max_size: AtomicUsize,
    /// Signalled when an object goes back to the idle list (wakes creators that are retrying).
    released: tokio::sync::Notify,
    /// Creators pausing between attempts, waiting on `released`: a release notifies only when
    /// there is one, since `notify_waiters` takes a lock every time.
    retrying: AtomicUsize,
    stats: Stats,
}

impl<M: Manager> Inner<M> {
    fn core(&self) -> std::sync::MutexGuard<'_, Core<M::Object>> {
        self.core.lock().unwrap()
    }

    /// The most recently released idle object that lives here, or else the most recent.
    fn take_idle_near(&self, core: &mut Core<M::Object>) -> Option<Box<Slot<M::Object>>> {
        let here = self.manager.here();
        // Usually the newest already lives here.
        if self.manager.home(&core.idle.back()?.object) == here {
            return core.idle.pop_back();
        }
        let i = core
            .idle
            .iter()
            .rposition(|s| self.manager.home(&s.object) == here)
            .unwrap_or(core.idle.len() - 1);
        core.idle.remove(i)
    }

    /// Counts and hands over an object being closed.
    fn close(&self, object: M::Object, reason: CloseReason) {
        self.stats.closed_one(reason);
        self.manager.closed(object, reason);
    }

    fn finish(&self, after: After<M::Object>) {
        if let Some((object, reason)) = after.close {
            self.close(object, reason);
        }
        if let Some(w) = after.wake {
            w.wake();
        }
    }

    /// Gives a permit back (see [`Core::return_permit`]).
    fn return_permit(&self, kind: Kind) {
        let wake = self.core().return_permit(kind, &self.stats);
        if let Some(w) = wake {
            w.wake();
        }
    }

    /// Puts a healthy object back with its permit (see [`Core::put_back`]).
    fn put_back(&self, slot: Box<Slot<M::Object>>, kind: Kind) {
        let home = self.manager.home(&slot.object);
        let after = {
            let mut core = self.core();
            if core.closed {
                let after = After {
                    wake: core.return_permit(kind, &self.stats),
                    close: Some((slot.object, CloseReason::PoolClosed)),
                };
                drop(core);
                self.finish(after);
                return;
            }
            core.put_back(slot, home, Instant::now(), kind, &self.stats)
        };
        if after.wake.is_none() && self.retrying.load(SeqCst) > 0 {
            self.released.notify_waiters();
        }
        self.finish(after);
    }

    /// The most recently released idle object that lives here, or else the most recent one
    /// (see [`Manager::here`]), closed (as `CheckFailed`) if dropped before it is handed out.
    /// The caller holds a permit.
    fn pop_idle(&self) -> Option<PendingSlot<'_, M>> {
        let slot = self.take_idle_near(&mut self.core())?;
        Some(PendingSlot {
            slot: Some(slot),
            inner: self,
        })
    }
}

/// A pool of `M::Object`s. Cheap to clone.
pub struct Pool<M: Manager> {
    inner: Arc<Inner<M>>,
}

impl<M: Manager> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Manager> std::fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.snapshot())
            .finish()
    }
}

/// What a [`Ticket`] turns into.
pub enum Granted<M: Manager> {
    /// An object ready for use: one a release just handed over, already judged by
    /// [`Manager::on_release`], so it is not checked again.
    Object(Pooled<M>),
    /// Capacity only: [`Pool::fill`] checks an idle object or opens one.
    Capacity(Permit<M>),
}

impl<M: Manager> Pool<M> {
    pub fn new(manager: M, max_size: usize) -> Self {
        Self::with_reserve(manager, max_size, 0, Duration::from_secs(5))
    }

    /// A pool with `reserve_size` extra permits for waiters that have waited `reserve_timeout`.
    pub fn with_reserve(
        manager: M,
        max_size: usize,
        reserve_size: usize,
        reserve_timeout: Duration,
    ) -> Self {
        Pool {
            inner: Arc::new(Inner {
                manager,
                core: Mutex::new(Core {
                    idle: VecDeque::with_capacity(max_size),
                    free: max_size,
                    reserve_free: reserve_size,
                    to_forget: 0,
                    queue: Queue::new(),
                    closed: false,
                }),
                closed: AtomicBool::new(false),
                reserve_size,
                reserve_timeout,
                max_size: AtomicUsize::new(max_size),
                released: tokio::sync::Notify::new(),
                retrying: AtomicUsize::new(0),
                stats: Stats::default(),
            }),
        }
    }

    pub fn manager(&self) -> &M {
        &self.inner.manager
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn max_size(&self) -> usize {
        self.inner.max_size.load(Relaxed)
    }

    /// Checks out an object within `timeout` (waiting for capacity, checking idle objects,
    /// creating and retrying as the manager allows). Cancel-safe: dropping the future at any
    /// point leaks neither a permit nor an object.
    pub async fn get(&self, timeout: Duration) -> Result<Pooled<M>, GetError<M::Error>> {
        self.get_inner(timeout, true).await
    }

    /// Like [`Pool::get`], but a failed create is returned at once instead of retried.
    pub async fn get_once(&self, timeout: Duration) -> Result<Pooled<M>, GetError<M::Error>> {
        self.get_inner(timeout, false).await
    }

    /// The checkout fast path: nobody queued, a free permit and an idle object that passes
    /// [`Manager::quick_check`] at `now`, without waiting and without building the future
    /// `get` is. `None` when that is not possible right now: queue with [`Pool::ticket`] or
    /// call [`Pool::get`].
    pub fn try_get(&self, now: Instant) -> Option<Pooled<M>> {
        let inner = &self.inner;
        loop {
            let mut slot = {
                let mut core = inner.core();
                if core.closed || core.free == 0 || !core.queue.is_empty() {
                    return None;
                }
                let slot = inner.take_idle_near(&mut core)?;
                core.free -= 1;
                slot
            };
            match inner.manager.quick_check(&mut slot.object, &slot.meta, now) {
                Some(Ok(())) => {
                    inner.stats.wait_buckets.observe_zero();
                    inner.stats.checkout();
                    return Some(Pooled::new(PermitGuard::new(inner, Kind::Main), slot));
                }
                Some(Err(reason)) => {
                    inner.stats.replaced.fetch_add(1, Relaxed);
                    inner.close(slot.object, reason);
                    inner.return_permit(Kind::Main);
                }
                None => {
                    // Needs the full check: back where it was, for `get`.
                    let mut core = inner.core();
                    core.idle.push_back(slot);
                    let wake = core.return_permit(Kind::Main, &inner.stats);
                    drop(core);
                    if let Some(w) = wake {
                        w.wake();
                    }
                    return None;
                }
            }
        }
    }

    /// Takes a place in the queue, or capacity at once if some is free and nobody is queued
    /// (then the ticket is ready at its first poll). `now` starts the wait's clock: it decides
    /// when the reserve opens to this waiter and what the wait statistics record.
    pub fn ticket(&self, now: Instant) -> Ticket<M> {
        self.ticket_reusing(now, Spare::default())
    }

    /// [`Pool::ticket`], with the waiter (the queue entry's shared half) `spare` holds, if
    /// any (see [`Ticket::recycle`]): then a checkout that queues allocates no waiter.
    pub fn ticket_reusing(&self, now: Instant, spare: Spare<M>) -> Ticket<M> {
        let inner = &self.inner;
        let reserve_timeout = inner.reserve_timeout;
        let mut ticket = Ticket {
            inner: inner.clone(),
            waiter: None,
            served: None,
            ready: None,
            start: now,
            reserve_at: None,
            queued: false,
        };
        let mut core = inner.core();
        if core.closed {
            ticket.ready = Some(Grant::Closed);
            return ticket;
        }
        if core.free > 0 && core.queue.is_empty() {
            core.free -= 1;
            drop(core);
            inner.stats.wait_buckets.observe_zero();
            ticket.ready = Some(Grant::Permit(Kind::Main));
            return ticket;
        }
        let waiter = spare.0.unwrap_or_else(|| {
            Arc::new(Waiter {
                state: Mutex::new(WaitState {
                    grant: None,
                    waker: None,
                }),
            })
        });
        let reserve = inner.reserve_size > 0;
        // Counted under the lock, before a release on another thread can take the entry and
        // count it out.
        inner.stats.waiting.fetch_add(1, Relaxed);
        core.queue.push_back(
            waiter.clone(),
            reserve && reserve_timeout.is_zero(),
            inner.manager.here(),
            now,
        );
        drop(core);
        if reserve && !reserve_timeout.is_zero() {
            ticket.reserve_at = now.checked_add(reserve_timeout);
        }
        inner.stats.waited.fetch_add(1, Relaxed);
        ticket.waiter = Some(waiter);
        ticket.queued = true;
        if reserve && reserve_timeout.is_zero() {
            ticket.try_reserve();
        }
        ticket
    }

    /// Turns capacity into an object before `deadline`: an idle object that passes its check,
    /// or a new one (retried as the manager allows when `retry`).
    pub async fn fill(
        &self,
        permit: Permit<M>,
        deadline: Instant,
        retry: bool,
    ) -> Result<Pooled<M>, GetError<M::Error>> {
        let start = permit.start;
        let permit = permit.guard;
        let inner = &self.inner;
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut attempt = 0;
        let mut last_error = None;
        loop {
            // Closed meanwhile (retired by a reload, say): no new object for a closed pool.
            if inner.closed.load(SeqCst) {
                return Err(GetError::Closed);
            }
            // An idle object, checked before use. After a failed health check the rest are
            // likely as stale (a failover, say): create instead of checking them one by one.
            if let Some(got) = self.take_idle(start, deadline).await {
                return got.map(|slot| Pooled::new(permit, slot));
            }
            attempt += 1;
            let created =
                match tokio::time::timeout_at(deadline, Box::pin(inner.manager.create())).await {
                    Ok(r) => r,
                    Err(_) => return Err(self.timeout_error(start, last_error, false)),
                };
            let e = match created {
                Ok(object) => {
                    inner.stats.created_one();
                    inner.stats.checkout();
                    let now = Instant::now();
                    let meta = Meta {
                        created: now,
                        last_used: now,
                        uses: 0,
                    };
                    return Ok(Pooled::new(permit, Box::new(Slot { object, meta })));
                }
                Err(e) => e,
            };
            inner.stats.create_errors.fetch_add(1, Relaxed);
            let Some(pause) = retry
                .then(|| inner.manager.retry_after(&e, attempt))
                .flatten()
            else {
                return Err(GetError::Create(e));
            };
            last_error = Some(e);
            // Pause, but wake early if someone returns an object meanwhile; at the deadline
            // the wait ends with the last error.
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.timeout_error(start, last_error, false));
            }
            inner.stats.retries.fetch_add(1, Relaxed);
            // Counted before the `notified()` future exists: a release that does not see the
            // count came before it, and would not have woken it either.
            let _retrying = Retrying::enter(&inner.retrying);
            let released = inner.released.notified();
            tokio::select! {
                _ = tokio::time::sleep_until((now + pause).min(deadline)) => {}
                _ = released => {}
            }
        }
    }

    async fn get_inner(
        &self,
        timeout: Duration,
        retry: bool,
    ) -> Result<Pooled<M>, GetError<M::Error>> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut ticket = self.ticket(start);
        let granted = {
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
                ticket.reserve_at.map_or(deadline, |r| r.min(deadline)),
            ));
            tokio::pin!(sleep);
            std::future::poll_fn(|cx| {
                loop {
                    let now = Instant::now();
                    if let Poll::Ready(r) = ticket.poll(cx, now) {
                        return Poll::Ready(Some(r));
                    }
                    if now >= deadline {
                        return Poll::Ready(None);
                    }
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The reserve opened (the ticket looks at it on the next poll): sleep on
                    // to the deadline.
                    sleep
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(deadline));
                }
            })
            .await
        };
        match granted.unwrap_or_else(|| ticket.give_up()) {
            Err(e) => Err(e),
            Ok(Granted::Object(p)) => Ok(p),
            Ok(Granted::Capacity(permit)) => self.fill(permit, deadline, retry).await,
        }
    }

    /// Takes an idle object that passes its check, or `None` if there is none worth using.
    async fn take_idle(
        &self,
        start: Instant,
        deadline: tokio::time::Instant,
    ) -> Option<Result<Box<Slot<M::Object>>, GetError<M::Error>>> {
        let inner = &self.inner;
        loop {
            // Counted as closed if dropped before it is handed out (cancelled mid-check).
            let mut pending = inner.pop_idle()?;
            let s = pending.slot.as_mut().expect("just set");
            let checked =
                tokio::time::timeout_at(deadline, inner.manager.recycle(&mut s.object, &s.meta))
                    .await;
            match checked {
                Ok(Ok(())) => {
                    inner.stats.checkout();
                    return Some(Ok(pending.take()));
                }
                Ok(Err(reason)) => {
                    inner.stats.replaced.fetch_add(1, Relaxed);
                    pending.close(reason);
                    if reason == CloseReason::CheckFailed {
                        return None;
                    }
                }
                Err(_) => {
                    pending.close(CloseReason::CheckFailed);
                    return Some(Err(self.timeout_error(start, None, false)));
                }
            }
        }
    }

    /// `queued`: whether this caller is still counted among the waiters.
    fn timeout_error(
        &self,
        start: Instant,
        last_error: Option<M::Error>,
        queued: bool,
    ) -> GetError<M::Error> {
        timeout_error(&self.inner, start, last_error, queued)
    }

    /// Changes the capacity. Growing frees waiters at once; shrinking closes idle objects
    /// first and takes the rest of the reduction from checked-out ones as they come back.
    pub fn resize(&self, new_max: usize) {
        let inner = &self.inner;
        let mut wake = Vec::new();
        let shrunk = {
            let mut core = inner.core();
            let old = inner.max_size.swap(new_max, Relaxed);
            if new_max > old {
                // Cancel pending shrink debt before adding permits.
                let grow = new_max - old;
                let paid = core.to_forget.min(grow);
                core.to_forget -= paid;
                // A permit per waiter, then the rest to the free count in one step: the new
                // size comes from an operator (up to `u32::MAX`), and this runs under the lock.
                let mut left = grow - paid;
                while left > 0 && !core.closed && !core.queue.is_empty() {
                    wake.extend(core.return_permit(Kind::Main, &inner.stats));
                    left -= 1;
                }
                core.free += left;
            } else if new_max < old {
                let shrink = old - new_max;
                let forgotten = core.free.min(shrink);
                core.free -= forgotten;
                core.to_forget += shrink - forgotten;
            }
            new_max < old
        };
        for w in wake {
            w.wake();
        }
        if shrunk {
            self.trim_idle();
        }
    }

    /// Closes idle objects beyond what the capacity allows.
    fn trim_idle(&self) {
        let inner = &self.inner;
        let max = inner.max_size.load(Relaxed);
        let mut removed = Vec::new();
        {
            let mut core = inner.core();
            while inner.stats.size.load(Relaxed) - removed.len() > max {
                match core.idle.pop_front() {
                    Some(s) => removed.push(s),
                    None => break,
                }
            }
        }
        for s in removed {
            inner.close(s.object, CloseReason::Shrink);
        }
    }

    /// Opens objects until the pool holds `min` (never beyond the capacity, never taking a
    /// permit a client is waiting for). One attempt each; returns how many were opened, or
    /// the first error.
    pub async fn top_up(&self, min: usize) -> Result<usize, M::Error> {
        let inner = &self.inner;
        let mut made = 0;
        while inner.stats.size.load(Relaxed) < min {
            {
                let mut core = inner.core();
                if core.closed || core.free == 0 || !core.queue.is_empty() {
                    break;
                }
                core.free -= 1;
            }
            let guard = PermitGuard::new(inner, Kind::Main);
            let object = inner.manager.create().await.inspect_err(|_| {
                inner.stats.create_errors.fetch_add(1, Relaxed);
            })?;
            inner.stats.created_one();
            let now = Instant::now();
            let meta = Meta {
                created: now,
                last_used: now,
                uses: 0,
            };
            guard.disarm();
            inner.put_back(Box::new(Slot { object, meta }), Kind::Main);
            made += 1;
        }
        Ok(made)
    }

    /// Walks idle objects, least recently used first, closing those `verdict` says to close.
    /// `min` bounds [`Verdict::CloseAboveMin`]. Returns how many were closed.
    pub fn reap(
        &self,
        min: usize,
        mut verdict: impl FnMut(&mut M::Object, &Meta) -> Verdict,
    ) -> usize {
        let inner = &self.inner;
        let mut closed: Vec<(Box<Slot<M::Object>>, CloseReason)> = Vec::new();
        {
            let mut core = inner.core();
            let idle = &mut core.idle;
            let size = inner.stats.size.load(Relaxed);
            let mut i = 0;
            while i < idle.len() {
                let slot = &mut idle[i];
                let reason = match verdict(&mut slot.object, &slot.meta) {
                    Verdict::Keep => None,
                    Verdict::Close(r) => Some(r),
                    Verdict::CloseAboveMin(r) => (size - closed.len() > min).then_some(r),
                };
                match reason {
                    Some(r) => closed.push((idle.remove(i).expect("index in range"), r)),
                    None => i += 1,
                }
            }
            // Objects kept for waiters while the reserve was in use: trim once idle.
            let max = inner.max_size.load(Relaxed);
            while size - closed.len() > max {
                match idle.pop_front() {
                    Some(s) => closed.push((s, CloseReason::Shrink)),
                    None => break,
                }
            }
        }
        let n = closed.len();
        for (s, r) in closed {
            inner.close(s.object, r);
        }
        n
    }

    /// Closes the pool: current and future waiters get [`GetError::Closed`]; idle objects are
    /// dropped. Checked-out objects are discarded as they come back.
    pub fn close(&self) {
        let inner = &self.inner;
        let mut wake = Vec::new();
        {
            let mut core = inner.core();
            core.closed = true;
            inner.closed.store(true, SeqCst);
            while let Some(e) = core.queue.pop_front() {
                inner.stats.waiting.fetch_sub(1, Relaxed);
                wake.extend(Core::give(&e.waiter, Grant::Closed));
            }
        }
        for w in wake {
            w.wake();
        }
        // Creators pausing between attempts stop at their next look.
        inner.released.notify_waiters();
        self.reap(0, |_, _| Verdict::Close(CloseReason::PoolClosed));
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(SeqCst)
    }

    pub fn snapshot(&self) -> Snapshot {
        let idle = self.inner.core().idle.len();
        self.inner.stats.snapshot(idle, self.max_size())
    }
}

fn timeout_error<M: Manager>(
    inner: &Inner<M>,
    start: Instant,
    last_error: Option<M::Error>,
    queued: bool,
) -> GetError<M::Error> {
    inner.stats.timeouts.fetch_add(1, Relaxed);
    let waiting = inner.stats.waiting.load(Relaxed);
    GetError::Timeout {
        waited: start.elapsed(),
        max_size: inner.max_size.load(Relaxed),
        queued: if queued {
            waiting.saturating_sub(1)
        } else {
            waiting
        },
        last_error,
    }
}

/// A checkout's place in the queue (see [`Pool::ticket`]). Poll it until it is ready;
/// dropping it leaves the queue and passes on anything it was handed meanwhile.
pub struct Ticket<M: Manager> {
    inner: Arc<Inner<M>>,
    /// In the queue: the shared half.
    waiter: Option<Arc<Waiter<M::Object>>>,
    /// Out of the queue, served: the shared half, for [`Ticket::recycle`].
    served: Option<Arc<Waiter<M::Object>>>,
    /// Resolved without queueing (or on a look at the reserve).
    ready: Option<Grant<M::Object>>,
    start: Instant,
    /// When this waiter may start drawing on the reserve; `None` once it may (or never).
    reserve_at: Option<Instant>,
    /// Joined the queue (rather than finding capacity free): its wait is recorded.
    queued: bool,
}

impl<M: Manager> Ticket<M> {
    /// When the caller should poll again, even unwoken: the reserve opens to this waiter then.
    pub fn reserve_at(&self) -> Option<Instant> {
        self.reserve_at
    }

    /// Polls for the checkout. `now` is the caller's clock reading: from `reserve_at` on, the
    /// ticket may take a reserve permit. Wakes the task in `cx` when something is handed over.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
    ) -> Poll<Result<Granted<M>, GetError<M::Error>>> {
        if let Some(grant) = self.take_grant(Some(cx)) {
            return Poll::Ready(self.resolve(grant));
        }
        if self.reserve_at.is_some_and(|at| now >= at) {
            self.reserve_at = None;
            self.try_reserve();
            if let Some(grant) = self.ready.take() {
                return Poll::Ready(self.resolve(grant));
            }
        }
        Poll::Pending
    }

    /// What was handed over, if anything; with `cx`, registers its waker otherwise.
    fn take_grant(&mut self, cx: Option<&mut Context<'_>>) -> Option<Grant<M::Object>> {
        if let Some(g) = self.ready.take() {
            return Some(g);
        }
        let waiter = self.waiter.as_ref()?;
        let mut st = waiter.state.lock().unwrap();
        if let Some(g) = st.grant.take() {
            drop(st);
            self.served = self.waiter.take();
            return Some(g);
        }
        if let Some(cx) = cx
            && !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.waker = Some(cx.waker().clone());
        }
        None
    }

    /// This waiter has waited long enough for the reserve: marks it so, and takes a reserve
    /// permit at once if one is free.
    fn try_reserve(&mut self) {
        let Some(waiter) = &self.waiter else {
            return;
        };
        let inner = &self.inner;
        let mut core = inner.core();
        let Some((h, i)) = core.queue.find(waiter) else {
            return; // handed something meanwhile: the next poll takes it
        };
        if core.reserve_free == 0 {
            core.queue.homes[h][i].reserve_ok = true;
            return;
        }
        core.queue.remove((h, i));
        core.reserve_free -= 1;
        drop(core);
        inner.stats.waiting.fetch_sub(1, Relaxed);
        inner.stats.reserve_used.fetch_add(1, Relaxed);
        self.served = self.waiter.take();
        self.ready = Some(Grant::Permit(Kind::Reserve));
    }

    fn resolve(&mut self, grant: Grant<M::Object>) -> Result<Granted<M>, GetError<M::Error>> {
        let inner = &self.inner;
        if self.queued && !matches!(grant, Grant::Closed) {
            // (A checkout that did not queue recorded its zero wait already.)
            inner.stats.record_wait(self.start.elapsed());
        }
        match grant {
            Grant::Closed => Err(GetError::Closed),
            Grant::Object(slot, kind) => {
                inner.stats.checkout();
                Ok(Granted::Object(Pooled::new(
                    PermitGuard::new(inner, kind),
                    slot,
                )))
            }
            Grant::Permit(kind) => Ok(Granted::Capacity(Permit {
                guard: PermitGuard::new(inner, kind),
                start: self.start,
            })),
        }
    }

    /// This ticket's waiter, for the caller's next wait, once the ticket has been served and
    /// nothing else holds the waiter (the releaser that served it on another thread may
    /// still, for a moment: then the spare is empty and the next wait allocates one).
    pub fn recycle(mut self) -> Spare<M> {
        let Some(mut waiter) = self.served.take() else {
            return Spare::default();
        };
        // Not kept if poisoned: its next grant would panic under the core lock.
        if let Some(w) = Arc::get_mut(&mut waiter)
            && let Ok(st) = w.state.get_mut()
        {
            // Served means its grant was taken: nothing is dropped here unaccounted.
            debug_assert!(st.grant.is_none());
            // The waker is the caller's own task: kept, it would keep that task alive.
            st.waker = None;
            return Spare(Some(waiter));
        }
        Spare::default()
    }

    /// Leaves the queue at the deadline: the timeout error, with the wait recorded; or, if
    /// something was handed over since the last poll, that after all.
    pub fn give_up(mut self) -> Result<Granted<M>, GetError<M::Error>> {
        if let Some(grant) = self.take_grant(None) {
            return self.resolve(grant);
        }
        self.leave();
        self.inner.stats.record_wait(self.start.elapsed());
        Err(timeout_error(&self.inner, self.start, None, false))
    }

    /// Leaves the queue, passing on whatever was handed over.
    fn leave(&mut self) {
        let inner = &self.inner;
        let grant = match self.waiter.take() {
            Some(waiter) => {
                let mut core = inner.core();
                if let Some(at) = core.queue.find(&waiter) {
                    core.queue.remove(at);
                    inner.stats.waiting.fetch_sub(1, Relaxed);
                }
                // Still under the core lock: nothing can be handed over after this.
                waiter.state.lock().unwrap().grant.take()
            }
            None => self.ready.take(),
        };
        match grant {
            None | Some(Grant::Closed) => {}
            Some(Grant::Permit(kind)) => inner.return_permit(kind),
            Some(Grant::Object(slot, kind)) => inner.put_back(slot, kind),
        }
    }
}

impl<M: Manager> Drop for Ticket<M> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A waiter (a queue entry's shared half) kept between waits ([`Pool::ticket_reusing`],
/// [`Ticket::recycle`]), so that a caller that queues again allocates none. Empty by default.
pub struct Spare<M: Manager>(Option<Arc<Waiter<M::Object>>>);

impl<M: Manager> Default for Spare<M> {
    fn default() -> Self {
        Spare(None)
    }
}

impl<M: Manager> Spare<M> {
    /// Holds no waiter.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl<M: Manager> std::fmt::Debug for Spare<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare")
            .field("kept", &self.0.is_some())
            .finish()
    }
}

/// Capacity granted to a checkout that still needs an object (see [`Pool::fill`]). Dropping
/// it gives the permit back.
pub struct Permit<M: Manager> {
    guard: PermitGuard<M>,
    start: Instant,
}

/// Counts a creator pausing between attempts, however the pause ends.
struct Retrying<'a>(&'a AtomicUsize);

impl<'a> Retrying<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, SeqCst);
        Retrying(count)
    }
}

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// An idle object taken out for checking; closed (and counted) unless handed out.
struct PendingSlot<'a, M: Manager> {
    slot: Option<Box<Slot<M::Object>>>,
    inner: &'a Inner<M>,
}

impl<M: Manager> PendingSlot<'_, M> {
    fn take(mut self) -> Box<Slot<M::Object>> {
        self.slot.take().expect("present until taken")
    }

    fn close(mut self, reason: CloseReason) {
        if let Some(s) = self.slot.take() {
            self.inner.close(s.object, reason);
        }
    }
}

impl<M: Manager> Drop for PendingSlot<'_, M> {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            self.inner.close(s.object, CloseReason::CheckFailed);
        }
    }
}

/// Owns one permit and gives it back on drop (or swallows it to pay shrink debt).
struct PermitGuard<M: Manager> {
    inner: Arc<Inner<M>>,
    kind: Kind,
    armed: bool,
}

impl<M: Manager> PermitGuard<M> {
    fn new(inner: &Arc<Inner<M>>, kind: Kind) -> Self {
        PermitGuard {
            inner: inner.clone(),
            kind,
            armed: true,
        }
    }

    /// The permit goes back some other way (with its object).
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl<M: Manager> Drop for PermitGuard<M> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.return_permit(self.kind);
        }
    }
}

/// A checked-out object. Dereferences to it. Drop discards it; [`Pooled::release`] returns it.
pub struct Pooled<M: Manager> {
    slot: Option<Box<Slot<M::Object>>>,
    permit: PermitGuard<M>,
    /// Why the object is closed if dropped without release.
    discard_reason: CloseReason,
}

impl<M: Manager> Pooled<M> {
    fn new(permit: PermitGuard<M>, slot: Box<Slot<M::Object>>) -> Self {
        Pooled {
            slot: Some(slot),
            permit,
            discard_reason: CloseReason::Broken,
        }
    }

    pub fn meta(&self) -> &Meta {
        &self.slot.as_ref().expect("present until consumed").meta
    }

    /// Whether this checkout drew on the reserve.
    pub fn is_reserve(&self) -> bool {
        self.permit.kind == Kind::Reserve
    }

    /// Puts the object back as idle, unless the manager or the capacity says to close it.
    /// Only call this when it is clean enough for any user.
    pub fn release(self) {
        self.release_at(Instant::now())
    }

    /// [`Pooled::release`] with the caller's clock reading as the time of release.
    pub fn release_at(mut self, now: Instant) {
        let mut slot = self.slot.take().expect("present until consumed");
        slot.meta.uses += 1;
        slot.meta.last_used = now;
        // The permit goes back with the object (or alone, below): not by the guard.
        self.permit.armed = false;
        let kind = self.permit.kind;
        let inner = &*self.permit.inner;
        let verdict = inner.manager.on_release(&mut slot.object, &slot.meta);
        let home = inner.manager.home(&slot.object);
        let after = {
            let mut core = inner.core();
            // Over capacity (after a shrink, or with the reserve in use), an object is closed
            // unless a client is waiting for one: closing it would only make that client open
            // another. The reaper trims the excess once it is idle.
            let over = inner.stats.size.load(Relaxed) > inner.max_size.load(Relaxed)
                && core.queue.is_empty();
            let reason = match verdict {
                Err(reason) => Some(reason),
                Ok(()) if core.closed => Some(CloseReason::PoolClosed),
                Ok(()) if over => Some(CloseReason::Shrink),
                // Shrink debt is paid by closing what comes back.
                Ok(()) if kind == Kind::Main && core.to_forget > 0 => Some(CloseReason::Shrink),
                Ok(()) => None,
            };
            match reason {
                None => core.put_back(slot, home, now, kind, &inner.stats),
                Some(reason) => After {
                    wake: core.return_permit(kind, &inner.stats),
                    close: Some((slot.object, reason)),
                },
            }
        };
        if after.close.is_none() && after.wake.is_none() && inner.retrying.load(SeqCst) > 0 {
            inner.released.notify_waiters();
        }
        inner.finish(after);
    }

    /// Closes the object instead of returning it.
    pub fn discard(mut self, reason: CloseReason) {
        self.discard_reason = reason;
        drop(self)
    }
}

impl<M: Manager> Drop for Pooled<M> {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            self.permit.inner.close(s.object, self.discard_reason);
        }
    }
}

impl<M: Manager> std::ops::Deref for Pooled<M> {
    type Target = M::Object;
    fn deref(&self) -> &M::Object {
        &self.slot.as_ref().expect("present until consumed").object
    }
}

impl<M: Manager> std::ops::DerefMut for Pooled<M> {
    fn deref_mut(&mut self) -> &mut M::Object {
        &mut self.slot.as_mut().expect("present until consumed").object
    }
}

#[cfg(test)]
mod tests;
