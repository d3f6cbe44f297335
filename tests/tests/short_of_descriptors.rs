//! A console keeps every byte while relay is out of descriptors, on each back-end
//! (`relay_tests::conformance_descriptors`). Each check takes this whole process's
//! descriptors away for a while, so they run one at a time, each alone in this binary.

use relay::config::Backend;
use relay_tests::conformance::start;
use relay_tests::conformance_descriptors::a_console_short_of_descriptors_keeps_every_byte;
use std::sync::Mutex;

/// Held for a whole check, its runtime's making included: nothing else here may open a
/// descriptor while a check has them taken.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn check(backend: Backend) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async { a_console_short_of_descriptors_keeps_every_byte(start(backend, |_| {}).await, backend).await });
}

#[test]
fn copy() {
    check(Backend::Copy);
}

#[test]
#[cfg_attr(relay_no_uring, ignore = "io_uring is disabled on this machine")]
fn uring() {
    check(Backend::Uring);
}

#[test]
#[cfg_attr(relay_no_sockmap, ignore = "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)")]
fn sockmap() {
    check(Backend::Sockmap);
}
