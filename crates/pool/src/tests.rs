use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;

#[derive(Default)]
struct Counter {
    next: AtomicU32,
    fail: AtomicBool,
}

#[derive(Debug)]
struct Obj {
    id: u32,
    healthy: bool,
}

impl Manager for Counter {
    type Object = Obj;
    type Error = &'static str;

    async fn create(&self) -> Result<Obj, &'static str> {
        if self.fail.load(Relaxed) {
            return Err("refused");
        }
        Ok(Obj {
            id: self.next.fetch_add(1, Relaxed),
            healthy: true,
        })
    }

    fn is_usable(&self, o: &mut Obj, _: &Meta) -> bool {
        o.healthy
    }
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn released_object_is_reused_and_dropped_one_is_discarded() {
    let pool = Pool::new(Counter::default(), 2);
    let a = pool.get(LONG).await.unwrap();
    assert_eq!(a.id, 0);
    a.release();
    let a = pool.get(LONG).await.unwrap();
    assert_eq!(a.id, 0, "released object comes back");
    assert_eq!(a.meta().uses, 1);
    drop(a);
    let s = pool.snapshot();
    assert_eq!((s.size, s.closed), (0, 1));
    let b = pool.get(LONG).await.unwrap();
    assert_eq!(b.id, 1, "dropped object was not reused");
}

#[tokio::test]
async fn never_more_than_max_size() {
    let pool = Pool::new(Counter::default(), 3);
    let held: Vec<_> = futures_join(&pool, 3).await;
    assert_eq!(pool.snapshot().active, 3);
    let r = pool.get(Duration::from_millis(20)).await;
    match r {
        Err(GetError::Timeout {
            max_size: 3,
            queued: 0,
            waited,
        }) => assert!(waited >= Duration::from_millis(20)),
        other => panic!("expected timeout, got {:?}", other.map(|o| o.id)),
    }
    assert_eq!(pool.snapshot().timeouts, 1);
    drop(held);
}

async fn futures_join(pool: &Pool<Counter>, n: usize) -> Vec<Pooled<Counter>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(pool.get(LONG).await.unwrap());
    }
    v
}

#[tokio::test]
async fn waiters_are_served_in_arrival_order() {
    let pool = Pool::new(Counter::default(), 1);
    let first = pool.get(LONG).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let p = pool.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let o = p.get(LONG).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::task::yield_now().await;
            o.release();
        }));
        // Let each waiter enqueue before the next one.
        while pool.snapshot().waiting < i + 1 {
            tokio::task::yield_now().await;
        }
    }
    first.release();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn cancelled_waiter_leaks_nothing() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(LONG).await.map(|o| o.id) })
    };
    while pool.snapshot().waiting == 0 {
        tokio::task::yield_now().await;
    }
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.snapshot().waiting, 0);
    held.release();
    // The permit must still be available to a new caller.
    let again = pool.get(Duration::from_millis(100)).await.unwrap();
    assert_eq!(again.id, 0);
}

#[tokio::test]
async fn unusable_idle_object_is_replaced() {
    let pool = Pool::new(Counter::default(), 1);
    let mut a = pool.get(LONG).await.unwrap();
    a.healthy = false;
    a.release();
    let b = pool.get(LONG).await.unwrap();
    assert_eq!(b.id, 1);
    let s = pool.snapshot();
    assert_eq!((s.created, s.closed, s.size), (2, 1, 1));
}

#[tokio::test]
async fn create_failure_returns_the_permit() {
    let pool = Pool::new(Counter::default(), 1);
    pool.manager().fail.store(true, Relaxed);
    assert!(matches!(
        pool.get(LONG).await,
        Err(GetError::Create("refused"))
    ));
    pool.manager().fail.store(false, Relaxed);
    assert!(pool.get(Duration::from_millis(100)).await.is_ok());
    assert_eq!(pool.snapshot().create_errors, 1);
}

#[tokio::test]
async fn grow_frees_waiters_and_shrink_trims() {
    let pool = Pool::new(Counter::default(), 1);
    let a = pool.get(LONG).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(LONG).await.map(|o| o.id) })
    };
    while pool.snapshot().waiting == 0 {
        tokio::task::yield_now().await;
    }
    pool.resize(2);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        1,
        "growing served the waiter with a new object"
    );

    // Two idle objects, shrink to one: one is closed at once.
    let b = pool.get(LONG).await.unwrap();
    a.release();
    b.release();
    assert_eq!(pool.snapshot().size, 2);
    pool.resize(1);
    assert_eq!(pool.snapshot().size, 1);
    let _one = pool.get(LONG).await.unwrap();
    assert!(
        pool.get(Duration::from_millis(20)).await.is_err(),
        "capacity is now one"
    );
}

#[tokio::test]
async fn shrink_below_in_use_takes_effect_on_release() {
    let pool = Pool::new(Counter::default(), 3);
    let held = futures_join(&pool, 3).await;
    pool.resize(1);
    assert_eq!(pool.snapshot().size, 3, "in-use objects are not closed");
    for o in held {
        o.release();
    }
    let s = pool.snapshot();
    assert_eq!(s.size, 1, "released objects over the limit are closed");
    let _a = pool.get(LONG).await.unwrap();
    assert!(pool.get(Duration::from_millis(20)).await.is_err());
}

#[tokio::test]
async fn close_fails_waiters() {
    let pool = Pool::new(Counter::default(), 1);
    let _held = pool.get(LONG).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(LONG).await.map(|o| o.id) })
    };
    while pool.snapshot().waiting == 0 {
        tokio::task::yield_now().await;
    }
    pool.close();
    assert!(matches!(waiter.await.unwrap(), Err(GetError::Closed)));
}

#[tokio::test]
async fn retain_idle_removes_selected() {
    let pool = Pool::new(Counter::default(), 3);
    for o in futures_join(&pool, 3).await {
        o.release();
    }
    let removed = pool.retain_idle(|o, _| o.id != 1);
    assert_eq!(removed, 1);
    assert_eq!(pool.snapshot().idle, 2);
}
