//! A console whose relay is out of descriptors (the open-file limit reached, as under a
//! flood of connections) keeps every byte. Where a kernel back-end needs a descriptor
//! beside the console's two sockets, it waits or polls for one rather than end the
//! console, and counts it (`relay.descriptor_waits` in stats): sockmap registers a
//! duplicate of a socket to wait for room or for bytes the program hands back, and the
//! ring splices TLS the kernel carries through a pipe per direction.
//!
//! These checks take this whole process's descriptors away for a while, relay's and the
//! test's alike: they must run alone in their process. `tests/short_of_descriptors.rs`
//! runs the raw check on each back-end here, one at a time (this machine has no kTLS, so
//! nothing is spliced); `vmcheck` runs both in Debian's kernels, every check in turn.

use crate::conformance::console;
use crate::conformance_order::{numbered_block, read_numbered_words};
use crate::conformance_tls::{Suite, kernel_takes_tls, start_tls, tls_console};
use crate::fake_hypervisor::{FakeVnc, Script};
use crate::relay_server::TestRelay;
use relay::config::Backend;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Bytes the raw check writes through its console: several times what the sockets of a
/// stalled console hold, so that sockmap's program falls back to userspace.
const RAW_SIZE: usize = 16 << 20;

/// Bytes the TLS check writes: a pipe is wanted from the first byte, and TLS in rustls is
/// slow under emulation (`vmtest`).
const TLS_SIZE: usize = 4 << 20;

/// A raw console (CONNECT door, plain TCP): on sockmap, the program hands a stalled
/// viewer's bytes back to userspace, which then polls for room and for input instead of
/// registering duplicates; copy and the ring's buffered relay need no descriptor at all.
pub async fn a_console_short_of_descriptors_keeps_every_byte(relay: TestRelay, backend: Backend) {
    let hv = FakeVnc::start(Script::echo()).await;
    let s = console(&relay, "vm-no-fds", &hv).await;
    on_its_back_end(&relay, |stats| stats.relay.raw.name() != "sockmap" || stats.relay.sockmap_sockets == 2).await;
    // The ring's stats do not show its consoles: the move to it is at once, give it time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = relay.stats().await.relay.descriptor_waits;
    echo_short_of_descriptors(s, RAW_SIZE).await;
    let waits = relay.stats().await.relay.descriptor_waits - before;
    assert_eq!(waits > 0, backend == Backend::Sockmap, "{backend:?}: {waits} waits for a descriptor");
    relay.no_live_consoles().await;
}

/// A TLS console: where the kernel carries its TLS, the ring splices it through a pipe
/// per direction, and waits for descriptors to make one (every 20 ms), the bytes held in
/// the kernel meanwhile; elsewhere TLS stays in rustls on copy, which needs none.
pub async fn a_tls_console_short_of_descriptors_keeps_every_byte(_: TestRelay, backend: Backend) {
    let (relay, ca) = start_tls(backend).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let tls = tls_console(&relay, &ca, Suite::Tls13Aes256Gcm, &hv, &[]).await;
    let spliced = backend == Backend::Uring && kernel_takes_tls();
    on_its_back_end(&relay, |stats| !spliced || stats.relay.kernel_tls_legs == 1).await;
    // The move to the ring follows the move into the kernel.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = relay.stats().await.relay.descriptor_waits;
    echo_short_of_descriptors(tls, TLS_SIZE).await;
    let waits = relay.stats().await.relay.descriptor_waits - before;
    assert_eq!(waits > 0, spliced, "{backend:?}, spliced: {spliced}: {waits} waits for a descriptor");
}

/// Waits (up to 10 s) until relay's stats say the console is where its back-end carries it.
async fn on_its_back_end(relay: &TestRelay, there: impl Fn(&relay::control::replies::Stats) -> bool) {
    let started = Instant::now();
    while !there(&relay.stats().await) {
        assert!(started.elapsed() < Duration::from_secs(10), "the console never moved to its back-end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With no descriptor to be had: writes `size` bytes of numbered words without reading
/// (both directions of the echo back up), then reads for a second, then gives the
/// descriptors back, and checks every byte came back in order, then the end.
async fn echo_short_of_descriptors(stream: impl AsyncRead + AsyncWrite + Send + 'static, size: usize) {
    let (mut r, mut w) = tokio::io::split(stream);
    let short = NoNewDescriptors::start().await;
    let writer = tokio::spawn(async move {
        for chunk in numbered_block()[..size].chunks(1 << 20) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    // Long enough for the echo to back up both ways.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restore = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(short);
    });
    let read = read_numbered_words(&mut r, &AtomicUsize::new(0)).await;
    restore.await.unwrap();
    writer.await.unwrap();
    assert_eq!(read, size, "every byte came back, in order, then the end");
}

/// While it lives, this process can open no descriptor, as when every one it may have is
/// taken: its soft open-file limit is lowered to just above its highest descriptor, and
/// every free number below is filled. Dropped, it gives them back and restores the limit.
struct NoNewDescriptors {
    saved: libc::rlimit,
    fillers: Vec<std::fs::File>,
}

impl NoNewDescriptors {
    /// Takes them all, once the count of open ones has held still for 300 ms (a relay of
    /// an earlier check may still be closing its own: they would come back mid-check), and
    /// again a moment later, for those relay was still closing (the server's side of the
    /// last control request, say).
    async fn start() -> NoNewDescriptors {
        let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let (mut last, mut still) = (open(), 0);
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = open();
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if still == 3 {
                break;
            }
        }
        let mut short = NoNewDescriptors::lower();
        short.fill();
        tokio::time::sleep(Duration::from_millis(100)).await;
        short.fill();
        short
    }

    #[allow(unsafe_code)] // getrlimit/setrlimit
    fn lower() -> NoNewDescriptors {
        let highest =
            std::fs::read_dir("/proc/self/fd").unwrap().filter_map(|fd| fd.ok()?.file_name().to_str()?.parse::<u64>().ok()).max().unwrap();
        let mut saved = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit read and write the structs we pass, nothing else.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut saved), 0);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &libc::rlimit { rlim_cur: highest + 1, rlim_max: saved.rlim_max }), 0);
        }
        NoNewDescriptors { saved, fillers: Vec::new() }
    }

    /// Opens descriptors until none is left.
    fn fill(&mut self) {
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(filler) => self.fillers.push(filler),
                Err(e) if relay::reserve::out_of_descriptors(&e) => return,
                Err(e) => panic!("filling the free descriptors: {e}"),
            }
        }
    }
}

impl Drop for NoNewDescriptors {
    #[allow(unsafe_code)] // setrlimit
    fn drop(&mut self) {
        self.fillers.clear();
        // SAFETY: setrlimit reads the struct we pass.
        let restored = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.saved) };
        if restored != 0 && !std::thread::panicking() {
            panic!("the open-file limit was not restored: {}", std::io::Error::last_os_error());
        }
    }
}
