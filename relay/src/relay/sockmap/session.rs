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
use crate::relay::{Control, Ended, Limits, deadline, send_leftovers};
use direction::direction;
use handoff::{Handoff, drain, handoff};
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(super) type Std = std::net::TcpStream;

/// One socket of the session, as the kernel relay sees it.
pub(super) struct Side {
    /// Registered for readability only: with the verdict program in place, that fires for
    /// bytes passed back, end of stream and errors, not for every redirected skb.
    fd: AsyncFd<Std>,
    cookie: u64,
    /// Bytes that had entered this socket's send queue at hand-off.
    sent_at_handoff: u64,
}

/// How one direction failed.
pub(super) enum Failure {
    /// Reading from the sender failed.
    From(io::Error),
    /// Writing to the receiver failed.
    To(io::Error),
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

/// Runs a raw session in the kernel. Gives the sockets back (with what is still to be
/// relayed) when the kernel cannot take it.
pub async fn run(
    engine: &Sockmap,
    (viewer, viewer_buffered): (TcpStream, Vec<u8>),
    (hypervisor, hypervisor_buffered): (TcpStream, Vec<u8>),
    control: &mut Control,
    limits: Limits,
) -> Result<Ended, Refused> {
    let (mut viewer, mut hypervisor) = (viewer, hypervisor);
    let (mut viewer_buffered, mut hypervisor_buffered) = (viewer_buffered, hypervisor_buffered);
    // The kernel hands the verdict whole skbs: one that userspace has partly read would be
    // relayed again from its start. So empty both receive queues first; what arrives after
    // that is whole.
    let drained = drain(&viewer, &mut viewer_buffered).and_then(|()| drain(&hypervisor, &mut hypervisor_buffered));
    if let Err(why) = drained {
        return Err((viewer, hypervisor, why, viewer_buffered, hypervisor_buffered));
    }
    // Bytes already read in userspace precede anything the kernel will move.
    let bytes = control.bytes.clone();
    if let Err(ended) = send_leftovers((&mut viewer, &viewer_buffered), (&mut hypervisor, &hypervisor_buffered), control).await {
        return Ok(ended);
    }
    let up_user = Userspace { written: AtomicU64::new(0), counter: &bytes.to_hypervisor };
    let down_user = Userspace { written: AtomicU64::new(0), counter: &bytes.to_viewer };
    drop((viewer_buffered, hypervisor_buffered));

    let (viewer, hypervisor) = match handoff(engine, viewer, hypervisor) {
        Ok(pair) => pair,
        Err(Handoff::Refused(v, h, why)) => return Err((v, h, why, Vec::new(), Vec::new())),
        Err(Handoff::Lost(why)) => return Ok(Ended::HypervisorError(format!("hand-off to the kernel failed: {why}"))),
    };

    // From now on the live totals include what the kernel has counted.
    bytes.kernel[0].store(viewer.cookie, Ordering::Relaxed);
    bytes.kernel[1].store(hypervisor.cookie, Ordering::Relaxed);
    let up = direction(engine, &viewer, &hypervisor, &up_user, &limits);
    let down = direction(engine, &hypervisor, &viewer, &down_user, &limits);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut first_eof: Option<Ended> = None;
    let mut half_close_at: Option<Instant> = None;
    let mut idle_seen: Option<(u64, u64)> = None;
    let idle_every = limits.idle_timeout;
    let mut idle_at = idle_every.map(|d| Instant::now() + d);
    let live = || bytes.live(|cookie| engine.flow(cookie).map_or(0, |f| f.redirected));

    let ended = loop {
        let (half_close, idle) = (deadline(half_close_at), deadline(idle_at));
        tokio::select! {
            biased;
            reason = control.stopped() => {
                // The program stops touching both sockets, then both ends see a clean EOF.
                engine.release(viewer.cookie);
                engine.release(hypervisor.cookie);
                let _ = viewer.fd.get_ref().shutdown(Shutdown::Both);
                let _ = hypervisor.fd.get_ref().shutdown(Shutdown::Both);
                break Ended::Stopped(reason);
            }
            r = &mut up, if !up_done => match r {
                Ok(()) => {
                    up_done = true;
                    first_eof.get_or_insert(Ended::ViewerClosed);
                }
                Err(Failure::From(e)) => break fail(e, &hypervisor, Ended::ViewerReset, Ended::ViewerError),
                Err(Failure::To(e)) => break fail(e, &viewer, Ended::HypervisorReset, Ended::HypervisorError),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => {
                    down_done = true;
                    first_eof.get_or_insert(Ended::HypervisorClosed);
                }
                Err(Failure::From(e)) => break fail(e, &viewer, Ended::HypervisorReset, Ended::HypervisorError),
                Err(Failure::To(e)) => break fail(e, &hypervisor, Ended::ViewerReset, Ended::ViewerError),
            },
            () = half_close => break Ended::HalfCloseTimeout,
            () = idle => {
                let now = live();
                if idle_seen == Some(now) {
                    break Ended::Idle;
                }
                idle_seen = Some(now);
                idle_at = idle_every.map(|d| Instant::now() + d);
            }
        }
        if up_done && down_done {
            break first_eof.clone().unwrap_or(Ended::ViewerClosed);
        }
        if (up_done || down_done) && half_close_at.is_none() {
            half_close_at = Some(Instant::now() + limits.half_close_timeout);
        }
    };
    // The kernel's share joins the session's counters (before release, the flows hold it).
    let flows = (engine.flow(viewer.cookie), engine.flow(hypervisor.cookie));
    bytes.kernel[0].store(0, Ordering::Relaxed);
    bytes.kernel[1].store(0, Ordering::Relaxed);
    bytes.to_hypervisor.fetch_add(flows.0.map_or(0, |f| f.redirected), Ordering::Relaxed);
    bytes.to_viewer.fetch_add(flows.1.map_or(0, |f| f.redirected), Ordering::Relaxed);
    if let (Some(up), Some(down)) = flows
        && (up.trimmed + down.trimmed + up.dropped + down.dropped > 0 || tracing::enabled!(tracing::Level::DEBUG))
    {
        tracing::info!(
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
            "sockmap session counters"
        );
    }
    engine.finish(viewer.cookie);
    engine.finish(hypervisor.cookie);
    Ok(ended)
}

/// A failure on one side: a reset is passed on to the other side as a reset.
fn fail(e: io::Error, other: &Side, reset: Ended, error: fn(String) -> Ended) -> Ended {
    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted) {
        let _ = socket2::SockRef::from(other.fd.get_ref()).set_linger(Some(Duration::ZERO));
        reset
    } else {
        error(e.to_string())
    }
}
