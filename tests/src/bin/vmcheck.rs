//! The back-end conformance subset, run as PID 1's child inside a kernel booted by
//! `cargo xtask vmtest`: one line per back-end and check (`vmcheck: KERNEL BACKEND CHECK:
//! PASS|FAIL ...`), then `vmcheck: done, N failed`; the exit status is the failures'.
//!
//! Its /init passes the options in the environment: `VMCHECK_BACKENDS` (comma-separated;
//! empty: all), `VMCHECK_ONLY` (one check by name), `VMCHECK_REPEAT` (runs of each check)
//! and `VMCHECK_BENCH` (non-empty: measure TLS paths too).

use relay::config::Backend;
use relay_tests::conformance::{self, start};
use relay_tests::conformance_descriptors;
use relay_tests::conformance_tls;
use relay_tests::relay_server::TestRelay;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

type Check = fn(TestRelay, Backend) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! checks {
    ($module:ident: $($name:ident),* $(,)?) => {
        [$((stringify!($name), (|relay, backend| Box::pin($module::$name(relay, backend))) as Check)),*]
    };
}

/// What each back-end must do on every kernel relay supports; the bulk check moves
/// 32 MiB each way (an emulated machine runs several times slower than this one).
const CHECKS: [(&str, Check); 10] = checks!(conformance:
    several_mib_each_way_byte_exact,
    hypervisor_fin_arrives_after_its_data_and_the_other_way_stays_open,
    viewer_fin_arrives_after_its_data_and_the_other_way_stays_open,
    viewer_reset_reaches_the_hypervisor_as_a_reset,
    hypervisor_reset_reaches_the_viewer_as_a_reset,
    forced_disconnect_ends_the_console_on_both_sides,
    a_stalled_viewer_bounds_what_is_in_flight_then_gets_every_byte,
    a_console_moved_to_the_kernel_mid_stream_keeps_every_byte_in_order,
    uneven_reads_and_writes_keep_every_byte_in_order,
    hundreds_of_fall_backs_and_resumes_keep_every_byte_in_order,
);

/// Consoles while relay is out of descriptors (each takes the whole process's away for a
/// while: the checks run one at a time).
const DESCRIPTOR_CHECKS: [(&str, Check); 2] = checks!(conformance_descriptors:
    a_console_short_of_descriptors_keeps_every_byte,
    a_tls_console_short_of_descriptors_keeps_every_byte,
);

/// relay's default, `auto`, choosing between the kernel back-ends (run once, after them),
/// and with `quiet_backend = "uring"` sending typing consoles to the ring.
const AUTO_CHECKS: [(&str, Check); 2] = checks!(conformance:
    auto_moves_each_raw_console_by_what_it_carries,
    a_typing_console_moves_to_the_ring_when_quiet_backend_is_uring,
);

/// TLS consoles, whose TLS must move into these kernels (kTLS).
const TLS_CHECKS: [(&str, Check); 5] = checks!(conformance_tls:
    tls_consoles_each_cipher_byte_exact_each_way,
    tls_on_both_sides_byte_exact_each_way,
    tls_websocket_console_byte_exact_each_way,
    tls_close_notify_arrives_after_the_data_both_ways,
    tls_key_update_mid_stream,
);

/// How long one check may take under emulation.
const CHECK_TIMEOUT: Duration = Duration::from_secs(240);

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let option = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let wanted = option("VMCHECK_BACKENDS");
    let only = option("VMCHECK_ONLY");
    let repeat: usize = option("VMCHECK_REPEAT").and_then(|n| n.parse().ok()).unwrap_or(1);
    // A check name that matches none must fail the run, not pass it with nothing run.
    let unknown = only
        .as_ref()
        .filter(|o| !CHECKS.iter().chain(&TLS_CHECKS).chain(&DESCRIPTOR_CHECKS).chain(&AUTO_CHECKS).any(|(check, _)| check == o));
    if let Some(name) = unknown {
        println!("vmcheck: {kernel}: FAIL: no check named {name:?}");
    }
    // Debian's kernels build TLS as a module: kTLS must be there, with every cipher.
    let ktls = relay::tls::kernel::probe();
    let ktls_failed = !matches!(&ktls, relay::tls::kernel::Ktls::Available(offered) if offered.len() == 6);
    println!("vmcheck: {kernel} kTLS: {}: {ktls:?}", if ktls_failed { "FAIL" } else { "PASS" });
    let failed = runtime.block_on(async {
        let mut failed = usize::from(ktls_failed) + usize::from(unknown.is_some());
        for backend in [Backend::Copy, Backend::Uring, Backend::Sockmap, Backend::Auto] {
            let name = format!("{backend:?}").to_lowercase();
            if wanted.as_ref().is_some_and(|w| !w.split(',').any(|b| b == name)) {
                continue;
            }
            let all: &[(&str, Check)] = match backend {
                Backend::Auto => &AUTO_CHECKS,
                _ => &[CHECKS.as_slice(), &TLS_CHECKS, &DESCRIPTOR_CHECKS].concat(),
            };
            let checks = all.iter().copied().filter(|(check, _)| only.as_ref().is_none_or(|o| o == check));
            for (check, run) in checks.flat_map(|c| std::iter::repeat_n(c, repeat)) {
                let started = Instant::now();
                let task = tokio::spawn(async move { run(start(backend, |_| {}).await, backend).await });
                let outcome = match tokio::time::timeout(CHECK_TIMEOUT, task).await {
                    Ok(Ok(())) => "PASS".to_string(),
                    Ok(Err(e)) => format!("FAIL ({})", panic_message(e)),
                    Err(_) => format!("FAIL (not done in {CHECK_TIMEOUT:?})"),
                };
                failed += usize::from(!outcome.starts_with("PASS"));
                println!("vmcheck: {kernel} {name} {check}: {outcome} in {:.1} s", started.elapsed().as_secs_f64());
            }
        }
        failed
    });
    if option("VMCHECK_BENCH").is_some() {
        runtime.block_on(async {
            let size = 256 << 20;
            for (path, rate, cpu) in conformance_tls::measure_paths(size).await {
                println!(
                    "vmcheck: {kernel} bench {path}: {rate:.1} MiB/s, {cpu:.2} CPU ms per MiB ({} MiB to a TLS 1.3 viewer)",
                    size >> 20
                );
            }
        });
    }
    println!("vmcheck: done, {failed} failed");
    std::process::ExitCode::from(failed.min(255) as u8)
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default(),
        Err(e) => e.to_string(),
    }
    .lines()
    .next()
    .unwrap_or_default()
    .to_string()
}
