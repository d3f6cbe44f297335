//! Listeners, the connection limit, housekeeping, and graceful shutdown.

use crate::app::{App, unix_now};
use crate::config::{Addrs, Config};
use crate::conn::{self, Listener};
use crate::control;
use crate::reload::Loader;
use crate::reserve::{Reserve, out_of_descriptors};
use crate::telemetry::AUDIT;
use crate::tls::kernel::Ktls;
use anyhow::Context as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Where a running relay listens (the real ports when the config asked for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    /// The first address of each door (the others are in `config.listen`).
    pub websocket: Option<SocketAddr>,
    pub connect: Option<SocketAddr>,
    pub all: Vec<(Listener, SocketAddr)>,
    pub control: PathBuf,
    /// `/metrics` and the health probes, when on.
    pub metrics: Option<SocketAddr>,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Each door's first address first: `websocket=` and `connect=` name it.
        let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        write!(f, "websocket={} connect={}", show(self.websocket), show(self.connect))?;
        for (kind, addr) in &self.all {
            if Some(*addr) != self.websocket && Some(*addr) != self.connect {
                let name = if *kind == Listener::WebSocket { "websocket" } else { "connect" };
                write!(f, " {name}={addr}")?;
            }
        }
        write!(f, " control={}", self.control.display())?;
        match self.metrics {
            Some(a) => write!(f, " metrics={a}"),
            None => Ok(()),
        }
    }
}

/// What the process brings to [`run`] besides the configuration.
#[derive(Default)]
pub struct Start {
    /// Reads the configuration again on SIGHUP.
    pub reload: Option<Loader>,
    /// Listening sockets systemd passed: they replace the configured addresses of their
    /// door.
    pub activated: crate::systemd::Activated,
}

/// Runs relay until `shutdown` completes, then drains. `on_bound` learns the addresses
/// once every listener is up.
pub async fn run(
    mut config: Config,
    start: Start,
    on_bound: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let loaded = config.clone();
    let Start { reload, activated } = start;
    let ws = listeners(&config.listen.websocket, activated.websocket, "websocket").await?;
    let connect = listeners(&config.listen.connect, activated.connect, "connect").await?;
    // Access URLs name the real ports.
    config.listen.websocket = Addrs(ws.iter().map(TcpListener::local_addr).collect::<Result<_, _>>()?);
    config.listen.connect = Addrs(connect.iter().map(TcpListener::local_addr).collect::<Result<_, _>>()?);
    let metrics = match (activated.metrics, config.metrics.listen) {
        (Some(passed), _) => Some(TcpListener::from_std(passed)?),
        (None, Some(a)) => Some(TcpListener::bind(a).await.with_context(|| format!("metrics listener: cannot listen on {a}"))?),
        (None, None) => None,
    };
    let control_path = config.control_path();
    let control_listener =
        control::server::bind(&control_path).await.with_context(|| format!("control socket {}", control_path.display()))?;
    let app = App::new(config)?;
    let listen = &app.config().listen;
    let all = listen
        .websocket
        .0
        .iter()
        .map(|a| (Listener::WebSocket, *a))
        .chain(listen.connect.0.iter().map(|a| (Listener::Connect, *a)))
        .collect();
    let bound = Bound {
        websocket: listen.websocket.first(),
        connect: listen.connect.first(),
        all,
        control: control_path.clone(),
        metrics: metrics.as_ref().map(TcpListener::local_addr).transpose()?,
    };
    info!(%bound, web = ?app.config().listen.web, "relay listening");
    match (&app.ktls, app.front_tls.is_some() || app.hypervisor_tls().is_some()) {
        (Ktls::Available(offered), _) => {
            info!(offered = %offered.describe(), "kTLS: TLS consoles move into the kernel after their handshakes")
        }
        (Ktls::Unavailable(why), true) => info!(reason = %why, "kTLS: unavailable; TLS stays in userspace (rustls)"),
        (Ktls::Unavailable(why), false) => debug!(reason = %why, "kTLS: unavailable"),
    }
    if app.front_tls.is_some() {
        info!(ssl_only = app.config().tls.ssl_only, "front doors accept TLS (https, wss, CONNECT over TLS)");
    }
    on_bound(&bound);

    let max = app.config().limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let mut tasks = JoinSet::new();
    let listeners = ws.into_iter().map(|l| (l, Listener::WebSocket)).chain(connect.into_iter().map(|l| (l, Listener::Connect)));
    for (listener, kind) in listeners {
        tasks.spawn(accept_loop(app.clone(), listener, kind, permits.clone()));
    }
    tasks.spawn(control::server::serve(app.clone(), control_listener, control_path.clone()));
    if let Some(listener) = metrics {
        tasks.spawn(crate::metrics::serve::serve(app.clone(), listener));
    }
    tasks.spawn(housekeeping(app.clone()));
    tasks.spawn(end_at_token_expiry(app.clone()));
    tasks.spawn(app.fleet.clone().background());
    tasks.spawn(reload_on_sighup(app.clone(), reload, loaded));

    shutdown.await;
    app.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    let drain = Duration::from_secs(app.config().limits.drain_secs);
    if !drain.is_zero() {
        info!(drain_secs = drain.as_secs(), "draining: /readyz answers 503 and new consoles are refused; live consoles go on");
        tokio::time::sleep(drain).await;
    }
    info!("shutting down: no new connections; ending live consoles");
    tasks.abort_all();
    let ended = app.sessions.disconnect_all("relay shutting down");
    let grace = Duration::from_secs(app.config().limits.shutdown_grace_secs);
    // Consoles get the grace period to close both sides cleanly; connections still in
    // a request or handshake are simply dropped with the runtime.
    let drained = tokio::time::timeout(grace, async {
        while !app.sessions.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(grace_secs = grace.as_secs(), live = app.sessions.len(), "consoles still open at the end of the grace period");
    }
    let _ = std::fs::remove_file(&control_path);
    info!(sessions_ended = ended, "relay stopped");
    Ok(())
}

/// A door's listeners: the sockets systemd passed for it, if any, else its addresses bound.
async fn listeners(addrs: &Addrs, passed: Vec<std::net::TcpListener>, door: &str) -> anyhow::Result<Vec<TcpListener>> {
    if passed.is_empty() {
        return bind(addrs).await.with_context(|| format!("{door} listener"));
    }
    let adopted = passed.into_iter().map(TcpListener::from_std).collect::<Result<Vec<_>, _>>()?;
    for l in &adopted {
        info!(door, address = %l.local_addr()?, "socket activation: serving a socket systemd passed");
    }
    Ok(adopted)
}

/// Binds every address of a door. An IPv6 wildcard listens for IPv6 only, so that
/// `["0.0.0.0:6080", "[::]:6080"]` works as written.
async fn bind(addrs: &Addrs) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for &a in &addrs.0 {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
        socket.set_reuseaddr(true)?;
        if a.is_ipv6() {
            socket2::SockRef::from(&socket).set_only_v6(true)?;
        }
        socket.bind(a).with_context(|| format!("cannot listen on {a}"))?;
        listeners.push(socket.listen(1024).with_context(|| format!("cannot listen on {a}"))?);
    }
    Ok(listeners)
}

/// How many refusals may be under way at once; past it a connection over the limit is
/// closed unanswered (each refusal holds a descriptor for up to a second).
const MAX_REFUSING: usize = 64;

async fn accept_loop(app: Arc<App>, listener: TcpListener, kind: Listener, permits: Arc<Semaphore>) {
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let reserve = Reserve::new();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                // The permit lives as long as the connection, console included.
                Ok(permit) => {
                    tokio::spawn(conn::handle(app.clone(), stream, peer, kind, permit));
                }
                // At the connection limit: answer, rather than leave the viewer waiting.
                Err(_) => {
                    if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                        tokio::spawn(conn::refuse_busy(app.clone(), stream, refusal));
                    }
                }
            },
            // Out of descriptors: the reserve one takes the waiting connection, which is
            // told so and closed; then the reserve is taken back.
            Err(e) if out_of_descriptors(&e) && reserve.release() => {
                if let Ok((stream, _)) = listener.accept().await {
                    conn::refuse_now(stream);
                }
                reserve.refill();
                warn!(error = %e, "out of file descriptors: refusing new connections (see the open-file limit at start-up)");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                reserve.refill();
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sweeps dead tokens and keeps the tokens of live sessions from lapsing.
async fn housekeeping(app: Arc<App>) {
    let cfg = &app.config().tokens;
    let period = Duration::from_secs(cfg.sweep_interval_secs.min(cfg.touch_interval_secs).max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = crate::heap::Trimmer::default();
    loop {
        tick.tick().await;
        let (live, high) = app.sessions.live_and_high();
        if trimmer.look(live, high) {
            debug!(live, "most consoles have gone: returned free memory to the kernel");
        }
        let now = unix_now();
        for (source, live) in app.sessions.live_tokens() {
            match app.token_sources.keep(&source, &live, now).await {
                Ok(gone) => {
                    for hash in gone {
                        let ended = app.sessions.disconnect_token(hash, "its console token was revoked at its source");
                        info!(target: AUDIT, event = "token_revoked", source = %source, token_id = %hash.id(), disconnected = ended);
                    }
                }
                Err(e) => warn!(source = %source, error = %e, "could not check the live consoles' tokens; they stay open"),
            }
        }
        match app.tokens.sweep(now).await {
            Ok(0) => {}
            Ok(n) => debug!(swept = n, "forgot dead tokens"),
            Err(e) => warn!(error = %e, "token sweep failed"),
        }
    }
}

/// With `tokens.end_consoles_at_expiry`, ends each console when its token expires (to
/// the second; the setting is read each time, so a reload turns it on or off).
async fn end_at_token_expiry(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !app.config().tokens.end_consoles_at_expiry {
            continue;
        }
        let ended = app.sessions.disconnect_expired(unix_now(), "its console token expired");
        if ended > 0 {
            info!(target: AUDIT, event = "token_expired", disconnected = ended);
        }
    }
}

/// On SIGHUP, reads the configuration again and applies what can change while consoles
/// run; a file that does not load or validate changes nothing. Without a file to read,
/// the certificates are read again.
async fn reload_on_sighup(app: Arc<App>, reload: Option<Loader>, mut loaded: Config) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        let new = match &reload {
            Some(read) => read(),
            None => Ok(loaded.clone()),
        };
        let applied = new.and_then(|new| crate::reload::apply(&app, &loaded, &new).map(|outcome| (new, outcome)));
        match applied {
            Ok((new, outcome)) => {
                loaded = new;
                info!(applied = ?outcome.applied, "SIGHUP: configuration reloaded; live consoles go on");
                if !outcome.need_restart.is_empty() {
                    warn!(settings = ?outcome.need_restart, "SIGHUP: these changed settings take effect only after a restart; their running values stay");
                }
                for note in outcome.notes {
                    warn!("SIGHUP: {note}");
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "SIGHUP: the configuration was not reloaded; the running one stays"),
        }
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed by this call, not when the
/// future is first polled: a signal that arrives while relay starts (loading its eBPF
/// program takes a while) must still stop it cleanly. Needs the runtime.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
