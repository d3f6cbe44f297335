//! Logs, audit events and counters.
//!
//! Audit events go to the `relay::audit` target, one per session start, viewer
//! authentication result, refusal and session end, with structured fields.

use crate::config::{Log, LogFormat};
use crate::relay::lifecycle::Cause;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing_subscriber::EnvFilter;

pub const AUDIT: &str = "relay::audit";

pub fn init(log: &Log) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Process-wide counters, exported through the control socket's `stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub web_requests: AtomicU64,
    pub sessions_started: AtomicU64,
    pub sessions_ended: AtomicU64,
    pub viewer_auth_failures: AtomicU64,
    pub hypervisor_failures: AtomicU64,
    pub token_rejections: AtomicU64,
    pub bytes_to_hypervisor: AtomicU64,
    pub bytes_to_viewer: AtomicU64,
    /// Consoles ended, by cause (indexed as [`Cause::ALL`]).
    ended: [AtomicU64; Cause::ALL.len()],
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountersView {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub web_requests: u64,
    pub sessions_started: u64,
    pub sessions_ended: u64,
    pub viewer_auth_failures: u64,
    pub hypervisor_failures: u64,
    pub token_rejections: u64,
    pub bytes_to_hypervisor: u64,
    pub bytes_to_viewer: u64,
}

pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counts a console's end under its cause.
    pub fn ended(&self, cause: Cause) {
        if let Some(i) = Cause::ALL.iter().position(|c| *c == cause) {
            bump(&self.ended[i]);
        }
    }

    /// Consoles ended so far, by cause; every cause is listed, zero or not.
    pub fn ended_view(&self) -> BTreeMap<Cause, u64> {
        Cause::ALL.iter().zip(&self.ended).map(|(cause, n)| (*cause, n.load(Ordering::Relaxed))).collect()
    }

    pub fn view(&self) -> CountersView {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersView {
            connections_accepted: g(&self.connections_accepted),
            connections_refused: g(&self.connections_refused),
            web_requests: g(&self.web_requests),
            sessions_started: g(&self.sessions_started),
            sessions_ended: g(&self.sessions_ended),
            viewer_auth_failures: g(&self.viewer_auth_failures),
            hypervisor_failures: g(&self.hypervisor_failures),
            token_rejections: g(&self.token_rejections),
            bytes_to_hypervisor: g(&self.bytes_to_hypervisor),
            bytes_to_viewer: g(&self.bytes_to_viewer),
        }
    }
}
