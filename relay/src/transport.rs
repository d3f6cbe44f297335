//! A TCP connection, bare or under TLS (relay as TLS server towards viewers, as TLS
//! client towards hypervisors; rustls, or the kernel once a console's TLS has moved
//! there). The pipeline and the relay see one type either way.

use crate::relay::Peer;
use crate::tls::cork::Corked;
use crate::tls::kernel::{self, Declined, KernelTlsStream, Ktls};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{client, server};

pub enum Transport {
    Plain(TcpStream),
    ServerTls(Box<server::TlsStream<Corked>>),
    ClientTls(Box<client::TlsStream<Corked>>),
    /// TLS whose records the kernel seals and opens (kTLS). Boxed, like rustls's: every
    /// console carries a `Transport` per side, and most are plain TCP.
    Kernel(Box<KernelTlsStream>),
    /// Between rustls giving up its keys and the kernel taking them; never seen by I/O
    /// unless that move failed, and then every call fails.
    Detached,
}

/// What became of a leg's TLS at the move to the kernel.
#[derive(Debug)]
pub enum KernelMove {
    /// Not TLS, or already the kernel's.
    NotTls,
    Moved,
    /// Stays in rustls, for this reason.
    Declined(String),
}

impl Transport {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Transport::Plain(s) => Some(s),
            Transport::ServerTls(s) => Some(s.get_ref().0.tcp()),
            Transport::ClientTls(s) => Some(s.get_ref().0.tcp()),
            Transport::Kernel(s) => Some(s.tcp()),
            Transport::Detached => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Transport::Plain(_))
    }

    /// Moves this leg's TLS into the kernel (see [`crate::tls::kernel`]): flushes what
    /// rustls has to send, finishes reading a record begun, takes the plaintext rustls
    /// holds, then gives the kernel the keys. `Err` only past the point of no return: the
    /// leg is then lost.
    #[allow(deprecated)] // rustls's newer kernel-connection API follows KeyUpdates, which these kernels cannot.
    pub async fn enter_kernel(&mut self, ktls: &Ktls) -> io::Result<KernelMove> {
        use tokio::io::AsyncWriteExt;
        let (version, suite) = match self {
            Transport::ServerTls(s) => (s.get_ref().1.protocol_version(), s.get_ref().1.negotiated_cipher_suite()),
            Transport::ClientTls(s) => (s.get_ref().1.protocol_version(), s.get_ref().1.negotiated_cipher_suite()),
            _ => return Ok(KernelMove::NotTls),
        };
        let Some(tcp) = self.tcp() else { return Ok(KernelMove::NotTls) };
        let version = match kernel::prepare(ktls, version, suite, tcp) {
            Ok(v) => v,
            Err(Declined(why)) => {
                self.uncork();
                return Ok(KernelMove::Declined(why));
            }
        };
        // The "tls" layer is attached but has no keys yet: the socket still passes bytes
        // through untouched, so rustls can flush and finish its record.
        self.flush().await?;
        let (pending, closed_by_peer) = self.drain_rustls().await?;
        let secrets = match std::mem::replace(self, Transport::Detached) {
            Transport::ServerTls(s) => {
                let (io, conn) = s.into_inner();
                (io, extract(conn.dangerous_extract_secrets())?)
            }
            Transport::ClientTls(s) => {
                let (io, conn) = s.into_inner();
                (io, extract(conn.dangerous_extract_secrets())?)
            }
            _ => unreachable!("matched above"),
        };
        let (io, secrets) = secrets;
        *self = Transport::Kernel(Box::new(kernel::install(io, version, secrets, pending, closed_by_peer)?));
        Ok(KernelMove::Moved)
    }

    fn uncork(&mut self) {
        match self {
            Transport::ServerTls(s) => s.get_mut().0.uncork(),
            Transport::ClientTls(s) => s.get_mut().0.uncork(),
            _ => {}
        }
    }

    /// Reads to the end of a record rustls has begun, then takes every byte of plaintext
    /// it holds; says whether the peer's close_notify came with them.
    async fn drain_rustls(&mut self) -> io::Result<(Vec<u8>, bool)> {
        use std::io::Read;
        let mut pending = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Some(n) = self.read_to_record_boundary(&mut chunk).await? {
            if n == 0 {
                return Ok((pending, true));
            }
            pending.extend_from_slice(&chunk[..n]);
        }
        let mut take = |reader: &mut dyn Read| -> io::Result<bool> {
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => return Ok(true),
                    Ok(n) => pending.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
        };
        let closed = match self {
            Transport::ServerTls(s) => {
                let conn = s.get_mut().1;
                conn.process_new_packets().map_err(io::Error::other)?;
                take(&mut conn.reader())?
            }
            Transport::ClientTls(s) => {
                let conn = s.get_mut().1;
                conn.process_new_packets().map_err(io::Error::other)?;
                take(&mut conn.reader())?
            }
            _ => false,
        };
        Ok((pending, closed))
    }

    /// Reads plaintext while a record is part-read: `None` once at a record boundary,
    /// even with no plaintext (the record finished may have been a session ticket, and
    /// the peer may send nothing more for a long time).
    async fn read_to_record_boundary(&mut self, chunk: &mut [u8]) -> io::Result<Option<usize>> {
        use tokio::io::AsyncRead;
        std::future::poll_fn(|cx| {
            if self.at_record_boundary() {
                return Poll::Ready(Ok(None));
            }
            let mut read = ReadBuf::new(&mut *chunk);
            match Pin::new(&mut *self).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(read.filled().len()))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending if self.at_record_boundary() => Poll::Ready(Ok(None)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    fn at_record_boundary(&self) -> bool {
        match self {
            Transport::ServerTls(s) => s.get_ref().0.at_record_boundary(),
            Transport::ClientTls(s) => s.get_ref().0.at_record_boundary(),
            _ => true,
        }
    }
}

/// rustls's secrets; it gives them up only with secret extraction enabled and nothing
/// left to send, both made sure of before.
fn extract(secrets: Result<rustls::ExtractedSecrets, rustls::Error>) -> io::Result<rustls::ExtractedSecrets> {
    secrets.map_err(|e| io::Error::other(format!("rustls kept its keys: {e}")))
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS connection was lost moving into the kernel")
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Transport::Plain($s) => $e,
            Transport::ServerTls($s) => $e,
            Transport::ClientTls($s) => $e,
            Transport::Kernel($s) => $e,
            Transport::Detached => Poll::Ready(Err(detached())),
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::ServerTls(s) => s.is_write_vectored(),
            Transport::ClientTls(s) => s.is_write_vectored(),
            Transport::Kernel(s) => s.is_write_vectored(),
            Transport::Detached => false,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Peer for Transport {
    fn reset_on_close(&self) {
        if let Some(tcp) = self.tcp() {
            let _ = tcp.set_zero_linger();
        }
    }
    fn is_plain_tcp(&self) -> bool {
        matches!(self, Transport::Plain(_))
    }
    fn into_tcp(self) -> Option<TcpStream> {
        match self {
            Transport::Plain(s) => Some(s),
            _ => None,
        }
    }
    fn transport_mut(&mut self) -> Option<&mut Transport> {
        Some(self)
    }
    fn is_kernel_stream(&self) -> bool {
        match self {
            Transport::Plain(_) => true,
            // After the peer's close_notify the kernel has nothing more to read, yet the
            // TCP stream may stay open: userspace sees that end, a splice would not. And
            // plaintext rustls held must be read first, by whoever frames it.
            Transport::Kernel(s) => !s.closed_by_peer() && !s.has_pending(),
            _ => false,
        }
    }
    fn into_kernel_stream(self) -> Option<(TcpStream, bool)> {
        match self {
            Transport::Plain(s) => Some((s, false)),
            Transport::Kernel(s) => Some((s.into_tcp(), true)),
            _ => None,
        }
    }
    fn take_kernel_pending(&mut self) -> Vec<u8> {
        match self {
            Transport::Kernel(s) => s.take_pending(),
            _ => Vec::new(),
        }
    }
}
