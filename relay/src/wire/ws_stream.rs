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
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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
    /// When set, a Ping goes to the viewer this often (boxed: most of a console's life
    /// has none during the handshakes).
    heartbeat: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Wraps an upgraded connection. Client bytes read with the HTTP request are decoded
    /// here and come back as the RFB bytes to be read first.
    pub fn new(upgraded: Prefixed<S>, max_frame: u64) -> io::Result<Prefixed<Self>> {
        let Prefixed { prefix: mut early, io } = upgraded;
        let mut stream = WsByteStream {
            io,
            decoder: Decoder::new(max_frame),
            out: Vec::new(),
            out_at: 0,
            eof: false,
            close_queued: false,
            heartbeat: None,
        };
        let n = stream.decoder.decode(&mut early).map_err(invalid)?;
        early.truncate(n);
        stream.after_decode();
        Ok(Prefixed::new(stream, early))
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The connection under the framing; what the framing has queued stays queued above it.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The connection and the decoder's state, for a relay that frames by itself.
    /// Everything queued must have been flushed.
    pub fn into_parts(self) -> (S, Decoder) {
        debug_assert!(self.out_at >= self.out.len(), "flushed before the hand-off");
        (self.io, self.decoder)
    }

    /// Sends the viewer a Ping every `every` from now on. It goes out while the viewer's
    /// side is read, which the relay does all the time a console is quiet.
    pub fn heartbeat(&mut self, every: Duration) {
        self.heartbeat = Some((every, Box::pin(tokio::time::sleep(every))));
    }

    /// Queues a Ping when one is due, behind any whole frames queued.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) {
        let Some((every, next)) = &mut self.heartbeat else { return };
        if next.as_mut().poll(cx).is_pending() {
            return;
        }
        if !self.close_queued {
            self.out.extend_from_slice(Reply::ping().as_bytes());
        }
        next.as_mut().reset(Instant::now() + *every);
        // Registers the next deadline's waker.
        let _ = next.as_mut().poll(cx);
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

    /// Tells a client that broke the protocol why the connection ends (Close 1002, or 1009
    /// for a frame too big), best effort: what the socket takes now. Nothing is read or
    /// written on this stream after it.
    fn refuse(&mut self, cx: &mut Context<'_>, e: &ws_frame::FrameError) {
        if !self.close_queued {
            // Behind whatever whole frames are queued (none: reads wait until the queue
            // is out).
            self.out.extend_from_slice(Reply::close(e.close_code()).as_bytes());
            self.close_queued = true;
        }
        self.eof = true;
        let _ = self.poll_send_out(cx);
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
        this.poll_heartbeat(cx);
        loop {
            // A pong or Close answer waits for no write from the relay. While one cannot
            // be written (a viewer that sends pings and reads nothing), the viewer is not
            // read either: what relay holds for it stays one frame, and TCP pushes back.
            ready!(this.poll_send_out(cx))?;
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
            let data = match this.decoder.decode(&mut room[..n]) {
                Ok(data) => data,
                Err(e) => {
                    this.refuse(cx, &e);
                    return Poll::Ready(Err(invalid(e)));
                }
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A masked ping carrying 125 bytes, as a client sends it.
    fn ping() -> Vec<u8> {
        let mut f = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
        f.extend((0..125u8).map(|i| i ^ [1, 2, 3, 4][i as usize % 4]));
        f
    }

    #[tokio::test]
    async fn a_viewer_sending_pings_and_reading_nothing_is_not_read_either() {
        let (viewer, relay_side) = duplex(64 << 10);
        let (_viewer_read, mut viewer_write) = tokio::io::split(viewer);
        let mut ws = WsByteStream::new(Prefixed::bare(relay_side), 1 << 20).unwrap().io;
        // The relay reads the viewer as its up pump would, forever.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            while matches!(ws.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let pings: Vec<u8> = std::iter::repeat_with(ping).take(1000).flatten().collect();
        let mut written = 0usize;
        while written < 64 << 20 {
            match tokio::time::timeout(Duration::from_millis(300), viewer_write.write_all(&pings)).await {
                Ok(Ok(())) => written += pings.len(),
                _ => break,
            }
        }
        // Pings that arrive together get one pong (the latest), so a 16 KiB read of pings
        // costs 127 bytes of pongs: about 8 MiB of pings fill the 64 KiB the viewer does
        // not read. Then one pong waits, relay stops reading, and the viewer's pings fill
        // the other way. Without the stop, relay takes all 64 MiB (and queues the pongs).
        assert!(written < 16 << 20, "relay took {} KiB of pings from a viewer that reads nothing", written >> 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_viewer_gets_a_ping_every_heartbeat_and_its_pong_is_no_data() {
        let (mut viewer, relay_side) = duplex(4096);
        let mut ws = WsByteStream::new(Prefixed::bare(relay_side), 1 << 20).unwrap().io;
        ws.heartbeat(Duration::from_secs(20));
        let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = ws.read(&mut buf).await {
                let _ = got_tx.send(buf[..n].to_vec());
            }
        });
        let mut frame = [0u8; 2];
        for _ in 0..3 {
            let before = tokio::time::Instant::now();
            tokio::time::timeout(Duration::from_secs(30), viewer.read_exact(&mut frame)).await.expect("a Ping within 30 s").unwrap();
            assert_eq!(frame, [0x89, 0x00], "an empty Ping");
            assert_eq!(before.elapsed().as_secs(), 20);
            viewer.write_all(&[0x8a, 0x80, 1, 2, 3, 4]).await.unwrap(); // its masked Pong
        }
        viewer.write_all(&[0x82, 0x81, 0, 0, 0, 0, b'k']).await.unwrap();
        assert_eq!(got.recv().await.unwrap(), b"k", "Pongs are not data; the next frame's payload is");
    }

    #[tokio::test]
    async fn a_protocol_error_is_answered_with_close_1002() {
        let (mut viewer, relay_side) = duplex(4096);
        let mut ws = WsByteStream::new(Prefixed::bare(relay_side), 1 << 20).unwrap().io;
        viewer.write_all(&[0x82, 0x01, b'x']).await.unwrap(); // unmasked
        let err = ws.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut close = [0u8; 4];
        viewer.read_exact(&mut close).await.unwrap();
        assert_eq!(close, [0x88, 0x02, 0x03, 0xea], "Close 1002");
    }
}
