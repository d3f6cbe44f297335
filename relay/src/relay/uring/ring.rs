//! An io_uring thread: one ring for the uring consoles given to it. Raw consoles whose
//! TLS the kernel carries are spliced socket → pipe → socket without crossing into
//! userspace ([`splice`]); raw consoles over plain TCP are received and sent through a
//! buffer, and WebSocket consoles received, framed and sent the same way ([`buffered`]).
//!
//! **What the kernel touches is owned by the operation.** Every submission is an
//! [`InFlight`] kept in a table under its `user_data` until its completion is reaped: it
//! holds the console's sockets, the pipe or the buffer the entry names. A console that
//! ends, or is dropped, cannot close a descriptor or free a buffer an operation still
//! uses; the last completion lets go of them. So no method has to keep a rule by hand.
//!
//! Per direction at most one operation is in flight, so a pipe is never filled and
//! drained at once and a buffer never has two users. An idle console holds two polls.

mod buffered;
mod splice;

use super::{Command, RingEvent};
use crate::relay::lifecycle::{Direction, Failure, Op, Side};
use crate::session::Shared;
pub(super) use buffered::Buffered;
use io_uring::{IoUring, opcode, squeue, types};
pub(super) use splice::pipe_waits;
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use tokio::sync::mpsc::UnboundedSender;

/// user_data of the wake-up read on the eventfd.
const WAKE: u64 = u64::MAX;
/// user_data of cancellations, whose own completions need nothing.
const CANCEL: u64 = u64::MAX - 1;

/// What an operation does, for its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Wait for the source to be readable (or to end).
    PollIn,
    /// Move bytes from the source (into the pipe, or the buffer).
    Fill,
    /// Wait for the destination to have room.
    PollOut,
    /// Move bytes to the destination (from the pipe, or the buffer).
    Drain,
    /// Wait a moment, then try again to take a pipe (none could be made: out of
    /// descriptors).
    Retry,
}

/// A console's two sockets, shared by the console and its operations in flight.
struct Sockets {
    viewer: TcpStream,
    hypervisor: TcpStream,
    /// Which of them carry TLS in the kernel (viewer, hypervisor).
    kernel_tls: [bool; 2],
}

impl Sockets {
    fn kernel_tls(&self, side: Side) -> bool {
        self.kernel_tls[matches!(side, Side::Hypervisor) as usize]
    }

    /// Ends what `side` receives: a TLS close_notify first where the kernel carries its
    /// TLS (best effort: the socket is closing), then the FIN.
    fn finish_sending(&self, side: Side) {
        if self.kernel_tls(side) {
            let _ = crate::tls::kernel::send_close_notify(self.of(side));
        }
        let _ = self.of(side).shutdown(Shutdown::Write);
    }

    fn of(&self, side: Side) -> &TcpStream {
        match side {
            Side::Viewer => &self.viewer,
            Side::Hypervisor => &self.hypervisor,
        }
    }

    /// (source, destination) of a direction.
    fn ends(&self, dir: Direction) -> (RawFd, RawFd) {
        (self.of(dir.from()).as_raw_fd(), self.of(dir.to()).as_raw_fd())
    }
}

/// A pipe a raw direction splices through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// An operation in flight and everything its entry names.
struct InFlight {
    console: u64,
    dir: Direction,
    step: Step,
    _sockets: Rc<Sockets>,
    _pipe: Option<Rc<Pipe>>,
    /// Buffered consoles' buffers travel with the operation and come back at completion.
    buf: Option<Box<[u8]>>,
}

/// Operations in flight, keyed by their `user_data`.
#[derive(Default)]
struct Table {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

impl Table {
    fn insert(&mut self, op: InFlight) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(op);
                i as u64
            }
            None => {
                self.slots.push(Some(op));
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn get(&self, key: u64) -> Option<&InFlight> {
        self.slots.get(key as usize)?.as_ref()
    }

    fn remove(&mut self, key: u64) -> Option<InFlight> {
        let op = self.slots.get_mut(key as usize)?.take()?;
        self.free.push(key as usize);
        Some(op)
    }
}

/// What carries a console's bytes on the ring. Splices were measured against buffers
/// for raw consoles over plain TCP (`cargo xtask bench`, 2 cores, Linux 6.18): as fast in
/// bulk (1.1-1.6 GB/s both), the same machine CPU per GB, but each splice is a hop to an
/// io-wq worker, so a farm of 2,000 small-message consoles took 1.06 proxy cores and fell
/// behind on splices, and 0.73 cores, keeping up, on buffers.
enum Carry {
    Splice(splice::Pipes),
    Buffered(Box<Buffered>),
}

struct Console {
    sockets: Rc<Sockets>,
    /// The key of each direction's operation in flight, if any.
    inflight: [Option<u64>; 2],
    finished: [bool; 2],
    bytes: Arc<Shared>,
    events: UnboundedSender<RingEvent>,
    carry: Carry,
}

impl Console {
    fn counter(&self, dir: Direction) -> &std::sync::atomic::AtomicU64 {
        match dir {
            Direction::Up => &self.bytes.to_hypervisor,
            Direction::Down => &self.bytes.to_viewer,
        }
    }
}

/// How many empty pipes the ring keeps for the next console that wakes: a console wakes
/// for every burst, and a new 1 MiB pipe each time cost more than the burst. A farm of
/// small-message consoles has many bursts in flight at once: with 8 spares, its ring
/// spent a quarter of its time making, sizing and closing pipes (perf). An empty pipe
/// holds two descriptors and its slot array (about 10 KiB of kernel memory), no pages.
/// None are kept once no console is left.
pub(super) const PIPE_SPARES: usize = 64;
/// The same for buffered consoles' buffers (user memory), by size: a direction receives
/// into a small one until a receive fills it, so a console of keystrokes and small
/// updates does not zero 256 KiB at every wake-up.
const BUF_SPARES: [usize; 2] = [256, 16];

pub struct Ring {
    // Declared first, so dropped first: closing the ring waits for the kernel to be done
    // with every operation, before the table below frees what they name.
    ring: IoUring,
    ops: Table,
    consoles: HashMap<u64, Console>,
    commands: Receiver<Command>,
    wake: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    /// Completions taken from the ring, kept to reuse its allocation.
    completed: Vec<(u64, i32)>,
    spare_pipes: Vec<Pipe>,
    /// Small and big buffers of buffered consoles, kept for the next console that wakes.
    spare_bufs: [Vec<Box<[u8]>>; 2],
    /// A direction has waited for a pipe for want of descriptors (said once).
    pipes_short: bool,
}

impl Ring {
    pub fn new(ring: IoUring, commands: Receiver<Command>, wake: OwnedFd) -> Ring {
        Ring {
            ring,
            ops: Table::default(),
            consoles: HashMap::new(),
            commands,
            wake,
            wake_buf: Box::new([0; 8]),
            completed: Vec::new(),
            spare_pipes: Vec::new(),
            spare_bufs: [Vec::new(), Vec::new()],
            pipes_short: false,
        }
    }

    /// Runs until every sender of commands is gone and no console is left.
    pub fn run(mut self) {
        self.arm_wake();
        loop {
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::error!(error = %e, "io_uring submit failed; uring consoles end");
                break;
            }
            self.completed.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let mut completed = std::mem::take(&mut self.completed);
            for (data, result) in completed.drain(..) {
                match data {
                    WAKE if !self.take_commands() => return,
                    WAKE => self.arm_wake(),
                    CANCEL => {}
                    key => self.complete(key, result),
                }
            }
            self.completed = completed;
        }
        for (_, console) in self.consoles.drain() {
            let failed = Failure::new(Side::Hypervisor, Op::Write, io::Error::other("relay's io_uring failed"));
            let _ = console.events.send(RingEvent::Ended(Err(failed)));
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every descriptor and buffer an entry names is owned by the InFlight
            // stored under its user_data until the completion is reaped (`submit`), or
            // by the ring itself (the wake-up read); a timer's time is a static.
            #[allow(unsafe_code)]
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // The queue is full: hand what is there to the kernel and retry.
            let _ = self.ring.submit();
        }
    }

    fn arm_wake(&mut self) {
        let read = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8).build().user_data(WAKE);
        self.push(read);
    }

    /// Takes new commands; false when the engine is gone and no console is left.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Start { id, viewer, framing, hypervisor, kernel_tls, bytes, events }) => {
                    // Raw consoles over plain TCP go through buffers; with TLS in the kernel
                    // they are spliced, so the kernel's records move without a copy.
                    let carry = match framing {
                        Some(ws) => Carry::Buffered(ws),
                        None if kernel_tls.contains(&true) => Carry::Splice(splice::Pipes::default()),
                        None => Carry::Buffered(Buffered::raw()),
                    };
                    let sockets = Rc::new(Sockets { viewer, hypervisor, kernel_tls });
                    let console = Console { sockets, inflight: [None; 2], finished: [false; 2], bytes, events, carry };
                    self.consoles.insert(id, console);
                    for dir in Direction::BOTH {
                        self.poll_in(id, dir);
                    }
                }
                Ok(Command::Stop { id }) => self.stop(id),
                Ok(Command::Ping { id }) => self.ping(id),
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return !self.consoles.is_empty(),
            }
        }
    }

    /// Submits `step` for a direction: `entry` builds the submission from the operation,
    /// which keeps everything it names until completion.
    fn submit(
        &mut self,
        id: u64,
        dir: Direction,
        step: Step,
        (pipe, buf): (Option<Rc<Pipe>>, Option<Box<[u8]>>),
        entry: impl FnOnce(&Sockets, Option<&Pipe>, Option<&mut [u8]>) -> squeue::Entry,
    ) {
        let Some(console) = self.consoles.get_mut(&id) else { return };
        let mut op = InFlight { console: id, dir, step, _sockets: console.sockets.clone(), _pipe: pipe, buf };
        let entry = entry(&op._sockets, op._pipe.as_deref(), op.buf.as_deref_mut());
        let key = self.ops.insert(op);
        console.inflight[dir.index()] = Some(key);
        self.push(entry.user_data(key));
    }

    fn poll_in(&mut self, id: u64, dir: Direction) {
        let mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
        self.submit(id, dir, Step::PollIn, (None, None), |s, _, _| opcode::PollAdd::new(types::Fd(s.ends(dir).0), mask).build());
    }

    fn poll_out(&mut self, id: u64, dir: Direction) {
        let mask = libc::POLLOUT as u32;
        self.submit(id, dir, Step::PollOut, (None, None), |s, _, _| opcode::PollAdd::new(types::Fd(s.ends(dir).1), mask).build());
    }

    fn complete(&mut self, key: u64, result: i32) {
        let Some(op) = self.ops.remove(key) else { return };
        let InFlight { console: id, dir, step, buf, _sockets, _pipe } = op;
        // Let go of what the kernel is done with now, so an emptied pipe can be reused.
        drop((_sockets, _pipe));
        let Some(console) = self.consoles.get_mut(&id) else { return };
        console.inflight[dir.index()] = None;
        match &console.carry {
            Carry::Splice(_) => self.complete_splice(id, dir, step, result),
            Carry::Buffered(_) => self.complete_buffered(id, dir, step, result, buf),
        }
    }

    /// A failure from the kernel's answer to a direction's step.
    fn failure(dir: Direction, step: Step, result: i32) -> Failure {
        let e = io::Error::from_raw_os_error(-result);
        match step {
            Step::PollIn | Step::Fill | Step::Retry => Failure::reading(dir, e),
            Step::PollOut | Step::Drain => Failure::writing(dir, e),
        }
    }

    /// End of stream from a direction's source, everything before it delivered: pass the
    /// FIN on, and end the console once both directions are done.
    fn source_finished(&mut self, id: u64, dir: Direction) {
        let Some(console) = self.consoles.get_mut(&id) else { return };
        console.sockets.finish_sending(dir.to());
        console.finished[dir.index()] = true;
        let _ = console.events.send(RingEvent::Finished(dir));
        if console.finished == [true; 2] {
            self.end(id, Ok(()));
        }
    }

    /// relay ends the console: a WebSocket viewer gets a Close when it can, then both
    /// ends see a clean EOF; operations in flight complete at once.
    fn stop(&mut self, id: u64) {
        self.close_viewer_now(id, crate::wire::ws_frame::CLOSE_NORMAL);
        let Some(console) = self.consoles.get(&id) else { return };
        for side in [Side::Viewer, Side::Hypervisor] {
            console.sockets.finish_sending(side);
            let _ = console.sockets.of(side).shutdown(Shutdown::Both);
        }
        self.end(id, Ok(()));
    }

    /// The console is over: tell its task, cancel what waits, and let go of it. Its
    /// sockets close when the last operation that names them completes.
    fn end(&mut self, id: u64, outcome: Result<(), Failure>) {
        let Some(console) = self.consoles.remove(&id) else { return };
        // A reset on one side is passed on as a reset on the other (the lifecycle's rule,
        // applied here, where the sockets are closed).
        if let Some(side) = outcome.as_ref().err().and_then(Failure::reset_to) {
            let _ = socket2::SockRef::from(console.sockets.of(side)).set_linger(Some(std::time::Duration::ZERO));
        }
        let _ = console.events.send(RingEvent::Ended(outcome));
        for key in console.inflight.into_iter().flatten() {
            // A poll on a live socket would not end by itself.
            self.push(opcode::AsyncCancel::new(key).build().user_data(CANCEL));
        }
        if let Carry::Buffered(ws) = console.carry {
            ws.into_buffers().for_each(|buf| self.keep_spare_buf(buf));
        }
        if self.consoles.is_empty() {
            // No console left: neither are spares.
            self.spare_pipes.clear();
            self.spare_bufs = Default::default();
        }
    }

    /// Reads the record that is not application data a kTLS source holds next (a splice
    /// stops before one with EINVAL, a receive with EIO): `Ok(true)` for a session ticket
    /// (read on), `Ok(false)` for close_notify (the direction's end), an error for
    /// anything else; `None` when the console is gone.
    fn take_control_record(&self, id: u64, dir: Direction) -> Option<io::Result<bool>> {
        use crate::tls::kernel::{control_record, records};
        let console = self.consoles.get(&id)?;
        let mut record = [0u8; 1 << 14];
        Some(records::recv(console.sockets.of(dir.from()), &mut record).and_then(|(kind, n)| match kind {
            records::APPLICATION_DATA => Err(io::Error::other("kTLS held back application data")),
            kind => control_record(kind, &record[..n]),
        }))
    }

    /// Whether a direction's source is a socket whose TLS the kernel carries.
    fn kernel_tls_source(&self, id: u64, dir: Direction) -> bool {
        self.consoles.get(&id).is_some_and(|c| c.sockets.kernel_tls(dir.from()))
    }

    /// Cancels the operation in flight for `dir` if it is `step` (its completion then says
    /// ECANCELED).
    fn cancel(&mut self, id: u64, dir: Direction, step: Step) {
        let Some(key) = self.consoles.get(&id).and_then(|c| c.inflight[dir.index()]) else { return };
        if self.ops.get(key).is_some_and(|op| op.step == step) {
            self.push(opcode::AsyncCancel::new(key).build().user_data(CANCEL));
        }
    }
}
