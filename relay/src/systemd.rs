//! Telling systemd how relay is doing (`Type=notify`): READY once every listener is up,
//! STOPPING when shutdown begins, and WATCHDOG pings at half the unit's `WatchdogSec=`
//! while the runtime turns. Without `NOTIFY_SOCKET` (not under systemd) all of it is a
//! no-op.

use sd_notify::NotifyState;
use std::time::Duration;

/// Every listener is up: systemd may start what is ordered after relay.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown has begun (consoles are draining or ending).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping: ending live consoles")]);
}

/// Pings the watchdog at half its period, from a task on the runtime: a runtime that
/// stops turning stops the pings, and systemd restarts relay.
pub fn spawn_watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let every = (period / 2).max(Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    });
}
