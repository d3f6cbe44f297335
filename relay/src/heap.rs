//! Giving memory back after a crowd of consoles has gone. glibc's allocator keeps freed
//! memory in its per-thread arenas, so without a trim relay's resident memory stayed at
//! its high-water mark (74 MB after 9,000 consoles had closed). Housekeeping trims when the
//! live consoles have fallen to half of their peak since the last trim: never on a steady
//! load, once after each wave.
#![allow(unsafe_code)] // malloc_trim through libc.

/// Consoles below which a wave is too small to be worth a trim.
const WORTH_IT: usize = 64;

#[derive(Default)]
pub struct Trimmer {
    peak: usize,
}

impl Trimmer {
    /// Looks at the live consoles now; trims once they have fallen to half of the peak.
    /// True when it trimmed.
    pub fn look(&mut self, live: usize) -> bool {
        self.peak = self.peak.max(live);
        if self.peak < WORTH_IT || live > self.peak / 2 {
            return false;
        }
        self.peak = live;
        trim();
        true
    }
}

/// Returns the allocator's free memory to the kernel.
pub fn trim() {
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
    fn trims_once_per_wave_and_never_on_a_steady_load() {
        let mut t = Trimmer::default();
        assert!(!t.look(1000));
        assert!(!t.look(900), "a steady load");
        assert!(t.look(400), "half gone: trim");
        assert!(!t.look(390), "not again until it halves again");
        assert!(t.look(30), "halved again");
        assert!(!t.look(10), "small numbers are not worth it");
    }
}
