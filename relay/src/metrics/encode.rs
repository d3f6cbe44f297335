//! `stats` as Prometheus metrics. The numbers are read from the same [`Stats`] the
//! control socket returns, taken once per scrape.

use super::Timings;
use crate::control::replies::Stats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// The content types of the two formats served.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics as text: OpenMetrics when `openmetrics`, else Prometheus' text format.
pub fn render(stats: Stats, timings: &Timings, openmetrics: bool) -> String {
    let mut registry = Registry::with_prefix("relay");
    registry.register_collector(Box::new(Snapshot(stats)));
    let t = timings.clone();
    registry.register_with_unit("handshake_duration", "From a viewer's console request to its console running", Unit::Seconds, t.handshake);
    registry.register_with_unit("console_duration", "How long ended consoles ran", Unit::Seconds, t.console);
    registry.register_with_unit("token_lookup_duration", "Console token look-ups, any source", Unit::Seconds, t.token_lookup);
    let mut out = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    // Writing to a String cannot fail; a metric that could not be encoded is a bug.
    debug_assert!(encoded.is_ok());
    out
}

#[derive(Debug)]
struct Snapshot(Stats);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family: one series per label set.
fn counters<const N: usize>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = ([(&'static str, String); N], u64)>,
) -> std::fmt::Result {
    let kind = ConstCounter::new(0u64).metric_type();
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let (c, l) = (&s.counters, &s.labelled);
        counter(&mut e, "connections_accepted", "TCP connections accepted, both doors", c.connections_accepted)?;
        counter(&mut e, "web_requests", "Web client and other plain HTTP requests served", c.web_requests)?;
        counter(&mut e, "log_lines_dropped", "Log lines dropped because the log's reader fell behind", c.log_lines_dropped)?;
        counters(&mut e, "refused", "Connections refused, by kind", l.refused.iter().map(|(k, n)| ([("reason", k.clone())], *n)))?;
        counters(
            &mut e,
            "token_rejections",
            "Console tokens refused, by why",
            l.token_rejected.iter().map(|(k, n)| ([("reason", name(k))], *n)),
        )?;
        counters(
            &mut e,
            "consoles_started",
            "Consoles started, by front door",
            l.started.iter().map(|(d, n)| ([("door", d.to_string())], *n)),
        )?;
        let ended = l
            .ended
            .iter()
            .map(|t| ([("door", t.door.to_string()), ("relay", t.relay.clone()), ("cause", t.cause.name().to_string())], t.consoles));
        counters(&mut e, "consoles_ended", "Consoles ended, by door, back-end and cause", ended)?;
        let bytes = l.ended.iter().flat_map(|t| {
            let labels = |direction: &str| [("door", t.door.to_string()), ("relay", t.relay.clone()), ("direction", direction.to_string())];
            [(labels("to_hypervisor"), t.bytes_to_hypervisor), (labels("to_viewer"), t.bytes_to_viewer)]
        });
        // Several causes share a door and back-end: sum them into one series each.
        let mut summed = std::collections::BTreeMap::new();
        for (labels, n) in bytes {
            *summed.entry(labels).or_insert(0u64) += n;
        }
        counters(&mut e, "console_bytes", "Bytes ended consoles moved, by door, back-end and direction", summed)?;
        {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut family = e.encode_descriptor("consoles_live", "Consoles running now, by front door", None, kind)?;
            for (door, n) in &s.live_by_door {
                ConstGauge::new(*n as i64).encode(family.encode_family(&[("door", door.to_string())])?)?;
            }
        }
        gauge(
            &mut e,
            "live_bytes_to_hypervisor",
            "Bytes the running consoles have moved to hypervisors",
            s.live_bytes_to_hypervisor as i64,
        )?;
        gauge(&mut e, "live_bytes_to_viewer", "Bytes the running consoles have moved to viewers", s.live_bytes_to_viewer as i64)?;
        counter(&mut e, "viewer_auth_failures", "Console password attempts that failed or were locked out", c.viewer_auth_failures)?;
        counter(&mut e, "lockouts", "Wrong passwords that locked an instance or address out", c.lockouts)?;
        counter(&mut e, "hypervisor_failures", "Consoles that failed on the hypervisor side (dial, RFB, TLS)", c.hypervisor_failures)?;
        counter(&mut e, "store_errors", "Consoles refused because a store or token source did not answer", c.store_errors)?;
        counter(&mut e, "kernel_hand_overs", "Consoles moved from the userspace relay to a kernel back-end", s.relay.hand_overs)?;
        counter(&mut e, "kernel_tls_legs", "TLS connections whose records the kernel took over (kTLS)", s.relay.kernel_tls_legs)?;
        counter(
            &mut e,
            "kernel_descriptor_waits",
            "Times a kernel back-end's console found no descriptor free (a pipe, a duplicate to wait on) and waited",
            s.relay.descriptor_waits,
        )?;
        gauge(&mut e, "sockmap_flows", "Consoles spliced in the kernel now", s.relay.sockmap_flows as i64)?;
        counter(
            &mut e,
            "sockmap_resumes",
            "Sockmap directions handed back to the kernel after falling back to userspace",
            s.relay.sockmap_resumes,
        )?;
        counter(
            &mut e,
            "sockmap_wakeups",
            "Times a sockmap console's userspace side was woken (an end, an error, bytes passed back)",
            s.relay.sockmap_wakeups,
        )?;
        gauge(&mut e, "tokens", "Console tokens in the store", s.tokens as i64)?;
        Ok(())
    }
}
