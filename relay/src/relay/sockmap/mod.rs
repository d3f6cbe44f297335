//! The sockmap back-end: an sk_skb verdict program (../relay-ebpf) moves an established
//! raw session's bytes between its two sockets inside the kernel; userspace only watches
//! for the ends and relays what the program hands back when a receiver falls behind.
//!
//! This module owns the loaded program and its maps; [`session`] runs one session, and
//! [`watch`] wakes it when it has work.

mod session;
mod watch;

pub use session::run;

use aya::maps::{Array, HashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use relay_common::{Flow, Grant, MAP_FLOWS, MAP_GRANTS, MAP_PASSED, MAP_TARGETS, MAP_UNSIGNALLED, MAP_VERDICT, PROGRAM};
use std::os::fd::AsRawFd;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The object relay's build script compiled from relay-ebpf, or empty when this build
/// had no eBPF toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("RELAY_EBPF_OBJECT"));
/// Why the object is empty, when it is.
const MISSING: &str = env!("RELAY_EBPF_MISSING");

/// Why the sockmap back-end cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("this relay was built without its eBPF program ({0}); run `cargo xtask build-ebpf`")]
    NotBuilt(&'static str),
    #[error("loading eBPF needs root or CAP_BPF and CAP_NET_ADMIN: {0}")]
    Permission(String),
    #[error("the kernel refused the eBPF program: {0}")]
    Kernel(String),
}

struct Maps {
    targets: SockHash<MapData, u64>,
    verdict: SockHash<MapData, u64>,
    flows: HashMap<MapData, u64, Flow>,
    grants: HashMap<MapData, u64, Grant>,
}

/// The loaded program and its maps, shared by every sockmap session.
pub struct Sockmap {
    /// Lookups (every wake-up of a session) share the lock; only hand-offs, grants and
    /// ends take it alone.
    maps: RwLock<Maps>,
    /// Bytes one direction may have in flight in the kernel towards a receiver that has
    /// not acknowledged them; past it TCP pushes back on the sender.
    pub in_flight_cap: u64,
    /// Times a direction that fell back to userspace was handed back to the kernel.
    pub resumes: std::sync::atomic::AtomicU64,
    /// Times a direction found no descriptor free to wait on (for room to write, or for
    /// input while the program passes) and polled instead.
    pub descriptor_waits: std::sync::atomic::AtomicU64,
    watcher: watch::Watcher,
    /// Keeps the program loaded and attached to the verdict map.
    _ebpf: Ebpf,
}

impl Sockmap {
    /// Loads and attaches the program, with maps sized for `max_sessions`.
    pub fn load(max_sessions: usize, in_flight_cap: u64) -> Result<Self, Unavailable> {
        if OBJECT.is_empty() {
            return Err(Unavailable::NotBuilt(MISSING));
        }
        let entries = u32::try_from(max_sessions.saturating_mul(2).max(2)).unwrap_or(u32::MAX);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_TARGETS, entries)
            .map_max_entries(MAP_VERDICT, entries)
            .map_max_entries(MAP_FLOWS, entries)
            .map_max_entries(MAP_GRANTS, entries)
            .load(OBJECT)
            .map_err(|e| classify(&e))?;
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| Unavailable::Kernel(format!("the program has no map {name}")));
        let (targets, verdict, flows, grants) = (take(MAP_TARGETS)?, take(MAP_VERDICT)?, take(MAP_FLOWS)?, take(MAP_GRANTS)?);
        let (passed, unsignalled) = (take(MAP_PASSED)?, take(MAP_UNSIGNALLED)?);
        let kernel = |e: &dyn std::fmt::Display| Unavailable::Kernel(e.to_string());
        let maps = Maps {
            targets: SockHash::try_from(targets).map_err(|e| kernel(&e))?,
            verdict: SockHash::try_from(verdict).map_err(|e| kernel(&e))?,
            flows: HashMap::try_from(flows).map_err(|e| kernel(&e))?,
            grants: HashMap::try_from(grants).map_err(|e| kernel(&e))?,
        };
        let program: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| Unavailable::Kernel(format!("the object has no program {PROGRAM}")))?
            .try_into()
            .map_err(|e| kernel(&e))?;
        program.load().map_err(|e| classify(&e))?;
        program.attach(maps.verdict.fd()).map_err(|e| classify(&e))?;
        let passed = RingBuf::try_from(passed).map_err(|e| kernel(&e))?;
        let unsignalled = Array::try_from(unsignalled).map_err(|e| kernel(&e))?;
        let watcher = watch::Watcher::new(passed, unsignalled).map_err(|e| kernel(&e))?;
        Ok(Sockmap {
            maps: RwLock::new(maps),
            in_flight_cap,
            resumes: Default::default(),
            descriptor_waits: Default::default(),
            watcher,
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_maps(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a session's two sockets to the kernel: flows and grants first, then both
    /// sockets as redirect targets, then both into the verdict map (so the first redirect
    /// already finds its peer). On failure nothing is left behind.
    fn attach(&self, a: (&impl AsRawFd, u64), b: (&impl AsRawFd, u64)) -> Result<(), aya::maps::MapError> {
        let mut maps = self.maps();
        let grant = Grant { limit: self.in_flight_cap, resumed_at: 0 };
        let attached = (|| {
            maps.flows.insert(a.1, Flow { peer: b.1, ..Flow::default() }, 0)?;
            maps.flows.insert(b.1, Flow { peer: a.1, ..Flow::default() }, 0)?;
            maps.grants.insert(a.1, grant, 0)?;
            maps.grants.insert(b.1, grant, 0)?;
            maps.targets.insert(a.1, a.0.as_raw_fd(), 0)?;
            maps.targets.insert(b.1, b.0.as_raw_fd(), 0)?;
            maps.verdict.insert(a.1, a.0.as_raw_fd(), 0)?;
            maps.verdict.insert(b.1, b.0.as_raw_fd(), 0)
        })();
        if attached.is_err() {
            drop(maps);
            self.forget(a.1);
            self.forget(b.1);
        }
        attached
    }

    /// Stops the program from touching a socket's bytes: later ones stay in its own queue.
    fn release(&self, cookie: u64) {
        let _ = self.maps().flows.remove(&cookie);
    }

    /// Removes a socket's flow and grant at the end of its session; closing the socket,
    /// which follows, removes it from both socket maps.
    fn finish(&self, cookie: u64) {
        let mut maps = self.maps();
        let _ = maps.flows.remove(&cookie);
        let _ = maps.grants.remove(&cookie);
    }

    /// Removes every entry of a socket that stays open (given back to userspace).
    fn forget(&self, cookie: u64) {
        let mut maps = self.maps();
        let _ = maps.verdict.remove(&cookie);
        let _ = maps.targets.remove(&cookie);
        let _ = maps.flows.remove(&cookie);
        let _ = maps.grants.remove(&cookie);
    }

    /// Times a session was woken with news for one of its sockets.
    pub fn wakeups(&self) -> u64 {
        self.watcher.wakeups()
    }

    /// Times the task that watches the sessions' sockets woke.
    pub fn watcher_turns(&self) -> u64 {
        self.watcher.turns()
    }

    pub(crate) fn flow(&self, cookie: u64) -> Option<Flow> {
        self.read_maps().flows.get(&cookie, 0).ok()
    }

    fn grant(&self, cookie: u64, grant: Grant) {
        let _ = self.maps().grants.insert(cookie, grant, 0);
    }

    /// Entries in the maps (flows and verdict sockets): for tests that check nothing leaks.
    pub fn entries(&self) -> (usize, usize) {
        let maps = self.read_maps();
        (maps.flows.keys().count(), maps.verdict.keys().count())
    }
}

/// A refusal is a permission problem only when the kernel said so before its verifier
/// ran: a verifier that rejects the program also answers EACCES, with its log.
fn classify(e: &(dyn std::error::Error + 'static)) -> Unavailable {
    let is_denied = |s: &(dyn std::error::Error + 'static)| {
        s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    };
    let (mut text, mut denied) = (e.to_string(), is_denied(e));
    let mut source = e.source();
    while let Some(s) = source {
        denied |= is_denied(s);
        // Some of aya's errors already print their source.
        let said = s.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        source = s.source();
    }
    let verified = matches!(
        e.downcast_ref::<aya::programs::ProgramError>(),
        Some(aya::programs::ProgramError::LoadError { verifier_log, .. }) if !verifier_log.to_string().trim().is_empty()
    );
    if denied && !verified { Unavailable::Permission(text) } else { Unavailable::Kernel(text) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::programs::ProgramError;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_verifier_rejection_is_the_kernel_refusing_not_a_missing_permission() {
        // The verifier answers EACCES too, with its log.
        let rejected = ProgramError::LoadError {
            io_error: Error::from(ErrorKind::PermissionDenied),
            verifier_log: aya_obj::VerifierLog::new("0: R1=ctx() R10=fp0\nR4 invalid zero-sized read".into()),
        };
        assert!(matches!(classify(&rejected), Unavailable::Kernel(why) if why.contains("invalid zero-sized read")));
    }

    #[test]
    fn a_refusal_before_the_verifier_ran_is_a_missing_permission() {
        let denied = ProgramError::LoadError {
            io_error: Error::from_raw_os_error(libc::EPERM),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        };
        assert!(matches!(classify(&denied), Unavailable::Permission(_)));
        // A map the kernel would not create, for the same reason.
        assert!(matches!(classify(&Error::from_raw_os_error(libc::EPERM)), Unavailable::Permission(_)));
        assert!(matches!(classify(&Error::from_raw_os_error(libc::EINVAL)), Unavailable::Kernel(_)));
    }
}
