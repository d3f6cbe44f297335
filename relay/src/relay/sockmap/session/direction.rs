//! One direction of a kernel-relayed session, as userspace sees it: asleep until the
//! program passes bytes back (a receiver fell behind) or the stream ends.

use super::super::Sockmap;
use super::{Socket, Std, Userspace};
use crate::relay::Limits;
use crate::relay::lifecycle::{Direction, Failure};
use crate::sockopt as tcp;
use relay_common::{Grant, MODE_PASS};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::sleep;

/// One direction, `from` to `to`, until end of stream (forwarded) or failure.
pub(super) async fn direction(
    engine: &Sockmap,
    dir: Direction,
    (from, to): (&Socket, &Socket),
    user: &Userspace<'_>,
    limits: &Limits,
) -> Result<(), Failure> {
    let mut read_total = 0u64;
    // `read_total` when the kernel was last given the direction back.
    let mut resumed_at = 0u64;
    let mut limit = engine.in_flight_cap;
    // Set when the last turn left work for the next, whose news it has already spent.
    let mut look_again = false;
    let mut poll_pause = Duration::from_millis(1);
    // While the program passes this direction's bytes back: `from` registered for input.
    // The program announces only a fall-back, not each skb it passes after it, so their
    // arrival is what wakes the direction. Dropped once the program redirects again, when
    // every redirected skb would wake it for nothing; a fall-back after that is announced.
    let mut readable: Option<AsyncFd<Std>> = None;
    // Whether the program was passing at the last look at the flow. A stale "redirecting"
    // is safe to wait on (the next fall-back is announced), a stale "passing" costs one
    // wake-up for nothing; so each wait reuses the last look rather than make another.
    let mut passing = false;
    loop {
        if !look_again {
            if passing {
                tokio::select! {
                    () = from.watch.news() => {}
                    // Read, not just looked at: a peer's FIN leaves tokio's readiness set
                    // for good, and only the read that finds the end settles it.
                    ready = input(listen(engine, &mut readable, from), PASSED_BYTES_POLL) => {
                        ready.map_err(|e| Failure::reading(dir, e))?;
                        look_again = true;
                    }
                }
            } else {
                readable = None;
                from.watch.news().await;
            }
        }
        // Read even with nothing passed: at an end, or after input (see above).
        let read_anyway = std::mem::take(&mut look_again) || from.watch.ended();
        let flow = engine.flow(from.cookie);
        passing = flow.is_some_and(|f| f.mode == MODE_PASS);
        if let Some(hole) = flow.and_then(hole) {
            // End the console rather than relay a stream with a hole in it.
            return Err(Failure::reading(dir, io::Error::other(hole)));
        }
        if !read_anyway && flow.is_some_and(|f| f.passed == read_total) && read_total == resumed_at {
            continue;
        }
        // Allocated only while there is something to relay: idle sessions hold no buffer.
        let mut buf = vec![0u8; limits.buffer_bytes];
        let mut drained = false;
        let mut eof = false;
        let mut pause = Duration::from_millis(1);
        let mut waited = Duration::ZERO;
        let read_before = read_total;
        loop {
            let n = match (&from.io).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failure::reading(dir, e)),
            };
            if !drained {
                // Whatever the kernel redirected before must reach `to` first.
                // Boxed here and below: an idle session's task keeps no room for them.
                Box::pin(wait_drained(engine, dir, (from, to), user)).await?;
                drained = true;
            }
            if n == 0 {
                // The end can overtake bytes the program passed: the kernel queues a
                // passed skb behind redirected ones waiting to be sent on this same
                // socket, and a read sees the end while that queue is still moving.
                if engine.flow(from.cookie).is_some_and(|f| f.passed > read_total) {
                    if waited >= PASSED_BYTES_WAIT {
                        return Err(Failure::reading(dir, io::Error::other("the kernel relay lost bytes it passed back")));
                    }
                    sleep(pause).await;
                    waited += pause;
                    pause = (pause * 2).min(Duration::from_millis(50));
                    continue;
                }
                eof = true;
                break;
            }
            read_total += n as u64;
            Box::pin(write_all(engine, to, &buf[..n])).await.map_err(|e| Failure::writing(dir, e))?;
            user.written.fetch_add(n as u64, Ordering::Relaxed);
            user.counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Not held while waiting for room to resume: a stalled receiver can make that long.
        drop(buf);
        if eof {
            to.io.shutdown(Shutdown::Write).map_err(|e| Failure::writing(dir, e))?;
            return Ok(());
        }
        // The program counts a passed skb (and announces a fall-back) before the kernel
        // queues it for reading, and behind redirected ones still waiting to go out on this
        // socket it may wait long. So while some are not read yet, look
        // again when input comes, or after a pause that grows while the reads find nothing
        // (input that comes for a skb the program redirects finds nothing too).
        if engine.flow(from.cookie).is_some_and(|f| f.passed > read_total) {
            if read_total == read_before {
                tokio::select! {
                    ready = input(listen(engine, &mut readable, from), poll_pause) => ready.map_err(|e| Failure::reading(dir, e))?,
                    () = sleep(poll_pause) => poll_pause = (poll_pause * 2).min(PASSED_BYTES_POLL),
                }
            } else {
                poll_pause = Duration::from_millis(1);
            }
            look_again = true;
            continue;
        }
        if read_total > resumed_at {
            // Everything passed so far is written: let the kernel take over again, with
            // a cap counted from what the receiver has acknowledged. Only while the send
            // queue has room for all of it: redirected bytes that do not fit wait in the
            // kernel's backlog, where bytes passed on that socket queue behind them
            // uncharged (see handoff). Until then the passed bytes keep coming this way.
            let input = listen(engine, &mut readable, from);
            let Some(acked) = Box::pin(room_to_resume(engine, dir, (from, to), input)).await? else {
                look_again = true;
                continue;
            };
            let acked_since = acked.saturating_sub(to.sent_at_handoff);
            let redirected_acked = acked_since.saturating_sub(user.written.load(Ordering::Relaxed));
            limit = limit.max(redirected_acked + engine.in_flight_cap);
            engine.grant(from.cookie, Grant { limit, resumed_at: read_total });
            resumed_at = read_total;
            engine.resumes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits until `to`'s send queue has room for twice the in-flight cap, and gives what it
/// has acknowledged then; or gives None as soon as `from` has more for userspace (read it
/// first: news, or `input`). Waiting here, rather than for the next batch, lets a
/// direction that fell back during a burst resume in the quiet after it: under bursts, the
/// queue was seldom empty enough at the moment a batch had just been written, and a
/// direction that fell back stayed in userspace for good.
async fn room_to_resume(
    engine: &Sockmap,
    dir: Direction,
    (from, to): (&Socket, &Socket),
    input: Option<&AsyncFd<Std>>,
) -> Result<Option<u64>, Failure> {
    let mut pause = Duration::from_millis(1);
    loop {
        let (acked, sent) = tcp::sent(&to.io).map_err(|e| Failure::writing(dir, e))?;
        if sent - acked <= 2 * engine.in_flight_cap {
            return Ok(Some(acked));
        }
        tokio::select! {
            biased;
            () = from.watch.news() => return Ok(None),
            ready = self::input(input, Duration::from_millis(250)) => {
                ready.map_err(|e| Failure::reading(dir, e))?;
                return Ok(None);
            }
            // Backing off to 4 looks a second: a receiver may stall for long.
            () = sleep(pause) => pause = (pause * 2).min(Duration::from_millis(250)),
        }
    }
}

/// Why the bytes the program moved have a hole in them, if they do.
fn hole(flow: relay_common::Flow) -> Option<String> {
    if flow.cut_failures > 0 {
        Some("the kernel relay lost bytes (an overlap it could not cut)".into())
    } else if flow.skipped > 0 {
        Some(format!("the kernel relay lost bytes ({} bytes never reached the program)", flow.skipped))
    } else {
        None
    }
}

/// How long a direction waits, after the end of stream, for bytes the program passed back
/// and the kernel has not yet queued for reading.
const PASSED_BYTES_WAIT: Duration = Duration::from_secs(5);

/// The longest a direction waits between looks for passed bytes the kernel has not yet
/// queued for reading (their queue gives no news relay listens for).
const PASSED_BYTES_POLL: Duration = Duration::from_millis(20);

/// Waits until every byte the kernel redirected from `from` has entered `to`'s send queue
/// (left the kernel's backlog), so a userspace write or a FIN cannot overtake it. A stalled
/// receiver makes this wait long: meanwhile `from`'s receive queue fills and TCP closes its
/// window, which is the backpressure the cap promises.
async fn wait_drained(engine: &Sockmap, dir: Direction, (from, to): (&Socket, &Socket), user: &Userspace<'_>) -> Result<(), Failure> {
    let mut pause = Duration::from_millis(1);
    loop {
        let Some(flow) = engine.flow(from.cookie) else { return Ok(()) };
        let want = flow.redirected + user.written.load(Ordering::Relaxed);
        let (_, sent) = tcp::sent(&to.io).map_err(|e| Failure::writing(dir, e))?;
        if sent.saturating_sub(to.sent_at_handoff) >= want {
            return Ok(());
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Writes all of `data` to a socket in no reactor, waiting for room on a duplicate
/// descriptor registered for writability while this write lasts; out of descriptors, it
/// tries again every 1-20 ms instead.
async fn write_all(engine: &Sockmap, to: &Socket, mut data: &[u8]) -> io::Result<()> {
    let (mut writable, mut tried): (Option<AsyncFd<Std>>, bool) = (None, false);
    let mut pause = Duration::from_millis(1);
    while !data.is_empty() {
        match (&to.io).write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                pause = Duration::from_millis(1);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !tried {
                    tried = true;
                    match register(&to.io, Interest::WRITABLE) {
                        Ok(fd) => writable = Some(fd),
                        Err(e) if crate::reserve::out_of_descriptors(&e) => {
                            engine.descriptor_waits.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "sockmap: a write waits for room by polling")
                        }
                        Err(e) => return Err(e),
                    }
                }
                match &writable {
                    Some(fd) => fd.writable().await?.clear_ready(),
                    None => {
                        sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `from` registered for input in `readable`, registering it if it is not yet; None when
/// it cannot be (out of descriptors), and the direction then polls.
fn listen<'r>(engine: &Sockmap, readable: &'r mut Option<AsyncFd<Std>>, from: &Socket) -> Option<&'r AsyncFd<Std>> {
    if readable.is_none() {
        match register(&from.io, Interest::READABLE) {
            Ok(fd) => *readable = Some(fd),
            Err(e) => {
                if crate::reserve::out_of_descriptors(&e) {
                    engine.descriptor_waits.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(error = %e, "sockmap: a passing direction polls its input instead")
            }
        }
    }
    readable.as_ref()
}

/// Until `from` has input, as far as its registration `fd` tells; without one, until
/// `pause` has passed. Readiness is cleared, so input after the next read is a new edge.
async fn input(fd: Option<&AsyncFd<Std>>, pause: Duration) -> io::Result<()> {
    match fd {
        Some(fd) => fd.readable().await.map(|mut ready| ready.clear_ready()),
        None => {
            sleep(pause).await;
            Ok(())
        }
    }
}

/// A duplicate of `socket`'s descriptor in tokio's reactor, for `interest`, until dropped.
#[allow(unsafe_code)] // tokio's registration of a raw descriptor
fn register(socket: &Std, interest: Interest) -> io::Result<AsyncFd<Std>> {
    let socket = socket.try_clone()?;
    // SAFETY: a std TcpStream owns its descriptor until dropped and always reports the
    // same one; the AsyncFd owns the stream, so the descriptor outlives the registration.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|e| e.into_parts().1)
}
