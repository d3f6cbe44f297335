//! The relay back-end conformance suite: what every back-end must do with an established
//! console, as functions of a relay started on the back-end. `tests/conformance.rs` runs
//! each on this machine's back-ends; `vmcheck` runs a subset inside other kernels
//! (`cargo xtask vmtest`).

use crate::env;
use crate::fake_hypervisor::{After, FakeVnc, SERVER_INIT_LEN, Script, pattern, read_pattern};
use crate::relay_server::TestRelay;
use crate::viewer::handshake;
use relay::config::Backend;
use relay::control::proto::Request;
use relay::relay::lifecycle::Cause;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub use crate::conformance_tls::{
    tls_close_notify_arrives_after_the_data_both_ways, tls_consoles_each_cipher_byte_exact_each_way, tls_key_update_mid_stream,
    tls_on_both_sides_byte_exact_each_way, tls_websocket_console_byte_exact_each_way,
};

const RFB38: &[u8; 12] = b"RFB 003.008\n";
const GIB: usize = 1 << 30;

/// A relay on `backend` (the machine must offer it: see `tests/build.rs`).
pub async fn start(backend: Backend, adjust: impl FnOnce(&mut relay::config::Config)) -> TestRelay {
    match backend {
        Backend::Sockmap => env::sockmap(),
        Backend::Uring => env::uring(),
        _ => {}
    }
    let relay = TestRelay::start_with(|c| {
        c.relay.backend = backend;
        // The back-end itself from the first byte; the move from copy has its own test.
        c.relay.kernel_after_ms = 0;
        c.limits.max_sessions_per_instance = 2000;
        // Every viewer here is 127.0.0.1.
        c.limits.max_connections_per_source = 0;
        c.limits.session_idle_timeout_secs = 0;
        adjust(c)
    })
    .await;
    let raw = relay.stats().await.relay.raw;
    assert_eq!(format!("{raw:?}"), format!("{backend:?}"), "raw sessions run on the back-end asked for");
    relay
}

pub async fn console(relay: &TestRelay, instance: &str, hv: &FakeVnc) -> TcpStream {
    let token = relay.token(instance, hv.addr()).await;
    let mut s = relay.connect_door(&token).await.unwrap();
    handshake(&mut s, RFB38, None).await.unwrap();
    s
}

pub async fn one_gib_each_way_byte_exact(relay: TestRelay, _: Backend) {
    each_way_byte_exact(relay, GIB).await
}

/// 32 MiB each way: the byte-exact check where a gibibyte takes too long (an emulated
/// machine).
pub async fn several_mib_each_way_byte_exact(relay: TestRelay, _: Backend) {
    each_way_byte_exact(relay, 32 << 20).await
}

async fn each_way_byte_exact(relay: TestRelay, size: usize) {
    let hv = FakeVnc::start(Script::echo()).await;
    let s = console(&relay, "vm-bulk", &hv).await;
    let started = Instant::now();
    let echoed =
        echo_numbered_words(s, async {}, Writes { chunk: BLOCK, pause: Duration::ZERO, more: move |written| written < size }).await;
    assert_eq!(echoed, size, "every byte came back, then EOF");
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    eprintln!("{} MiB each way through relay ({build} build) in {:?}", size >> 20, started.elapsed());
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), size);
}

/// Past the hand-over time, a console moves to the kernel only once it carries
/// `kernel_min_bytes_per_sec`: a typing console stays on copy however long it lives; a
/// streaming one moves, and both keep every byte.
pub async fn only_a_busy_console_moves_to_the_kernel(default: TestRelay, backend: Backend) {
    // Needs its own relay: the hand-over rule is configuration.
    drop(default);
    let relay = start(backend, |c| {
        c.relay.kernel_after_ms = 200;
        c.relay.kernel_min_bytes_per_sec = 1_000_000;
    })
    .await;
    let hv = FakeVnc::start(Script::echo()).await;
    let hand_overs = async || relay.ctl(Request::Stats).await.unwrap()["relay"]["hand_overs"].clone();
    // Keystrokes: 256 bytes each way every 20 ms (25 KB/s) for 1.2 s, six looks.
    let mut typing = console(&relay, "vm-typing", &hv).await;
    let mut echo = [0u8; 256];
    for i in 0..60u8 {
        typing.write_all(&[i; 256]).await.unwrap();
        typing.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [i; 256], "keystroke {i} echoed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hand_overs().await, 0, "a typing console stays on copy");
    // A stream of 64 KiB blocks (several MB/s) for 1.2 s: it moves, in a quiet moment
    // between blocks.
    let mut streaming = console(&relay, "vm-streaming", &hv).await;
    let started = Instant::now();
    let mut offset = 0;
    while started.elapsed() < Duration::from_millis(1200) {
        let block = pattern(offset, 64 << 10);
        streaming.write_all(&block).await.unwrap();
        let mut back = vec![0u8; block.len()];
        streaming.read_exact(&mut back).await.unwrap();
        assert!(back == block, "block at {offset} echoed whole");
        offset += block.len();
    }
    let moved = if backend == Backend::Copy { 0 } else { 1 };
    let deadline = Instant::now() + Duration::from_secs(2);
    while hand_overs().await != moved && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hand_overs().await, moved, "the streaming console moved");
    // Both still carry bytes, each on its own back-end.
    for s in [&mut typing, &mut streaming] {
        s.write_all(b"still there").await.unwrap();
        let mut back = [0u8; 11];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still there");
    }
}

/// A console bound for a kernel back-end starts on copy and moves between bursts of a
/// stream, once no byte is held in relay: none lost, doubled or reordered across the move.
pub async fn a_console_moved_to_the_kernel_mid_stream_keeps_every_byte_in_order(default: TestRelay, backend: Backend) {
    // Needs its own relay: the hand-over time is configuration.
    drop(default);
    let relay = start(backend, |c| c.relay.kernel_after_ms = 200).await;
    let hv = FakeVnc::start(Script::echo()).await;
    numbered_block();
    let s = console(&relay, "vm-move", &hv).await;
    // Bursts of 1 MiB for well past the hand-over time, each followed by a quiet moment once
    // its echo is back (on a loaded, emulated machine relay may trail the writer by
    // seconds, and a console that is never quiet rightly stays on copy). The viewer reads
    // nothing until after the hand-over time, so the move waits for relay's buffers to empty.
    let started = Instant::now();
    let more = move |written| written < 4 * BLOCK || started.elapsed() < Duration::from_millis(3000);
    let bursts = Writes { chunk: 1 << 20, pause: Duration::from_millis(40), more };
    let echoed = echo_numbered_words(s, tokio::time::sleep(Duration::from_millis(400)), bursts).await;
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), echoed);
    let stats = relay.ctl(Request::Stats).await.unwrap();
    let moved = if backend == Backend::Copy { 0 } else { 1 };
    assert_eq!(stats["relay"]["hand_overs"], moved, "consoles moved from copy: {stats}");
}

/// A viewer that writes in uneven bursts and reads in fits and starts, with relay's
/// in-flight cap at its least: on sockmap both directions keep falling back to userspace
/// and resuming in the kernel, and no byte may be lost, doubled or reordered across any
/// of those changes.
pub async fn uneven_reads_and_writes_keep_every_byte_in_order(default: TestRelay, backend: Backend) {
    drop(default);
    let relay = start(backend, |_| {}).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let s = console(&relay, "vm-uneven", &hv).await;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 | 1;
    eprintln!("uneven reads and writes: seed {seed}");
    let (mut r, mut w) = s.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let (block, mut random, mut written) = (numbered_block(), Random(seed), 0usize);
        while written < 4 * BLOCK && started.elapsed() < Duration::from_secs(4) {
            let at = written % BLOCK;
            let part = &block[at..(at + 1 + random.below(2 << 20)).min(BLOCK)];
            w.write_all(part).await.unwrap();
            written += part.len();
            // Quiet moments let a direction that fell back resume in the kernel.
            if random.below(2) == 0 {
                tokio::time::sleep(Duration::from_millis(1 + random.below(10) as u64)).await;
            }
        }
        w.shutdown().await.unwrap();
        written
    });
    let mut reader = Fitful { inner: &mut r, random: Random(seed.rotate_left(17)), pause: None };
    let echoed = read_numbered_words(&mut reader, &AtomicUsize::new(0)).await;
    assert_eq!(echoed, writer.await.unwrap(), "every byte written came back, then EOF");
    assert_eq!(hv.shared().received.load(Ordering::SeqCst), echoed);
}

/// A small xorshift generator: the tests need variety, not quality.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A reader that now and then stops reading for a few milliseconds.
struct Fitful<'a, R> {
    inner: &'a mut R,
    random: Random,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Fitful<'_, R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(pause) = self.pause.as_mut() {
            std::task::ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        let this = &mut *self;
        let room = buf.remaining().min(1 + this.random.below(64 << 10));
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(room));
        std::task::ready!(Pin::new(&mut *this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        if this.random.below(8) == 0 {
            this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(this.random.below(20) as u64))));
        }
        Poll::Ready(Ok(()))
    }
}

/// What the echo tests write at a time: numbered words over a 16 MiB period rather than a
/// short one, so a misplaced byte says where it came from.
pub(crate) const BLOCK: usize = 16 << 20;

/// How [`echo_numbered_words`] writes: `chunk` bytes at a time (at most a block) while
/// `more(bytes written)`; with a `pause`, after each chunk it waits for the echo of
/// everything written so far, then for the pause, so every burst ends in a quiet moment.
struct Writes<F> {
    chunk: usize,
    pause: Duration,
    more: F,
}

/// Writes blocks of numbered words as `writes` says, then a FIN, and checks, reading once
/// `read_from` resolves, that the echo brings back every byte in order; returns how many
/// came back.
async fn echo_numbered_words<F>(s: TcpStream, read_from: impl Future<Output = ()>, writes: Writes<F>) -> usize
where
    F: FnMut(usize) -> bool + Send + 'static,
{
    let Writes { chunk, pause, mut more } = writes;
    let (mut r, mut w) = s.into_split();
    let block = numbered_block();
    let echoed = Arc::new(AtomicUsize::new(0));
    let echo = echoed.clone();
    let writer = tokio::spawn(async move {
        let mut written = 0;
        while more(written) {
            let at = written % BLOCK;
            let part = &block[at..(at + chunk).min(BLOCK)];
            w.write_all(part).await.unwrap();
            written += part.len();
            if !pause.is_zero() {
                while echo.load(Ordering::SeqCst) < written {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(pause).await;
            }
        }
        w.shutdown().await.unwrap();
        written
    });
    read_from.await;
    let at = read_numbered_words(&mut r, &echoed).await;
    let sent = writer.await.unwrap();
    assert_eq!(at, sent, "every byte written came back, then EOF");
    at
}

/// Reads until EOF, checking every byte against [`numbered_block`] and counting them in
/// `progress`; returns how many came.
pub(crate) async fn read_numbered_words(r: &mut (impl AsyncReadExt + Unpin), progress: &AtomicUsize) -> usize {
    let expected = numbered_block();
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0usize;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            let off = (at + done) % expected.len();
            let take = (n - done).min(expected.len() - off);
            if buf[done..done + take] != expected[off..off + take] {
                let bad = (0..take).find(|&i| buf[done + i] != expected[off + i]).unwrap();
                let from = (done + bad).saturating_sub(8);
                let shown = &buf[from..(done + bad + 24).min(n)];
                // Words whole from here on say how far the stream jumped.
                let word = (at + done + bad) & !3;
                let found = word.checked_sub(at).and_then(|i| buf[..n].get(i..i + 4)).map(|w| u32::from_le_bytes(w.try_into().unwrap()));
                let due = (word % expected.len()) / 4;
                panic!(
                    "byte {} differs: word {found:x?} where word {due:x} was due; bytes from 8 before: {shown:?} (read of {n})",
                    at + done + bad,
                );
            }
            done += take;
        }
        at += n;
        progress.store(at, Ordering::SeqCst);
    }
    at
}

/// [`BLOCK`] bytes of little-endian u32 words numbered from 0, made once per process
/// (slow in a debug build).
pub(crate) fn numbered_block() -> &'static [u8] {
    static BLOCK_WORDS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK_WORDS.get_or_init(|| (0..BLOCK as u32 / 4).flat_map(u32::to_le_bytes).collect())
}

pub async fn hypervisor_fin_arrives_after_its_data_and_the_other_way_stays_open(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::after(After::SendThenFin(3 << 20))).await;
    let mut s = console(&relay, "vm-hvfin", &hv).await;
    assert_eq!(read_pattern(&mut s, usize::MAX).await, 3 << 20, "all data, then EOF");
    // Half-closed: the viewer can still send; the hypervisor keeps reading.
    s.write_all(b"after your FIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), 14);
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*hv.shared().ends.lock().unwrap(), vec!["eof".to_string()], "then the viewer's FIN reached it");
}

pub async fn viewer_fin_arrives_after_its_data_and_the_other_way_stays_open(relay: TestRelay, _: Backend) {
    // The echoing hypervisor answers the viewer's bytes, sees its FIN only after all of
    // them, and its answers still reach the half-closed viewer.
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-vfin", &hv).await;
    let sent = 5 << 20;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&pattern(0, sent)).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let (_, got) = tokio::join!(write, read_pattern(&mut r, usize::MAX));
    assert_eq!(got, sent, "every byte echoed after the viewer's FIN, then EOF");
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), sent);
}

/// A hypervisor that goes away ends the console, and the audit says so, even when the
/// viewer then resets its connection (as browsers do once a console has gone).
pub async fn the_hypervisors_end_is_the_cause_even_when_the_viewer_then_resets(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::after(After::SendThenFin(1 << 20))).await;
    let mut s = console(&relay, "vm-hvend", &hv).await;
    assert_eq!(read_pattern(&mut s, usize::MAX).await, 1 << 20, "all data, then EOF");
    s.set_zero_linger().unwrap();
    drop(s);
    let ended = relay.ended(1).await.ended;
    assert_eq!(ended[&Cause::HypervisorClosed], 1, "{ended:?}");
    assert_eq!(ended[&Cause::ViewerReset], 0, "{ended:?}");
}

pub async fn viewer_reset_reaches_the_hypervisor_as_a_reset(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::after(After::Hold)).await;
    let s = console(&relay, "vm-vrst", &hv).await;
    s.set_zero_linger().unwrap();
    drop(s);
    assert_eq!(hv.ends().await, vec!["reset".to_string()]);
}

pub async fn hypervisor_reset_reaches_the_viewer_as_a_reset(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::after(After::ResetAfter(1 << 20))).await;
    let mut s = console(&relay, "vm-hrst", &hv).await;
    let mut buf = vec![0u8; 1 << 16];
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("the console ended") {
            Ok(0) => break "eof".to_string(),
            Ok(_) => {}
            Err(e) => break format!("{:?}", e.kind()),
        }
    };
    assert_eq!(outcome, "ConnectionReset", "the hypervisor's reset reaches the viewer as a reset");
}

pub async fn forced_disconnect_ends_the_console_on_both_sides(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-kick", &hv).await;
    s.write_all(b"before").await.unwrap();
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).await.unwrap();
    let reply = relay.ctl(Request::InstanceReset { instance: "vm-kick".into(), revoke: true }).await.unwrap();
    assert_eq!(reply["disconnected"], 1);
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("the viewer sees the end");
    assert_eq!(end.unwrap(), 0, "a clean EOF to the viewer, nothing more");
    assert_eq!(hv.ends().await, vec!["eof".to_string()], "a clean EOF to the hypervisor");
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), 6);
    relay.no_live_consoles().await;
    assert!(relay.connect_door(&relay.token("vm-other", hv.addr()).await).await.is_ok(), "relay goes on serving");
}

/// `relay ctl sessions` counts bytes while the console is live, whichever layer moved them.
pub async fn live_byte_counts_include_what_the_back_end_moved(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-count", &hv).await;
    let sent = 1 << 20;
    let (mut r, mut w) = s.split();
    let write = async { w.write_all(&pattern(0, sent)).await.unwrap() };
    let read = async {
        let mut back = vec![0u8; sent];
        r.read_exact(&mut back).await.unwrap();
    };
    tokio::join!(write, read);
    // A back-end may count a move a moment after the bytes arrive (uring counts when its
    // ring thread reaps the completion), so the counts get a short while to catch up.
    let started = Instant::now();
    loop {
        let sessions = relay.ctl(Request::Sessions { instance: Some("vm-count".into()) }).await.unwrap();
        let live = &sessions["sessions"][0];
        let (up, down) = (live["bytes_to_hypervisor"].as_u64().unwrap(), live["bytes_to_viewer"].as_u64().unwrap());
        if up >= sent as u64 && down >= sent as u64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "counted {up} up and {down} down of {sent} each way");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn an_idle_console_ends_after_the_idle_timeout(default: TestRelay, backend: Backend) {
    // Needs its own relay: the idle timeout is configuration.
    drop(default);
    let relay = start(backend, |c| c.limits.session_idle_timeout_secs = 1).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-idle", &hv).await;
    // Busy for longer than the timeout: no end while bytes flow.
    for round in 0..6 {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        s.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        s.read_exact(&mut pong).await.unwrap();
    }
    // Idle from the last byte on. Every back-end shares one clock: the end comes after
    // the timeout, and within a quarter of it (an eighth to notice the last byte, an
    // eighth to notice the silence), plus scheduling.
    let last_byte = Instant::now();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await.expect("an idle console ends").unwrap();
    assert_eq!(n, 0);
    let idle = last_byte.elapsed();
    assert!(idle >= Duration::from_millis(950), "ended after {idle:?} idle");
    assert!(idle <= Duration::from_millis(1350), "ended only after {idle:?} idle, for a timeout of 1 s");
}

pub async fn bytes_already_in_flight_at_hand_off_go_first_in_order(relay: TestRelay, _: Backend) {
    // The hypervisor sends ServerInit with SecurityResult; the viewer pipelines its
    // choice, ClientInit and payload in one write. Both sides' early bytes are read by
    // the handshakes and must be passed on first.
    let hv = FakeVnc::start(Script { eager_init: true, ..Script::echo() }).await;
    let token = relay.token("vm-early", hv.addr()).await;
    let mut s = relay.connect_door(&token).await.unwrap();
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(b"RFB 003.008\n\x01\x01early payload").await.unwrap();
    let expect = [1u8, 1, 0, 0, 0, 0];
    let mut got = vec![0u8; expect.len() + SERVER_INIT_LEN + 13];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..6], &expect[..]);
    assert_eq!(&got[6 + SERVER_INIT_LEN - 4..6 + SERVER_INIT_LEN], b"fake");
    assert_eq!(&got[6 + SERVER_INIT_LEN..], b"early payload");
}

pub async fn a_stalled_viewer_bounds_what_is_in_flight_then_gets_every_byte(relay: TestRelay, _: Backend) {
    let total = 256 << 20;
    let hv = FakeVnc::start(Script::after(After::Flood(total))).await;
    let mut s = console(&relay, "vm-stall", &hv).await;
    // Stall: read nothing until the hypervisor's writes stop advancing.
    let last = hv.sent_when_blocked().await;
    // In flight: kernel socket buffers on both legs plus relay's 32 KiB buffer, or the
    // kernel back-ends' in-flight cap (4 MiB).
    assert!(last < 48 << 20, "{} MiB in flight to a stalled viewer", last >> 20);
    eprintln!("stalled viewer: the hypervisor blocked after {} KiB", last >> 10);
    assert_eq!(read_pattern(&mut s, usize::MAX).await, total, "resumed: every byte, in order");
}

/// A viewer that floods while reading nothing stalls the echoing hypervisor too: both
/// directions back up at once, and still what the viewer can push stays bounded.
pub async fn a_viewer_flooding_while_reading_nothing_is_bounded_then_gets_every_byte(relay: TestRelay, _: Backend) {
    let hv = FakeVnc::start(Script::echo()).await;
    let s = console(&relay, "vm-flood", &hv).await;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    // The viewer writes for at least a second, and reads only once its writes stall.
    let started = Instant::now();
    let more = move |written: usize| {
        progress.store(written, std::sync::atomic::Ordering::SeqCst);
        written < 4 * BLOCK || started.elapsed() < Duration::from_secs(1)
    };
    let stalled = async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = written.load(std::sync::atomic::Ordering::SeqCst);
            if now == last {
                let bound = socket_buffers_at_most();
                assert!(now < bound, "the viewer pushed {} MiB with both directions stalled (bound {} MiB)", now >> 20, bound >> 20);
                return;
            }
            last = now;
        }
    };
    let echoed = echo_numbered_words(s, stalled, Writes { chunk: 1 << 20, pause: Duration::ZERO, more }).await;
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), echoed);
}

/// What the kernel buffers of a console's two connections (viewer–relay, relay–hypervisor)
/// can hold at most, as this machine's TCP autotuning allows, plus relay's own buffers or
/// in-flight caps: past this, something holds bytes that TCP's windows do not bound.
fn socket_buffers_at_most() -> usize {
    let max = |name: &str| -> usize {
        let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
        text.split_whitespace().last().unwrap().parse().unwrap()
    };
    // Four sockets, each with a receive and a send buffer.
    4 * (max("tcp_rmem") + max("tcp_wmem")) + (8 << 20)
}

/// The thousand-console tests count this process's descriptors, so the back-ends take
/// turns: another back-end's thousand consoles would be counted too.
static COUNTING_FDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn a_thousand_consoles_open_and_close_without_leaks(relay: TestRelay, _: Backend) {
    let _counting = COUNTING_FDS.lock().await;
    raise_fd_limit(8192);
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-many", hv.addr()).await;
    let fds_before = open_fds();
    let mut consoles = Vec::new();
    for chunk in 0..10 {
        let opened: Vec<_> = (0..100)
            .map(|_| {
                let (token, addr) = (token.clone(), relay.connect);
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    s.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
                    let mut ok = [0u8; 19];
                    s.read_exact(&mut ok).await.unwrap();
                    handshake(&mut s, RFB38, None).await.unwrap();
                    s
                })
            })
            .collect();
        for o in opened {
            consoles.push(o.await.unwrap_or_else(|e| panic!("chunk {chunk}: {e}")));
        }
    }
    let live = relay.ctl(Request::Stats).await.unwrap()["sessions_active"].as_u64().unwrap();
    assert_eq!(live, 1000);
    let stats = relay.ctl(Request::Stats).await.unwrap();
    if stats["relay"]["raw"] == "sockmap" {
        assert_eq!(stats["relay"]["sockmap_sockets"], 2000, "every console is in the kernel");
    }
    // An idle console holds four descriptors in this process (viewer, relay's two sockets,
    // fake hypervisor) and nothing more: no pipe, epoll set or spare socket per console.
    let held = open_fds().saturating_sub(fds_before);
    assert!(held <= 4 * 1000 + 50, "{held} descriptors for 1,000 idle consoles");
    drop(consoles);
    let started = Instant::now();
    loop {
        let stats = relay.ctl(Request::Stats).await.unwrap();
        let live = stats["sessions_active"].as_u64().unwrap();
        let entries = (stats["relay"]["sockmap_flows"].as_u64().unwrap(), stats["relay"]["sockmap_sockets"].as_u64().unwrap());
        if live == 0 && entries == (0, 0) && open_fds() <= fds_before + 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{live} sessions, {entries:?} map entries and {} fds left (before: {fds_before})",
            open_fds()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[allow(unsafe_code)] // getrlimit/setrlimit
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, nothing else.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The stalled-peer bound's other half: a viewer that stops reading at random moments,
/// for random lengths, still gets every byte in order (kernel back-ends switch such a
/// direction between the kernel and userspace many times).
pub async fn a_viewer_pausing_at_random_gets_every_byte(relay: TestRelay, _: Backend) {
    let total = 512 << 20;
    let hv = FakeVnc::start(Script::after(After::Flood(total))).await;
    let mut s = console(&relay, "vm-pause", &hv).await;
    let expected = pattern(0, 251 * 4096);
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0usize;
    let mut next_pause = 0usize;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, expected[(at + i) % 251], "byte {} differs", at + i);
        }
        at += n;
        if at > next_pause {
            tokio::time::sleep(Duration::from_millis(1 + (rand_ish(at) % 20) as u64)).await;
            next_pause = at + (rand_ish(at + 1) % (16 << 20));
        }
    }
    assert_eq!(at, total, "every byte, then EOF");
}

fn rand_ish(x: usize) -> usize {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7
}
