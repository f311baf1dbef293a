//! What a sharded counter saves when threads count at once: `cargo run --release -p
//! weir-pool --example shards`. Times a histogram observation and a counter add from one
//! thread and from two at once, against one set of counters all threads add to (as
//! `Histogram` was before it was sharded). Durations are 0-1,023 us, so one in 1,024 is zero.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use weir_pool::{BUCKETS, BUCKETS_US, Counter, Histogram};

/// One set of counters for every thread, observed as `Histogram` did before the shards.
struct Unsharded {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Unsharded {
    fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// Nanoseconds per call of `f`, each of `threads` threads calling it `n` times at once.
fn per_call(threads: usize, n: u64, f: impl Fn(u64) + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| (0..n).for_each(&f));
        }
    });
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let n = 10_000_000;
    let d = |i: u64| Duration::from_micros(i & 1023);
    for round in 1..=3 {
        let unsharded = Unsharded {
            counts: Default::default(),
            sum_us: AtomicU64::new(0),
        };
        let sharded = Histogram::default();
        let one = AtomicU64::new(0);
        let counter = Counter::default();
        println!(
            "round {round}, ns per call: observe, 1 thread: {:.1} unsharded, {:.1} sharded; \
             observe, 2 threads at once: {:.1} unsharded, {:.1} sharded; \
             add, 2 threads at once: {:.1} one atomic, {:.1} sharded",
            per_call(1, n, |i| unsharded.observe(d(i))),
            per_call(1, n, |i| sharded.observe(d(i))),
            per_call(2, n, |i| unsharded.observe(d(i))),
            per_call(2, n, |i| sharded.observe(d(i))),
            per_call(2, n, |i| {
                one.fetch_add(i, Relaxed);
            }),
            per_call(2, n, |i| counter.add(i)),
        );
    }
}
