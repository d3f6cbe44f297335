//! The idle-session runs: how many consoles to open, and relay's resident memory with
//! them open.

use crate::client::{Door, Target};
use crate::{Args, measure, procs};
use std::time::Duration;

/// How long opening every idle console may take.
pub const CAP: Duration = Duration::from_secs(120);

/// The idle-session counts to measure at. Each relayed session holds two descriptors in
/// the proxy (and two in this process: viewer and fake hypervisor), so the descriptor
/// limit caps the count.
pub fn steps(args: &Args, nofile: u64, notes: &mut Vec<String>) -> Vec<usize> {
    if args.no_memory {
        return Vec::new();
    }
    // relay keeps 256 descriptors aside and answers 503 past what the rest hold
    // (relay/src/rlimit.rs): the largest step stays inside that.
    let most = (nofile.saturating_sub(256) / 2 / 100 * 100) as usize;
    let mut steps: Vec<usize> = args.idle.iter().map(|&n| n.min(most)).filter(|&n| n > 0).collect();
    steps.sort_unstable();
    steps.dedup();
    if let Some(&asked) = args.idle.iter().max()
        && asked > most
    {
        notes.push(format!(
            "{asked} idle sessions were asked for, but the descriptor limit here is {nofile} and could not be raised \
             (RLIMIT_NOFILE's hard limit needs CAP_SYS_RESOURCE), and a relayed session holds two descriptors in the \
             proxy: the largest step is {most}."
        ));
    }
    steps
}

/// Idle-session memory of a relay process started for this alone.
pub async fn relay_idle_memory(
    relay_bin: &std::path::Path,
    dir: &std::path::Path,
    hv: std::net::SocketAddr,
    door: &str,
    steps: &[usize],
) -> Result<measure::IdleMemory, String> {
    let go = async {
        std::fs::create_dir_all(dir)?;
        let backend = crate::backend_of(door);
        let relay = procs::start_relay(relay_bin, dir, backend)?;
        // A console per instance (UUID-shaped names, as nova's), as in a region: what relay
        // keeps per instance counts.
        let most = steps.iter().copied().max().unwrap_or(0);
        let mut targets = Vec::with_capacity(most);
        for i in 0..most {
            let token = relay.token_for(&format!("{i:08}-0000-4000-8000-000000000000"), hv).await?;
            targets.push(match door {
                door if door.starts_with("connect") => Target { addr: relay.connect, door: Door::Connect { token } },
                _ => Target { addr: relay.ws, door: Door::Ws { token: Some(token) } },
            });
        }
        let live = async || relay.sessions_active().await.ok();
        measure::idle_memory(&targets, relay.proc.pid(), steps, live, CAP).await
    };
    go.await.map_err(|e: anyhow::Error| format!("{e:#}"))
}
