//! Keystrokes through a console the sockmap back-end carries wake nothing of relay's: not
//! the task that watches the sessions' sockets, not the session. (The kernel's own wake-up
//! of a socket's readers after every redirected skb, which relay's reactor used to take
//! 18,000 times a second on a farm of 2,000 consoles, happens inside `epoll_wait` and is
//! seen from outside only: the farm's proxy-CPU column in docs/benchmarks.md.)

use relay::config::Backend;
use relay::control::proto::Request;
use relay_tests::conformance::{console, start};
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
async fn keystrokes_in_the_kernel_wake_no_one_in_userspace() {
    let relay = start(Backend::Sockmap, |_| {}).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = console(&relay, "vm-keys", &hv).await;
    let counts = async || {
        let stats = relay.ctl(Request::Stats).await.unwrap();
        (stats["relay"]["sockmap_watcher_turns"].as_u64().unwrap(), stats["relay"]["sockmap_wakeups"].as_u64().unwrap())
    };
    let (turns_before, news_before) = counts().await;
    let mut echo = [0u8; 256];
    for i in 0..500u32 {
        let key = [(i % 251) as u8; 256];
        s.write_all(&key).await.unwrap();
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, key, "keystroke {i} echoed");
    }
    let (turns, news) = counts().await;
    let (turns, news) = (turns - turns_before, news - news_before);
    // The watcher also looks once a second by itself; the round trips take well under one.
    assert!(turns < 10, "relay's sockmap watcher woke {turns} times for 500 round trips the kernel carried");
    assert!(news < 10, "relay's sessions were woken {news} times for 500 round trips the kernel carried");
}
