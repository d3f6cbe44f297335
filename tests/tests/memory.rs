//! Memory after a wave of consoles: once they have gone, relay gives back what they held
//! (the allocator kept it for reuse, at the high-water mark). Its own test binary, so that
//! no other test's allocations move the process's resident memory meanwhile, on the
//! allocator relay's binary uses.

use relay::config::Backend;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::TestRelay;
use relay_tests::viewer::handshake;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

const CONSOLES: usize = 1000;

#[global_allocator]
static ALLOCATOR: relay::heap::Allocator = relay::heap::Allocator;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// Opens `CONSOLES` consoles on `token`; with a burst, each viewer sends it and reads none
/// of the echo: both of the console's pumps fill and grow their buffers to their most, and
/// hold them (a pump waiting for its reader holds none, so only stuck bytes keep them).
async fn open_wave(relay: &TestRelay, token: &str, burst: Option<Arc<Vec<u8>>>) -> Vec<JoinHandle<()>> {
    let mut consoles = Vec::with_capacity(CONSOLES);
    for _ in 0..CONSOLES {
        let mut s = relay.connect_door(token).await.unwrap();
        handshake(&mut s, b"RFB 003.008\n", None).await.unwrap();
        let burst = burst.clone();
        consoles.push(tokio::spawn(async move {
            if let Some(burst) = burst {
                let _ = s.write_all(&burst).await;
            }
            std::future::pending::<()>().await;
        }));
    }
    consoles
}

/// Closes the viewers and waits until relay has ended every console, then for two
/// housekeeping ticks (a trim, if one is due).
async fn close_wave(relay: &TestRelay, consoles: Vec<JoinHandle<()>>) {
    for console in &consoles {
        console.abort();
    }
    drop(consoles);
    for _ in 0..100 {
        if relay.stats().await.sessions_active == 0 {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("relay still counts live consoles 10 s after their viewers closed");
}

/// Resident memory once it has stopped growing (the wave's buffers fill over a few ticks).
async fn settled_peak() -> u64 {
    let mut peak = resident_bytes();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = resident_bytes();
        if now <= peak + (256 << 10) {
            return now.max(peak);
        }
        peak = now;
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_goes_back_down_after_a_wave_of_consoles() {
    let relay = TestRelay::start_with(|c| {
        c.relay.backend = Backend::Copy;
        c.tokens.sweep_interval_secs = 1;
        c.tokens.touch_interval_secs = 1;
        c.limits.max_sessions_per_instance = CONSOLES;
        c.limits.max_connections_per_source = 0;
        // Stuck consoles hold their pumps' largest buffers: a wave that costs clearly more
        // than what relay keeps for good.
        c.limits.relay_buffer_bytes = 64 << 10;
    })
    .await;
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-wave", hv.addr()).await;
    // What relay keeps for good once it has carried this many consoles (tokio's and
    // tracing's pools, the registry's table) belongs in the baseline: a first wave of idle
    // consoles leaves it behind.
    close_wave(&relay, open_wave(&relay, &token, None).await).await;
    let before = resident_bytes();
    let consoles = open_wave(&relay, &token, Some(Arc::new(vec![7u8; 2 << 20]))).await;
    let peak = settled_peak().await;
    close_wave(&relay, consoles).await;
    let mib = |b: u64| b >> 20;
    let bound = before + peak.saturating_sub(before) / 3;
    let mut after = resident_bytes();
    for _ in 0..20 {
        if after < bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = resident_bytes();
    }
    eprintln!(
        "resident: {} MiB before, {} MiB with {CONSOLES} stuck consoles, {} MiB after they closed",
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(peak > before + (32 << 20), "the wave should cost memory to be a test: {} -> {} MiB", mib(before), mib(peak));
    assert!(after < bound, "memory stayed up: {} MiB before, {} at the peak, {} after", mib(before), mib(peak), mib(after));
}
