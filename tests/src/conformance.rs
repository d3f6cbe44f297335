//! The relay back-end conformance suite: what every back-end must do with an established
//! console, as functions of a relay started on the back-end. `tests/conformance.rs` runs
//! each on this machine's back-ends; `vmcheck` runs a subset inside other kernels
//! (`cargo xtask vmtest`). Numbered-word streams (moves, uneven I/O) are in
//! [`crate::conformance_order`], TLS consoles in [`crate::conformance_tls`].

use crate::env;
use crate::fake_hypervisor::{After, FakeVnc, SERVER_INIT_LEN, Script, pattern, read_pattern};
use crate::relay_server::TestRelay;
use crate::viewer::handshake;
use relay::config::Backend;
use relay::control::proto::Request;
use relay::relay::lifecycle::Cause;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conformance_order::{BLOCK, Writes, echo_numbered_words};
pub use crate::conformance_order::{
    a_console_moved_to_the_kernel_mid_stream_keeps_every_byte_in_order, a_typing_console_moves_to_the_ring_when_quiet_backend_is_uring,
    auto_moves_each_raw_console_by_what_it_carries, hundreds_of_fall_backs_and_resumes_keep_every_byte_in_order,
    only_a_busy_console_moves_to_the_kernel, uneven_reads_and_writes_keep_every_byte_in_order,
};
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
        // `auto` is checked where it has both kernel back-ends to choose from.
        Backend::Auto => {
            env::sockmap();
            env::uring();
        }
        Backend::Copy => {}
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
    if backend != Backend::Auto {
        assert_eq!(format!("{raw:?}"), format!("{backend:?}"), "raw sessions run on the back-end asked for");
    }
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
