//! Issue 8's lean hot path: once its clients are logged in and its connections open, Weir
//! allocates nothing per transaction, whether a connection is free at once or the client
//! queues for one, in the simple and the extended protocol, through the prepared-statement
//! mapping.
//!
//! Weir runs alone on a thread of its own (one single-threaded runtime, one worker), and the
//! allocator counts what that thread allocates; the clients run on the test's runtime, so
//! what they allocate is not counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio_postgres::types::Type;

use crate::common::*;

/// The system allocator, counting the allocations (and reallocations) made on threads
/// marked with [`count_this_thread`].
pub struct Counting;

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn note() {
    // `try_with`: an allocation while the thread's locals are torn down is not counted.
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count_this_thread() {
    COUNTED.with(|c| c.set(true));
}

/// Weir on a thread of its own, whose allocations are counted.
struct Isolated {
    addr: std::net::SocketAddr,
    shared: Arc<weir_proxy::listener::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Isolated {
    fn start(config: weir_config::Config) -> Isolated {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            count_this_thread();
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
    let before = ALLOCATIONS.load(Relaxed);
    let started = std::time::Instant::now();
    let per_client = 1000;
    run(clients, protocol, per_client).await;
    let allocations = ALLOCATIONS.load(Relaxed) - before;
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
    let weir = Isolated::start(weir_config(pg, &db, 3, PoolMode::Transaction));
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
            "{protocol:?}: {} allocations in {} transactions with a connection free, {} in {} queueing ({} waits)",
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
