//! Wakes the userspace side of a kernel-relayed session only when it has work: the end of
//! a stream, an error, or bytes the program passed back.
//!
//! Why not tokio's readiness: the kernel's verdict path ends by calling the socket's own
//! data-ready callback, which wakes every task waiting for input although the program has
//! redirected the bytes and nothing is left to read. Registered for readability, relay's
//! reactor woke once per redirected message for nothing: on the typing farm (2,000
//! consoles, 40,000 messages a second) 18,000 wake-ups a second, which made sockmap cost
//! the machine more than the userspace copy. So the sockets sit in an epoll set of their
//! own, registered for the peer's half-close (`EPOLLRDHUP`; errors and hang-ups always
//! report) and not for input, a wake-up the kernel then filters out before waking anyone.
//! Bytes passed back are announced by the program in a ring buffer. One thread waits on
//! both and wakes the session concerned.

use aya::maps::{Array, MapData, RingBuf};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tokio::sync::Notify;

/// epoll keys that are not socket cookies (the kernel hands cookies out from 1 upwards).
const STOP: u64 = u64::MAX;
const RING: u64 = u64::MAX - 1;

/// What a socket reports besides input: the peer's FIN, an error, a hang-up.
const ENDS: u32 = (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// One socket's news, from the watcher thread to its session.
#[derive(Default)]
struct Flag {
    /// epoll events seen so far (only ever added to).
    events: AtomicU32,
    wake: Notify,
}

struct Shared {
    epoll: OwnedFd,
    watched: Mutex<HashMap<u64, Arc<Flag>>>,
    /// News delivered to a watched socket, for the stats.
    wakeups: AtomicU64,
}

impl Shared {
    fn watched(&self) -> MutexGuard<'_, HashMap<u64, Arc<Flag>>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, cookie: u64, events: u32) {
        if let Some(flag) = self.watched().get(&cookie) {
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            flag.events.fetch_or(events, Ordering::Release);
            flag.wake.notify_one();
        }
    }
}

/// The thread that watches every sockmap session's sockets.
pub(super) struct Watcher {
    shared: Arc<Shared>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// A socket in the watcher's set, until dropped (before the socket closes).
pub(super) struct Watched {
    flag: Arc<Flag>,
    cookie: u64,
    fd: RawFd,
    shared: Arc<Shared>,
}

impl Watched {
    /// Until the socket has news; news that came while nobody waited is kept for the next
    /// wait. A wake-up may find nothing new (a missed ring record makes the watcher wake
    /// everyone), so callers look and wait again.
    pub(super) async fn news(&self) {
        self.flag.wake.notified().await;
    }

    /// Whether the socket has seen its peer's FIN, an error or a hang-up.
    pub(super) fn ended(&self) -> bool {
        self.flag.events.load(Ordering::Acquire) & ENDS != 0
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The descriptor is still open (the session's socket outlives this), and may have
        // duplicates, which would keep a closed socket in the set.
        let _ = ctl(&self.shared.epoll, libc::EPOLL_CTL_DEL, self.fd, 0, 0);
        self.shared.watched().remove(&self.cookie);
    }
}

impl Watcher {
    /// Starts the thread, which owns the program's ring of passed-back cookies and reads
    /// its count of cookies the ring had no room for.
    pub(super) fn start(mut passed: RingBuf<MapData>, unsignalled: Array<MapData, u64>) -> io::Result<Self> {
        // SAFETY: plain system calls that return a new descriptor or -1.
        #[allow(unsafe_code)]
        let (epoll, stop) = unsafe { (libc::epoll_create1(libc::EPOLL_CLOEXEC), libc::eventfd(0, libc::EFD_CLOEXEC)) };
        let owned = |fd: RawFd| {
            // SAFETY: a descriptor just returned by the kernel, owned by nothing else.
            #[allow(unsafe_code)]
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }).ok_or_else(io::Error::last_os_error)
        };
        let (epoll, stop) = (owned(epoll)?, owned(stop)?);
        ctl(&epoll, libc::EPOLL_CTL_ADD, stop.as_raw_fd(), libc::EPOLLIN as u32, STOP)?;
        ctl(&epoll, libc::EPOLL_CTL_ADD, passed.as_raw_fd(), libc::EPOLLIN as u32, RING)?;
        let shared = Arc::new(Shared { epoll, watched: Mutex::new(HashMap::new()), wakeups: AtomicU64::new(0) });
        let run = shared.clone();
        let thread = std::thread::Builder::new().name("relay-sockmap".into()).spawn(move || watch(&run, &mut passed, &unsignalled))?;
        Ok(Watcher { shared, stop, thread: Some(thread) })
    }

    pub(super) fn wakeups(&self) -> u64 {
        self.shared.wakeups.load(Ordering::Relaxed)
    }

    /// Adds a socket to the set; its session hears of its ends and passed bytes.
    pub(super) fn watch(&self, socket: &impl AsRawFd, cookie: u64) -> io::Result<Watched> {
        let flag = Arc::new(Flag::default());
        self.shared.watched().insert(cookie, flag.clone());
        let fd = socket.as_raw_fd();
        // Edge-triggered: a FIN or an error is news once, not at every look.
        if let Err(e) = ctl(&self.shared.epoll, libc::EPOLL_CTL_ADD, fd, ENDS | libc::EPOLLET as u32, cookie) {
            self.shared.watched().remove(&cookie);
            return Err(e);
        }
        Ok(Watched { flag, cookie, fd, shared: self.shared.clone() })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd this struct owns.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watcher thread: until told to stop, passes each event to the session concerned.
fn watch(shared: &Shared, passed: &mut RingBuf<MapData>, unsignalled: &Array<MapData, u64>) {
    let missed = || unsignalled.get(&0, 0).unwrap_or(0);
    let mut missed_before = missed();
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        // The second's timeout covers a cookie the ring had no room for, counted after
        // the ring was last drained.
        // SAFETY: the kernel writes at most `events.len()` entries into the live array.
        #[allow(unsafe_code)]
        let n = unsafe { libc::epoll_wait(shared.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 1000) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Sessions would then wait for news that never comes: say so loudly.
            tracing::error!(error = %e, "sockmap: the watcher's epoll failed; kernel-relayed consoles no longer see their ends");
            return;
        }
        for event in &events[..n as usize] {
            let (key, bits) = (event.u64, event.events);
            match key {
                STOP => return,
                RING => {
                    while let Some(record) = passed.next() {
                        if let Some(cookie) = record.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes) {
                            shared.wake(cookie, 0);
                        }
                    }
                }
                cookie => shared.wake(cookie, bits),
            }
        }
        // A cookie the ring had no room for left a session waiting: wake them all.
        let now = missed();
        if now != missed_before {
            missed_before = now;
            let flags: Vec<_> = shared.watched().values().cloned().collect();
            shared.wakeups.fetch_add(flags.len() as u64, Ordering::Relaxed);
            flags.iter().for_each(|flag| flag.wake.notify_one());
        }
    }
}

fn ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: key };
    // SAFETY: `event` is a live value the kernel only reads; a bad descriptor is an error.
    #[allow(unsafe_code)]
    let r = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
