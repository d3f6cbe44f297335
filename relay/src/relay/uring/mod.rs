//! The io_uring back-end: one ring per core, each owned by its thread, carrying the
//! bytes of the uring consoles given to it ([`ring`]: raw consoles received and sent, or
//! spliced socket → pipe → socket where the kernel carries their TLS; WebSocket consoles
//! framed on the ring); each console's task hands it over and runs the shared lifecycle
//! ([`session`]).

mod ring;
mod session;

pub use session::{Leg, run};

use super::lifecycle::{Direction, Failure};
use crate::session::Shared;
use io_uring::{IoUring, opcode};
use std::fs::File;
use std::io;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{FromRawFd, OwnedFd};
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
        framing: Option<Box<ring::Buffered>>,
        hypervisor: TcpStream,
        /// Which sides' TLS the kernel carries (viewer, hypervisor).
        kernel_tls: [bool; 2],
        bytes: Arc<Shared>,
        events: UnboundedSender<RingEvent>,
    },
    Stop {
        id: u64,
    },
    /// A heartbeat is due: a WebSocket console's viewer gets a Ping.
    Ping {
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

/// The ring threads and the ways to reach them. A console stays on the ring its id
/// picks: with one ring for every console, a farm of small-message consoles kept one
/// core busy and fell behind (docs/benchmarks.md), while the other core idled.
pub struct Uring {
    rings: Vec<RingHandle>,
    next_id: AtomicU64,
    /// The rings defer their completion work to their threads (not plain rings).
    deferred: bool,
}

/// One ring thread's command queue and wake-up.
struct RingHandle {
    /// None once dropping: the ring thread then ends with its last session.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    wake: File,
}

impl Uring {
    /// Sets up one ring per core (as the process may use them), each with the operations
    /// the back-end needs and `entries` submission slots, and starts their threads;
    /// `defer`: deferred task run where the kernel has it.
    pub fn start(entries: u32, defer: bool) -> io::Result<Uring> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = (0..cores).map(|i| RingHandle::start(entries, defer, i)).collect::<io::Result<Vec<_>>>()?;
        let deferred = started.iter().all(|(_, deferred)| *deferred);
        let rings = started.into_iter().map(|(ring, _)| ring).collect();
        Ok(Uring { rings, next_id: AtomicU64::new(1), deferred })
    }

    fn send(&self, command: Command) {
        let id = match &command {
            Command::Start { id, .. } | Command::Stop { id } | Command::Ping { id } => *id,
        };
        self.rings[(id % self.rings.len() as u64) as usize].send(command);
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// How many rings (and threads) carry consoles.
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    /// Times a spliced direction found no descriptor for a pipe and waited to try again
    /// (counted by every ring of the process).
    pub fn descriptor_waits(&self) -> u64 {
        ring::pipe_waits()
    }

    /// Whether the rings defer their completion work to their threads: false for plain
    /// rings (a kernel before 6.1, or `uring_defer_taskrun = false`).
    pub fn deferred(&self) -> bool {
        self.deferred
    }
}

impl RingHandle {
    /// The handle, and whether the kernel gave the thread a deferred ring.
    fn start(entries: u32, defer: bool, index: usize) -> io::Result<(RingHandle, bool)> {
        let wake = eventfd()?;
        let (tx, rx) = mpsc::channel();
        let thread_wake = OwnedFd::from(wake.try_clone()?);
        // The ring is made on its thread: a single-issuer ring belongs to the thread that
        // creates it. The thread reports whether the kernel gave it one.
        let (made_tx, made_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new().name(format!("relay-uring-{index}")).spawn(move || match new_ring(entries, defer) {
            Ok(ring) => {
                let _ = made_tx.send(Ok(ring.params().is_setup_single_issuer()));
                ring::Ring::new(ring, rx, thread_wake).run();
            }
            Err(e) => {
                let _ = made_tx.send(Err(e));
            }
        })?;
        let deferred = made_rx.recv().map_err(|_| io::Error::other("the io_uring thread ended before making its ring"))??;
        Ok((RingHandle { commands: Mutex::new(Some(tx)), wake }, deferred))
    }

    fn send(&self, command: Command) {
        let sent = self.commands.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|tx| tx.send(command));
        if let Some(Ok(())) = sent {
            self.wake();
        }
    }

    fn wake(&self) {
        // An eventfd adds the 8-byte counter written to it.
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }
}

impl Drop for RingHandle {
    fn drop(&mut self) {
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.wake();
    }
}

/// The most descriptors the rings keep for themselves (their spare pipes and eventfds),
/// for the open-file limit ([`crate::rlimit`]).
pub fn descriptors() -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    cores * (ring::PIPE_SPARES as u64 * 2 + 2)
}

/// A ring with the operations the back-end needs. Completion work is deferred until the
/// ring's thread asks for completions (single issuer, deferred task run), so a wave of
/// messages costs the thread no interruption per message and is reaped in one batch;
/// kernels before 6.1 lack the flags and get a plain ring, as does `defer` false.
fn new_ring(entries: u32, defer: bool) -> io::Result<IoUring> {
    let deferred = defer.then(|| IoUring::builder().setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun().build(entries));
    let ring = match deferred {
        None => IoUring::new(entries)?,
        Some(Ok(ring)) => ring,
        Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("the kernel's io_uring has no deferred task run: a plain ring");
            IoUring::new(entries)?
        }
        Some(Err(e)) => return Err(e),
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (name, code) in [("SPLICE", opcode::Splice::CODE), ("POLL_ADD", opcode::PollAdd::CODE), ("ASYNC_CANCEL", opcode::AsyncCancel::CODE)]
    {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!("the kernel's io_uring lacks {name}")));
        }
    }
    Ok(ring)
}

/// A new eventfd, for waking the ring thread.
fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd has no preconditions; it returns a new descriptor or -1.
    #[allow(unsafe_code)]
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned by nothing else.
    #[allow(unsafe_code)]
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(efd) }))
}
