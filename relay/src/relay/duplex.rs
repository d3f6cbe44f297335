//! The one loop every back-end's console runs in: two half-duplex directions, carried by
//! the back-end, under one [`Lifecycle`]. A back-end only says what happened to its
//! directions ([`Event`]) and how to end the console when relay must; the rules for how
//! it ended, the timers and the forced disconnect are here, once.

use super::lifecycle::{Direction, Ended, Failure, Lifecycle, Side, earliest};
use super::{Control, Limits, deadline};
use std::time::Duration;
use tokio::time::Instant;

/// What a back-end reports about the directions it carries.
pub enum Event {
    /// This direction passed its sender's end of stream on to the receiver.
    Finished(Direction),
    /// A side failed; the back-end has stopped carrying bytes.
    Failed(Failure),
}

/// A back-end carrying one console.
pub trait Carrier {
    /// The next event. Cancel-safe: dropping the future loses nothing.
    fn next(&mut self) -> impl Future<Output = Event> + Send;
    /// Bytes moved so far each way (up, down), whichever layer moved them.
    fn bytes(&self) -> (u64, u64);
    /// Makes the next close of `side` a reset.
    fn reset(&mut self, side: Side);
    /// Relay ends the console itself: a clean end (FIN, a WebSocket Close) to both sides,
    /// bounded in time by the caller.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// When the carrier wants to look at its console again, on the console's one clock
    /// (one timer per console, not one per concern).
    fn next_wake(&self) -> Option<Instant> {
        None
    }
    /// Its time has come (or a timer of the console's woke it early): true when it lets
    /// go of the console, with both directions open and no byte held (the userspace relay
    /// at the hand-over time).
    fn wake(&mut self) -> bool {
        false
    }
}

/// How long relay waits for a clean end it imposes to reach both sides.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Runs a console until it ends, or until its carrier lets go of it (`None`).
pub async fn drive(carrier: &mut impl Carrier, control: &mut Control, limits: &Limits) -> Option<Ended> {
    let mut life = Lifecycle::new(limits, carrier.bytes());
    let imposed = loop {
        let wake_at = earliest(life.next_wake(), carrier.next_wake());
        tokio::select! {
            biased;
            reason = control.stopped() => break Ended::Stopped(reason),
            event = carrier.next() => match event {
                Event::Finished(dir) => {
                    if life.finished(dir) {
                        return Some(life.into_ended());
                    }
                }
                Event::Failed(failure) => {
                    if let Some(side) = life.failed(failure) {
                        carrier.reset(side);
                    }
                    return Some(life.into_ended());
                }
            },
            () = deadline(&control.shared.stop, wake_at) => {
                if let Some(ended) = life.wake(carrier.bytes()) {
                    break ended;
                }
                if carrier.wake() {
                    return None;
                }
            }
        }
    };
    // Boxed: every console's future would otherwise keep room for this last step's timer.
    let _ = Box::pin(tokio::time::timeout(CLOSE_WAIT, carrier.close())).await;
    Some(imposed)
}
