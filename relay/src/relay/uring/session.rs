//! One session on the io_uring back-end, as its task sees it.

use super::{Command, Event, Fault, Uring};
use crate::front::ws_frame::Decoder;
use crate::relay::{Control, Ended, Limits, deadline};
use std::io::ErrorKind;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Runs one session whose handshake leftovers are already sent: `framing` is set when the
/// viewer speaks WebSocket (the ring frames its bytes), unset for raw TCP.
pub async fn run(
    engine: &Uring,
    (viewer, framing): (TcpStream, Option<Decoder>),
    hypervisor: TcpStream,
    control: &mut Control,
    limits: Limits,
) -> Ended {
    let viewer = match viewer.into_std() {
        Ok(s) => s,
        Err(e) => return Ended::ViewerError(format!("leaving the reactor: {e}")),
    };
    let hypervisor = match hypervisor.into_std() {
        Ok(s) => s,
        Err(e) => return Ended::HypervisorError(format!("leaving the reactor: {e}")),
    };
    let id = engine.next_id();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    engine.send(Command::Start {
        id,
        viewer,
        framing: framing.map(super::ring::WsState::new),
        hypervisor,
        bytes: control.bytes.clone(),
        events: events_tx,
    });

    let mut first_eof: Option<Ended> = None;
    let mut half_close_at: Option<Instant> = None;
    let mut idle_at = limits.idle_timeout.map(|d| Instant::now() + d);
    let mut idle_seen = None;
    // Why relay itself ended the session, once it has asked the ring to stop it.
    let mut stopping: Option<Ended> = None;
    loop {
        let (half_close, idle) = (deadline(half_close_at), deadline(idle_at));
        tokio::select! {
            biased;
            reason = control.stopped(), if stopping.is_none() => {
                stopping = Some(Ended::Stopped(reason));
                engine.send(Command::Stop { id });
            }
            event = events.recv() => match event {
                Some(Event::Finished(dir)) => {
                    first_eof.get_or_insert(if dir == 0 { Ended::ViewerClosed } else { Ended::HypervisorClosed });
                    half_close_at.get_or_insert(Instant::now() + limits.half_close_timeout);
                }
                Some(Event::Ended(outcome)) => {
                    if let Some(why) = stopping {
                        return why;
                    }
                    return match outcome {
                        Ok(()) => first_eof.unwrap_or(Ended::ViewerClosed),
                        Err(fault) => ended_by(fault),
                    };
                }
                None => return stopping.unwrap_or_else(|| Ended::ViewerError("the io_uring thread stopped".into())),
            },
            () = half_close, if stopping.is_none() => {
                stopping = Some(Ended::HalfCloseTimeout);
                engine.send(Command::Stop { id });
            }
            () = idle, if stopping.is_none() => {
                let now = control.bytes.snapshot();
                if idle_seen == Some(now) {
                    stopping = Some(Ended::Idle);
                    engine.send(Command::Stop { id });
                } else {
                    idle_seen = Some(now);
                    idle_at = limits.idle_timeout.map(|d| Instant::now() + d);
                }
            }
        }
    }
}

/// How a side's failure ends the console: a reset stays a reset.
fn ended_by(fault: Fault) -> Ended {
    let reset = |e: &std::io::Error| e.kind() == ErrorKind::ConnectionReset;
    match fault {
        Fault::Viewer(e) if reset(&e) => Ended::ViewerReset,
        Fault::Hypervisor(e) if reset(&e) => Ended::HypervisorReset,
        Fault::Viewer(e) => Ended::ViewerError(e.to_string()),
        Fault::Hypervisor(e) => Ended::HypervisorError(e.to_string()),
    }
}
