//! The io_uring thread: one ring for every uring session, splicing each direction
//! socket → pipe → socket without copying through userspace (WebSocket consoles, which
//! must be framed, are received and sent instead: [`framed`]).
//!
//! Per direction the loop is: wait for the source to be readable (POLL_ADD), splice what it
//! has into a pipe, splice the pipe into the destination (waiting for room with POLL_ADD
//! when it is full), repeat. Splices are non-blocking, so an idle session holds two polls
//! and nothing else: no io-wq worker, no pipe (a direction has a pipe only while bytes
//! move). At most one operation per direction is in flight, so a pipe is never filled and
//! drained at once.

mod framed;

use super::{Command, RingEvent, fault};
use crate::relay::lifecycle::{Failure, Side};
pub(super) use framed::WsState;
use io_uring::{IoUring, opcode, squeue, types};
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use tokio::sync::mpsc::UnboundedSender;

use crate::session::ByteCounters;

/// A direction's pipe capacity, and the most one splice moves: larger pipes mean fewer
/// operations (each splice runs on an io-wq worker) per byte.
const CHUNK: u32 = 1 << 20;
/// user_data of the wake-up read on the eventfd.
const WAKE: u64 = u64::MAX;
/// user_data of cancellations, whose own completions need nothing.
const CANCEL: u64 = u64::MAX - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    PollIn = 0,
    Fill = 1,
    PollOut = 2,
    Drain = 3,
}

fn user_data(session: u64, dir: usize, op: Op) -> u64 {
    (session << 3) | ((dir as u64) << 2) | op as u64
}

fn decode(data: u64) -> (u64, usize, Op) {
    let op = match data & 3 {
        0 => Op::PollIn,
        1 => Op::Fill,
        2 => Op::PollOut,
        _ => Op::Drain,
    };
    (data >> 3, ((data >> 2) & 1) as usize, op)
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

struct Direction {
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet in the destination.
    in_pipe: u32,
    /// The operation of this direction in flight, if any (there is at most one).
    inflight: Option<Op>,
    done: bool,
}

struct Session {
    /// 0: viewer, 1: hypervisor. Direction 0 runs viewer → hypervisor, 1 the other way.
    sockets: [TcpStream; 2],
    dirs: [Direction; 2],
    bytes: Arc<ByteCounters>,
    events: UnboundedSender<RingEvent>,
    /// Set once the session is ending: no new operation starts.
    ending: bool,
    /// The viewer speaks WebSocket: the ring frames instead of splicing ([`framed`]).
    ws: Option<Box<WsState>>,
}

impl Session {
    fn inflight(&self) -> bool {
        self.dirs.iter().any(|d| d.inflight.is_some())
    }
}

pub struct Ring {
    ring: IoUring,
    commands: Receiver<Command>,
    wake: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    sessions: HashMap<u64, Session>,
    /// Completions taken from the ring, kept to reuse its allocation.
    completed: Vec<(u64, i32)>,
    /// Empty pipes and buffers that directions gave back on going idle, for the next that
    /// wakes: a console wakes for every burst, and a new 1 MiB pipe or 256 KiB buffer each
    /// time cost more than the burst. At most [`SPARES`] each, and none once no console is
    /// left.
    spare_pipes: Vec<Pipe>,
    spare_bufs: Vec<Box<[u8]>>,
}

/// How many empty pipes, and buffers, the ring keeps for reuse.
const SPARES: usize = 8;

impl Ring {
    pub fn new(ring: IoUring, commands: Receiver<Command>, wake: OwnedFd) -> Ring {
        Ring {
            ring,
            commands,
            wake,
            wake_buf: Box::new([0; 8]),
            sessions: HashMap::new(),
            completed: Vec::new(),
            spare_pipes: Vec::new(),
            spare_bufs: Vec::new(),
        }
    }

    /// Runs until every sender of commands is gone and no session is left.
    pub fn run(mut self) {
        self.arm_wake();
        loop {
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::error!(error = %e, "io_uring submit failed; uring sessions end");
                break;
            }
            self.completed.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let mut completed = std::mem::take(&mut self.completed);
            for (data, result) in completed.drain(..) {
                match data {
                    WAKE if !self.take_commands() => return,
                    WAKE => self.arm_wake(),
                    CANCEL => {}
                    _ => self.complete(data, result),
                }
            }
            self.completed = completed;
        }
        for (_, session) in self.sessions.drain() {
            let failed = Failure::new(Side::Hypervisor, crate::relay::lifecycle::Op::Write, io::Error::other("relay's io_uring failed"));
            let _ = session.events.send(RingEvent::Ended(Err(failed)));
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer and descriptor an entry names outlives its operation:
            // sockets and pipes are closed only when their session has nothing in flight,
            // and the wake buffer lives as long as the ring.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
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

    /// Takes new commands; false when the engine is gone.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Start { id, viewer, framing, hypervisor, bytes, events }) => {
                    let idle = || Direction { pipe: None, in_pipe: 0, inflight: None, done: false };
                    let session =
                        Session { sockets: [viewer, hypervisor], dirs: [idle(), idle()], bytes, events, ending: false, ws: framing };
                    self.sessions.insert(id, session);
                    self.poll_in(id, 0);
                    self.poll_in(id, 1);
                }
                Ok(Command::Stop { id }) => self.stop(id),
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return !self.sessions.is_empty(),
            }
        }
    }

    fn fds(&self, id: u64, dir: usize) -> Option<(RawFd, RawFd)> {
        let s = self.sessions.get(&id)?;
        Some((s.sockets[dir].as_raw_fd(), s.sockets[1 - dir].as_raw_fd()))
    }

    fn poll_in(&mut self, id: u64, dir: usize) {
        let Some((src, _)) = self.fds(id, dir) else { return };
        self.mark_busy(id, dir, Op::PollIn);
        let mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
        self.push(opcode::PollAdd::new(types::Fd(src), mask).build().user_data(user_data(id, dir, Op::PollIn)));
    }

    fn poll_out(&mut self, id: u64, dir: usize) {
        let Some((_, dst)) = self.fds(id, dir) else { return };
        self.mark_busy(id, dir, Op::PollOut);
        self.push(opcode::PollAdd::new(types::Fd(dst), libc::POLLOUT as u32).build().user_data(user_data(id, dir, Op::PollOut)));
    }

    fn fill(&mut self, id: u64, dir: usize) {
        let Some((src, _)) = self.fds(id, dir) else { return };
        let pipe_w = match self.pipe(id, dir) {
            Ok(Some(p)) => p.write.as_raw_fd(),
            Ok(None) => return,
            Err(e) => {
                let e = io::Error::new(e.kind(), format!("relay could not make a pipe: {e}"));
                return self.end(id, Err(fault(dir, false, e)));
            }
        };
        self.mark_busy(id, dir, Op::Fill);
        let splice = opcode::Splice::new(types::Fd(src), -1, types::Fd(pipe_w), -1, CHUNK)
            .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
            .build()
            .user_data(user_data(id, dir, Op::Fill));
        self.push(splice);
    }

    fn drain(&mut self, id: u64, dir: usize) {
        let Some((_, dst)) = self.fds(id, dir) else { return };
        let Some(s) = self.sessions.get(&id) else { return };
        let d = &s.dirs[dir];
        let (Some(pipe), len) = (&d.pipe, d.in_pipe) else { return };
        let pipe_r = pipe.read.as_raw_fd();
        self.mark_busy(id, dir, Op::Drain);
        let splice = opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(dst), -1, len)
            .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
            .build()
            .user_data(user_data(id, dir, Op::Drain));
        self.push(splice);
    }

    fn mark_busy(&mut self, id: u64, dir: usize, op: Op) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.dirs[dir].inflight = Some(op);
        }
    }

    /// The direction's pipe, made when it has none (None: no such session).
    fn pipe(&mut self, id: u64, dir: usize) -> io::Result<Option<&Pipe>> {
        let Some(s) = self.sessions.get_mut(&id) else { return Ok(None) };
        let d = &mut s.dirs[dir];
        if d.pipe.is_none() {
            d.pipe = Some(match self.spare_pipes.pop() {
                Some(pipe) => pipe,
                None => new_pipe()?,
            });
        }
        Ok(d.pipe.as_ref())
    }

    /// An empty pipe is given back (kept as a spare, or closed): idle sessions hold none.
    fn release_pipe(&mut self, id: u64, dir: usize) {
        if let Some(s) = self.sessions.get_mut(&id)
            && s.dirs[dir].in_pipe == 0
            && let Some(pipe) = s.dirs[dir].pipe.take()
            && self.spare_pipes.len() < SPARES
        {
            self.spare_pipes.push(pipe);
        }
    }

    fn complete(&mut self, data: u64, result: i32) {
        let (id, dir, op) = decode(data);
        let Some(s) = self.sessions.get_mut(&id) else { return };
        s.dirs[dir].inflight = None;
        if s.ending {
            if !s.inflight() {
                self.finish(id);
            }
            return;
        }
        if s.ws.is_some() {
            return self.complete_framed(id, dir, op, result);
        }
        let eagain = result == -libc::EAGAIN;
        // Polls and fills wait on the direction's source; drains on its destination.
        let fault = |reading: bool| fault(dir, reading, io::Error::from_raw_os_error(-result));
        match op {
            Op::PollIn if result < 0 => self.end(id, Err(fault(true))),
            Op::PollOut if result < 0 => self.end(id, Err(fault(false))),
            Op::PollIn => self.fill(id, dir),
            Op::PollOut => self.drain(id, dir),
            Op::Fill if eagain => {
                self.release_pipe(id, dir);
                self.poll_in(id, dir)
            }
            Op::Fill if result < 0 => self.end(id, Err(fault(true))),
            Op::Fill if result == 0 => self.source_finished(id, dir),
            Op::Fill => {
                s.dirs[dir].in_pipe = result as u32;
                self.drain(id, dir)
            }
            Op::Drain if eagain => self.poll_out(id, dir),
            Op::Drain if result < 0 => self.end(id, Err(fault(false))),
            Op::Drain => {
                let counter = if dir == 0 { &s.bytes.to_hypervisor } else { &s.bytes.to_viewer };
                counter.fetch_add(result as u64, Ordering::Relaxed);
                let d = &mut s.dirs[dir];
                d.in_pipe = d.in_pipe.saturating_sub(result as u32);
                if d.in_pipe > 0 { self.drain(id, dir) } else { self.fill(id, dir) }
            }
        }
    }

    /// End of stream from a direction's source: pass the FIN on (everything before it has
    /// been spliced), and end the session once both directions are done.
    fn source_finished(&mut self, id: u64, dir: usize) {
        self.release_pipe(id, dir);
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let _ = s.sockets[1 - dir].shutdown(Shutdown::Write);
        s.dirs[dir].done = true;
        let _ = s.events.send(RingEvent::Finished(super::direction(dir)));
        if s.dirs.iter().all(|d| d.done) {
            self.end(id, Ok(()));
        }
    }

    fn stop(&mut self, id: u64) {
        self.close_viewer_now(id);
        let Some(s) = self.sessions.get(&id) else { return };
        // Both ends see a clean EOF; operations in flight complete at once.
        for socket in &s.sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.end(id, Ok(()));
    }

    /// Marks the session ending with `outcome`; it is finished once nothing is in flight.
    fn end(&mut self, id: u64, outcome: Result<(), Failure>) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if !s.ending {
            s.ending = true;
            // A reset on one side is passed on as a reset on the other (the lifecycle's
            // rule; applied here, where the sockets are closed).
            if let Some(side) = outcome.as_ref().err().and_then(Failure::reset_to) {
                let socket = &s.sockets[if side == Side::Viewer { 0 } else { 1 }];
                let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
            }
            let _ = s.events.send(RingEvent::Ended(outcome));
            // Cancel the operations still waiting (a poll on a live socket would not end).
            let waiting: Vec<u64> = (0..2).filter_map(|dir| s.dirs[dir].inflight.map(|op| user_data(id, dir, op))).collect();
            for data in waiting {
                self.push(opcode::AsyncCancel::new(data).build().user_data(CANCEL));
            }
        }
        if !self.sessions.get(&id).is_some_and(Session::inflight) {
            self.finish(id);
        }
    }

    /// Closes the session's sockets and pipes.
    fn finish(&mut self, id: u64) {
        self.sessions.remove(&id);
        if self.sessions.is_empty() {
            // No console left: neither are spares.
            self.spare_pipes.clear();
            self.spare_bufs.clear();
        }
    }
}

fn new_pipe() -> io::Result<Pipe> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    let pipe = unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
    // Best effort: an unprivileged process may be limited to smaller pipes (fs.pipe-max-size).
    // SAFETY: F_SETPIPE_SZ takes an int and touches nothing of ours.
    unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok(pipe)
}
