//! What an idle console costs relay in memory: a region's proxy holds thousands of consoles
//! that mostly wait. relay runs as a process of its own, so that its resident memory is
//! its own (the viewers and the fake hypervisor are in this test's process). Also what
//! loading the sockmap program, which `auto` does for quiet consoles, leaves resident.

use relay::control::client::call;
use relay::control::proto::Request;
use relay::control::replies::TokenCreated;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::{connect_door_at, new_token, scratch_dir};
use relay_tests::servers::RelayProcess;
use relay_tests::viewer::handshake;
use std::time::Duration;

/// Consoles opened before the first reading, and added before the second: under the
/// usual descriptor limit of 1,024 (a viewer and a hypervisor socket each, here).
const FIRST: usize = 100;
const ADDED: usize = 350;

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_console_costs_a_few_kib() {
    let dir = scratch_dir("idle-memory");
    let config = dir.join("relay.toml");
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [hypervisor]\nauth_schemes = [\"none\"]\n\n[limits]\nmax_connections_per_source = 0\n\
         max_sessions_per_instance = 1000\n\n[store]\nbackend = \"memory\"\n",
        dir.join("control.sock").display()
    );
    std::fs::write(&config, text).unwrap();
    let relay = RelayProcess::start(&config).await.unwrap();
    let pid = relay.pid().unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let created: TokenCreated = call(&relay.control, Request::TokenCreate(new_token("vm-idle", hv.addr()))).await.unwrap();
    let mut consoles = Vec::new();
    let mut open = async |n: usize| {
        for _ in 0..n {
            let mut s = connect_door_at(relay.connect, &created.token).await.unwrap();
            handshake(&mut s, b"RFB 003.008\n", None).await.unwrap();
            consoles.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        resident_kib(pid)
    };
    let first = open(FIRST).await;
    let second = open(ADDED).await;
    let per_console = (second.saturating_sub(first)) as f64 / ADDED as f64;
    eprintln!(
        "relay's resident memory: {first} KiB with {FIRST} idle consoles, {second} KiB with {}: {per_console:.1} KiB a console",
        FIRST + ADDED
    );
    assert!(second > first, "the consoles should cost something to be a test: {first} -> {second} KiB");
    // At the default log level (`info`), as shipped. A debug build measures 1.9 KiB, at
    // times 2.7 (jemalloc grows in slabs of several pages, and 350 consoles are few);
    // 2.6-2.8 on glibc's malloc, 3.6 while a console's task kept the connection's and session's tracing spans alive
    // (~350 bytes each in the subscriber), and 6.1-6.6 before relay built a console's
    // pumps ahead of its future (each layer of the relay kept its own copy of the streams).
    assert!(per_console <= 3.2, "an idle console costs relay {per_console:.1} KiB");
    drop(consoles);
    drop(relay);
    let _ = std::fs::remove_dir_all(dir);
}

/// relay's resident memory a moment after start-up, on `auto` with `quiet_backend` as
/// given, and where quiet raw consoles went.
async fn started_kib(quiet_backend: &str) -> (u64, String) {
    let dir = scratch_dir(&format!("start-memory-{quiet_backend}"));
    let config = dir.join("relay.toml");
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [relay]\nquiet_backend = \"{quiet_backend}\"\n\n[store]\nbackend = \"memory\"\n",
        dir.join("control.sock").display()
    );
    std::fs::write(&config, text).unwrap();
    let relay = RelayProcess::start(&config).await.unwrap();
    let stats: serde_json::Value = call(&relay.control, Request::Stats).await.unwrap();
    let kib = resident_kib(relay.pid().unwrap());
    drop(relay);
    let _ = std::fs::remove_dir_all(dir);
    (kib, stats["relay"]["raw_quiet"].as_str().unwrap_or_default().to_string())
}

/// Loading the program parses the kernel's BTF; relay gives that memory back once the
/// program is loaded (without it, relay on `auto` started 19 MiB larger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
async fn loading_sockmap_leaves_little_resident() {
    relay_tests::env::sockmap();
    let (with, quiet) = started_kib("sockmap").await;
    assert_eq!(quiet, "sockmap", "auto loaded sockmap for quiet consoles");
    let (without, quiet) = started_kib("copy").await;
    assert_eq!(quiet, "copy");
    eprintln!("relay at start-up: {with} KiB with sockmap loaded, {without} KiB without");
    assert!(with <= without + 6 * 1024, "sockmap left {} KiB more resident", with.saturating_sub(without));
}
