//! A TCP connection under rustls that, while corked, never reads past the end of a TLS
//! record: a header, then exactly its body. So when a console's TLS moves into the kernel,
//! rustls holds whole records only (decrypted, and handed over as plaintext) and the
//! kernel starts at a record boundary. Uncorked, reads are as large as rustls asks.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const HEADER: usize = 5;

pub struct Corked {
    tcp: TcpStream,
    corked: bool,
    header: [u8; HEADER],
    /// Header bytes read of the current record (HEADER once it is complete).
    header_read: usize,
    /// Body bytes of the current record still to read.
    body_left: usize,
}

impl Corked {
    pub fn new(tcp: TcpStream, corked: bool) -> Corked {
        Corked { tcp, corked, header: [0; HEADER], header_read: 0, body_left: 0 }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// Full-size reads from now on (the connection stays with rustls).
    pub fn uncork(&mut self) {
        self.corked = false;
    }

    /// Every record read so far has been read whole.
    pub fn at_record_boundary(&self) -> bool {
        self.header_read == 0 && self.body_left == 0
    }

    /// Notes what a read took from the stream.
    fn consumed(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        while !bytes.is_empty() {
            if self.header_read < HEADER {
                let n = (HEADER - self.header_read).min(bytes.len());
                self.header[self.header_read..self.header_read + n].copy_from_slice(&bytes[..n]);
                self.header_read += n;
                bytes = &bytes[n..];
                if self.header_read == HEADER {
                    self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                }
            } else {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
            }
            if self.header_read == HEADER && self.body_left == 0 {
                self.header_read = 0;
            }
        }
    }
}

impl AsyncRead for Corked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.corked {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        let want = if this.header_read < HEADER { HEADER - this.header_read } else { this.body_left };
        let want = want.min(buf.remaining());
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        let start = buf.filled().len();
        buf.advance(n);
        this.consumed(&buf.filled()[start..start + n]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Corked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn corked_reads_stop_at_each_record_end() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        // Two records (3 and 2 body bytes) and half of a third, in one write.
        sender.write_all(&[23, 3, 3, 0, 3, b'a', b'b', b'c', 23, 3, 3, 0, 2, b'd', b'e', 23, 3]).await.unwrap();
        let mut corked = Corked::new(tcp, true);
        let mut buf = [0u8; 64];
        let mut reads = Vec::new();
        let mut total = 0;
        while total < 17 {
            let n = corked.read(&mut buf).await.unwrap();
            reads.push(n);
            total += n;
        }
        assert_eq!(reads, [5, 3, 5, 2, 2], "header, body, header, body, part of a header");
        assert!(!corked.at_record_boundary(), "mid-header");
        sender.write_all(&[3, 0, 1, b'f']).await.unwrap();
        assert_eq!(corked.read(&mut buf).await.unwrap(), 3, "the rest of the header only");
        assert_eq!(corked.read(&mut buf).await.unwrap(), 1);
        assert!(corked.at_record_boundary());
        corked.uncork();
        sender.write_all(&[1; 40]).await.unwrap();
        drop(sender);
        let mut rest = Vec::new();
        corked.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), 40);
    }
}
