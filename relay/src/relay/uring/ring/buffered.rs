//! Consoles the ring carries through buffers: WebSocket consoles, and raw consoles over
//! plain TCP (received and sent as they are: for small messages a receive and a send
//! run inline in the ring's submission, where a splice costs a hop to an io-wq worker).
//!
//! WebSocket consoles: up, the viewer's frames are received, decoded in place
//! (unmasking eight bytes at a time, see [`Decoder`]) and their payload sent to the
//! hypervisor; down, the hypervisor's bytes are received behind room for a header and sent
//! to the viewer as one binary frame. Only the down direction writes to the viewer, so
//! frames never interleave: a pong or a Close answer waits there for a frame boundary.
//!
//! A direction's buffer travels with its receive or send while that is in flight and
//! comes back with the completion; it is held only while bytes move (kept as a spare for
//! the next console that wakes), so an idle WebSocket console holds two polls. It is
//! small (16 KiB) until a receive fills it, then big (256 KiB) while receives keep doing so.

use super::{BUF_SPARES, Carry, Direction, Ring, Step};
use crate::relay::lifecycle::Failure;
use crate::wire::ws_frame::{self, CLOSE_NORMAL, Decoder, MAX_SERVER_HEADER, Reply};
use io_uring::{opcode, types};
use std::io::{self, Write};
use std::sync::atomic::Ordering;

/// The most one receive takes into a small buffer, and into a big one.
const CHUNK: [usize; 2] = [16 << 10, 256 << 10];
/// Room before received hypervisor bytes for their frame's header.
const HEAD: usize = MAX_SERVER_HEADER;

/// A buffered console's state: a WebSocket console's framing, or none for a raw one.
pub(in crate::relay::uring) struct Buffered {
    /// None: a raw console, relayed byte for byte.
    decoder: Option<Decoder>,
    /// An answer for the viewer (a pong, or a Close that ends the direction), due at a
    /// frame boundary.
    reply: Option<Reply>,
    dirs: [Outgoing; 2],
}

#[derive(Default)]
struct Outgoing {
    /// The direction's buffer, when no operation has it.
    buf: Option<Box<[u8]>>,
    /// `buf[start..end]` is still to be sent.
    start: usize,
    end: usize,
    /// Payload bytes in the frame being sent to the viewer, counted once it is all out.
    payload: usize,
    /// This send is the direction's last (a Close frame): the direction ends after it.
    last: bool,
    /// The last receive filled its buffer: the next buffer taken is a big one.
    big: bool,
    /// The last receive took less than it had room for: the source is drained, so the
    /// direction waits for it to be readable rather than receive again (a receive would
    /// nearly always come back EAGAIN, one operation more per message).
    drained: bool,
}

impl Buffered {
    /// Boxed once, on the console's side: the ring only takes it.
    pub(in crate::relay::uring) fn new(decoder: Decoder) -> Box<Buffered> {
        Box::new(Buffered { decoder: Some(decoder), reply: None, dirs: [Outgoing::default(), Outgoing::default()] })
    }

    /// A raw console's: no framing either way.
    pub(super) fn raw() -> Box<Buffered> {
        Box::new(Buffered { decoder: None, reply: None, dirs: [Outgoing::default(), Outgoing::default()] })
    }

    fn framed(&self) -> bool {
        self.decoder.is_some()
    }

    /// The buffers it holds, for the ring's spares.
    pub(super) fn into_buffers(self) -> impl Iterator<Item = Box<[u8]>> {
        self.dirs.into_iter().filter_map(|f| f.buf)
    }
}

impl Ring {
    fn buffered(&mut self, id: u64) -> Option<&mut Buffered> {
        match &mut self.consoles.get_mut(&id)?.carry {
            Carry::Buffered(state) => Some(state),
            Carry::Splice(_) => None,
        }
    }

    pub(super) fn complete_buffered(&mut self, id: u64, dir: Direction, step: Step, result: i32, buf: Option<Box<[u8]>>) {
        if let Some(buf) = buf
            && let Some(state) = self.buffered(id)
        {
            state.dirs[dir.index()].buf = Some(buf);
        }
        let eagain = result == -libc::EAGAIN;
        match step {
            // kTLS will not hand a record that is not application data to a plain receive.
            Step::Fill if result == -libc::EIO && self.kernel_tls_source(id, dir) => {
                self.give_back_buf(id, dir);
                match self.take_control_record(id, dir) {
                    Some(Ok(true)) => self.idle(id, dir),
                    Some(Ok(false)) => self.source_ended(id, dir),
                    Some(Err(e)) => self.end(id, Err(crate::relay::lifecycle::Failure::reading(dir, e))),
                    None => {}
                }
            }
            // Woken (see `wake_viewer_writer`): an answer is due.
            Step::PollIn if result == -libc::ECANCELED => self.idle(id, dir),
            _ if result < 0 && !eagain => self.end(id, Err(Ring::failure(dir, step, result))),
            Step::PollIn => self.receive(id, dir),
            Step::PollOut => self.send(id, dir),
            Step::Fill if eagain => {
                self.give_back_buf(id, dir);
                self.idle(id, dir)
            }
            Step::Fill if result == 0 => self.source_ended(id, dir),
            Step::Fill => self.received(id, dir, result as usize),
            Step::Drain if eagain => self.poll_out(id, dir),
            Step::Drain => self.sent(id, dir, result as usize),
            // (Buffered consoles take no pipe.)
            Step::Retry => {}
        }
    }

    /// Nothing to move: send a due answer (down), else wait for the source.
    fn idle(&mut self, id: u64, dir: Direction) {
        if dir == Direction::Down && self.buffered(id).is_some_and(|state| state.reply.is_some()) {
            return self.send_reply(id);
        }
        self.poll_in(id, dir)
    }

    /// The direction's buffer, taken out for an operation: its own when it is of the size
    /// the direction needs now, else a spare of that size, or a new one.
    fn take_buf(&mut self, id: u64, dir: Direction) -> Option<Box<[u8]>> {
        let state = match &mut self.consoles.get_mut(&id)?.carry {
            Carry::Buffered(state) => state,
            Carry::Splice(_) => return None,
        };
        let f = &mut state.dirs[dir.index()];
        let size = usize::from(f.big);
        match f.buf.take() {
            Some(buf) if size_of(&buf) == size => return Some(buf),
            Some(other) => self.keep_spare_buf(other),
            None => {}
        }
        Some(self.spare_bufs[size].pop().unwrap_or_else(|| vec![0u8; HEAD + CHUNK[size]].into_boxed_slice()))
    }

    /// An idle direction's buffer is kept as a spare, or freed.
    fn give_back_buf(&mut self, id: u64, dir: Direction) {
        let Some(state) = self.buffered(id) else { return };
        if let Some(buf) = state.dirs[dir.index()].buf.take() {
            self.keep_spare_buf(buf);
        }
    }

    /// Keeps a buffer as a spare of its size while there is room for one.
    pub(super) fn keep_spare_buf(&mut self, buf: Box<[u8]>) {
        let size = size_of(&buf);
        if self.spare_bufs[size].len() < BUF_SPARES[size] {
            self.spare_bufs[size].push(buf);
        }
    }

    fn receive(&mut self, id: u64, dir: Direction) {
        let at = if dir == Direction::Down && self.buffered(id).is_some_and(|state| state.framed()) { HEAD } else { 0 };
        let Some(buf) = self.take_buf(id, dir) else { return };
        // HEAD is spare at the end of an up buffer: the same buffer serves either way.
        let room = (buf.len() - HEAD) as u32;
        self.submit(id, dir, Step::Fill, (None, Some(buf)), |sockets, _, buf| {
            let ptr = buf.map_or(std::ptr::null_mut(), |b| b[at..].as_mut_ptr());
            opcode::Recv::new(types::Fd(sockets.ends(dir).0), ptr, room).flags(libc::MSG_DONTWAIT).build()
        });
    }

    fn received(&mut self, id: u64, dir: Direction, n: usize) {
        let Some(state) = self.buffered(id) else { return };
        let Buffered { decoder, reply, dirs } = state;
        let f = &mut dirs[dir.index()];
        let Some(buf) = f.buf.as_mut() else { return };
        // A full receive means more was waiting: a big buffer next time; a small
        // receive, a small one.
        let filled = n == buf.len() - HEAD;
        if filled || n <= CHUNK[0] / 2 {
            f.big = filled;
        }
        f.drained = !filled;
        let Some(decoder) = decoder else {
            // Raw: out as it came; counted once all of it is out, like a frame.
            (f.start, f.end, f.payload) = (0, n, n);
            return self.send(id, dir);
        };
        if dir == Direction::Down {
            let (header, used) = ws_frame::binary_header(n);
            buf[HEAD - used..HEAD].copy_from_slice(&header[..used]);
            (f.start, f.end, f.payload) = (HEAD - used, HEAD + n, n);
            return self.send(id, dir);
        }
        let data = match decoder.decode(&mut buf[..n]) {
            Ok(data) => data,
            Err(e) => {
                self.close_viewer_now(id, e.close_code());
                return self.end(id, Err(Failure::reading(dir, io::Error::new(io::ErrorKind::InvalidData, e))));
            }
        };
        (f.start, f.end) = (0, data);
        if let Some(answer) = decoder.take_reply() {
            *reply = Some(answer);
            self.wake_viewer_writer(id);
        }
        if data > 0 { self.send(id, dir) } else { self.after_sent(id, dir) }
    }

    fn send(&mut self, id: u64, dir: Direction) {
        let Some(state) = self.buffered(id) else { return };
        let f = &mut state.dirs[dir.index()];
        let (start, end) = (f.start, f.end);
        let Some(buf) = f.buf.take() else { return };
        self.submit(id, dir, Step::Drain, (None, Some(buf)), |sockets, _, buf| {
            let ptr = buf.map_or(std::ptr::null(), |b| b[start..].as_ptr());
            let len = (end - start) as u32;
            opcode::Send::new(types::Fd(sockets.ends(dir).1), ptr, len).flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL).build()
        });
    }

    fn sent(&mut self, id: u64, dir: Direction, n: usize) {
        let Some(console) = self.consoles.get_mut(&id) else { return };
        let Carry::Buffered(state) = &mut console.carry else { return };
        let f = &mut state.dirs[dir.index()];
        f.start += n;
        // Up counts payload as it goes; down counts a frame's payload once it is all out.
        let counted = match dir {
            Direction::Up => n,
            Direction::Down if f.start >= f.end => std::mem::take(&mut f.payload),
            Direction::Down => 0,
        };
        let more = f.start < f.end;
        console.counter(dir).fetch_add(counted as u64, Ordering::Relaxed);
        if more { self.send(id, dir) } else { self.after_sent(id, dir) }
    }

    /// Everything taken from the source is out.
    fn after_sent(&mut self, id: u64, dir: Direction) {
        let Some(state) = self.buffered(id) else { return };
        match dir {
            // Our Close went out: no frame may follow; the viewer gets a FIN.
            Direction::Down if state.dirs[1].last => self.source_finished(id, dir),
            Direction::Down if state.reply.is_some() => self.send_reply(id),
            Direction::Up if state.decoder.as_ref().is_some_and(Decoder::closed) => self.source_ended(id, dir),
            _ if state.dirs[dir.index()].drained => {
                self.give_back_buf(id, dir);
                self.poll_in(id, dir)
            }
            _ => self.receive(id, dir),
        }
    }

    /// Sends the due answer to the viewer from the down direction's buffer.
    fn send_reply(&mut self, id: u64) {
        let Some(reply) = self.buffered(id).and_then(|state| state.reply.take()) else { return };
        let Some(mut buf) = self.take_buf(id, Direction::Down) else { return };
        let bytes = reply.as_bytes();
        buf[..bytes.len()].copy_from_slice(bytes);
        let Some(state) = self.buffered(id) else { return };
        let f = &mut state.dirs[Direction::Down.index()];
        (f.buf, f.start, f.end, f.payload, f.last) = (Some(buf), 0, bytes.len(), 0, reply.is_close());
        self.send(id, Direction::Down)
    }

    /// Queues a heartbeat Ping for the viewer, unless an answer is already due (it keeps
    /// the connection busy just as well) or the direction is ending.
    pub(super) fn ping(&mut self, id: u64) {
        let Some(console) = self.consoles.get_mut(&id) else { return };
        let finished = console.finished[Direction::Down.index()];
        let Carry::Buffered(state) = &mut console.carry else { return };
        if finished || state.reply.is_some() || state.dirs[Direction::Down.index()].last {
            return;
        }
        state.reply = Some(Reply::ping());
        self.wake_viewer_writer(id);
    }

    /// The down direction may be waiting on the hypervisor: cut that wait short so it
    /// sends the answer now. A poll that completes first finds the answer after its frame.
    fn wake_viewer_writer(&mut self, id: u64) {
        self.cancel(id, Direction::Down, Step::PollIn);
    }

    /// A source ended. The viewer's end (FIN, or its Close) is passed on as a FIN; the
    /// hypervisor's as a Close frame, then a FIN.
    fn source_ended(&mut self, id: u64, dir: Direction) {
        self.give_back_buf(id, dir);
        if dir == Direction::Up || self.buffered(id).is_some_and(|state| !state.framed()) {
            return self.source_finished(id, dir);
        }
        let Some(state) = self.buffered(id) else { return };
        state.reply = Some(Reply::close(CLOSE_NORMAL));
        self.send_reply(id)
    }

    /// A WebSocket viewer being disconnected gets a Close frame with `code` first, when no
    /// frame of ours is part-way out (best effort: the socket is non-blocking and may be
    /// full).
    pub(super) fn close_viewer_now(&mut self, id: u64, code: u16) {
        let Some(console) = self.consoles.get(&id) else { return };
        let Carry::Buffered(state) = &console.carry else { return };
        if !state.framed() {
            return;
        }
        let down = Direction::Down.index();
        let mid_frame =
            console.inflight[down].and_then(|key| self.ops.get(key)).is_some_and(|op| matches!(op.step, Step::Drain | Step::PollOut));
        if !mid_frame && !console.finished[down] {
            let _ = (&console.sockets.viewer).write(Reply::close(code).as_bytes());
        }
    }
}

/// Which of [`CHUNK`]'s sizes a buffer is (0: small, 1: big).
fn size_of(buf: &[u8]) -> usize {
    usize::from(buf.len() > HEAD + CHUNK[0])
}
