//! The portable userspace relay: one task, two pumps, any pair of streams. It also
//! carries a console that will move to a kernel back-end until the hand-over time.

use super::duplex::{Carrier, Event, drive};
use super::lifecycle::{Direction, Ended, Side};
use super::pump::{BUFFER, Pump, SMALL_BUFFER};
use super::{Control, Established, Limits, Peer};
use crate::session::ByteCounters;
use crate::wire::prefixed::Prefixed;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

/// How soon a hand-over put off by bytes in the pumps is tried again: at first, then
/// twice as long each time up to the most, so a console that is never quiet (a stalled
/// receiver) costs little.
const HAND_OVER_RETRY: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(250));

/// How the userspace relay let go of a session.
pub enum Outcome<V, H> {
    Ended(Ended),
    /// The hand-over time came (or came later) with both directions open and every byte
    /// read also written: the pair, for a kernel back-end.
    HandOver(Established<V, H>),
}

/// Relays the whole session in userspace.
pub async fn run_to_end<V: Peer, H: Peer>(pair: Established<V, H>, control: &mut Control, limits: Limits) -> Ended {
    match run::<V, H>(pair, control, limits, None).await {
        Outcome::Ended(ended) => ended,
        Outcome::HandOver(_) => unreachable!("no hand-over time was set"),
    }
}

/// Relays until the session ends or, with `hand_over_at`, until the first moment from
/// then on when both directions are open and no byte is held.
pub async fn run<V: Peer, H: Peer>(
    pair: Established<V, H>,
    control: &mut Control,
    limits: Limits,
    hand_over_at: Option<Instant>,
) -> Outcome<V, H> {
    let Established { mut viewer, hypervisor } = pair;
    if let Some(every) = limits.ws_ping {
        viewer.io.heartbeat(every);
    }
    // A console that will move to the kernel starts with small buffers: they are freed at
    // the move, and the heap keeps what it has grown to.
    let first = if hand_over_at.is_some() { SMALL_BUFFER } else { BUFFER };
    let mut pumps = Pumps {
        up: Pump::new(viewer.prefix, first, limits.buffer_bytes),
        down: Pump::new(hypervisor.prefix, first, limits.buffer_bytes),
        viewer: viewer.io,
        hypervisor: hypervisor.io,
        bytes: control.bytes.clone(),
        reported: [false; 2],
        hand_over: hand_over_at.map(|at| Box::pin(tokio::time::sleep_until(at))),
        retry: HAND_OVER_RETRY.0,
    };
    match drive(&mut pumps, control, &limits).await {
        Some(ended) => Outcome::Ended(ended),
        None => Outcome::HandOver(Established { viewer: Prefixed::bare(pumps.viewer), hypervisor: Prefixed::bare(pumps.hypervisor) }),
    }
}

/// Both directions of a console in userspace.
struct Pumps<V, H> {
    viewer: V,
    hypervisor: H,
    up: Pump,
    down: Pump,
    bytes: Arc<ByteCounters>,
    /// Directions whose end has been reported.
    reported: [bool; 2],
    /// When to try letting go of the console for a kernel back-end. Boxed: most consoles
    /// never arm it, and a live console's task should not carry a timer's room.
    hand_over: Option<Pin<Box<Sleep>>>,
    retry: Duration,
}

impl<V: Peer, H: Peer> Pumps<V, H> {
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
        self.poll_hand_over(cx)
    }

    /// Only an open pair holding no byte moves: bytes a pump holds would have to be
    /// written before the kernel may start, and a receiver that stalls meanwhile could
    /// hold up the other direction for good. A half-closed console finishes here.
    fn poll_hand_over(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let Some(sleep) = self.hand_over.as_mut() else { return Poll::Pending };
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if !(self.up.reading() && self.down.reading()) {
            self.hand_over = None;
            return Poll::Pending;
        }
        if self.up.empty() && self.down.empty() {
            self.hand_over = None;
            return Poll::Ready(Event::Released);
        }
        let wait = self.retry;
        self.retry = (self.retry * 2).min(HAND_OVER_RETRY.1);
        sleep.as_mut().reset(Instant::now() + wait);
        // Registers the new deadline's waker.
        let _ = sleep.as_mut().poll(cx);
        Poll::Pending
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
}
