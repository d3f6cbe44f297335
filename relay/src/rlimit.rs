//! The open-file limit, fitted to the configured connections at start-up. A console holds
//! two descriptors (viewer and hypervisor), plus a pipe or two while the io_uring back-end
//! moves its bytes; a soft limit of 1024, common by default, would let about 500 consoles
//! open and fail the rest, however high `max_connections` is.
#![allow(unsafe_code)] // getrlimit/setrlimit through libc.

use std::io;

/// Descriptors relay needs beyond its consoles': listeners, the control socket and its
/// clients, the web client's files, the eBPF maps, the io_uring ring and spares.
const OVERHEAD: u64 = 256;

/// What happened to the limit.
#[derive(Debug, PartialEq, Eq)]
pub enum Fitted {
    /// The soft limit was enough.
    Enough { soft: u64 },
    /// Raised from `from` to `to`.
    Raised { from: u64, to: u64 },
    /// Still short: the hard limit (`hard`) is below what `max_connections` needs.
    Short { soft: u64, hard: u64, needed: u64 },
}

/// The descriptors `max_connections` consoles need.
pub fn needed(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_mul(2).saturating_add(OVERHEAD)
}

/// The connections a soft limit of `soft` descriptors holds (at least one).
pub fn fits(soft: u64) -> usize {
    usize::try_from(soft.saturating_sub(OVERHEAD) / 2).unwrap_or(usize::MAX).max(1)
}

/// Raises the soft open-file limit towards the hard one, as far as `max_connections` needs.
pub fn fit(max_connections: usize) -> io::Result<Fitted> {
    let needed = needed(max_connections);
    let (soft, hard) = get()?;
    if soft >= needed {
        return Ok(Fitted::Enough { soft });
    }
    let to = needed.min(hard);
    if to > soft {
        set(to, hard)?;
    }
    if to < needed { Ok(Fitted::Short { soft: to, hard, needed }) } else { Ok(Fitted::Raised { from: soft, to }) }
}

fn get() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

fn set(soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
