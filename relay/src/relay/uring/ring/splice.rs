//! Raw consoles with TLS in the kernel, on the ring: per direction, wait for the source
//! (POLL_ADD), splice what it has into the direction's pipe, splice the pipe into the
//! destination (waiting for room with POLL_ADD when it is full), repeat. Splices are
//! non-blocking, so an idle console holds two polls and nothing else: no io-wq worker, no
//! pipe (a direction takes a pipe, 1 MiB, only while bytes move). Bytes never cross into
//! userspace, and the kernel's TLS records move without a copy.

use super::{Carry, Direction, PIPE_SPARES, Pipe, Ring, Step};
use crate::relay::lifecycle::Failure;
use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A direction's pipe capacity, and the most one splice moves: larger pipes mean fewer
/// operations (each splice runs on an io-wq worker) per byte.
const CHUNK: u32 = 1 << 20;

/// How long a direction that could not make a pipe waits before it tries again. A static:
/// the kernel reads the time when the timer is submitted, at the ring's next enter.
static PIPE_RETRY: types::Timespec = types::Timespec::new().nsec(20_000_000);

/// Some ring could not make a pipe for want of descriptors: until one can again, every
/// ring closes the pipes it would keep as spares, so that they do not hold descriptors
/// another ring's directions wait for.
static SHORT_OF_PIPES: AtomicBool = AtomicBool::new(false);

/// Times a direction could not make a pipe for want of descriptors (each try counts).
static PIPE_WAITS: AtomicU64 = AtomicU64::new(0);

/// Times, in this process, a spliced direction found no descriptor for a pipe and waited.
pub(in crate::relay::uring) fn pipe_waits() -> u64 {
    PIPE_WAITS.load(Ordering::Relaxed)
}

/// A raw console's pipes, one per direction while its bytes move.
#[derive(Default)]
pub(super) struct Pipes([Piped; 2]);

#[derive(Default)]
struct Piped {
    pipe: Option<Rc<Pipe>>,
    /// Bytes in the pipe, not yet in the destination.
    held: u32,
}

impl Ring {
    fn pipes(&mut self, id: u64) -> Option<&mut Pipes> {
        match &mut self.consoles.get_mut(&id)?.carry {
            Carry::Splice(pipes) => Some(pipes),
            Carry::Buffered(_) => None,
        }
    }

    pub(super) fn complete_splice(&mut self, id: u64, dir: Direction, step: Step, result: i32) {
        let eagain = result == -libc::EAGAIN;
        let kernel_tls_source = self.kernel_tls_source(id, dir);
        match step {
            // kTLS will not splice a record that is not application data: it is next.
            Step::Fill if result == -libc::EINVAL && kernel_tls_source => self.control_record(id, dir),
            // The wait for descriptors is over: try again. (A console that ended had
            // its timer cancelled, and its completion never gets here.)
            Step::Retry => self.fill(id, dir),
            Step::PollIn | Step::PollOut | Step::Fill | Step::Drain if result < 0 && !eagain => {
                self.end(id, Err(Ring::failure(dir, step, result)))
            }
            Step::PollIn => self.fill(id, dir),
            Step::PollOut => self.drain(id, dir),
            Step::Fill if eagain => {
                // The source had nothing after all: wait for it, pipe-less.
                self.release_pipe(id, dir);
                self.poll_in(id, dir)
            }
            Step::Fill if result == 0 => {
                self.release_pipe(id, dir);
                self.source_finished(id, dir)
            }
            Step::Fill => {
                if let Some(pipes) = self.pipes(id) {
                    pipes.0[dir.index()].held = result as u32;
                }
                self.drain(id, dir)
            }
            Step::Drain if eagain => self.poll_out(id, dir),
            Step::Drain => {
                let Some(console) = self.consoles.get(&id) else { return };
                console.counter(dir).fetch_add(result as u64, Ordering::Relaxed);
                let Some(pipes) = self.pipes(id) else { return };
                let piped = &mut pipes.0[dir.index()];
                piped.held = piped.held.saturating_sub(result as u32);
                if piped.held > 0 { self.drain(id, dir) } else { self.fill(id, dir) }
            }
        }
    }

    /// A kTLS source's next record is not application data (its pipe is empty).
    fn control_record(&mut self, id: u64, dir: Direction) {
        let outcome = self.take_control_record(id, dir);
        self.release_pipe(id, dir);
        match outcome {
            Some(Ok(true)) => self.poll_in(id, dir),
            Some(Ok(false)) => self.source_finished(id, dir),
            Some(Err(e)) => self.end(id, Err(Failure::reading(dir, e))),
            None => {}
        }
    }

    /// Splices what the source has into the direction's pipe (taking one if it has none).
    fn fill(&mut self, id: u64, dir: Direction) {
        let Some(pipes) = self.pipes(id) else { return };
        let pipe = match pipes.0[dir.index()].pipe.clone() {
            Some(pipe) => pipe,
            None => {
                let pipe = match self.spare_pipes.pop().map_or_else(new_pipe, Ok) {
                    Ok(pipe) => Rc::new(pipe),
                    // Out of descriptors: the bytes wait in the source socket (TCP pushes
                    // back on the sender) until a pipe can be made, rather than the
                    // console end. Each try is a timer on the ring.
                    Err(e) if crate::reserve::out_of_descriptors(&e) => {
                        self.pipe_shortage(&e);
                        return self.submit(id, dir, Step::Retry, (None, None), |_, _, _| opcode::Timeout::new(&PIPE_RETRY).build());
                    }
                    Err(e) => {
                        let e = io::Error::new(e.kind(), format!("relay could not make a pipe: {e}"));
                        return self.end(id, Err(Failure::writing(dir, e)));
                    }
                };
                if let Some(pipes) = self.pipes(id) {
                    pipes.0[dir.index()].pipe = Some(pipe.clone());
                }
                pipe
            }
        };
        self.submit(id, dir, Step::Fill, (Some(pipe), None), |sockets, pipe, _| {
            let pipe_w = pipe.map_or(-1, |p| p.write.as_raw_fd());
            opcode::Splice::new(types::Fd(sockets.ends(dir).0), -1, types::Fd(pipe_w), -1, CHUNK)
                .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                .build()
        });
    }

    /// Splices the pipe's bytes into the destination.
    fn drain(&mut self, id: u64, dir: Direction) {
        let Some(pipes) = self.pipes(id) else { return };
        let piped = &pipes.0[dir.index()];
        let (Some(pipe), held) = (piped.pipe.clone(), piped.held) else { return };
        self.submit(id, dir, Step::Drain, (Some(pipe), None), |sockets, pipe, _| {
            let pipe_r = pipe.map_or(-1, |p| p.read.as_raw_fd());
            opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(sockets.ends(dir).1), -1, held)
                .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                .build()
        });
    }

    /// Says once per ring that spliced consoles wait for descriptors (the limit is shared
    /// with every console's sockets: see `limits.max_connections`).
    fn pipe_shortage(&mut self, e: &io::Error) {
        SHORT_OF_PIPES.store(true, Ordering::Relaxed);
        PIPE_WAITS.fetch_add(1, Ordering::Relaxed);
        if !self.pipes_short {
            self.pipes_short = true;
            tracing::warn!(error = %e, "io_uring: out of descriptors for pipes; spliced consoles wait for one (this is said once)");
        }
    }

    /// An empty pipe that no operation holds is given back (kept as a spare, or closed
    /// while descriptors are short): idle consoles hold none.
    fn release_pipe(&mut self, id: u64, dir: Direction) {
        let Some(pipes) = self.pipes(id) else { return };
        let piped = &mut pipes.0[dir.index()];
        if piped.held > 0 {
            return;
        }
        let pipe = piped.pipe.take().and_then(|p| Rc::try_unwrap(p).ok());
        if SHORT_OF_PIPES.load(Ordering::Relaxed) {
            self.spare_pipes.clear();
            return;
        }
        if let Some(pipe) = pipe
            && self.spare_pipes.len() < PIPE_SPARES
        {
            self.spare_pipes.push(pipe);
        }
    }
}

fn new_pipe() -> io::Result<Pipe> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    #[allow(unsafe_code)]
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    #[allow(unsafe_code)]
    let pipe = unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
    // Best effort: an unprivileged process may be limited to smaller pipes (fs.pipe-max-size).
    let _ = set_pipe_size(&pipe.write, CHUNK);
    // A new pipe, not a spare, shows descriptors are there again. Read first: the flag is
    // shared by every ring, and a store at every pipe would bounce its cache line.
    if SHORT_OF_PIPES.load(Ordering::Relaxed) {
        SHORT_OF_PIPES.store(false, Ordering::Relaxed);
    }
    Ok(pipe)
}

/// `F_SETPIPE_SZ`: how much the pipe holds.
fn set_pipe_size(fd: &OwnedFd, size: u32) -> io::Result<()> {
    // SAFETY: F_SETPIPE_SZ takes an int and touches nothing of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
