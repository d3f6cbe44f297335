//! Metrics: the counters every part of relay bumps, the histograms of how long things
//! take, and their Prometheus rendering, served on `[metrics] listen`.

pub mod counters;
mod encode;
pub mod serve;

pub use counters::{Counters, CountersView, LabelledView, bump};
pub use encode::{OPENMETRICS, PROMETHEUS, render};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// How long things take. Histograms keep their buckets themselves; `stats` does not
/// report them, only `/metrics` does.
#[derive(Debug, Clone)]
pub struct Timings {
    /// From the viewer's request to the console running: dial, both RFB handshakes and,
    /// when asked, the password typed.
    pub handshake: Histogram,
    /// How long consoles ran, once ended.
    pub console: Histogram,
    /// One look-up of a console token (store or other source).
    pub token_lookup: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            // 5 ms to ~20 s.
            handshake: Histogram::new(exponential_buckets(0.005, 2.0, 13)),
            // A second to a day.
            console: Histogram::new([1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0]),
            // 0.1 ms to ~1.6 s.
            token_lookup: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        }
    }
}
