//! The program itself (built for the BPF target only). It is made of kernel helper calls
//! and map values the kernel hands out as raw pointers, so it may use unsafe code; each
//! block says why it is sound.
#![allow(unsafe_code)]

use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_loop, bpf_skb_adjust_room};
use aya_ebpf::macros::{map, stream_verdict};
use aya_ebpf::maps::{Array, HashMap, RingBuf, SockHash};
use aya_ebpf::programs::SkBuffContext;
use relay_common::{Flow, Grant, MODE_PASS, MODE_REDIRECT};

/// Where redirected bytes may go. No program is attached here: both sockets of a session
/// enter this map before either enters [`VERDICT`], so the first redirect finds its peer.
#[map(name = "TARGETS")]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(1024, 0);

/// Sockets whose received bytes run through [`relay_verdict`].
#[map(name = "VERDICT")]
static VERDICT: SockHash<u64> = SockHash::with_max_entries(1024, 0);

/// Not preallocated: a preallocated hash map recycles a replaced element at once, so a
/// program still reading it could see another entry's values; these are freed after RCU.
#[map(name = "FLOWS")]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map(name = "GRANTS")]
static GRANTS: HashMap<u64, Grant> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Cookies of sockets the program passed bytes to (see `relay_common::MAP_PASSED`).
/// 256 KiB holds 16,384 records of 16 bytes (header and cookie).
#[map(name = "PASSED")]
static PASSED: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Index 0: cookies [`PASSED`] had no room for.
#[map(name = "UNSIGNALLED")]
static UNSIGNALLED: Array<u64> = Array::with_max_entries(1, 0);

#[stream_verdict]
pub fn relay_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
    // A bare FIN arrives as an empty skb; redirecting it would reset the peer. Dropped
    // here, it still shows as end-of-stream to userspace, which forwards it in order.
    if len == 0 {
        return SK_DROP;
    }
    // SAFETY: the helper only reads the socket behind the context's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        // Not (or no longer) a relayed session: userspace's queue.
        return SK_PASS;
    };
    // SAFETY: map values stay valid for the program's run; only this socket's verdict
    // writes this entry, and verdicts for one socket never run concurrently.
    let flow = unsafe { &mut *flow };
    // SAFETY: as above; a concurrent userspace update replaces the element whole.
    let (limit, resumed_at) = match unsafe { GRANTS.get(&cookie) } {
        Some(g) => (g.limit, g.resumed_at),
        None => (0, u64::MAX),
    };
    let len = match trim_overlap(&ctx, flow, len) {
        Some(len) => len,
        // Nothing new in it, or it could not be cut: forwarding it would corrupt the stream.
        None => {
            flow.dropped += 1;
            return SK_DROP;
        }
    };
    if flow.mode == MODE_PASS && !(resumed_at == flow.passed && flow.redirected + len <= limit) {
        // Not announced: userspace is relaying this direction, and listens for its input
        // until it sees the direction redirected again. Only a fall-back is news (each
        // announcement costs an interrupt to wake the watcher, a VM exit under a hypervisor).
        flow.passed += len;
        return SK_PASS;
    }
    if flow.redirected + len > limit {
        return pass(flow, cookie, len);
    }
    let mut peer = flow.peer;
    if TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32 != SK_PASS {
        // The peer is gone (reset, closing): keep the bytes rather than drop what TCP
        // has already acknowledged.
        return pass(flow, cookie, len);
    }
    flow.mode = MODE_REDIRECT;
    flow.redirected += len;
    SK_PASS
}

/// The largest cut `bpf_skb_adjust_room` makes on an sk_skb at once.
const MAX_CUT: u64 = 0xfff;

/// Cuts the bytes of `ctx` that precede `flow.next_seq` and advances it; returns how many
/// bytes remain. For sk_skb programs `cb[0]` is the first word of the skb's control block,
/// where TCP keeps the segment's sequence number.
fn trim_overlap(ctx: &SkBuffContext, flow: &mut Flow, len: u64) -> Option<u64> {
    let seq = ctx.cb()[0];
    let end = seq.wrapping_add(len as u32);
    if flow.seq_known == 0 {
        // The first skb after hand-off: userspace drained the queue before inserting the
        // socket, so it starts exactly at the next unread byte.
        flow.seq_known = 1;
        flow.next_seq = end;
        return Some(len);
    }
    let overlap = flow.next_seq.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        // Bytes between the last skb and this one never came this way: counted, so that
        // userspace ends the console rather than relay a stream with a hole.
        flow.skipped += overlap.unsigned_abs() as u64;
        flow.next_seq = end;
        return Some(len);
    }
    let cut = overlap as u64;
    if cut >= len {
        return None;
    }
    let remaining = len - cut;
    // One helper call cuts at most MAX_CUT bytes, and a retransmission can overlap many
    // 64 KiB segments: bpf_loop runs the cuts with a callback the verifier checks once,
    // where an unrolled loop would take it seconds per load for the same bound.
    let mut cutting = Cutting { skb: ctx.skb.skb, left: cut, failed: 0 };
    let steps = cut.div_ceil(MAX_CUT) as u32;
    // SAFETY: `cut_step` has the callback signature bpf_loop expects, and `cutting`
    // outlives the call, which runs the callback synchronously.
    let ran = unsafe { bpf_loop(steps, cut_step as *mut c_void, (&raw mut cutting).cast(), 0) };
    if ran < 0 || cutting.failed != 0 || cutting.left != 0 {
        flow.cut_failures += 1;
        return None;
    }
    flow.trimmed += cut;
    flow.next_seq = end;
    Some(remaining)
}

/// What [`cut_step`] works on: the skb, and how much of its head is still to cut.
#[repr(C)]
struct Cutting {
    skb: *mut __sk_buff,
    left: u64,
    failed: u64,
}

/// One bpf_loop iteration: cuts up to [`MAX_CUT`] bytes off the skb's head; 1 stops the loop.
extern "C" fn cut_step(_index: u64, data: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer it was given: a live `Cutting` on the
    // caller's stack, used by nothing else while the loop runs.
    let cutting = unsafe { &mut *data.cast::<Cutting>() };
    if cutting.left == 0 {
        return 1;
    }
    let step = if cutting.left > MAX_CUT { MAX_CUT } else { cutting.left };
    // SAFETY: the skb is the program's own context, valid for the whole run.
    if unsafe { bpf_skb_adjust_room(cutting.skb, -(step as i32), 0, 0) } != 0 {
        cutting.failed = 1;
        return 1;
    }
    cutting.left -= step;
    0
}

fn pass(flow: &mut Flow, cookie: u64, len: u64) -> u32 {
    flow.mode = MODE_PASS;
    flow.fallbacks += 1;
    flow.passed += len;
    signal(cookie);
    SK_PASS
}

/// Tells userspace that the socket fell back: it has passed bytes to relay. The kernel
/// wakes its readers too, but userspace listens for that only while the direction is
/// passing: the same wake-up comes for every redirected skb.
fn signal(cookie: u64) {
    if PASSED.output::<u64>(&cookie, 0).is_ok() {
        return;
    }
    if let Some(unsignalled) = UNSIGNALLED.get_ptr_mut(0) {
        // Not atomic (Rust's core has no atomic add for the BPF target), and need not
        // be: userspace only looks for a change, and a racing verdict's lost increment
        // still leaves a value written after both failures.
        // SAFETY: the map's value lives as long as the map.
        unsafe { *unsignalled = (*unsignalled).wrapping_add(1) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
