//! Process-wide counters: the one record both the control socket's `stats` and the
//! Prometheus endpoint read, so the two never disagree.

use crate::auth::TokenRejection;
use crate::front::Door;
use crate::relay::lifecycle::Cause;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The unlabelled counts are atomics; the others are kept once, by label, and their
/// totals (consoles started and ended, bytes, refusals) are sums of them.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub web_requests: AtomicU64,
    pub viewer_auth_failures: AtomicU64,
    /// Wrong passwords that locked an instance or a source out.
    pub lockouts: AtomicU64,
    pub hypervisor_failures: AtomicU64,
    /// Consoles refused because a store or token source did not answer.
    pub store_errors: AtomicU64,
    /// The labelled counts. Their keys come from small closed sets (doors, back-ends,
    /// causes, refusal kinds), so the maps stay a few dozen entries at most.
    labelled: Mutex<Labelled>,
}

#[derive(Debug, Default)]
struct Labelled {
    started: BTreeMap<Door, u64>,
    ended: BTreeMap<(Door, &'static str, Cause), Ended>,
    refused: BTreeMap<&'static str, u64>,
    rejected: BTreeMap<TokenRejection, u64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ended {
    consoles: u64,
    bytes_to_hypervisor: u64,
    bytes_to_viewer: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountersView {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub web_requests: u64,
    pub sessions_started: u64,
    pub sessions_ended: u64,
    pub viewer_auth_failures: u64,
    #[serde(default)]
    pub lockouts: u64,
    pub hypervisor_failures: u64,
    pub token_rejections: u64,
    #[serde(default)]
    pub store_errors: u64,
    pub bytes_to_hypervisor: u64,
    pub bytes_to_viewer: u64,
    /// Log lines dropped because the log's reader fell behind (`logsink`).
    #[serde(default)]
    pub log_lines_dropped: u64,
}

/// The counts by label, as `stats` reports them and `/metrics` labels them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabelledView {
    /// Consoles started, by front door.
    pub started: BTreeMap<Door, u64>,
    /// Ended consoles by door, back-end and cause, with the bytes they moved.
    pub ended: Vec<EndedTally>,
    /// Connections refused, by kind (`bad_request`, `forbidden`, `unavailable`, ...).
    pub refused: BTreeMap<String, u64>,
    /// Tokens refused, by why.
    pub token_rejected: BTreeMap<TokenRejection, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndedTally {
    pub door: Door,
    pub relay: String,
    pub cause: Cause,
    pub consoles: u64,
    pub bytes_to_hypervisor: u64,
    pub bytes_to_viewer: u64,
}

pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn labelled(&self) -> std::sync::MutexGuard<'_, Labelled> {
        // Counting cannot leave the maps half-updated: a poisoned lock is still sound.
        self.labelled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn started(&self, door: Door) {
        *self.labelled().started.entry(door).or_default() += 1;
    }

    /// Counts a console's end: its cause, the back-end it ran on, the bytes it moved.
    pub fn ended(&self, door: Door, relay: &'static str, cause: Cause, (up, down): (u64, u64)) {
        let mut labelled = self.labelled();
        let tally = labelled.ended.entry((door, relay, cause)).or_default();
        tally.consoles += 1;
        tally.bytes_to_hypervisor += up;
        tally.bytes_to_viewer += down;
    }

    /// Counts a refused connection under the kind of its answer.
    pub fn refused(&self, kind: &'static str) {
        *self.labelled().refused.entry(kind).or_default() += 1;
    }

    /// Counts a refused connection by its HTTP status.
    pub fn refused_status(&self, status: u16) {
        self.refused(refusal_kind(status));
    }

    pub fn token_rejected(&self, why: TokenRejection) {
        *self.labelled().rejected.entry(why).or_default() += 1;
    }

    /// Consoles ended so far, by cause; every cause is listed, zero or not.
    pub fn ended_view(&self) -> BTreeMap<Cause, u64> {
        let mut by_cause: BTreeMap<Cause, u64> = Cause::ALL.iter().map(|c| (*c, 0)).collect();
        for ((_, _, cause), t) in &self.labelled().ended {
            *by_cause.entry(*cause).or_default() += t.consoles;
        }
        by_cause
    }

    pub fn labelled_view(&self) -> LabelledView {
        let l = self.labelled();
        LabelledView {
            started: l.started.clone(),
            ended: l
                .ended
                .iter()
                .map(|(&(door, relay, cause), t)| EndedTally {
                    door,
                    relay: relay.to_string(),
                    cause,
                    consoles: t.consoles,
                    bytes_to_hypervisor: t.bytes_to_hypervisor,
                    bytes_to_viewer: t.bytes_to_viewer,
                })
                .collect(),
            refused: l.refused.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            token_rejected: l.rejected.clone(),
        }
    }

    pub fn view(&self) -> CountersView {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let l = self.labelled();
        let ended = l.ended.values();
        CountersView {
            connections_accepted: g(&self.connections_accepted),
            connections_refused: l.refused.values().sum(),
            web_requests: g(&self.web_requests),
            sessions_started: l.started.values().sum(),
            sessions_ended: ended.clone().map(|t| t.consoles).sum(),
            viewer_auth_failures: g(&self.viewer_auth_failures),
            lockouts: g(&self.lockouts),
            hypervisor_failures: g(&self.hypervisor_failures),
            token_rejections: l.rejected.values().sum(),
            store_errors: g(&self.store_errors),
            bytes_to_hypervisor: ended.clone().map(|t| t.bytes_to_hypervisor).sum(),
            bytes_to_viewer: ended.map(|t| t.bytes_to_viewer).sum(),
            log_lines_dropped: crate::logsink::dropped_lines(),
        }
    }
}

/// The refusal kind an HTTP status stands for.
fn refusal_kind(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        426 => "upgrade_required",
        431 => "headers_too_large",
        502 => "bad_gateway",
        503 => "unavailable",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counts_add_up_to_the_totals() {
        let c = Counters::default();
        c.started(Door::WebSocket);
        c.started(Door::Connect);
        c.ended(Door::WebSocket, "copy", Cause::ViewerClosed, (10, 200));
        c.ended(Door::WebSocket, "copy", Cause::ViewerClosed, (1, 2));
        c.ended(Door::Connect, "sockmap", Cause::Idle, (5, 0));
        c.refused_status(403);
        c.refused("busy");
        c.token_rejected(TokenRejection::Expired);
        let (v, l) = (c.view(), c.labelled_view());
        assert_eq!((v.sessions_started, v.sessions_ended, v.connections_refused, v.token_rejections), (2, 3, 2, 1));
        assert_eq!((v.bytes_to_hypervisor, v.bytes_to_viewer), (16, 202));
        assert_eq!(l.ended.len(), 2);
        let ws = &l.ended[0];
        assert_eq!(
            (ws.door, ws.relay.as_str(), ws.cause, ws.consoles, ws.bytes_to_viewer),
            (Door::WebSocket, "copy", Cause::ViewerClosed, 2, 202)
        );
        assert_eq!(l.refused.get("forbidden"), Some(&1));
        assert_eq!(l.token_rejected.get(&TokenRejection::Expired), Some(&1));
        assert_eq!(c.ended_view()[&Cause::Idle], 1);
    }
}
