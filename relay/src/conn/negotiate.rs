//! From a redeemed token to the end of the console: dial, both RFB handshakes (with
//! VeNCrypt TLS towards the hypervisor and the console password towards the viewer),
//! the relay, and the closing audit.

use super::{CONNECT_OK, Conn, send_and_close};
use crate::app::{App, unix_now};
use crate::auth::{Secret, TokenRecord};
use crate::dial::{DialError, dial};
use crate::front::{Door, ws};
use crate::metrics::bump;
use crate::relay::{self, Control, Ended, Established, Peer};
use crate::rfb::RfbError;
use crate::rfb::drive::{DriveError, drive};
use crate::rfb::hypervisor::{HypervisorAuth, HypervisorDone, HypervisorHandshake};
use crate::rfb::viewer::{ViewerAuth, ViewerHandshake};
use crate::session::SessionHandle;
use crate::sources::SourcePlace;
use crate::telemetry::AUDIT;
use crate::tls::cork::Corked;
use crate::transport::Transport;
use crate::wire::http::Reject;
use crate::wire::prefixed::Prefixed;
use crate::wire::ws_stream::WsByteStream;
use rand::RngCore;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout_at;
use tracing::{info, warn};

/// The hypervisor side failed; the details are already in the audit log, and this is what
/// the viewer is told (after "console unavailable: ").
struct HypervisorFailed(&'static str);

const UNREACHABLE: &str = "cannot reach the hypervisor";
const REFUSED: &str = "the hypervisor could not be reached or refused relay";
const TOO_SLOW: &str = "the hypervisor did not answer in time";

/// How long a viewer has to read why its console is unavailable, past the handshake
/// deadline when that is what ran out (a hypervisor that accepts and never speaks).
const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// What a console request was granted on its way to the handshakes.
struct Granted {
    session: SessionHandle,
    /// The console password its viewer must give, if the instance has one.
    password: Option<Secret>,
    /// When the console was asked for (its handshake time starts there).
    asked: Instant,
    door: Door,
}

impl Conn {
    /// From a redeemed token to the end of the console.
    pub(super) async fn console(
        self,
        mut stream: Prefixed<Transport>,
        upgrade: Option<ws::Upgrade>,
        record: TokenRecord,
        session: SessionHandle,
        password: Option<Secret>,
    ) {
        let asked = Instant::now();
        let timeout = Duration::from_secs(self.config.hypervisor.connect_timeout_secs);
        let keepalive = self.config.keepalive.tcp();
        let dialed = match timeout_at(self.deadline, dial(&record.target, timeout, keepalive.as_ref())).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout(format!("{}:{}", record.target.host, record.target.port))),
        };
        match upgrade {
            None => {
                if let Err(e) = &dialed {
                    warn!(target: AUDIT, event = "hypervisor_failed", stage = "dial", error = %e);
                    bump(&self.app.counters.hypervisor_failures);
                    let reply = Reject::new(502, "Bad Gateway", "console unavailable: cannot reach the hypervisor");
                    send_and_close(&mut stream, &reply.to_bytes()).await;
                    return;
                }
                if stream.write_all(CONNECT_OK).await.is_err() {
                    return;
                }
                self.negotiate(stream, dialed, &record, Granted { session, password, asked, door: Door::Connect }).await
            }
            Some(upgrade) => {
                if stream.write_all(&upgrade.response()).await.is_err() {
                    return;
                }
                let max_frame = self.config.limits.max_ws_message_bytes as u64;
                match WsByteStream::new(stream, max_frame) {
                    Ok(ws) => self.negotiate(ws, dialed, &record, Granted { session, password, asked, door: Door::WebSocket }).await,
                    Err(e) => warn!(target: AUDIT, event = "viewer_handshake_failed", error = %e),
                }
            }
        }
    }

    /// Both RFB handshakes, then the relay.
    async fn negotiate<V: Peer + 'static>(
        self,
        mut viewer: Prefixed<V>,
        dialed: Result<Prefixed<TcpStream>, DialError>,
        record: &TokenRecord,
        granted: Granted,
    ) {
        let Granted { session, password, asked, door } = granted;
        let started = Instant::now();
        let hypervisor = match dialed {
            Ok(d) => self.hypervisor_handshake(d, record).await,
            Err(e) => {
                warn!(target: AUDIT, event = "hypervisor_failed", stage = "dial", error = %e);
                Err(HypervisorFailed(UNREACHABLE))
            }
        };
        let (viewer_machine, deadline, wants_password) = match &hypervisor {
            Ok(_) => self.viewer_machine(&record.instance, password).await,
            Err(HypervisorFailed(why)) => {
                bump(&self.app.counters.hypervisor_failures);
                let refusal = ViewerHandshake::refuse(format!("console unavailable: {why}"));
                (refusal, self.deadline.max(tokio::time::Instant::now() + REFUSAL_GRACE), false)
            }
        };
        // A forced disconnect also ends a viewer still at the password prompt.
        let viewer_done = tokio::select! {
            done = timeout_at(deadline, drive(viewer_machine, &mut viewer)) => done,
            _ = session.shared.stop.wait() => {
                info!(target: AUDIT, event = "viewer_handshake_failed", error = "disconnected during the handshake");
                return;
            }
        };
        if wants_password {
            self.audit_password(&record.instance, &viewer_done).await;
        }
        let (hypervisor, done) = match (hypervisor, viewer_done) {
            (Ok((stream, done)), Ok(Ok(viewer_done))) => (stream, (done, viewer_done)),
            (hypervisor, viewer_done) => {
                if hypervisor.is_ok() {
                    let error = match viewer_done {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    info!(target: AUDIT, event = "viewer_handshake_failed", error = %error);
                }
                return;
            }
        };
        let (hv_done, viewer_done) = done;
        self.app.counters.started(door);
        self.app.timings.handshake.observe(asked.elapsed().as_secs_f64());
        info!(
            target: AUDIT,
            event = "session_start",
            session = self.id,
            viewer = %self.peer,
            hypervisor = %format!("{}:{}", record.target.host, record.target.port),
            viewer_rfb = %viewer_done.version,
            viewer_security = viewer_done.security,
            hypervisor_rfb = %hv_done.version,
            hypervisor_security = hv_done.security,
            handshake_ms = started.elapsed().as_millis() as u64,
        );
        let cfg = &self.config.limits;
        let limits = relay::Limits::new(
            cfg.relay_buffer_bytes,
            (cfg.session_idle_timeout_secs > 0).then(|| Duration::from_secs(cfg.session_idle_timeout_secs)),
            Duration::from_secs(cfg.half_close_timeout_secs),
            Some(self.config.keepalive.websocket_ping_secs).filter(|s| *s > 0).map(Duration::from_secs),
        );
        let control = Control { session: session.id, shared: session.shared.clone() };
        let pair = Established { viewer, hypervisor };
        let with_password = viewer_done.security == crate::rfb::security::VNC;
        // The console gets a task of its own, holding only what the relay and the closing
        // audit need: the handshakes' state (several KiB) is freed now, not when the
        // console ends.
        let relay = self.app.relays.run(pair, control, limits);
        let live = Live::new(self, session, door, with_password);
        let relaying = async move {
            let (ended, backend) = relay.await;
            Box::pin(live.finish(ended, backend.name())).await;
        };
        // No span goes with it: a live span costs ~350 bytes (the subscriber's slot, its
        // fields formatted, their map), and the connection's and session's spans held
        // for a console's whole life cost an idle console ~700 of its ~3,800 bytes at
        // the default `info`. Its few events name the session themselves.
        tokio::spawn(relaying);
    }

    /// What the viewer must prove: nothing, or the instance's console password (unless
    /// lock-out refuses the attempt outright). Password entry gets its own deadline: a
    /// person is typing.
    async fn viewer_machine(&self, instance: &str, password: Option<Secret>) -> (ViewerHandshake, tokio::time::Instant, bool) {
        let Some(password) = password else {
            return (ViewerHandshake::new(ViewerAuth::None, challenge()), self.deadline, false);
        };
        match self.app.lockout.check(instance, self.client, unix_now()).await {
            Ok(Ok(())) => {}
            Ok(Err(locked)) => {
                bump(&self.app.counters.viewer_auth_failures);
                info!(target: AUDIT, event = "viewer_auth", outcome = "locked_out", source = %self.client, detail = %locked);
                return (ViewerHandshake::refuse(locked.to_string()), self.deadline, false);
            }
            // Without the count, a guesser could not be stopped: no attempt.
            Err(e) => {
                warn!(error = %e, "lock-out store failed");
                info!(target: AUDIT, event = "viewer_auth", outcome = "store_unavailable", source = %self.client);
                return (ViewerHandshake::refuse("console unavailable: lock-out store unavailable"), self.deadline, false);
            }
        }
        let entry = Duration::from_secs(self.config.passwords.entry_timeout_secs);
        let deadline = self.deadline.max(tokio::time::Instant::now() + entry);
        (ViewerHandshake::new(ViewerAuth::Password(password.0), challenge()), deadline, true)
    }

    /// One audit event per password attempt, and the lock-out bookkeeping.
    async fn audit_password<T>(&self, instance: &str, result: &Result<Result<T, DriveError>, tokio::time::error::Elapsed>) {
        let source = self.client;
        match result {
            Ok(Ok(_)) => {
                if let Err(e) = self.app.lockout.success(instance, source).await {
                    warn!(error = %e, "lock-out store failed to clear the count");
                }
                info!(target: AUDIT, event = "viewer_auth", outcome = "success", source = %source);
            }
            Ok(Err(DriveError::Rfb(RfbError::WrongPassword))) => {
                bump(&self.app.counters.viewer_auth_failures);
                let locked = match self.app.lockout.failure(instance, source, unix_now()).await {
                    Ok(locked) => {
                        if locked.is_some() {
                            bump(&self.app.counters.lockouts);
                        }
                        locked.is_some()
                    }
                    Err(e) => {
                        warn!(error = %e, "lock-out store failed to count a wrong password");
                        false
                    }
                };
                info!(target: AUDIT, event = "viewer_auth", outcome = "wrong_password", source = %source, locked_out = locked);
            }
            Ok(Err(e)) => info!(target: AUDIT, event = "viewer_auth", outcome = "abandoned", source = %source, error = %e),
            Err(_) => info!(target: AUDIT, event = "viewer_auth", outcome = "timed_out", source = %source),
        }
    }

    /// Runs the hypervisor side; for VeNCrypt, starts TLS (verifying the hypervisor's
    /// certificate against the CA and its host name) and finishes inside it. Returns the
    /// hypervisor connection, how it went, and bytes it sent beyond the handshake.
    async fn hypervisor_handshake(
        &self,
        mut dialed: Prefixed<TcpStream>,
        record: &TokenRecord,
    ) -> Result<(Prefixed<Transport>, HypervisorDone), HypervisorFailed> {
        let cfg = &self.config.hypervisor;
        let auth = HypervisorAuth {
            schemes: record.hypervisor_schemes.clone().unwrap_or_else(|| cfg.auth_schemes.clone()),
            vnc_password: record.hypervisor_password.as_ref().map(|s| s.0.clone()).or_else(|| cfg.vnc_password.clone()),
            plain_username: cfg.plain_username.clone(),
        };
        let failed = |stage: &str, error: String, why: &'static str| {
            warn!(target: AUDIT, event = "hypervisor_failed", stage, error = %error);
            HypervisorFailed(why)
        };
        let fail = |stage: &str, error: String| failed(stage, error, REFUSED);
        let slow = |stage: &str, error: &str| failed(stage, error.into(), TOO_SLOW);
        let mut machine = HypervisorHandshake::new(auth);
        let first = match timeout_at(self.deadline, drive(&mut machine, &mut dialed)).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(fail(if matches!(e, DriveError::Rfb(_)) { "rfb" } else { "io" }, e.to_string())),
            Err(_) => return Err(slow("rfb", "handshake timed out")),
        };
        let Some(subtype) = first.start_tls else { return Ok((dialed.map(Transport::Plain), first)) };
        if !dialed.prefix.is_empty() {
            return Err(fail("vencrypt", "hypervisor sent data before the TLS handshake".into()));
        }
        let Some(connector) = self.app.hypervisor_tls() else {
            return Err(fail("vencrypt", "VeNCrypt needs hypervisor.vencrypt_ca_certs".into()));
        };
        let Ok(name) = rustls::pki_types::ServerName::try_from(record.target.host.clone()) else {
            return Err(fail("tls", format!("{:?} is not a valid TLS server name", record.target.host)));
        };
        let mut tls = match timeout_at(self.deadline, connector.connect(name, Corked::new(dialed.io, self.app.cork_tls()))).await {
            Ok(Ok(tls)) => Prefixed::bare(Transport::ClientTls(Box::new(tls))),
            Ok(Err(e)) => return Err(fail("tls", format!("TLS with the hypervisor failed ({subtype:?}): {e}"))),
            Err(_) => return Err(slow("tls", "TLS handshake with the hypervisor timed out")),
        };
        match timeout_at(self.deadline, drive(&mut machine, &mut tls)).await {
            Ok(Ok(done)) => Ok((tls, done)),
            // Under TLS 1.3 a hypervisor that rejects (or misses) relay's client
            // certificate says so only by closing after the handshake.
            Ok(Err(e @ (DriveError::Io(_) | DriveError::Closed))) if cfg.vencrypt_client_cert.is_none() => Err(fail(
                "vencrypt",
                format!("{e} (the hypervisor may require a client certificate: set hypervisor.vencrypt_client_cert and _key)"),
            )),
            Ok(Err(e @ (DriveError::Io(_) | DriveError::Closed))) => {
                Err(fail("vencrypt", format!("{e} (the hypervisor may have rejected relay's client certificate)")))
            }
            Ok(Err(e)) => Err(fail("vencrypt", e.to_string())),
            Err(_) => Err(slow("vencrypt", "handshake timed out inside TLS")),
        }
    }
}

/// Fresh random bytes for a VNC authentication challenge.
fn challenge() -> [u8; 16] {
    let mut c = [0u8; 16];
    rand::rng().fill_bytes(&mut c);
    c
}

/// What a live console's task keeps until the console ends: its place in the connection
/// limits and its registration (which holds what its closing audit names). Every idle
/// console holds one, so it holds no more.
struct Live {
    app: Arc<App>,
    _permit: OwnedSemaphorePermit,
    _source: Option<SourcePlace>,
    session: SessionHandle,
    door: Door,
    with_password: bool,
    /// When the relay began, in [`millis`] (8 bytes where an `Instant` takes 16: the
    /// task's size decides its allocation's, in steps of 128 bytes).
    started: u64,
}

/// Milliseconds since the process first asked.
fn millis() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Live {
    fn new(conn: Conn, session: SessionHandle, door: Door, with_password: bool) -> Live {
        let Conn { app, _permit, _source, .. } = conn;
        Live { app, _permit, _source, session, door, with_password, started: millis() }
    }

    /// Counts the console's end and audits it.
    async fn finish(self, ended: Ended, backend: &'static str) {
        let (up, down) = self.session.shared.snapshot();
        self.app.counters.ended(self.door, backend, ended.cause(), (up, down));
        let lasted = millis().saturating_sub(self.started);
        self.app.timings.console.observe(lasted as f64 / 1000.0);
        // Registered until `self.session` drops, after this.
        let Some((info, token)) = self.session.info() else { return };
        // The token was in use until now: it lapses from here, not from its last redeem.
        let _ = self.app.tokens.touch(token, unix_now()).await;
        info!(
            target: AUDIT,
            event = "session_end",
            session = info.id,
            instance = %info.instance,
            token_id = %info.token_id,
            door = %self.door,
            client = %info.client,
            viewer = %info.viewer,
            hypervisor = %info.hypervisor,
            viewer_auth = if self.with_password { "password" } else { "none" },
            cause = ended.cause().name(),
            reason = %ended,
            relay = backend,
            bytes_to_hypervisor = up,
            bytes_to_viewer = down,
            duration_ms = lasted,
        );
    }
}
