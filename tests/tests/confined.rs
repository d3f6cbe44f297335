//! relay in a container: Docker's default seccomp profile (Kolla runs OpenStack's console
//! proxies under it) denies io_uring and `bpf`. On `auto` relay then carries consoles on
//! copy and says why at start-up; asked for a kernel back-end by name, it refuses to start
//! and says why, rather than run another. relay runs as a process of its own under the
//! filter.

use relay::control::client::call;
use relay::control::proto::Request;
use relay::control::replies::TokenCreated;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::{connect_door_at, new_token, scratch_dir};
use relay_tests::seccomp::{CONTAINER_DENIED, deny};
use relay_tests::servers::{RelayProcess, relay_binary};
use relay_tests::viewer::handshake;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RFB38: &[u8; 12] = b"RFB 003.008\n";

fn write_config(dir: &Path, backend: &str) -> PathBuf {
    let path = dir.join(format!("relay-{backend}.toml"));
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [relay]\nbackend = \"{backend}\"\n\n[log]\nformat = \"json\"\n",
        dir.join(format!("control-{backend}.sock")).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The JSON log line of relay's choice of back-ends.
fn backends_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().find(|l| l.contains("relay back-ends")).map(str::to_string).unwrap_or_else(|| panic!("no back-ends line in:\n{text}"))
}

#[tokio::test]
async fn denied_io_uring_and_bpf_auto_carries_consoles_on_copy_and_says_why() {
    let dir = scratch_dir("confined-auto");
    let log = dir.join("relay.log");
    let relay = RelayProcess::start_denied(&write_config(&dir, "auto"), &log, CONTAINER_DENIED).await.unwrap();
    let line = backends_line(&log);
    assert!(line.contains("\"raw\":\"copy\"") && line.contains("\"framed\":\"copy\""), "{line}");
    assert!(line.contains("io_uring unavailable") && line.contains("Operation not permitted"), "says why: {line}");
    assert!(line.contains("\"level\":\"WARN\""), "a warning, not news: {line}");
    let stats: serde_json::Value = call(&relay.control, Request::Stats).await.unwrap();
    assert_eq!(stats["relay"]["raw"], "copy");

    // A console works, past the hand-over time a kernel back-end would have taken it at.
    let hv = FakeVnc::start(Script::echo()).await;
    let created: TokenCreated = call(&relay.control, Request::TokenCreate(new_token("vm-confined", hv.addr()))).await.unwrap();
    let mut s = connect_door_at(relay.connect, &created.token).await.unwrap();
    handshake(&mut s, RFB38, None).await.unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    let mut back = vec![0u8; block.len()];
    for _ in 0..3 {
        let (mut r, mut w) = s.split();
        let (wrote, read) = tokio::join!(w.write_all(&block), r.read_exact(&mut back));
        wrote.unwrap();
        read.unwrap();
        assert!(back == block, "1 MiB echoed byte for byte");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let stats: serde_json::Value = call(&relay.control, Request::Stats).await.unwrap();
    assert_eq!(stats["relay"]["hand_overs"], 0, "nothing to hand over to: {stats}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn denied_io_uring_and_bpf_a_kernel_back_end_asked_for_by_name_refuses_to_start() {
    let dir = scratch_dir("confined-named");
    for (backend, why) in [("uring", "relay.backend = uring, but io_uring is unavailable"), ("sockmap", "relay.backend = sockmap, but")] {
        let mut command = std::process::Command::new(relay_binary());
        command.arg("run").arg("--config").arg(write_config(&dir, backend));
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        deny(&mut command, CONTAINER_DENIED);
        let mut child = command.spawn().unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("relay on {backend} kept running under the filter");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ran = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&ran.stderr);
        assert!(!ran.status.success(), "relay on {backend} exits with an error: {}", ran.status);
        assert!(stderr.contains(why) && stderr.contains("Operation not permitted"), "relay on {backend} says why: {stderr}");
        assert!(!String::from_utf8_lossy(&ran.stdout).contains("relay listening"), "and never listened");
    }
    let _ = std::fs::remove_dir_all(dir);
}
