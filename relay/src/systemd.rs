//! Telling systemd how relay is doing (`Type=notify`): READY once every listener is up,
//! STOPPING when shutdown begins, and WATCHDOG pings at half the unit's `WatchdogSec=`
//! while the runtime turns; and the listening sockets of socket activation. Without
//! `NOTIFY_SOCKET` and `LISTEN_FDS` (not under systemd) all of it is a no-op.

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

/// Listening sockets systemd passed (socket activation, `relay.socket`), by the name its
/// `FileDescriptorName=` gives each: `websocket`, `connect` or `metrics`.
#[derive(Debug, Default)]
pub struct Activated {
    pub websocket: Vec<std::net::TcpListener>,
    pub connect: Vec<std::net::TcpListener>,
    pub metrics: Option<std::net::TcpListener>,
}

/// The sockets systemd passed to this process, if any. A socket that is not a listening
/// TCP socket, or whose name is none of the doors', is an error: relay would otherwise
/// leave a port open that nobody serves.
pub fn activated() -> anyhow::Result<Activated> {
    use anyhow::bail;
    let mut out = Activated::default();
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        let socket = owned_socket(fd);
        let listening = socket.r#type().ok() == Some(socket2::Type::STREAM)
            && socket.local_addr().ok().and_then(|a| a.as_socket()).is_some()
            && socket.is_listener().unwrap_or(false);
        if !listening {
            bail!("socket activation: descriptor {fd} ({name}) is not a listening TCP socket");
        }
        socket.set_nonblocking(true)?;
        let listener = std::net::TcpListener::from(socket);
        match name.as_str() {
            "websocket" => out.websocket.push(listener),
            "connect" => out.connect.push(listener),
            "metrics" if out.metrics.is_none() => out.metrics = Some(listener),
            other => bail!(
                "socket activation: a socket named {other:?}; name each one websocket, connect or metrics (FileDescriptorName= in relay.socket)"
            ),
        }
    }
    Ok(out)
}

/// Takes ownership of a descriptor systemd passed.
#[allow(unsafe_code)]
fn owned_socket(fd: std::os::fd::RawFd) -> socket2::Socket {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `listen_fds_with_names` yields each descriptor systemd passed to this very
    // process (LISTEN_PID matched) once; nothing else in relay opens or owns descriptors
    // 3..3+LISTEN_FDS before start-up reads them here, and this is called once.
    unsafe { socket2::Socket::from_raw_fd(fd) }
}
