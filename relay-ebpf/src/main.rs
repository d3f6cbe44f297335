//! relay's sk_skb stream-verdict program: moves an established session's bytes from one
//! socket's receive path straight to its peer's send path, inside the kernel.
//!
//! Each socket of a session has a [`Flow`] (what the program did) and a [`Grant`] (what
//! userspace allows), keyed by socket cookie. The program is the only place a direction
//! changes between "redirect" and "pass to userspace"; it runs serialized per socket, so
//! no byte can overtake another. Past the grant's limit (bytes in flight towards a slow
//! receiver) skbs go to the socket's own receive queue, where they count against its
//! receive buffer and TCP's window pushes back on the sender.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod verdict;

/// On the host there is nothing to run: workspace-wide commands (check, clippy, doc) see
/// this stub; relay's build script builds the program for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
