//! Pool counters, named once. Monotonic unless named as a gauge; read at scrape time.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds of [`Histogram`] buckets, in seconds (Prometheus style; +Inf is implied).
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// How many shards a [`Histogram`] or [`Counter`] has: one per core, at most 16 (a pool's
/// three histograms and three counters then take 16 x 1,152 bytes, 18 KiB, at most).
fn shard_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 16)
    })
}

/// The calling thread's shard: threads take shards in turn the first time they count. While
/// no more threads count than there are shards (the workers, one per core by default, are
/// the threads that count), each writes a shard of its own; threads beyond that share.
fn this_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        let mine = s.get();
        if mine != usize::MAX {
            return mine;
        }
        let mine = NEXT.fetch_add(1, Relaxed) % shard_count();
        s.set(mine);
        mine
    })
}

/// A shard starting a 128-byte block of its own (adjacent-line prefetch pairs 64-byte lines),
/// so two threads counting at once do not pass one line back and forth between their cores.
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

fn shards<T: Default>(n: usize) -> Box<[Padded<T>]> {
    (0..n).map(|_| Padded::default()).collect()
}

/// Sums without the overflow check of `Iterator::sum` (a counter wraps, as an atomic does).
fn total(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::wrapping_add)
}

/// A lock-free histogram of durations with fixed buckets: one or two atomic adds per
/// observation (the sum is not added to for zero), on the calling thread's shard; a read
/// sums the shards.
pub struct Histogram {
    shards: Box<[Padded<HistogramShard>]>,
}

#[derive(Default)]
struct HistogramShard {
    /// Per bucket (not cumulative); the last counts observations above every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            shards: shards(shard_count()),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Histogram")
            .field("count", &s.count)
            .field("sum", &s.sum)
            .finish()
    }
}

/// A monotonic counter, sharded as [`Histogram`] is: for counts every transaction adds to.
pub struct Counter {
    shards: Box<[Padded<AtomicU64>]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            shards: shards(shard_count()),
        }
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counter({})", self.get())
    }
}

impl Counter {
    pub fn add(&self, n: u64) {
        self.add_on(this_shard(), n);
    }

    fn add_on(&self, shard: usize, n: u64) {
        self.shards[shard].0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        total(self.shards.iter().map(|s| s.0.load(Relaxed)))
    }
}

/// A copy of a [`Histogram`]: cumulative counts per bound, total count, sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// [`BUCKETS`] in microseconds: an observation compares integers, not floats.
pub const BUCKETS_US: [u64; BUCKETS.len()] = {
    let mut us = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        us[i] = (BUCKETS[i] * 1e6 + 0.5) as u64;
        i += 1;
    }
    us
};

/// The bucket `d` falls in, and `d` in microseconds: the first bound at or above it (past the
/// last: the overflow bucket), by binary search: five comparisons where a scan made up to
/// sixteen (queue waits at 1,000 clients land in the tenth bucket or later).
fn bucket_of(d: Duration) -> (usize, u64) {
    let us = d.as_micros().min(u64::MAX as u128) as u64;
    (BUCKETS_US.partition_point(|b| *b < us), us)
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.observe_on(this_shard(), d);
    }

    /// Records `d` here and in `other` with one bucket search and one shard lookup (a request
    /// that was its whole transaction is timed as both).
    pub fn observe_with(&self, other: &Histogram, d: Duration) {
        let (i, us) = bucket_of(d);
        let shard = this_shard();
        self.record(shard, i, us);
        other.record(shard, i, us);
    }

    /// A wait of zero (a checkout served at once): the first bucket, nothing to search.
    pub fn observe_zero(&self) {
        self.shards[this_shard()].0.counts[0].fetch_add(1, Relaxed);
    }

    fn observe_on(&self, shard: usize, d: Duration) {
        let (i, us) = bucket_of(d);
        self.record(shard, i, us);
    }

    fn record(&self, shard: usize, i: usize, us: u64) {
        let shard = &self.shards[shard].0;
        shard.counts[i].fetch_add(1, Relaxed);
        if us > 0 {
            shard.sum_us.fetch_add(us, Relaxed);
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let count_of = |i: usize| total(self.shards.iter().map(|s| s.0.counts[i].load(Relaxed)));
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len());
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += count_of(i);
            buckets.push((*bound, cumulative));
        }
        let count = cumulative + count_of(BUCKETS.len());
        let sum_us = total(self.shards.iter().map(|s| s.0.sum_us.load(Relaxed)));
        HistogramSnapshot {
            buckets,
            count,
            sum: sum_us as f64 / 1e6,
        }
    }
}

/// Why an object was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Found closed by its peer (at checkout or while idle).
    Dead,
    /// Failed the check before reuse.
    CheckFailed,
    /// Idle longer than the idle timeout.
    IdleTimeout,
    /// Older than its lifetime.
    Lifetime,
    /// Served its maximum number of uses.
    MaxUses,
    /// Dropped by its user without release: broken, or not clean enough to reuse.
    Broken,
    /// Over capacity after a shrink, or a reserve object no longer needed.
    Shrink,
    /// The pool was closed.
    PoolClosed,
    /// Closed to make room for another pool of the same server.
    Evicted,
    /// Closed on purpose by an operator (pause, reconnect, kill).
    Drained,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Dead,
        CloseReason::CheckFailed,
        CloseReason::IdleTimeout,
        CloseReason::Lifetime,
        CloseReason::MaxUses,
        CloseReason::Broken,
        CloseReason::Shrink,
        CloseReason::PoolClosed,
        CloseReason::Evicted,
        CloseReason::Drained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Dead => "dead",
            CloseReason::CheckFailed => "check_failed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Lifetime => "lifetime",
            CloseReason::MaxUses => "max_uses",
            CloseReason::Broken => "broken",
            CloseReason::Shrink => "shrink",
            CloseReason::PoolClosed => "pool_closed",
            CloseReason::Evicted => "evicted",
            CloseReason::Drained => "drained",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters for one pool.
#[derive(Debug)]
pub struct Stats {
    /// Sharded: every transaction in transaction mode adds one.
    pub checkouts: Counter,
    /// Checkouts that found no free permit and queued.
    pub waited: AtomicU64,
    /// Microseconds spent queued, summed.
    pub wait_us: AtomicU64,
    pub timeouts: AtomicU64,
    pub created: AtomicU64,
    pub create_errors: AtomicU64,
    /// Creates tried again after a failure.
    pub retries: AtomicU64,
    /// Idle objects that failed their check at checkout and were replaced unseen.
    pub replaced: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    /// Gauge: clients queued right now.
    pub waiting: AtomicUsize,
    /// Gauge: objects that exist (idle + checked out).
    pub size: AtomicUsize,
    /// Gauge: checkouts holding a reserve permit.
    pub reserve_used: AtomicUsize,
    /// Queue waits, in microseconds (only checkouts that queued).
    waits: Mutex<hdrhistogram::Histogram<u64>>,
    /// Every checkout's wait (zero when it did not queue), for export.
    pub wait_buckets: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            checkouts: Counter::default(),
            waited: AtomicU64::new(0),
            wait_us: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            created: AtomicU64::new(0),
            create_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
            closed: Default::default(),
            waiting: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
            reserve_used: AtomicUsize::new(0),
            waits: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("valid bounds"),
            ),
            wait_buckets: Histogram::default(),
        }
    }
}

impl Stats {
    pub(crate) fn checkout(&self) {
        self.checkouts.add(1);
    }

    pub(crate) fn created_one(&self) {
        self.created.fetch_add(1, Relaxed);
        self.size.fetch_add(1, Relaxed);
    }

    pub(crate) fn closed_one(&self, reason: CloseReason) {
        self.size.fetch_sub(1, Relaxed);
        self.closed[reason.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn record_wait(&self, d: Duration) {
        let us = d.as_micros() as u64;
        self.wait_us.fetch_add(us, Relaxed);
        self.wait_buckets.observe(d);
        self.waits.lock().unwrap().saturating_record(us.max(1));
    }

    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].load(Relaxed)
    }

    /// Wait time at quantile `q` over every checkout, those that did not queue counting as
    /// zero.
    pub fn wait_quantile(&self, q: f64) -> Duration {
        let h = self.waits.lock().unwrap();
        let queued = h.len();
        let total = self.checkouts.get() + self.timeouts.load(Relaxed);
        if queued == 0 || total == 0 {
            return Duration::ZERO;
        }
        let share = (queued as f64 / total as f64).min(1.0);
        if q <= 1.0 - share {
            return Duration::ZERO;
        }
        let inner_q = ((q - (1.0 - share)) / share).clamp(0.0, 1.0);
        Duration::from_micros(h.value_at_quantile(inner_q))
    }

    pub(crate) fn snapshot(&self, idle: usize, max_size: usize) -> Snapshot {
        let size = self.size.load(Relaxed);
        Snapshot {
            checkouts: self.checkouts.get(),
            waited: self.waited.load(Relaxed),
            wait_us: self.wait_us.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            created: self.created.load(Relaxed),
            create_errors: self.create_errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            replaced: self.replaced.load(Relaxed),
            closed: CloseReason::ALL.map(|r| self.closed(r)).iter().sum(),
            waiting: self.waiting.load(Relaxed),
            size,
            idle,
            active: size.saturating_sub(idle),
            max_size,
            reserve_used: self.reserve_used.load(Relaxed),
        }
    }
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
    pub retries: u64,
    pub replaced: u64,
    /// Closed for any reason (see [`Stats::closed`] for each).
    pub closed: u64,
    pub waiting: usize,
    pub size: usize,
    pub idle: usize,
    pub active: usize,
    pub max_size: usize,
    pub reserve_used: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_bounds_match_the_published_ones() {
        for (us, secs) in BUCKETS_US.iter().zip(BUCKETS) {
            assert_eq!(*us as f64 / 1e6, secs);
        }
        // A bound is inclusive, as Prometheus's `le` is.
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_micros(501));
        let s = h.snapshot();
        assert_eq!(s.buckets[1], (0.0005, 1));
        assert_eq!(s.buckets[2], (0.001, 2));
    }

    #[test]
    fn the_shortcuts_record_what_observe_does() {
        let (plain, a, b) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for us in [0, 7, 100, 101, 2_500, 90_000_000] {
            let d = Duration::from_micros(us);
            plain.observe(d);
            a.observe_with(&b, d);
        }
        plain.observe(Duration::ZERO);
        a.observe_zero();
        b.observe_zero();
        let want = plain.snapshot();
        assert_eq!(want.count, 7);
        assert_eq!(a.snapshot(), want);
        assert_eq!(b.snapshot(), want);
    }

    #[test]
    fn a_read_sums_every_shard() {
        // Four shards whatever this machine's core count.
        let h = Histogram { shards: shards(4) };
        let c = Counter { shards: shards(4) };
        for shard in 0..4 {
            h.observe_on(shard, Duration::from_micros(50 + shard as u64));
            c.add_on(shard, 10 << shard);
        }
        let s = h.snapshot();
        assert_eq!((s.count, s.buckets[0]), (4, (0.0001, 4)));
        assert!((s.sum - 0.000206).abs() < 1e-12, "sum {}", s.sum);
        assert_eq!(c.get(), 10 + 20 + 40 + 80);
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let h = Histogram::default();
        let c = Counter::default();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (h, c) = (&h, &c);
                s.spawn(move || {
                    for _ in 0..10_000 {
                        h.observe(Duration::from_micros(t * 1000));
                        c.add(t + 1);
                    }
                });
            }
        });
        let snap = h.snapshot();
        assert_eq!(snap.count, 40_000);
        // 0, 1, 2 and 3 ms, 10,000 times each.
        assert!((snap.sum - 60.0).abs() < 1e-9, "sum {}", snap.sum);
        assert_eq!(snap.buckets[0], (0.0001, 10_000), "the 0 ms observations");
        assert_eq!(c.get(), 10_000 * (1 + 2 + 3 + 4));
    }

    #[test]
    fn a_thread_keeps_its_shard_and_threads_take_them_in_turn() {
        let mine = this_shard();
        assert!(mine < shard_count());
        assert_eq!(this_shard(), mine);
        // Threads started one after another take consecutive shards, unless other tests'
        // threads take some in between: so, over four times as many threads as there are
        // shards, more than one shard when there is more than one.
        let taken: std::collections::HashSet<usize> = (0..4 * shard_count())
            .map(|_| std::thread::spawn(this_shard).join().unwrap())
            .collect();
        assert!(taken.iter().all(|&s| s < shard_count()));
        assert_eq!(
            taken.len() > 1,
            shard_count() > 1,
            "shards taken: {taken:?}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets.iter().find(|(b, _)| *b == 0.005).unwrap().1, 2);
        assert_eq!(s.buckets.last().unwrap().1, 2, "60 s is above every bound");
        assert!((s.sum - 60.00305).abs() < 1e-6);
    }
}
