//! The allocator of a plugin built with this SDK (feature `arena`, on by default): a bump arena
//! in the module's zero-initialised data, in front of the standard allocator.
//!
//! The core runs every hook in a fresh instance and throws it away afterwards, so a hook's
//! memory never needs to be given back one allocation at a time. Bumping a pointer through a
//! buffer that is part of the instance's initial memory costs neither the standard allocator's
//! set-up in every new instance nor a `memory.grow` (which the host pays for with page
//! protection changes): `bench hooks` measured a 0.2.0 hook about 15 % faster with it (see
//! BENCHMARKS.md). What does not fit falls through to the standard allocator, so a hook may
//! still use all the memory its sandbox allows. A plugin that brings its own
//! `#[global_allocator]` turns the feature off (`default-features = false`).

/// Bytes of the arena; the rest of a hook's memory comes from the standard allocator.
pub(crate) const ARENA_BYTES: usize = 192 << 10;

/// A bump region `[next, end)`: pure address arithmetic, tested natively.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bump {
    start: usize,
    next: usize,
    end: usize,
}

impl Bump {
    pub(crate) const fn empty() -> Bump {
        Bump {
            start: 0,
            next: 0,
            end: 0,
        }
    }

    pub(crate) fn new(start: usize, len: usize) -> Bump {
        Bump {
            start,
            next: start,
            end: start + len,
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.end != 0
    }

    /// Whether `addr` was handed out by this region.
    pub(crate) fn owns(&self, addr: usize) -> bool {
        addr >= self.start && addr < self.end
    }

    /// The address of `size` bytes aligned to `align` (a power of two), or `None` when they do
    /// not fit.
    pub(crate) fn take(&mut self, size: usize, align: usize) -> Option<usize> {
        let at = self.next.checked_add(align - 1)? & !(align - 1);
        let after = at.checked_add(size)?;
        (after <= self.end).then(|| {
            self.next = after;
            at
        })
    }

    /// Gives back `size` bytes at `addr` if this region handed them out (only the last
    /// allocation is taken back for reuse); false when `addr` is not the region's.
    pub(crate) fn give_back(&mut self, addr: usize, size: usize) -> bool {
        if !self.owns(addr) {
            return false;
        }
        if addr + size == self.next {
            self.next = addr;
        }
        true
    }

    /// Grows or shrinks the allocation at `addr` from `old` to `new` bytes in place, which
    /// works for the last allocation when the arena has room.
    pub(crate) fn resize_in_place(&mut self, addr: usize, old: usize, new: usize) -> bool {
        if addr + old != self.next {
            return false;
        }
        match addr.checked_add(new) {
            Some(after) if after <= self.end => {
                self.next = after;
                true
            }
            _ => false,
        }
    }
}

#[cfg(all(
    feature = "arena",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
mod global {
    use super::{ARENA_BYTES, Bump};
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    #[repr(align(16))]
    struct Buffer([u8; ARENA_BYTES]);

    static mut BUFFER: Buffer = Buffer([0; ARENA_BYTES]);

    struct Arena(Cell<Bump>);

    // SAFETY: this module is compiled only for wasm32 without the `atomics` feature, where a
    // component instance has exactly one thread.
    unsafe impl Sync for Arena {}

    impl Arena {
        fn with<R>(&self, f: impl FnOnce(&mut Bump) -> R) -> R {
            let mut b = self.0.get();
            if !b.is_set() {
                // SAFETY: only the buffer's address is taken; its bytes are handed out by `b`.
                let start = unsafe { &raw mut BUFFER.0 } as *mut u8 as usize;
                b = Bump::new(start, ARENA_BYTES);
            }
            let r = f(&mut b);
            self.0.set(b);
            r
        }
    }

    // SAFETY: every address handed out lies in BUFFER, aligned as asked and not handed out
    // again while in use (only the last allocation is ever taken back); everything else is the
    // standard allocator's.
    unsafe impl GlobalAlloc for Arena {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            match self.with(|b| b.take(layout.size(), layout.align())) {
                Some(at) => at as *mut u8,
                // SAFETY: the caller's layout, passed on.
                None => unsafe { System.alloc(layout) },
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if !self.with(|b| b.give_back(ptr as usize, layout.size())) {
                // SAFETY: not the arena's, so the standard allocator's, with its layout.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let addr = ptr as usize;
            match self.with(|b| {
                b.owns(addr)
                    .then(|| b.resize_in_place(addr, layout.size(), new_size))
            }) {
                // SAFETY: the standard allocator's block, with the caller's arguments.
                None => return unsafe { System.realloc(ptr, layout, new_size) },
                Some(true) => return ptr,
                Some(false) => {}
            }
            // SAFETY: the new layout keeps the old alignment (GlobalAlloc::realloc's contract
            // makes it valid); both blocks are live for the copied length.
            unsafe {
                let moved = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !moved.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                moved
            }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Arena = Arena(Cell::new(Bump::empty()));
}

#[cfg(test)]
mod tests {
    use super::Bump;

    #[test]
    fn takes_aligned_addresses_until_full() {
        let mut b = Bump::new(1000, 100);
        assert_eq!(b.take(3, 1), Some(1000));
        assert_eq!(b.take(8, 8), Some(1008), "aligned up past the 3 bytes");
        assert_eq!(b.take(84, 1), Some(1016));
        assert_eq!(b.take(1, 1), None, "full: the standard allocator's turn");
        assert!(b.owns(1000) && b.owns(1099) && !b.owns(1100) && !b.owns(999));
        assert_eq!(b.take(usize::MAX, 1), None, "no overflow");
    }

    #[test]
    fn only_the_last_allocation_is_given_back_or_resized_in_place() {
        let mut b = Bump::new(0x100, 64);
        let first = b.take(16, 8).unwrap();
        let second = b.take(16, 8).unwrap();
        assert!(b.give_back(first, 16));
        assert_eq!(b.take(8, 8), Some(second + 16), "the first stays taken");
        let third = second + 16;
        assert!(b.resize_in_place(third, 8, 32), "the last grows in place");
        assert!(!b.resize_in_place(second, 16, 24), "not the last");
        assert!(!b.resize_in_place(third, 32, 64), "past the end");
        assert!(b.give_back(third, 32));
        assert_eq!(b.take(32, 1), Some(third), "the last was given back");
        assert!(
            !b.give_back(0x40, 8),
            "not the region's: the standard allocator's"
        );
    }
}
