//! The `#[repr(C)]` values of the BPF maps that relay (userspace) and relay-ebpf (the
//! sk_skb verdict program) share. Both sides compile this one definition.
#![no_std]

/// Per socket, keyed by its socket cookie: where its bytes go and what the verdict
/// program did with them. Written only by the program (serialized per socket), read by
/// userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Cookie of the socket this one's bytes are redirected to.
    pub peer: u64,
    /// Bytes redirected to the peer's send path by the kernel.
    pub redirected: u64,
    /// Bytes passed to this socket's own receive queue, for userspace to relay.
    pub passed: u64,
    /// Bytes of retransmitted segments that overlapped bytes already relayed, cut off.
    pub trimmed: u64,
    /// Non-empty skbs dropped: wholly old ones, and any the program failed to cut. The
    /// latter lose bytes, so relay ends such a session with an error.
    pub dropped: u64,
    /// Of those, skbs the program could not cut (the stream is broken).
    pub cut_failures: u64,
    /// Bytes of sequence space the program never saw: an skb began past the next byte
    /// due. The stream has a hole, so relay ends such a session with an error.
    pub skipped: u64,
    /// [`MODE_REDIRECT`] or [`MODE_PASS`].
    pub mode: u32,
    /// How many times the direction fell back to userspace.
    pub fallbacks: u32,
    /// TCP sequence number of the next byte not yet relayed, once `seq_known`.
    pub next_seq: u32,
    pub seq_known: u32,
}

/// Per socket, keyed by its socket cookie: what userspace allows. Written only by
/// userspace, read by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// The program may redirect while `Flow::redirected` stays at or below this; past it
    /// the direction passes to userspace, whose receive queue pushes back through TCP.
    pub limit: u64,
    /// Userspace has read and fully written this many passed bytes; when it equals
    /// `Flow::passed` (nothing passed is still waiting) the program may redirect again.
    pub resumed_at: u64,
}

pub const MODE_REDIRECT: u32 = 0;
pub const MODE_PASS: u32 = 1;

/// Map names, as the program declares them and userspace looks them up.
pub const MAP_TARGETS: &str = "TARGETS";
pub const MAP_VERDICT: &str = "VERDICT";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_GRANTS: &str = "GRANTS";
/// A ring buffer of socket cookies: the program writes one each time a socket falls back
/// (it passes bytes to the socket's own queue after redirecting), so that userspace, which
/// does not watch a redirecting socket for readability (that would wake it for every
/// redirected skb), knows to relay them. It watches a passing socket's input itself.
pub const MAP_PASSED: &str = "PASSED";
/// One u64 at index 0: times [`MAP_PASSED`] had no room for a cookie. Userspace, seeing
/// it change, looks at every session (a cookie missed is a session left waiting).
pub const MAP_UNSIGNALLED: &str = "UNSIGNALLED";
pub const PROGRAM: &str = "relay_verdict";

#[cfg(feature = "user")]
#[allow(unsafe_code)] // aya reads and writes map values as raw bytes.
mod pod {
    use super::{Flow, Grant};

    // SAFETY: repr(C), made only of integers, with no padding (6×8+4×4 bytes), so every
    // bit pattern is a valid value.
    unsafe impl aya::Pod for Flow {}

    // SAFETY: repr(C), two u64s, no padding: every bit pattern is a valid value.
    unsafe impl aya::Pod for Grant {}
}
