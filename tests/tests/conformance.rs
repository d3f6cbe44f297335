//! The relay back-end conformance suite: what every back-end must do with an
//! established console. This version of relay has one back-end (the portable
//! userspace copy); kernel back-ends must pass the same tests.

use relay::control::proto::Request;
use relay_tests::fake_hypervisor::{After, FakeVnc, SERVER_INIT_LEN, Script, pattern};
use relay_tests::relay_server::TestRelay;
use relay_tests::viewer::handshake;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";
const GIB: usize = 1 << 30;

async fn console(relay: &TestRelay, instance: &str, hv: &FakeVnc) -> TcpStream {
    let token = relay.token(instance, hv.addr()).await;
    let mut s = relay.connect_door(&token).await.unwrap();
    handshake(&mut s, RFB38, None).await.unwrap();
    s
}

/// Reads until EOF, checking every byte against the pattern; returns how many came.
async fn read_pattern(s: &mut TcpStream) -> usize {
    let expected = pattern(0, 251 * 4096);
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0usize;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return at;
        }
        let mut done = 0;
        while done < n {
            let off = (at + done) % 251;
            let take = (n - done).min(expected.len() - off);
            assert!(buf[done..done + take] == expected[off..off + take], "byte {} out of order", at + done);
            done += take;
        }
        at += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_byte_exact() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let s = console(&relay, "vm-gib", &hv).await;
    let (mut r, mut w) = s.into_split();
    let block = pattern(0, 251 * 4096); // 1 MiB minus a little; whole periods
    let rounds = GIB / block.len() + 1;
    let total = rounds * block.len();
    let writer = tokio::spawn(async move {
        for _ in 0..rounds {
            w.write_all(&block).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let expected = pattern(0, 251 * 4096);
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
            assert!(buf[done..done + take] == expected[off..off + take], "byte {} differs", at + done);
            done += take;
        }
        at += n;
    }
    writer.await.unwrap();
    assert_eq!(at, total, "every byte came back, then EOF");
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    eprintln!("1 GiB each way through relay ({build} build) in {:?}", started.elapsed());
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), total);
}

#[tokio::test]
async fn hypervisor_fin_arrives_after_its_data_and_the_other_way_stays_open() {
    let hv = FakeVnc::start(Script::after(After::SendThenFin(3 << 20))).await;
    let relay = TestRelay::start().await;
    let mut s = console(&relay, "vm-hvfin", &hv).await;
    assert_eq!(read_pattern(&mut s).await, 3 << 20, "all data, then EOF");
    // Half-closed: the viewer can still send; the hypervisor keeps reading.
    s.write_all(b"after your FIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hv.shared().received.load(std::sync::atomic::Ordering::SeqCst), 14);
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*hv.shared().ends.lock().unwrap(), vec!["eof".to_string()], "then the viewer's FIN reached it");
}

#[tokio::test]
async fn viewer_reset_reaches_the_hypervisor_as_a_reset() {
    let hv = FakeVnc::start(Script::after(After::Hold)).await;
    let relay = TestRelay::start().await;
    let s = console(&relay, "vm-vrst", &hv).await;
    s.set_zero_linger().unwrap();
    drop(s);
    let started = Instant::now();
    while hv.shared().ends.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*hv.shared().ends.lock().unwrap(), vec!["reset".to_string()]);
}

#[tokio::test]
async fn bytes_already_in_flight_at_hand_off_go_first_in_order() {
    // The hypervisor sends ServerInit with SecurityResult; the viewer pipelines its
    // choice, ClientInit and payload in one write. Both sides' early bytes are read by
    // the handshakes and must be passed on first.
    let hv = FakeVnc::start(Script { eager_init: true, ..Script::echo() }).await;
    let relay = TestRelay::start().await;
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

#[tokio::test]
async fn a_stalled_viewer_bounds_what_is_in_flight_then_gets_every_byte() {
    let total = 256 << 20;
    let hv = FakeVnc::start(Script::after(After::Flood(total))).await;
    let relay = TestRelay::start().await;
    let mut s = console(&relay, "vm-stall", &hv).await;
    // Stall: read nothing until the hypervisor's writes stop advancing.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = hv.sent();
        if sent == last {
            break;
        }
        last = sent;
    }
    // In flight: kernel socket buffers on both legs plus relay's 32 KiB buffer.
    assert!(last < 48 << 20, "{} MiB in flight to a stalled viewer", last >> 20);
    eprintln!("stalled viewer: the hypervisor blocked after {} KiB", last >> 10);
    assert_eq!(read_pattern(&mut s).await, total, "resumed: every byte, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_consoles_open_and_close_without_leaks() {
    raise_fd_limit(8192);
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| c.limits.max_sessions_per_instance = 2000).await;
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
    drop(consoles);
    let started = Instant::now();
    loop {
        let live = relay.ctl(Request::Stats).await.unwrap()["sessions_active"].as_u64().unwrap();
        if live == 0 && open_fds() <= fds_before + 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{live} sessions and {} fds left (before: {fds_before})", open_fds());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

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
