//! The established byte relay, after both handshakes.
//!
//! A back-end takes an [`Established`] pair and returns how the session [`Ended`];
//! nothing upstream knows which back-end ran. Every back-end runs its consoles under one
//! [`lifecycle`] (first end wins, one clock, one classification of failures), in the one
//! loop of [`duplex`]. [`copy`] is the portable userspace relay;
//! the kernel back-ends ([`uring`], [`sockmap`]) take raw TCP pairs; [`backend`] picks.

pub mod backend;
pub mod copy;
mod duplex;
pub mod lifecycle;
mod pump;
pub mod sockmap;
pub mod uring;

pub use lifecycle::Ended;

use crate::session::{Shared, Stop};
use crate::wire::prefixed::Prefixed;
use crate::wire::ws_frame::Decoder;
use crate::wire::ws_stream::WsByteStream;
use lifecycle::{Direction, Failure};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// One side of a session, as the relay sees it.
pub trait Peer: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the next close a reset (RST) instead of a FIN, to pass a peer's reset on.
    fn reset_on_close(&self) {}
    /// From now on, keep a quiet connection busy every `every` where the protocol has a
    /// way (a WebSocket Ping); bare TCP has none and relies on TCP keepalive.
    fn heartbeat(&mut self, _every: Duration) {}
    /// Bare TCP, nothing framed or encrypted in userspace: a kernel back-end may take it.
    fn is_plain_tcp(&self) -> bool {
        false
    }
    /// The TCP connection, when [`Peer::is_plain_tcp`].
    fn into_tcp(self) -> Option<TcpStream>
    where
        Self: Sized,
    {
        None
    }
    /// A TCP socket whose bytes the kernel can move as they are (bare TCP, or TLS the
    /// kernel seals and opens): the io_uring back-end may splice it.
    fn is_kernel_stream(&self) -> bool {
        self.is_plain_tcp()
    }
    /// The socket, and whether the kernel carries TLS on it, when [`Peer::is_kernel_stream`].
    fn into_kernel_stream(self) -> Option<(TcpStream, bool)>
    where
        Self: Sized,
    {
        self.into_tcp().map(|tcp| (tcp, false))
    }
    /// Plaintext the connection holds from before its TLS moved into the kernel: it
    /// belongs after what the handshakes left over, before anything the kernel reads.
    fn take_kernel_pending(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// The TCP or TLS connection under any framing, for moving its TLS into the kernel.
    fn transport_mut(&mut self) -> Option<&mut crate::transport::Transport> {
        None
    }
    /// A WebSocket over a socket the kernel can move bytes on as they are (bare TCP, or
    /// TLS it carries): the io_uring back-end may take over its framing.
    fn is_plain_websocket(&self) -> bool {
        false
    }
    /// The socket, whether the kernel carries TLS on it, and the frame decoder's state,
    /// when [`Peer::is_plain_websocket`]. Nothing may be left to write: flush first.
    fn into_websocket(self) -> Option<(TcpStream, bool, Decoder)>
    where
        Self: Sized,
    {
        None
    }
}

impl Peer for TcpStream {
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
    fn is_plain_tcp(&self) -> bool {
        true
    }
    fn into_tcp(self) -> Option<TcpStream> {
        Some(self)
    }
}

/// A WebSocket has no reset; dropping it closes the TCP connection under it.
impl<S: Peer> Peer for WsByteStream<S> {
    fn heartbeat(&mut self, every: Duration) {
        WsByteStream::heartbeat(self, every);
    }
    fn is_plain_websocket(&self) -> bool {
        self.get_ref().is_kernel_stream()
    }
    fn transport_mut(&mut self) -> Option<&mut crate::transport::Transport> {
        self.get_mut().transport_mut()
    }
    fn into_websocket(self) -> Option<(TcpStream, bool, Decoder)> {
        let (io, decoder) = self.into_parts();
        io.into_kernel_stream().map(|(tcp, kernel_tls)| (tcp, kernel_tls, decoder))
    }
}

/// Both sides after the handshakes, each with the bytes it sent that the handshakes read
/// but did not consume (they go out first, in order).
pub struct Established<V, H> {
    pub viewer: Prefixed<V>,
    pub hypervisor: Prefixed<H>,
}

/// What a relay needs from the session around it.
pub struct Control {
    /// The session's id, for the few events a console logs while relayed (it runs
    /// without a tracing span: see `conn::negotiate`).
    pub session: u64,
    /// Its byte counters (what it derefs to), and its stop: set when the session must
    /// end (forced disconnect, shutdown).
    pub shared: Arc<Shared>,
}

impl Control {
    /// Resolves, with the reason, when the session must end.
    pub fn stopped(&self) -> impl Future<Output = String> + Send + '_ {
        self.shared.stop.wait()
    }
}

/// Sends what each side's handshake read beyond its end on to the other side, and counts
/// it: the kernel back-ends do this before the kernel takes over, so those bytes go first.
/// A receiver that stalls meanwhile holds this up, but not a forced disconnect.
pub(crate) async fn send_leftovers<V: Peer, H: Peer>(pair: &mut Established<V, H>, control: &mut Control) -> Result<(), Ended> {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncWriteExt;
    let Established { viewer, hypervisor } = pair;
    let send = async {
        hypervisor.io.write_all(&viewer.prefix).await.map_err(|e| Failure::writing(Direction::Up, e))?;
        viewer.io.write_all(&hypervisor.prefix).await.map_err(|e| Failure::writing(Direction::Down, e))?;
        // A framing viewer may hold part of a frame: out before anything else is sent.
        viewer.io.flush().await.map_err(|e| Failure::writing(Direction::Down, e))
    };
    tokio::select! {
        biased;
        reason = control.stopped() => return Err(Ended::Stopped(reason)),
        sent = send => sent.map_err(Ended::Failed)?,
    }
    let bytes = &control.shared;
    bytes.to_hypervisor.fetch_add(std::mem::take(&mut viewer.prefix).len() as u64, Relaxed);
    bytes.to_viewer.fetch_add(std::mem::take(&mut hypervisor.prefix).len() as u64, Relaxed);
    Ok(())
}

/// Sleeps until `at`, or forever when no deadline is armed. A far one waits on the coarse
/// clock, through the session's `stop` ([`crate::clock`]: every console has one armed,
/// and a tokio timer each cost idle consoles ~6% of their memory). A near one is boxed:
/// a live console's task should not carry a timer's room. Written out rather than an
/// `async fn`, which kept `at` and `stop` twice in every console's future.
pub(crate) fn deadline(stop: &Stop, at: Option<tokio::time::Instant>) -> Deadline<'_> {
    match at {
        Some(at) if at.saturating_duration_since(tokio::time::Instant::now()) >= crate::clock::FAR => {
            Deadline::Far(stop, at, crate::clock::tick_of(at))
        }
        Some(at) => Deadline::Near(Box::pin(tokio::time::sleep_until(at))),
        None => Deadline::Never,
    }
}

pub(crate) enum Deadline<'a> {
    /// The deadline, and its tick on the coarse clock.
    Far(&'a Stop, tokio::time::Instant, u32),
    Near(std::pin::Pin<Box<tokio::time::Sleep>>),
    Never,
}

impl Future for Deadline<'_> {
    type Output = ();
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match self.get_mut() {
            Deadline::Far(stop, at, tick) => stop.poll_far_deadline(*at, *tick, cx),
            Deadline::Near(sleep) => sleep.as_mut().poll(cx),
            Deadline::Never => std::task::Poll::Pending,
        }
    }
}

/// A console's limits. Every console's future holds them, so the times are kept as
/// milliseconds in a u32 (up to 49 days; longer ones are cut to that): 24 bytes, not 56.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes buffered per direction.
    pub buffer_bytes: usize,
    /// 0: none.
    idle_timeout_ms: u32,
    half_close_timeout_ms: u32,
    /// 0: none.
    ws_ping_ms: u32,
}

impl Limits {
    pub fn new(buffer_bytes: usize, idle_timeout: Option<Duration>, half_close_timeout: Duration, ws_ping: Option<Duration>) -> Limits {
        // A time that is there is at least 1 ms, so that 0 can mean none.
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        let some_ms = |d: Option<Duration>| d.map_or(0, |d| ms(d).max(1));
        Limits {
            buffer_bytes,
            idle_timeout_ms: some_ms(idle_timeout),
            half_close_timeout_ms: ms(half_close_timeout),
            ws_ping_ms: some_ms(ws_ping),
        }
    }

    /// End the session after this long with no byte either way.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms.into()))
    }

    /// After one side has finished sending, how long the other may go on.
    pub fn half_close_timeout(&self) -> Duration {
        Duration::from_millis(self.half_close_timeout_ms.into())
    }

    /// How often a WebSocket viewer gets a Ping (None: never).
    pub fn ws_ping(&self) -> Option<Duration> {
        (self.ws_ping_ms > 0).then(|| Duration::from_millis(self.ws_ping_ms.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_keep_their_times_to_the_millisecond_and_none_stays_none() {
        let second = Duration::from_secs(1);
        let l = Limits::new(4096, Some(Duration::from_millis(1500)), second * 30, None);
        assert_eq!((l.idle_timeout(), l.half_close_timeout(), l.ws_ping()), (Some(Duration::from_millis(1500)), second * 30, None));
        // A time under a millisecond is still a time; a half-close of 0 is 0.
        let l = Limits::new(4096, None, Duration::ZERO, Some(Duration::from_micros(10)));
        assert_eq!((l.idle_timeout(), l.half_close_timeout(), l.ws_ping()), (None, Duration::ZERO, Some(Duration::from_millis(1))));
        // Ten years is cut to 49 days, not wrapped.
        let l = Limits::new(4096, Some(second * 315_360_000), second, None);
        assert_eq!(l.idle_timeout(), Some(Duration::from_millis(u32::MAX.into())));
        assert_eq!(size_of::<Limits>(), 24, "every console holds one");
    }
}
