//! One direction of a userspace relay: read into a buffer, write it all out, pass EOF on
//! as a shutdown. Polled, so one task drives both directions without splitting the
//! streams. Reads go into a scratch buffer of the thread's and straight on to the writer;
//! a pump holds a buffer of its own only while its writer is behind, so a crowd of quiet
//! consoles costs no buffers and a wake-up allocates nothing.

use super::lifecycle::{Direction, Failure, is_truncation};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which end of a direction failed.
#[derive(Debug)]
pub enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl PumpError {
    /// The failure, for the pump carrying `dir`.
    pub fn of(self, dir: Direction) -> Failure {
        match self {
            PumpError::Read(e) => Failure::reading(dir, e),
            PumpError::Write(e) => Failure::writing(dir, e),
        }
    }
}

/// Where a pump's buffer starts.
pub const BUFFER: usize = 4 << 10;
/// Where it starts for a console that will soon move to a kernel back-end.
pub const SMALL_BUFFER: usize = 512;

pub struct Pump {
    /// What the writer has not taken yet (empty, no allocation, otherwise). A boxed
    /// slice, not a Vec: every console holds two pumps all its life.
    buf: Box<[u8]>,
    /// The size of the next read: doubled up to `max` while reads fill it, halved down
    /// to `min` while they use a quarter of it or less.
    size: u32,
    min: u32,
    max: u32,
    /// What is still to be written: `buf[start..end]`. Sizes and offsets are u32 (a
    /// buffer is at most `relay_buffer_bytes`): every console holds two pumps all its life.
    start: u32,
    end: u32,
    read_eof: bool,
    unflushed: bool,
    finished: bool,
}

impl Pump {
    /// A pump whose first bytes out are `pending` (read earlier by a handshake), with a
    /// buffer of `first` bytes that grows up to `max` while reads fill it.
    pub fn new(pending: Vec<u8>, first: usize, max: usize) -> Pump {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let (end, max) = (clamp(pending.len()), clamp(max));
        let size = clamp(first).min(max);
        Pump { buf: pending.into_boxed_slice(), size, min: size, max, start: 0, end, read_eof: false, unflushed: false, finished: false }
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The reader has not ended.
    pub fn reading(&self) -> bool {
        !self.read_eof
    }

    /// Everything read has been written and flushed: the pump holds no byte.
    pub fn empty(&self) -> bool {
        self.start == self.end && !self.unflushed
    }

    /// Moves bytes until the reader would block (Pending), or the reader's EOF has been
    /// passed on as a shutdown of the writer (Ready(Ok)).
    pub fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.start < self.end {
                let n =
                    ready!(writer.as_mut().poll_write(cx, &self.buf[self.start as usize..self.end as usize])).map_err(PumpError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.start += n as u32;
                self.unflushed = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            // Nothing held: the buffer goes (a quiet console holds none).
            if !self.buf.is_empty() {
                (self.buf, self.start, self.end) = (Box::default(), 0, 0);
            }
            if self.read_eof {
                ready!(writer.as_mut().poll_flush(cx)).map_err(PumpError::Write)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(PumpError::Write)?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            match self.read_through(cx, reader.as_mut(), writer.as_mut(), counter)? {
                Through::Moved => {}
                Through::Ended => self.read_eof = true,
                // Held until the writer can take it: nothing more is read meanwhile.
                Through::WriterBehind => return Poll::Pending,
                Through::NothingToRead => {
                    // Push out what the writer holds.
                    if self.unflushed {
                        ready!(writer.as_mut().poll_flush(cx)).map_err(PumpError::Write)?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Reads once into the thread's scratch buffer and writes what came straight on; only
    /// what the writer cannot take yet is copied into a buffer of the pump's own. A
    /// console's wake-up thus allocates nothing when its writer keeps up (its other
    /// direction, with nothing to read, never did need a buffer).
    fn read_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Result<Through, PumpError>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        SCRATCH.with_borrow_mut(|scratch| {
            let size = self.size as usize;
            if scratch.len() < size {
                scratch.resize(size, 0);
            }
            let mut rb = ReadBuf::new(&mut scratch[..size]);
            match reader.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => return Ok(Through::NothingToRead),
                // A TLS peer that closed without close_notify ended its stream.
                Poll::Ready(Err(e)) if is_truncation(&e) => {
                    tracing::debug!("TLS peer closed without close_notify: taken as its end of stream");
                    return Ok(Through::Ended);
                }
                Poll::Ready(Err(e)) => return Err(PumpError::Read(e)),
                Poll::Ready(Ok(())) => {}
            }
            // At most the buffer's size, a u32.
            let n = rb.filled().len();
            if n == 0 {
                return Ok(Through::Ended);
            }
            // A full read means the stream is busy: read more at a time. A small one,
            // less: a console that once streamed goes back to small reads.
            if n == size {
                self.size = (self.size * 2).min(self.max);
            } else if n <= size / 4 {
                self.size = (self.size / 2).max(self.min);
            }
            let mut written = 0;
            while written < n {
                match writer.as_mut().poll_write(cx, &scratch[written..n]) {
                    Poll::Ready(Ok(0)) => return Err(PumpError::Write(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(w)) => {
                        written += w;
                        self.unflushed = true;
                        counter.fetch_add(w as u64, Ordering::Relaxed);
                    }
                    Poll::Ready(Err(e)) => return Err(PumpError::Write(e)),
                    Poll::Pending => break,
                }
            }
            if written == n {
                return Ok(Through::Moved);
            }
            self.buf = scratch[written..n].into();
            (self.start, self.end) = (0, (n - written) as u32);
            Ok(Through::WriterBehind)
        })
    }
}

/// What one read through the scratch buffer did.
enum Through {
    /// Read and written on whole.
    Moved,
    /// The reader ended its stream.
    Ended,
    /// Read, but the writer took only part: the rest is held.
    WriterBehind,
    /// The reader had nothing.
    NothingToRead,
}

thread_local! {
    /// Where every pump on this thread reads into; grown to the largest read asked for.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[tokio::test]
    async fn starts_small_grows_when_busy_and_keeps_order() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut pump = Pump::new(b"early".to_vec(), BUFFER, 64 << 10);
        let mut reader = &data[..];
        let mut out = Vec::new();
        let counter = AtomicU64::new(0);
        std::future::poll_fn(|cx| pump.poll(cx, Pin::new(&mut reader), Pin::new(&mut out), &counter)).await.map_err(|_| ()).unwrap();
        assert_eq!(&out[..5], b"early", "bytes from the handshake go first");
        assert!(out[5..] == data[..], "then every byte in order");
        assert_eq!(pump.size, 64 << 10, "a busy stream grew its reads to their bound");
        assert_eq!(counter.load(Ordering::Relaxed), data.len() as u64 + 5);
    }

    #[tokio::test]
    async fn a_pump_waiting_for_its_reader_holds_no_buffer() {
        use tokio::io::AsyncWriteExt;
        let (mut viewer, reader) = tokio::io::duplex(1 << 20);
        let mut reader = Box::pin(reader);
        let mut pump = Pump::new(Vec::new(), BUFFER, 64 << 10);
        let (mut out, counter) = (Vec::new(), AtomicU64::new(0));
        let mut poll = |pump: &mut Pump, out: &mut Vec<u8>| {
            let waker = std::task::Waker::noop();
            pump.poll(&mut Context::from_waker(waker), reader.as_mut(), Pin::new(out), &counter).is_pending()
        };
        for round in 0..3u8 {
            // A burst bigger than the buffer: read in several goes, then nothing to read.
            let burst = vec![round; 3 * BUFFER + 7];
            viewer.write_all(&burst).await.unwrap();
            assert!(poll(&mut pump, &mut out), "waits for more");
            assert!(pump.buf.is_empty(), "round {round}: no buffer held while waiting");
            assert!(out.ends_with(&burst), "round {round}: the burst went out whole");
        }
        assert_eq!(out.len(), 3 * (3 * BUFFER + 7));
        // Small reads bring a grown buffer back down to where it started.
        for _ in 0..8 {
            viewer.write_all(b"k").await.unwrap();
            poll(&mut pump, &mut out);
        }
        assert_eq!(pump.size as usize, BUFFER);
    }

    /// A TLS peer that closes without close_notify (rustls reports UnexpectedEof).
    struct Truncated(Option<&'static [u8]>);

    impl AsyncRead for Truncated {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            match self.0.take() {
                Some(data) => {
                    buf.put_slice(data);
                    Poll::Ready(Ok(()))
                }
                None => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    #[tokio::test]
    async fn a_tls_close_without_close_notify_is_the_end_of_the_stream() {
        let mut pump = Pump::new(Vec::new(), BUFFER, BUFFER);
        let (mut reader, mut out) = (Truncated(Some(b"last words")), Vec::new());
        let counter = AtomicU64::new(0);
        let done = std::future::poll_fn(|cx| pump.poll(cx, Pin::new(&mut reader), Pin::new(&mut out), &counter)).await;
        assert!(done.is_ok(), "no error: {done:?}");
        assert!(pump.finished(), "the end was passed on");
        assert_eq!(out, b"last words");
    }
}
