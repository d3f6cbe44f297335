//! One direction of a userspace relay: read into a fixed buffer, write it all out,
//! pass EOF on as a shutdown. Polled, so one task drives both directions without
//! splitting the streams.

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

pub struct Pump {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    read_eof: bool,
    unflushed: bool,
    finished: bool,
}

impl Pump {
    /// A pump whose first bytes out are `pending` (read earlier by a handshake).
    pub fn new(pending: Vec<u8>, size: usize) -> Pump {
        let end = pending.len();
        let mut buf = pending;
        buf.resize(size.max(end), 0);
        Pump { buf: buf.into_boxed_slice(), start: 0, end, read_eof: false, unflushed: false, finished: false }
    }

    pub fn finished(&self) -> bool {
        self.finished
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
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.start..self.end])).map_err(PumpError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                self.unflushed = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            if self.read_eof {
                ready!(writer.as_mut().poll_flush(cx)).map_err(PumpError::Write)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(PumpError::Write)?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match reader.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    (self.start, self.end) = (0, n);
                    self.read_eof = n == 0;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Read(e))),
                Poll::Pending => {
                    // Nothing more to read for now: push out what the writer holds.
                    if self.unflushed {
                        ready!(writer.as_mut().poll_flush(cx)).map_err(PumpError::Write)?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
