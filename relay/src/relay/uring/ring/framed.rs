//! WebSocket consoles on the ring. Direction 0 receives the viewer's frames, decodes them
//! in place (unmasking eight bytes at a time, see [`Decoder`]) and sends the payload to the
//! hypervisor; direction 1 receives the hypervisor's bytes behind room for a header and
//! sends them to the viewer as one binary frame. Only direction 1 writes to the viewer, so
//! frames never interleave: a pong or a Close answer waits there for a frame boundary.
//!
//! As with splicing, each direction has one operation in flight and holds its buffer only
//! while bytes move (kept as a spare for the next console that wakes, a few at most); an
//! idle WebSocket console holds two polls.

use super::{Op, Ring, user_data};
use crate::relay::lifecycle::{Direction, Failure};
use crate::relay::uring::fault;
use crate::wire::ws_frame::{self, CLOSE_NORMAL, Decoder, MAX_SERVER_HEADER, Reply};
use io_uring::{opcode, types};
use std::io::{self, Write};
use std::sync::atomic::Ordering;

/// The most one receive takes.
const CHUNK: usize = 256 << 10;
/// Room before received hypervisor bytes for their frame's header.
const HEAD: usize = MAX_SERVER_HEADER;

/// A WebSocket session's framing state.
pub(in crate::relay::uring) struct WsState {
    decoder: Decoder,
    /// An answer for the viewer (a pong, or a Close that ends the direction), due at a
    /// frame boundary.
    reply: Option<Reply>,
    dirs: [Frames; 2],
}

#[derive(Default)]
struct Frames {
    buf: Option<Box<[u8]>>,
    /// `buf[start..end]` is still to be sent.
    start: usize,
    end: usize,
    /// Payload bytes in the frame being sent to the viewer, counted once it is all out.
    payload: usize,
    /// This send is the direction's last (a Close frame): the direction ends after it.
    last: bool,
}

impl WsState {
    /// Boxed once, on the session's side: the ring only takes it.
    pub(in crate::relay::uring) fn new(decoder: Decoder) -> Box<WsState> {
        Box::new(WsState { decoder, reply: None, dirs: [Frames::default(), Frames::default()] })
    }
}

impl Ring {
    fn ws(&mut self, id: u64) -> Option<&mut WsState> {
        self.sessions.get_mut(&id)?.ws.as_deref_mut()
    }

    pub(super) fn complete_framed(&mut self, id: u64, dir: usize, op: Op, result: i32) {
        let fault = |reading: bool| fault(dir, reading, io::Error::from_raw_os_error(-result));
        match op {
            // Woken (see `wake_viewer_writer`): an answer is due.
            Op::PollIn if result == -libc::ECANCELED => self.idle(id, dir),
            Op::PollIn if result < 0 => self.end(id, Err(fault(true))),
            Op::PollOut if result < 0 => self.end(id, Err(fault(false))),
            Op::PollIn => self.receive(id, dir),
            Op::PollOut => self.send(id, dir),
            Op::Fill if result == -libc::EAGAIN => {
                self.give_back_buf(id, dir);
                self.idle(id, dir)
            }
            Op::Fill if result < 0 => self.end(id, Err(fault(true))),
            Op::Fill if result == 0 => self.source_ended(id, dir),
            Op::Fill => self.received(id, dir, result as usize),
            Op::Drain if result == -libc::EAGAIN => self.poll_out(id, dir),
            Op::Drain if result < 0 => self.end(id, Err(fault(false))),
            Op::Drain => self.sent(id, dir, result as usize),
        }
    }

    /// Nothing to move: send a due answer (direction 1), else wait for the source.
    fn idle(&mut self, id: u64, dir: usize) {
        if dir == 1 && self.ws(id).is_some_and(|ws| ws.reply.is_some()) {
            return self.send_reply(id);
        }
        self.poll_in(id, dir)
    }

    /// The direction's buffer, a spare or a new one.
    fn buf(&mut self, id: u64, dir: usize) -> Option<&mut [u8]> {
        let ws = self.sessions.get_mut(&id)?.ws.as_deref_mut()?;
        let spares = &mut self.spare_bufs;
        Some(ws.dirs[dir].buf.get_or_insert_with(|| spares.pop().unwrap_or_else(|| vec![0u8; HEAD + CHUNK].into_boxed_slice())))
    }

    /// An idle direction's buffer is kept as a spare, or freed.
    fn give_back_buf(&mut self, id: u64, dir: usize) {
        let Some(ws) = self.ws(id) else { return };
        if let Some(buf) = ws.dirs[dir].buf.take()
            && self.spare_bufs.len() < super::SPARES
        {
            self.spare_bufs.push(buf);
        }
    }

    fn receive(&mut self, id: u64, dir: usize) {
        let Some((src, _)) = self.fds(id, dir) else { return };
        let at = if dir == 1 { HEAD } else { 0 };
        let Some(buf) = self.buf(id, dir) else { return };
        let ptr = buf[at..].as_mut_ptr();
        self.mark_busy(id, dir, Op::Fill);
        let recv = opcode::Recv::new(types::Fd(src), ptr, CHUNK as u32).flags(libc::MSG_DONTWAIT).build();
        self.push(recv.user_data(user_data(id, dir, Op::Fill)));
    }

    fn received(&mut self, id: u64, dir: usize, n: usize) {
        let Some(ws) = self.ws(id) else { return };
        let f = &mut ws.dirs[dir];
        let Some(buf) = f.buf.as_mut() else { return };
        if dir == 1 {
            let (header, used) = ws_frame::binary_header(n);
            buf[HEAD - used..HEAD].copy_from_slice(&header[..used]);
            (f.start, f.end, f.payload) = (HEAD - used, HEAD + n, n);
            return self.send(id, dir);
        }
        let decoded = ws.decoder.decode(&mut buf[..n]);
        let data = match decoded {
            Ok(data) => data,
            Err(e) => return self.end(id, Err(Failure::reading(Direction::Up, io::Error::new(io::ErrorKind::InvalidData, e)))),
        };
        (f.start, f.end) = (0, data);
        if let Some(reply) = ws.decoder.take_reply() {
            ws.reply = Some(reply);
            self.wake_viewer_writer(id);
        }
        if data > 0 { self.send(id, dir) } else { self.after_sent(id, dir) }
    }

    fn send(&mut self, id: u64, dir: usize) {
        let Some((_, dst)) = self.fds(id, dir) else { return };
        let Some(ws) = self.ws(id) else { return };
        let f = &ws.dirs[dir];
        let Some(buf) = f.buf.as_ref() else { return };
        let (ptr, len) = (buf[f.start..].as_ptr(), (f.end - f.start) as u32);
        self.mark_busy(id, dir, Op::Drain);
        let send = opcode::Send::new(types::Fd(dst), ptr, len).flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL).build();
        self.push(send.user_data(user_data(id, dir, Op::Drain)));
    }

    fn sent(&mut self, id: u64, dir: usize, n: usize) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let Some(ws) = s.ws.as_deref_mut() else { return };
        let f = &mut ws.dirs[dir];
        f.start += n;
        if dir == 0 {
            s.bytes.to_hypervisor.fetch_add(n as u64, Ordering::Relaxed);
        }
        if f.start < f.end {
            return self.send(id, dir);
        }
        if dir == 1 {
            s.bytes.to_viewer.fetch_add(std::mem::take(&mut f.payload) as u64, Ordering::Relaxed);
        }
        self.after_sent(id, dir)
    }

    /// Everything taken from the source is out.
    fn after_sent(&mut self, id: u64, dir: usize) {
        let Some(ws) = self.ws(id) else { return };
        if dir == 1 && ws.dirs[1].last {
            // Our Close went out: no frame may follow; the viewer gets a FIN.
            return self.source_finished(id, 1);
        }
        if dir == 0 && ws.decoder.closed() {
            return self.source_ended(id, 0);
        }
        if dir == 1 && ws.reply.is_some() {
            return self.send_reply(id);
        }
        self.receive(id, dir)
    }

    /// Sends the due answer to the viewer from direction 1's buffer.
    fn send_reply(&mut self, id: u64) {
        let Some(reply) = self.ws(id).and_then(|ws| ws.reply.take()) else { return };
        let last = reply.is_close();
        let bytes = reply.as_bytes();
        let Some(buf) = self.buf(id, 1) else { return };
        buf[..bytes.len()].copy_from_slice(bytes);
        let Some(ws) = self.ws(id) else { return };
        let f = &mut ws.dirs[1];
        (f.start, f.end, f.payload, f.last) = (0, bytes.len(), 0, last);
        self.send(id, 1)
    }

    /// Direction 1 may be waiting on the hypervisor: cut that wait short so it sends the
    /// answer now. A poll that completes first finds the answer after its own frame.
    fn wake_viewer_writer(&mut self, id: u64) {
        let Some(s) = self.sessions.get(&id) else { return };
        if s.dirs[1].inflight == Some(Op::PollIn) {
            self.push(opcode::AsyncCancel::new(user_data(id, 1, Op::PollIn)).build().user_data(super::CANCEL));
        }
    }

    /// A source ended. The viewer's end (FIN, or its Close) is passed on as a FIN; the
    /// hypervisor's as a Close frame, then a FIN.
    fn source_ended(&mut self, id: u64, dir: usize) {
        self.give_back_buf(id, dir);
        if dir == 0 {
            return self.source_finished(id, 0);
        }
        let Some(ws) = self.ws(id) else { return };
        ws.reply = Some(Reply::close(CLOSE_NORMAL));
        self.send_reply(id)
    }

    /// A WebSocket viewer being disconnected gets a Close frame first, when no frame of
    /// ours is part-way out (best effort: the socket is non-blocking and may be full).
    pub(super) fn close_viewer_now(&mut self, id: u64) {
        let Some(s) = self.sessions.get(&id) else { return };
        let mid_frame = matches!(s.dirs[1].inflight, Some(Op::Drain | Op::PollOut));
        if s.ws.is_some() && !mid_frame && !s.dirs[1].done {
            let _ = (&s.sockets[0]).write(Reply::close(CLOSE_NORMAL).as_bytes());
        }
    }
}
