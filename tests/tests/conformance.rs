//! The relay back-end conformance suite (`relay_tests::conformance`), run once per
//! back-end (modules `copy`, `sockmap`, `uring`); a back-end this machine cannot run is
//! skipped with a message (a failure under `cargo xtask test`).

use relay::config::Backend;
use relay_tests::conformance::*;

/// One module of tests per back-end, each test calling the shared body below.
macro_rules! conformance {
    ($($backend:ident => $kind:expr, $adjust:expr, $skip:ident, $why:literal;)*) => {$(
        mod $backend {
            use super::*;
            conformance!(@tests $kind, $adjust, $skip, $why;
                one_gib_each_way_byte_exact,
                hypervisor_fin_arrives_after_its_data_and_the_other_way_stays_open,
                viewer_fin_arrives_after_its_data_and_the_other_way_stays_open,
                viewer_reset_reaches_the_hypervisor_as_a_reset,
                hypervisor_reset_reaches_the_viewer_as_a_reset,
                forced_disconnect_ends_the_console_on_both_sides,
                bytes_already_in_flight_at_hand_off_go_first_in_order,
                a_stalled_viewer_bounds_what_is_in_flight_then_gets_every_byte,
                a_viewer_flooding_while_reading_nothing_is_bounded_then_gets_every_byte,
                a_viewer_pausing_at_random_gets_every_byte,
                an_idle_console_ends_after_the_idle_timeout,
                a_thousand_consoles_open_and_close_without_leaks,
                live_byte_counts_include_what_the_back_end_moved,
                a_console_moved_to_the_kernel_mid_stream_keeps_every_byte_in_order,
                only_a_busy_console_moves_to_the_kernel,
                uneven_reads_and_writes_keep_every_byte_in_order,
                hundreds_of_fall_backs_and_resumes_keep_every_byte_in_order,
                the_hypervisors_end_is_the_cause_even_when_the_viewer_then_resets,
                tls_consoles_each_cipher_byte_exact_each_way,
                tls_close_notify_arrives_after_the_data_both_ways,
                tls_key_update_mid_stream,
                tls_websocket_console_byte_exact_each_way,
                tls_on_both_sides_byte_exact_each_way,
            );
        }
    )*};
    (@tests $kind:expr, $adjust:expr, $skip:ident, $why:literal; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[cfg_attr($skip, ignore = $why)]
        async fn $name() {
            relay_tests::conformance::$name(start($kind, $adjust).await, $kind).await
        }
    )*};
}

conformance! {
    copy => Backend::Copy, |_| {}, relay_never, "";
    uring => Backend::Uring, |_| {}, relay_no_uring, "io_uring is disabled on this machine";
    // Plain rings, as kernels before 6.1 have: completions may then come at any moment,
    // not only when the ring's thread asks for them.
    uring_plain => Backend::Uring, |c| c.relay.uring_defer_taskrun = false, relay_no_uring, "io_uring is disabled on this machine";
    sockmap => Backend::Sockmap, |_| {}, relay_no_sockmap, "loading the eBPF program needs root and the eBPF toolchain (cargo xtask build-ebpf)";
}

/// `uring_plain` above runs on plain rings: the setting reaches the kernel's ring, and the
/// default is a deferred one wherever the kernel has it (Linux 6.1 and later).
#[test]
#[cfg_attr(relay_no_uring, ignore = "io_uring is disabled on this machine")]
fn uring_defer_taskrun_false_makes_plain_rings() {
    use relay::relay::uring::Uring;
    assert!(!Uring::start(8, false).unwrap().deferred(), "uring_defer_taskrun = false: plain rings");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    assert_eq!(Uring::start(8, true).unwrap().deferred(), (major, minor) >= (6, 1), "the default on Linux {major}.{minor}");
}

/// `auto` picks a raw console's back-end by what it carries: the ring when busy, sockmap
/// when it keeps carrying a little, copy when silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    any(relay_no_uring, relay_no_sockmap),
    ignore = "auto's choice needs both kernel back-ends (root, io_uring, cargo xtask build-ebpf)"
)]
async fn auto_moves_each_raw_console_by_what_it_carries() {
    let relay = start(Backend::Auto, |_| {}).await;
    relay_tests::conformance::auto_moves_each_raw_console_by_what_it_carries(relay, Backend::Auto).await
}

/// `quiet_backend = "uring"`: typing consoles go to the ring rather than sockmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_uring, ignore = "io_uring is disabled on this machine")]
async fn a_typing_console_moves_to_the_ring_when_quiet_backend_is_uring() {
    let relay = start(Backend::Auto, |_| {}).await;
    relay_tests::conformance::a_typing_console_moves_to_the_ring_when_quiet_backend_is_uring(relay, Backend::Auto).await
}
