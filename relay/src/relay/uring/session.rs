//! One session on the io_uring back-end, as its task sees it.

use super::{Command, Event, Uring};
use crate::relay::{Control, Ended, Limits, deadline};
use std::io::ErrorKind;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub async fn run(
    engine: &Uring,
    (mut viewer, viewer_buffered): (TcpStream, Vec<u8>),
    (mut hypervisor, hypervisor_buffered): (TcpStream, Vec<u8>),
    control: &mut Control,
    limits: Limits,
) -> Ended {
    use std::sync::atomic::Ordering::Relaxed;
    // Bytes already read in userspace go first.
    if let Err(e) = hypervisor.write_all(&viewer_buffered).await {
        return Ended::HypervisorError(e.to_string());
    }
    if let Err(e) = viewer.write_all(&hypervisor_buffered).await {
        return Ended::ViewerError(e.to_string());
    }
    control.bytes.to_hypervisor.fetch_add(viewer_buffered.len() as u64, Relaxed);
    control.bytes.to_viewer.fetch_add(hypervisor_buffered.len() as u64, Relaxed);
    drop((viewer_buffered, hypervisor_buffered));
    let (Ok(viewer), Ok(hypervisor)) = (viewer.into_std(), hypervisor.into_std()) else {
        unreachable!("a tokio TcpStream always converts back to std")
    };
    let id = engine.next_id();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    engine.send(Command::Start { id, viewer, hypervisor, bytes: control.bytes.clone(), events: events_tx });

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
                        Err(e) => ended_by(e),
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

/// The ring's error says which side failed ("viewer: ..." or "hypervisor: ...").
fn ended_by(e: std::io::Error) -> Ended {
    let text = e.to_string();
    let viewer = text.starts_with("viewer");
    match (e.kind(), viewer) {
        (ErrorKind::ConnectionReset, true) => Ended::ViewerReset,
        (ErrorKind::ConnectionReset, false) => Ended::HypervisorReset,
        (_, true) => Ended::ViewerError(text),
        (_, false) => Ended::HypervisorError(text),
    }
}
