//! Logs and audit events.
//!
//! Audit events go to the `relay::audit` target, one per session start, viewer
//! authentication result, refusal and session end, with structured fields.

use crate::config::{Log, LogFormat};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

pub const AUDIT: &str = "relay::audit";

/// The log filter in force, when the configuration set it (RUST_LOG, when set, rules
/// instead and is not reloaded).
static FILTER: std::sync::OnceLock<reload::Handle<EnvFilter, Registry>> = std::sync::OnceLock::new();

pub fn init(log: &Log) {
    use std::io::IsTerminal as _;
    let from_env = EnvFilter::try_from_default_env().ok();
    let configured = from_env.is_none();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(&log.filter)));
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(crate::logsink::LineWriter);
    let logs = tracing_subscriber::registry().with(filter);
    let installed = match log.format {
        LogFormat::Text => logs.with(fmt.fmt_fields(text_fields())).try_init(),
        LogFormat::Json => logs.with(fmt.json().flatten_event(true)).try_init(),
    };
    if installed.is_ok() && configured {
        let _ = FILTER.set(handle);
    }
}

/// What became of a new log filter.
#[derive(Debug, PartialEq, Eq)]
pub enum FilterChange {
    Applied,
    /// RUST_LOG (or a test's subscriber) decides the filter; the file's is not used.
    NotOurs,
}

/// Puts a new log filter in force; an invalid one is an error and changes nothing.
pub fn set_filter(filter: &str) -> Result<FilterChange, String> {
    let parsed = EnvFilter::try_new(filter).map_err(|e| format!("log.filter: {e}"))?;
    let Some(handle) = FILTER.get() else { return Ok(FilterChange::NotOurs) };
    handle.reload(parsed).map_err(|e| format!("log.filter: {e}"))?;
    Ok(FilterChange::Applied)
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
