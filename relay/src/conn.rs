//! The pipeline for one connection, and the only place that knows its order:
//! request head → front door → token → dial → RFB negotiation (hypervisor side, then
//! viewer side) → relay → audit.

use crate::app::{App, unix_now};
use crate::auth::{TokenHash, TokenRecord};
use crate::dial::{DialError, Dialed, dial};
use crate::front::http::{Reject, RequestHead, parse_request};
use crate::front::ws_stream::WsByteStream;
use crate::front::{Door, origin, token_param, web, ws};
use crate::relay::{self, Control, Ended, Established, Peer};
use crate::rfb::drive::{DriveError, drive};
use crate::rfb::hypervisor::{HypervisorAuth, HypervisorDone, HypervisorHandshake};
use crate::rfb::RfbError;
use crate::rfb::viewer::{ViewerAuth, ViewerHandshake};
use crate::session::{SessionHandle, SessionInfo};
use crate::telemetry::{AUDIT, bump};
use rand::RngCore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{Instrument, debug, info, info_span, warn};

/// Which listener accepted the connection, and so which doors it may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// WebSocket door and the static web client.
    WebSocket,
    /// XVP-style CONNECT door.
    Connect,
}

/// The answer a CONNECT viewer gets before raw RFB.
const CONNECT_OK: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

pub async fn handle(app: Arc<App>, stream: TcpStream, peer: SocketAddr, listener: Listener) {
    let id = app.next_id();
    bump(&app.counters.connections_accepted);
    let _ = stream.set_nodelay(true);
    let conn = Conn { app, id, peer, deadline: tokio::time::Instant::now() + Duration::from_secs(1) };
    conn.run(stream, listener).instrument(info_span!("conn", id, %peer)).await
}

struct Conn {
    app: Arc<App>,
    id: u64,
    peer: SocketAddr,
    /// When the current phase (a request head, or the handshakes) must be over.
    deadline: tokio::time::Instant,
}

/// A request that asked for a console, with the bytes that followed its head.
struct ConsoleRequest {
    head: RequestHead,
    rest: Vec<u8>,
    door: Door,
}

impl Conn {
    async fn run(mut self, mut stream: TcpStream, listener: Listener) {
        let Some(req) = self.read_console_request(&mut stream, listener).await else { return };
        // The handshakes share one deadline from here: a slow peer cannot hold a
        // connection open before its console exists.
        self.deadline = tokio::time::Instant::now() + self.app.config.handshake_timeout();
        if let Err(reject) = self.check_door(&req) {
            self.refuse(&mut stream, &reject, &req).await;
            return;
        }
        let Some(token) = token_param::from_request(&req.head) else {
            let reject = Reject::new(400, "Bad Request", "no console token in the request");
            self.refuse(&mut stream, &reject, &req).await;
            return;
        };
        let hash = TokenHash::of(&token);
        drop(token);
        let record = match self.app.tokens.redeem(hash, unix_now()).await {
            Ok(Ok(record)) => record,
            Ok(Err(rejection)) => {
                bump(&self.app.counters.token_rejections);
                info!(target: AUDIT, event = "token_rejected", token_id = %hash.id(), door = %req.door, reason = %rejection);
                self.refuse(&mut stream, &Reject::new(403, "Forbidden", rejection.to_string()), &req).await;
                return;
            }
            Err(e) => {
                warn!(error = %e, "token store failed");
                self.refuse(&mut stream, &Reject::new(503, "Service Unavailable", "token store unavailable"), &req).await;
                return;
            }
        };
        let info = SessionInfo {
            id: self.id,
            instance: record.instance.clone(),
            token_id: record.id.clone(),
            door: req.door,
            viewer: self.peer,
            hypervisor: format!("{}:{}", record.target.host, record.target.port),
            started: unix_now(),
        };
        let session = match self.app.sessions.register(info, hash) {
            Ok(s) => s,
            Err(e) => {
                self.refuse(&mut stream, &Reject::new(503, "Service Unavailable", e.to_string()), &req).await;
                return;
            }
        };
        let span = info_span!("session", instance = %record.instance, token_id = %record.id, door = %req.door);
        self.console(stream, req, record, hash, session).instrument(span).await
    }

    /// Reads request heads until one asks for a console; serves the web client's files
    /// on the way (keep-alive). `None` when the connection is done.
    async fn read_console_request(&mut self, stream: &mut TcpStream, listener: Listener) -> Option<ConsoleRequest> {
        let limits = &self.app.config.limits;
        let mut buf = Vec::with_capacity(1024);
        for _ in 0..limits.max_requests_per_connection {
            self.deadline = tokio::time::Instant::now() + self.app.config.handshake_timeout();
            let head = match timeout_at(self.deadline, read_head(stream, &mut buf, limits.max_header_bytes)).await {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) => return None,
                Ok(Err(reject)) => {
                    debug!(status = reject.status, reason = %reject.message, "bad request");
                    bump(&self.app.counters.connections_refused);
                    send_and_close(stream, &reject.to_bytes()).await;
                    return None;
                }
                Err(_) => {
                    // Quietly for an idle keep-alive connection; with a 408 mid-request.
                    if !buf.is_empty() {
                        send_and_close(stream, &Reject::new(408, "Request Timeout", "request head too slow").to_bytes()).await;
                    }
                    return None;
                }
            };
            let (head, len) = head;
            let rest = buf.split_off(len);
            buf.clear();
            match listener {
                Listener::Connect => return Some(ConsoleRequest { head, rest, door: Door::Connect }),
                Listener::WebSocket if ws::is_upgrade(&head) => return Some(ConsoleRequest { head, rest, door: Door::WebSocket }),
                Listener::WebSocket => {
                    if !self.serve_web(stream, &head).await || !head.keep_alive() {
                        return None;
                    }
                    buf = rest;
                }
            }
        }
        None
    }

    /// Serves one file of the web client; false when the connection should close.
    async fn serve_web(&self, stream: &mut TcpStream, head: &RequestHead) -> bool {
        bump(&self.app.counters.web_requests);
        let response = match &self.app.config.listen.web {
            Some(root) => web::respond(root, head).await,
            None => Err(Reject::new(404, "Not Found", "relay serves no web client here (see listen.web); consoles open over WebSocket")),
        };
        match response {
            Ok(bytes) => stream.write_all(&bytes).await.is_ok(),
            // A missing file leaves the connection usable; anything else ends it.
            Err(reject) if reject.status == 404 => stream.write_all(&reject.to_bytes()).await.is_ok(),
            Err(reject) => {
                debug!(status = reject.status, path = head.path(), "web request refused");
                send_and_close(stream, &reject.to_bytes()).await;
                false
            }
        }
    }

    /// Door-specific checks that come before the token is spent.
    fn check_door(&self, req: &ConsoleRequest) -> Result<(), Reject> {
        match req.door {
            Door::Connect if req.head.method != "CONNECT" => {
                Err(Reject::new(405, "Method Not Allowed", "this door takes CONNECT /console?token=TOKEN"))
            }
            Door::Connect => Ok(()),
            Door::WebSocket => {
                ws::check(&req.head)?;
                let cfg = &self.app.config.websocket;
                let forwarded = cfg.trust_forwarded_proto.then(|| req.head.header("x-forwarded-proto")).flatten();
                let scheme = match forwarded {
                    Some(p) if p.eq_ignore_ascii_case("https") => "https",
                    _ => "http",
                };
                origin::check(req.head.header("origin"), req.head.header("host"), scheme, &cfg.allowed_origins)
                    .map_err(|e| Reject::new(403, "Forbidden", e))
            }
        }
    }

    async fn refuse(&self, stream: &mut TcpStream, reject: &Reject, req: &ConsoleRequest) {
        bump(&self.app.counters.connections_refused);
        info!(target: AUDIT, event = "refused", door = %req.door, status = reject.status, reason = %reject.message);
        send_and_close(stream, &reject.to_bytes()).await;
    }

    /// From a redeemed token to the end of the console.
    async fn console(self, mut stream: TcpStream, req: ConsoleRequest, record: TokenRecord, hash: TokenHash, session: SessionHandle) {
        let timeout = Duration::from_secs(self.app.config.hypervisor.connect_timeout_secs);
        let dialed = match timeout_at(self.deadline, dial(&record.target, timeout)).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout(format!("{}:{}", record.target.host, record.target.port))),
        };
        match req.door {
            Door::Connect => {
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
                self.negotiate(stream, req.rest, dialed, &record, hash, session).await
            }
            Door::WebSocket => {
                let upgrade = ws::check(&req.head).expect("checked before the token was spent");
                if stream.write_all(&upgrade.response()).await.is_err() {
                    return;
                }
                let limits = &self.app.config.limits;
                let config = WebSocketConfig::default()
                    .read_buffer_size(16 << 10)
                    .write_buffer_size(limits.relay_buffer_bytes)
                    .max_write_buffer_size(limits.relay_buffer_bytes.saturating_mul(4).max(1 << 20))
                    .max_message_size(Some(limits.max_ws_message_bytes))
                    .max_frame_size(Some(limits.max_ws_message_bytes));
                let ws = WebSocketStream::from_partially_read(stream, req.rest, Role::Server, Some(config)).await;
                self.negotiate(WsByteStream::new(ws), Vec::new(), dialed, &record, hash, session).await
            }
        }
    }

    /// Both RFB handshakes, then the relay.
    async fn negotiate<V: Peer>(
        self,
        mut viewer: V,
        mut viewer_buf: Vec<u8>,
        dialed: Result<Dialed, DialError>,
        record: &TokenRecord,
        hash: TokenHash,
        session: SessionHandle,
    ) {
        let started = Instant::now();
        let hypervisor = match dialed {
            Ok(d) => self.hypervisor_handshake(d, record).await,
            Err(e) => {
                warn!(target: AUDIT, event = "hypervisor_failed", stage = "dial", error = %e);
                Err(())
            }
        };
        let (viewer_machine, deadline, wants_password) = match &hypervisor {
            Ok(_) => self.viewer_machine(&record.instance).await,
            Err(()) => {
                bump(&self.app.counters.hypervisor_failures);
                let refusal = ViewerHandshake::refuse("console unavailable: the hypervisor could not be reached or refused relay");
                (refusal, self.deadline, false)
            }
        };
        let viewer_done = timeout_at(deadline, drive(viewer_machine, &mut viewer, &mut viewer_buf)).await;
        if wants_password {
            self.audit_password(&record.instance, &viewer_done);
        }
        let (hypervisor, done, hv_buf) = match (hypervisor, viewer_done) {
            (Ok((stream, done, buf)), Ok(Ok(viewer_done))) => (stream, (done, viewer_done), buf),
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
        bump(&self.app.counters.sessions_started);
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
        let cfg = &self.app.config.limits;
        let limits = relay::Limits {
            buffer_bytes: cfg.relay_buffer_bytes,
            idle_timeout: (cfg.session_idle_timeout_secs > 0).then(|| Duration::from_secs(cfg.session_idle_timeout_secs)),
            half_close_timeout: Duration::from_secs(cfg.half_close_timeout_secs),
        };
        let control = Control { bytes: session.bytes.clone(), stop: session.stop.clone() };
        let pair = Established { viewer, viewer_buffered: viewer_buf, hypervisor, hypervisor_buffered: hv_buf };
        let relay_started = Instant::now();
        let ended = relay::copy::run(pair, control, limits).await;
        self.finish(&session, ended, relay_started, hash).await;
    }

    /// What the viewer must prove: nothing, or the instance's console password (unless
    /// lock-out refuses the attempt outright). Password entry gets its own deadline: a
    /// person is typing.
    async fn viewer_machine(&self, instance: &str) -> (ViewerHandshake, tokio::time::Instant, bool) {
        let password = match self.app.passwords.get(instance).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "password store failed");
                return (ViewerHandshake::refuse("console unavailable: password store unavailable"), self.deadline, false);
            }
        };
        let Some(password) = password else {
            return (ViewerHandshake::new(ViewerAuth::None, challenge()), self.deadline, false);
        };
        if let Err(locked) = self.app.lockout.check(instance, self.peer.ip(), unix_now()) {
            bump(&self.app.counters.viewer_auth_failures);
            info!(target: AUDIT, event = "viewer_auth", outcome = "locked_out", source = %self.peer.ip(), detail = %locked);
            return (ViewerHandshake::refuse(locked.to_string()), self.deadline, false);
        }
        let entry = Duration::from_secs(self.app.config.passwords.entry_timeout_secs);
        let deadline = self.deadline.max(tokio::time::Instant::now() + entry);
        (ViewerHandshake::new(ViewerAuth::Password(password.0), challenge()), deadline, true)
    }

    /// One audit event per password attempt, and the lock-out bookkeeping.
    fn audit_password<T>(&self, instance: &str, result: &Result<Result<T, DriveError>, tokio::time::error::Elapsed>) {
        let source = self.peer.ip();
        match result {
            Ok(Ok(_)) => {
                self.app.lockout.success(instance, source);
                info!(target: AUDIT, event = "viewer_auth", outcome = "success", source = %source);
            }
            Ok(Err(DriveError::Rfb(RfbError::WrongPassword))) => {
                bump(&self.app.counters.viewer_auth_failures);
                let locked = self.app.lockout.failure(instance, source, unix_now());
                info!(target: AUDIT, event = "viewer_auth", outcome = "wrong_password", source = %source, locked_out = locked.is_some());
            }
            Ok(Err(e)) => info!(target: AUDIT, event = "viewer_auth", outcome = "abandoned", source = %source, error = %e),
            Err(_) => info!(target: AUDIT, event = "viewer_auth", outcome = "timed_out", source = %source),
        }
    }

    /// Returns the hypervisor socket, how its handshake went, and bytes it sent beyond it.
    async fn hypervisor_handshake(&self, dialed: Dialed, record: &TokenRecord) -> Result<(TcpStream, HypervisorDone, Vec<u8>), ()> {
        let Dialed { mut stream, mut buffered } = dialed;
        let cfg = &self.app.config.hypervisor;
        let auth = HypervisorAuth {
            schemes: record.hypervisor_schemes.clone().unwrap_or_else(|| cfg.auth_schemes.clone()),
            vnc_password: record.hypervisor_password.as_ref().map(|s| s.0.clone()).or_else(|| cfg.vnc_password.clone()),
            plain_username: None,
        };
        match timeout_at(self.deadline, drive(HypervisorHandshake::new(auth), &mut stream, &mut buffered)).await {
            Ok(Ok(done)) => Ok((stream, done, buffered)),
            Ok(Err(e)) => {
                let stage = if matches!(e, DriveError::Rfb(_)) { "rfb" } else { "io" };
                warn!(target: AUDIT, event = "hypervisor_failed", stage, error = %e);
                Err(())
            }
            Err(_) => {
                warn!(target: AUDIT, event = "hypervisor_failed", stage = "rfb", error = "handshake timed out");
                Err(())
            }
        }
    }

    async fn finish(&self, session: &SessionHandle, ended: Ended, started: Instant, hash: TokenHash) {
        let (up, down) = session.bytes.snapshot();
        let counters = &self.app.counters;
        counters.bytes_to_hypervisor.fetch_add(up, Ordering::Relaxed);
        counters.bytes_to_viewer.fetch_add(down, Ordering::Relaxed);
        bump(&counters.sessions_ended);
        // The token was in use until now: it lapses from here, not from its last redeem.
        let _ = self.app.tokens.touch(hash, unix_now()).await;
        info!(
            target: AUDIT,
            event = "session_end",
            session = self.id,
            viewer = %self.peer,
            reason = %ended,
            bytes_to_hypervisor = up,
            bytes_to_viewer = down,
            duration_ms = started.elapsed().as_millis() as u64,
        );
    }
}

/// Fresh random bytes for a VNC authentication challenge.
fn challenge() -> [u8; 16] {
    let mut c = [0u8; 16];
    rand::rng().fill_bytes(&mut c);
    c
}

/// Sends a final response and closes so that the client reads it: closing with unread
/// input would make the kernel send a reset, which can destroy the response in flight.
/// So: FIN first, then discard what the client still sends, bounded in bytes and time.
async fn send_and_close(stream: &mut TcpStream, response: &[u8]) {
    if stream.write_all(response).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 256usize << 10;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Reads until a whole request head is in `buf`. `Ok(None)`: closed before a request.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> Result<Option<(RequestHead, usize)>, Reject> {
    let mut chunk = [0u8; 2048];
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_request(buf, max).map_err(|e| e.reject())?
        {
            return Ok(Some(head));
        }
        let n = stream.read(&mut chunk).await.map_err(|e| Reject::new(400, "Bad Request", e.to_string()))?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(Reject::new(400, "Bad Request", "connection closed mid-request")) };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
