//! The pipeline for one connection, and the only place that knows its order:
//! request head → front door → token → dial → RFB negotiation (hypervisor side, then
//! viewer side) → relay → audit. The steps themselves live in [`request`] and
//! [`negotiate`].

mod negotiate;
mod request;

use request::send_and_close;

use crate::app::{App, unix_now};
use crate::auth::{TokenHash, TokenRejection};
use crate::front::{Door, token_param};
use crate::metrics::bump;
use crate::session::SessionInfo;
use crate::sources::SourcePlace;
use crate::telemetry::AUDIT;
use crate::transport::Transport;
use crate::wire::http::{Reject, RequestHead};
use crate::wire::prefixed::Prefixed;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout_at;
use tracing::{Instrument, info, info_span};

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

/// Serves one accepted connection; `permit` (its place under the connection limit) is
/// released when the connection, or the console it becomes, ends.
pub async fn handle(app: Arc<App>, mut stream: TcpStream, mut peer: SocketAddr, listener: Listener, permit: OwnedSemaphorePermit) {
    let id = app.next_id();
    bump(&app.counters.connections_accepted);
    let _ = stream.set_nodelay(true);
    // One configuration for the whole connection: a reload applies from the next one.
    let config = app.config();
    if let Some(keepalive) = config.keepalive.tcp() {
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    }
    let deadline = tokio::time::Instant::now() + config.handshake_timeout();
    if config.listen.proxy_protocol_from.iter().any(|c| c.contains(peer.ip())) {
        match timeout_at(deadline, proxied_viewer(&mut stream)).await {
            Ok(Ok(Some(viewer))) => peer = viewer,
            // No header (a health check the balancer makes itself), or one naming nobody.
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                app.counters.refused("proxy_header");
                info!(target: AUDIT, event = "refused", balancer = %peer, reason = %e);
                return;
            }
            Err(_) => return,
        }
    }
    // Counted by the TCP peer here, or by the address a trusted proxy reports once the
    // request head says it.
    let source = match app.sources.limited() && !config.websocket.trust_forwarded_headers {
        false => None,
        true => match app.sources.admit(peer.ip()) {
            Some(place) => Some(place),
            None => return refuse_before_reading(&app, stream, "source_limit", SOURCE_FULL).await,
        },
    };
    let conn = Conn { app, config, id, peer, client: peer.ip(), deadline, _permit: permit, _source: source };
    async move {
        let Some(transport) = conn.accept_tls(stream).await else { return };
        conn.run(transport, listener).await
    }
    .instrument(info_span!("conn", id, %peer))
    .await
}

struct Conn {
    app: Arc<App>,
    /// The configuration in force when the connection was accepted.
    config: Arc<crate::config::Config>,
    id: u64,
    peer: SocketAddr,
    /// The viewer's address: the peer's, or the proxy-reported one when trusted.
    client: IpAddr,
    /// When the current phase (a request head, or the handshakes) must be over.
    deadline: tokio::time::Instant,
    /// Held, never read: dropping the connection releases its place.
    _permit: OwnedSemaphorePermit,
    /// Its place in its source's count, likewise.
    _source: Option<SourcePlace>,
}

/// A request that asked for a console, and the door it came through.
struct ConsoleRequest {
    head: RequestHead,
    door: Door,
}

impl Conn {
    async fn run(mut self, stream: Transport, listener: Listener) {
        let mut stream = Prefixed::bare(stream);
        let Some(req) = self.read_console_request(&mut stream, listener).await else {
            // A clean end: a FIN, and under TLS a close_notify first.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
            return;
        };
        // The handshakes share one deadline from here: a slow peer cannot hold a
        // connection open before its console exists.
        self.deadline = tokio::time::Instant::now() + self.config.handshake_timeout();
        if self.config.websocket.trust_forwarded_headers
            && let Some(client) = forwarded_for(&req.head)
        {
            self.client = client;
        }
        if self.config.websocket.trust_forwarded_headers && self.app.sources.limited() {
            match self.app.sources.admit(self.client) {
                Some(place) => self._source = Some(place),
                None => {
                    let reject = Reject::new(503, "Service Unavailable", SOURCE_FULL);
                    self.refuse(&mut stream, &reject, &req).await;
                    return;
                }
            }
        }
        if self.app.draining.load(std::sync::atomic::Ordering::Relaxed) {
            let reject = Reject::new(503, "Service Unavailable", "relay is shutting down; try another");
            self.refuse(&mut stream, &reject, &req).await;
            return;
        }
        let upgrade = match self.check_door(&req, stream.io.is_tls()) {
            Ok(upgrade) => upgrade,
            Err(reject) => {
                self.refuse(&mut stream, &reject, &req).await;
                return;
            }
        };
        let Some(token) = token_param::from_request(&req.head) else {
            let reject = Reject::new(400, "Bad Request", "no console token in the request");
            self.refuse(&mut stream, &reject, &req).await;
            return;
        };
        let hash = TokenHash::of(&token);
        let door = req.door;
        let lookup = std::time::Instant::now();
        let redeemed = self.app.token_sources.redeem(&token, hash, unix_now()).await;
        self.app.timings.token_lookup.observe(lookup.elapsed().as_secs_f64());
        let redeemed = redeemed
            .map(|r| r.and_then(|record| if door.admits(&record.console) { Ok(record) } else { Err(TokenRejection::WrongConsole) }));
        drop(token);
        let record = match redeemed {
            Ok(Ok(record)) => record,
            Ok(Err(rejection)) => {
                self.app.counters.token_rejected(rejection);
                info!(target: AUDIT, event = "token_rejected", token_id = %hash.id(), door = %req.door, reason = %rejection);
                self.refuse(&mut stream, &Reject::new(403, "Forbidden", rejection.to_string()), &req).await;
                return;
            }
            Err(e) => {
                self.store_unavailable(&mut stream, &req, &e).await;
                return;
            }
        };
        let info = SessionInfo {
            id: self.id,
            instance: record.instance.clone(),
            // The registry derives it from the token's hash (`TokenHash::id`).
            token_id: String::new(),
            door: req.door,
            viewer: self.peer,
            client: self.client,
            hypervisor: format!("{}:{}", record.target.host, record.target.port),
            started: unix_now(),
            source: record.source.into(),
            token_expires: record.real_expiry(),
        };
        let password = match self.app.passwords.get(&record.instance).await {
            Ok(password) => password,
            Err(e) => {
                self.store_unavailable(&mut stream, &req, &e).await;
                return;
            }
        };
        let session = match self.app.sessions.register(info, hash, record.redeemed_epoch) {
            Ok(s) => s,
            Err(e) => {
                self.refuse(&mut stream, &Reject::new(503, "Service Unavailable", e.to_string()), &req).await;
                return;
            }
        };
        let span = info_span!("session", instance = %record.instance, token_id = %record.id, door = %req.door, client = %self.client);
        self.console(stream, upgrade, record, session, password).instrument(span).await
    }
}

/// The answer to a connection past `max_connections`.
const BUSY: &str = "relay is at its connection limit; try again shortly";
/// The answer to a connection from a source past `max_connections_per_source`.
const SOURCE_FULL: &str = "too many connections from your address";

/// Refuses a connection over the connection limit; `refusal` bounds how many are under way.
pub async fn refuse_busy(app: Arc<App>, stream: TcpStream, refusal: OwnedSemaphorePermit) {
    refuse_before_reading(&app, stream, "busy", BUSY).await;
    drop(refusal);
}

/// Refuses a connection before reading anything from it: a 503 where the door speaks
/// plain HTTP first (under TLS the connection is just closed), and an audit event.
async fn refuse_before_reading(app: &App, mut stream: TcpStream, kind: &'static str, why: &str) {
    app.counters.refused(kind);
    let source = stream.peer_addr().map(|a| a.ip()).ok();
    info!(target: AUDIT, event = "refused", status = 503, source = ?source, reason = why);
    if app.front_tls.is_none() {
        send_and_close(&mut stream, &Reject::new(503, "Service Unavailable", why).to_bytes()).await;
    }
}

/// Refuses a connection at once, with what the socket takes without waiting (out of
/// descriptors: nothing may be held).
pub fn refuse_now(stream: TcpStream) {
    let _ = stream.try_write(&Reject::new(503, "Service Unavailable", BUSY).to_bytes());
}

/// The viewer a trusted balancer names in a PROXY protocol header, if the connection
/// starts with one (its first byte says: `P` for v1, CR for v2; HTTP, TLS and the web
/// client's requests start otherwise).
async fn proxied_viewer(stream: &mut TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 || !matches!(first[0], b'P' | b'\r') {
        return Ok(None);
    }
    Ok(crate::wire::proxy::read(stream).await?.source)
}

/// The client a trusted reverse proxy reports: the first `X-Forwarded-For` entry.
fn forwarded_for(head: &RequestHead) -> Option<IpAddr> {
    head.header("x-forwarded-for")?.split(',').next()?.trim().parse().ok()
}
