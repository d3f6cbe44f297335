//! The request phase: TLS or not, request heads, the web client's files, door checks
//! and refusals.

use super::{Conn, ConsoleRequest, Listener};
use crate::front::{Door, health, origin, web, ws};
use crate::metrics::bump;
use crate::telemetry::AUDIT;
use crate::tls::cork::Corked;
use crate::transport::Transport;
use crate::wire::http::{Reject, RequestHead, read_head};
use crate::wire::prefixed::Prefixed;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};
use tracing::{debug, info, warn};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

impl Conn {
    /// With TLS configured, tells TLS from plain by the first byte (one port serves
    /// `http`/`ws` and `https`/`wss`) and completes the TLS handshake in time.
    pub(super) async fn accept_tls(&self, stream: TcpStream) -> Option<Transport> {
        let Some(tls) = &self.app.front_tls else { return Some(Transport::Plain(stream)) };
        let mut first = [0u8; 1];
        let peeked = timeout_at(self.deadline, stream.peek(&mut first)).await;
        if !matches!(peeked, Ok(Ok(1))) {
            return None;
        }
        if first[0] != TLS_HANDSHAKE {
            if !self.config.tls.ssl_only {
                return Some(Transport::Plain(stream));
            }
            self.app.counters.refused("tls_required");
            info!(target: AUDIT, event = "refused", status = 400, reason = "plain connection; TLS required");
            let mut plain = stream;
            send_and_close(&mut plain, &Reject::new(400, "Bad Request", "this relay accepts TLS only (https://, wss://)").to_bytes()).await;
            return None;
        }
        match timeout_at(self.deadline, tls.acceptor().accept(Corked::new(stream, self.app.cork_tls()))).await {
            Ok(Ok(s)) => Some(Transport::ServerTls(Box::new(s))),
            Ok(Err(e)) => {
                self.app.counters.refused("tls_failed");
                info!(target: AUDIT, event = "refused", reason = %format!("TLS handshake failed: {e}"));
                None
            }
            Err(_) => None,
        }
    }

    /// Reads request heads until one asks for a console; serves the web client's files
    /// on the way (keep-alive). `None` when the connection is done. Bytes read past the
    /// console request's head stay in `stream.prefix` for the next phase.
    pub(super) async fn read_console_request(&mut self, stream: &mut Prefixed<Transport>, listener: Listener) -> Option<ConsoleRequest> {
        let limits = &self.config.limits;
        for _ in 0..limits.max_requests_per_connection {
            self.deadline = tokio::time::Instant::now() + self.config.handshake_timeout();
            let head = match timeout_at(self.deadline, read_head(stream, limits.max_header_bytes)).await {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) => return None,
                Ok(Err(reject)) => {
                    debug!(status = reject.status, reason = %reject.message, "bad request");
                    self.app.counters.refused_status(reject.status);
                    send_and_close(stream, &reject.to_bytes()).await;
                    return None;
                }
                Err(_) => {
                    // Quietly for an idle keep-alive connection; with a 408 mid-request.
                    if !stream.prefix.is_empty() {
                        send_and_close(stream, &Reject::new(408, "Request Timeout", "request head too slow").to_bytes()).await;
                    }
                    return None;
                }
            };
            match listener {
                Listener::Connect => return Some(ConsoleRequest { head, door: Door::Connect }),
                Listener::WebSocket if ws::is_upgrade(&head) => return Some(ConsoleRequest { head, door: Door::WebSocket }),
                Listener::WebSocket => {
                    if !self.serve_web(stream, &head).await || !head.keep_alive() {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Serves one file of the web client; false when the connection should close. A body
    /// the request declares is read and dropped first (bounded), so it cannot pass for the
    /// next request.
    async fn serve_web(&self, stream: &mut Prefixed<Transport>, head: &RequestHead) -> bool {
        let send_timeout = Duration::from_secs(self.config.limits.web_send_timeout_secs);
        if let Some(probe) = health::probe(head) {
            let ready = match probe {
                health::Probe::Ready => self.app.readiness().await,
                _ => Ok(()),
            };
            if self.discard_body(stream, head).await.is_err() {
                return false;
            }
            let sent = timeout(send_timeout, stream.write_all(&health::respond(head, probe, ready))).await;
            return sent.is_ok_and(|w| w.is_ok()) && head.keep_alive();
        }
        bump(&self.app.counters.web_requests);
        let checked = match origin::check_host(head.header("host"), &self.config.websocket.allowed_hosts) {
            Ok(()) => self.discard_body(stream, head).await,
            Err(e) => Err(Reject::new(403, "Forbidden", e)),
        };
        if let Err(reject) = checked {
            debug!(status = reject.status, reason = %reject.message, "web request refused before serving");
            send_and_close(stream, &reject.to_bytes()).await;
            return false;
        }
        let response = match &self.config.listen.web {
            Some(root) => web::respond(root, head).await,
            None => Err(Reject::new(404, "Not Found", "relay serves no web client here (see listen.web); consoles open over WebSocket")),
        };
        match response {
            Ok(file) => send_file(stream, file, send_timeout).await.is_ok(),
            // A missing file leaves the connection usable, and says so.
            Err(reject) if reject.status == 404 => {
                let keep = head.keep_alive();
                timeout(send_timeout, stream.write_all(&reject.response(keep))).await.is_ok_and(|w| w.is_ok()) && keep
            }
            Err(reject) => {
                debug!(status = reject.status, path = head.path(), "web request refused");
                send_and_close(stream, &reject.to_bytes()).await;
                false
            }
        }
    }

    /// Reads and drops the body `head` declares, up to [`MAX_DISCARDED_BODY`] bytes.
    async fn discard_body(&self, stream: &mut Prefixed<Transport>, head: &RequestHead) -> Result<(), Reject> {
        let mut left = head.body_len()?;
        if left > MAX_DISCARDED_BODY {
            return Err(Reject::new(413, "Content Too Large", "relay's web client takes no request bodies"));
        }
        let from_prefix = (left as usize).min(stream.prefix.len());
        stream.prefix.drain(..from_prefix);
        left -= from_prefix as u64;
        let mut sink = [0u8; 4096];
        while left > 0 {
            let want = (left as usize).min(sink.len());
            let n = match timeout_at(self.deadline, stream.io.read(&mut sink[..want])).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return Err(Reject::new(400, "Bad Request", "the request body ended early or came too slowly")),
            };
            left -= n as u64;
        }
        Ok(())
    }

    /// Door-specific checks that come before the token is spent; for the WebSocket door,
    /// the upgrade it agreed to.
    pub(super) fn check_door(&self, req: &ConsoleRequest, tls: bool) -> Result<Option<ws::Upgrade>, Reject> {
        // What follows a console request's head is the console's own bytes.
        if req.head.body_len()? > 0 {
            return Err(Reject::new(400, "Bad Request", "a console request carries no body"));
        }
        match req.door {
            Door::Connect if req.head.method != "CONNECT" => {
                Err(Reject::new(405, "Method Not Allowed", "this door takes CONNECT /console?token=TOKEN"))
            }
            Door::Connect => Ok(None),
            Door::WebSocket => {
                let upgrade = ws::check(&req.head)?;
                let cfg = &self.config.websocket;
                origin::check_host(req.head.header("host"), &cfg.allowed_hosts).map_err(|e| Reject::new(403, "Forbidden", e))?;
                let forwarded = cfg.trust_forwarded_headers.then(|| req.head.header("x-forwarded-proto")).flatten();
                let scheme = match forwarded {
                    Some(p) if p.eq_ignore_ascii_case("https") => "https",
                    _ if tls => "https",
                    _ => "http",
                };
                origin::check(req.head.header("origin"), req.head.header("host"), scheme, &cfg.allowed_origins)
                    .map_err(|e| Reject::new(403, "Forbidden", e))?;
                Ok(Some(upgrade))
            }
        }
    }

    pub(super) async fn refuse(&self, stream: &mut Prefixed<Transport>, reject: &Reject, req: &ConsoleRequest) {
        self.app.counters.refused_status(reject.status);
        info!(target: AUDIT, event = "refused", door = %req.door, status = reject.status, reason = %reject.message);
        send_and_close(stream, &reject.to_bytes()).await;
    }

    /// Refuses a console the store cannot vouch for (Redis down): a 503 and an audit
    /// event. Live consoles are not affected.
    pub(super) async fn store_unavailable(&self, stream: &mut Prefixed<Transport>, req: &ConsoleRequest, error: &crate::auth::StoreError) {
        bump(&self.app.counters.store_errors);
        warn!(error = %error, "console store unavailable: refusing a new console");
        self.refuse(stream, &Reject::new(503, "Service Unavailable", "console store unavailable; try again shortly"), req).await;
    }
}

/// The most of a request body relay reads and drops on the web door; a larger one is
/// refused (413) and the connection closed.
const MAX_DISCARDED_BODY: u64 = 64 << 10;
/// The piece a file is sent in: what a slow reader can hold relay to.
const FILE_PIECE: usize = 64 << 10;

/// Sends a file response in pieces, each of which the client must take within
/// `send_timeout` (nginx's send_timeout): a client that stops reading is disconnected
/// rather than holding the connection, and relay holds one piece for it, not the file.
async fn send_file<S: AsyncWrite + Unpin>(stream: &mut S, response: web::FileResponse, send_timeout: Duration) -> std::io::Result<()> {
    let slow = || std::io::Error::new(std::io::ErrorKind::TimedOut, "web client took no bytes for the send timeout");
    timeout(send_timeout, stream.write_all(&response.head)).await.map_err(|_| slow())??;
    let Some((file, len)) = response.body else { return Ok(()) };
    let mut file = file.take(len);
    let mut piece = vec![0u8; FILE_PIECE.min(len as usize).max(1)];
    let mut sent = 0;
    while sent < len {
        let n = file.read(&mut piece).await?;
        if n == 0 {
            // The file shrank under us: the promised length cannot be kept, so the
            // connection must end rather than run into the next response.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        timeout(send_timeout, stream.write_all(&piece[..n])).await.map_err(|_| slow())??;
        sent += n as u64;
    }
    Ok(())
}

/// Sends a final response and closes so that the client reads it: closing with unread
/// input would make the kernel send a reset, which can destroy the response in flight.
/// So: FIN first, then discard what the client still sends, bounded in bytes and time.
pub(super) async fn send_and_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
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
