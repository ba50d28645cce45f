//! The bench's global allocator: the system's, except for small blocks
//! aligned to a cache line, which come from a pool of 256-byte slots.
//!
//! Why: an idle client of a load generator is, in user space, one tokio task
//! and one I/O registration, and tokio aligns both to 128 bytes (against
//! false sharing) in 256 bytes. glibc serves an aligned request by carving
//! size + alignment + a minimum chunk from its heap and freeing the ends,
//! fragments too small for anything that follows: 448 bytes spent per
//! 256-byte block, nearly half the memory of an idle client. The pool spends
//! 256. Freed slots go back on the pool's list for the next block, never to
//! the system: a load generator's blocks are its clients, which live as long
//! as it does.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// The size and alignment of a slot: what the pool serves.
const SLOT: usize = 256;
/// Slots are carved from chunks of this many bytes, taken from the system.
const CHUNK: usize = 64 * 1024;

/// The global allocator (see the module doc).
pub struct Lean;

/// The slots: a free list threaded through the free slots themselves, and
/// the rest of the chunk being carved.
struct Pool {
    free: *mut u8,
    carve: *mut u8,
    end: *mut u8,
}

// SAFETY: the pointers are only touched under the mutex, and they point into
// chunks the pool owns for the life of the process.
unsafe impl Send for Pool {}

static POOL: Mutex<Pool> = Mutex::new(Pool { free: ptr::null_mut(), carve: ptr::null_mut(), end: ptr::null_mut() });

/// Whether `layout` is served by the pool: aligned beyond what malloc
/// guarantees anyway (16 bytes), and fitting a slot.
fn pooled(layout: Layout) -> bool {
    layout.align() > 16 && layout.align() <= SLOT && layout.size() <= SLOT
}

impl Pool {
    /// A free slot, or null when the system has no memory for another chunk.
    ///
    /// # Safety
    /// The caller holds the pool's lock (as `&mut self` says).
    unsafe fn take(&mut self) -> *mut u8 {
        if !self.free.is_null() {
            let slot = self.free;
            // SAFETY: a free slot holds the address of the next free one (see `give`).
            self.free = unsafe { slot.cast::<*mut u8>().read() };
            return slot;
        }
        if self.carve == self.end {
            // SAFETY: a valid, non-zero layout; the chunk is never freed.
            let chunk = unsafe { System.alloc(Layout::from_size_align_unchecked(CHUNK, SLOT)) };
            if chunk.is_null() {
                return chunk;
            }
            self.carve = chunk;
            // SAFETY: one past the end of the chunk just allocated.
            self.end = unsafe { chunk.add(CHUNK) };
        }
        let slot = self.carve;
        // SAFETY: CHUNK is a multiple of SLOT, so the slot lies within the chunk.
        self.carve = unsafe { slot.add(SLOT) };
        slot
    }

    /// Puts `slot` back on the free list.
    ///
    /// # Safety
    /// `slot` came from [`Pool::take`] and is no longer used.
    unsafe fn give(&mut self, slot: *mut u8) {
        // SAFETY: the slot is the pool's again, 256-byte aligned: room for a pointer.
        unsafe { slot.cast::<*mut u8>().write(self.free) };
        self.free = slot;
    }
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic never happens under the lock; should one, the list is still whole.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

// SAFETY: pooled blocks are SLOT bytes at SLOT-aligned addresses, so they meet
// any layout `pooled` accepts, and each is handed out once until freed;
// everything else is the system allocator's, with the same layout both ways.
unsafe impl GlobalAlloc for Lean {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if pooled(layout) {
            // SAFETY: the guard is the lock.
            return unsafe { pool().take() };
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if pooled(layout) {
            // SAFETY: the guard is the lock.
            let slot = unsafe { pool().take() };
            if !slot.is_null() {
                // SAFETY: the slot holds SLOT ≥ layout.size() bytes.
                unsafe { slot.write_bytes(0, layout.size()) };
            }
            return slot;
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if pooled(layout) {
            // SAFETY: a block of this layout came from the pool, and the caller is done with it.
            unsafe { pool().give(ptr) };
            return;
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for the new size.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (pooled(layout), pooled(new_layout)) {
            // SAFETY: the caller's contract, passed on.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            // The slot holds the new size as well.
            (true, true) => ptr,
            _ => {
                // SAFETY: as `alloc`, then the old block is copied (the smaller size) and freed.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(128))]
    struct Aligned([u8; 200]);

    #[test]
    fn aligned_blocks_come_from_the_pool_and_go_back_to_it() {
        let a = Box::new(Aligned([1; 200]));
        let b = Box::new(Aligned([2; 200]));
        let (pa, pb) = (&*a as *const Aligned as usize, &*b as *const Aligned as usize);
        assert_eq!((pa % SLOT, pb % SLOT), (0, 0));
        assert_eq!((a.0[199], b.0[0]), (1, 2), "blocks do not overlap");
        drop(a);
        let c = Box::new(Aligned([3; 200]));
        // Another thread may take the freed slot first: only the alignment is certain.
        assert_eq!(&*c as *const Aligned as usize % SLOT, 0);
        assert!(pooled(Layout::new::<Aligned>()));
        assert!(!pooled(Layout::new::<[u64; 4]>()), "ordinary blocks are the system's");
        assert!(!pooled(Layout::from_size_align(512, 128).unwrap()), "too large for a slot");
    }

    #[test]
    fn a_pooled_block_can_grow_out_of_the_pool_and_back() {
        let layout = Layout::from_size_align(64, 64).unwrap();
        // SAFETY: a non-zero layout; each block is used within its size and freed with its layout.
        unsafe {
            let block = Lean.alloc_zeroed(layout);
            assert!(!block.is_null());
            assert_eq!(block.read(), 0);
            block.write(7);
            let grown = Lean.realloc(block, layout, 1000);
            assert_eq!((grown.read(), grown as usize % 64), (7, 0));
            let shrunk = Lean.realloc(grown, Layout::from_size_align(1000, 64).unwrap(), 100);
            assert_eq!(shrunk.read(), 7);
            Lean.dealloc(shrunk, Layout::from_size_align(100, 64).unwrap());
        }
    }
}
