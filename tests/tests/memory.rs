//! Memory after a wave of consoles: once they have gone, relay gives back what they held
//! (glibc kept it in its arenas, at the high-water mark). Its own test binary, so that no
//! other test's allocations move the process's resident memory meanwhile.

use relay::config::Backend;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::TestRelay;
use relay_tests::viewer::handshake;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_goes_back_down_after_a_wave_of_consoles() {
    const CONSOLES: usize = 1000;
    let relay = TestRelay::start_with(|c| {
        c.relay.backend = Backend::Copy;
        c.tokens.sweep_interval_secs = 1;
        c.tokens.touch_interval_secs = 1;
        c.limits.max_sessions_per_instance = CONSOLES;
        c.limits.max_connections_per_source = 0;
        // Stuck consoles hold their pumps' largest buffers: a wave that costs clearly more
        // than what relay keeps for good (tokio's and tracing's pools, about 10 MiB here).
        c.limits.relay_buffer_bytes = 64 << 10;
    })
    .await;
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-wave", hv.addr()).await;
    let before = resident_bytes();
    let mut consoles = Vec::with_capacity(CONSOLES);
    let burst = std::sync::Arc::new(vec![7u8; 2 << 20]);
    for _ in 0..CONSOLES {
        let mut s = relay.connect_door(&token).await.unwrap();
        handshake(&mut s, b"RFB 003.008\n", None).await.unwrap();
        // A viewer that sends more than the sockets hold and reads none of the echo: both
        // of the console's pumps fill and grow their buffers to their most, and hold them
        // (a pump waiting for its reader holds none, so only stuck bytes keep them).
        let burst = burst.clone();
        consoles.push(tokio::spawn(async move {
            let _ = s.write_all(&burst).await;
            std::future::pending::<()>().await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = resident_bytes();
    for console in &consoles {
        console.abort();
    }
    drop(consoles);
    let mut after = peak;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = resident_bytes();
        if relay.stats().await.sessions_active == 0 && after < before + (peak - before) / 3 {
            break;
        }
    }
    let mib = |b: u64| b >> 20;
    eprintln!("resident: {} MiB before, {} MiB with {CONSOLES} consoles, {} MiB after they closed", mib(before), mib(peak), mib(after));
    assert!(peak > before + (32 << 20), "the wave should cost memory to be a test: {} -> {} MiB", mib(before), mib(peak));
    assert!(
        after < before + (peak - before) / 3,
        "memory stayed up: {} MiB before, {} at the peak, {} after",
        mib(before),
        mib(peak),
        mib(after)
    );
}
