//! Wakes each farm console at its own instant. tokio's timers fire on whole milliseconds,
//! so 2,000 consoles sending every 100 ms with phases 50 µs apart would send in bursts of
//! 20 at each millisecond, and those bursts (not the steady rate the farm offers) would
//! set every path's tail. One thread sleeps on the kernel's high-resolution timers, with
//! a timer slack of 1 µs, to the next console's instant and wakes the task of every
//! console whose instant has come; it sleeps at least a slot (250 µs by default) between
//! wake-ups, since a timer wake-up per message took this thread 45% of a core.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A console's ticks: from `first` every `every`, until `end`. The pacer wakes at most
/// once a `slot`, and then wakes every console whose instant has come.
pub struct Schedule {
    pub firsts: Vec<Instant>,
    pub every: Duration,
    pub end: Instant,
    pub slot: Duration,
}

/// One waker per console, in the order of `firsts`; past `end`, every console is woken
/// once more so that it sees the end.
pub fn start(schedule: Schedule) -> std::io::Result<Vec<Arc<Notify>>> {
    let Schedule { firsts, every, end, slot } = schedule;
    let wakers: Vec<Arc<Notify>> = firsts.iter().map(|_| Arc::new(Notify::new())).collect();
    let mut order: Vec<usize> = (0..firsts.len()).collect();
    order.sort_by_key(|&i| firsts[i]);
    let ours = wakers.clone();
    std::thread::Builder::new().name("farm-pacer".into()).spawn(move || {
        precise_sleeps();
        let mut woke = Instant::now();
        'rounds: for round in 0u32.. {
            for &i in &order {
                let at = firsts[i] + every * round;
                if at >= end {
                    break 'rounds;
                }
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at.max(woke + slot) - now);
                    woke = Instant::now();
                }
                ours[i].notify_one();
            }
        }
        for waker in &ours {
            waker.notify_one();
        }
    })?;
    Ok(wakers)
}

/// This thread's sleeps end within about a microsecond of their time, not up to 50 µs
/// late (the default timer slack, most of a phase step).
#[allow(unsafe_code)] // prctl through libc.
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
}
