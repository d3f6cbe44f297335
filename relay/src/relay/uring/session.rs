//! One session on the io_uring back-end, as its task sees it: the ring thread carries the
//! bytes and reports what happens to each direction; the task runs the shared lifecycle.

use super::{Command, RingEvent, Uring};
use crate::relay::duplex::{Carrier, Event, drive};
use crate::relay::lifecycle::{Ended, Failure, Op, Side};
use crate::relay::{Control, Limits};
use crate::session::Shared;
use crate::wire::ws_frame::Decoder;
use std::io;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;

/// One side of a console, as the ring takes it.
pub struct Leg {
    pub tcp: TcpStream,
    /// The kernel seals and opens TLS records on it (kTLS): what is not data comes to the
    /// ring as a control record, and its end is a close_notify.
    pub kernel_tls: bool,
    /// The viewer speaks WebSocket: the frame decoder's state, from where userspace left it.
    pub framing: Option<Decoder>,
}

/// Runs one session whose handshake leftovers are already sent: the viewer's `framing`
/// is set when it speaks WebSocket (the ring frames its bytes), unset for raw TCP.
pub async fn run(engine: &Uring, viewer: Leg, hypervisor: Leg, control: &mut Control, limits: Limits) -> Ended {
    let leaving = |side: Side, e: io::Error| Ended::Failed(Failure::new(side, Op::HandOff, e));
    let kernel_tls = [viewer.kernel_tls, hypervisor.kernel_tls];
    let framing = viewer.framing;
    let viewer = match viewer.tcp.into_std() {
        Ok(s) => s,
        Err(e) => return leaving(Side::Viewer, e),
    };
    let hypervisor = match hypervisor.tcp.into_std() {
        Ok(s) => s,
        Err(e) => return leaving(Side::Hypervisor, e),
    };
    let id = engine.next_id();
    let framed = framing.is_some();
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    engine.send(Command::Start {
        id,
        viewer,
        framing: framing.map(super::ring::Buffered::new),
        hypervisor,
        kernel_tls,
        bytes: control.shared.clone(),
        events: events_tx,
    });
    // Only a framed console has a way to ping its viewer.
    let heartbeat = limits.ws_ping().filter(|_| framed).map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let mut on_ring = OnRing { engine, id, events, bytes: control.shared.clone(), heartbeat };
    drive(&mut on_ring, control, &limits).await.expect("a console on the ring is never released")
}

/// A console the ring thread carries.
struct OnRing<'a> {
    engine: &'a Uring,
    id: u64,
    events: UnboundedReceiver<RingEvent>,
    bytes: Arc<Shared>,
    /// When the viewer's next heartbeat Ping is due.
    heartbeat: Option<tokio::time::Interval>,
}

impl Carrier for OnRing<'_> {
    async fn next(&mut self) -> Event {
        loop {
            let event = match &mut self.heartbeat {
                Some(beat) => tokio::select! {
                    event = self.events.recv() => event,
                    _ = beat.tick() => {
                        self.engine.send(Command::Ping { id: self.id });
                        continue;
                    }
                },
                None => self.events.recv().await,
            };
            match event {
                Some(RingEvent::Finished(dir)) => return Event::Finished(dir),
                Some(RingEvent::Ended(Err(failure))) => return Event::Failed(failure),
                // Both directions' ends came before it.
                Some(RingEvent::Ended(Ok(()))) => continue,
                None => {
                    let gone = io::Error::other("the io_uring thread stopped");
                    return Event::Failed(Failure::new(Side::Hypervisor, Op::Write, gone));
                }
            }
        }
    }

    fn bytes(&self) -> (u64, u64) {
        self.bytes.snapshot()
    }

    /// Nothing to do: the ring passed the reset on as it ended the session, while it
    /// still had the sockets.
    fn reset(&mut self, _: Side) {}

    /// The ring shuts both sockets down (a WebSocket viewer gets a Close first) and says
    /// when it has let go of them.
    async fn close(&mut self) {
        self.engine.send(Command::Stop { id: self.id });
        while let Some(event) = self.events.recv().await {
            if matches!(event, RingEvent::Ended(_)) {
                return;
            }
        }
    }
}
