//! relay with less than root, as it is deployed. In a container, Docker's default seccomp
//! profile (Kolla runs OpenStack's console proxies under it) denies io_uring and `bpf`: on
//! `auto` relay then carries consoles on copy and says why at start-up; asked for a kernel
//! back-end by name, it refuses to start and says why, rather than run another. As the
//! packaged unit's unprivileged user, CAP_BPF and CAP_NET_ADMIN are enough for sockmap.
//! relay runs as a process of its own here.

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
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

fn write_config(dir: &Path, backend: &str) -> PathBuf {
    let path = dir.join(format!("relay-{backend}.toml"));
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [store]\nbackend = \"local\"\npath = \"{}\"\n\n\
         [relay]\nbackend = \"{backend}\"\n\n[log]\nformat = \"json\"\n",
        dir.join(format!("control-{backend}.sock")).display(),
        dir.join(format!("store-{backend}.db")).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The JSON log line of relay's choice of back-ends.
fn backends_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().find(|l| l.contains("relay back-ends")).map(str::to_string).unwrap_or_else(|| panic!("no back-ends line in:\n{text}"))
}

/// A console of `instance` through the CONNECT door, past the RFB handshake.
async fn open_console(relay: &RelayProcess, instance: &str, hv: &FakeVnc) -> TcpStream {
    let created: TokenCreated = call(&relay.control, Request::TokenCreate(new_token(instance, hv.addr()))).await.unwrap();
    let mut s = connect_door_at(relay.connect, &created.token).await.unwrap();
    handshake(&mut s, RFB38, None).await.unwrap();
    s
}

/// Sends `len` bytes through an echoing console while reading them back; they must match.
async fn echo_byte_exact(s: &mut TcpStream, len: u32) {
    let block: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; block.len()];
    let (mut r, mut w) = s.split();
    let (wrote, read) = tokio::join!(w.write_all(&block), r.read_exact(&mut back));
    wrote.unwrap();
    read.unwrap();
    assert!(back == block, "{len} bytes echoed byte for byte");
}

#[tokio::test]
async fn denied_io_uring_and_bpf_auto_carries_consoles_on_copy_and_says_why() {
    let dir = scratch_dir("confined-auto");
    let log = dir.join("relay.log");
    let relay = RelayProcess::start_denied(&write_config(&dir, "auto"), &log, CONTAINER_DENIED).await.unwrap();
    let line = backends_line(&log);
    assert!(line.contains("\"raw\":\"copy\"") && line.contains("\"framed\":\"copy\""), "{line}");
    assert!(line.contains("io_uring unavailable") && line.contains("Operation not permitted"), "says why: {line}");
    assert!(line.contains("sockmap unavailable"), "and why not sockmap, auto's other choice: {line}");
    assert!(line.contains("\"level\":\"WARN\""), "a warning, not news: {line}");
    let stats: serde_json::Value = call(&relay.control, Request::Stats).await.unwrap();
    assert_eq!(stats["relay"]["raw"], "copy");

    // A console works, past the hand-over time a kernel back-end would have taken it at.
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = open_console(&relay, "vm-confined", &hv).await;
    for _ in 0..3 {
        echo_byte_exact(&mut s, 1 << 20).await;
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

/// The packaged unit runs relay as `User=relay` with CAP_BPF and CAP_NET_ADMIN only
/// (packaging/relay.service): that is enough for sockmap, byte for byte; without
/// CAP_NET_ADMIN, relay asked for sockmap refuses to start and says what it needs.
#[tokio::test]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
async fn as_an_unprivileged_user_with_cap_bpf_and_cap_net_admin_sockmap_carries_a_console() {
    use std::os::unix::fs::{PermissionsExt, chown};
    const NOBODY: u32 = 65534;
    let base = scratch_dir("unprivileged");
    // The binary where the user may run it (a clone may sit in a directory only root
    // enters); the control socket's directory the user's own inside one of root's, as
    // systemd's RuntimeDirectory=, so that root's `relay ctl` trusts it.
    let binary = base.join("relay");
    std::fs::copy(relay_binary(), &binary).unwrap();
    let (run, state) = (base.join("run"), base.join("state"));
    for dir in [&run, &state] {
        std::fs::create_dir(dir).unwrap();
        chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let config = base.join("relay.toml");
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [store]\nbackend = \"local\"\npath = \"{}\"\n\n[relay]\nbackend = \"sockmap\"\nkernel_after_ms = 0\n\n\
         [log]\nformat = \"json\"\n",
        run.join("control.sock").display(),
        state.join("relay.db").display()
    );
    std::fs::write(&config, text).unwrap();

    let log = base.join("relay.log");
    let relay = RelayProcess::start_as(&binary, &config, &log, NOBODY, &["bpf", "net_admin"]).await.unwrap();
    assert!(backends_line(&log).contains("\"raw\":\"sockmap\""), "{}", backends_line(&log));
    let hv = FakeVnc::start(Script::echo()).await;
    let mut s = open_console(&relay, "vm-unprivileged", &hv).await;
    echo_byte_exact(&mut s, 4 << 20).await;
    let stats: serde_json::Value = call(&relay.control, Request::Stats).await.unwrap();
    assert_eq!(stats["relay"]["sockmap_sockets"], 2, "the console is in the kernel: {stats}");
    drop(relay);

    let without = base.join("relay-no-net-admin.log");
    let refused = RelayProcess::start_as(&binary, &config, &without, NOBODY, &["bpf"]).await;
    let said = std::fs::read_to_string(&without).unwrap_or_default();
    assert!(refused.is_err(), "sockmap without CAP_NET_ADMIN: {said}");
    assert!(said.contains("CAP_NET_ADMIN"), "says what it needs: {said}");
    let _ = std::fs::remove_dir_all(base);
}
