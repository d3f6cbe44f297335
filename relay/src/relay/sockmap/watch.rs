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
//! A fall-back (the first skb the program passes back after redirecting) is announced by
//! the program in a ring buffer; the direction then listens for input itself until the
//! program redirects again (session/direction.rs). One tokio task waits on both (the set's descriptor sits in tokio's reactor, which the filtered wake-ups
//! never reach) and wakes the session concerned.

use aya::maps::{Array, MapData, RingBuf};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// epoll keys that are not socket cookies (the kernel hands cookies out from 1 upwards).
const STOP: u64 = u64::MAX;
const RING: u64 = u64::MAX - 1;

/// Reads of the set (up to 64 events each) in one turn of the watching task.
const ROUNDS_PER_TURN: usize = 16;

/// What a socket reports besides input: the peer's FIN, an error, a hang-up.
const ENDS: u32 = (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// One socket's news, from the watching task to its session.
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
    /// Times the task was woken to look at the set and the ring.
    turns: AtomicU64,
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

/// Watches every sockmap session's sockets, from a task started with the first.
pub(super) struct Watcher {
    shared: Arc<Shared>,
    stop: OwnedFd,
    /// The ring and its count of missed cookies, until the task takes them.
    feed: Mutex<Option<Feed>>,
}

struct Feed {
    passed: RingBuf<MapData>,
    unsignalled: Array<MapData, u64>,
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
    /// Makes the set; the task that waits on it, the program's ring of passed-back
    /// cookies and its count of cookies the ring had no room for starts with the first
    /// watched socket (inside the runtime that runs the sessions).
    pub(super) fn new(passed: RingBuf<MapData>, unsignalled: Array<MapData, u64>) -> io::Result<Self> {
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
        let shared = Arc::new(Shared { epoll, watched: Mutex::new(HashMap::new()), wakeups: AtomicU64::new(0), turns: AtomicU64::new(0) });
        Ok(Watcher { shared, stop, feed: Mutex::new(Some(Feed { passed, unsignalled })) })
    }

    /// Times the watching task woke (for tests: never once per redirected message).
    pub(super) fn turns(&self) -> u64 {
        self.shared.turns.load(Ordering::Relaxed)
    }

    pub(super) fn wakeups(&self) -> u64 {
        self.shared.wakeups.load(Ordering::Relaxed)
    }

    /// Adds a socket to the set; its session hears of its ends and passed bytes.
    pub(super) fn watch(&self, socket: &impl AsRawFd, cookie: u64) -> io::Result<Watched> {
        let mut feed = self.feed.lock().unwrap_or_else(|p| p.into_inner());
        if feed.is_some() {
            // Kept for the next session if this fails (out of descriptors): no session may
            // run without the task.
            let set = register(self.shared.epoll.try_clone()?)?;
            if let Some(taken) = feed.take() {
                tokio::spawn(run(self.shared.clone(), set, taken));
            }
        }
        drop(feed);
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
        // Ends the task, if it started; it holds the set and the ring.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd this struct owns.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// The watching task: until told to stop, passes each event to the session concerned.
async fn run(shared: Arc<Shared>, set: AsyncFd<OwnedFd>, mut feed: Feed) {
    let missed = |feed: &Feed| feed.unsignalled.get(&0, 0).unwrap_or(0);
    let mut missed_before = missed(&feed);
    // Covers a cookie the ring had no room for, counted after the ring was last drained.
    let mut backstop = tokio::time::interval(std::time::Duration::from_secs(1));
    backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    // Set when the last turn left events in the set, which will bring no new edge.
    let mut more = false;
    loop {
        // A cookie goes missing only when the ring is full, so had records to read, or
        // just after it was drained: looked for then, and once a second.
        let mut look_for_missed = false;
        if more {
            // Other tasks on this worker run first: a stream of passed skbs must not
            // hold it.
            tokio::task::yield_now().await;
        } else {
            tokio::select! {
                ready = set.readable() => match ready {
                    // Cleared before the set is emptied: what comes after is a new edge.
                    Ok(mut ready) => ready.clear_ready(),
                    Err(e) => return set_failed(&e),
                },
                _ = backstop.tick() => look_for_missed = true,
            }
        }
        shared.turns.fetch_add(1, Ordering::Relaxed);
        let mut rounds = 0;
        more = loop {
            if rounds == ROUNDS_PER_TURN {
                break true;
            }
            rounds += 1;
            // SAFETY: the kernel writes at most `events.len()` entries into the live array;
            // a timeout of 0 never blocks.
            #[allow(unsafe_code)]
            let n = unsafe { libc::epoll_wait(shared.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return set_failed(&e);
            }
            if n == 0 {
                break false;
            }
            for event in &events[..n as usize] {
                let (key, bits) = (event.u64, event.events);
                match key {
                    STOP => return,
                    RING => {
                        look_for_missed = true;
                        while let Some(record) = feed.passed.next() {
                            if let Some(cookie) = record.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes) {
                                shared.wake(cookie, 0);
                            }
                        }
                    }
                    cookie => shared.wake(cookie, bits),
                }
            }
        };
        // A cookie the ring had no room for left a session waiting: wake them all.
        let now = if look_for_missed { missed(&feed) } else { missed_before };
        if now != missed_before {
            missed_before = now;
            let flags: Vec<_> = shared.watched().values().cloned().collect();
            shared.wakeups.fetch_add(flags.len() as u64, Ordering::Relaxed);
            flags.iter().for_each(|flag| flag.wake.notify_one());
        }
    }
}

/// Sessions would then wait for news that never comes (a forced disconnect or the idle
/// timeout still ends them): say so loudly.
fn set_failed(e: &io::Error) {
    tracing::error!(error = %e, "sockmap: the watch set failed; kernel-relayed consoles no longer see their ends");
}

#[allow(unsafe_code)] // tokio's registration of a raw descriptor
fn register(set: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, which stays open (and the same) until the
    // registration is dropped with it.
    unsafe { AsyncFd::register_with_interest(set, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

fn ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: key };
    // SAFETY: `event` is a live value the kernel only reads; a bad descriptor is an error.
    #[allow(unsafe_code)]
    let r = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
