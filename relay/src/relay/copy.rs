//! The portable userspace relay: one task, two pumps, any pair of streams. It also
//! carries a console that will move to a kernel back-end until the hand-over time, and
//! past it while the console is too quiet to be worth moving.

use super::duplex::{Carrier, Event, drive};
use super::lifecycle::{Direction, Ended, Side};
use super::pump::{BUFFER, Pump, SMALL_BUFFER};
use super::{Control, Established, Limits, Peer};
use crate::session::Shared;
use crate::wire::prefixed::Prefixed;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// How soon a hand-over put off by bytes in the pumps is tried again: at first, then
/// twice as long each time up to the most, so a console that is never quiet (a stalled
/// receiver) costs little.
const HAND_OVER_RETRY: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(250));

/// How much longer each look at a quiet console waits than the last, up to 8× the
/// hand-over time: a crowd of idle consoles should not wake every second for nothing.
const QUIET_LOOKS: (u32, u32) = (2, 8);

/// When a console bound for a kernel back-end may leave the userspace relay.
#[derive(Debug, Clone, Copy)]
pub struct HandOver {
    /// How long it stays here first, and how soon its traffic is looked at again after
    /// that (longer each time it is found quiet).
    pub after: Duration,
    /// The least it must have carried since the last look, in bytes a second (both ways
    /// together), to move as busy; 0 moves any console.
    pub min_rate: u64,
    /// A console under `min_rate` that carried bytes since a look after its first moves
    /// too, as quiet (to a back-end of its own: [`Pumps::moving`]).
    pub quiet: bool,
}

/// Why a console leaves the userspace relay, which picks the back-end it moves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moving {
    /// It carried `min_rate`.
    Busy,
    /// It keeps carrying bytes, under `min_rate`.
    Quiet,
}

/// A console's two directions in userspace, built before its future: a console's task
/// then holds them once, not once per layer of `async fn` they were passed through
/// (each such layer kept its own copy of the streams, and idle consoles paid for all).
pub fn pumps<V: Peer, H: Peer>(pair: Established<V, H>, control: &Control, limits: &Limits, hand_over: Option<HandOver>) -> Pumps<V, H> {
    let Established { mut viewer, hypervisor } = pair;
    if let Some(every) = limits.ws_ping() {
        viewer.io.heartbeat(every);
    }
    // A console that will move to the kernel starts with small buffers: they are freed at
    // the move, and the heap keeps what it has grown to.
    let first = if hand_over.is_some() { SMALL_BUFFER } else { BUFFER };
    Pumps {
        up: Pump::new(viewer.prefix, first, limits.buffer_bytes),
        down: Pump::new(hypervisor.prefix, first, limits.buffer_bytes),
        viewer: viewer.io,
        hypervisor: hypervisor.io,
        bytes: control.shared.clone(),
        reported: [false; 2],
        hand_over: hand_over.map(Waiting::new),
        moving: None,
    }
}

/// Relays the whole session in userspace.
pub async fn run_to_end<V: Peer, H: Peer>(pumps: &mut Pumps<V, H>, control: &mut Control, limits: &Limits) -> Ended {
    match drive(pumps, control, limits).await {
        Some(ended) => ended,
        None => unreachable!("no hand-over time was set"),
    }
}

/// Relays until the session ends (`Some`) or, with a hand-over rule, until the first
/// moment past its time when the console is busy enough, both directions are open and no
/// byte is held (`None`: [`Pumps::into_pair`] then gives the pair to a kernel back-end).
pub async fn run<V: Peer, H: Peer>(pumps: &mut Pumps<V, H>, control: &mut Control, limits: &Limits) -> Option<Ended> {
    drive(pumps, control, limits).await
}

/// Both directions of a console in userspace.
pub struct Pumps<V, H> {
    viewer: V,
    hypervisor: H,
    up: Pump,
    down: Pump,
    bytes: Arc<Shared>,
    /// Directions whose end has been reported.
    reported: [bool; 2],
    /// A hand-over still to come.
    hand_over: Option<Waiting>,
    /// Why it moves, once [`run`] has let go of it.
    moving: Option<Moving>,
}

/// A hand-over waiting for its time, for the console to be busy enough, then for a
/// quiet moment. Every console on `auto` holds one: times are u32 milliseconds after
/// `looked` (80 bytes with the rule and two instants, 56 so).
struct Waiting {
    /// When the console's traffic was last looked at (once it is busy: when a move was
    /// last tried), and the bytes it had carried both ways then.
    looked: Instant,
    seen: u64,
    /// The rate that makes it busy (the rule's `min_rate`).
    min_rate: u64,
    /// The rule's `quiet`, and whether the console has been looked at once already.
    quiet: bool,
    looked_once: bool,
    /// The next look only starts the count: it comes half-way through the hand-over
    /// time, so that the opening screen, sent at once, does not make a console busy.
    opening: bool,
    /// When to look next, after `looked` (on the console's one clock:
    /// [`Carrier::next_wake`]).
    at_ms: u32,
    /// How long until the next look while the console stays quiet, the longest that
    /// gets, and how soon a move put off by bytes in the pumps is tried again.
    every_ms: u32,
    longest_ms: u32,
    retry_ms: u32,
    /// The console qualified at the last look: only a quiet moment is still awaited.
    ready: Option<Moving>,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl<V: Peer, H: Peer> Pumps<V, H> {
    /// Why the console moves, once [`run`] has let go of it (busy, unless it moved as
    /// quiet).
    pub fn moving(&self) -> Moving {
        self.moving.unwrap_or(Moving::Busy)
    }

    /// The streams, once [`run`] has let go of them.
    pub fn into_pair(self) -> Established<V, H> {
        Established { viewer: Prefixed::bare(self.viewer), hypervisor: Prefixed::bare(self.hypervisor) }
    }

    /// Moves bytes both ways; ready with the first event. Bytes flowing never complete
    /// it: the pumps' wake-ups come back here without waking the console's loop.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let Pumps { viewer, hypervisor, up, down, bytes, .. } = self;
        if !up.finished()
            && let Poll::Ready(Err(e)) = up.poll(cx, Pin::new(viewer), Pin::new(hypervisor), &bytes.to_hypervisor)
        {
            return Poll::Ready(Event::Failed(e.of(Direction::Up)));
        }
        if !down.finished()
            && let Poll::Ready(Err(e)) = down.poll(cx, Pin::new(hypervisor), Pin::new(viewer), &bytes.to_viewer)
        {
            return Poll::Ready(Event::Failed(e.of(Direction::Down)));
        }
        for (dir, finished) in [(Direction::Up, up.finished()), (Direction::Down, down.finished())] {
            if finished && !self.reported[dir.index()] {
                self.reported[dir.index()] = true;
                return Poll::Ready(Event::Finished(dir));
            }
        }
        Poll::Pending
    }
}

impl Waiting {
    fn new(rule: HandOver) -> Waiting {
        // With a bar to judge and time to split (not at 1 ms), the opening look comes
        // half-way, and the first real one at the hand-over time.
        let after = millis(rule.after).max(1);
        let opening = rule.min_rate > 0 && after >= 2;
        let first = if opening { after / 2 } else { after };
        Waiting {
            looked: Instant::now(),
            seen: 0,
            min_rate: rule.min_rate,
            quiet: rule.quiet,
            looked_once: false,
            opening,
            at_ms: first,
            every_ms: if opening { after - first } else { after },
            longest_ms: millis(rule.after * QUIET_LOOKS.1),
            retry_ms: millis(HAND_OVER_RETRY.0),
            ready: (rule.min_rate == 0).then_some(Moving::Busy),
        }
    }

    fn at(&self) -> Instant {
        self.looked + Duration::from_millis(self.at_ms.into())
    }

    fn every(&self) -> Duration {
        Duration::from_millis(self.every_ms.into())
    }

    /// Looks at what the console carried since the last look; `Some` once it may move.
    /// Busy: it carried `min_rate`. Quiet (with the rule's `quiet`): it carried less, but
    /// something, at a real look after its first (2 × the hand-over time at the
    /// earliest): an opening screen that runs past the opening look (a slow link, a short
    /// hand-over time) does not move a console silent after it out of here, where it
    /// holds least. The opening look only starts the count, so the first real look
    /// covers the hand-over time's second half: a full screen in raw pixels is over a
    /// megabyte (QEMU's 720×400: 1.15 MB), sent in the first milliseconds, and would send
    /// a console that then idles to the ring, where it holds more. A stream carries on
    /// through the second half.
    fn look(&mut self, (up, down): (u64, u64)) -> Option<Moving> {
        let carried = (up + down).saturating_sub(self.seen);
        let now = Instant::now();
        let elapsed = now.duration_since(self.looked).as_secs_f64();
        (self.seen, self.looked) = (up + down, now);
        if std::mem::take(&mut self.opening) {
            return None;
        }
        let looked_before = std::mem::replace(&mut self.looked_once, true);
        self.ready = if carried as f64 >= self.min_rate as f64 * elapsed {
            Some(Moving::Busy)
        } else if self.quiet && looked_before && carried > 0 {
            Some(Moving::Quiet)
        } else {
            self.every_ms = self.every_ms.saturating_mul(QUIET_LOOKS.0).min(self.longest_ms);
            None
        };
        self.ready
    }
}

impl<V: Peer, H: Peer> Carrier for Pumps<V, H> {
    fn next(&mut self) -> impl Future<Output = Event> + Send {
        poll_fn(|cx| self.poll_event(cx))
    }

    fn bytes(&self) -> (u64, u64) {
        self.bytes.snapshot()
    }

    fn reset(&mut self, side: Side) {
        match side {
            Side::Viewer => self.viewer.reset_on_close(),
            Side::Hypervisor => self.hypervisor.reset_on_close(),
        }
    }

    async fn close(&mut self) {
        let _ = self.viewer.shutdown().await;
        let _ = self.hypervisor.shutdown().await;
    }

    fn next_wake(&self) -> Option<Instant> {
        self.hand_over.as_ref().map(Waiting::at)
    }

    /// Only an open pair holding no byte moves: bytes a pump holds would have to be
    /// written before the kernel may start, and a receiver that stalls meanwhile could
    /// hold up the other direction for good. A half-closed console finishes here.
    fn wake(&mut self) -> bool {
        let now = Instant::now();
        let Some(pending) = self.hand_over.as_mut().filter(|w| w.at() <= now) else { return false };
        if !(self.up.reading() && self.down.reading()) {
            self.hand_over = None;
            return false;
        }
        let wait = if pending.ready.is_none() && pending.look(self.bytes.snapshot()).is_none() {
            pending.every()
        } else if self.up.empty() && self.down.empty() {
            self.moving = pending.ready;
            self.hand_over = None;
            return true;
        } else {
            let wait = Duration::from_millis(pending.retry_ms.into());
            pending.retry_ms = millis((wait * 2).min(HAND_OVER_RETRY.1));
            // Ready for good now: `looked` only anchors the next try.
            pending.looked = now;
            wait
        };
        pending.at_ms = millis(wait);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console's hand-over past its opening look, `opening` bytes carried by then.
    async fn waiting(after: Duration, min_rate: u64, quiet: bool, opening: u64) -> Waiting {
        let mut w = Waiting::new(HandOver { after, min_rate, quiet });
        assert_eq!(w.every(), after / 2);
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((0, opening)), None, "the opening look only starts the count");
        assert_eq!(w.every(), after / 2, "the first real look comes at the hand-over time");
        w
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_screen_does_not_make_a_console_busy_but_a_stream_does() {
        let second = Duration::from_secs(1);
        // 1.2 MB in the first half-second, then a few keystrokes: not busy at 1 MB/s.
        let mut w = waiting(second, 1_000_000, true, 1_200_000).await;
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((40, 1_200_040)), None, "the screen before the opening look is not counted");
        // 1 MB/s on: busy at the hand-over time.
        let mut w = waiting(second, 1_000_000, true, 600_000).await;
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((0, 1_100_000)), Some(Moving::Busy));
        // Without a bar every console moves at the hand-over time, without a look.
        let w = Waiting::new(HandOver { after: second, min_rate: 0, quiet: true });
        assert_eq!((w.ready, w.every(), w.opening), (Some(Moving::Busy), second, false));
        assert_eq!(w.at(), w.looked + second, "not at half of it");
        // At 1 ms there is no half to look at: the looks still back off.
        let mut w = Waiting::new(HandOver { after: Duration::from_millis(1), min_rate: 1000, quiet: false });
        assert!(!w.opening);
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((0, 0)), None);
        assert_eq!(w.every(), Duration::from_millis(2));
    }

    #[test]
    fn every_console_on_auto_holds_a_compact_hand_over() {
        assert!(size_of::<Waiting>() <= 56, "Waiting grew to {} bytes", size_of::<Waiting>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_console_is_looked_at_less_and_less_often_then_moves_once_busy() {
        let second = Duration::from_secs(1);
        let mut w = waiting(second, 1000, false, 0).await;
        // 500 bytes a second: under the bar; the next look comes twice as late each time,
        // up to 8 seconds.
        let mut total = 0;
        for expected in [1, 2, 4, 8, 8] {
            tokio::time::advance(w.every()).await;
            total += 500 * w.every().as_millis() as u64 / 1000;
            assert_eq!(w.look((total, 0)), None, "quiet at {total} bytes");
            assert_eq!(w.every(), second * expected);
        }
        // 1000 bytes a second since the last look, both ways together: busy.
        tokio::time::advance(w.every()).await;
        total += 500 * w.every().as_secs();
        assert_eq!(w.look((total, 500 * w.every().as_secs())), Some(Moving::Busy));
        assert_eq!(w.ready, Some(Moving::Busy));
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_quiet_tier_a_console_moves_as_quiet_once_it_carries_bytes_after_its_first_look() {
        let second = Duration::from_secs(1);
        // The end of its opening screen in the first real look's window, then silence: it
        // stays.
        let mut w = waiting(second, 1000, true, 600).await;
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((0, 700)), None, "the first real look never moves a console as quiet");
        for _ in 0..3 {
            tokio::time::advance(w.every()).await;
            assert_eq!(w.look((0, 700)), None, "silent since: it stays");
        }
        // A keystroke's echo since the last look: it moves as quiet.
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((8, 708)), Some(Moving::Quiet));
        // Busy at the first look moves it as busy, quiet tier or not.
        let mut w = waiting(second, 1000, true, 0).await;
        tokio::time::advance(w.every()).await;
        assert_eq!(w.look((0, 2000)), Some(Moving::Busy));
        // Without the tier, bytes under the bar never move it.
        let mut w = waiting(second, 1000, false, 0).await;
        for total in [100, 200, 300, 400] {
            tokio::time::advance(w.every()).await;
            assert_eq!(w.look((0, total)), None);
        }
    }
}
