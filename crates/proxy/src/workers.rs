//! Worker threads, one per core by default (`proxy.workers`). Each runs a single-threaded
//! Tokio runtime and serves its clients: a client's session, and the server connection it
//! holds for a transaction, run on one thread at a time, and change thread only between
//! transactions (see below), so the hot path pays for no work stealing and no wakeup
//! crossing threads. (Tokio's multi-threaded scheduler with two threads cost 15-20% more
//! CPU per transaction here than one single-threaded runtime, in user and kernel time both.)
//!
//! Server connections are shared between workers through the pools. A checkout prefers a
//! connection registered with the caller's worker, a release hands its connection to a
//! waiter on the same worker when one is near the front of the queue, and a connection that
//! does change worker is registered with the new one before use
//! ([`crate::stream::Stream::rehome`]), so its replies wake the thread that waits for them.
//!
//! The calling thread's runtime is worker 0. It accepts every client, and serves the ones it
//! accepts unless it already serves many more than another worker
//! ([`crate::limits::ClientCounts::worker_for`]): a client that connects for a transaction or
//! two then costs no wakeup of a second thread, and one event loop serves all such clients
//! together, waking once for several of their events. A client that stays moves, between
//! two transactions, to the worker with the fewest clients if its own serves two more
//! ([`crate::limits::ClientCounts::settle`]): its session ends its task and continues in a
//! new one on that worker, its sockets registered there (in session mode, with the server
//! connection it keeps). So long-lived clients end up spread evenly. Worker 0 also runs the
//! admin API and maintenance.

use std::cell::Cell;
use std::io;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The worker the calling thread is: 0 on any thread that is not one of the extra workers
/// (worker 0 is the thread that started them; tests run everything there).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The worker runtimes, and the threads of all but the first.
#[derive(Debug)]
pub struct Workers {
    /// `handles[0]` is the runtime of the thread that started the others.
    handles: Vec<Handle>,
    stop: Mutex<Vec<tokio::sync::oneshot::Sender<()>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Ticks every second, for ever, so that this worker's timer wheel is never empty.
///
/// Tokio's timer records, when its thread parks, the time of the earliest timer as the time it
/// promised to wake; a timer set for earlier than that makes it write to the runtime's eventfd,
/// even from its own thread while it runs, so that a sleeping driver would look again. With
/// no timer at all there is no promise, and every new timer makes that write: a `write` and
/// an `epoll_wait` that returns at once. A worker with no clients but the ones arriving (a new
/// connection per transaction, whose login timeout is its one timer) then pays both for
/// about every other connection: `strace -c` counted 0.42 such writes per connection on
/// worker 1 under `pgbench -C -c 10`, and almost none on worker 0, whose maintenance ticks
/// every second. With the next tick at most a second away, only a timer set for earlier than
/// that tick (some of the time, a `query_timeout` under a second) still makes the write. The
/// tick pays it once a second itself: it is set again just after the wheel was looked at
/// without it.
async fn keep_timer_armed() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl Workers {
    /// One worker: the calling thread's runtime (must be called inside one).
    pub fn single() -> Arc<Workers> {
        Arc::new(Workers {
            handles: vec![Handle::current()],
            stop: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// `n` workers: the calling thread's runtime and `n - 1` threads, each with a
    /// single-threaded runtime of its own. Must be called inside a runtime.
    pub fn start(n: usize) -> io::Result<Arc<Workers>> {
        let mut handles = vec![Handle::current()];
        let mut stop = Vec::new();
        let mut threads = Vec::new();
        for i in 1..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop.push(tx);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("weir-worker-{i}"))
                    .spawn(move || {
                        CURRENT.with(|c| c.set(i));
                        rt.block_on(async {
                            tokio::select! {
                                _ = rx => {}
                                _ = keep_timer_armed() => {}
                            }
                        });
                        // Dropping the runtime drops the sessions still on it: their
                        // server connections are discarded, their clients disconnected.
                    })?,
            );
        }
        Ok(Arc::new(Workers {
            handles,
            stop: Mutex::new(stop),
            threads: Mutex::new(threads),
        }))
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `task` on worker `w`: on the calling runtime's own queue when that is worker `w`,
    /// else through worker `w`'s runtime, waking it.
    pub fn spawn<F>(&self, w: usize, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if w == current() {
            tokio::spawn(task)
        } else {
            self.handles[w].spawn(task)
        }
    }

    /// Ends the worker threads (after the proxy has stopped), waiting for them to finish.
    pub fn stop(&self) {
        for tx in self.stop.lock().unwrap().drain(..) {
            let _ = tx.send(());
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}
