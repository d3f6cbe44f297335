//! The open-file limit, fitted to the configured connections at start-up. A console holds
//! two descriptors (viewer and hypervisor), and on a kernel back-end up to four more while
//! its bytes move: a pipe each way where io_uring splices TLS the kernel carries, a
//! duplicate of each socket where sockmap hands bytes to userspace. A soft limit of 1024,
//! common by default, would let about 500 consoles open and fail the rest, however high
//! `max_connections` is. Raising the soft limit costs nothing, so it is raised to cover
//! all of that; only the consoles' sockets decide how many connections a short hard
//! limit holds (a kernel back-end short of a descriptor waits for one).
#![allow(unsafe_code)] // getrlimit/setrlimit through libc.

use crate::config::{Backend, Relay};
use std::io;

/// Descriptors relay needs beyond its consoles': listeners, the control socket and its
/// clients, the web client's files, the eBPF maps, the io_uring rings and their eventfds.
const OVERHEAD: u64 = 256;

/// What the limit should cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Connections asked for (`limits.max_connections`).
    pub connections: usize,
    /// Descriptors a console may hold beyond its two sockets on the back-ends configured.
    pub extra_per_console: u64,
    /// What the kernel back-ends may keep for themselves (the rings' spare pipes).
    pub kernel_own: u64,
}

impl Needs {
    /// What `connections` consoles need on the back-ends `relay` configures;
    /// `ring_descriptors`: what the io_uring rings may keep for themselves.
    pub fn of(connections: usize, relay: &Relay, ring_descriptors: u64) -> Needs {
        // Pipes: only raw consoles whose TLS the kernel carries are spliced.
        let splices = relay.kernel_tls && matches!(relay.backend, Backend::Auto | Backend::Uring);
        let extra_per_console = match relay.backend {
            Backend::Copy => 0,
            Backend::Uring if !splices => 0,
            // Auto takes sockmap for quiet raw consoles (by default), and for busy ones
            // without io_uring.
            Backend::Uring | Backend::Sockmap | Backend::Auto => 4,
        };
        Needs { connections, extra_per_console, kernel_own: if splices { ring_descriptors } else { 0 } }
    }

    /// The consoles' sockets and relay's own: below this, fewer connections fit.
    fn sockets(&self) -> u64 {
        (self.connections as u64).saturating_mul(2).saturating_add(OVERHEAD)
    }

    /// Everything, with every console holding all it may on its back-end.
    fn all(&self) -> u64 {
        let extra = (self.connections as u64).saturating_mul(self.extra_per_console);
        self.sockets().saturating_add(extra).saturating_add(self.kernel_own)
    }

    /// The connections a soft limit of `soft` descriptors holds (at least one).
    pub fn fits(&self, soft: u64) -> usize {
        usize::try_from(soft.saturating_sub(OVERHEAD) / 2).unwrap_or(usize::MAX).max(1)
    }
}

/// What happened to the limit.
#[derive(Debug, PartialEq, Eq)]
pub enum Fitted {
    /// The soft limit was enough for the consoles' sockets, and left as it was; `all`: for
    /// what the kernel back-ends may take too (else the hard limit is no higher).
    Enough { soft: u64, all: bool },
    /// Raised from `from` to `to`; `all`: it covers what the kernel back-ends may take
    /// too, not only the consoles' sockets.
    Raised { from: u64, to: u64, all: bool },
    /// Still short: the hard limit (`hard`) is below what the consoles' sockets need.
    Short { soft: u64, hard: u64, needed: u64 },
}

/// Raises the soft open-file limit towards the hard one, as far as `needs` asks.
pub fn fit(needs: &Needs) -> io::Result<Fitted> {
    let (soft, hard) = get()?;
    Ok(fitted(needs, soft, hard, set))
}

/// The decision, with the limits read and a way to set them.
fn fitted(needs: &Needs, soft: u64, hard: u64, set: impl FnOnce(u64, u64) -> io::Result<()>) -> Fitted {
    let (sockets, all) = (needs.sockets(), needs.all());
    let mut to = all.min(hard);
    // Refused (a hard limit lowered meanwhile): what there is decides.
    if to > soft && set(to, hard).is_err() {
        to = soft;
    }
    let to = to.max(soft);
    match to {
        _ if to < sockets => Fitted::Short { soft: to, hard, needed: sockets },
        _ if to == soft => Fitted::Enough { soft, all: soft >= all },
        _ => Fitted::Raised { from: soft, to, all: to >= all },
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(backend: Backend, kernel_tls: bool) -> Needs {
        Needs::of(1000, &Relay { backend, kernel_tls, ..Relay::default() }, 260)
    }

    fn fit_with(needs: &Needs, soft: u64, hard: u64) -> (Fitted, Option<u64>) {
        let mut set_to = None;
        let fitted = fitted(needs, soft, hard, |to, _| {
            set_to = Some(to);
            Ok(())
        });
        (fitted, set_to)
    }

    #[test]
    fn copy_needs_two_descriptors_a_console() {
        let copy = needs(Backend::Copy, true);
        assert_eq!(fit_with(&copy, 1024, 1 << 20), (Fitted::Raised { from: 1024, to: 2256, all: true }, Some(2256)));
        assert_eq!(fit_with(&copy, 4096, 4096), (Fitted::Enough { soft: 4096, all: true }, None));
    }

    #[test]
    fn kernel_back_ends_raise_the_limit_for_their_pipes_and_duplicates() {
        // 1,000 consoles of 6 descriptors, relay's own and the rings' spare pipes.
        let auto = needs(Backend::Auto, true);
        assert_eq!(fit_with(&auto, 1024, 1 << 20), (Fitted::Raised { from: 1024, to: 6516, all: true }, Some(6516)));
        // Without kTLS the ring splices nothing: its consoles hold their sockets only.
        let uring = needs(Backend::Uring, false);
        assert_eq!(fit_with(&uring, 1024, 1 << 20).1, Some(2256));
        assert_eq!(fit_with(&needs(Backend::Sockmap, true), 1024, 1 << 20).1, Some(6256));
    }

    #[test]
    fn only_the_sockets_decide_how_many_connections_a_short_limit_holds() {
        let auto = needs(Backend::Auto, true);
        // Room for every socket but not every pipe: all connections still fit.
        assert_eq!(fit_with(&auto, 1024, 4000), (Fitted::Raised { from: 1024, to: 4000, all: false }, Some(4000)));
        // Not even the sockets: fewer connections.
        let (fitted, set_to) = fit_with(&auto, 1024, 1256);
        assert_eq!((fitted, set_to), (Fitted::Short { soft: 1256, hard: 1256, needed: 2256 }, Some(1256)));
        assert_eq!(auto.fits(1256), 500);
        // A soft limit already at the hard one stays.
        assert_eq!(fit_with(&auto, 3000, 3000), (Fitted::Enough { soft: 3000, all: false }, None));
        assert_eq!(fit_with(&auto, 1256, 1256), (Fitted::Short { soft: 1256, hard: 1256, needed: 2256 }, None));
    }

    #[test]
    fn a_limit_that_cannot_be_raised_is_taken_as_it_is() {
        let refused = |_, _| Err(io::Error::from_raw_os_error(libc::EPERM));
        let auto = needs(Backend::Auto, true);
        assert_eq!(fitted(&auto, 3000, 1 << 20, refused), Fitted::Enough { soft: 3000, all: false });
        assert_eq!(fitted(&auto, 1256, 1 << 20, refused), Fitted::Short { soft: 1256, hard: 1 << 20, needed: 2256 });
    }
}
