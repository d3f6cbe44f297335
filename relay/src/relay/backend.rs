//! Which back-end relays an established session: decided once at start-up from what the
//! kernel and permissions allow and what was asked for, logged, then applied per session
//! by its kind (raw TCP on both sides, or anything else: WebSocket, TLS).

use super::lifecycle::{Failure, Op, Side};
use super::sockmap::{self, Sockmap};
use super::uring::{self, Uring};
use super::{Control, Ended, Established, Limits, Peer, copy, send_leftovers};
use crate::config::{Backend, QuietBackend, Relay};
use crate::tls::kernel::Ktls;
use crate::transport::KernelMove;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a peer may take to finish a TLS record it had begun when its TLS moves into
/// the kernel.
const TLS_MOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The back-end a kind of session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    Sockmap,
    Uring,
    Copy,
}

impl Choice {
    fn copy() -> Choice {
        Choice::Copy
    }

    pub fn name(self) -> &'static str {
        match self {
            Choice::Sockmap => "sockmap",
            Choice::Uring => "uring",
            Choice::Copy => "copy",
        }
    }
}

/// What `stats` says of the back-ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendsView {
    /// The back-end of raw consoles (CONNECT door, plain TCP to the hypervisor).
    pub raw: Choice,
    /// Where raw consoles go that keep carrying bytes under the busy bar (`auto`'s
    /// `quiet_backend`; copy: they stay).
    #[serde(default = "Choice::copy")]
    pub raw_quiet: Choice,
    /// The back-end of the rest (WebSocket framing or TLS on either side).
    pub framed: Choice,
    /// The back-end of raw consoles with TLS on a side that the kernel carries (kTLS).
    pub kernel_tls: Choice,
    /// How long a console bound for a kernel back-end runs on `copy` first (0: none).
    pub kernel_after_ms: u64,
    /// Consoles moved from `copy` to a kernel back-end.
    pub hand_overs: u64,
    /// Whether sockmap's program is loaded: only where a kind of console would use it.
    #[serde(default)]
    pub sockmap_loaded: bool,
    /// Live sockmap map entries: flows, and sockets in the verdict map (zero when idle).
    pub sockmap_flows: usize,
    pub sockmap_sockets: usize,
    /// Times a sockmap direction that fell back to userspace (its receiver behind) was
    /// handed back to the kernel.
    #[serde(default)]
    pub sockmap_resumes: u64,
    /// Times a sockmap console's userspace side was woken with news for it (an end, an
    /// error, bytes passed back); not once per message.
    #[serde(default)]
    pub sockmap_wakeups: u64,
    /// Times the task watching sockmap consoles' sockets woke (also never per message).
    #[serde(default)]
    pub sockmap_watcher_turns: u64,
    /// TLS legs (viewer or hypervisor side) whose records the kernel took over (kTLS).
    pub kernel_tls_legs: u64,
    /// Times a kernel back-end's console found no descriptor free for what it needed
    /// beside its sockets (a pipe, a duplicate to wait on) and waited or polled instead of
    /// ending: the open-file limit is short (see `limits.max_connections`).
    #[serde(default)]
    pub descriptor_waits: u64,
}

/// The back-ends this process runs, chosen at start-up.
pub struct Relays {
    sockmap: Option<Sockmap>,
    uring: Option<Uring>,
    /// Sessions that are plain TCP on both sides after the handshakes (CONNECT door).
    pub raw: Choice,
    /// Raw sessions that keep carrying bytes, under the hand-over rule's rate.
    pub raw_quiet: Choice,
    /// Everything else: WebSocket framing or TLS on either side.
    pub framed: Choice,
    /// Raw consoles with TLS on a side, once the kernel carries it (kTLS).
    pub kernel_tls: Choice,
    /// When a console bound for a kernel back-end leaves `copy` (None: at once).
    hand_over: Option<copy::HandOver>,
    /// Consoles moved from `copy` to a kernel back-end by `hand_over`; one the kernel
    /// refused, and `copy` took back, is not counted.
    hand_overs: AtomicU64,
    /// What kTLS the kernel offers (probed at start-up, or off by configuration).
    ktls: Ktls,
    kernel_tls_legs: AtomicU64,
}

impl Relays {
    /// Probes the kernel and picks, saying so in one log line. An explicit request the
    /// machine cannot honour is an error (an operator who asked for a kernel path should
    /// not silently get another); `auto` takes what the benchmark shows best here.
    pub fn start(config: &Relay, max_sessions: usize, ktls: Ktls) -> anyhow::Result<Relays> {
        // `auto` moves busy consoles to the ring: for bulk bytes the benchmark shows it
        // ahead of sockmap in throughput and machine CPU. Raw consoles that keep carrying a
        // little (typing, small screen updates) go to sockmap, which carried a farm of them
        // for the least machine CPU (`quiet_backend`); silent ones stay on copy, which holds
        // least. Sockmap is loaded only where it would be used: with it relay starts 2 MiB
        // more resident (10.7 against 12.8 MiB, `auto` with and without it).
        let has_ktls = matches!(ktls, Ktls::Available(_));
        let (uring, uring_off) =
            match matches!(config.backend, Backend::Auto | Backend::Uring).then(|| Uring::start(4096, config.uring_defer_taskrun)) {
                Some(Ok(u)) => (Some(u), None),
                Some(Err(e)) => (None, Some(e.to_string())),
                None => (None, None),
            };
        let wants_sockmap = match config.backend {
            Backend::Sockmap => true,
            Backend::Auto => uring.is_none() || config.quiet_backend == QuietBackend::Sockmap,
            _ => false,
        };
        let (sockmap, sockmap_off) = match wants_sockmap.then(|| Sockmap::load(max_sessions, config.in_flight_bytes)) {
            Some(Ok(s)) => {
                // What loading freed (the kernel's BTF, parsed to check the program against
                // it) the allocator would keep resident: 30 MiB at start-up instead of 12.8.
                crate::heap::trim();
                (Some(s), None)
            }
            Some(Err(e)) => (None, Some(e.to_string())),
            None => (None, None),
        };
        let raw = match config.backend {
            Backend::Sockmap if sockmap.is_none() => anyhow::bail!("relay.backend = sockmap, but {}", sockmap_off.unwrap_or_default()),
            Backend::Uring if uring.is_none() => {
                anyhow::bail!("relay.backend = uring, but io_uring is unavailable: {}", uring_off.unwrap_or_default())
            }
            Backend::Sockmap => Choice::Sockmap,
            Backend::Uring => Choice::Uring,
            Backend::Auto if uring.is_some() => Choice::Uring,
            Backend::Auto if sockmap.is_some() => Choice::Sockmap,
            Backend::Auto | Backend::Copy => Choice::Copy,
        };
        // Raw consoles whose TLS the kernel carries are spliced by the ring, where there is
        // one: sockmap cannot take a kTLS socket, and under emulation of Debian's kernels
        // the ring moved a TLS console 1.1-2.5 times as fast as copy over kTLS, for at
        // most the same CPU (`cargo xtask vmtest --bench`, docs/architecture.md).
        let kernel_tls = match config.backend {
            Backend::Uring | Backend::Auto if has_ktls && uring.is_some() => Choice::Uring,
            _ => Choice::Copy,
        };
        let raw_quiet = match (config.backend, config.quiet_backend) {
            (Backend::Auto, QuietBackend::Sockmap) if sockmap.is_some() => Choice::Sockmap,
            (Backend::Auto, QuietBackend::Uring) if uring.is_some() => Choice::Uring,
            _ => Choice::Copy,
        };
        // Only the back-ends in use stay loaded.
        let relays = Relays {
            sockmap: sockmap.filter(|_| raw == Choice::Sockmap || raw_quiet == Choice::Sockmap),
            uring: uring.filter(|_| raw == Choice::Uring || raw_quiet == Choice::Uring || kernel_tls == Choice::Uring),
            raw,
            raw_quiet,
            kernel_tls,
            // WebSocket over bare TCP can be framed on the ring; TLS stays in userspace.
            framed: if raw == Choice::Uring { Choice::Uring } else { Choice::Copy },
            hand_over: (config.kernel_after_ms > 0).then(|| copy::HandOver {
                after: Duration::from_millis(config.kernel_after_ms),
                min_rate: config.kernel_min_bytes_per_sec,
                // Only where the quiet back-end is there (sockmap's program loaded, or a ring).
                quiet: raw_quiet != Choice::Copy,
            }),
            hand_overs: AtomicU64::new(0),
            ktls,
            kernel_tls_legs: AtomicU64::new(0),
        };
        let mut notes: Vec<String> = [("sockmap", &sockmap_off), ("io_uring", &uring_off)]
            .into_iter()
            .filter_map(|(name, why)| why.as_ref().map(|w| format!("{name} unavailable: {w}")))
            .collect();
        if config.backend == Backend::Auto && !wants_sockmap {
            notes.push(format!("sockmap not loaded: auto uses io_uring where it has it, and quiet_backend = {}", relays.raw_quiet.name()));
        }
        if let Some(uring) = &relays.uring {
            let plain = match (uring.deferred(), config.uring_defer_taskrun) {
                (true, _) => "",
                (false, true) => ", plain: the kernel has no deferred task run (Linux 6.1)",
                (false, false) => ", plain (uring_defer_taskrun = false)",
            };
            notes.push(format!("io_uring: {} rings, one per core{plain}", uring.rings()));
        }
        if relays.raw != Choice::Copy || relays.framed != Choice::Copy || relays.kernel_tls != Choice::Copy {
            notes.push(match relays.hand_over {
                Some(h) if h.min_rate > 0 && h.quiet => format!(
                    "consoles move to the kernel after {:?} on copy, once they carry {} bytes/s; raw ones that keep carrying less, to {}",
                    h.after,
                    h.min_rate,
                    relays.raw_quiet.name()
                ),
                Some(h) if h.min_rate > 0 => {
                    format!("consoles move to the kernel after {:?} on copy, once they carry {} bytes/s", h.after, h.min_rate)
                }
                Some(h) => format!("consoles move to the kernel after {:?} on copy", h.after),
                None => "consoles move to the kernel at once".into(),
            });
        }
        let (raw_name, quiet_name, framed_name, tls_name) =
            (relays.raw.name(), relays.raw_quiet.name(), relays.framed.name(), relays.kernel_tls.name());
        // Without sockmap, `auto` still has the ring for busy consoles: a note, not a warning.
        if uring_off.is_some() || (sockmap_off.is_some() && relays.raw != Choice::Uring) {
            warn!(requested = ?config.backend, raw = raw_name, raw_quiet = quiet_name, framed = framed_name, kernel_tls = tls_name, "relay back-ends: {}", notes.join("; "));
        } else {
            info!(requested = ?config.backend, raw = raw_name, raw_quiet = quiet_name, framed = framed_name, kernel_tls = tls_name, in_flight_bytes = config.in_flight_bytes, "relay back-ends: {}", notes.join("; "));
        }
        Ok(relays)
    }

    /// For `stats`: the back-end per kind of session, how many consoles moved to it from
    /// `copy`, and, with sockmap, its map entries.
    pub fn view(&self) -> BackendsView {
        let (sockmap_flows, sockmap_sockets) = self.sockmap.as_ref().map_or((0, 0), Sockmap::entries);
        BackendsView {
            raw: self.raw,
            raw_quiet: self.raw_quiet,
            framed: self.framed,
            kernel_tls: self.kernel_tls,
            kernel_after_ms: self.hand_over.map_or(0, |h| h.after.as_millis() as u64),
            hand_overs: self.hand_overs.load(Ordering::Relaxed),
            sockmap_loaded: self.sockmap.is_some(),
            sockmap_flows,
            sockmap_sockets,
            sockmap_resumes: self.sockmap.as_ref().map_or(0, |s| s.resumes.load(Ordering::Relaxed)),
            sockmap_wakeups: self.sockmap.as_ref().map_or(0, Sockmap::wakeups),
            sockmap_watcher_turns: self.sockmap.as_ref().map_or(0, Sockmap::watcher_turns),
            kernel_tls_legs: self.kernel_tls_legs.load(Ordering::Relaxed),
            descriptor_waits: self.sockmap.as_ref().map_or(0, |s| s.descriptor_waits.load(Ordering::Relaxed))
                + self.uring.as_ref().map_or(0, Uring::descriptor_waits),
        }
    }

    /// Bytes the kernel has relayed from one socket (0 when it relays none).
    pub fn kernel_bytes(&self, cookie: u64) -> u64 {
        self.sockmap.as_ref().and_then(|s| s.flow(cookie)).map_or(0, |f| f.redirected)
    }

    /// Relays one session on the back-end its kind was given; resolves to how it ended
    /// and which back-end carried it. A console bound for a kernel back-end starts on
    /// `copy` and moves once it has lived `kernel_after_ms` and carries
    /// `kernel_min_bytes_per_sec` (or at once without them), so short and quiet ones never
    /// pay the hand-off. Boxed per back-end, so a live console holds the state
    /// of its own back-end only.
    pub fn run<V: Peer + 'static, H: Peer + 'static>(
        self: &Arc<Self>,
        mut pair: Established<V, H>,
        control: Control,
        limits: Limits,
    ) -> BoxFuture<'static, (Ended, Choice)> {
        if !matches!(self.ktls, Ktls::Available(_)) {
            return self.clone().relay(pair, control, limits);
        }
        let relays = self.clone();
        Box::pin(async move {
            // Boxed, like each back-end: a console's task keeps room only for the phase it
            // is in (one unboxed future reserved 5 KiB for every phase).
            let session = control.session;
            let moved = Box::pin(async {
                relays.tls_into_kernel(&mut pair.viewer.io, Side::Viewer, session).await?;
                relays.tls_into_kernel(&mut pair.hypervisor.io, Side::Hypervisor, session).await
            });
            let moved = tokio::select! {
                biased;
                reason = control.stopped() => Err(Ended::Stopped(reason)),
                moved = moved => moved,
            };
            if let Err(ended) = moved {
                return (ended, Choice::Copy);
            }
            // What rustls had decrypted goes out with the handshakes' leftovers.
            let pending = pair.viewer.io.take_kernel_pending();
            pair.viewer.prefix.extend(pending);
            let pending = pair.hypervisor.io.take_kernel_pending();
            pair.hypervisor.prefix.extend(pending);
            relays.relay(pair, control, limits).await
        })
    }

    /// Moves a leg's TLS, if any, into the kernel. A leg kTLS cannot take stays in
    /// rustls; a move that fails past the point of return ends the console.
    async fn tls_into_kernel<P: Peer>(&self, peer: &mut P, side: Side, session: u64) -> Result<(), Ended> {
        let Some(transport) = peer.transport_mut() else { return Ok(()) };
        let lost = |e| Ended::Failed(Failure::new(side, Op::HandOff, e));
        match tokio::time::timeout(TLS_MOVE_TIMEOUT, transport.enter_kernel(&self.ktls)).await {
            Ok(Ok(KernelMove::Moved)) => {
                self.kernel_tls_legs.fetch_add(1, Ordering::Relaxed);
                debug!(session, side = side.name(), "TLS moved into the kernel (kTLS)");
                Ok(())
            }
            Ok(Ok(KernelMove::Declined(why))) => {
                info!(session, side = side.name(), reason = %why, "TLS stays in userspace (rustls)");
                Ok(())
            }
            Ok(Ok(KernelMove::NotTls)) => Ok(()),
            Ok(Err(e)) => Err(lost(e)),
            Err(_) => Err(lost(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer left a TLS record unfinished"))),
        }
    }

    /// The console's future, boxed once: what it holds is built before it (see
    /// [`copy::pumps`]), so an idle console on `copy` costs its streams and pumps once.
    fn relay<V: Peer + 'static, H: Peer + 'static>(
        self: Arc<Self>,
        pair: Established<V, H>,
        mut control: Control,
        limits: Limits,
    ) -> BoxFuture<'static, (Ended, Choice)> {
        let raw = pair.viewer.io.is_plain_tcp() && pair.hypervisor.io.is_plain_tcp();
        // Raw either way, TLS on a side carried by the kernel: the ring can splice it;
        // sockmap cannot take a kTLS socket.
        let spliced = pair.viewer.io.is_kernel_stream() && pair.hypervisor.io.is_kernel_stream();
        let websocket = pair.viewer.io.is_plain_websocket() && pair.hypervisor.io.is_kernel_stream();
        let kernel = match (raw, spliced, websocket) {
            (true, _, _) if self.raw == Choice::Sockmap && self.sockmap.is_some() => Some(Choice::Sockmap),
            (true, _, _) if self.raw == Choice::Uring && self.uring.is_some() => Some(Choice::Uring),
            (false, true, _) if self.kernel_tls == Choice::Uring && self.uring.is_some() => Some(Choice::Uring),
            (_, _, true) if self.framed == Choice::Uring && self.uring.is_some() => Some(Choice::Uring),
            _ => None,
        };
        let Some(kernel) = kernel else {
            let mut pumps = copy::pumps(pair, &control, &limits, None);
            return Box::pin(async move { (copy::run_to_end(&mut pumps, &mut control, &limits).await, Choice::Copy) });
        };
        let Some(rule) = self.hand_over else {
            return Box::pin(self.on_kernel(kernel, pair, control, limits, spliced));
        };
        // Only a raw console may move as quiet, to a back-end of its own (`raw_quiet`).
        let mut pumps = copy::pumps(pair, &control, &limits, Some(copy::HandOver { quiet: raw && rule.quiet, ..rule }));
        Box::pin(async move {
            if let Some(ended) = copy::run(&mut pumps, &mut control, &limits).await {
                return (ended, Choice::Copy);
            }
            let (to, why) = match pumps.moving() {
                copy::Moving::Quiet => (self.raw_quiet, "quiet"),
                copy::Moving::Busy => (kernel, "busy"),
            };
            let (up, down) = control.shared.snapshot();
            debug!(session = control.session, to = to.name(), why, bytes_to_hypervisor = up, bytes_to_viewer = down, "console leaves copy");
            Box::pin(self.on_kernel(to, pumps.into_pair(), control, limits, spliced)).await
        })
    }

    async fn on_kernel<V: Peer, H: Peer>(
        self: Arc<Self>,
        kernel: Choice,
        pair: Established<V, H>,
        control: Control,
        limits: Limits,
        spliced: bool,
    ) -> (Ended, Choice) {
        // A move counts once the kernel back-end has the console.
        let moved = || {
            if self.hand_over.is_some() {
                self.hand_overs.fetch_add(1, Ordering::Relaxed);
            }
        };
        match kernel {
            Choice::Sockmap => self.on_sockmap(pair, control, limits, moved).await,
            _ => self.on_uring(pair, control, limits, spliced, moved).await,
        }
    }

    async fn on_uring<V: Peer, H: Peer>(
        &self,
        mut pair: Established<V, H>,
        mut control: Control,
        limits: Limits,
        spliced: bool,
        moved: impl FnOnce(),
    ) -> (Ended, Choice) {
        if let Err(ended) = send_leftovers(&mut pair, &mut control).await {
            return (ended, Choice::Uring);
        }
        let Established { viewer, hypervisor } = pair;
        let viewer = match spliced {
            true => viewer.io.into_kernel_stream().map(|(v, tls)| uring::Leg { tcp: v, kernel_tls: tls, framing: None }),
            false => viewer.io.into_websocket().map(|(v, tls, d)| uring::Leg { tcp: v, kernel_tls: tls, framing: Some(d) }),
        };
        let hypervisor = hypervisor.io.into_kernel_stream().map(|(h, tls)| uring::Leg { tcp: h, kernel_tls: tls, framing: None });
        let (Some(viewer), Some(hypervisor), Some(engine)) = (viewer, hypervisor, self.uring.as_ref()) else {
            unreachable!("checked by run")
        };
        moved();
        (uring::run(engine, viewer, hypervisor, &mut control, limits).await, Choice::Uring)
    }

    async fn on_sockmap<V: Peer, H: Peer>(
        &self,
        pair: Established<V, H>,
        mut control: Control,
        limits: Limits,
        moved: impl FnOnce(),
    ) -> (Ended, Choice) {
        let Established { viewer, hypervisor } = pair;
        let (Some(viewer), Some(hypervisor), Some(engine)) =
            (viewer.try_map(Peer::into_tcp), hypervisor.try_map(Peer::into_tcp), self.sockmap.as_ref())
        else {
            unreachable!("checked by run")
        };
        let pair = Established { viewer, hypervisor };
        match sockmap::run(engine, pair, &mut control, limits, moved).await {
            Ok(ended) => (ended, Choice::Sockmap),
            Err(refused) => {
                warn!(session = control.session, error = %refused.why, "sockmap refused the session; relaying it in userspace");
                let mut pumps = copy::pumps(refused.pair, &control, &limits, None);
                (Box::pin(copy::run_to_end(&mut pumps, &mut control, &limits)).await, Choice::Copy)
            }
        }
    }
}
