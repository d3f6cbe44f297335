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
        LogFormat::Text => builder.fmt_fields(text_fields()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The text log's fields, with every control character escaped: a value from outside (a
/// hypervisor's failure reason, a header, an error) cannot break a line or plant a forged
/// one. (The JSON log escapes them by itself.)
pub fn text_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt as _;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let raw = format!("{value:?}");
        let text = escape_controls(&raw);
        if field.name() == "message" { write!(w, "{text}") } else { write!(w, "{field}={text}") }
    })
    .delimited(" ")
}

/// `text` with each control character written as an escape (`\n`, `\u{1b}`).
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect::<String>().into()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_value_from_outside_cannot_forge_a_log_line() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt().fmt_fields(text_fields()).with_ansi(false).with_writer(move || writer.clone()).finish();
        let reason = "refused\n2026-01-01T00:00:00Z INFO relay::audit: event=\"session_start\" instance=victim";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: AUDIT, event = "hypervisor_failed", error = %reason, "the hypervisor said\r{}", "\u{1b}[2J");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("error=refused\\n2026"), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text}");
    }
}
