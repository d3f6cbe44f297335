//! A TCP connection whose TLS records the kernel seals and opens (kTLS): reads and writes
//! carry plaintext, like a bare socket, while what is not application data is dealt with
//! here — a session ticket is passed over, close_notify is the end of the stream, any
//! other alert an error, and a key update a clean refusal (see [`KEY_UPDATE`]).

use super::records::{self, ALERT, APPLICATION_DATA, HANDSHAKE};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Handshake message types that may follow a finished handshake (RFC 8446, 4).
const NEW_SESSION_TICKET: u8 = 4;
/// A TLS 1.3 KeyUpdate changes the peer's key for the records after it. Debian 12's
/// kernels (6.1, 6.12) cannot be given a new receive key on a live socket (that came in
/// 6.14), so the console ends with this reason rather than misread what follows.
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;

pub struct KernelTlsStream {
    tcp: TcpStream,
    /// Plaintext rustls had decrypted before the hand-off, read out first.
    pending: Vec<u8>,
    taken: usize,
    /// The peer's close_notify has come (before or after the hand-off).
    closed_by_peer: bool,
    /// Ours has gone out.
    close_notify_sent: bool,
    /// Room for a whole record, for readers with less (allocated on first use).
    scratch: Vec<u8>,
}

/// The most plaintext one TLS record holds.
const MAX_RECORD: usize = 1 << 14;

impl KernelTlsStream {
    pub fn new(tcp: TcpStream, pending: Vec<u8>, closed_by_peer: bool) -> KernelTlsStream {
        KernelTlsStream { tcp, pending, taken: 0, closed_by_peer, close_notify_sent: false, scratch: Vec::new() }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// Whether the peer's close_notify has come (the stream has ended cleanly).
    pub fn closed_by_peer(&self) -> bool {
        self.closed_by_peer
    }

    /// Plaintext rustls held at the move is still to be read.
    pub fn has_pending(&self) -> bool {
        self.taken < self.pending.len()
    }

    /// The plaintext rustls held at the move and not yet read, taken out.
    pub fn take_pending(&mut self) -> Vec<u8> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.drain(..self.taken);
        self.taken = 0;
        pending
    }
}

/// What a record that is not application data means: `Ok(true)` to read on (a session
/// ticket), `Ok(false)` for the end of the stream (close_notify); an error otherwise.
pub fn control_record(kind: u8, body: &[u8]) -> io::Result<bool> {
    match kind {
        ALERT => match body {
            [_, CLOSE_NOTIFY] => Ok(false),
            [_, description] => Err(io::Error::other(format!("the peer sent TLS alert {description}"))),
            _ => Err(io::Error::other("a malformed TLS alert")),
        },
        HANDSHAKE => {
            let mut rest = body;
            while let [kind, a, b, c, tail @ ..] = rest {
                match *kind {
                    NEW_SESSION_TICKET => {}
                    KEY_UPDATE => {
                        return Err(io::Error::other(
                            "the peer sent a TLS KeyUpdate, and this kernel's TLS cannot take a new key on a live connection",
                        ));
                    }
                    other => return Err(io::Error::other(format!("unexpected TLS handshake message {other} after the handshake"))),
                }
                let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                rest = tail.get(len..).unwrap_or_default();
            }
            Ok(true)
        }
        other => Err(io::Error::other(format!("unexpected TLS record type {other}"))),
    }
}

/// Sends close_notify without blocking.
pub fn send_close_notify(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    records::send(socket, ALERT, &[1, CLOSE_NOTIFY]).map(drop)
}

impl AsyncRead for KernelTlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.pending.len() {
            let n = (this.pending.len() - this.taken).min(buf.remaining());
            buf.put_slice(&this.pending[this.taken..this.taken + n]);
            this.taken += n;
            if this.taken == this.pending.len() {
                this.pending = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.closed_by_peer || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            // A control record comes whole only into room for a whole record; a smaller
            // reader (copy's buffers start at 512 bytes) reads through `scratch`, and
            // data beyond its room waits in `pending`.
            let small = buf.remaining() < MAX_RECORD;
            let KernelTlsStream { tcp, scratch, .. } = &mut *this;
            if small && scratch.len() < MAX_RECORD {
                scratch.resize(MAX_RECORD, 0);
            }
            let room: &mut [u8] = if small { scratch } else { buf.initialize_unfilled() };
            match tcp.try_io(Interest::READABLE, || records::recv(tcp, room)) {
                Ok((APPLICATION_DATA, n)) => {
                    if small {
                        let fits = n.min(buf.remaining());
                        buf.put_slice(&this.scratch[..fits]);
                        this.pending = this.scratch[fits..n].to_vec();
                        this.taken = 0;
                    } else {
                        buf.advance(n);
                    }
                    return Poll::Ready(Ok(()));
                }
                // End of the TCP stream without close_notify: the caller sees it as EOF,
                // as with a bare socket.
                Ok((_, 0)) => return Poll::Ready(Ok(())),
                Ok((kind, n)) => {
                    let record = if small { &this.scratch[..n] } else { &buf.initialize_unfilled()[..n] };
                    if !control_record(kind, record)? {
                        this.closed_by_peer = true;
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for KernelTlsStream {
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
    /// A TLS end of stream: close_notify, then the TCP FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_notify_sent {
            ready!(this.tcp.poll_write_ready(cx))?;
            match this.tcp.try_io(Interest::WRITABLE, || send_close_notify(&this.tcp)) {
                Ok(_) => this.close_notify_sent = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
