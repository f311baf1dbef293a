//! Issue 8's lean hot path and small idle clients, counted by the allocator: once its
//! clients are logged in and its connections open, Weir allocates nothing per transaction,
//! whether a connection is free at once or the client queues for one, in the simple and the
//! extended protocol, through the prepared-statement mapping; and an idle client holds a
//! known handful of allocations.
//!
//! Weir runs alone on a thread of its own (one single-threaded runtime, one worker), and the
//! allocator counts what that thread allocates, for that Weir alone (each test's Weir has
//! counters of its own); the clients run on the test's runtime, so what they allocate is not
//! counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use tokio_postgres::types::Type;

use crate::common::*;

/// The system allocator, counting on each thread marked with [`count_this_thread`] what it
/// allocates and frees.
pub struct Counting;

/// What one Weir's thread allocated.
#[derive(Default)]
struct Counters {
    /// Allocations and reallocations made.
    allocations: AtomicU64,
    /// Allocations not freed yet, and their bytes (as asked for).
    live: AtomicI64,
    live_bytes: AtomicI64,
}

/// One set per test that counts.
static COUNTERS: [Counters; 2] = [const { Counters::new() }; 2];
const STEADY: usize = 0;
const IDLE: usize = 1;

impl Counters {
    const fn new() -> Counters {
        Counters {
            allocations: AtomicU64::new(0),
            live: AtomicI64::new(0),
            live_bytes: AtomicI64::new(0),
        }
    }
}

thread_local! {
    /// The counters of the Weir this thread runs, if any.
    static COUNTED: Cell<Option<usize>> = const { Cell::new(None) };
}

/// `allocated` allocations of `bytes` more live (negative: freed), `made` of them new.
fn note(made: u64, allocated: i64, bytes: i64) {
    // `try_with`: an allocation while the thread's locals are torn down is not counted.
    if let Some(i) = COUNTED.try_with(Cell::get).ok().flatten() {
        let c = &COUNTERS[i];
        c.allocations.fetch_add(made, Relaxed);
        c.live.fetch_add(allocated, Relaxed);
        c.live_bytes.fetch_add(bytes, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(1, 1, layout.size() as i64);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(1, 1, layout.size() as i64);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(1, 0, new_size as i64 - layout.size() as i64);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, -1, -(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count_this_thread(counters: usize) {
    COUNTED.with(|c| c.set(Some(counters)));
}

/// Weir on a thread of its own, whose allocations are counted.
struct Isolated {
    addr: std::net::SocketAddr,
    shared: Arc<weir_proxy::listener::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Isolated {
    /// Starts Weir on a thread whose allocations go to `COUNTERS[counters]`.
    fn start(config: weir_config::Config, counters: usize) -> Isolated {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            count_this_thread(counters);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let workers = weir_proxy::workers::Workers::single();
                let weir = weir_proxy::Proxy::start_on(config, workers)
                    .await
                    .expect("start weir");
                ready_tx
                    .send((weir.local_addr(), weir.shared().clone()))
                    .unwrap();
                let _ = stopped.await;
                weir.stop();
            });
        });
        let (addr, shared) = ready_rx.recv().expect("weir started");
        Isolated {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{db}",
            SCRAM_USER.user,
            SCRAM_USER.password,
            self.addr.ip(),
            self.addr.port()
        )
    }

    fn snapshot(&self) -> weir_pool::Snapshot {
        self.shared.pools.all()[0].pool.snapshot()
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How each client runs its transactions.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    /// A Query message.
    Simple,
    /// Parse, Bind, Describe, Execute, Sync of the unnamed statement (pgbench `-M extended`).
    Unnamed,
    /// Bind, Execute, Sync of a statement prepared once (pgbench `-M prepared`): through
    /// Weir's statement mapping.
    Prepared,
}

/// A client, with its statement prepared once.
type Client = (Arc<tokio_postgres::Client>, tokio_postgres::Statement);

/// Runs `per_client` transactions on each client at once, each checking its answer.
async fn run(clients: &[Client], protocol: Protocol, per_client: i32) {
    let mut tasks = Vec::new();
    for (c, prepared) in clients {
        let (c, prepared) = (c.clone(), prepared.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let got: i32 = match protocol {
                    Protocol::Simple => {
                        let rows = c.simple_query(&format!("select {i} + 1")).await.unwrap();
                        let row = rows.iter().find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                            _ => None,
                        });
                        row.expect("a row").get(0).unwrap().parse().unwrap()
                    }
                    Protocol::Unnamed => c
                        .query_typed("select $1::int4 + 1", &[(&i, Type::INT4)])
                        .await
                        .unwrap()[0]
                        .get(0),
                    Protocol::Prepared => c.query_one(&prepared, &[&i]).await.unwrap().get(0),
                };
                assert_eq!(got, i + 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// What Weir's thread allocated over a measured run.
struct Measured {
    transactions: u64,
    allocations: u64,
    /// Checkouts that queued.
    waited: u64,
    /// Allocations the run may make and still count as none per transaction: what the
    /// maintenance on Weir's thread makes (the pool list it walks each second, and the health
    /// probe every other second: under 10 a second), and one in a thousand transactions.
    allowed: u64,
}

/// Measures a run of `per_client` transactions on each client at once, after a warm-up of
/// the same load (which brings the buffers, the queue and the statement caches to their
/// steady size).
async fn measure(weir: &Isolated, clients: &[Client], protocol: Protocol) -> Measured {
    run(clients, protocol, 300).await;
    let waited_before = weir.snapshot().waited;
    let before = COUNTERS[STEADY].allocations.load(Relaxed);
    let started = std::time::Instant::now();
    let per_client = 1000;
    run(clients, protocol, per_client).await;
    let allocations = COUNTERS[STEADY].allocations.load(Relaxed) - before;
    let seconds = started.elapsed().as_secs() + 1;
    let transactions = clients.len() as u64 * per_client as u64;
    Measured {
        transactions,
        allocations,
        waited: weir.snapshot().waited - waited_before,
        allowed: transactions / 1000 + 10 * seconds,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_transactions_allocate_nothing_whether_or_not_they_queue() {
    let (pg, db) = shared_pg_database("alloc").await;
    // A pool of 3: two clients always find a connection free, even with the health probe
    // holding one.
    let weir = Isolated::start(weir_config(pg, &db, 3, PoolMode::Transaction), STEADY);
    let url = weir.url(&db);
    let mut clients = Vec::new();
    for _ in 0..6 {
        let c = connect(&url).await.unwrap();
        let prepared = c.prepare("select $1::int4 + 1").await.unwrap();
        clients.push((Arc::new(c), prepared));
    }
    let holder = connect(&url).await.unwrap();
    for protocol in [Protocol::Simple, Protocol::Unnamed, Protocol::Prepared] {
        let free = measure(&weir, &clients[..2], protocol).await;
        assert_eq!(
            free.waited, 0,
            "{protocol:?}: two clients on a pool of three queued"
        );
        // One connection held in a transaction: six clients queue for the other two.
        holder.batch_execute("begin; select 1").await.unwrap();
        let queued = measure(&weir, &clients, protocol).await;
        holder.batch_execute("commit").await.unwrap();
        eprintln!(
            "{protocol:?}: {} allocations in {} transactions free, {} in {} queueing ({} waits)",
            free.allocations,
            free.transactions,
            queued.allocations,
            queued.transactions,
            queued.waited
        );
        assert!(
            free.allocations <= free.allowed,
            "{protocol:?}, a connection free: {} allocations in {} transactions",
            free.allocations,
            free.transactions
        );
        // Enough waits that one allocation for each would be far over the allowance.
        assert!(
            queued.waited >= queued.transactions / 10 && queued.waited > 10 * queued.allowed,
            "{protocol:?}: six clients on two connections queued only {} times in {} transactions",
            queued.waited,
            queued.transactions
        );
        assert!(
            queued.allocations <= queued.allowed,
            "{protocol:?}, clients queueing ({} waits): {} allocations in {} transactions",
            queued.waited,
            queued.allocations,
            queued.transactions
        );
    }
}

/// An idle client that has logged in costs its task (1,024 bytes: the live future, at most
/// 864, and Tokio's header), its socket's registration (Tokio's `ScheduledIo`, 128-byte
/// aligned, in an `Arc`: 256), its registry entry (`ConnInfo` in an `Arc`: 184) and its cancel
/// slot (56), and its share of the tables that find it. A client that has run a query, and
/// waited for a connection to do so, keeps four more: its relay's queue of replies owed, its
/// timer (made for the wait, kept for every timeout after), and two allocations of 8 to 15
/// bytes; the wait's box and waiter go back to the thread. Counted as the allocator is asked,
/// over 1,000 clients; docs/BENCHMARKS.md has the resident memory idle clients cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_holds_four_allocations_of_about_1_5_kb() {
    let (pg, db) = shared_pg_database("alloc_idle").await;
    let weir = Isolated::start(weir_config(pg, &db, 2, PoolMode::Transaction), IDLE);
    let url = weir.url(&db);
    let mut clients = Vec::new();
    let live = || {
        let c = &COUNTERS[IDLE];
        (c.live.load(Relaxed), c.live_bytes.load(Relaxed))
    };
    // Allocations and bytes per client since `before`, once a login's or a query's last
    // frees (which may follow its ReadyForQuery) are done: at most `count` a client.
    let n = 1000;
    let settled = |before: (i64, i64), count: f64| async move {
        let mut per_client = (0.0, 0.0);
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let now = live();
            per_client = (
                (now.0 - before.0) as f64 / n as f64,
                (now.1 - before.1) as f64 / n as f64,
            );
            if per_client.0 <= count {
                break;
            }
        }
        per_client
    };
    // The first logins open the pool's connections and size the spare lists.
    for _ in 0..10 {
        clients.push(Arc::new(connect(&url).await.unwrap()));
    }
    clients[0].simple_query("select 1").await.unwrap();
    let before = live();
    for _ in 0..n {
        clients.push(Arc::new(connect(&url).await.unwrap()));
    }
    let idle = settled(before, 4.05).await;
    eprintln!(
        "a client logged in: {:.2} allocations, {:.0} bytes",
        idle.0, idle.1
    );
    assert!(idle.0 <= 4.05, "{:.2} allocations a client", idle.0);
    assert!(idle.1 <= 1600.0, "{:.0} bytes a client", idle.1);

    // Each runs a query, all at once, while a transaction holds one of the two connections:
    // they queue for the other.
    let holder = &clients[1];
    holder.batch_execute("begin; select 1").await.unwrap();
    let waited_before = weir.snapshot().waited;
    let mut queries = Vec::new();
    for c in &clients[10..] {
        let c = c.clone();
        queries.push(tokio::spawn(async move {
            let rows = c.simple_query("select 7").await.unwrap();
            assert!(rows.iter().any(|m| matches!(m,
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("7"))));
        }));
    }
    for q in queries {
        q.await.unwrap();
    }
    holder.batch_execute("commit").await.unwrap();
    let waited = weir.snapshot().waited - waited_before;
    assert!(waited >= n / 2, "only {waited} of {n} clients queued");
    // (Plus what the thread's spare lists keep, a bounded number for all clients: read
    // buffers, wait boxes and waiters, about 0.2 a client here.)
    let used = settled(before, 8.5).await;
    eprintln!(
        "a client after a query that queued ({waited} waits): {:.2} allocations, {:.0} bytes",
        used.0, used.1
    );
    assert!(used.0 <= 8.5, "{:.2} allocations a client", used.0);
}
