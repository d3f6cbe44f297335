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
    // The optional socket units, beside it.
    let sockets = ["relay-websocket.socket", "relay-connect.socket"].map(|name| {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging").join(name);
        std::fs::copy(from, dir.join(name)).unwrap();
        dir.join(name)
    });
    let out = std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).args(&sockets).output().unwrap();
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
        "RELAY_CONTROL=/run/relay/control.sock",
    ] {
        assert!(text.contains(wanted), "the unit lacks {wanted}");
    }
    // Enough open files for the default 20,000 connections on `auto` (relay/src/rlimit.rs:
    // up to six descriptors a console, 256 of relay's own, and 130 a core of the rings'
    // spare pipes, counted here for 64 cores).
    let nofile: u64 = text.lines().find_map(|l| l.strip_prefix("LimitNOFILE=")).and_then(|n| n.trim().parse().ok()).expect("LimitNOFILE=");
    assert!(nofile >= 20_000 * 6 + 256 + 64 * 130, "LimitNOFILE={nofile} is short of the default limits' needs");
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

/// `cargo xtask deb` makes a package that `dpkg -i` installs into an empty tree, and the
/// binary and its man page work from there.
#[test]
#[cfg_attr(relay_no_xtask, ignore = "the xtask binary is not built: run through cargo xtask test")]
fn the_deb_installs_into_a_clean_tree_and_works_from_it() {
    let dir = scratch_dir("deb");
    let xtask = relay_binary().with_file_name("xtask");
    assert!(xtask.exists(), "{} is missing: run through cargo xtask test", xtask.display());
    let built = std::process::Command::new(&xtask)
        .arg("deb")
        .arg("--binary")
        .arg(relay_binary())
        .arg("--out")
        .arg(&dir)
        .arg("--uncompressed")
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let deb =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb")).expect("a .deb");
    // An empty system: dpkg's database and nothing else.
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let installed = std::process::Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        // Scripts run outside the (empty) tree, told DPKG_ROOT; libc6 is not in it either.
        .args(["--force-script-chrootless", "--force-depends", "-i"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));
    let status = std::process::Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-s", "relay"]).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("Status: install ok installed"));
    let version = std::process::Command::new(root.join("usr/bin/relay")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("relay {}", env!("CARGO_PKG_VERSION")));
    let man = std::process::Command::new("man").args(["-P", "cat", "-l"]).arg(root.join("usr/share/man/man1/relay.1.gz")).output().unwrap();
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(man.status.success() && page.contains("check-config") && page.contains("ctl"), "{page}");
    for file in ["lib/systemd/system/relay.service", "etc/relay/relay.toml", "usr/share/bash-completion/completions/relay"] {
        assert!(root.join(file).is_file(), "{file} is not installed");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Socket activation, with systemd's own tool: the sockets it holds become relay's doors
/// by their names, and the connection that woke relay is served.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(relay_no_socket_activate, ignore = "systemd-socket-activate is not installed: cargo xtask deps")]
async fn socket_activation_serves_the_doors_systemd_passes() {
    use relay::control::proto::Request;
    use relay::control::replies::TokenCreated;
    use relay_tests::fake_hypervisor::{FakeVnc, Script};
    use std::io::BufRead as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hv = FakeVnc::start(Script::echo()).await;
    let dir = scratch_dir("activate");
    let config = dir.join("relay.toml");
    // The configured ports are never bound: systemd's sockets take their place.
    std::fs::write(
        &config,
        format!(
            "[listen]\nwebsocket = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\ncontrol = \"{}\"\n\n[store]\nbackend = \"memory\"\n",
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    let ports = [relay_tests::hypervisor::free_port().unwrap(), relay_tests::hypervisor::free_port().unwrap()];
    let mut activator = std::process::Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{}", ports[0]), "-l", &format!("127.0.0.1:{}", ports[1]), "--fdname=websocket:connect"])
        .arg(relay_binary())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(activator.stdout.take().unwrap());
    // The first connection starts relay, which then answers it.
    let mut health = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", ports[0])).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    health.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), health.read_to_string(&mut answer)).await.expect("relay answered").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("alive\n"), "{answer}");
    let mut line = String::new();
    tokio::task::block_in_place(|| stdout.read_line(&mut line)).unwrap();
    assert!(line.contains(&format!("websocket=127.0.0.1:{} connect=127.0.0.1:{}", ports[0], ports[1])), "{line}");
    // A console through the CONNECT door's socket.
    let created: TokenCreated = relay::control::client::call(
        &dir.join("control.sock"),
        Request::TokenCreate(relay_tests::relay_server::new_token("vm-activated", hv.addr())),
    )
    .await
    .unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ports[1])).await.unwrap();
    s.write_all(format!("CONNECT /console?token={} HTTP/1.1\r\nHost: relay\r\n\r\n", created.token).as_bytes()).await.unwrap();
    let head = relay_tests::relay_server::read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    relay_tests::viewer::handshake(&mut s, b"RFB 003.008\n", None).await.expect("the console opens");
    // Without --accept the activator execs relay in its own place: one process to stop.
    let _ = activator.kill();
    let _ = activator.wait();
    let _ = std::fs::remove_dir_all(dir);
}
