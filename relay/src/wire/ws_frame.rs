//! WebSocket framing for a console (RFC 6455 §5), sans I/O: bytes in, bytes out.
//!
//! RFB is a byte stream, so a data frame's payload is passed on as it arrives: no frame is
//! collected whole and a fragmented message needs no reassembly. Only control frames (at
//! most 125 bytes by the RFC) are held. [`Decoder::decode`] turns a buffer of client frames
//! into the RFB bytes they carry in place, in one pass that unmasks eight bytes at a time
//! while moving the payload over the headers it drops. The same decoder serves the
//! userspace relay and the io_uring one.

/// The longest header a server frame needs (2 bytes, then a 64-bit length).
pub const MAX_SERVER_HEADER: usize = 10;
/// A client header: up to 10 bytes, then the 4-byte mask.
const MAX_CLIENT_HEADER: usize = 14;
const MAX_CONTROL: usize = 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// Close status: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close status: the peer broke the protocol.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close status: a message too big to process.
pub const CLOSE_TOO_BIG: u16 = 1009;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unmasked frame from a client")]
    Unmasked,
    #[error("reserved bits set without a negotiated extension")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("text frame on a binary console stream")]
    Text,
    #[error("control frame fragmented or longer than 125 bytes")]
    Control,
    #[error("continuation frame outside a fragmented message, or a new message inside one")]
    Sequence,
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLong { len: u64, limit: u64 },
}

impl FrameError {
    /// The Close status that tells the client why relay ends the connection.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLong { .. } => CLOSE_TOO_BIG,
            _ => CLOSE_PROTOCOL_ERROR,
        }
    }
}

/// A status a client may send in its Close frame (RFC 6455 §7.4): the defined codes that
/// may appear on the wire, and the ranges for libraries and applications.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Ping,
    Pong,
    Close,
}

/// The decoder's state between calls: where in a frame the next byte falls.
#[derive(Debug)]
pub struct Decoder {
    header: [u8; MAX_CLIENT_HEADER],
    header_len: usize,
    in_payload: bool,
    kind: Kind,
    /// Payload bytes still to come in the current frame.
    remaining: u64,
    /// The mask, rotated so that `mask[0]` applies to the next payload byte.
    mask: [u8; 4],
    /// A fragmented data message is open: only continuations (and control) may follow.
    in_message: bool,
    control: [u8; MAX_CONTROL],
    control_len: usize,
    /// A frame to send back (a pong or the closing handshake's answer), server-framed.
    reply: Option<Reply>,
    closed: bool,
    max_frame: u64,
}

/// A control frame to send to the client, already framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    frame: [u8; 2 + MAX_CONTROL],
    len: usize,
}

impl Reply {
    fn new(opcode: u8, payload: &[u8]) -> Reply {
        let mut frame = [0u8; 2 + MAX_CONTROL];
        frame[0] = 0x80 | opcode;
        frame[1] = payload.len() as u8;
        frame[2..2 + payload.len()].copy_from_slice(payload);
        Reply { frame, len: 2 + payload.len() }
    }

    /// A Ping with no payload: the heartbeat relay sends quiet viewers.
    pub fn ping() -> Reply {
        Reply::new(OP_PING, &[])
    }

    /// A Close frame with `code` and no reason.
    pub fn close(code: u16) -> Reply {
        Reply::new(OP_CLOSE, &code.to_be_bytes())
    }

    /// A Close frame: nothing may be sent after it.
    pub fn is_close(&self) -> bool {
        self.frame[0] & 0x0f == OP_CLOSE
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.frame[..self.len]
    }
}

impl Decoder {
    /// A decoder refusing frames longer than `max_frame` bytes.
    pub fn new(max_frame: u64) -> Decoder {
        Decoder {
            header: [0; MAX_CLIENT_HEADER],
            header_len: 0,
            in_payload: false,
            kind: Kind::Data,
            remaining: 0,
            mask: [0; 4],
            in_message: false,
            control: [0; MAX_CONTROL],
            control_len: 0,
            reply: None,
            closed: false,
            max_frame,
        }
    }

    /// Decodes the client frames in `buf` in place and returns how many RFB bytes now
    /// lead it. All of `buf` is consumed: a partial header or control payload is kept
    /// here until the next call. Bytes after a Close frame are ignored, as the RFC says.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<usize, FrameError> {
        let (mut read, mut written) = (0, 0);
        while read < buf.len() && !self.closed {
            if !self.in_payload {
                read += self.take_header(&buf[read..])?;
                continue;
            }
            let take = (buf.len() - read).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            if self.kind == Kind::Data {
                unmask_move(buf, read, written, take, &mut self.mask);
                written += take;
            } else {
                let room = &mut self.control[self.control_len..self.control_len + take];
                room.copy_from_slice(&buf[read..read + take]);
                unmask_move(room, 0, 0, take, &mut self.mask);
                self.control_len += take;
            }
            read += take;
            self.remaining -= take as u64;
            if self.remaining == 0 {
                self.end_frame();
            }
        }
        Ok(written)
    }

    /// The frame to send back, if one is due (a pong, or the answer to a Close). Only the
    /// latest ping is answered, as the RFC allows.
    pub fn take_reply(&mut self) -> Option<Reply> {
        self.reply.take()
    }

    /// The client sent Close: nothing more will be decoded.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Takes header bytes from `input`; returns how many it used.
    fn take_header(&mut self, input: &[u8]) -> Result<usize, FrameError> {
        let mut used = 0;
        loop {
            let need = self.header_need();
            let take = (need - self.header_len).min(input.len() - used);
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[used..used + take]);
            self.header_len += take;
            used += take;
            if self.header_len < need {
                return Ok(used);
            }
            if self.header[1] & 0x80 == 0 {
                // Refused at once: an unmasked header's length would be misread.
                return Err(FrameError::Unmasked);
            }
            // With two bytes the header's full length is known: go on for the rest.
            if need > 2 {
                self.start_frame()?;
                return Ok(used);
            }
        }
    }

    fn header_need(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + 4
    }

    fn start_frame(&mut self) -> Result<(), FrameError> {
        let (b0, b1) = (self.header[0], self.header[1]);
        if b0 & 0x70 != 0 {
            return Err(FrameError::Reserved);
        }
        let fin = b0 & 0x80 != 0;
        let (len, mask_at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([self.header[2], self.header[3]])), 4),
            127 => (u64::from_be_bytes(self.header[2..10].try_into().expect("eight bytes")), 10),
            n => (u64::from(n), 2),
        };
        self.kind = match b0 & 0x0f {
            OP_BINARY | OP_CONTINUATION => {
                let continuation = b0 & 0x0f == OP_CONTINUATION;
                if continuation != self.in_message {
                    return Err(FrameError::Sequence);
                }
                self.in_message = !fin;
                Kind::Data
            }
            OP_TEXT => return Err(FrameError::Text),
            op @ (OP_CLOSE | OP_PING | OP_PONG) => {
                if !fin || len > MAX_CONTROL as u64 {
                    return Err(FrameError::Control);
                }
                match op {
                    OP_CLOSE => Kind::Close,
                    OP_PING => Kind::Ping,
                    _ => Kind::Pong,
                }
            }
            op => return Err(FrameError::Opcode(op)),
        };
        if len > self.max_frame {
            return Err(FrameError::TooLong { len, limit: self.max_frame });
        }
        self.mask.copy_from_slice(&self.header[mask_at..mask_at + 4]);
        self.remaining = len;
        self.control_len = 0;
        self.header_len = 0;
        self.in_payload = true;
        if len == 0 {
            self.end_frame();
        }
        Ok(())
    }

    fn end_frame(&mut self) {
        self.in_payload = false;
        let payload = &self.control[..self.control_len];
        match self.kind {
            Kind::Data | Kind::Pong => {}
            Kind::Ping => self.reply = Some(Reply::new(OP_PONG, payload)),
            Kind::Close => {
                // Echo a valid status code (not the reason) back, then stop; answer a
                // malformed one (a lone byte, a code no endpoint may send) with 1002.
                let reply = match payload {
                    [] => Reply::new(OP_CLOSE, &[]),
                    [a, b, ..] if valid_close_code(u16::from_be_bytes([*a, *b])) => Reply::new(OP_CLOSE, &[*a, *b]),
                    _ => Reply::close(CLOSE_PROTOCOL_ERROR),
                };
                self.reply = Some(reply);
                self.closed = true;
            }
        }
    }
}

/// Unmasks `len` bytes at `buf[from..]` into `buf[to..]` (`to <= from`), eight at a time,
/// and rotates `mask` past them. Moving forward is safe: each write lands at or before the
/// bytes just read, never on bytes still to be read.
fn unmask_move(buf: &mut [u8], from: usize, to: usize, len: usize, mask: &mut [u8; 4]) {
    debug_assert!(to <= from);
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut i = 0;
    while i + 8 <= len {
        let word = u64::from_ne_bytes(buf[from + i..from + i + 8].try_into().expect("eight bytes")) ^ wide;
        buf[to + i..to + i + 8].copy_from_slice(&word.to_ne_bytes());
        i += 8;
    }
    while i < len {
        buf[to + i] = buf[from + i] ^ mask[i % 4];
        i += 1;
    }
    mask.rotate_left(len % 4);
}

/// The header of a final, unmasked binary frame of `len` bytes (servers do not mask);
/// returns the buffer and how much of it is the header.
pub fn binary_header(len: usize) -> ([u8; MAX_SERVER_HEADER], usize) {
    let mut h = [0u8; MAX_SERVER_HEADER];
    h[0] = 0x80 | OP_BINARY;
    let used = if len < 126 {
        h[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame, masked with `mask`.
    fn frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn decode_in_pieces(d: &mut Decoder, input: &[u8], piece: usize) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        for chunk in input.chunks(piece.max(1)) {
            let mut buf = chunk.to_vec();
            let n = d.decode(&mut buf)?;
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    #[test]
    fn payloads_come_out_unmasked_however_the_input_is_cut() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut input = frame(0x82, b"RFB 003.008\n", [1, 2, 3, 4]);
        input.extend(frame(0x02, &big[..300], [9, 8, 7, 6]));
        input.extend(frame(0x89, b"ping!", [5, 5, 5, 5]));
        input.extend(frame(0x80, &big[300..], [0xde, 0xad, 0xbe, 0xef]));
        let mut want = b"RFB 003.008\n".to_vec();
        want.extend_from_slice(&big);
        for piece in [1, 2, 3, 7, 13, 100, 4096, input.len()] {
            let mut d = Decoder::new(1 << 20);
            assert_eq!(decode_in_pieces(&mut d, &input, piece).unwrap(), want, "cut every {piece} bytes");
            let pong = d.take_reply().unwrap();
            assert_eq!(pong.as_bytes(), b"\x8a\x05ping!", "the ping is answered");
            assert!(!pong.is_close());
        }
    }

    #[test]
    fn a_close_is_answered_with_its_code_and_ends_decoding() {
        let mut d = Decoder::new(1024);
        let mut input = frame(0x82, b"ab", [1, 1, 1, 1]);
        input.extend(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e'], [7, 7, 7, 7]));
        input.extend(frame(0x82, b"after", [1, 1, 1, 1]));
        assert_eq!(decode_in_pieces(&mut d, &input, 5).unwrap(), b"ab", "nothing after Close");
        assert!(d.closed());
        let answer = d.take_reply().unwrap();
        assert_eq!(answer.as_bytes(), b"\x88\x02\x03\xe8");
        assert!(answer.is_close(), "nothing may follow it");
    }

    #[test]
    fn an_invalid_close_code_is_never_echoed() {
        for (payload, answer) in [
            (&[0x03, 0xe7][..], &b"\x88\x02\x03\xea"[..]), // 999: answered 1002
            (&[0x03, 0xed][..], &b"\x88\x02\x03\xea"[..]), // 1005 must not be sent
            (&[0x03][..], &b"\x88\x02\x03\xea"[..]),       // a lone byte
            (&[0x0f, 0xa0][..], &b"\x88\x02\x0f\xa0"[..]), // 4000: an application's, echoed
            (&[][..], &b"\x88\x00"[..]),                   // no status: none back
        ] {
            let mut d = Decoder::new(1024);
            decode_in_pieces(&mut d, &frame(0x88, payload, [3, 1, 4, 1]), 3).unwrap();
            assert_eq!(d.take_reply().unwrap().as_bytes(), answer, "Close with {payload:?}");
        }
        assert_eq!(FrameError::TooLong { len: 2, limit: 1 }.close_code(), CLOSE_TOO_BIG);
        assert_eq!(FrameError::Unmasked.close_code(), CLOSE_PROTOCOL_ERROR);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let cases: [(Vec<u8>, FrameError); 7] = [
            (vec![0x82, 0x01, b'x'], FrameError::Unmasked),
            (frame(0xc2, b"x", [0; 4]), FrameError::Reserved),
            (frame(0x81, b"hi", [0; 4]), FrameError::Text),
            (frame(0x83, b"", [0; 4]), FrameError::Opcode(3)),
            (frame(0x09, b"", [0; 4]), FrameError::Control),
            (frame(0x89, &[0; 126], [0; 4]), FrameError::Control),
            (frame(0x80, b"x", [0; 4]), FrameError::Sequence),
        ];
        for (input, want) in cases {
            assert_eq!(Decoder::new(1024).decode(&mut input.clone()), Err(want), "{input:x?}");
        }
        let mut open = frame(0x02, b"a", [0; 4]);
        open.extend(frame(0x82, b"b", [0; 4]));
        assert_eq!(Decoder::new(1024).decode(&mut open), Err(FrameError::Sequence), "a new message inside a fragmented one");
        let mut long = frame(0x82, &[0; 2000], [0; 4]);
        assert_eq!(Decoder::new(1024).decode(&mut long), Err(FrameError::TooLong { len: 2000, limit: 1024 }));
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        assert_eq!(binary_header(5).0[..2], [0x82, 5]);
        assert_eq!(binary_header(125).1, 2);
        let (h, n) = binary_header(126);
        assert_eq!(&h[..n], &[0x82, 126, 0, 126]);
        let (h, n) = binary_header(70_000);
        assert_eq!(&h[..n], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }
}
