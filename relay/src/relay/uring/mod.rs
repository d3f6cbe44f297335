//! The io_uring back-end for raw sessions: one thread owns one ring and splices every
//! uring session's bytes socket → pipe → socket ([`ring`]); each session's task only
//! starts it, forwards a forced disconnect, and keeps the idle and half-close timers
//! ([`session`]).

#![allow(unsafe_code)] // io_uring: submission entries name buffers and descriptors by raw pointer.

mod ring;
mod session;

pub use session::run;

use super::lifecycle::{Direction, Failure};
use crate::session::ByteCounters;
use io_uring::{IoUring, opcode};
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::mpsc::UnboundedSender;

/// What a session's task asks of the ring thread.
enum Command {
    Start {
        id: u64,
        viewer: TcpStream,
        /// Set when the viewer speaks WebSocket: its framing state, from where the
        /// userspace decoder stopped.
        framing: Option<Box<ring::WsState>>,
        hypervisor: TcpStream,
        bytes: Arc<ByteCounters>,
        events: UnboundedSender<RingEvent>,
    },
    Stop {
        id: u64,
    },
}

/// What the ring thread tells a session's task.
#[derive(Debug)]
enum RingEvent {
    /// This direction reached end of stream, forwarded.
    Finished(Direction),
    /// The session is over: both directions done or stopped, or a side failed (the ring
    /// has passed a reset on where [`Failure::reset_to`] says).
    Ended(Result<(), Failure>),
}

/// A direction by the ring's index (0 up, 1 down).
fn direction(index: usize) -> Direction {
    Direction::BOTH[index]
}

/// The failure of direction `dir`'s read (from its sender) or write (to its receiver).
fn fault(dir: usize, reading: bool, e: io::Error) -> Failure {
    if reading { Failure::reading(direction(dir), e) } else { Failure::writing(direction(dir), e) }
}

/// The ring thread and the way to reach it.
pub struct Uring {
    /// None once dropping: the ring thread then ends with its last session.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    wake: OwnedFd,
    next_id: AtomicU64,
}

impl Uring {
    /// Sets up a ring with the operations the back-end needs and starts its thread.
    pub fn start(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::new(entries)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (name, code) in
            [("SPLICE", opcode::Splice::CODE), ("POLL_ADD", opcode::PollAdd::CODE), ("ASYNC_CANCEL", opcode::AsyncCancel::CODE)]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!("the kernel's io_uring lacks {name}")));
            }
        }
        // SAFETY: eventfd has no preconditions; the descriptor is new and owned here.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor, owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.try_clone()?;
        std::thread::Builder::new().name("relay-uring".into()).spawn(move || ring::Ring::new(ring, rx, thread_wake).run())?;
        Ok(Uring { commands: Mutex::new(Some(tx)), wake, next_id: AtomicU64::new(1) })
    }

    fn send(&self, command: Command) {
        let sent = self.commands.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|tx| tx.send(command));
        if let Some(Ok(())) = sent {
            self.wake();
        }
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.wake();
    }
}
