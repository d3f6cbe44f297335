//! The coarse clock: one timer for all quiet consoles instead of one each.
//!
//! Every console always has a far wake-up armed (its idle check, every eighth of the
//! idle timeout; a quiet console's next hand-over look, up to 8 s away), and a tokio
//! timer for it cost each idle console ~128 bytes of heap, some 6% of what it holds.
//! A wait of [`FAR`] or more is kept instead as a tick in the console's [`Alarm`], and
//! the session registry's sweep rings the due ones once a [`TICK`]: at most two ticks
//! late, which a wait that long can afford. Shorter waits keep a tokio timer.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// How often the sweep runs, and the clock's resolution.
pub const TICK: Duration = Duration::from_secs(1);
/// The shortest wait kept on this clock.
pub const FAR: Duration = Duration::from_secs(4);

/// Ticks count from here (the first use).
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Whole ticks from the origin to `at`: rounded down for the sweep's now, up for a
/// deadline (so that it is never rung early). Never 0, which means "none".
fn ticks_since_origin(at: Instant, round_up: bool) -> u32 {
    let since = at.saturating_duration_since(*ORIGIN.get_or_init(Instant::now)).as_nanos();
    let tick = TICK.as_nanos();
    let ticks = if round_up { since.div_ceil(tick) } else { since / tick };
    u32::try_from(ticks).unwrap_or(u32::MAX).max(1)
}

/// The tick the sweep is at now.
pub fn now() -> u32 {
    ticks_since_origin(Instant::now(), false)
}

/// The tick at which a wait until `at` is rung.
pub fn tick_of(at: Instant) -> u32 {
    ticks_since_origin(at, true)
}

/// A console's far wake-up: the tick it waits for (0: none), rung by the sweep.
#[derive(Debug, Default)]
pub struct Alarm(AtomicU32);

impl Alarm {
    /// Polls a wait until `at`, whose tick is `tick`. While the alarm is set for that
    /// tick it is pending at once: the console's task is polled at every message, and
    /// this costs it no look at the clock. Once rung (or set for another wait), it is
    /// ready if `at` has come, else set again; `register` (the waiter's waker) runs
    /// before it is set, so a ring in between still wakes it.
    pub fn poll_until(&self, at: Instant, tick: u32, register: impl FnOnce()) -> Poll<()> {
        if self.0.load(Ordering::Acquire) == tick {
            return Poll::Pending;
        }
        register();
        if Instant::now() >= at {
            self.0.store(0, Ordering::Relaxed);
            return Poll::Ready(());
        }
        self.0.store(tick, Ordering::Release);
        Poll::Pending
    }

    /// The sweep at tick `now`: true when this alarm was due (it is then cleared, and
    /// its waiter must be woken). A waiter woken early, its clock behind the sweep's,
    /// sets it again.
    pub fn ring(&self, now: u32) -> bool {
        let at = self.0.load(Ordering::Acquire);
        at != 0 && at <= now && self.0.compare_exchange(at, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}
