//! A WebSocket carrying RFB, seen as a byte stream: binary frames in, binary frames out.
//! RFB does not care how its bytes are cut into frames (noVNC cuts as it likes), so the
//! handshakes and the relay treat this like any other socket.
//!
//! Reads decode in place in the caller's buffer ([`ws_frame::Decoder`]), so a console
//! holds no read buffer of its own; writes go out as one vectored write of header and
//! payload, and only what the socket did not take is copied and held.

use super::prefixed::Prefixed;
use super::ws_frame::{self, CLOSE_NORMAL, Decoder, Reply};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this, a held output buffer is freed once sent: an idle console keeps none.
const KEEP_OUT_BYTES: usize = 4 << 10;

pub struct WsByteStream<S> {
    io: S,
    decoder: Decoder,
    /// Whole server frames not yet written: a control reply, or the part of a data frame
    /// the socket did not take. Frames never interleave: new ones queue behind.
    out: Vec<u8>,
    out_at: usize,
    /// The client sent Close (or its TCP stream ended): reads return end of stream.
    eof: bool,
    /// Our Close frame is queued or sent.
    close_queued: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Wraps an upgraded connection. Client bytes read with the HTTP request are decoded
    /// here and come back as the RFB bytes to be read first.
    pub fn new(upgraded: Prefixed<S>, max_frame: u64) -> io::Result<Prefixed<Self>> {
        let Prefixed { prefix: mut early, io } = upgraded;
        let mut stream = WsByteStream { io, decoder: Decoder::new(max_frame), out: Vec::new(), out_at: 0, eof: false, close_queued: false };
        let n = stream.decoder.decode(&mut early).map_err(invalid)?;
        early.truncate(n);
        stream.after_decode();
        Ok(Prefixed::new(stream, early))
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The connection and the decoder's state, for a relay that frames by itself.
    /// Everything queued must have been flushed.
    pub fn into_parts(self) -> (S, Decoder) {
        debug_assert!(self.out_at >= self.out.len(), "flushed before the hand-off");
        (self.io, self.decoder)
    }

    /// Queues what the decoder wants answered and notes a Close.
    fn after_decode(&mut self) {
        if let Some(reply) = self.decoder.take_reply() {
            self.out.extend_from_slice(reply.as_bytes());
        }
        if self.decoder.closed() {
            self.eof = true;
            self.close_queued = true;
        }
    }

    /// Writes out the queued frames.
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out_at = 0;
        if self.out.capacity() > KEEP_OUT_BYTES {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }
}

fn invalid(e: ws_frame::FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            // A pong or Close answer waits for no write from the relay; if the socket is
            // full, this task is woken when it drains.
            if let Poll::Ready(Err(e)) = this.poll_send_out(cx) {
                return Poll::Ready(Err(e));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let room = buf.initialize_unfilled();
            if room.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(room);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut raw))?;
            let n = raw.filled().len();
            if n == 0 {
                // The TCP stream ended without a Close frame: the viewer is gone all the same.
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
            let data = this.decoder.decode(&mut room[..n]).map_err(invalid)?;
            this.after_decode();
            if data > 0 {
                buf.advance(data);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            // No data frame may follow a Close.
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What is queued goes first; it also bounds what is held to one frame.
        ready!(this.poll_send_out(cx))?;
        let (header, used) = ws_frame::binary_header(data.len());
        let header = &header[..used];
        if !this.io.is_write_vectored() {
            this.out.extend_from_slice(header);
            this.out.extend_from_slice(data);
            let _ = this.poll_send_out(cx)?;
            return Poll::Ready(Ok(data.len()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &[IoSlice::new(header), IoSlice::new(data)]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        // The socket took part of the frame: hold the rest, so the frame stays whole.
        this.out.extend_from_slice(&header[n.min(used)..]);
        this.out.extend_from_slice(&data[n.saturating_sub(used)..]);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_out(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Ends the stream with a Close frame (the WebSocket form of a FIN), then the TCP FIN.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_queued {
            self.out.extend_from_slice(Reply::close(CLOSE_NORMAL).as_bytes());
            self.close_queued = true;
        }
        ready!(self.poll_send_out(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
