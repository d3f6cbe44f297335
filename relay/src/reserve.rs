//! A descriptor held in reserve, for when every other is taken: given up to accept one
//! connection (to answer it rather than leave it hanging), then taken back. nginx and
//! HAProxy keep one for the same reason. The control socket has a reserve of its own, so
//! an operator can still reach relay when it is out of descriptors, which is exactly when
//! an `instance reset` may be needed.

use std::fs::File;
use std::io;
use std::sync::Mutex;

pub struct Reserve(Mutex<Option<File>>);

impl Reserve {
    pub fn new() -> Reserve {
        Reserve(Mutex::new(File::open("/dev/null").ok()))
    }

    /// Gives the descriptor up; true if there was one to give.
    pub fn release(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take().is_some()
    }

    /// Takes a descriptor back into reserve, if one is free again.
    pub fn refill(&self) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            *held = File::open("/dev/null").ok();
        }
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::new()
    }
}

/// Out of descriptors, for this process or the whole system.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
