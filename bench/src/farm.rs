//! The console farm: many consoles at once, each sending a small message at a steady
//! rate (keystrokes and pointer moves), with random phases, that the hypervisor echoes
//! (`Mix::Typing`) or answers with a screen update of 4 to 64 KiB (`Mix::Screen`).
//! Per path: round-trip percentiles, the rate achieved against the rate offered, and the
//! CPU of the proxy and of the whole machine (kernel work outside any process included:
//! softirqs, kworkers) while the farm runs.

use crate::client::{Buffers, Conn, Door, Target};
use crate::hv;
use crate::measure::command;
use crate::pacer;
use crate::procs::{self, Proc};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Bytes;

/// How long the consoles run before the window, past their first interval: relay's `auto`
/// moves a console that keeps carrying a little at its second real look, 2 s after it opened
/// (`kernel_after_ms`, then as long again), so the window sees every console where it stays.
pub const SETTLE: Duration = Duration::from_secs(4);

/// The paths of the farm, in report order: (key, label, relay back-end or a peer).
pub const PATHS: [(&str, &str); 9] = [
    ("direct", "direct (no proxy)"),
    ("haproxy", "HAProxy (mode tcp)"),
    ("connect-copy", "relay CONNECT, copy"),
    ("connect-copy-1t", "relay CONNECT, copy, worker_threads = 1"),
    ("connect-auto", "relay CONNECT, auto"),
    ("connect-sockmap", "relay CONNECT, sockmap"),
    ("connect-uring", "relay CONNECT, uring"),
    ("ws-copy", "relay WebSocket, copy"),
    ("ws-uring", "relay WebSocket, uring"),
];

/// What the hypervisor answers each message with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// The message itself.
    Typing,
    /// A framebuffer update of 4 to 64 KiB.
    Screen,
}

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub mix: Mix,
    pub consoles: usize,
    /// Between one console's messages.
    pub interval: Duration,
    pub message: usize,
    /// How close together consoles' messages are sent at once, at most (see [`pacer`]).
    pub slot: Duration,
    /// The measured window, after a warm-up of one interval plus [`SETTLE`].
    pub window: Duration,
}

/// What one round of one path measured, for comparisons within a round.
#[derive(Debug, Clone, Copy)]
pub struct RoundFigures {
    pub round: usize,
    pub p99_us: f64,
    pub machine_cores: f64,
}

#[derive(Debug, Clone, Default)]
pub struct FarmResult {
    pub key: &'static str,
    pub label: &'static str,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Round trips per second completed in the window, and offered.
    pub achieved: f64,
    pub offered: f64,
    /// Cores busy on average in the window: the proxy's process tree, and the machine.
    pub proxy_cores: f64,
    pub machine_cores: f64,
    /// Each round's own figures (the others are the rounds' medians); a round that failed
    /// is missing, so they are matched to other paths' by round number.
    pub rounds: Vec<RoundFigures>,
    /// Which round this is, for one round's result.
    pub round: usize,
    pub error: Option<String>,
}

impl FarmResult {
    /// This path's rounds paired with `other`'s of the same number (a round that failed on
    /// either is left out).
    pub fn paired<'a>(&'a self, other: &'a FarmResult) -> impl Iterator<Item = (&'a RoundFigures, &'a RoundFigures)> {
        self.rounds.iter().filter_map(|f| other.rounds.iter().find(|g| g.round == f.round).map(|g| (f, g)))
    }

    /// Each round's p99 over `base`'s in the same round.
    pub fn p99_ratios(&self, base: &FarmResult) -> Vec<f64> {
        self.paired(base).filter(|(_, b)| b.p99_us > 0.0).map(|(f, b)| f.p99_us / b.p99_us).collect()
    }

    /// Each round's machine cores over `direct`'s in the same round, by round number.
    pub fn over_direct(&self, direct: &FarmResult) -> Vec<(usize, f64)> {
        self.paired(direct).map(|(f, d)| (f.round, f.machine_cores - d.machine_cores)).collect()
    }

    /// Each round's machine cost over `direct`'s, over `base`'s cost over direct's, all
    /// three in the same round.
    pub fn cost_ratios(&self, base: &FarmResult, direct: &FarmResult) -> Vec<f64> {
        let base_over = base.over_direct(direct);
        self.over_direct(direct)
            .into_iter()
            .filter_map(|(round, over)| {
                let (_, b) = base_over.iter().find(|(r, _)| *r == round)?;
                (*b > 0.0).then(|| over / b)
            })
            .collect()
    }
}

/// Runs the farm through every path, one after another, each on a proxy started for it,
/// in `rounds` rounds over all paths (a burst of other work then spreads over the paths);
/// each figure is the median round's. `only` (when not empty) names the paths to measure
/// besides direct.
pub async fn run(
    relay_bin: &Path,
    dir: &Path,
    hv: SocketAddr,
    shape: Shape,
    nofile: u64,
    rounds: usize,
    only: &[String],
) -> Vec<FarmResult> {
    let wanted = |key: &str| key == "direct" || only.is_empty() || only.iter().any(|o| o == key);
    let mut measured: Vec<Vec<FarmResult>> = vec![Vec::new(); PATHS.len()];
    let mut errors: Vec<Option<String>> =
        PATHS.iter().map(|(key, _)| (!wanted(key)).then(|| "not selected (--farm-paths)".to_string())).collect();
    for round in 1..=rounds {
        for (i, (key, label)) in PATHS.into_iter().enumerate() {
            if !wanted(key) {
                continue;
            }
            eprintln!("relay-bench: farm of {} consoles through {label}, round {round} of {rounds}", shape.consoles);
            let sub = dir.join(format!("farm-{key}-{round}"));
            let outcome = match std::fs::create_dir_all(&sub) {
                Ok(()) => one_path(relay_bin, &sub, hv, key, shape, nofile).await,
                Err(e) => Err(e.into()),
            };
            match outcome {
                Ok(r) => measured[i].push(FarmResult { round, ..r }),
                Err(e) => {
                    eprintln!("relay-bench: farm through {label}: {e:#}");
                    errors[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    PATHS
        .into_iter()
        .zip(measured)
        .zip(errors)
        .map(|(((key, label), rounds), error)| match median_of(&rounds) {
            Some(r) => FarmResult { key, label, ..r },
            None => FarmResult { key, label, error, ..Default::default() },
        })
        .collect()
}

/// Every figure's median over the rounds.
fn median_of(rounds: &[FarmResult]) -> Option<FarmResult> {
    if rounds.is_empty() {
        return None;
    }
    let m = |f: fn(&FarmResult) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Some(FarmResult {
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        achieved: m(|r| r.achieved),
        offered: m(|r| r.offered),
        proxy_cores: m(|r| r.proxy_cores),
        machine_cores: m(|r| r.machine_cores),
        rounds: rounds.iter().map(|r| RoundFigures { round: r.round, p99_us: r.p99_us, machine_cores: r.machine_cores }).collect(),
        ..Default::default()
    })
}

async fn one_path(relay_bin: &Path, dir: &Path, hv: SocketAddr, key: &str, shape: Shape, nofile: u64) -> Result<FarmResult> {
    // The proxy (None: direct), kept alive for the run.
    let mut relay = None;
    let mut peer: Option<Proc> = None;
    let (target, pid) = match key {
        "direct" => (Target { addr: hv, door: Door::Raw }, None),
        "haproxy" => {
            let (mut proc, addr) = procs::start_haproxy(hv, dir, nofile)?;
            procs::wait_listening(&mut proc, addr).await?;
            let pid = proc.pid();
            peer = Some(proc);
            (Target { addr, door: Door::Raw }, Some(pid))
        }
        _ => {
            let (door, backend) = key.split_once('-').context("a relay path")?;
            // `-1t`: relay's tasks on one thread, which a farm of quiet consoles favours.
            let (backend, extra) = match backend.strip_suffix("-1t") {
                Some(backend) => (backend, "worker_threads = 1\n"),
                None => (backend, ""),
            };
            let r = procs::start_relay_tuned(relay_bin, dir, backend, extra)?;
            let token = r.token(hv).await?;
            let target = match door {
                "ws" => Target { addr: r.ws, door: Door::Ws { token: Some(token) } },
                _ => Target { addr: r.connect, door: Door::Connect { token } },
            };
            let pid = r.proc.pid();
            relay = Some(r);
            (target, Some(pid))
        }
    };
    let result = farm(&target, pid, shape).await;
    drop((relay, peer));
    result
}

/// Opens the consoles, lets them run, and measures the window.
async fn farm(target: &Target, pid: Option<u32>, shape: Shape) -> Result<FarmResult> {
    let conns = open_all(target, shape).await?;
    let warm_up = shape.interval + SETTLE;
    let start = Instant::now();
    let measure_from = start + warm_up;
    let end = measure_from + shape.window;
    let message: Bytes = (0..shape.message).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>().into();
    // Spread evenly over the interval, in a scrambled order: random phases without two
    // consoles on the same instant.
    let firsts: Vec<Instant> =
        (0..conns.len()).map(|i| start + shape.interval.mul_f64(((i * 7919) % shape.consoles) as f64 / shape.consoles as f64)).collect();
    let schedule = pacer::Schedule {
        firsts: firsts.iter().map(|f| f.into_std()).collect(),
        every: shape.interval,
        end: end.into_std(),
        slot: shape.slot,
    };
    let wakers = pacer::start(schedule).context("starting the farm's pacer")?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ((conn, first), tick)) in conns.into_iter().zip(firsts).zip(wakers).enumerate() {
        let ticks = Ticks { first, every: shape.interval, from: measure_from, end, tick };
        tasks.spawn(console(conn, message.clone(), shape.mix, i, ticks));
    }
    // CPU over the window only.
    tokio::time::sleep_until(measure_from).await;
    let (machine0, proxy0) = (procs::machine_busy_secs(), pid.map_or(0.0, procs::tree_cpu_secs));
    tokio::time::sleep_until(end).await;
    let (machine1, proxy1) = (procs::machine_busy_secs(), pid.map_or(0.0, procs::tree_cpu_secs));
    let mut samples: Vec<u32> = Vec::with_capacity(shape.consoles * 64);
    // Every console stays open until the last one's round trips are in: consoles closing
    // would put a teardown wave (thousands of ends within one interval) into the last
    // round trips' times, which are the steady state's.
    let mut open = Vec::with_capacity(shape.consoles);
    while let Some(done) = tasks.join_next().await {
        let (conn, console_samples) = done.context("a console task")??;
        samples.extend(console_samples);
        open.push(conn);
    }
    drop(open);
    if samples.is_empty() {
        bail!("no round trip completed in the window");
    }
    samples.sort_unstable();
    let pick = |per_mille: usize| samples[(samples.len() * per_mille / 1000).min(samples.len() - 1)] as f64;
    let secs = shape.window.as_secs_f64();
    Ok(FarmResult {
        p50_us: pick(500),
        p99_us: pick(990),
        p999_us: pick(999),
        achieved: samples.len() as f64 / secs,
        offered: shape.consoles as f64 / shape.interval.as_secs_f64(),
        proxy_cores: (proxy1 - proxy0) / secs,
        machine_cores: (machine1 - machine0) / secs,
        ..Default::default()
    })
}

async fn open_all(target: &Target, shape: Shape) -> Result<Vec<Conn>> {
    let n = shape.consoles;
    let command = match shape.mix {
        Mix::Typing => command(hv::MODE_ECHO, 0),
        Mix::Screen => command(hv::MODE_UPDATES, shape.message as u64),
    };
    let target = Arc::new(target.clone());
    let mut conns = Vec::with_capacity(n);
    // A few dozen handshakes at a time, as a farm's viewers arrive.
    for batch in (0..n).collect::<Vec<_>>().chunks(64) {
        let mut opening = tokio::task::JoinSet::new();
        for _ in batch {
            let target = target.clone();
            opening.spawn(async move {
                let mut conn = target.open(Buffers::Small).await?;
                conn.write_all(&command).await?;
                anyhow::Ok(conn)
            });
        }
        while let Some(conn) = opening.join_next().await {
            conns.push(conn??);
        }
    }
    Ok(conns)
}

/// When one console sends: from `first` every `every`; measured from `from` until `end`.
/// `tick` wakes it at each of its instants (see [`pacer`]).
struct Ticks {
    first: Instant,
    every: Duration,
    from: Instant,
    end: Instant,
    tick: Arc<Notify>,
}

/// One console: a message at each tick, its answer awaited; the round trips that start
/// in the measured window are returned, in microseconds, with the console, still open. A
/// console that falls behind skips ticks rather than bursting to catch up, as a person at
/// a keyboard would.
async fn console(mut conn: Conn, message: Bytes, mix: Mix, index: usize, ticks: Ticks) -> Result<(Conn, Vec<u32>)> {
    let Ticks { first, every, from, end, tick } = ticks;
    let mut samples = Vec::new();
    let mut back = vec![0u8; message.len().max(if mix == Mix::Screen { hv::MAX_UPDATE } else { 0 })];
    let mut next = first;
    let mut n = index;
    while next < end {
        // A wake-up before `next` is the one stored for a tick this console missed.
        tick.notified().await;
        if Instant::now() < next {
            continue;
        }
        // A screen update's size, 4 to 64 KiB, scrambled per console and message.
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let (message, answer) = match mix {
            Mix::Typing => (message.clone(), message.len()),
            Mix::Screen => {
                let size = (4 << 10) + (n >> 33) % ((hv::MAX_UPDATE - (4 << 10)) + 1);
                let mut m = message.to_vec();
                m[..4].copy_from_slice(&(size as u32).to_be_bytes());
                (Bytes::from(m), size)
            }
        };
        let sent = Instant::now();
        conn.send(&message).await?;
        conn.read_exact(&mut back[..answer]).await?;
        if sent >= from {
            samples.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        next += every;
        let now = Instant::now();
        while next < now {
            next += every;
        }
    }
    if mix == Mix::Typing && back != message {
        bail!("an echo came back changed");
    }
    Ok((conn, samples))
}

#[cfg(test)]
mod tests {
    use super::{FarmResult, RoundFigures};

    fn path(rounds: &[(usize, f64, f64)]) -> FarmResult {
        let rounds = rounds.iter().map(|&(round, p99_us, machine_cores)| RoundFigures { round, p99_us, machine_cores }).collect();
        FarmResult { rounds, ..Default::default() }
    }

    #[test]
    fn ratios_to_haproxy_pair_rounds_by_number_and_skip_failed_ones() {
        let direct = path(&[(1, 100.0, 1.0), (2, 100.0, 2.0), (3, 100.0, 1.0)]);
        let haproxy = path(&[(1, 1000.0, 1.5), (2, 1000.0, 2.5), (3, 2000.0, 1.5)]);
        // Round 2 failed on this path: round 3 is compared with round 3, not round 2.
        let relay = path(&[(1, 500.0, 1.4), (3, 1000.0, 1.2)]);
        assert_eq!(relay.p99_ratios(&haproxy), vec![0.5, 0.5]);
        let cost = relay.cost_ratios(&haproxy, &direct);
        assert_eq!(cost.len(), 2);
        assert!((cost[0] - 0.8).abs() < 1e-9 && (cost[1] - 0.4).abs() < 1e-9, "{cost:?}");
        // A round where HAProxy cost nothing over direct gives no ratio.
        let flat = path(&[(1, 1000.0, 1.0)]);
        assert!(relay.cost_ratios(&flat, &direct).is_empty());
    }
}
