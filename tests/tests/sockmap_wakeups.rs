//! Keystrokes through a console the sockmap back-end carries wake nothing of relay's: not
//! the task that watches the sessions' sockets, not the session. After every skb the
//! program redirects, the kernel wakes the socket's readers; relay's reactor, registered
//! for input, used to take that wake-up 18,000 times a second on a farm of 2,000 consoles
//! for nothing to read. Registered for input in the watcher's set, the same wake-up would
//! make the set ready and the watcher turn, which this counts. Registered for input in
//! tokio's own set, the wake-up happens inside `epoll_wait` and no count sees it: so the
//! test also reads, from /proc, every epoll registration of the console's two sockets.
//!
//! A viewer that falls behind makes the program pass bytes back to userspace: relay hears
//! of each fall-back once, and then follows the socket's input itself until the program
//! redirects again, rather than being told of every skb passed (each telling costs the
//! kernel an interrupt, a VM exit under a hypervisor).

use relay::config::Backend;
use relay::control::proto::Request;
use relay_tests::conformance::{console, start};
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::TestRelay;
use std::collections::HashSet;
use std::fs;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The sockmap watcher's turns, the news it delivered to sessions, and the directions
/// handed back to the kernel, so far.
async fn counts(relay: &TestRelay) -> (u64, u64, u64) {
    let stats = relay.ctl(Request::Stats).await.unwrap();
    let count = |name: &str| stats["relay"][name].as_u64().unwrap();
    (count("sockmap_watcher_turns"), count("sockmap_wakeups"), count("sockmap_resumes"))
}

/// Every epoll registration in this process: (the registered descriptor, its event mask),
/// from each epoll descriptor's fdinfo (`tfd: N events: MASK data: ...`, hexadecimal mask).
fn epoll_registrations() -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for fd in fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventpoll]") {
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_string_lossy())).unwrap_or_default();
            for line in info.lines().filter(|l| l.starts_with("tfd:")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let (Some(tfd), Some(events)) = (words.get(1), words.get(3)) {
                    found.push((tfd.parse().unwrap(), u32::from_str_radix(events, 16).unwrap()));
                }
            }
        }
    }
    found
}

/// Descriptors of this process's TCP sockets (IPv4, loopback) whose local or remote port
/// is `port` (from /proc/net/tcp's inodes).
fn sockets_with_port(local: bool, port: u16) -> HashSet<u32> {
    let table = fs::read_to_string("/proc/net/tcp").unwrap();
    let inodes: HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let addr = words.get(if local { 1 } else { 2 })?;
            let p = u16::from_str_radix(addr.rsplit(':').next()?, 16).ok()?;
            let inode = words.get(9)?;
            (p == port).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(&*l.to_string_lossy())))
        .filter_map(|fd| fd.file_name().to_string_lossy().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
async fn keystrokes_in_the_kernel_wake_no_one_in_userspace() {
    let relay = start(Backend::Sockmap, |_| {}).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-keys", &hv).await;
    // relay's side of the console: the socket it accepted from this viewer, and the one it
    // dialled to the hypervisor.
    let viewer_side: HashSet<u32> = sockets_with_port(true, relay.connect.port())
        .intersection(&sockets_with_port(false, s.local_addr().unwrap().port()))
        .copied()
        .collect();
    let relays_sides: HashSet<u32> = viewer_side.union(&sockets_with_port(false, hv.addr().port())).copied().collect();
    assert_eq!(relays_sides.len(), 2, "relay's two sockets of the console, found in /proc");
    let registered: Vec<(u32, u32)> = epoll_registrations().into_iter().filter(|(fd, _)| relays_sides.contains(fd)).collect();
    assert!(registered.len() >= 2, "relay watches both sockets of a sockmap console: {registered:?}");
    let for_input: Vec<_> = registered.iter().filter(|(_, events)| events & libc::EPOLLIN as u32 != 0).collect();
    assert!(for_input.is_empty(), "relay's sockmap sockets are registered for input, which wakes it per message: {for_input:?}");
    let (turns_before, news_before, _) = counts(&relay).await;
    let mut echo = [0u8; 256];
    for i in 0..500u32 {
        let key = [(i % 251) as u8; 256];
        s.write_all(&key).await.unwrap();
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, key, "keystroke {i} echoed");
    }
    let (turns, news, _) = counts(&relay).await;
    let (turns, news) = (turns - turns_before, news - news_before);
    // The watcher also looks once a second by itself; the round trips take well under one.
    assert!(turns < 10, "relay's sockmap watcher woke {turns} times for 500 round trips the kernel carried");
    assert!(news < 10, "relay's sessions were woken {news} times for 500 round trips the kernel carried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
async fn a_viewer_that_falls_behind_wakes_relay_per_fall_back_not_per_skb() {
    // The least cap, so the echo keeps falling back while the viewer reads in fits.
    let relay = start(Backend::Sockmap, |c| c.relay.in_flight_bytes = 64 << 10).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let s = console(&relay, "vm-behind", &hv).await;
    let (turns_before, _, resumes_before) = counts(&relay).await;
    const TOTAL: usize = 16 << 20;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        for _ in 0..TOTAL / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w
    });
    let (mut buf, mut echoed) = (vec![0u8; 64 << 10], 0);
    while echoed < TOTAL {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "the console ended after {echoed} of {TOTAL} bytes echoed");
        assert!(buf[..n].iter().enumerate().all(|(i, &b)| b == ((echoed + i) % (64 << 10) % 251) as u8), "echo corrupted at {echoed}");
        echoed += n;
        // Reads in fits: the echo keeps getting ahead of this viewer.
        if echoed % (128 << 10) < n {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    drop(writer.await.unwrap());
    let (turns, _, resumes) = counts(&relay).await;
    let (turns, resumes) = (turns - turns_before, resumes - resumes_before);
    eprintln!("{TOTAL} bytes echoed to a viewer that fell behind: {resumes} resumes, {turns} turns of the watcher");
    assert!(resumes >= 1, "the echo never fell back and resumed: this test needs a viewer that falls behind");
    // One turn per fall-back (each resumed, but perhaps the last), plus the watcher's look
    // each second. Told of every skb passed, it turned 38 times for 2 resumes.
    assert!(
        turns <= resumes + 10,
        "relay's sockmap watcher woke {turns} times for {resumes} fall-backs and resumes: it hears of every skb passed"
    );
}
