//! relay-bench: relay's doors against a direct connection and against socat, HAProxy
//! and websockify, all in one run on this machine's loopback. `cargo xtask bench` runs it.
//!
//! Everything runs here: the viewers in this process; a fake RFB hypervisor (this binary
//! again) and the proxies as child processes, ended when the bench ends. See
//! docs/benchmarks.md.

mod client;
mod farm;
mod hv;
mod idle;
mod measure;
mod pacer;
mod procs;
mod report;
mod sources;
mod stores;

use anyhow::{Context, Result, bail};
use clap::Parser;
use client::{Door, Target};
use measure::Dir;
use procs::Proc;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Bytes;

#[derive(Debug, Parser)]
#[command(name = "relay-bench", about = "Benchmark relay against a direct connection, socat, HAProxy and websockify (loopback only)")]
pub struct Args {
    /// The relay binary (default: `relay` beside this program).
    #[arg(long)]
    relay: Option<PathBuf>,
    /// Bytes per direction for the one-connection runs (K, M, G suffixes are powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    bytes: u64,
    /// Bytes per direction for the multi-connection runs, over all connections (default: --bytes).
    #[arg(long, value_parser = parse_size)]
    bytes_multi: Option<u64>,
    /// Connections in the multi-connection runs.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Bytes per write, for the viewers and for the fake hypervisor (one WebSocket message each).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    chunk: u64,
    /// Time limit of one throughput run, in seconds: a slower path is measured on what
    /// it moved by then.
    #[arg(long, default_value_t = 5.0)]
    run_secs: f64,
    /// Ping-pong round trips per path.
    #[arg(long, default_value_t = 20_000)]
    pings: usize,
    /// Rounds of the throughput runs (each figure is the median).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Handshakes per path.
    #[arg(long, default_value_t = 3_000)]
    handshakes: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Idle-session counts at which to read the proxy's memory.
    #[arg(long, default_value = "2000,10000", value_delimiter = ',')]
    idle: Vec<usize>,
    /// Skip the idle-session memory runs.
    #[arg(long)]
    no_memory: bool,
    /// Only these paths (direct, connect, ws, socat, haproxy, websockify, `stores` for the
    /// store back-ends, `sources` for the token sources, `farm` for the console farm);
    /// direct always runs.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Consoles in the farm run (each sending a message at a steady rate that the
    /// hypervisor echoes).
    #[arg(long, default_value_t = 2000)]
    consoles: usize,
    /// Milliseconds between one farm console's messages.
    #[arg(long, default_value_t = 100)]
    farm_interval_ms: u64,
    /// The farm's consoles whose instants fall within this many microseconds send
    /// together: 1 sends each at its own instant, at the cost of a timer per message for
    /// the bench's pacer thread.
    #[arg(long, default_value_t = 250)]
    farm_slot_us: u64,
    /// Bytes per farm message.
    #[arg(long, default_value_t = 256)]
    farm_message: usize,
    /// Consoles in the "typing plus screen" farm (each message answered with a 4-64 KiB
    /// update; 0 skips it).
    #[arg(long, default_value_t = 500)]
    screen_consoles: usize,
    /// Milliseconds between one "typing plus screen" console's messages.
    #[arg(long, default_value_t = 200)]
    screen_interval_ms: u64,
    /// Seconds the farm is measured, per path.
    #[arg(long, default_value_t = 10.0)]
    farm_secs: f64,
    /// Rounds of the farm runs (each figure is the median round): more than --repeat,
    /// as a farm round's p99 varies more than a throughput run.
    #[arg(long, default_value_t = 5)]
    farm_rounds: usize,
    /// Only these farm paths (keys as in the farm's table: haproxy, connect-copy, connect-copy-1t,
    /// connect-auto, connect-sockmap, connect-uring, ws-copy, ws-uring); direct always runs.
    #[arg(long, value_delimiter = ',')]
    farm_paths: Vec<String>,
    /// Be only the fake hypervisor, on this port of 127.0.0.1, until killed (the bench
    /// starts its hypervisor so, in a process of its own).
    #[arg(long, hide = true)]
    serve_hypervisor: Option<u16>,
    /// Write the report (Markdown) to this file as well.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// A note to add to the report (repeatable).
    #[arg(long)]
    note: Vec<String>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {text:?}"))?;
    let mult = match unit.trim_end_matches(['i', 'B', 'b']).to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("unknown unit in {text:?}")),
    };
    Ok(n * mult)
}

/// The paths, in report order.
pub const PATHS: &[(&str, &str)] = &[
    ("direct", "direct (no proxy)"),
    ("connect", "relay CONNECT, copy"),
    ("connect-uring", "relay CONNECT, uring"),
    ("connect-sockmap", "relay CONNECT, sockmap"),
    ("connect-auto", "relay CONNECT, auto"),
    ("ws", "relay WebSocket, copy"),
    ("ws-uring", "relay WebSocket, uring"),
    ("socat", "socat (TCP, fork)"),
    ("haproxy", "HAProxy (mode tcp)"),
    ("websockify", "websockify (WebSocket)"),
];

/// What was measured on one path.
#[derive(Debug, Default)]
pub struct PathResult {
    pub key: &'static str,
    pub label: &'static str,
    pub skipped: Option<String>,
    pub error: Option<String>,
    /// Every round's rate of: up 1, down 1, up N, down N.
    pub throughput: [Vec<measure::Rate>; 4],
    /// Proxy CPU seconds over the throughput runs, and bytes those runs moved.
    pub cpu: Option<(f64, u64)>,
    /// The whole machine's busy CPU seconds over the same runs (viewers, fake hypervisor,
    /// proxy, and kernel work done outside any process, such as a sockmap's kworkers).
    pub machine_cpu: f64,
    pub latency: Option<measure::Latency>,
    /// The median round of handshakes (or one with failures), every round's rate, and
    /// the rounds until the median is picked.
    pub handshakes: Option<measure::Handshakes>,
    pub handshake_rounds: Vec<f64>,
    pub handshake_runs: Vec<measure::Handshakes>,
}

impl PathResult {
    /// Keeps the median round of handshakes, or the first with failures, so that they are
    /// not hidden behind clean rounds.
    fn pick_handshakes(&mut self) {
        let mut runs = std::mem::take(&mut self.handshake_runs);
        self.handshake_rounds = runs.iter().map(measure::Handshakes::per_sec).collect();
        if let Some(failed) = runs.iter().position(|h| h.failed > 0) {
            self.handshakes = Some(runs.swap_remove(failed));
        } else if !runs.is_empty() {
            runs.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
            self.handshakes = Some(runs.swap_remove((runs.len() - 1) / 2));
        }
    }

    /// The median round of a throughput run (the faster middle one for an even count).
    pub fn rate(&self, slot: usize) -> Option<measure::Rate> {
        let mut rates = self.throughput[slot].clone();
        rates.sort_by(|a, b| a.gb_per_sec().total_cmp(&b.gb_per_sec()));
        rates.get(rates.len() / 2).copied()
    }
}

#[derive(Debug)]
pub struct MemoryResult {
    pub label: &'static str,
    pub outcome: Result<measure::IdleMemory, String>,
}

pub struct Run {
    pub args: Args,
    pub paths: Vec<PathResult>,
    pub memory: Vec<MemoryResult>,
    pub notes: Vec<String>,
    pub nofile: u64,
    pub elapsed: Duration,
    /// CPU seconds that processes other than the bench and its children used meanwhile.
    pub others_cpu: f64,
    pub load_before: String,
    pub load_after: String,
    /// The store back-ends' openings per second and the fleet's reset fan-out.
    pub stores: Option<Result<stores::StoreRates, String>>,
    /// Openings per second through each token source.
    pub sources: Option<Result<sources::SourceRates, String>>,
    /// The console farm, per path.
    pub farm: Vec<(farm::Shape, Vec<farm::FarmResult>)>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.conns == 0 || args.chunk == 0 || args.inflight == 0 || args.pings == 0 || args.repeat == 0 || args.farm_rounds == 0 {
        bail!("--conns, --chunk, --inflight, --pings, --repeat and --farm-rounds must be at least 1");
    }
    // Before any thread or child: the proxies inherit the limit.
    let nofile = procs::raise_nofile(65_536);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(port) = args.serve_hypervisor {
        return runtime.block_on(async move {
            hv::serve_on(SocketAddr::from(([127, 0, 0, 1], port)), args.chunk as usize).await?;
            std::future::pending().await
        });
    }
    // The main future runs on this thread, so children are spawned from it and their
    // parent-death signal is tied to the process's main thread.
    runtime.block_on(async move {
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(45 * 60), bench(args, nofile)) => r.context("the bench took over 45 minutes")?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn bench(args: Args, nofile: u64) -> Result<()> {
    let started = Instant::now();
    let load_before = loadavg();
    let busy_before = procs::machine_busy_secs();
    let own_before = procs::tree_cpu_secs(std::process::id());
    let wanted = |key: &str| key == "direct" || args.only.is_empty() || args.only.iter().any(|o| o == key);
    let relay_bin = match &args.relay {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("bench binary has no directory")?.join("relay"),
    };
    if !relay_bin.is_file() {
        bail!("no relay binary at {} (build it: cargo build --release -p relay, or pass --relay)", relay_bin.display());
    }
    let dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());

    let chunk = args.chunk as usize;
    let (mut hv_proc, hv) = procs::start_hypervisor(&dir, args.chunk)?;
    procs::wait_listening(&mut hv_proc, hv).await?;
    let payload: Bytes = (0..chunk).map(|i| (i * 13 + 5) as u8).collect::<Vec<u8>>().into();
    eprintln!("relay-bench: fake hypervisor on {hv} (pid {}), descriptor limit {nofile}", hv_proc.pid());

    // Memory first, each proxy freshly started: relay once per door, in a process of
    // its own that serves nothing else.
    let mut notes = Vec::new();
    let mut memory = Vec::new();
    let steps = idle::steps(&args, nofile, &mut notes);
    if !steps.is_empty() {
        for (key, label) in [
            ("connect", "relay CONNECT, copy"),
            ("connect-uring", "relay CONNECT, uring"),
            ("connect-sockmap", "relay CONNECT, sockmap"),
            ("connect-auto", "relay CONNECT, auto"),
            ("ws", "relay WebSocket, copy"),
            ("ws-uring", "relay WebSocket, uring"),
        ] {
            if !wanted(key) {
                continue;
            }
            eprintln!("relay-bench: idle sessions through {label}: {steps:?}");
            let outcome = idle::relay_idle_memory(&relay_bin, &dir.join(format!("memory-{key}")), hv, key, &steps).await;
            if let Err(e) = &outcome {
                eprintln!("relay-bench: {label}: {e}");
            }
            memory.push(MemoryResult { label, outcome });
        }
    }

    let mut relay = procs::start_relay(&relay_bin, &dir, "copy")?;
    let token = relay.token(hv).await?;
    eprintln!("relay-bench: relay pid {} websocket={} connect={}", relay.proc.pid(), relay.ws, relay.connect);

    let mut paths: Vec<PathResult> = PATHS.iter().map(|&(key, label)| PathResult { key, label, ..Default::default() }).collect();
    // Each path: where the viewer goes, and the proxy process whose CPU is counted.
    let mut targets: Vec<Option<(Target, Option<u32>)>> = vec![None; PATHS.len()];
    let mut extra_procs: Vec<Proc> = Vec::new();
    // relay processes on the kernel back-ends, one per back-end.
    let mut kernel_relays: Vec<procs::Relay> = Vec::new();
    let mut haproxy: Option<(u32, Target)> = None;
    for (i, p) in paths.iter_mut().enumerate() {
        if !wanted(p.key) {
            p.skipped = Some("not selected (--only)".into());
            continue;
        }
        let target = match p.key {
            "direct" => Ok((Target { addr: hv, door: Door::Raw }, None)),
            "connect" => Ok((Target { addr: relay.connect, door: Door::Connect { token: token.clone() } }, Some(relay.proc.pid()))),
            "ws" => Ok((Target { addr: relay.ws, door: Door::Ws { token: Some(token.clone()) } }, Some(relay.proc.pid()))),
            kernel @ ("connect-sockmap" | "connect-uring" | "connect-auto" | "ws-uring") => {
                let backend = backend_of(kernel);
                let sub = dir.join(kernel);
                let started =
                    std::fs::create_dir_all(&sub).map_err(anyhow::Error::from).and_then(|()| procs::start_relay(&relay_bin, &sub, backend));
                match started {
                    Ok(other) => match other.token(hv).await {
                        Ok(t) => {
                            let target = if kernel.starts_with("ws") {
                                (Target { addr: other.ws, door: Door::Ws { token: Some(t) } }, Some(other.proc.pid()))
                            } else {
                                (Target { addr: other.connect, door: Door::Connect { token: t } }, Some(other.proc.pid()))
                            };
                            kernel_relays.push(other);
                            Ok(target)
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            key => {
                if procs::which(key).is_none() {
                    p.skipped = Some(format!("`{key}` not installed"));
                    eprintln!("relay-bench: SKIPPING {key}: not installed");
                    continue;
                }
                let started = match key {
                    "socat" => procs::start_socat(hv, &dir),
                    "haproxy" => procs::start_haproxy(hv, &dir, nofile),
                    _ => procs::start_websockify(hv, &dir),
                };
                match started {
                    Ok((mut proc, addr)) => match procs::wait_listening(&mut proc, addr).await {
                        Ok(()) => {
                            let door = if key == "websockify" { Door::Ws { token: None } } else { Door::Raw };
                            let pid = proc.pid();
                            extra_procs.push(proc);
                            if key == "haproxy" {
                                haproxy = Some((pid, Target { addr, door: door.clone() }));
                            }
                            Ok((Target { addr, door }, Some(pid)))
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        match target {
            Ok(t) => targets[i] = Some(t),
            Err(e) => {
                eprintln!("relay-bench: {} failed to start: {e:#}", p.key);
                p.error = Some(format!("{e:#}"));
            }
        }
    }

    // HAProxy, freshly started and not yet used.
    if let (false, Some((pid, target))) = (steps.is_empty(), &haproxy) {
        let label = "HAProxy (mode tcp)";
        eprintln!("relay-bench: idle sessions through {label}: {steps:?}");
        let outcome =
            measure::idle_memory(std::slice::from_ref(target), *pid, &steps, async || None, idle::CAP).await.map_err(|e| format!("{e:#}"));
        if let Err(e) = &outcome {
            eprintln!("relay-bench: {label}: {e}");
        }
        memory.push(MemoryResult { label, outcome });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let cap = Duration::from_secs_f64(args.run_secs);
    let bytes_multi = args.bytes_multi.unwrap_or(args.bytes);
    // Throughput in rounds over all paths, so a burst of other work on the machine
    // spreads over the paths instead of landing on one; each figure is the median.
    for round in 1..=args.repeat {
        eprintln!("relay-bench: throughput, round {round} of {}", args.repeat);
        for (p, target) in paths.iter_mut().zip(&targets) {
            let Some((target, pid)) = target else { continue };
            if p.error.is_some() {
                continue;
            }
            if let Err(e) = throughput_round(p, target, *pid, hv, &args, cap, bytes_multi, &payload).await {
                eprintln!("relay-bench: {}: {e:#}", p.key);
                p.error = Some(format!("{e:#}"));
            }
            relay.proc.check_alive()?;
            hv_proc.check_alive()?;
        }
    }
    // Handshakes in rounds over all paths too: one round of a fast path is a fraction of a
    // second, which a burst of other work can halve.
    for round in 1..=args.repeat {
        eprintln!("relay-bench: ping-pong and handshakes, round {round} of {}", args.repeat);
        for (p, target) in paths.iter_mut().zip(&targets) {
            let Some((target, _)) = target else { continue };
            if p.error.is_some() {
                continue;
            }
            if let Err(e) = latency_and_handshakes(p, target, &args, round == 1).await {
                eprintln!("relay-bench: {}: {e:#}", p.key);
                p.error = Some(format!("{e:#}"));
            }
            relay.proc.check_alive()?;
            hv_proc.check_alive()?;
        }
    }
    for p in &mut paths {
        p.pick_handshakes();
    }

    let stores = if args.only.is_empty() || args.only.iter().any(|o| o == "stores") {
        eprintln!("relay-bench: store back-ends (memory, local, redis) and the reset fan-out");
        let sub = dir.join("stores");
        std::fs::create_dir_all(&sub)?;
        let outcome = stores::run(&relay_bin, &sub, hv, args.handshakes, args.inflight, args.repeat).await;
        if let Err(e) = &outcome {
            eprintln!("relay-bench: stores: {e:#}");
        }
        Some(outcome.map_err(|e| format!("{e:#}")))
    } else {
        None
    };

    let sources = if args.only.is_empty() || args.only.iter().any(|o| o == "sources") {
        eprintln!("relay-bench: token sources (store, jwt, nova)");
        let sub = dir.join("sources");
        std::fs::create_dir_all(&sub)?;
        let outcome = sources::run(&relay_bin, &sub, hv, args.handshakes, args.inflight, args.repeat).await;
        if let Err(e) = &outcome {
            eprintln!("relay-bench: sources: {e:#}");
        }
        Some(outcome.map_err(|e| format!("{e:#}")))
    } else {
        None
    };

    let farm = if args.only.is_empty() || args.only.iter().any(|o| o == "farm") {
        let window = Duration::from_secs_f64(args.farm_secs);
        let typing = farm::Shape {
            mix: farm::Mix::Typing,
            consoles: args.consoles,
            interval: Duration::from_millis(args.farm_interval_ms.max(1)),
            message: args.farm_message.max(4),
            slot: Duration::from_micros(args.farm_slot_us),
            window,
        };
        let screen = farm::Shape {
            mix: farm::Mix::Screen,
            consoles: args.screen_consoles,
            interval: Duration::from_millis(args.screen_interval_ms.max(1)),
            ..typing
        };
        let mut runs = Vec::new();
        for shape in [typing, screen].into_iter().filter(|s| s.consoles > 0) {
            let sub = dir.join(format!("farm-{:?}", shape.mix).to_lowercase());
            std::fs::create_dir_all(&sub)?;
            runs.push((shape, farm::run(&relay_bin, &sub, hv, shape, nofile, args.farm_rounds, &args.farm_paths).await));
        }
        runs
    } else {
        Vec::new()
    };

    let elapsed = started.elapsed();
    let others = procs::machine_busy_secs() - busy_before - (procs::tree_cpu_secs(std::process::id()) - own_before);
    let run = Run {
        args,
        paths,
        memory,
        notes,
        nofile,
        elapsed,
        others_cpu: others.max(0.0),
        load_before,
        load_after: loadavg(),
        stores,
        sources,
        farm,
    };
    let text = report::markdown(&run, &relay_bin);
    println!("{text}");
    if let Some(doc) = &run.args.doc {
        std::fs::write(doc, &text).with_context(|| format!("writing {}", doc.display()))?;
        eprintln!("relay-bench: wrote {}", doc.display());
    }
    drop(extra_procs);
    drop(kernel_relays);
    drop(relay);
    Ok(())
}

/// The relay back-end a path runs on: `connect-uring` and `ws-uring` on uring, and so on.
pub(crate) fn backend_of(path: &str) -> &str {
    path.strip_prefix("connect-").or_else(|| path.strip_prefix("ws-")).unwrap_or("copy")
}

/// One round of the four throughput runs on one path; the proxy's CPU time over them
/// is added to the path's total.
#[allow(clippy::too_many_arguments)]
async fn throughput_round(
    p: &mut PathResult,
    target: &Target,
    pid: Option<u32>,
    hv: SocketAddr,
    args: &Args,
    cap: Duration,
    bytes_multi: u64,
    payload: &Bytes,
) -> Result<()> {
    let cpu_before = pid.map(procs::tree_cpu_secs);
    let machine_before = procs::machine_busy_secs();
    let runs =
        [(Dir::Up, 1, args.bytes), (Dir::Down, 1, args.bytes), (Dir::Up, args.conns, bytes_multi), (Dir::Down, args.conns, bytes_multi)];
    let mut moved = 0;
    for (slot, (dir, conns, bytes)) in runs.into_iter().enumerate() {
        let rate = measure::throughput(target, hv, dir, conns, bytes, cap, payload)
            .await
            .with_context(|| format!("throughput {dir:?} x{conns}"))?;
        eprintln!(
            "relay-bench:   {}: {dir:?} x{conns}: {:.3} GB/s ({} MB in {:.2} s{})",
            p.key,
            rate.gb_per_sec(),
            rate.bytes / 1_000_000,
            rate.secs,
            if rate.capped { ", time limit" } else { "" }
        );
        moved += rate.bytes;
        p.throughput[slot].push(rate);
    }
    p.machine_cpu += procs::machine_busy_secs() - machine_before;
    if let (Some(pid), Some(before)) = (pid, cpu_before) {
        let (cpu, bytes) = p.cpu.unwrap_or_default();
        p.cpu = Some((cpu + procs::tree_cpu_secs(pid) - before, bytes + moved));
    }
    Ok(())
}

/// Ping-pong (in the first round only: its 20,000 round trips are one long sample) and a
/// round of handshakes.
async fn latency_and_handshakes(p: &mut PathResult, target: &Target, args: &Args, ping: bool) -> Result<()> {
    if ping {
        let lat = measure::latency(target, args.pings, Duration::from_secs(15)).await.context("latency")?;
        eprintln!("relay-bench:   {}: ping-pong p50 {:.1} µs p99 {:.1} µs ({} round trips)", p.key, lat.p50_us, lat.p99_us, lat.count);
        p.latency = Some(lat);
    }
    let hs = measure::handshakes(target, args.handshakes, args.inflight, Duration::from_secs(10)).await.context("handshakes")?;
    eprintln!("relay-bench:   {}: handshakes {:.0}/s ({} ok, {} failed in {:.2} s)", p.key, hs.per_sec(), hs.ok, hs.failed, hs.secs);
    p.handshake_runs.push(hs);
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
