//! The open-file limit relay runs under: raised at start to hold every console it is
//! configured for (on a kernel back-end, with the pipes and duplicate descriptors a
//! console may take there); where the hard limit is too low even for the consoles'
//! sockets, relay holds fewer connections and refuses the rest with 503 rather than run
//! out of descriptors.

use relay_tests::relay_server::scratch_dir;
use relay_tests::servers::RelayProcess;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The (soft, hard) limits on open files of process `pid` (or "self").
fn open_files(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a line for open files");
    let n = |i: usize| line.split_whitespace().nth(i).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    (n(3), n(4))
}

fn soft_open_files(pid: u32) -> u64 {
    open_files(&pid.to_string()).0
}

fn hard_open_files() -> u64 {
    open_files("self").1
}

fn write_config(dir: &Path, max_connections: usize, backend: &str) -> PathBuf {
    let path = dir.join(format!("relay-{backend}-{max_connections}.toml"));
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [store]\nbackend = \"memory\"\n\n[limits]\nmax_connections = {max_connections}\nmax_connections_per_source = 0\n\n\
         [relay]\nbackend = \"{backend}\"\n",
        dir.join(format!("control-{backend}-{max_connections}.sock")).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_low_soft_limit_is_raised_for_every_console_and_what_its_back_end_may_take() {
    let dir = scratch_dir("open-files-raised");
    // Copy: a console's two sockets. Auto: up to four more (the ring's pipes for TLS the
    // kernel carries, or sockmap's duplicates), and the rings' spare pipes.
    // The hard limit stays this process's (raising it needs CAP_SYS_RESOURCE).
    let hard = hard_open_files();
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let consoles = 1500;
    // relay's own 256; on auto, the rings' spare pipes (64 of two descriptors) and
    // eventfds, a ring a core.
    for (backend, per_console, beyond) in [("copy", 2, 256), ("auto", 6, 256 + cores * 130)] {
        let wanted = consoles * per_console + beyond;
        assert!(hard >= wanted, "this test needs a hard limit of {wanted} open files; here {hard}");
        let config = write_config(&dir, consoles as usize, backend);
        let log = dir.join(format!("{backend}.log"));
        let relay = RelayProcess::start_with_open_files(&config, &log, (1024, hard)).await.unwrap();
        assert_eq!(soft_open_files(relay.pid().unwrap()), wanted, "{backend}");
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("raised the open-file limit"), "{backend}: {logged}");
    }
}

/// A hard limit that holds the consoles' sockets but not all a kernel back-end may take
/// beside them: relay keeps every connection it was configured for, raises the soft limit
/// as far as it goes, and says at start that a console may then wait for a descriptor.
#[tokio::test]
async fn a_hard_limit_short_of_the_back_ends_share_is_taken_whole_and_reported() {
    let dir = scratch_dir("open-files-extras");
    // 1,500 consoles on auto: 3,256 descriptors for their sockets and relay's own, up to
    // 9,256 more with what the back-ends may take.
    let hard = 5000;
    assert!(hard_open_files() >= hard, "this test needs a hard limit of {hard} open files");
    let config = write_config(&dir, 1500, "auto");
    let log = dir.join("relay.log");
    let relay = RelayProcess::start_with_open_files(&config, &log, (1024, hard)).await.unwrap();
    assert_eq!(soft_open_files(relay.pid().unwrap()), hard);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("raised the open-file limit") && logged.contains("not every pipe or duplicate descriptor"), "{logged}");
    assert!(!logged.contains("below what max_connections needs"), "every connection fits: {logged}");
}

#[tokio::test]
async fn a_short_hard_limit_holds_fewer_connections_and_refuses_the_rest_with_503() {
    let dir = scratch_dir("open-files-short");
    let config = write_config(&dir, 1000, "copy");
    let log = dir.join("relay.log");
    // 300 descriptors: relay keeps 256 for itself, so 22 connections of two sockets fit.
    let relay = RelayProcess::start_with_open_files(&config, &log, (300, 300)).await.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("open-file limit is below what max_connections needs") && logged.contains("connections=22"), "{logged}");
    let mut held = Vec::new();
    for _ in 0..22 {
        held.push(TcpStream::connect(relay.connect).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = answer(relay.connect).await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "the 23rd: {refused:?}");
    // A place given back is taken again, once relay has seen it go.
    held.pop();
    let mut taken = false;
    for _ in 0..50 {
        let mut next = TcpStream::connect(relay.connect).await.unwrap();
        let mut byte = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(300), next.read(&mut byte)).await.is_err() {
            taken = true;
            break;
        }
    }
    assert!(taken, "a connection after one of the 22 closed is held, waiting for its request");
}

/// What relay answers a connection that sends nothing (up to 2 s).
async fn answer(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}
