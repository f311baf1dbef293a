use super::*;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Counter {
    next: AtomicU32,
    /// Fail this many creates before succeeding.
    failures: AtomicU32,
    /// Errors are not worth retrying.
    permanent: AtomicBool,
    /// The pause between attempts, if not the default 5 ms.
    pause_ms: AtomicU64,
    max_uses: AtomicU64,
    /// quick_check leaves every verdict to recycle.
    defer: AtomicBool,
    /// Where the caller runs, as `Manager::here` reports it.
    here: AtomicUsize,
}

#[derive(Debug)]
struct Obj {
    id: u32,
    healthy: bool,
    /// Where it was created.
    home: usize,
}

impl Manager for Counter {
    type Object = Obj;
    type Error = &'static str;

    async fn create(&self) -> Result<Obj, &'static str> {
        if self.failures.load(Relaxed) > 0 {
            self.failures.fetch_sub(1, Relaxed);
            return Err("refused");
        }
        Ok(Obj {
            id: self.next.fetch_add(1, Relaxed),
            healthy: true,
            home: self.here.load(Relaxed),
        })
    }

    fn home(&self, o: &Obj) -> usize {
        o.home
    }

    fn here(&self) -> usize {
        self.here.load(Relaxed)
    }

    fn retry_after(&self, _e: &&'static str, _attempt: u32) -> Option<Duration> {
        let pause = match self.pause_ms.load(Relaxed) {
            0 => 5,
            ms => ms,
        };
        (!self.permanent.load(Relaxed)).then_some(Duration::from_millis(pause))
    }

    async fn recycle(&self, o: &mut Obj, _: &Meta) -> Result<(), CloseReason> {
        if o.healthy {
            Ok(())
        } else {
            Err(CloseReason::Dead)
        }
    }

    fn quick_check(&self, o: &mut Obj, _: &Meta, _: Instant) -> Option<Result<(), CloseReason>> {
        if self.defer.load(Relaxed) {
            return None;
        }
        Some(if o.healthy {
            Ok(())
        } else {
            Err(CloseReason::Dead)
        })
    }

    fn on_release(&self, _o: &mut Obj, meta: &Meta) -> Result<(), CloseReason> {
        let max = self.max_uses.load(Relaxed);
        if max > 0 && meta.uses >= max {
            Err(CloseReason::MaxUses)
        } else {
            Ok(())
        }
    }
}

const LONG: Duration = Duration::from_secs(30);

async fn hold(pool: &Pool<Counter>, n: usize) -> Vec<Pooled<Counter>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(pool.get(LONG).await.unwrap());
    }
    v
}

async fn until_waiting(pool: &Pool<Counter>, n: usize) {
    while pool.snapshot().waiting < n {
        tokio::task::yield_now().await;
    }
}

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
    assert_eq!(pool.stats().closed(CloseReason::Broken), 1);
    let b = pool.get(LONG).await.unwrap();
    assert_eq!(b.id, 1, "dropped object was not reused");
}

#[tokio::test]
async fn never_more_than_max_size() {
    let pool = Pool::new(Counter::default(), 3);
    let held = hold(&pool, 3).await;
    assert_eq!(pool.snapshot().active, 3);
    match pool.get(Duration::from_millis(20)).await {
        Err(GetError::Timeout {
            max_size: 3,
            queued: 0,
            waited,
            last_error: None,
        }) => {
            assert!(waited >= Duration::from_millis(20))
        }
        other => panic!("expected timeout, got {:?}", other.map(|o| o.id)),
    }
    assert_eq!(pool.snapshot().timeouts, 1);
    drop(held);
}

#[tokio::test]
async fn waiters_are_served_in_arrival_order() {
    let pool = Pool::new(Counter::default(), 1);
    let first = pool.get(LONG).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (p, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let o = p.get(LONG).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::task::yield_now().await;
            o.release();
        }));
        until_waiting(&pool, i + 1).await;
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
    until_waiting(&pool, 1).await;
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.snapshot().waiting, 0);
    held.release();
    let again = pool.get(Duration::from_millis(100)).await.unwrap();
    assert_eq!(again.id, 0, "the permit is still available");
}

#[tokio::test]
async fn unusable_idle_object_is_replaced_unseen() {
    let pool = Pool::new(Counter::default(), 1);
    let mut a = pool.get(LONG).await.unwrap();
    a.healthy = false;
    a.release();
    let b = pool.get(LONG).await.unwrap();
    assert_eq!(b.id, 1);
    let s = pool.snapshot();
    assert_eq!((s.created, s.closed, s.size, s.replaced), (2, 1, 1, 1));
    assert_eq!(pool.stats().closed(CloseReason::Dead), 1);
}

#[tokio::test]
async fn failed_creates_are_retried_within_the_wait() {
    let pool = Pool::new(Counter::default(), 1);
    pool.manager().failures.store(3, Relaxed);
    let o = pool.get(LONG).await.unwrap();
    assert_eq!(o.id, 0);
    let s = pool.snapshot();
    assert_eq!((s.create_errors, s.retries), (3, 3));
}

#[tokio::test]
async fn a_wait_that_ends_retrying_says_why() {
    let pool = Pool::new(Counter::default(), 1);
    pool.manager().failures.store(1000, Relaxed);
    match pool.get(Duration::from_millis(50)).await {
        Err(GetError::Timeout {
            last_error: Some("refused"),
            waited,
            ..
        }) => {
            assert!(waited >= Duration::from_millis(50))
        }
        other => panic!(
            "expected a timeout carrying the create error, got {:?}",
            other.map(|o| o.id)
        ),
    }
    assert_eq!(pool.snapshot().size, 0, "nothing leaked");
    // Not worth retrying: the error comes back at once.
    pool.manager().permanent.store(true, Relaxed);
    assert!(matches!(
        pool.get(LONG).await,
        Err(GetError::Create("refused"))
    ));
}

#[tokio::test]
async fn reserve_serves_a_waiter_after_the_reserve_timeout() {
    let pool = Pool::with_reserve(Counter::default(), 1, 1, Duration::from_millis(30));
    let held = pool.get(LONG).await.unwrap();
    let start = Instant::now();
    let extra = pool.get(LONG).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(30));
    assert!(extra.is_reserve());
    assert_eq!(pool.snapshot().reserve_used, 1);
    assert!(
        pool.get(Duration::from_millis(60)).await.is_err(),
        "the reserve is one deep"
    );
    extra.release();
    let s = pool.snapshot();
    assert_eq!(
        (s.size, s.reserve_used),
        (1, 0),
        "the reserve connection closes when returned over size"
    );
    held.release();
}

#[tokio::test]
async fn release_verdict_closes_worn_objects() {
    let pool = Pool::new(Counter::default(), 1);
    pool.manager().max_uses.store(2, Relaxed);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let o = pool.get(LONG).await.unwrap();
        ids.push(o.id);
        o.release();
    }
    assert_eq!(ids, vec![0, 0, 1, 1, 2]);
    assert_eq!(pool.stats().closed(CloseReason::MaxUses), 2);
}

#[tokio::test]
async fn top_up_and_reap_keep_the_minimum() {
    let pool = Pool::new(Counter::default(), 5);
    assert_eq!(pool.top_up(3).await.unwrap(), 3);
    assert_eq!(pool.snapshot().idle, 3);
    assert_eq!(pool.top_up(3).await.unwrap(), 0, "already there");
    for o in hold(&pool, 5).await {
        o.release();
    }
    assert_eq!(pool.snapshot().idle, 5);
    let closed = pool.reap(3, |_, _| Verdict::CloseAboveMin(CloseReason::IdleTimeout));
    assert_eq!(closed, 2);
    assert_eq!(pool.snapshot().size, 3);
    assert_eq!(pool.stats().closed(CloseReason::IdleTimeout), 2);
    // Dead ones go regardless of the minimum.
    let closed = pool.reap(3, |o, _| {
        if o.id == 0 {
            Verdict::Close(CloseReason::Dead)
        } else {
            Verdict::Keep
        }
    });
    assert_eq!((closed, pool.snapshot().size), (1, 2));
}

#[tokio::test]
async fn top_up_never_takes_a_permit_from_a_client() {
    let pool = Pool::new(Counter::default(), 1);
    let _held = pool.get(LONG).await.unwrap();
    assert_eq!(pool.top_up(1).await.unwrap(), 0);
    assert_eq!(pool.snapshot().size, 1);
}

#[tokio::test]
async fn grow_frees_waiters_and_shrink_trims() {
    let pool = Pool::new(Counter::default(), 1);
    let a = pool.get(LONG).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(LONG).await.map(|o| o.id) })
    };
    until_waiting(&pool, 1).await;
    pool.resize(2);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        1,
        "growing served the waiter with a new object"
    );
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

/// Growing by billions (an operator's typo through the admin API) hands a permit to each
/// waiter and adds the rest at once: it used to return the permits one by one under the lock.
#[tokio::test]
async fn a_huge_grow_serves_the_waiters_and_returns_at_once() {
    let pool = Pool::new(Counter::default(), 1);
    let a = pool.get(LONG).await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get(LONG).await.map(|o| o.id) })
        })
        .collect();
    until_waiting(&pool, 2).await;
    let p = pool.clone();
    let grown = tokio::task::spawn_blocking(move || p.resize(u32::MAX as usize));
    // Generous: the loop it replaces took minutes for this size.
    tokio::time::timeout(Duration::from_secs(10), grown)
        .await
        .expect("the resize returns at once")
        .unwrap();
    let mut ids = Vec::new();
    for w in waiters {
        ids.push(w.await.unwrap().unwrap());
    }
    ids.sort();
    assert_eq!(ids, [1, 2], "both waiters served with new objects");
    // The rest of the capacity is free: more checkouts than there were waiters.
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(
            pool.get(Duration::from_secs(2))
                .await
                .expect("a free permit"),
        );
    }
    a.release();
    for o in more {
        o.release();
    }
    // And shrinking back works as from any other size.
    pool.resize(1);
    let _one = pool.get(LONG).await.unwrap();
    assert!(
        pool.get(Duration::from_millis(20)).await.is_err(),
        "capacity is one again"
    );
}

#[tokio::test]
async fn shrink_below_in_use_takes_effect_on_release() {
    let pool = Pool::new(Counter::default(), 3);
    let held = hold(&pool, 3).await;
    pool.resize(1);
    assert_eq!(pool.snapshot().size, 3, "in-use objects are not closed");
    for o in held {
        o.release();
    }
    assert_eq!(
        pool.snapshot().size,
        1,
        "released objects over the limit are closed"
    );
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
    until_waiting(&pool, 1).await;
    pool.close();
    assert!(matches!(waiter.await.unwrap(), Err(GetError::Closed)));
}

#[tokio::test]
async fn wait_quantiles_count_unqueued_checkouts_as_zero() {
    let pool = Pool::new(Counter::default(), 1);
    for _ in 0..9 {
        pool.get(LONG).await.unwrap().release();
    }
    let held = pool.get(LONG).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(LONG).await.map(|o| o.release()) })
    };
    until_waiting(&pool, 1).await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    held.release();
    waiter.await.unwrap().unwrap();
    // 11 checkouts, one waited ~40 ms.
    assert_eq!(pool.stats().wait_quantile(0.5), Duration::ZERO);
    assert!(pool.stats().wait_quantile(0.99) >= Duration::from_millis(35));
}

#[tokio::test]
async fn a_retrying_checkout_takes_an_object_released_meanwhile() {
    let pool = Pool::new(Counter::default(), 2);
    let held = pool.get(LONG).await.unwrap();
    pool.manager().failures.store(u32::MAX, Relaxed);
    // Far longer than the test allows: only the release's notification can end the pause.
    pool.manager().pause_ms.store(60_000, Relaxed);
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(Duration::from_secs(5)).await.map(|o| o.id) })
    };
    while pool.snapshot().retries == 0 {
        tokio::task::yield_now().await;
    }
    let t = Instant::now();
    held.release();
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        0,
        "the released object, not a timeout"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn objects_returned_over_size_go_to_waiters_not_away() {
    let pool = Pool::with_reserve(Counter::default(), 1, 1, Duration::from_millis(20));
    let a = pool.get(LONG).await.unwrap();
    let b = pool.get(LONG).await.unwrap();
    assert!(b.is_reserve());
    let c = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get(LONG).await.map(|o| o.id) })
    };
    until_waiting(&pool, 1).await;
    a.release(); // size 2 > max 1, but c waits for it
    assert_eq!(c.await.unwrap().unwrap(), 0, "c got a's object");
    assert_eq!(pool.snapshot().created, 2, "nothing closed and reopened");
    b.release(); // nobody waits now: the excess closes
    assert_eq!(pool.snapshot().size, 1);
}

#[tokio::test]
async fn reap_trims_idle_excess_over_size() {
    let pool = Pool::new(Counter::default(), 3);
    for o in hold(&pool, 3).await {
        o.release();
    }
    pool.inner.max_size.store(1, Relaxed); // as if the excess had been kept for waiters
    assert_eq!(pool.reap(0, |_, _| Verdict::Keep), 2);
    assert_eq!(pool.snapshot().size, 1);
}

#[tokio::test]
async fn try_get_hands_out_idle_objects_without_waiting_or_leaking_permits() {
    let pool = Pool::new(Counter::default(), 2);
    assert!(
        pool.try_get(Instant::now()).is_none(),
        "nothing idle: the caller must get()"
    );
    // The permit taken by the failed attempt went back: both slots can still be filled.
    let held = hold(&pool, 2).await;
    assert!(pool.try_get(Instant::now()).is_none(), "no permit free");
    for o in held {
        o.release();
    }
    let a = pool.try_get(Instant::now()).expect("an idle object");
    assert_eq!((a.meta().uses, pool.snapshot().active), (1, 1));
    let checkouts = pool.snapshot().checkouts;
    a.release();

    // A failed quick check closes that object and moves to the next.
    let mut both = hold(&pool, 2).await;
    both[1].healthy = false;
    for o in both {
        o.release();
    }
    let b = pool.try_get(Instant::now()).expect("the healthy one");
    assert!(b.healthy);
    let s = pool.snapshot();
    assert_eq!((s.replaced, s.size, s.checkouts), (1, 1, checkouts + 3));
    assert_eq!(pool.stats().closed(CloseReason::Dead), 1);
    b.release();

    // A check the fast path cannot make leaves the object idle for get().
    pool.manager().defer.store(true, Relaxed);
    assert!(pool.try_get(Instant::now()).is_none());
    let s = pool.snapshot();
    assert_eq!((s.idle, s.active), (1, 0));
    let c = pool.get(LONG).await.unwrap();
    assert!(c.healthy);
    assert_eq!(pool.snapshot().created, 2, "get() reused it, no new object");
}

/// Polls a ticket once with a no-op waker.
fn poll_once(t: &mut Ticket<Counter>) -> Option<Result<Granted<Counter>, GetError<&'static str>>> {
    let mut cx = Context::from_waker(Waker::noop());
    match t.poll(&mut cx, Instant::now()) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

fn object(g: Option<Result<Granted<Counter>, GetError<&'static str>>>) -> Pooled<Counter> {
    match g {
        Some(Ok(Granted::Object(p))) => p,
        Some(Ok(Granted::Capacity(_))) => panic!("capacity, not an object"),
        Some(Err(e)) => panic!("error: {e}"),
        None => panic!("not ready"),
    }
}

#[tokio::test]
async fn a_release_hands_its_object_to_the_first_waiter_and_wakes_it() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap();
    let mut first = pool.ticket(Instant::now());
    let mut second = pool.ticket(Instant::now());
    assert!(poll_once(&mut first).is_none() && poll_once(&mut second).is_none());
    assert_eq!(pool.snapshot().waiting, 2);

    // The first waiter's task is woken by the release.
    let woken = Arc::new(AtomicBool::new(false));
    struct Flag(Arc<AtomicBool>);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Relaxed);
        }
    }
    let waker = Waker::from(Arc::new(Flag(woken.clone())));
    assert!(
        first
            .poll(&mut Context::from_waker(&waker), Instant::now())
            .is_pending()
    );
    held.release();
    assert!(woken.load(Relaxed), "the first waiter was woken");
    let s = pool.snapshot();
    assert_eq!((s.idle, s.waiting), (0, 1), "handed over, not left idle");
    // A newcomer cannot overtake the queue, even with the object in flight.
    assert!(pool.try_get(Instant::now()).is_none());
    let a = object(poll_once(&mut first));
    assert_eq!(
        (a.id, a.meta().uses),
        (0, 1),
        "the same object, as released"
    );
    assert!(poll_once(&mut second).is_none(), "the second still waits");
    a.release();
    assert_eq!(object(poll_once(&mut second)).id, 0);
    assert_eq!(pool.snapshot().created, 1);
}

#[tokio::test]
async fn a_served_ticket_leaves_its_waiter_for_the_next_wait_without_the_waker() {
    let pool = Pool::with_reserve(Counter::default(), 1, 1, Duration::from_millis(30));
    let held = pool.get(LONG).await.unwrap();
    let t0 = Instant::now();
    let mut first = pool.ticket_reusing(t0, Spare::default());
    struct Task;
    impl std::task::Wake for Task {
        fn wake(self: Arc<Self>) {}
    }
    let task = Arc::new(Task);
    let waker = Waker::from(task.clone());
    assert!(
        first
            .poll(&mut Context::from_waker(&waker), t0)
            .is_pending()
    );
    // The reserve opens to it: served without a release, so its waker is still registered.
    let later = t0 + Duration::from_millis(31);
    let permit = match first.poll(&mut Context::from_waker(&waker), later) {
        Poll::Ready(Ok(Granted::Capacity(permit))) => permit,
        _ => panic!("the reserve was not granted"),
    };
    drop(waker);
    let place = Arc::as_ptr(first.served.as_ref().expect("served"));
    let spare = first.recycle();
    assert_eq!(
        spare.0.as_ref().map(Arc::as_ptr),
        Some(place),
        "the waiter is kept"
    );
    // A kept waker would be the caller's own task, kept alive by itself.
    assert_eq!(Arc::strong_count(&task), 1, "the waiter keeps no waker");
    drop(permit);

    // The next wait takes that waiter instead of a new one, and is served as before (polled
    // at the instant it queued, so however slow the machine, the reserve stays shut).
    let t1 = Instant::now();
    let mut second = pool.ticket_reusing(t1, spare);
    assert_eq!(second.waiter.as_ref().map(Arc::as_ptr), Some(place));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(second.poll(&mut cx, t1).is_pending(), "queued");
    held.release();
    let a = match second.poll(&mut cx, t1) {
        Poll::Ready(Ok(Granted::Object(a))) => a,
        _ => panic!("the released object was not handed over"),
    };
    assert_eq!(a.id, 0, "handed the released object");
    a.release();
}

#[tokio::test]
async fn a_ticket_dropped_after_it_was_handed_an_object_passes_it_on() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap();
    let first = pool.ticket(Instant::now());
    let mut second = pool.ticket(Instant::now());
    held.release(); // handed to `first`, which never looks
    drop(first);
    let s = pool.snapshot();
    // Handed on at once: no longer queued, not idle either.
    assert_eq!((s.waiting, s.idle, s.size), (0, 0, 1));
    let b = object(poll_once(&mut second));
    assert_eq!(b.id, 0, "passed on to the next waiter");
    drop(second);
    b.release();

    // With nobody left to pass it to, it goes back idle with its permit.
    let held = pool.get(LONG).await.unwrap();
    let lone = pool.ticket(Instant::now());
    held.release();
    drop(lone);
    let s = pool.snapshot();
    assert_eq!((s.idle, s.active, s.waiting), (1, 0, 0));
    assert_eq!(pool.try_get(Instant::now()).expect("idle and free").id, 0);
}

#[tokio::test]
async fn a_discarded_object_passes_its_permit_to_the_first_waiter() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap();
    let mut waiting = pool.ticket(Instant::now());
    drop(held); // broken: closed, its permit goes on
    match poll_once(&mut waiting) {
        Some(Ok(Granted::Capacity(permit))) => {
            let o = pool
                .fill(permit, Instant::now() + LONG, true)
                .await
                .unwrap();
            assert_eq!(o.id, 1, "a new object in the freed place");
            o.release();
        }
        _ => panic!("expected capacity"),
    }
    assert_eq!(pool.snapshot().size, 1);
}

#[tokio::test]
async fn a_checkout_prefers_an_idle_object_from_its_own_home() {
    let pool = Pool::new(Counter::default(), 3);
    let a = pool.get(LONG).await.unwrap(); // home 0
    pool.manager().here.store(1, Relaxed);
    let b = pool.get(LONG).await.unwrap(); // home 1
    a.release();
    b.release(); // the most recent
    pool.manager().here.store(0, Relaxed);
    let got = pool.try_get(Instant::now()).expect("idle");
    assert_eq!(
        (got.id, got.home),
        (0, 0),
        "home 0's own, not the most recent"
    );
    // Nothing from this home left: the most recent of the others.
    let other = pool.try_get(Instant::now()).expect("idle");
    assert_eq!(other.home, 1);
}

#[tokio::test]
async fn a_release_prefers_a_waiter_from_its_home_near_the_front() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap(); // home 0
    pool.manager().here.store(1, Relaxed);
    let mut away = pool.ticket(Instant::now());
    pool.manager().here.store(0, Relaxed);
    let mut local = pool.ticket(Instant::now());
    held.release();
    assert!(poll_once(&mut away).is_none(), "passed over once");
    let o = object(poll_once(&mut local));
    assert_eq!(o.home, 0);
    // The next release serves the waiter that was passed over.
    o.release();
    assert_eq!(object(poll_once(&mut away)).id, 0);
}

#[tokio::test]
async fn a_release_serves_the_first_waiter_once_it_has_waited_the_slack_longer() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap(); // home 0
    let t0 = Instant::now();
    pool.manager().here.store(1, Relaxed);
    let mut away = pool.ticket(t0);
    pool.manager().here.store(0, Relaxed);
    let mut local = pool.ticket(t0 + MIN_AFFINITY_SLACK + Duration::from_millis(1));
    held.release();
    assert!(
        poll_once(&mut local).is_none(),
        "joined too long after the first"
    );
    assert_eq!(object(poll_once(&mut away)).id, 0, "the first waiter");
}

#[tokio::test]
async fn the_slack_grows_with_the_first_waiters_wait() {
    let pool = Pool::new(Counter::default(), 1);
    let held = pool.get(LONG).await.unwrap(); // home 0
    let now = Instant::now();
    pool.manager().here.store(1, Relaxed);
    let mut away = pool.ticket(now - Duration::from_millis(100));
    pool.manager().here.store(0, Relaxed);
    // 100 ms into the first waiter's wait, the slack is 50 ms: a waiter that joined 40 ms
    // after it is preferred, one that joined 60 ms after it would not be.
    let mut near = pool.ticket(now - Duration::from_millis(60));
    held.release();
    assert!(poll_once(&mut away).is_none());
    let o = object(poll_once(&mut near));
    let mut late = pool.ticket(Instant::now());
    o.release();
    assert!(
        poll_once(&mut late).is_none(),
        "joined over half the first one's wait after it"
    );
    assert_eq!(object(poll_once(&mut away)).id, 0);
    assert_eq!(affinity_slack(Duration::ZERO), MIN_AFFINITY_SLACK);
    assert_eq!(
        affinity_slack(Duration::from_secs(1)),
        Duration::from_millis(500)
    );
}

#[test]
fn the_queue_keeps_arrival_order_across_homes() {
    let mut q: Queue<Obj> = Queue::new();
    let now = Instant::now();
    let waiters: Vec<Arc<Waiter<Obj>>> = (0..5)
        .map(|_| {
            Arc::new(Waiter {
                state: Mutex::new(WaitState {
                    grant: None,
                    waker: None,
                }),
            })
        })
        .collect();
    // Homes 1, 0, 1, 0 (may take the reserve), 2, in that order.
    for (i, (home, reserve_ok)) in [(1, false), (0, false), (1, false), (0, true), (2, false)]
        .into_iter()
        .enumerate()
    {
        q.push_back(waiters[i].clone(), reserve_ok, home, now);
    }
    let which = |e: Option<Entry<Obj>>| {
        let e = e.expect("an entry");
        waiters.iter().position(|w| Arc::ptr_eq(w, &e.waiter))
    };
    assert_eq!(q.first_home(), Some(1));
    assert_eq!(q.first_reserve_ok(), Some((0, 1)));
    assert_eq!(q.find(&waiters[2]), Some((1, 1)));
    assert_eq!(which(q.remove((1, 1))), Some(2));
    assert_eq!(
        which(q.pop_from(2)),
        Some(4),
        "a home's own line, out of turn"
    );
    let order: Vec<_> = std::iter::from_fn(|| q.pop_front().map(|e| which(Some(e)))).collect();
    assert_eq!(order, [Some(0), Some(1), Some(3)]);
    assert!(q.is_empty());
    assert_eq!(q.first_home(), None);
    assert!(q.find(&waiters[0]).is_none());
}
