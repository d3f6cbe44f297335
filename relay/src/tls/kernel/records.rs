//! Reading and writing TLS records of a given type on a socket the kernel encrypts
//! (kTLS): a record that is not application data comes with its type in a control
//! message, and an alert goes out with its type in one.
#![allow(unsafe_code)] // recvmsg/sendmsg with control messages: the kTLS record-type interface.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd};

/// TLS content types (RFC 8446, 5.1).
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Room for one control message carrying one byte, aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct OneByteCmsg([u8; 32]);

/// Receives what the next record holds into `buf` without blocking: its content type and
/// how many bytes came. Application data may be merged from several records or cut at
/// `buf`'s length; any other record comes alone, with its type.
pub fn recv(socket: &impl AsFd, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = OneByteCmsg([0; 32]);
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths); the fields that
    // matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `iov` (into `buf`, `buf.len()` writable bytes) and at
    // `control` (32 writable bytes), all alive for the call; the kernel writes within them.
    let n = unsafe { libc::recvmsg(socket.as_fd().as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut kind = APPLICATION_DATA;
    // SAFETY: `msg` is as the kernel left it; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // `msg_control`/`msg_controllen` and return null past the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside `control`.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_TLS && header.cmsg_type == libc::TLS_GET_RECORD_TYPE {
            // SAFETY: this message's data is the one record-type byte the kernel wrote.
            kind = unsafe { *libc::CMSG_DATA(cmsg) };
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    Ok((kind, n as usize))
}

/// Sends one record of type `kind` holding `body`, without blocking.
pub fn send(socket: &impl AsFd, kind: u8, body: &[u8]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: body.as_ptr().cast_mut().cast(), iov_len: body.len() };
    let mut control = OneByteCmsg([0; 32]);
    // SAFETY: CMSG_SPACE is arithmetic on a length.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u8>() as u32) } as usize;
    debug_assert!(space <= control.0.len());
    // SAFETY: as in `recv`, all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg_controllen` covers one header, so CMSG_FIRSTHDR returns a pointer to
    // the start of `control`, writable for `space` bytes; its data byte lies inside too.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u8>() as u32) as _;
        *libc::CMSG_DATA(cmsg) = kind;
    }
    // SAFETY: `msg` points at `body` (read only by the kernel) and at `control`, alive for
    // the call.
    let n = unsafe { libc::sendmsg(socket.as_fd().as_raw_fd(), &raw const msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}
