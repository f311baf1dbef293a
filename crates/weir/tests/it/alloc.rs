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

/// Allocations on Weir's thread per transaction over a measured run, after a warm-up of the
/// same load (which fills the buffers, the queue and the statement caches to their steady
/// size).
async fn allocations_per_transaction(
    weir: &Isolated,
    clients: &[Client],
    protocol: Protocol,
) -> (f64, u64) {
    run(clients, protocol, 300).await;
    let waited_before = weir.snapshot().waited;
    let before = ALLOCATIONS.load(Relaxed);
    let per_client = 1000;
    run(clients, protocol, per_client).await;
    let allocations = ALLOCATIONS.load(Relaxed) - before;
    let waited = weir.snapshot().waited - waited_before;
    let transactions = clients.len() as f64 * per_client as f64;
    (allocations as f64 / transactions, waited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_transactions_allocate_nothing_whether_or_not_they_queue() {
    let (pg, db) = shared_pg_database("alloc").await;
    // A pool of 2: two clients always find a connection free, six queue for one.
    let weir = Isolated::start(weir_config(pg, &db, 2, PoolMode::Transaction));
    let url = weir.url(&db);
    let mut clients = Vec::new();
    for _ in 0..6 {
        let c = connect(&url).await.unwrap();
        let prepared = c.prepare("select $1::int4 + 1").await.unwrap();
        clients.push((Arc::new(c), prepared));
    }
    // Room for a stray allocation of the maintenance that runs on the same thread, not for
    // one in a hundred transactions.
    let limit = 0.001;
    for protocol in [Protocol::Simple, Protocol::Unnamed, Protocol::Prepared] {
        let (free, waited) = allocations_per_transaction(&weir, &clients[..2], protocol).await;
        assert!(
            free <= limit,
            "{protocol:?}, a connection free: {free:.3} allocations per transaction"
        );
        assert_eq!(
            waited, 0,
            "{protocol:?}: two clients on a pool of two queued"
        );
        let (queued, waited) = allocations_per_transaction(&weir, &clients, protocol).await;
        eprintln!(
            "{protocol:?}: {free:.4} allocations per transaction with a connection free, {queued:.4} queueing ({waited} waits in 6,000)"
        );
        assert!(
            waited >= 1000,
            "{protocol:?}: six clients on a pool of two queued only {waited} times"
        );
        assert!(
            queued <= limit,
            "{protocol:?}, clients queueing ({waited} waits): {queued:.3} allocations per transaction"
        );
    }
}
