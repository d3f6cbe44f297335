//! Decides, before the tests compile, which of them this machine can run. A test that
//! needs a missing tool is compiled as ignored, with the reason, so `cargo test` reports
//! it "ignored" rather than "ok". Under `RELAY_TEST_REQUIRE_ALL` (`cargo xtask test`)
//! nothing is ignored: a missing tool fails its tests there. At run time each test checks
//! again and fails if what the probe found is gone.

use std::path::Path;
use std::process::Command;

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let require_all = std::env::var_os("RELAY_TEST_REQUIRE_ALL").is_some();
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let chromium = Path::new("/usr/bin/chromium");
    let playwright = here.join("browser/node_modules/playwright-core");
    let novnc = Path::new("/usr/share/novnc/vnc_lite.html");
    let uring_sysctl = Path::new("/proc/sys/kernel/io_uring_disabled");
    let redis = Path::new("/usr/bin/redis-server");
    let haproxy = Path::new("/usr/sbin/haproxy");
    let mariadb = Path::new("/usr/sbin/mariadbd");
    let systemd_analyze = Path::new("/usr/bin/systemd-analyze");
    let socket_activate = Path::new("/usr/bin/systemd-socket-activate");
    // `cargo xtask test` builds the xtask binary the package test runs (`cargo xtask deb`).
    let xtask = here.join("../target/debug/xtask");
    let probes = [
        ("relay_no_qemu", qemu.exists()),
        ("relay_no_browser", chromium.exists() && playwright.exists()),
        ("relay_no_debian_novnc", novnc.exists()),
        ("relay_no_redis", redis.exists()),
        ("relay_no_haproxy", haproxy.exists()),
        ("relay_no_mariadb", mariadb.exists()),
        ("relay_no_systemd_analyze", systemd_analyze.exists()),
        ("relay_no_socket_activate", socket_activate.exists()),
        ("relay_no_xtask", xtask.exists()),
        // relay embeds its program only where the toolchain built it, and loads it as root.
        ("relay_no_sockmap", is_root() && std::env::var("RELAY_EBPF").as_deref() != Ok("off") && has_bpf_linker()),
        ("relay_no_uring", std::fs::read_to_string(uring_sysctl).map_or(true, |v| v.trim() != "2")),
    ];
    // Set nowhere: for tests that need nothing beyond relay (the copy back-end's).
    println!("cargo::rustc-check-cfg=cfg(relay_never)");
    for (cfg, present) in probes {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !present && !require_all {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
    for path in [qemu, chromium, novnc, uring_sysctl, redis, haproxy, mariadb, systemd_analyze, socket_activate, &xtask, &playwright] {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    for var in ["RELAY_TEST_REQUIRE_ALL", "RELAY_EBPF", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success())
}
