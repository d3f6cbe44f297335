//! Logs and audit events.
//!
//! Audit events go to the `relay::audit` target, one per session start, viewer
//! authentication result, refusal and session end, with structured fields.

use crate::config::{Log, LogFormat};
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
