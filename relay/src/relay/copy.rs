//! The portable userspace relay: one task, two pumps, any pair of streams. It also
//! carries a console that will move to a kernel back-end until the hand-over time.

use super::pump::{BUFFER, Pump, PumpError, SMALL_BUFFER};
use super::{Control, Ended, Established, Limits, Peer};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout};

/// Which direction a pump error came from.
enum Failure {
    Up(PumpError),
    Down(PumpError),
}

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
    match run(pair, control, limits, None).await {
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
    mut hand_over_at: Option<Instant>,
) -> Outcome<V, H> {
    let Established { mut viewer, viewer_buffered, mut hypervisor, hypervisor_buffered } = pair;
    // A console that will move to the kernel starts with small buffers: they are freed at
    // the move, and the heap keeps what it has grown to.
    let first = if hand_over_at.is_some() { SMALL_BUFFER } else { BUFFER };
    let mut retry = HAND_OVER_RETRY.0;
    let mut up = Pump::new(viewer_buffered, first, limits.buffer_bytes);
    let mut down = Pump::new(hypervisor_buffered, first, limits.buffer_bytes);
    let bytes = control.bytes.clone();
    let mut first_eof: Option<Ended> = None;
    let mut half_close_at: Option<Instant> = None;
    let mut idle = IdleClock::new(limits.idle_timeout, bytes.snapshot());
    // Which directions had finished when the loop last looked.
    let mut seen = (false, false);

    let outcome = loop {
        // Resolves only on an error or when a direction newly finishes: bytes flowing
        // never wake this loop, only the pumps' own tasks.
        let progress = poll_fn(|cx| {
            if !up.finished()
                && let Poll::Ready(Err(e)) = up.poll(cx, Pin::new(&mut viewer), Pin::new(&mut hypervisor), &bytes.to_hypervisor)
            {
                return Poll::Ready(Err(Failure::Up(e)));
            }
            if !down.finished()
                && let Poll::Ready(Err(e)) = down.poll(cx, Pin::new(&mut hypervisor), Pin::new(&mut viewer), &bytes.to_viewer)
            {
                return Poll::Ready(Err(Failure::Down(e)));
            }
            let now = (up.finished(), down.finished());
            if now != seen { Poll::Ready(Ok(now)) } else { Poll::Pending }
        });
        let half_close = super::deadline(half_close_at);
        tokio::select! {
            biased;
            reason = control.stopped() => {
                break Err(Ended::Stopped(reason));
            }
            r = progress => match r {
                Ok((true, true)) => break Ok(()),
                Ok(now) => {
                    seen = now;
                    if first_eof.is_none() {
                        first_eof = Some(if now.0 { Ended::ViewerClosed } else { Ended::HypervisorClosed });
                        half_close_at = Some(Instant::now() + limits.half_close_timeout);
                    }
                }
                Err(Failure::Up(e)) => break Err(failure(e, true, &viewer, &hypervisor)),
                Err(Failure::Down(e)) => break Err(failure(e, false, &viewer, &hypervisor)),
            },
            _ = half_close => break Err(Ended::HalfCloseTimeout),
            _ = idle.tick(), if idle.enabled() => {
                if idle.expired(bytes.snapshot()) {
                    break Err(Ended::Idle);
                }
            }
            _ = super::deadline(hand_over_at) => {
                // Only an open pair holding no byte moves: bytes a pump holds would have
                // to be written before the kernel may start, and a receiver that stalls
                // meanwhile could hold up the other direction for good. A half-closed
                // console finishes here.
                hand_over_at = if !(up.reading() && down.reading()) {
                    None
                } else if up.empty() && down.empty() {
                    return Outcome::HandOver(Established { viewer, viewer_buffered: Vec::new(), hypervisor, hypervisor_buffered: Vec::new() });
                } else {
                    let wait = retry;
                    retry = (retry * 2).min(HAND_OVER_RETRY.1);
                    Some(Instant::now() + wait)
                };
            }
        }
    };
    Outcome::Ended(match outcome {
        Ok(()) => first_eof.unwrap_or(Ended::ViewerClosed),
        Err(ended @ Ended::Stopped(_)) | Err(ended @ (Ended::Idle | Ended::HalfCloseTimeout)) => {
            // A clean end for both: FIN (or a WebSocket Close) to each, bounded in time.
            let _ = timeout(Duration::from_secs(1), async {
                let _ = viewer.shutdown().await;
                let _ = hypervisor.shutdown().await;
            })
            .await;
            ended
        }
        Err(ended) => ended,
    })
}

/// Classifies a pump error and arranges for the other side to see a reset where one
/// side reset.
fn failure<V: Peer, H: Peer>(e: PumpError, upstream: bool, viewer: &V, hypervisor: &H) -> Ended {
    let (err, viewer_side) = match e {
        PumpError::Read(err) => (err, upstream),
        PumpError::Write(err) => (err, !upstream),
    };
    let reset = matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted);
    if viewer_side {
        hypervisor.reset_on_close();
        if reset { Ended::ViewerReset } else { Ended::ViewerError(err.to_string()) }
    } else {
        viewer.reset_on_close();
        if reset { Ended::HypervisorReset } else { Ended::HypervisorError(err.to_string()) }
    }
}

/// Idleness, checked on a coarse tick against the byte counters, so that busy sessions
/// pay nothing per byte for it.
struct IdleClock {
    timeout: Option<Duration>,
    tick: tokio::time::Interval,
    last_bytes: (u64, u64),
    last_change: Instant,
}

impl IdleClock {
    fn new(timeout: Option<Duration>, bytes: (u64, u64)) -> Self {
        let period = timeout.map_or(Duration::from_secs(3600), |t| (t / 4).max(Duration::from_millis(100)));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        IdleClock { timeout, tick, last_bytes: bytes, last_change: Instant::now() }
    }
    fn enabled(&self) -> bool {
        self.timeout.is_some()
    }
    async fn tick(&mut self) {
        self.tick.tick().await;
    }
    fn expired(&mut self, bytes: (u64, u64)) -> bool {
        if bytes != self.last_bytes {
            self.last_bytes = bytes;
            self.last_change = Instant::now();
            return false;
        }
        self.timeout.is_some_and(|t| self.last_change.elapsed() >= t)
    }
}
