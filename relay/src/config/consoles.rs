//! Consoles themselves: the hypervisor side, limits, the relay back-end and console
//! passwords.

use super::TlsVersion;
use crate::auth::Scheme;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hypervisor {
    /// Schemes relay may use towards hypervisors, most preferred first.
    pub auth_schemes: Vec<Scheme>,
    /// VNC password used when a token carries none.
    pub vnc_password: Option<String>,
    pub connect_timeout_secs: u64,
    /// VeNCrypt: CA bundle that hypervisor certificates must chain to.
    pub vencrypt_ca_certs: Option<PathBuf>,
    /// VeNCrypt: relay's client certificate and key (hypervisors with verify-peer=yes).
    pub vencrypt_client_cert: Option<PathBuf>,
    pub vencrypt_client_key: Option<PathBuf>,
    /// VeNCrypt X509Plain: user name sent with `vnc_password` inside TLS.
    pub plain_username: Option<String>,
    /// VeNCrypt: check that the hypervisor's certificate names the host relay dialed.
    /// nova does not (it checks the chain only); turn this off for compute certificates
    /// whose names do not match how tokens address the hosts.
    pub verify_hostname: bool,
    /// VeNCrypt: the oldest TLS version, and the cipher suites (empty: the defaults).
    pub tls_min_version: TlsVersion,
    pub tls_cipher_suites: Vec<String>,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Hypervisor {
            auth_schemes: vec![Scheme::None, Scheme::Vnc],
            vnc_password: None,
            connect_timeout_secs: 5,
            vencrypt_ca_certs: None,
            vencrypt_client_cert: None,
            vencrypt_client_key: None,
            plain_username: None,
            verify_hostname: true,
            tls_min_version: TlsVersion::V1_2,
            tls_cipher_suites: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections open at once from one source address (the proxy-reported one where
    /// trusted); 0 = no limit (the default: behind a TCP load balancer every viewer is
    /// its address).
    pub max_connections_per_source: usize,
    pub max_sessions: usize,
    pub max_sessions_per_instance: usize,
    pub max_header_bytes: usize,
    /// From accept to the end of both RFB handshakes.
    pub handshake_timeout_secs: u64,
    /// Largest WebSocket frame accepted from a viewer. Payloads are relayed as they
    /// arrive, so this bounds no buffer; it refuses absurd frames early.
    pub max_ws_message_bytes: usize,
    pub relay_buffer_bytes: usize,
    /// End a console after this long with no byte either way; 0 = never.
    pub session_idle_timeout_secs: u64,
    pub half_close_timeout_secs: u64,
    /// Requests served on one keep-alive connection of the web client.
    pub max_requests_per_connection: usize,
    /// A web client that takes no byte of a response for this long is disconnected.
    pub web_send_timeout_secs: u64,
    /// On SIGTERM, seconds of answering `/readyz` with 503 (and refusing new consoles)
    /// before the listeners close, for load balancers to notice; live consoles go on.
    pub drain_secs: u64,
    pub shutdown_grace_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_source: 0,
            max_sessions: 10_000,
            max_sessions_per_instance: 16,
            max_header_bytes: 8192,
            handshake_timeout_secs: 15,
            max_ws_message_bytes: 4 << 20,
            relay_buffer_bytes: 32 << 10,
            session_idle_timeout_secs: 3600,
            half_close_timeout_secs: 30,
            max_requests_per_connection: 200,
            web_send_timeout_secs: 60,
            drain_secs: 0,
            shutdown_grace_secs: 5,
        }
    }
}

/// Which back-end relays established consoles' bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// What the benchmark shows best on this machine kind (README): copy, then uring for
    /// consoles busy past kernel_after_ms (sockmap where io_uring is unavailable), and
    /// sockmap for raw consoles that keep carrying a little (`quiet_backend`).
    #[default]
    Auto,
    /// eBPF sockmap: raw sessions relayed in the kernel (root or CAP_BPF + CAP_NET_ADMIN).
    Sockmap,
    /// io_uring, a ring thread per core: raw and ws:// consoles.
    Uring,
    /// The portable userspace relay.
    Copy,
}

/// Under `auto`, where a raw console goes that still carries bytes at its second real look but
/// under `kernel_min_bytes_per_sec` (typing, small screen updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuietBackend {
    /// The eBPF sockmap, where relay may load its program: in a farm of such consoles it
    /// cost the machine the least CPU, and relay itself none (README.md).
    #[default]
    Sockmap,
    /// Stay in userspace.
    Copy,
    /// The io_uring ring, where the kernel has it: in the typing farm its tail was the
    /// shortest of relay's paths, for about HAProxy's machine CPU (docs/architecture.md,
    /// sockmap).
    Uring,
}

/// The established byte relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relay {
    pub backend: Backend,
    /// sockmap: bytes one direction may have in flight towards a receiver that has not
    /// acknowledged them, per session; past it TCP pushes back on the sender.
    pub in_flight_bytes: u64,
    /// Milliseconds a console bound for a kernel back-end runs on copy first, so that
    /// short ones (probes, abandoned password prompts) never pay the hand-off; 0 hands
    /// over at once.
    pub kernel_after_ms: u64,
    /// Past `kernel_after_ms`, a console moves only once it carried at least this many
    /// bytes a second (both ways together) since the last look (the count starts half-way
    /// through `kernel_after_ms`, past the opening screen; looks at `kernel_after_ms`,
    /// then twice as far apart each time, up to 8×): typing and small screen updates stay on
    /// copy (under `auto`, see `quiet_backend`). 0 moves every console.
    pub kernel_min_bytes_per_sec: u64,
    /// `auto`: where raw consoles under `kernel_min_bytes_per_sec` go once they are seen
    /// carrying bytes at a real look after their first (2 × `kernel_after_ms` after they
    /// opened, at the earliest); a console silent at its looks stays on copy, which holds
    /// least.
    pub quiet_backend: QuietBackend,
    /// After both handshakes, move TLS legs' records into the kernel (kTLS) where it
    /// offers the negotiated version and cipher.
    pub kernel_tls: bool,
    /// io_uring: rings defer their completion work to their own thread (single issuer,
    /// deferred task run; Linux 6.1 and later, else a plain ring anyway). false makes
    /// plain rings: interrupted by every completion, for a kernel whose deferred task run
    /// misbehaves.
    pub uring_defer_taskrun: bool,
    /// Threads that run handshakes, the control socket and the userspace relay (`copy`);
    /// 0: one per core. On 2 cores, a farm of 2,000 quiet consoles on `copy` cost the
    /// machine 0.18-0.19 cores per 1,000 consoles over direct on one thread, against
    /// 0.24-0.25 on two (the threads wake each other to share each burst of wake-ups;
    /// HAProxy: 0.25), but its p99 was no better and at times worse (docs/architecture.md).
    /// One thread also caps handshakes and bulk consoles on `copy` at one core.
    pub worker_threads: usize,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            backend: Backend::Auto,
            in_flight_bytes: 1 << 20,
            kernel_after_ms: 1000,
            kernel_min_bytes_per_sec: 1_000_000,
            quiet_backend: QuietBackend::Sockmap,
            kernel_tls: true,
            uring_defer_taskrun: true,
            worker_threads: 0,
        }
    }
}

/// Console passwords that viewers must give (set per instance over the control socket).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Passwords {
    /// Consecutive wrong passwords, per instance and per source address, before lock-out.
    pub max_failures: u32,
    /// Seconds a lock-out lasts.
    pub lockout_secs: u64,
    /// Seconds a viewer has to answer the password prompt (a person is typing).
    pub entry_timeout_secs: u64,
    /// Most instances and sources whose failures are remembered at once.
    pub max_tracked: usize,
    /// Most instances with a console password.
    pub max_instances: usize,
}

impl Default for Passwords {
    fn default() -> Self {
        Passwords { max_failures: 5, lockout_secs: 300, entry_timeout_secs: 120, max_tracked: 100_000, max_instances: 100_000 }
    }
}
