//! What a wait for a server connection needs, kept per thread for the next wait: the memory
//! of the box the wait runs in, and the waiter the pool queues.
//!
//! A session that must wait for a server connection runs the wait in a box, so the wait's
//! state does not sit in every idle client's task, and takes a place in the pool's queue with
//! a waiter (an `Arc`). At 1,000 clients on a pool of 20 nearly every transaction waits; made
//! anew, each wait would allocate both. Here, when a wait ends, both go to short lists on its
//! thread, and the next wait on that thread takes them back: no allocation per transaction in
//! steady state, and nothing of the wait kept per idle client. Hand-written (a few lines of
//! `unsafe`): the crates for this either pool one type per pool object, shared across threads
//! behind a lock, or keep a block per owner (tokio-util's `ReusableBoxFuture`, which would put
//! the memory back in every client that ever waited).

use std::alloc::Layout;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

use weir_pool::Spare;

use crate::pools::ServerManager;

/// Blocks (and waiters) kept per thread: enough for the waits that end and start again
/// between two turns of a worker's event loop. A burst of more frees the rest.
pub(crate) const KEEP: usize = 64;

/// Free blocks of this thread, with their layouts.
struct Blocks(Vec<(Layout, NonNull<u8>)>);

impl Drop for Blocks {
    fn drop(&mut self) {
        for (layout, ptr) in self.0.drain(..) {
            // SAFETY: allocated by `take` with this layout (non-zero size), and no longer used.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

thread_local! {
    static BLOCKS: RefCell<Blocks> = const { RefCell::new(Blocks(Vec::new())) };
}

/// A block for `layout` (non-zero size): a kept one, or a new allocation.
fn take(layout: Layout) -> NonNull<u8> {
    let kept = BLOCKS
        .try_with(|b| {
            let mut b = b.borrow_mut();
            let i = b.0.iter().rposition(|(l, _)| *l == layout)?;
            Some(b.0.swap_remove(i).1)
        })
        .ok()
        .flatten();
    kept.unwrap_or_else(|| {
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    })
}

/// Keeps `ptr` (a block from [`take`], its contents dropped) for this thread, or frees it.
fn give(layout: Layout, ptr: NonNull<u8>) {
    let kept = BLOCKS
        .try_with(|b| {
            let mut b = b.borrow_mut();
            if b.0.len() < KEEP {
                b.0.push((layout, ptr));
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: allocated with this layout, and its contents dropped by the caller.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

/// How many blocks this thread keeps.
#[cfg(test)]
fn kept() -> usize {
    BLOCKS.with(|b| b.borrow().0.len())
}

thread_local! {
    static WAITERS: RefCell<Vec<Spare<ServerManager>>> = const { RefCell::new(Vec::new()) };
}

/// A waiter this thread kept from an earlier wait, if any, for [`Pool::ticket_reusing`].
///
/// [`Pool::ticket_reusing`]: weir_pool::Pool::ticket_reusing
pub fn waiter() -> Spare<ServerManager> {
    WAITERS
        .try_with(|w| w.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Keeps the waiter a served ticket gave back (`Ticket::recycle`) for this thread's next
/// wait, up to [`KEEP`].
pub fn keep_waiter(spare: Spare<ServerManager>) {
    if spare.is_empty() {
        return;
    }
    let _ = WAITERS.try_with(|w| {
        let mut w = w.borrow_mut();
        if w.len() < KEEP {
            w.push(spare);
        }
    });
}

/// `F` on the heap, in memory reused from this thread's free blocks; like `Box::pin(f)`.
pub struct Reused<F: Future> {
    ptr: NonNull<F>,
}

// SAFETY: `Reused` owns its `F` as a `Box` would; the block it returns to a thread's list
// when dropped holds nothing of `F` any more.
unsafe impl<F: Future + Send> Send for Reused<F> {}

// The future stays where it was put; only the pointer moves.
impl<F: Future> Unpin for Reused<F> {}

impl<F: Future> Reused<F> {
    /// Moves `f` into a block this thread kept for its layout, or into a new one.
    pub fn new(f: F) -> Reused<F> {
        let layout = Layout::new::<F>();
        let ptr = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            take(layout).cast::<F>()
        };
        // SAFETY: `ptr` is valid for a write of `F` and aligned for it.
        unsafe { ptr.as_ptr().write(f) };
        Reused { ptr }
    }
}

impl<F: Future> Future for Reused<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `F` lives at `ptr` until `drop`, and is never moved from there.
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) }.poll(cx)
    }
}

impl<F: Future> Drop for Reused<F> {
    fn drop(&mut self) {
        /// Gives the block back after `F`'s drop, even if that panics (as `Box` frees).
        struct Give(Layout, NonNull<u8>);
        impl Drop for Give {
            fn drop(&mut self) {
                if self.0.size() != 0 {
                    give(self.0, self.1);
                }
            }
        }
        let _give = Give(Layout::new::<F>(), self.ptr.cast());
        // SAFETY: `F` was written at `ptr` in `new` and not dropped since.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    /// A future that counts its drops and finishes on its second poll.
    struct Probe {
        drops: Arc<AtomicUsize>,
        polled: bool,
        _payload: [u64; 8],
    }

    impl Future for Probe {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            if self.polled {
                return Poll::Ready(7);
            }
            self.polled = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Relaxed);
        }
    }

    fn probe(drops: &Arc<AtomicUsize>) -> Probe {
        Probe {
            drops: drops.clone(),
            polled: false,
            _payload: [0; 8],
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_finished_future_is_dropped_once_and_its_memory_serves_the_next() {
        let drops = Arc::new(AtomicUsize::new(0));
        let before = kept();
        let first = Reused::new(probe(&drops));
        let place = first.ptr.cast::<u8>();
        assert_eq!(first.await, 7);
        assert_eq!(drops.load(Relaxed), 1, "dropped once, when done");
        assert_eq!(kept(), before + 1, "its block is kept");

        let second = Reused::new(probe(&drops));
        assert_eq!(second.ptr.cast::<u8>(), place, "the same memory again");
        assert_eq!(kept(), before);
        // Dropped before it finishes (a client that leaves mid-wait): dropped all the same.
        drop(second);
        assert_eq!(drops.load(Relaxed), 2);
        assert_eq!(kept(), before + 1);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_blocks_and_each_serves_its_own_layout() {
        let drops = Arc::new(AtomicUsize::new(0));
        let many: Vec<_> = (0..KEEP + 10).map(|_| Reused::new(probe(&drops))).collect();
        drop(many);
        assert_eq!(drops.load(Relaxed), KEEP + 10);
        assert_eq!(kept(), KEEP, "the rest are freed");
        // Every kept block has a `Probe`'s layout: another future gets memory of its own.
        let other = Reused::new(async { [1u8; 3] });
        assert_eq!(kept(), KEEP, "no block of another layout taken");
        drop(other);
        assert_eq!(kept(), KEEP, "and none kept beyond the bound");
    }
}
