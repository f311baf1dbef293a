//! Client connection limits: globally (`proxy.max_client_conn`), per database and per user.
//! A slot is held for the life of a client connection and given back on drop. The slots also
//! count each worker thread's clients, which decides where an accepted client is served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Counts by name, hashed with foldhash (seeded per map) rather than SipHash: the map is
/// touched at every login, a name is counted only once its client has logged in, and there are
/// at most `max_client_conn` of them.
type Counts = HashMap<Arc<str>, usize, foldhash::fast::RandomState>;

#[derive(Debug)]
pub struct ClientCounts {
    total: AtomicUsize,
    /// Clients on each worker thread, by [`crate::workers::current`]: a slot is counted, when
    /// its client is accepted, on the worker [`ClientCounts::worker_for`] picks to serve it,
    /// moved with the session ([`ClientSlot::move_to`]), and given back from the count of the
    /// worker that serves the client last.
    by_worker: Box<[AtomicUsize]>,
    by_database: Mutex<Counts>,
    by_user: Mutex<Counts>,
    last_refusal_log: Mutex<Option<std::time::Instant>>,
}

/// Which limit refused a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Global { max: u32 },
    Database { name: String, max: u32 },
    User { name: String, max: u32 },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Global { max } => write!(
                f,
                "no more connections allowed (proxy.max_client_conn = {max})"
            ),
            Refused::Database { name, max } => {
                write!(
                    f,
                    "too many connections for database \"{name}\" (databases.{name}.max_client_conn = {max})"
                )
            }
            Refused::User { name, max } => {
                write!(
                    f,
                    "too many connections for user \"{name}\" (users.{name}.max_client_conn = {max})"
                )
            }
        }
    }
}

impl Default for ClientCounts {
    fn default() -> Self {
        ClientCounts::new(1)
    }
}

/// How many more clients than the least busy worker the accepting worker may serve before it
/// hands the clients it accepts to that one (see [`ClientCounts::worker_for`]).
const ACCEPT_SLACK: usize = 16;

/// How many more clients than the least busy worker a worker may serve before its settled
/// sessions move to that one (see [`ClientCounts::settle`]).
const SETTLE_SLACK: usize = 2;

impl ClientCounts {
    /// Counts for a process with `workers` worker threads.
    pub fn new(workers: usize) -> ClientCounts {
        ClientCounts {
            total: AtomicUsize::new(0),
            by_worker: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            by_database: Mutex::default(),
            by_user: Mutex::default(),
            last_refusal_log: Mutex::default(),
        }
    }

    /// The calling thread's worker, as counted here (0 on a thread that is no worker).
    fn this_worker(&self) -> usize {
        crate::workers::current().min(self.by_worker.len() - 1)
    }

    /// Clients served by worker `w` now.
    pub fn on_worker(&self, w: usize) -> usize {
        self.by_worker[w].load(Ordering::Relaxed)
    }

    /// The worker with the fewest clients, and how many it has. A tie goes to the highest,
    /// as worker 0 also accepts, and runs the admin API and maintenance.
    fn least(&self) -> (usize, usize) {
        (0..self.by_worker.len())
            .rev()
            .map(|w| (w, self.on_worker(w)))
            .min_by_key(|&(_, n)| n)
            .expect("at least one worker")
    }

    /// Which worker serves a client that worker `here` accepted: `here` itself, which costs
    /// no wakeup of another thread, unless it already serves [`ACCEPT_SLACK`] more clients
    /// than the worker with the fewest, which then gets it.
    ///
    /// Most clients stay where they are accepted: a client that connects for a transaction or
    /// two is served on one event loop with the others like it, which then finds several
    /// events at each wakeup, where spread over two loops each slept and woke at every step
    /// of a login (pgbench `-C` on two workers: see docs/BENCHMARKS.md, 2026-12-02
    /// 17:25-17:50). Clients that stay are spread out after a few transactions
    /// ([`ClientCounts::settle`]). The slack lets a burst of logins (a thousand clients
    /// connecting at once) start on every worker rather than queue behind one.
    pub fn worker_for(&self, here: usize) -> usize {
        let (least, fewest) = self.least();
        if self.on_worker(here) >= fewest + ACCEPT_SLACK {
            least
        } else {
            here
        }
    }

    /// Where a session on worker `here` that has run a few transactions should go: the
    /// worker with the fewest clients if `here` serves [`SETTLE_SLACK`] more than it, so
    /// that long-lived clients end up spread evenly (a move narrows the gap by two, so
    /// sessions never move back and forth); else none.
    pub fn settle(&self, here: usize) -> Option<usize> {
        let (least, fewest) = self.least();
        (least != here && self.on_worker(here) >= fewest + SETTLE_SLACK).then_some(least)
    }

    /// Takes a slot under the global limit, for a client to be served on `worker`. Taken
    /// when the client is accepted, so the next accept already counts it.
    pub fn enter(self: &Arc<Self>, worker: usize, max: u32) -> Result<ClientSlot, Refused> {
        let worker = worker.min(self.by_worker.len() - 1);
        self.by_worker[worker].fetch_add(1, Ordering::Relaxed);
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        let slot = ClientSlot {
            counts: self.clone(),
            worker: worker as u32,
            database: None,
            user: None,
        };
        if prev >= max as usize {
            return Err(Refused::Global { max });
        }
        Ok(slot)
    }

    /// Whether a refusal may be logged now (at most once a second: a client retrying in a
    /// tight loop must not flood the log).
    pub fn may_log_refusal(&self) -> bool {
        let mut last = self.last_refusal_log.lock().unwrap();
        let ok = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if ok {
            *last = Some(std::time::Instant::now());
        }
        ok
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// A client's place under the limits.
#[derive(Debug)]
pub struct ClientSlot {
    counts: Arc<ClientCounts>,
    /// The worker it is counted on: the one serving the client.
    worker: u32,
    /// The counters' own keys, shared by every slot of that database or user.
    database: Option<Arc<str>>,
    user: Option<Arc<str>>,
}

impl ClientSlot {
    /// The database and user the slot counts against, once logged in: the counters' keys,
    /// for other per-client records to share.
    pub fn names(&self) -> Option<(Arc<str>, Arc<str>)> {
        Some((self.database.clone()?, self.user.clone()?))
    }

    /// The worker the client is counted on.
    pub fn worker(&self) -> usize {
        self.worker as usize
    }

    /// Counts the client on worker `w` from now on: its session is moving there. Called on
    /// the worker it is counted on.
    pub fn move_to(&mut self, w: usize) {
        debug_assert_eq!(
            self.worker as usize,
            self.counts.this_worker(),
            "a client slot moved from another worker than its own"
        );
        let by = &self.counts.by_worker;
        by[w].fetch_add(1, Ordering::Relaxed);
        by[self.worker as usize].fetch_sub(1, Ordering::Relaxed);
        self.worker = w as u32;
    }

    /// Counts the client against its database's and user's limits (0: no own limit).
    pub fn login(
        &mut self,
        database: &str,
        db_max: u32,
        user: &str,
        user_max: u32,
    ) -> Result<(), Refused> {
        {
            let mut by = self.counts.by_database.lock().unwrap();
            let (key, n) = counter(&mut by, database);
            if db_max > 0 && *n >= db_max as usize {
                return Err(Refused::Database {
                    name: database.into(),
                    max: db_max,
                });
            }
            *n += 1;
            self.database = Some(key);
        }
        let mut by = self.counts.by_user.lock().unwrap();
        let (key, n) = counter(&mut by, user);
        if user_max > 0 && *n >= user_max as usize {
            return Err(Refused::User {
                name: user.into(),
                max: user_max,
            });
        }
        *n += 1;
        self.user = Some(key);
        Ok(())
    }
}

/// The count for `name` (added at zero if absent) and the map's key for it, which the slot
/// keeps: no copy of the name per client.
fn counter<'a>(map: &'a mut Counts, name: &str) -> (Arc<str>, &'a mut usize) {
    let key = match map.get_key_value(name) {
        Some((k, _)) => k.clone(),
        None => {
            let k: Arc<str> = Arc::from(name);
            map.insert(k.clone(), 0);
            k
        }
    };
    let n = map.get_mut(name).expect("present above");
    (key, n)
}

fn leave(map: &Mutex<Counts>, key: &str) {
    let mut m = map.lock().unwrap();
    if let Some(n) = m.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            m.remove(key);
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        // Usually on the worker counted, but not always: a session handed to a worker whose
        // runtime has just shut down is dropped where it was accepted.
        self.counts.by_worker[self.worker as usize].fetch_sub(1, Ordering::Relaxed);
        if let Some(d) = &self.database {
            leave(&self.counts.by_database, d);
        }
        if let Some(u) = &self.user {
            leave(&self.counts.by_user, u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_and_release() {
        let c = Arc::new(ClientCounts::default());
        let a = c.enter(0, 2).unwrap();
        let _b = c.enter(0, 2).unwrap();
        assert_eq!(c.enter(0, 2).unwrap_err(), Refused::Global { max: 2 });
        assert_eq!(c.total(), 2, "a refused client does not stay counted");
        drop(a);
        let mut d = c.enter(0, 2).unwrap();
        d.login("app", 1, "alice", 0).unwrap();
        let mut e = c.enter(0, 3).unwrap();
        assert!(matches!(
            e.login("app", 1, "bob", 0),
            Err(Refused::Database { .. })
        ));
        drop(d);
        e.login("app", 1, "bob", 0).unwrap();
    }

    #[test]
    fn worker_0_keeps_clients_until_16_ahead_and_settled_ones_even_out() {
        let c = Arc::new(ClientCounts::new(2));
        let mut slots = Vec::new();
        for n in 0..16 {
            assert_eq!(
                c.worker_for(0),
                0,
                "client {n} stays on the accepting worker"
            );
            slots.push(c.enter(0, 100).unwrap());
        }
        assert_eq!(c.worker_for(0), 1, "16 ahead: the next goes to worker 1");
        // Worker 1 is never asked to move (it has the fewest), worker 0's sessions move
        // until the two are within one of each other.
        assert_eq!(c.settle(1), None);
        let mut moved = 0;
        for s in &mut slots {
            if let Some(w) = c.settle(0) {
                assert_eq!(w, 1);
                s.move_to(w);
                moved += 1;
            }
        }
        assert_eq!(moved, 8);
        assert_eq!((c.on_worker(0), c.on_worker(1)), (8, 8));
        // One ahead is even enough; two ahead is not.
        slots.push(c.enter(0, 100).unwrap());
        assert_eq!(c.settle(0), None);
        slots.push(c.enter(0, 100).unwrap());
        assert_eq!(c.settle(0), Some(1));
        drop(slots);
        assert_eq!((c.on_worker(0), c.on_worker(1), c.total()), (0, 0, 0));
    }
}
