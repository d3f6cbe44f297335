//! What the machine offers the tests. Whether a test runs at all is decided when the
//! tests compile (`tests/build.rs` marks a test needing a missing tool as ignored, with
//! the reason); these checks run inside the tests that were not ignored, and fail them
//! if the tool is unusable after all. So no test that did not run says "ok".

use std::path::Path;

/// Fails the test when `tool` is missing.
fn require(tool: &str, available: bool) {
    assert!(available, "{tool} is required by this test but unusable: run `cargo xtask deps` (or see the probe in tests/build.rs)");
}

pub fn qemu() {
    require("qemu-system-x86_64", Path::new("/usr/bin/qemu-system-x86_64").exists());
}

pub fn browser() {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/node_modules/playwright-core");
    require("chromium + tests/browser/node_modules", Path::new("/usr/bin/chromium").exists() && modules.exists());
}

pub fn debian_novnc() {
    require("Debian's novnc (/usr/share/novnc)", Path::new("/usr/share/novnc/vnc_lite.html").exists());
}

/// This process may load relay's eBPF program (a build with the object, and root or
/// CAP_BPF + CAP_NET_ADMIN).
pub fn sockmap() {
    let loaded = relay::relay::sockmap::Sockmap::load(2, 1 << 20);
    require(&format!("the sockmap back-end ({:?})", loaded.as_ref().err().map(ToString::to_string)), loaded.is_ok());
}

/// This kernel's io_uring has what relay's uring back-end needs.
pub fn uring() {
    let started = relay::relay::uring::Uring::start(8, true);
    require(&format!("the io_uring back-end ({:?})", started.as_ref().err().map(ToString::to_string)), started.is_ok());
}

pub fn redis() {
    require("redis-server (Debian's redis-server)", Path::new(crate::servers::REDIS_SERVER).exists());
}

pub fn mariadb() {
    require("mariadbd (Debian's mariadb-server)", Path::new(crate::servers::MARIADBD).exists());
}

pub fn haproxy() {
    require("haproxy (Debian's haproxy)", Path::new(crate::servers::HAPROXY).exists());
}
