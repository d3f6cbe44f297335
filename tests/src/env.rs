//! What the machine offers the tests. A test needing a missing tool says so and
//! skips; under `cargo xtask test` (RELAY_TEST_REQUIRE_ALL=1) it fails instead, so a
//! missing install cannot pass silently.

use std::path::Path;

/// True when `tool` is usable; otherwise prints why the test is skipped, or panics
/// when everything is required.
pub fn have(tool: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("RELAY_TEST_REQUIRE_ALL").is_some() {
        panic!("{tool} is required (RELAY_TEST_REQUIRE_ALL is set) but missing: run `cargo xtask deps`");
    }
    eprintln!("SKIPPED: {tool} is not installed (run `cargo xtask deps`)");
    false
}

pub fn qemu() -> bool {
    have("qemu-system-x86_64", Path::new("/usr/bin/qemu-system-x86_64").exists())
}

pub fn browser() -> bool {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/node_modules/playwright-core");
    have("chromium + tests/browser/node_modules", Path::new("/usr/bin/chromium").exists() && modules.exists())
}

pub fn debian_novnc() -> bool {
    have("Debian's novnc (/usr/share/novnc)", Path::new("/usr/share/novnc/vnc_lite.html").exists())
}

/// True when this process may load relay's eBPF program (a build with the object, and
/// root or CAP_BPF + CAP_NET_ADMIN).
pub fn sockmap() -> bool {
    let loaded = relay::relay::sockmap::Sockmap::load(2, 1 << 20);
    if let Err(e) = &loaded {
        eprintln!("sockmap: {e}");
    }
    have("the sockmap back-end", loaded.is_ok())
}

/// True when this kernel's io_uring has what relay's uring back-end needs.
pub fn uring() -> bool {
    let started = relay::relay::uring::Uring::start(8);
    if let Err(e) = &started {
        eprintln!("io_uring: {e}");
    }
    have("the io_uring back-end", started.is_ok())
}
