//! Handing a session's two sockets to the kernel: empty their queues, then enter the maps
//! in an order where the first redirect always finds its peer, then release what queued
//! in between.

use super::super::Sockmap;
use super::{Socket, Std};
use crate::relay::Established;
use crate::relay::lifecycle::{Ended, Failure, Op, Side};
use crate::sockopt as tcp;
use std::io::{self, ErrorKind};
use tokio::net::TcpStream;

/// What [`super::run`] gives back when the kernel cannot take the session: both sockets,
/// each with the bytes its side sent that are still to be relayed (in userspace, first),
/// and why.
pub struct Refused {
    pub pair: Established<TcpStream, TcpStream>,
    pub why: String,
}

/// The most relay reads from a socket to empty its queue before hand-off; a peer that
/// keeps it fuller than this is relayed in userspace instead.
const DRAIN_LIMIT: usize = 4 << 20;

/// Reads whatever the kernel has queued, without waiting, onto `into`. Asks the kernel
/// itself (tokio's `try_read` may answer "would block" from its cached readiness).
pub(super) fn drain(socket: &TcpStream, into: &mut Vec<u8>) -> Result<(), String> {
    use std::io::Read;
    let mut chunk = [0u8; 16 << 10];
    let socket = socket2::SockRef::from(socket);
    loop {
        match (&*socket).read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => into.extend_from_slice(&chunk[..n]),
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

/// Why a hand-off did not happen.
pub(super) enum Handoff {
    /// The kernel refused the sockets; they are back in tokio's hands, untouched.
    Refused(TcpStream, TcpStream, String),
    /// Moving the sockets between reactors failed (out of memory or descriptors); they
    /// are closed, and the console with them.
    Lost(Ended),
}

pub(super) fn handoff(engine: &Sockmap, viewer: TcpStream, hypervisor: TcpStream) -> Result<(Socket, Socket), Handoff> {
    // Out of tokio's reactor: the watcher wakes the session (see `watch`).
    let lost = |e: io::Error| Handoff::Lost(Ended::Failed(Failure::new(Side::Viewer, Op::HandOff, e)));
    let (viewer, hypervisor) = (viewer.into_std().map_err(lost)?, hypervisor.into_std().map_err(lost)?);
    let giveback = |v: Std, h: Std, why: String| match (TcpStream::from_std(v), TcpStream::from_std(h)) {
        (Ok(v), Ok(h)) => Err(Handoff::Refused(v, h, why)),
        (Err(e), _) | (_, Err(e)) => {
            let e = io::Error::new(e.kind(), format!("{why}; then {e}"));
            Err(Handoff::Lost(Ended::Failed(Failure::new(Side::Viewer, Op::HandOff, e))))
        }
    };
    // Redirected bytes wait in the receiver's psock backlog until its send buffer takes
    // them, and bytes the program passes to userspace on that same socket queue behind
    // them there, uncharged to its receive buffer: with both peers stalled, TCP's window
    // stayed open and a flooding viewer pushed hundreds of MiB. A send buffer that holds
    // everything a direction may have in flight (twice over, for skb overhead) keeps that
    // backlog from ever waiting.
    let prepare = |s: &Std| -> io::Result<(u64, u64)> {
        tcp::reserve_send_room(s, 2 * engine.in_flight_cap)?;
        Ok((tcp::cookie(s)?, tcp::sent(s)?.1))
    };
    let ((vc, vsent), (hc, hsent)) = match (prepare(&viewer), prepare(&hypervisor)) {
        (Ok(v), Ok(h)) => (v, h),
        (Err(e), _) | (_, Err(e)) => return giveback(viewer, hypervisor, e.to_string()),
    };
    // Watched before the kernel takes the bytes, so no end goes unseen.
    let watched = engine.watcher.watch(&viewer, vc).and_then(|v| Ok((v, engine.watcher.watch(&hypervisor, hc)?)));
    let (vwatch, hwatch) = match watched {
        Ok(watches) => watches,
        Err(e) => return giveback(viewer, hypervisor, e.to_string()),
    };
    if let Err(e) = engine.attach((&viewer, vc), (&hypervisor, hc)) {
        drop((vwatch, hwatch));
        return giveback(viewer, hypervisor, e.to_string());
    }
    // From here the kernel owns the byte stream. Bytes queued before the sockets entered
    // the verdict map run through it now, in order.
    let _ = tcp::kick(&viewer);
    let _ = tcp::kick(&hypervisor);
    Ok((
        Socket { watch: vwatch, io: viewer, cookie: vc, sent_at_handoff: vsent },
        Socket { watch: hwatch, io: hypervisor, cookie: hc, sent_at_handoff: hsent },
    ))
}
