//! A generic async pool.
//!
//! Layout (public API, behaviour and locked state kept apart):
//! - [`Pool`] (this file): checkout, release, resize, statistics.
//! - [`Pooled`]: the RAII guard for a checked-out object. Dropping it *discards* the object;
//!   only [`Pooled::release`] puts it back. A task cancelled mid-transaction therefore can never
//!   return a dirty object to the pool.
//! - [`Stats`] / [`Snapshot`]: counters kept with atomics and read at scrape time.
//!
//! Capacity is a [`tokio::sync::Semaphore`] of `max_size` permits: a checked-out object, or
//! one being created, holds a permit; idle objects hold none. The semaphore hands released
//! permits to waiters in arrival order, so waiters are served first-come first-served, and
//! dropping a waiting future leaves the queue without leaking a permit.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// Creates and checks the pooled objects.
pub trait Manager: Send + Sync + 'static {
    type Object: Send + 'static;
    type Error: Send + 'static;

    /// Opens a new object. Called with a permit held, so at most `max_size` exist.
    fn create(&self) -> impl Future<Output = Result<Self::Object, Self::Error>> + Send;

    /// A cheap, synchronous check of an idle object about to be handed out. `false` discards
    /// it and the checkout tries the next one.
    fn is_usable(&self, _object: &mut Self::Object, _meta: &Meta) -> bool {
        true
    }
}

/// Facts about a pooled object that lifetime policies need.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub created: Instant,
    pub last_used: Instant,
    /// Completed checkouts.
    pub uses: u64,
}

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
    },
    #[error("pool is closed")]
    Closed,
    #[error("could not create a connection")]
    Create(#[source] E),
}

/// Counters for one pool. Monotonic unless named as a gauge.
#[derive(Debug, Default)]
pub struct Stats {
    pub checkouts: AtomicU64,
    /// Checkouts that found no free permit and queued.
    pub waited: AtomicU64,
    /// Microseconds spent queued, summed.
    pub wait_us: AtomicU64,
    pub timeouts: AtomicU64,
    pub created: AtomicU64,
    pub create_errors: AtomicU64,
    /// Objects discarded: failed `is_usable`, dropped without release, or trimmed on shrink.
    pub closed: AtomicU64,
    /// Gauge: clients queued right now.
    pub waiting: AtomicUsize,
    /// Gauge: objects that exist (idle + checked out).
    pub size: AtomicUsize,
}

/// A point-in-time copy of the counters and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub checkouts: u64,
    pub waited: u64,
    pub wait_us: u64,
    pub timeouts: u64,
    pub created: u64,
    pub create_errors: u64,
    pub closed: u64,
    pub waiting: usize,
    pub size: usize,
    pub idle: usize,
    pub active: usize,
    pub max_size: usize,
}

struct Inner<M: Manager> {
    manager: M,
    permits: Semaphore,
    idle: Mutex<VecDeque<Slot<M::Object>>>,
    max_size: AtomicUsize,
    /// Permits to swallow as they come back, after a shrink below the number in use.
    to_forget: AtomicUsize,
    stats: Stats,
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

impl<M: Manager> Pool<M> {
    pub fn new(manager: M, max_size: usize) -> Self {
        Pool {
            inner: Arc::new(Inner {
                manager,
                permits: Semaphore::new(max_size),
                idle: Mutex::new(VecDeque::with_capacity(max_size)),
                max_size: AtomicUsize::new(max_size),
                to_forget: AtomicUsize::new(0),
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

    /// Checks out an object, waiting up to `timeout` for capacity. Cancel-safe: dropping the
    /// future at any point leaks neither a permit nor an object.
    pub async fn get(&self, timeout: Duration) -> Result<Pooled<M>, GetError<M::Error>> {
        let inner = &self.inner;
        match inner.permits.try_acquire() {
            Ok(p) => p.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(GetError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let start = Instant::now();
                let _queued = Queued::enter(&inner.stats);
                inner.stats.waited.fetch_add(1, Relaxed);
                let res = tokio::time::timeout(timeout, inner.permits.acquire()).await;
                let waited = start.elapsed();
                inner
                    .stats
                    .wait_us
                    .fetch_add(waited.as_micros() as u64, Relaxed);
                match res {
                    Ok(Ok(p)) => p.forget(),
                    Ok(Err(_)) => return Err(GetError::Closed),
                    Err(_) => {
                        inner.stats.timeouts.fetch_add(1, Relaxed);
                        return Err(GetError::Timeout {
                            waited,
                            max_size: self.max_size(),
                            queued: inner.stats.waiting.load(Relaxed).saturating_sub(1),
                        });
                    }
                }
            }
        }
        // One permit is ours from here; the guard gives it back unless it moves into a Pooled.
        let permit = PermitGuard {
            inner: inner.clone(),
            armed: true,
        };
        loop {
            let slot = inner.idle.lock().unwrap().pop_back();
            let Some(mut slot) = slot else { break };
            if inner.manager.is_usable(&mut slot.object, &slot.meta) {
                inner.stats.checkouts.fetch_add(1, Relaxed);
                return Ok(Pooled::new(permit, slot));
            }
            inner.stats.size.fetch_sub(1, Relaxed);
            inner.stats.closed.fetch_add(1, Relaxed);
        }
        let object = match inner.manager.create().await {
            Ok(o) => o,
            Err(e) => {
                inner.stats.create_errors.fetch_add(1, Relaxed);
                return Err(GetError::Create(e));
            }
        };
        inner.stats.created.fetch_add(1, Relaxed);
        inner.stats.size.fetch_add(1, Relaxed);
        inner.stats.checkouts.fetch_add(1, Relaxed);
        let now = Instant::now();
        Ok(Pooled::new(
            permit,
            Slot {
                object,
                meta: Meta {
                    created: now,
                    last_used: now,
                    uses: 0,
                },
            },
        ))
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
        let mut idle = inner.idle.lock().unwrap();
        while inner.stats.size.load(Relaxed) > max {
            if idle.pop_front().is_none() {
                break;
            }
            inner.stats.size.fetch_sub(1, Relaxed);
            inner.stats.closed.fetch_add(1, Relaxed);
        }
    }

    /// Removes idle objects for which `keep` says false (idle timeout, lifetime, dead).
    /// Returns how many were removed. The objects are dropped outside the lock.
    pub fn retain_idle(&self, mut keep: impl FnMut(&mut M::Object, &Meta) -> bool) -> usize {
        let removed: Vec<Slot<M::Object>> = {
            let mut idle = self.inner.idle.lock().unwrap();
            let mut removed = Vec::new();
            let mut i = 0;
            while i < idle.len() {
                let slot = &mut idle[i];
                if keep(&mut slot.object, &slot.meta) {
                    i += 1;
                } else {
                    removed.extend(idle.remove(i));
                }
            }
            removed
        };
        let n = removed.len();
        self.inner.stats.size.fetch_sub(n, Relaxed);
        self.inner.stats.closed.fetch_add(n as u64, Relaxed);
        n
    }

    /// Closes the pool: current and future waiters get [`GetError::Closed`]; idle objects are
    /// dropped. Checked-out objects are discarded as they come back.
    pub fn close(&self) {
        self.inner.permits.close();
        self.retain_idle(|_, _| false);
    }

    pub fn is_closed(&self) -> bool {
        self.inner.permits.is_closed()
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = &self.inner.stats;
        let idle = self.inner.idle.lock().unwrap().len();
        let size = s.size.load(Relaxed);
        Snapshot {
            checkouts: s.checkouts.load(Relaxed),
            waited: s.waited.load(Relaxed),
            wait_us: s.wait_us.load(Relaxed),
            timeouts: s.timeouts.load(Relaxed),
            created: s.created.load(Relaxed),
            create_errors: s.create_errors.load(Relaxed),
            closed: s.closed.load(Relaxed),
            waiting: s.waiting.load(Relaxed),
            size,
            idle,
            active: size.saturating_sub(idle),
            max_size: self.max_size(),
        }
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

/// Owns one permit and gives it back on drop (or swallows it to pay shrink debt).
struct PermitGuard<M: Manager> {
    inner: Arc<Inner<M>>,
    armed: bool,
}

impl<M: Manager> Drop for PermitGuard<M> {
    fn drop(&mut self) {
        if !self.armed {
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
    slot: Option<Slot<M::Object>>,
    permit: PermitGuard<M>,
}

impl<M: Manager> Pooled<M> {
    fn new(permit: PermitGuard<M>, slot: Slot<M::Object>) -> Self {
        Pooled {
            slot: Some(slot),
            permit,
        }
    }

    pub fn meta(&self) -> &Meta {
        &self.slot.as_ref().expect("present until consumed").meta
    }

    /// Puts the object back as idle. Only call this when it is clean enough for any user.
    pub fn release(mut self) {
        let mut slot = self.slot.take().expect("present until consumed");
        slot.meta.uses += 1;
        slot.meta.last_used = Instant::now();
        let inner = &self.permit.inner;
        let over = inner.stats.size.load(Relaxed) > inner.max_size.load(Relaxed);
        if over || inner.permits.is_closed() {
            inner.stats.size.fetch_sub(1, Relaxed);
            inner.stats.closed.fetch_add(1, Relaxed);
            drop(slot);
        } else {
            inner.idle.lock().unwrap().push_back(slot);
        }
        // The permit guard drops with `self`, after the object is back in the idle list, so a
        // waiter woken by it finds the object.
    }

    /// Closes the object instead of returning it.
    pub fn discard(self) {
        drop(self)
    }
}

impl<M: Manager> Drop for Pooled<M> {
    fn drop(&mut self) {
        if self.slot.take().is_some() {
            let stats = &self.permit.inner.stats;
            stats.size.fetch_sub(1, Relaxed);
            stats.closed.fetch_add(1, Relaxed);
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
