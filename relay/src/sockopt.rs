//! Socket options and socket facts that std, tokio and socket2 do not offer, in one place,
//! typed: every back-end and probe goes through here rather than calling `setsockopt`
//! itself. Values are plain `Copy` data whose size the kernel must confirm.
#![allow(unsafe_code)] // The one module that calls setsockopt/getsockopt/ioctl directly.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd};

/// Reads option `name` at `level` as a `T`; the kernel must fill exactly a `T`.
pub fn get<T: Copy + Default>(socket: &impl AsFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable T of `len` bytes; the kernel writes at most `len`
    // bytes into it and stores how many it wrote in `len`.
    let rc = unsafe { libc::getsockopt(socket.as_fd().as_raw_fd(), level, name, (&raw mut value).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<T>() {
        return Err(io::Error::other(format!("getsockopt({level}, {name}) returned {len} bytes, expected {}", size_of::<T>())));
    }
    Ok(value)
}

/// Sets option `name` at `level` to `value`.
pub fn set<T: Copy>(socket: &impl AsFd, level: libc::c_int, name: libc::c_int, value: T) -> io::Result<()> {
    set_bytes(socket, level, name, (&raw const value).cast(), size_of::<T>())
}

/// Attaches a TCP upper-layer protocol by name (`TCP_ULP`, e.g. "tls").
pub fn attach_ulp(socket: &impl AsFd, name: &str) -> io::Result<()> {
    set_bytes(socket, libc::SOL_TCP, libc::TCP_ULP, name.as_ptr().cast(), name.len())
}

fn set_bytes(socket: &impl AsFd, level: libc::c_int, name: libc::c_int, value: *const libc::c_void, len: usize) -> io::Result<()> {
    // SAFETY: callers pass a pointer to `len` live, initialised bytes, which the kernel only
    // reads during the call.
    let rc = unsafe { libc::setsockopt(socket.as_fd().as_raw_fd(), level, name, value, len as libc::socklen_t) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The kernel's unique, never reused id of a socket (`SO_COOKIE`): the key of every
/// sockmap map entry.
pub fn cookie(socket: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(socket).cookie()
}

/// Bytes that have entered the socket's send queue since it opened: (those the peer has
/// acknowledged, those plus the ones still queued). Bytes the kernel redirects count here
/// only once its backlog has handed them to TCP, which is what ordering needs.
pub fn sent(socket: &impl AsFd) -> io::Result<(u64, u64)> {
    let acked = bytes_acked(socket)?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to the pointer given.
    if unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((acked, acked + queued.max(0) as u64))
}

/// `tcpi_bytes_acked` from TCP_INFO. The kernel fills as much of `tcp_info` as it knows
/// (older kernels less than libc's struct), so only the prefix up to that field must come.
fn bytes_acked(socket: &impl AsFd) -> io::Result<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer is a zeroed tcp_info of `len` bytes; the kernel fills a prefix
    // and says how long.
    let rc = unsafe { libc::getsockopt(socket.as_fd().as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + size_of::<u64>();
    if (len as usize) < needed {
        return Err(io::Error::other(format!("TCP_INFO gave {len} bytes; tcpi_bytes_acked needs {needed} (Linux 4.1+)")));
    }
    // SAFETY: zero is a valid value for every field, and the kernel wrote the rest.
    Ok(unsafe { info.assume_init() }.tcpi_bytes_acked)
}

/// Makes the socket's send buffer hold `bytes` (the kernel doubles the value for its own
/// overhead, as for SO_SNDBUF), past the system's `wmem_max`: SO_SNDBUFFORCE needs
/// CAP_NET_ADMIN, which loading the eBPF program needed too. Never shrinks it.
pub fn reserve_send_room(socket: &impl AsFd, bytes: u64) -> io::Result<()> {
    let wanted = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX / 2);
    // SO_SNDBUF reads back the doubled value the kernel keeps.
    if get::<libc::c_int>(socket, libc::SOL_SOCKET, libc::SO_SNDBUF)? >= wanted.saturating_mul(2) {
        return Ok(());
    }
    set(socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, wanted)
}

/// Setting the receive low-water mark makes the kernel re-run data-ready on the socket, so
/// bytes queued before it entered the sockmap verdict map are redirected, in order.
pub fn kick(socket: &impl AsFd) -> io::Result<()> {
    set(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1 as libc::c_int)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_options_round_trip_and_cookies_are_unique() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        set(&a, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 7 as libc::c_int).unwrap();
        assert_eq!(get::<libc::c_int>(&a, libc::SOL_SOCKET, libc::SO_RCVLOWAT).unwrap(), 7);
        // A type of the wrong size is refused, not half-filled.
        assert!(get::<u64>(&a, libc::SOL_SOCKET, libc::SO_RCVLOWAT).is_err());
        assert_ne!(cookie(&a).unwrap(), cookie(&b).unwrap());
        let (acked, sent) = sent(&a).unwrap();
        assert!(sent >= acked);
    }
}
