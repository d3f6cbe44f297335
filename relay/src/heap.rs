//! relay's allocator, and giving memory back after a crowd of consoles has gone.
//!
//! The binary allocates with jemalloc ([`Allocator`]), not glibc's malloc: tokio lays out
//! a task and each socket's registration at 128-byte alignment, and glibc serves such a
//! request by carving it out of a larger free chunk and freeing the misaligned ends,
//! scraps that other sizes seldom reuse. At 9,800 idle consoles: 1.8 KiB a console on
//! jemalloc, 2.2 on glibc (docs/architecture.md, "Limits").
//!
//! An allocator keeps freed memory for reuse, so without a trim relay's resident memory
//! stayed at its high-water mark (74 MB after 9,000 consoles had closed). Housekeeping
//! trims when the live consoles have fallen to half of their high since the last trim, or
//! by a quarter and stayed there for a tick; and once more on the first steady tick after
//! a trim made mid-fall, since consoles still closing then freed their memory after it.
//! Never on a steady load; a few times per wave.
#![allow(unsafe_code)] // the allocators' trim calls, through their C interfaces.

/// The allocator of relay's binary (its `#[global_allocator]`), and of the tests that
/// measure its memory.
#[cfg(feature = "jemalloc")]
pub use tikv_jemallocator::Jemalloc as Allocator;

/// A fall of fewer consoles than this is not worth a trim.
const WORTH_IT: usize = 64;

#[derive(Default)]
pub struct Trimmer {
    /// The most consoles seen live since the last trim.
    high: usize,
    /// The live consoles at the last look.
    last: usize,
    /// The last trim came while consoles were still closing: trim again once they stop.
    again: bool,
}

impl Trimmer {
    /// Looks at the consoles live now and the most live since the last look (once per
    /// housekeeping tick). True when it trimmed.
    pub fn look(&mut self, live: usize, high_since: usize) -> bool {
        let settled = live == self.last && high_since == live;
        self.last = live;
        self.high = self.high.max(high_since);
        let fell = self.high - live;
        let due = fell >= WORTH_IT && (live <= self.high / 2 || settled && fell >= self.high / 4);
        if due {
            self.high = live;
            self.again = !settled;
        } else if self.again && settled {
            self.again = false;
        } else {
            return false;
        }
        trim();
        true
    }
}

/// Returns the allocators' free memory to the kernel: jemalloc's, and glibc's (what C code
/// holds, or everything in a process that kept the default allocator).
pub fn trim() {
    #[cfg(feature = "jemalloc")]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge" is a command: it reads and writes no value.
        const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
        let none = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name, and null pointers with a zero length, which is
        // what a mallctl that takes and returns nothing expects.
        unsafe {
            tikv_jemalloc_sys::mallctl(PURGE_ALL.as_ptr(), none, none.cast(), none, 0);
        }
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; 0 keeps no padding.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_when_halved_and_never_on_a_steady_load() {
        let mut t = Trimmer::default();
        assert!(!t.look(1000, 1000));
        assert!(!t.look(900, 900), "falling");
        assert!(!t.look(900, 900), "settled, but a tenth is a steady load's wander");
        assert!(t.look(400, 400), "half gone: trim");
        assert!(!t.look(390, 390), "not again until it falls again, or settles");
        assert!(t.look(30, 30), "halved again");
        assert!(!t.look(10, 10), "small numbers are not worth it");
        assert!(t.look(10, 10), "but the fall has stopped: once more, for what closed after the last trim");
        assert!(!t.look(10, 10));
    }

    #[test]
    fn trims_the_tail_of_a_wave_once_it_has_settled() {
        let mut t = Trimmer::default();
        t.look(1000, 1000);
        assert!(t.look(499, 499), "half gone mid-wave");
        assert!(!t.look(300, 300), "still falling");
        assert!(t.look(300, 300), "the wave has settled a quarter lower");
        assert!(!t.look(300, 300), "once");
    }

    #[test]
    fn a_wave_gone_within_a_tick_is_trimmed_again_once_it_is_over() {
        let mut t = Trimmer::default();
        t.look(1000, 1000);
        t.look(1000, 1000);
        assert!(t.look(0, 0), "all gone");
        assert!(t.look(0, 0), "again: consoles still closing at the first trim freed their memory after it");
        assert!(!t.look(0, 0));
        assert!(!t.look(0, 0));
    }

    #[test]
    fn a_wave_that_came_and_went_between_two_looks_is_trimmed() {
        let mut t = Trimmer::default();
        assert!(!t.look(0, 0));
        assert!(t.look(0, 1000), "a thousand came and went within the tick");
        assert!(t.look(0, 0), "and once more when nothing has moved for a tick");
        assert!(!t.look(0, 0));
    }

    #[test]
    fn a_large_steady_load_that_wanders_is_never_trimmed() {
        let mut t = Trimmer::default();
        for i in 0..100 {
            let live = 10_000 + (i % 7) * 150 - 500;
            assert!(!t.look(live, live), "look {i}: {live} live");
            assert!(!t.look(live, live), "look {i}: {live} live, settled");
        }
    }
}
