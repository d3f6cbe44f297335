//! One session on the sockmap back-end.
//!
//! Hand-off: bytes the handshakes left in userspace go out first; then both sockets enter
//! the maps and the receive low-water mark is set, so bytes already queued in the kernel
//! run through the verdict, in order. From then on userspace is woken only by:
//! - bytes the program passed back (a receiver fell behind its in-flight cap): relay them
//!   once the kernel's backlog towards that receiver has left, then grant a new cap;
//! - end of stream: forward the FIN once everything before it has left;
//! - a reset or error: pass a reset on and end;
//! - a forced disconnect, or the idle and half-close timers.

mod direction;
mod handoff;

pub use handoff::Refused;

use super::Sockmap;
use super::watch::Watched;
use crate::relay::duplex::{Carrier, Event, drive};
use crate::relay::lifecycle::{Direction, Ended, Side};
use crate::relay::{Control, Established, Limits, send_leftovers};
use crate::session::ByteCounters;
use crate::wire::prefixed::Prefixed;
use direction::direction;
use handoff::{Handoff, drain, handoff};
use std::future::poll_fn;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;

pub(super) type Std = std::net::TcpStream;

/// One socket of the session, as the kernel relay sees it.
pub(super) struct Socket {
    /// News of bytes passed back, end of stream and errors (not of every redirected skb).
    /// Declared before `io`: it leaves the watcher's set before the socket closes.
    watch: Watched,
    /// Non-blocking, in no reactor: the watcher wakes the session, and writes that must
    /// wait register a duplicate for writability.
    io: Std,
    cookie: u64,
    /// Bytes that had entered this socket's send queue at hand-off.
    sent_at_handoff: u64,
}

/// Bytes of one direction relayed by userspace after hand-off (after a fall-back); the
/// kernel's share is in the flow map.
pub(super) struct Userspace<'a> {
    /// Relayed by userspace after hand-off.
    written: AtomicU64,
    /// The session's counter for this direction (userspace's share; the kernel's is in
    /// the flow map until the session ends).
    counter: &'a AtomicU64,
}

/// Runs a raw session in the kernel; `attached` is called once the kernel has it. Gives
/// the sockets back (with what is still to be relayed) when the kernel cannot take it.
pub async fn run(
    engine: &Sockmap,
    mut pair: Established<TcpStream, TcpStream>,
    control: &mut Control,
    limits: Limits,
    attached: impl FnOnce(),
) -> Result<Ended, Refused> {
    // The kernel hands the verdict whole skbs: one that userspace has partly read would be
    // relayed again from its start. So empty both receive queues first; what arrives after
    // that is whole.
    let drained = drain(&pair.viewer.io, &mut pair.viewer.prefix).and_then(|()| drain(&pair.hypervisor.io, &mut pair.hypervisor.prefix));
    if let Err(why) = drained {
        return Err(Refused { pair, why });
    }
    // Bytes already read in userspace precede anything the kernel will move.
    if let Err(ended) = send_leftovers(&mut pair, control).await {
        return Ok(ended);
    }
    let bytes = control.shared.clone();
    let (viewer, hypervisor) = match handoff(engine, pair.viewer.io, pair.hypervisor.io) {
        Ok(sockets) => sockets,
        Err(Handoff::Refused(viewer, hypervisor, why)) => {
            return Err(Refused { pair: Established { viewer: Prefixed::bare(viewer), hypervisor: Prefixed::bare(hypervisor) }, why });
        }
        Err(Handoff::Lost(ended)) => return Ok(ended),
    };
    attached();
    // From now on the live totals include what the kernel has counted.
    bytes.kernel[0].store(viewer.cookie, Ordering::Relaxed);
    bytes.kernel[1].store(hypervisor.cookie, Ordering::Relaxed);
    let up_user = Userspace { written: AtomicU64::new(0), counter: &bytes.to_hypervisor };
    let down_user = Userspace { written: AtomicU64::new(0), counter: &bytes.to_viewer };
    let up = direction(engine, Direction::Up, (&viewer, &hypervisor), &up_user, &limits);
    let down = direction(engine, Direction::Down, (&hypervisor, &viewer), &down_user, &limits);
    tokio::pin!(up, down);
    let mut in_kernel = InKernel {
        engine,
        session: control.session,
        viewer: &viewer,
        hypervisor: &hypervisor,
        up: Some(up),
        down: Some(down),
        bytes: &bytes,
    };
    let ended = drive(&mut in_kernel, control, &limits).await.expect("a console in the kernel is never released");
    settle(engine, control.session, &bytes, &viewer, &hypervisor);
    engine.finish(viewer.cookie);
    engine.finish(hypervisor.cookie);
    Ok(ended)
}

/// A console the verdict program carries, with its two directions' userspace watchers.
struct InKernel<'a, U, D> {
    engine: &'a Sockmap,
    session: u64,
    viewer: &'a Socket,
    hypervisor: &'a Socket,
    /// Until each has ended.
    up: Option<Pin<&'a mut U>>,
    down: Option<Pin<&'a mut D>>,
    bytes: &'a ByteCounters,
}

impl<U, D> Carrier for InKernel<'_, U, D>
where
    U: Future<Output = Result<(), crate::relay::lifecycle::Failure>> + Send,
    D: Future<Output = Result<(), crate::relay::lifecycle::Failure>> + Send,
{
    fn next(&mut self) -> impl Future<Output = Event> + Send {
        poll_fn(|cx| {
            if let Some(up) = self.up.as_mut()
                && let Poll::Ready(r) = up.as_mut().poll(cx)
            {
                self.up = None;
                return Poll::Ready(r.map_or_else(Event::Failed, |()| Event::Finished(Direction::Up)));
            }
            if let Some(down) = self.down.as_mut()
                && let Poll::Ready(r) = down.as_mut().poll(cx)
            {
                self.down = None;
                return Poll::Ready(r.map_or_else(Event::Failed, |()| Event::Finished(Direction::Down)));
            }
            Poll::Pending
        })
    }

    fn bytes(&self) -> (u64, u64) {
        self.bytes.live(|cookie| self.engine.flow(cookie).map_or(0, |f| f.redirected))
    }

    fn reset(&mut self, side: Side) {
        let socket = if side == Side::Viewer { self.viewer } else { self.hypervisor };
        let _ = socket2::SockRef::from(&socket.io).set_linger(Some(Duration::ZERO));
    }

    async fn close(&mut self) {
        // The kernel's share is counted before the program lets go of the flows; then
        // the program stops touching both sockets, and both ends see a clean EOF.
        settle(self.engine, self.session, self.bytes, self.viewer, self.hypervisor);
        self.engine.release(self.viewer.cookie);
        self.engine.release(self.hypervisor.cookie);
        let _ = self.viewer.io.shutdown(Shutdown::Both);
        let _ = self.hypervisor.io.shutdown(Shutdown::Both);
    }
}

/// Moves the kernel's share of the byte counts into the session's counters, once (the
/// flows hold it until released), and logs the program's counters where they matter.
fn settle(engine: &Sockmap, session: u64, bytes: &ByteCounters, viewer: &Socket, hypervisor: &Socket) {
    if bytes.kernel[0].swap(0, Ordering::Relaxed) == 0 {
        return;
    }
    bytes.kernel[1].store(0, Ordering::Relaxed);
    let flows = (engine.flow(viewer.cookie), engine.flow(hypervisor.cookie));
    bytes.to_hypervisor.fetch_add(flows.0.map_or(0, |f| f.redirected), Ordering::Relaxed);
    bytes.to_viewer.fetch_add(flows.1.map_or(0, |f| f.redirected), Ordering::Relaxed);
    if let (Some(up), Some(down)) = flows
        && (up.trimmed + down.trimmed + up.dropped + down.dropped + up.skipped + down.skipped > 0
            || tracing::enabled!(tracing::Level::DEBUG))
    {
        tracing::info!(
            session,
            up_redirected = up.redirected,
            up_passed = up.passed,
            up_fallbacks = up.fallbacks,
            down_redirected = down.redirected,
            down_passed = down.passed,
            down_fallbacks = down.fallbacks,
            up_trimmed = up.trimmed,
            down_trimmed = down.trimmed,
            dropped = up.dropped + down.dropped,
            cut_failures = up.cut_failures + down.cut_failures,
            up_skipped = up.skipped,
            down_skipped = down.skipped,
            "sockmap session counters"
        );
    }
}
