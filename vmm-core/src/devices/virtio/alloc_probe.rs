//! Global allocators that watch allocation sizes, for hostile-ring tests and fuzz targets only
//! (never in a product build). Unit tests install one that remembers, per thread, the largest
//! single allocation made since the thread last asked: they drive a back end on the test thread
//! and assert that whatever lengths the guest claims, the host never allocated more than a stated
//! bound at once. vmm-core/fuzz installs one that aborts above a bound.

use std::alloc::{GlobalAlloc, Layout, System};
#[cfg(test)]
use std::cell::Cell;

/// The system allocator, with every requested size shown to a hook first. The hook runs inside
/// the allocator: it must not allocate.
pub struct ObservedAlloc(pub fn(usize));

// SAFETY: every call is forwarded unchanged to the system allocator; the hook only sees a size.
unsafe impl GlobalAlloc for ObservedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        (self.0)(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        (self.0)(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        (self.0)(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is the system one.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Records a size; touches only a const-initialised thread-local Cell, which never allocates.
#[cfg(test)]
fn record(size: usize) {
    // try_with: allocations during thread teardown find the slot gone; they are not ours to count.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

#[cfg(test)]
#[global_allocator]
static PROBE: ObservedAlloc = ObservedAlloc(record);

/// Runs `f` and returns its result with the largest single allocation this thread made meanwhile.
#[cfg(test)]
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_probe_sees_the_largest_allocation_of_its_thread() {
        let (_, largest) = largest_allocation(|| {
            let small = std::hint::black_box(vec![0u8; 100]);
            let big = std::hint::black_box(vec![0u8; 1 << 20]);
            (small.len(), big.len())
        });
        assert!(largest >= 1 << 20, "{largest}");
    }

    #[test]
    fn test_probe_ignores_other_threads() {
        let (_, largest) = largest_allocation(|| {
            std::thread::spawn(|| std::hint::black_box(vec![0u8; 8 << 20]).len())
                .join()
                .unwrap()
        });
        assert!(largest < 8 << 20, "{largest}");
    }
}
