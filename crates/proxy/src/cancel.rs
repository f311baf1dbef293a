//! Cancel keys. Each client gets Weir's own key; while it holds a server connection its slot
//! points at that server's key, so a CancelRequest reaches only the query of that client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use weir_wire::backend::BackendKey;
use weir_wire::frontend::CancelKey;

use crate::server::ServerAddr;

/// Where a client's running query can be cancelled.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: Arc<ServerAddr>,
    pub key: BackendKey,
}

#[derive(Debug)]
struct Slot {
    secret: i32,
    target: Mutex<Held>,
}

/// The last server a client ran on, and whether it runs there now. The target is kept
/// between transactions, so that attaching to a server of the same address again (nearly
/// every transaction) neither clones nor drops the address's `Arc`: its count is shared by
/// every client of the pool, on every worker, and an add and a subtract on it per
/// transaction would pass its cache line between the cores. (So an idle client keeps the
/// address of its last server alive, a few bytes, until it attaches elsewhere or leaves.)
#[derive(Debug, Default)]
struct Held {
    last: Option<CancelTarget>,
    running: bool,
}

#[derive(Debug)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<i32, Arc<Slot>>>,
    next_pid: AtomicI32,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        CancelRegistry {
            slots: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(rand::RngExt::random_range(&mut rand::rng(), 1..1 << 30)),
        }
    }
}

impl CancelRegistry {
    /// Issues a fresh key for a client. The slot is removed when the registration drops.
    pub fn register(self: &Arc<Self>) -> Registration {
        let secret: i32 = rand::RngExt::random(&mut rand::rng());
        let slot = Arc::new(Slot {
            secret,
            target: Mutex::new(Held::default()),
        });
        let mut slots = self.slots.lock().unwrap();
        let pid = loop {
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if pid != 0 && !slots.contains_key(&pid) {
                break pid;
            }
        };
        slots.insert(pid, slot.clone());
        Registration {
            registry: self.clone(),
            key: CancelKey { pid, secret },
            slot,
        }
    }

    /// The server-side target for a client's key, if the key is valid and the client is
    /// running something right now.
    pub fn target(&self, key: CancelKey) -> Option<CancelTarget> {
        let slot = self.slots.lock().unwrap().get(&key.pid).cloned()?;
        if !weir_wire::scram::ct_eq(&slot.secret.to_be_bytes(), &key.secret.to_be_bytes()) {
            return None;
        }
        let held = slot.target.lock().unwrap();
        if held.running {
            held.last.clone()
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client's cancel key, held for the life of its session.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
    slot: Arc<Slot>,
}

impl Registration {
    pub fn key(&self) -> CancelKey {
        self.key
    }

    /// Points the key at the server connection now serving the client.
    pub fn attach(&self, addr: &Arc<ServerAddr>, key: BackendKey) {
        let mut held = self.slot.target.lock().unwrap();
        match &mut held.last {
            Some(t) if Arc::ptr_eq(&t.addr, addr) => t.key = key,
            last => {
                *last = Some(CancelTarget {
                    addr: addr.clone(),
                    key,
                })
            }
        }
        held.running = true;
    }

    /// The client no longer runs anything: its key cancels nothing until the next attach.
    pub fn detach(&self) {
        self.slot.target.lock().unwrap().running = false;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.slots.lock().unwrap().remove(&self.key.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_reaches_only_its_own_target() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register();
        let b = reg.register();
        assert_ne!(a.key().pid, b.key().pid);
        let addr = Arc::new(ServerAddr::Tcp {
            host: "h".into(),
            port: 1,
        });
        a.attach(
            &addr,
            BackendKey {
                pid: 10,
                secret: 20,
            },
        );
        assert_eq!(reg.target(a.key()).unwrap().key.pid, 10);
        assert!(reg.target(b.key()).is_none(), "b is not running anything");
        let forged = CancelKey {
            pid: a.key().pid,
            secret: a.key().secret.wrapping_add(1),
        };
        assert!(reg.target(forged).is_none(), "wrong secret");
        a.detach();
        assert!(reg.target(a.key()).is_none());
        // Attached again, to the same address and to another: the key reaches the new one.
        a.attach(
            &addr,
            BackendKey {
                pid: 11,
                secret: 21,
            },
        );
        assert_eq!(reg.target(a.key()).unwrap().key.pid, 11);
        a.detach();
        let other = Arc::new(ServerAddr::Tcp {
            host: "h2".into(),
            port: 2,
        });
        a.attach(
            &other,
            BackendKey {
                pid: 12,
                secret: 22,
            },
        );
        let t = reg.target(a.key()).unwrap();
        assert_eq!((t.key.pid, t.key.secret), (12, 22));
        assert!(Arc::ptr_eq(&t.addr, &other));
        a.detach();
        assert!(reg.target(a.key()).is_none());
        drop(a);
        assert_eq!(reg.len(), 1);
    }
}
