//! The store back-ends: console openings per second with the `local` and `redis` stores
//! beside `memory`, in the same run, and how long a reset takes to end an instance's
//! consoles spread over three appliances sharing Redis.

use crate::client::{Buffers, Door, Target};
use crate::measure;
use crate::procs::{self, Proc, Relay};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The stores compared, in the order they are reported.
pub const STORES: [&str; 3] = ["memory", "local", "redis"];

pub struct StoreRates {
    /// Per store: the openings per second of each round.
    pub rates: Vec<(&'static str, Vec<f64>)>,
    /// Per store: CPU milliseconds per opening of relay's process, and of redis-server
    /// (for `redis`), over all rounds.
    pub cpu_ms: Vec<(&'static str, f64, f64)>,
    /// The time from a reset's request to the end of the last of its consoles, per trial.
    pub fanout: Result<Vec<Duration>, String>,
    pub consoles_per_reset: usize,
}

/// Consoles of the reset instance on each of the three appliances.
const CONSOLES_EACH: usize = 2;
const FANOUT_TRIALS: usize = 50;

pub async fn run(relay_bin: &Path, dir: &Path, hv: SocketAddr, handshakes: usize, inflight: usize, rounds: usize) -> Result<StoreRates> {
    if procs::which("redis-server").is_none() {
        bail!("redis-server is not installed (apt install redis-server)");
    }
    let (redis, url) = start_redis(dir).await?;
    let key = dir.join("secret.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&key)?;
        std::io::Write::write_all(&mut f, b"bench-key-0123456789abcdef0123456789abcdef\n")?;
    }
    let redis_store = |name: &str| {
        format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\nsecret_key_file = \"{}\"\nappliance_name = \"{name}\"\n", key.display())
    };
    let mut relays: Vec<(&'static str, Relay)> = Vec::new();
    for store in STORES {
        let sub = dir.join(format!("store-{store}"));
        std::fs::create_dir_all(&sub)?;
        let section = match store {
            "memory" => "[store]\nbackend = \"memory\"\n".to_string(),
            "local" => format!("[store]\nbackend = \"local\"\npath = \"{}\"\n", sub.join("relay.db").display()),
            _ => redis_store("bench-a"),
        };
        relays.push((store, procs::start_relay_with(relay_bin, &sub, "copy", &section)?));
    }
    let mut targets = Vec::new();
    for (store, relay) in &relays {
        let token = relay.token(hv).await.with_context(|| format!("token on the {store} store"))?;
        targets.push((*store, Target { addr: relay.connect, door: Door::Connect { token } }, relay.proc.pid()));
    }
    let measured = measure::opening_rounds("store", &targets, redis.pid(), handshakes, inflight, rounds).await?;

    // Two more appliances on the same Redis for the fan-out.
    let mut fleet = vec![relays.pop().expect("the redis relay").1];
    for name in ["bench-b", "bench-c"] {
        let sub = dir.join(format!("store-{name}"));
        std::fs::create_dir_all(&sub)?;
        fleet.push(procs::start_relay_with(relay_bin, &sub, "copy", &redis_store(name))?);
    }
    let fanout = fanout(&fleet, hv).await.map_err(|e| format!("{e:#}"));
    drop(fleet);
    drop(relays);
    drop(redis);
    Ok(StoreRates { rates: measured.rates, cpu_ms: measured.cpu_ms, fanout, consoles_per_reset: CONSOLES_EACH * 3 })
}

async fn start_redis(dir: &Path) -> Result<(Proc, String)> {
    let port = procs::free_port()?;
    let data = dir.join("redis");
    std::fs::create_dir_all(&data)?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"])
        .args(["--protected-mode", "no", "--loglevel", "warning", "--dir"])
        .arg(&data);
    let mut proc = Proc::spawn("redis-server", &mut cmd, dir)?;
    procs::wait_listening(&mut proc, ([127, 0, 0, 1], port).into()).await?;
    Ok((proc, format!("redis://127.0.0.1:{port}/0")))
}

/// Resets issued on the third appliance while the instance has consoles on all three;
/// each trial's time runs from the request to the end of the last console.
async fn fanout(fleet: &[Relay], hv: SocketAddr) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    for trial in 0..FANOUT_TRIALS {
        let instance = format!("fan-{trial}");
        let reply = fleet[0]
            .control(
                serde_json::json!({"v": 1, "op": "token_create", "instance": instance, "host": hv.ip().to_string(), "port": hv.port()}),
            )
            .await?;
        let token = reply["token"].as_str().context("token")?.to_string();
        let mut consoles = Vec::new();
        for relay in fleet {
            let target = Target { addr: relay.connect, door: Door::Connect { token: token.clone() } };
            for _ in 0..CONSOLES_EACH {
                consoles.push(target.open(Buffers::Small).await?);
            }
        }
        let asked = Instant::now();
        let ends = consoles.into_iter().map(|mut c| async move {
            let mut buf = [0u8; 4096];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Ok(asked.elapsed()),
                    Ok(Ok(_)) => continue,
                    Err(_) => bail!("a console outlived its reset by 10 s"),
                }
            }
        });
        let reset = fleet[2].control(serde_json::json!({"v": 1, "op": "instance_reset", "instance": instance}));
        let (reset, ended) = tokio::join!(reset, futures_util::future::join_all(ends));
        let told = reset?;
        if told["fleet"]["status"] != "told" {
            bail!("the reset did not reach the fleet: {told}");
        }
        let mut last = Duration::ZERO;
        for end in ended {
            last = last.max(end?);
        }
        times.push(last);
    }
    Ok(times)
}
