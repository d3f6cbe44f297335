//! The portable userspace relay: one task, two pumps, any pair of streams.

use super::pump::{Pump, PumpError};
use super::{Control, Ended, Established, Limits, Peer};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep_until, timeout};

/// Which direction a pump error came from.
enum Failure {
    Up(PumpError),
    Down(PumpError),
}

pub async fn run<V: Peer, H: Peer>(pair: Established<V, H>, mut control: Control, limits: Limits) -> Ended {
    let Established { mut viewer, viewer_buffered, mut hypervisor, hypervisor_buffered } = pair;
    let mut up = Pump::new(viewer_buffered, limits.buffer_bytes);
    let mut down = Pump::new(hypervisor_buffered, limits.buffer_bytes);
    let bytes = control.bytes.clone();
    let mut first_eof: Option<Ended> = None;
    let mut deadline = Deadline::new(limits);

    let outcome = loop {
        let moved = poll_fn(|cx| {
            let before = bytes.snapshot();
            let up_r = up.poll(cx, Pin::new(&mut viewer), Pin::new(&mut hypervisor), &bytes.to_hypervisor);
            if let Poll::Ready(Err(e)) = up_r {
                return Poll::Ready(Err(Failure::Up(e)));
            }
            let down_r = down.poll(cx, Pin::new(&mut hypervisor), Pin::new(&mut viewer), &bytes.to_viewer);
            if let Poll::Ready(Err(e)) = down_r {
                return Poll::Ready(Err(Failure::Down(e)));
            }
            // Wake the outer loop whenever a direction finishes or bytes moved, so the
            // idle and half-close clocks see it.
            let finished = (up.finished(), down.finished());
            if bytes.snapshot() != before || up_r.is_ready() || down_r.is_ready() {
                Poll::Ready(Ok(finished))
            } else {
                Poll::Pending
            }
        });
        tokio::select! {
            biased;
            stop = control.stop.wait_for(Option::is_some) => {
                let reason = match stop {
                    Ok(reason) => reason.clone().unwrap_or_default(),
                    Err(_) => "session registry closed".to_string(),
                };
                break Err(Ended::Stopped(reason));
            }
            r = moved => match r {
                Ok((true, true)) => break Ok(()),
                Ok((up_done, down_done)) => {
                    deadline.activity();
                    if first_eof.is_none() && (up_done || down_done) {
                        first_eof = Some(if up_done { Ended::ViewerClosed } else { Ended::HypervisorClosed });
                        deadline.half_closed();
                    }
                }
                Err(Failure::Up(e)) => break Err(failure(e, true, &viewer, &hypervisor)),
                Err(Failure::Down(e)) => break Err(failure(e, false, &viewer, &hypervisor)),
            },
            expired = deadline.wait() => break Err(expired),
        }
    };
    match outcome {
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
    }
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

/// The idle and half-close clocks.
struct Deadline {
    limits: Limits,
    idle_at: Option<Instant>,
    half_close_at: Option<Instant>,
}

impl Deadline {
    fn new(limits: Limits) -> Self {
        let idle_at = limits.idle_timeout.map(|t| Instant::now() + t);
        Deadline { limits, idle_at, half_close_at: None }
    }
    fn activity(&mut self) {
        if let Some(t) = self.limits.idle_timeout {
            self.idle_at = Some(Instant::now() + t);
        }
    }
    fn half_closed(&mut self) {
        self.half_close_at = Some(Instant::now() + self.limits.half_close_timeout);
    }
    async fn wait(&self) -> Ended {
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        let idle = self.idle_at.unwrap_or(far);
        let half = self.half_close_at.unwrap_or(far);
        if idle <= half {
            sleep_until(idle).await;
            Ended::Idle
        } else {
            sleep_until(half).await;
            Ended::HalfCloseTimeout
        }
    }
}
