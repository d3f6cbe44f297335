//! The measurements: throughput, ping-pong latency, handshake rate, idle-session memory.

use crate::client::{Buffers, Conn, Door, Target};
use crate::hv;
use crate::procs;
use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Bytes;

pub(crate) fn command(mode: u8, count: u64) -> [u8; 9] {
    let mut c = [mode; 9];
    c[1..].copy_from_slice(&count.to_be_bytes());
    c
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Viewer to hypervisor.
    Up,
    /// Hypervisor to viewer.
    Down,
}

#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub bytes: u64,
    pub secs: f64,
    /// The run hit its time limit before moving everything: `bytes` is what arrived.
    pub capped: bool,
}

impl Rate {
    pub fn gb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
}

/// Moves `total` bytes in one direction over `conns` connections at once. Time runs
/// from when every connection has finished its handshake to when the last byte is in
/// (for up: the hypervisor's acknowledgement of the last byte is back at the viewer).
pub async fn throughput(
    target: &Target,
    hv: SocketAddr,
    dir: Dir,
    conns: usize,
    total: u64,
    cap: Duration,
    payload: &Bytes,
) -> Result<Rate> {
    let per = (total / conns as u64).max(1);
    let opened = futures_util::future::try_join_all((0..conns).map(|_| target.open(Buffers::Bulk))).await?;
    let received = Arc::new(AtomicU64::new(0));
    let sunk_before = if dir == Dir::Up { hv_sunk(hv).await? } else { 0 };
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for mut conn in opened {
        let payload = payload.clone();
        let received = received.clone();
        tasks.spawn(async move {
            match dir {
                Dir::Up => {
                    conn.write_all(&command(hv::MODE_SINK, per)).await?;
                    let mut left = per;
                    while left > 0 {
                        let n = (left as usize).min(payload.len());
                        if n == payload.len() {
                            conn.send(&payload).await?
                        } else {
                            conn.send(&payload.slice(..n)).await?
                        }
                        left -= n as u64;
                    }
                    let mut ack = [0u8; 1];
                    conn.read_exact(&mut ack).await?;
                }
                Dir::Down => {
                    conn.write_all(&command(hv::MODE_SOURCE, per)).await?;
                    let mut scratch = vec![0u8; 256 * 1024];
                    let mut left = per;
                    while left > 0 {
                        let n = conn.discard(&mut scratch).await?;
                        if n == 0 {
                            bail!("connection closed with {left} bytes still to come");
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                        left = left.saturating_sub(n as u64);
                    }
                }
            }
            Ok(())
        });
    }
    let deadline = tokio::time::Instant::from_std(start + cap);
    let mut capped = false;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(joined)) => joined.context("throughput task")??,
            Ok(None) => break,
            Err(_) => {
                capped = true;
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = match dir {
        Dir::Up => hv_sunk(hv).await? - sunk_before,
        Dir::Down => received.load(Ordering::Relaxed),
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(Rate { bytes, secs, capped })
}

/// The bytes the hypervisor at `hv` has received in sink mode, ever.
async fn hv_sunk(hv: SocketAddr) -> Result<u64> {
    let mut conn = Target { addr: hv, door: Door::Raw }.open(Buffers::Small).await.context("asking the hypervisor its count")?;
    conn.write_all(&command(hv::MODE_COUNT, 0)).await?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count).await?;
    Ok(u64::from_be_bytes(count))
}

#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub count: usize,
    pub capped: bool,
}

pub const PING_BYTES: usize = 8;

/// Round trips of an 8-byte message through the echo mode, one at a time.
pub async fn latency(target: &Target, pings: usize, cap: Duration) -> Result<Latency> {
    let mut conn = target.open(Buffers::Bulk).await?;
    conn.write_all(&command(hv::MODE_ECHO, 0)).await?;
    let msg = Bytes::from_static(b"pingpong");
    let mut back = [0u8; PING_BYTES];
    for _ in 0..pings.min(200) {
        conn.send(&msg).await?;
        conn.read_exact(&mut back).await?;
    }
    let mut samples = Vec::with_capacity(pings);
    let start = Instant::now();
    let mut capped = false;
    for _ in 0..pings {
        let t = Instant::now();
        conn.send(&msg).await?;
        conn.read_exact(&mut back).await?;
        samples.push(t.elapsed());
        if start.elapsed() > cap {
            capped = true;
            break;
        }
    }
    if back != *msg {
        bail!("echo came back as {back:?}");
    }
    samples.sort_unstable();
    let pick = |pct: usize| samples[(samples.len() * pct / 100).min(samples.len() - 1)].as_secs_f64() * 1e6;
    Ok(Latency { p50_us: pick(50), p99_us: pick(99), count: samples.len(), capped })
}

#[derive(Clone, Debug)]
pub struct Handshakes {
    pub ok: u64,
    pub failed: u64,
    pub secs: f64,
    pub capped: bool,
    pub first_error: Option<String>,
}

impl Handshakes {
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

/// Full console openings (TCP connect, door, RFB through ServerInit, close), `inflight`
/// at a time, until `total` are done or `cap` has passed.
pub async fn handshakes(target: &Target, total: usize, inflight: usize, cap: Duration) -> Result<Handshakes> {
    let tickets = Arc::new(AtomicI64::new(total as i64));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + cap;
    let mut workers = JoinSet::new();
    for _ in 0..inflight {
        let (target, tickets, ok, failed, first_error) = (target.clone(), tickets.clone(), ok.clone(), failed.clone(), first_error.clone());
        workers.spawn(async move {
            while tickets.fetch_sub(1, Ordering::Relaxed) > 0 && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(10), target.open(Buffers::Small)).await {
                    Ok(Ok(conn)) => {
                        drop(conn);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    outcome => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let message = match outcome {
                            Ok(Err(e)) => format!("{e:#}"),
                            _ => "no ServerInit within 10 s".to_string(),
                        };
                        first_error.lock().expect("not poisoned").get_or_insert(message);
                    }
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64();
    let capped = tickets.load(Ordering::Relaxed) > 0;
    let first_error = first_error.lock().expect("not poisoned").take();
    Ok(Handshakes { ok: ok.load(Ordering::Relaxed), failed: failed.load(Ordering::Relaxed), secs, capped, first_error })
}

#[derive(Clone, Debug)]
pub struct IdlePoint {
    pub sessions: usize,
    pub rss: u64,
    /// The proxy's own count of live consoles, where it tells (relay's `stats`).
    pub live: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct IdleMemory {
    pub baseline: u64,
    pub points: Vec<IdlePoint>,
}

/// Opens idle consoles up to each step and reads the proxy's resident memory.
pub async fn idle_memory(
    targets: &[Target],
    pid: u32,
    steps: &[usize],
    live: impl AsyncFn() -> Option<u64>,
    cap: Duration,
) -> Result<IdleMemory> {
    let start = Instant::now();
    // One console first, so one-time set-up is in the baseline.
    drop(targets[0].open(Buffers::Small).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = procs::rss_bytes(pid)?;
    let mut conns: Vec<Conn> = Vec::new();
    let mut points = Vec::new();
    for &step in steps {
        let more = step.saturating_sub(conns.len());
        let first = conns.len();
        let mut opening =
            futures_util::stream::iter(first..first + more).map(|i| targets[i % targets.len()].open(Buffers::Small)).buffer_unordered(64);
        while let Some(conn) = opening.next().await {
            conns.push(conn.with_context(|| format!("opening idle console {}", conns.len() + 1))?);
            if start.elapsed() > cap {
                bail!("opening {step} idle consoles took more than {} s", cap.as_secs());
            }
        }
        drop(opening);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let point = IdlePoint { sessions: conns.len(), rss: procs::rss_bytes(pid)?, live: live().await };
        eprintln!("relay-bench:   {} idle consoles: resident {} KiB", point.sessions, point.rss >> 10);
        points.push(point);
    }
    drop(conns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(IdleMemory { baseline, points })
}

/// Console openings through each of several relays, in rounds over them in turn (so that
/// a burst of other work spreads over all): per entry, the openings per second of each
/// round, and the CPU milliseconds per opening of its relay and of `server` (a process
/// they share: Redis, MariaDB).
pub struct OpeningRounds {
    pub rates: Vec<(&'static str, Vec<f64>)>,
    pub cpu_ms: Vec<(&'static str, f64, f64)>,
}

/// `relays`: a name, the target to open, and the relay's pid.
pub async fn opening_rounds(
    what: &str,
    relays: &[(&'static str, Target, u32)],
    server: u32,
    handshakes_each: usize,
    inflight: usize,
    rounds: usize,
) -> Result<OpeningRounds> {
    let mut rates: Vec<(&'static str, Vec<f64>)> = relays.iter().map(|(name, _, _)| (*name, Vec::new())).collect();
    let mut cpu = vec![(0.0f64, 0.0f64, 0u64); relays.len()];
    for round in 1..=rounds {
        for (i, (name, target, pid)) in relays.iter().enumerate() {
            let before = (procs::tree_cpu_secs(*pid), procs::tree_cpu_secs(server));
            let hs = handshakes(target, handshakes_each, inflight, Duration::from_secs(20)).await?;
            cpu[i].0 += procs::tree_cpu_secs(*pid) - before.0;
            cpu[i].1 += procs::tree_cpu_secs(server) - before.1;
            cpu[i].2 += hs.ok;
            if hs.failed > 0 {
                bail!("{what} {name}: {} of {} openings failed: {:?}", hs.failed, hs.ok + hs.failed, hs.first_error);
            }
            eprintln!("relay-bench:   {what} {name}, round {round}: {:.0} openings/s", hs.per_sec());
            rates[i].1.push(hs.per_sec());
        }
    }
    let cpu_ms = relays
        .iter()
        .zip(cpu)
        .map(|((name, _, _), (relay, server, n))| {
            let per = |secs: f64| if n > 0 { secs * 1e3 / n as f64 } else { 0.0 };
            (*name, per(relay), per(server))
        })
        .collect();
    Ok(OpeningRounds { rates, cpu_ms })
}
