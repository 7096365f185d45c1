//! A global allocator that counts, per thread, the bytes the allocator really holds for the thread's
//! live allocations (glibc's chunk sizes: `malloc_usable_size` plus the 8-byte chunk header), so that
//! a test can compare what a structure costs with what it is charged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Allocated minus freed on this thread (a block freed by another thread counts there).
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

/// [`System`], counting.
pub struct Counting;

fn real_size(p: *mut u8) -> i64 {
    if p.is_null() {
        return 0;
    }
    // SAFETY: `p` is a live block from the system allocator (glibc's malloc on Linux), which is
    // what `malloc_usable_size` takes.
    unsafe { libc::malloc_usable_size(p.cast()) as i64 + 8 }
}

fn count(delta: i64) {
    // A const-initialised thread local without a destructor: no allocation, usable at any time.
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

// SAFETY: every call is forwarded to `System` unchanged; the counting only reads the blocks' sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        count(real_size(p));
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        count(real_size(p));
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-real_size(ptr));
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = real_size(ptr);
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(real_size(p) - old);
        }
        p
    }
}

/// Bytes the allocator holds for this thread's live allocations, from some origin: compare two
/// readings.
pub fn live() -> i64 {
    LIVE.with(Cell::get)
}
