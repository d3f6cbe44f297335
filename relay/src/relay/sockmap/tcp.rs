//! The few socket facts and controls the sockmap back-end needs that std and tokio do not
//! offer: socket cookies, how much a socket has queued and had acknowledged, and the
//! receive low-water mark that makes the kernel run the verdict on already-queued bytes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `SO_COOKIE` (asm-generic/socket.h); the libc crate has it only in its newer uapi tree.
const SO_COOKIE: libc::c_int = 57;

fn getsockopt<T: Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable T and `len` its size; the kernel writes at most
    // `len` bytes and reports how many.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
}

/// The kernel's unique, never reused id of a socket: the key of every map entry.
pub fn cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    getsockopt::<u64>(socket.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE)
}

/// Bytes that have entered the socket's send queue since it opened: those the peer has
/// acknowledged plus those still queued. Redirected bytes count here only once the
/// kernel's backlog has handed them to TCP, which is what ordering needs.
pub fn sent(socket: &impl AsRawFd) -> io::Result<(u64, u64)> {
    let fd = socket.as_raw_fd();
    let acked = tcp_info(fd)?.tcpi_bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to the pointer given.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((acked, acked + queued.max(0) as u64))
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer is a zeroed tcp_info of `len` bytes; the kernel fills a prefix.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero is a valid value for every field, and the kernel wrote the rest.
    Ok(unsafe { info.assume_init() })
}

/// Makes the socket's send buffer hold `bytes` (the kernel doubles the value for its own
/// overhead, as it does for SO_SNDBUF), past the system's `wmem_max`: SO_SNDBUFFORCE needs
/// CAP_NET_ADMIN, which loading the program needed too. Never shrinks it.
pub fn reserve_send_room(socket: &impl AsRawFd, bytes: u64) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let wanted = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX / 2);
    // SO_SNDBUF reads back the doubled value the kernel keeps.
    if getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)? >= wanted.saturating_mul(2) {
        return Ok(());
    }
    // SAFETY: passes a live int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&raw const wanted).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Setting the low-water mark makes the kernel re-run data-ready on the socket, so bytes
/// that were queued before it entered the verdict map are redirected, in order.
pub fn kick(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a live int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
