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

use super::{Sockmap, tcp};
use crate::relay::{Control, Ended, Limits, deadline};
use relay_common::Grant;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep};

type Std = std::net::TcpStream;

/// One socket of the session, as the kernel relay sees it.
struct Side {
    /// Registered for readability only: with the verdict program in place, that fires for
    /// bytes passed back, end of stream and errors, not for every redirected skb.
    fd: AsyncFd<Std>,
    cookie: u64,
    /// Bytes that had entered this socket's send queue at hand-off.
    sent_at_handoff: u64,
}

/// How one direction failed.
enum Failure {
    /// Reading from the sender failed; `true` when it reset the connection.
    From(io::Error),
    /// Writing to the receiver failed.
    To(io::Error),
}

/// Bytes of one direction that went through userspace (hand-off prefix and any relayed
/// after a fall-back); the kernel's share is read from the flow map.
struct Userspace<'a> {
    /// Relayed by userspace after hand-off.
    written: AtomicU64,
    /// The session's counter for this direction (userspace's share; the kernel's is in
    /// the flow map until the session ends).
    counter: &'a AtomicU64,
}

/// What [`run`] gives back when the kernel cannot take the session: both sockets, why,
/// and the bytes each side sent that are still to be relayed (in userspace, first).
pub type Refused = (TcpStream, TcpStream, String, Vec<u8>, Vec<u8>);

/// The most relay reads from a socket to empty its queue before hand-off; a peer that
/// keeps it fuller than this is relayed in userspace instead.
const DRAIN_LIMIT: usize = 4 << 20;

/// Reads whatever the kernel has queued, without waiting, onto `into`. Asks the kernel
/// itself (tokio's `try_read` may answer "would block" from its cached readiness).
fn drain(socket: &TcpStream, into: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 16 << 10];
    let socket = socket2::SockRef::from(socket);
    loop {
        match socket.recv(&mut chunk) {
            Ok(0) => return Ok(()),
            // SAFETY: recv initialised the first n bytes.
            Ok(n) => into.extend_from_slice(unsafe { std::slice::from_raw_parts(chunk.as_ptr().cast::<u8>(), n) }),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The relay that takes over meets the same error and reports it.
            Err(_) => return Ok(()),
        }
        if into.len() > DRAIN_LIMIT {
            return Err("a peer kept its receive queue full during hand-off".into());
        }
    }
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
    if let Err(e) = hypervisor.write_all(&viewer_buffered).await {
        return Ok(Ended::HypervisorError(e.to_string()));
    }
    if let Err(e) = viewer.write_all(&hypervisor_buffered).await {
        return Ok(Ended::ViewerError(e.to_string()));
    }
    let bytes = control.bytes.clone();
    bytes.to_hypervisor.fetch_add(viewer_buffered.len() as u64, Ordering::Relaxed);
    bytes.to_viewer.fetch_add(hypervisor_buffered.len() as u64, Ordering::Relaxed);
    let up_user = Userspace { written: AtomicU64::new(0), counter: &bytes.to_hypervisor };
    let down_user = Userspace { written: AtomicU64::new(0), counter: &bytes.to_viewer };
    drop((viewer_buffered, hypervisor_buffered));

    let (viewer, hypervisor) = match handoff(engine, viewer, hypervisor) {
        Ok(pair) => pair,
        Err((v, h, why)) => return Err((v, h, why, Vec::new(), Vec::new())),
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

fn handoff(engine: &Sockmap, viewer: TcpStream, hypervisor: TcpStream) -> Result<(Side, Side), (TcpStream, TcpStream, String)> {
    // Out of tokio's reactor, and back in for readability alone.
    let (Ok(viewer), Ok(hypervisor)) = (viewer.into_std(), hypervisor.into_std()) else {
        unreachable!("a tokio TcpStream always converts back to std")
    };
    let giveback = |v: Std, h: Std, why: String| match (TcpStream::from_std(v), TcpStream::from_std(h)) {
        (Ok(v), Ok(h)) => Err((v, h, why)),
        _ => unreachable!("sockets that left the reactor can rejoin it"),
    };
    let prepare = |s: &Std| -> io::Result<(u64, u64)> { Ok((tcp::cookie(s)?, tcp::sent(s)?.1)) };
    let ((vc, vsent), (hc, hsent)) = match (prepare(&viewer), prepare(&hypervisor)) {
        (Ok(v), Ok(h)) => (v, h),
        (Err(e), _) | (_, Err(e)) => return giveback(viewer, hypervisor, e.to_string()),
    };
    let viewer = match register(viewer, Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            let (v, e) = e.into_parts();
            return giveback(v, hypervisor, e.to_string());
        }
    };
    let hypervisor = match register(hypervisor, Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            let (h, e) = e.into_parts();
            return giveback(viewer.into_inner(), h, e.to_string());
        }
    };
    if let Err(e) = engine.attach((viewer.get_ref(), vc), (hypervisor.get_ref(), hc)) {
        return giveback(viewer.into_inner(), hypervisor.into_inner(), e.to_string());
    }
    // From here the kernel owns the byte stream. Bytes queued before the sockets entered
    // the verdict map run through it now, in order.
    let _ = tcp::kick(viewer.get_ref());
    let _ = tcp::kick(hypervisor.get_ref());
    Ok((Side { fd: viewer, cookie: vc, sent_at_handoff: vsent }, Side { fd: hypervisor, cookie: hc, sent_at_handoff: hsent }))
}

fn register(socket: Std, interest: Interest) -> Result<AsyncFd<Std>, tokio::io::unix::AsyncFdRegisterError<Std>> {
    // SAFETY: a std TcpStream owns its descriptor until dropped and always reports the
    // same one; the AsyncFd owns the stream, so the descriptor outlives the registration.
    unsafe { AsyncFd::register_with_interest(socket, interest) }
}

/// One direction, `from` to `to`, until end of stream (forwarded) or failure.
async fn direction(engine: &Sockmap, from: &Side, to: &Side, user: &Userspace<'_>, limits: &Limits) -> Result<(), Failure> {
    let mut read_total = 0u64;
    let mut limit = engine.in_flight_cap;
    loop {
        let mut guard = from.fd.readable().await.map_err(Failure::From)?;
        // Readability also fires for every batch the program redirects. Reading then would
        // race the verdict for the same queue, so read only for an end, an error, or bytes
        // the program passed back and userspace has not read yet.
        let ready = guard.ready();
        let ending = ready.is_read_closed() || ready.is_error();
        if !ending && engine.flow(from.cookie).is_some_and(|f| f.passed == read_total) {
            guard.clear_ready();
            continue;
        }
        // Allocated only while there is something to relay: idle sessions hold no buffer.
        let mut buf = vec![0u8; limits.buffer_bytes];
        let mut drained = false;
        let mut eof = false;
        loop {
            let n = match guard.try_io(|fd| fd.get_ref().read(&mut buf)) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(Failure::From(e)),
                Err(_would_block) => break,
            };
            if !drained {
                // Whatever the kernel redirected before must reach `to` first.
                // Boxed here and below: an idle session's task keeps no room for them.
                Box::pin(wait_drained(engine, from, to, user)).await?;
                drained = true;
            }
            if n == 0 {
                eof = true;
                break;
            }
            read_total += n as u64;
            Box::pin(write_all(to, &buf[..n])).await.map_err(Failure::To)?;
            user.written.fetch_add(n as u64, Ordering::Relaxed);
            user.counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        if eof {
            to.fd.get_ref().shutdown(Shutdown::Write).map_err(Failure::To)?;
            return Ok(());
        }
        if drained {
            // Everything passed so far is written: let the kernel take over again, with
            // a cap counted from what the receiver has acknowledged.
            let (acked, _) = tcp::sent(to.fd.get_ref()).map_err(Failure::To)?;
            let acked_since = acked.saturating_sub(to.sent_at_handoff);
            let redirected_acked = acked_since.saturating_sub(user.written.load(Ordering::Relaxed));
            limit = limit.max(redirected_acked + engine.in_flight_cap);
            engine.grant(from.cookie, Grant { limit, resumed_at: read_total });
        }
    }
}

/// Waits until every byte the kernel redirected from `from` has entered `to`'s send queue
/// (left the kernel's backlog), so a userspace write or a FIN cannot overtake it. A stalled
/// receiver makes this wait long: meanwhile `from`'s receive queue fills and TCP closes its
/// window, which is the backpressure the cap promises.
async fn wait_drained(engine: &Sockmap, from: &Side, to: &Side, user: &Userspace<'_>) -> Result<(), Failure> {
    let mut pause = Duration::from_millis(1);
    loop {
        let Some(flow) = engine.flow(from.cookie) else { return Ok(()) };
        let want = flow.redirected + user.written.load(Ordering::Relaxed);
        let (_, sent) = tcp::sent(to.fd.get_ref()).map_err(Failure::To)?;
        if sent.saturating_sub(to.sent_at_handoff) >= want {
            return Ok(());
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Writes all of `data` to a socket registered for readability only, waiting for room on
/// a duplicate descriptor registered for writability while this write lasts.
async fn write_all(to: &Side, mut data: &[u8]) -> io::Result<()> {
    let mut writable: Option<AsyncFd<Std>> = None;
    while !data.is_empty() {
        match to.fd.get_ref().write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let fd = match &writable {
                    Some(fd) => fd,
                    None => writable.insert(register(to.fd.get_ref().try_clone()?, Interest::WRITABLE).map_err(|e| e.into_parts().1)?),
                };
                fd.writable().await?.clear_ready();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
