//! A stream and the bytes already read from it that nothing has consumed yet.
//!
//! Every phase of a connection reads ahead: the request head's reader takes what follows
//! the head, the dialer what follows the hypervisor's CONNECT reply, each RFB handshake
//! what follows its last message. Those bytes belong to the next phase, so they travel
//! with their stream as one value. Reads take them first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Prefixed<S> {
    /// Read from `io` but not consumed: the next reader's first bytes.
    pub prefix: Vec<u8>,
    pub io: S,
}

impl<S> Prefixed<S> {
    pub fn new(io: S, prefix: Vec<u8>) -> Self {
        Prefixed { prefix, io }
    }

    /// A stream with nothing read ahead.
    pub fn bare(io: S) -> Self {
        Prefixed { prefix: Vec::new(), io }
    }

    /// The same bytes ahead of another view of the stream (a TLS session over it, a
    /// WebSocket over it).
    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> Prefixed<T> {
        Prefixed { prefix: self.prefix, io: f(self.io) }
    }

    /// As [`Prefixed::map`], for a view that may not exist.
    pub fn try_map<T>(self, f: impl FnOnce(S) -> Option<T>) -> Option<Prefixed<T>> {
        Some(Prefixed { prefix: self.prefix, io: f(self.io)? })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.drain(..n);
        if this.prefix.is_empty() {
            // Consumed: an idle console keeps no room for it.
            this.prefix = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn reads_the_prefix_first_then_the_stream() {
        let mut s = Prefixed::new(&b" world"[..], b"hello".to_vec());
        let mut small = [0u8; 3];
        s.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "lo world");
        assert_eq!(s.prefix.capacity(), 0, "a consumed prefix holds no memory");
    }
}
