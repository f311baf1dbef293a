//! A generic async pool.
//!
//! Layout (public API, behaviour and locked state kept apart):
//! - [`Pool`] (this file): checkout, release, resize, top-up, reaping, statistics.
//! - [`Manager`]: what the pooled objects are: how to create one, check one before reuse,
//!   decide at release whether to keep it, and whether a failed create is worth retrying.
//! - [`Pooled`]: the RAII guard for a checked-out object. Dropping it *discards* the object;
//!   only [`Pooled::release`] puts it back. A task cancelled mid-transaction therefore can never
//!   return a dirty object to the pool.
//! - [`stats`]: counters kept with atomics (and a wait-time histogram) read at scrape time.
//!
//! Capacity is a [`tokio::sync::Semaphore`] of `max_size` permits, plus a reserve semaphore a
//! waiter may draw on after `reserve_timeout`. A checked-out object, or one being created, holds
//! a permit; idle objects hold none. The semaphores hand released permits to waiters in arrival
//! order, so waiters are served first-come first-served, and dropping a waiting future leaves the
//! queue without leaking a permit.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

pub mod stats;
pub use stats::{BUCKETS, CloseReason, Histogram, HistogramSnapshot, Snapshot, Stats};

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
}

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

struct Inner<M: Manager> {
    manager: M,
    permits: Semaphore,
    reserve: Semaphore,
    reserve_timeout: Mutex<Duration>,
    idle: Mutex<VecDeque<Box<Slot<M::Object>>>>,
    max_size: AtomicUsize,
    /// Permits to swallow as they come back, after a shrink below the number in use.
    to_forget: AtomicUsize,
    /// Signalled when an object goes back to the idle list (wakes creators that are retrying).
    released: tokio::sync::Notify,
    /// Creators pausing between attempts, waiting on `released`: a release notifies only when
    /// there is one, since `notify_waiters` takes a lock every time.
    retrying: AtomicUsize,
    stats: Stats,
}

impl<M: Manager> Inner<M> {
    /// The most recently released idle object, closed (as `CheckFailed`) if dropped before
    /// it is handed out.
    fn pop_idle(&self) -> Option<PendingSlot<'_, M>> {
        let slot = self.idle.lock().unwrap().pop_back()?;
        Some(PendingSlot {
            slot: Some(slot),
            inner: self,
        })
    }

    /// Counts and hands over an object being closed.
    fn close(&self, object: M::Object, reason: CloseReason) {
        self.stats.closed_one(reason);
        self.manager.closed(object, reason);
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

/// Which semaphore a permit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Main,
    Reserve,
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
                permits: Semaphore::new(max_size),
                reserve: Semaphore::new(reserve_size),
                reserve_timeout: Mutex::new(reserve_timeout),
                idle: Mutex::new(VecDeque::with_capacity(max_size)),
                max_size: AtomicUsize::new(max_size),
                to_forget: AtomicUsize::new(0),
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

    /// The checkout fast path: a free permit and an idle object that passes
    /// [`Manager::quick_check`] at `now`, without waiting and without building the future
    /// `get` is. `None` when that is not possible right now: call [`Pool::get`].
    pub fn try_get(&self, now: Instant) -> Option<Pooled<M>> {
        let inner = &self.inner;
        let permit = inner.permits.try_acquire().ok()?;
        permit.forget();
        let permit = PermitGuard::new(inner, Kind::Main);
        loop {
            // (No idle object: the permit goes back as `permit` drops.)
            let mut pending = inner.pop_idle()?;
            let s = pending.slot.as_mut().expect("just set");
            match inner.manager.quick_check(&mut s.object, &s.meta, now) {
                Some(Ok(())) => {
                    inner.stats.wait_buckets.observe(Duration::ZERO);
                    inner.stats.checkout();
                    return Some(Pooled::new(permit, pending.take()));
                }
                Some(Err(reason)) => {
                    inner.stats.replaced.fetch_add(1, Relaxed);
                    pending.close(reason);
                }
                None => {
                    // Needs the full check: back where it was, for `get`.
                    inner.idle.lock().unwrap().push_back(pending.take());
                    return None;
                }
            }
        }
    }

    async fn get_inner(
        &self,
        timeout: Duration,
        retry: bool,
    ) -> Result<Pooled<M>, GetError<M::Error>> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + timeout);
        let inner = &self.inner;
        let permit = match self.acquire(start, deadline).await {
            Ok(p) => p,
            Err(e) => return Err(e),
        };
        let mut attempt = 0;
        let mut last_error = None;
        loop {
            // An idle object, checked before use. After a failed health check the rest are
            // likely as stale (a failover, say): create instead of checking them one by one.
            if let Some(got) = self.take_idle(&permit, start, deadline).await {
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

    /// Takes an idle object that passes its check, or `None` if there is none worth using.
    async fn take_idle(
        &self,
        _permit: &PermitGuard<M>,
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

    /// Waits for a permit: the main pool first, the reserve too once `reserve_timeout` passed.
    async fn acquire(
        &self,
        start: Instant,
        deadline: tokio::time::Instant,
    ) -> Result<PermitGuard<M>, GetError<M::Error>> {
        let inner = &self.inner;
        match inner.permits.try_acquire() {
            Ok(p) => {
                p.forget();
                inner.stats.wait_buckets.observe(Duration::ZERO);
                return Ok(PermitGuard::new(inner, Kind::Main));
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(GetError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        let _queued = Queued::enter(&inner.stats);
        inner.stats.waited.fetch_add(1, Relaxed);
        let reserve_at =
            tokio::time::Instant::from_std(start + *inner.reserve_timeout.lock().unwrap());
        let main = inner.permits.acquire();
        tokio::pin!(main);
        let first = tokio::time::timeout_at(reserve_at.min(deadline), &mut main).await;
        let result = match first {
            Ok(r) => r.map(|p| (p, Kind::Main)),
            Err(_) if reserve_at < deadline => {
                let r = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        biased;
                        p = &mut main => p.map(|p| (p, Kind::Main)),
                        p = inner.reserve.acquire() => p.map(|p| (p, Kind::Reserve)),
                    }
                })
                .await;
                match r {
                    Ok(r) => r,
                    Err(_) => return Err(self.waited_out(start)),
                }
            }
            Err(_) => return Err(self.waited_out(start)),
        };
        let waited = start.elapsed();
        inner.stats.record_wait(waited);
        match result {
            Ok((p, kind)) => {
                p.forget();
                if kind == Kind::Reserve {
                    inner.stats.reserve_used.fetch_add(1, Relaxed);
                }
                Ok(PermitGuard::new(inner, kind))
            }
            Err(_) => Err(GetError::Closed),
        }
    }

    fn waited_out(&self, start: Instant) -> GetError<M::Error> {
        self.inner.stats.record_wait(start.elapsed());
        self.timeout_error(start, None, true)
    }

    /// `queued`: whether this caller is still counted among the waiters.
    fn timeout_error(
        &self,
        start: Instant,
        last_error: Option<M::Error>,
        queued: bool,
    ) -> GetError<M::Error> {
        self.inner.stats.timeouts.fetch_add(1, Relaxed);
        let waiting = self.inner.stats.waiting.load(Relaxed);
        GetError::Timeout {
            waited: start.elapsed(),
            max_size: self.max_size(),
            queued: if queued {
                waiting.saturating_sub(1)
            } else {
                waiting
            },
            last_error,
        }
    }

    /// Changes the capacity. Growing frees waiters at once; shrinking closes idle objects
    /// first and takes the rest of the reduction from checked-out ones as they come back.
    pub fn resize(&self, new_max: usize) {
        let inner = &self.inner;
        let old = inner.max_size.swap(new_max, Relaxed);
        if new_max > old {
            let grow = new_max - old;
            // Cancel pending shrink debt before adding permits. The closure may run more than
            // once, so it must not mutate anything it captures.
            let debt = inner
                .to_forget
                .fetch_update(Relaxed, Relaxed, |debt| Some(debt - debt.min(grow)))
                .expect("the closure always returns Some");
            inner.permits.add_permits(grow - debt.min(grow));
        } else if new_max < old {
            let shrink = old - new_max;
            let forgotten = inner.permits.forget_permits(shrink);
            inner.to_forget.fetch_add(shrink - forgotten, Relaxed);
            self.trim_idle();
        }
    }

    /// Closes idle objects beyond what the capacity allows.
    fn trim_idle(&self) {
        let inner = &self.inner;
        let max = inner.max_size.load(Relaxed);
        let mut removed = Vec::new();
        {
            let mut idle = inner.idle.lock().unwrap();
            while inner.stats.size.load(Relaxed) - removed.len() > max {
                match idle.pop_front() {
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
            let Ok(p) = inner.permits.try_acquire() else {
                break;
            };
            p.forget();
            let guard = PermitGuard::new(inner, Kind::Main);
            let object = inner.manager.create().await.inspect_err(|_| {
                inner.stats.create_errors.fetch_add(1, Relaxed);
            })?;
            inner.stats.created_one();
            if inner.permits.is_closed() {
                inner.close(object, CloseReason::PoolClosed);
                break;
            }
            let now = Instant::now();
            let meta = Meta {
                created: now,
                last_used: now,
                uses: 0,
            };
            inner
                .idle
                .lock()
                .unwrap()
                .push_back(Box::new(Slot { object, meta }));
            inner.released.notify_waiters();
            drop(guard);
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
            let mut idle = inner.idle.lock().unwrap();
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
        self.inner.permits.close();
        self.inner.reserve.close();
        self.reap(0, |_, _| Verdict::Close(CloseReason::PoolClosed));
    }

    pub fn is_closed(&self) -> bool {
        self.inner.permits.is_closed()
    }

    pub fn snapshot(&self) -> Snapshot {
        let idle = self.inner.idle.lock().unwrap().len();
        self.inner.stats.snapshot(idle, self.max_size())
    }
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

/// Counts a waiter for as long as it is queued, however the wait ends.
struct Queued<'a>(&'a Stats);

impl<'a> Queued<'a> {
    fn enter(stats: &'a Stats) -> Self {
        stats.waiting.fetch_add(1, Relaxed);
        Queued(stats)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
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
}

impl<M: Manager> Drop for PermitGuard<M> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.kind == Kind::Reserve {
            self.inner.stats.reserve_used.fetch_sub(1, Relaxed);
            self.inner.reserve.add_permits(1);
            return;
        }
        let paid = self
            .inner
            .to_forget
            .fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1))
            .is_ok();
        if !paid {
            self.inner.permits.add_permits(1);
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
        let inner = &self.permit.inner;
        let verdict = inner.manager.on_release(&mut slot.object, &slot.meta);
        // Over capacity (after a shrink, or with the reserve in use), an object is closed
        // unless a client is waiting for one: closing it would only make that client open
        // another. The reaper trims the excess once it is idle.
        let over = inner.stats.size.load(Relaxed) > inner.max_size.load(Relaxed)
            && inner.stats.waiting.load(Relaxed) == 0;
        let reason = match verdict {
            Err(reason) => reason,
            Ok(()) if inner.permits.is_closed() => CloseReason::PoolClosed,
            Ok(()) if over => CloseReason::Shrink,
            Ok(()) => {
                inner.idle.lock().unwrap().push_back(slot);
                if inner.retrying.load(SeqCst) > 0 {
                    inner.released.notify_waiters();
                }
                // The permit guard drops with `self`, after the object is back in the idle
                // list, so a waiter woken by it finds the object.
                return;
            }
        };
        inner.close(slot.object, reason);
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
