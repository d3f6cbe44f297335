//! Keystrokes through a console the sockmap back-end carries must not wake relay: after
//! every skb the program redirects, the kernel wakes the socket's readers, and relay,
//! registered for input, used to wake 18,000 times a second on a farm of 2,000 consoles
//! for nothing to read. Alone in its test binary, so that the one thread named
//! `relay-sockmap` (the watcher) is this relay's.

use relay::config::Backend;
use relay::control::proto::Request;
use relay_tests::conformance::{console, start};
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Context switches so far of this process's threads called `name`.
fn switches(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name) {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
async fn keystrokes_in_the_kernel_wake_no_one_in_userspace() {
    let relay = start(Backend::Sockmap, |_| {}).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-keys", &hv).await;
    let news = async || relay.ctl(Request::Stats).await.unwrap()["relay"]["sockmap_wakeups"].as_u64().unwrap();
    let (news_before, switches_before) = (news().await, switches("relay-sockmap"));
    assert!(switches_before > 0, "no thread named relay-sockmap: is the watcher running?");
    let mut echo = [0u8; 256];
    for i in 0..500u32 {
        let key = [(i % 251) as u8; 256];
        s.write_all(&key).await.unwrap();
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, key, "keystroke {i} echoed");
    }
    let (news, switched) = (news().await - news_before, switches("relay-sockmap") - switches_before);
    // The watcher wakes once a second by itself; the round trips take well under one.
    assert!(switched < 10, "relay's sockmap watcher was woken {switched} times for 500 round trips the kernel carried");
    assert!(news < 10, "relay's sessions were woken {news} times for 500 round trips the kernel carried");
}
