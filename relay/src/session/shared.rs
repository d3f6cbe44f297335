//! What a live session's registry entry and its console share: the byte counters and the
//! stop signal (with the console's far wake-up on the coarse clock).

use futures_util::task::AtomicWaker;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use crate::clock::Alarm;

/// Bytes relayed so far, per direction; shared with the relay that counts them.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub to_hypervisor: AtomicU64,
    pub to_viewer: AtomicU64,
    /// While the kernel relays the session: the socket cookies (viewer's, hypervisor's)
    /// whose flow maps count the kernel's share, which the fields above leave out.
    pub kernel: [AtomicU64; 2],
}

impl ByteCounters {
    /// Bytes counted in userspace (all of them, once the session has ended).
    pub fn snapshot(&self) -> (u64, u64) {
        (self.to_hypervisor.load(Ordering::Relaxed), self.to_viewer.load(Ordering::Relaxed))
    }

    /// Live totals: `kernel` maps a socket cookie to the bytes the kernel has relayed from
    /// that socket.
    pub fn live(&self, kernel: impl Fn(u64) -> u64) -> (u64, u64) {
        let (up, down) = self.snapshot();
        let from = |i: usize| match self.kernel[i].load(Ordering::Relaxed) {
            0 => 0,
            cookie => kernel(cookie),
        };
        (up + from(0), down + from(1))
    }
}

/// What a live session's registry entry and its console share: its byte counters (what
/// it derefs to, as the relay counts) and its stop, in one allocation: every idle console
/// holds one, and two cost it ~50 bytes more.
#[derive(Debug, Default)]
pub struct Shared {
    counters: ByteCounters,
    pub stop: Stop,
}

impl std::ops::Deref for Shared {
    type Target = ByteCounters;
    fn deref(&self) -> &ByteCounters {
        &self.counters
    }
}

/// A session's end when relay imposes it (forced disconnect, expiry, shutdown): set once,
/// the first reason kept, awaited by the console's own task; and the console's far
/// wake-up on the coarse clock, which the same waiter awaits. One waiter at a time (the
/// handshake, then the relay, in turn), so a single waker slot does: a watch channel, then
/// a `Notify` whose wait future alone was 104 bytes, cost every idle console more.
#[derive(Debug, Default)]
pub struct Stop {
    reason: OnceLock<Box<str>>,
    alarm: Alarm,
    waiter: AtomicWaker,
}

impl Stop {
    /// Ends the session for `reason`, unless it was already told to end.
    pub fn set(&self, reason: &str) {
        if self.reason.set(reason.into()).is_ok() {
            self.waiter.wake();
        }
    }

    /// Why the session must end, once it must.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(|r| &**r)
    }

    /// Resolves, with the reason, when the session must end. Only one task may wait at a
    /// time: a second waiter takes the first one's place.
    pub fn wait(&self) -> impl Future<Output = String> + Send + '_ {
        std::future::poll_fn(|cx| {
            // Registered before the look, so a `set` in between still wakes it.
            self.waiter.register(cx.waker());
            match self.reason() {
                Some(reason) => Poll::Ready(reason.to_string()),
                None => Poll::Pending,
            }
        })
    }

    /// Ready at `at` (its tick: [`crate::clock::tick_of`]), a far deadline, on the coarse clock:
    /// the registry's sweep rings it at most two ticks late ([`crate::clock`]). The same
    /// waiter as [`Stop::wait`].
    pub fn poll_far_deadline(&self, at: tokio::time::Instant, tick: u32, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.alarm.poll_until(at, tick, || self.waiter.register(cx.waker()))
    }

    /// The sweep at tick `now`: wakes the waiter if its alarm is due.
    pub(super) fn ring(&self, now: u32) {
        if self.alarm.ring(now) {
            self.waiter.wake();
        }
    }
}
