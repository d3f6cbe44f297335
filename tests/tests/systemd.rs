//! relay under systemd: the unit in packaging/ passes `systemd-analyze verify`, and the
//! binary tells a notify socket READY, WATCHDOG and STOPPING as `Type=notify` expects.

use relay_tests::relay_server::scratch_dir;
use relay_tests::servers::{RelayProcess, relay_binary};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn unit_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/relay.service")).expect("packaging/relay.service")
}

#[test]
#[cfg_attr(relay_no_systemd_analyze, ignore = "systemd-analyze is not installed: cargo xtask deps")]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = scratch_dir("unit");
    // The unit as installed, with the binary where this build has it.
    let unit = dir.join("relay.service");
    std::fs::write(&unit, unit_text().replace("/usr/bin/relay", &relay_binary().display().to_string())).unwrap();
    let out = std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // systemd-analyze warns about (and ignores) a bad setting but still exits 0.
    assert!(out.status.success() && stderr.trim().is_empty(), "{}\n{stderr}", out.status);
    let text = unit_text();
    for wanted in [
        "Type=notify",
        "User=relay",
        "RuntimeDirectory=relay",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "LimitNOFILE=65536",
        "RELAY_CONTROL=/run/relay/control.sock",
    ] {
        assert!(text.contains(wanted), "the unit lacks {wanted}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits for a datagram containing `what` on `socket`.
fn expect(socket: &UnixDatagram, what: &str, within: Duration) -> String {
    let started = Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == what) {
                return msg;
            }
            seen.push_str(&msg);
        }
    }
    panic!("no {what} within {within:?}; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = scratch_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n[store]\nbackend = \"memory\"\n\n[log]\nfilter = \"warn\"\n",
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    let notify = socket_path.display().to_string();
    let relay = RelayProcess::start_with_env(&config, &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")]).await.unwrap();
    let ready = tokio::task::block_in_place(|| expect(&socket, "READY=1", Duration::from_secs(10)));
    assert!(ready.contains("STATUS=listening: websocket=127.0.0.1:"), "{ready}");
    tokio::task::block_in_place(|| expect(&socket, "WATCHDOG=1", Duration::from_secs(5)));
    relay.terminate();
    tokio::task::block_in_place(|| expect(&socket, "STOPPING=1", Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(dir);
}
