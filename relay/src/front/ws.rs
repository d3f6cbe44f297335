//! The WebSocket upgrade (RFC 6455 section 4.2): validation and the 101 response.
//! Framing afterwards is relay's own, in [`crate::wire::ws_frame`] behind [`crate::wire::ws_stream`].

use crate::wire::http::{Reject, RequestHead};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// An upgrade relay agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    accept: String,
    /// `binary` when the client offered it (noVNC does); none otherwise.
    protocol: Option<&'static str>,
}

/// True when the request asks for a WebSocket (as opposed to a page of the web client).
/// A WebSocket upgrade (RFC 6455 asks for HTTP/1.1; an HTTP/1.0 request is a web one).
pub fn is_upgrade(head: &RequestHead) -> bool {
    head.version == 1 && head.header_has_token("upgrade", "websocket")
}

pub fn check(head: &RequestHead) -> Result<Upgrade, Reject> {
    if head.method != "GET" {
        return Err(Reject::new(405, "Method Not Allowed", "WebSocket upgrades use GET"));
    }
    if !head.header_has_token("connection", "upgrade") {
        return Err(Reject::new(400, "Bad Request", "Connection: Upgrade is missing"));
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err(Reject::new(426, "Upgrade Required", "only WebSocket version 13 is spoken").with_header("Sec-WebSocket-Version", "13"));
    }
    let key = head.header("sec-websocket-key").unwrap_or("");
    if !valid_key(key) {
        return Err(Reject::new(400, "Bad Request", "Sec-WebSocket-Key is missing or malformed"));
    }
    let offered: Vec<&str> =
        head.headers.iter().filter(|(n, _)| n == "sec-websocket-protocol").flat_map(|(_, v)| v.split(',')).map(str::trim).collect();
    let protocol = if offered.contains(&"binary") {
        Some("binary")
    } else if offered.is_empty() {
        None
    } else {
        // Old noVNC's "base64" framing is not carried; say so instead of failing later.
        return Err(Reject::new(400, "Bad Request", format!("unsupported subprotocols {offered:?}; relay speaks binary")));
    };
    Ok(Upgrade { accept: derive_accept_key(key.as_bytes()), protocol })
}

/// A key is 16 random bytes in base64: 24 characters ending in "==".
fn valid_key(key: &str) -> bool {
    use base64::Engine as _;
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|k| k.len() == 16)
}

impl Upgrade {
    pub fn response(&self) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
            self.accept
        );
        if let Some(p) = self.protocol {
            r.push_str("Sec-WebSocket-Protocol: ");
            r.push_str(p);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http::parse_request;

    fn head(extra: &str) -> RequestHead {
        let raw = format!(
            "GET /?token=t HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        parse_request(raw.as_bytes(), 8192).unwrap().unwrap().0
    }

    #[test]
    fn rfc_sample_key_and_binary_subprotocol() {
        let up = check(&head("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n")).unwrap();
        let text = String::from_utf8(up.response()).unwrap();
        // The accept value for the RFC 6455 sample key, from the RFC itself.
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: binary\r\n"));
        let up = check(&head("Sec-WebSocket-Version: 13\r\n")).unwrap();
        assert!(!String::from_utf8(up.response()).unwrap().contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn bad_upgrades_get_the_right_status() {
        assert_eq!(check(&head("Sec-WebSocket-Version: 8\r\n")).unwrap_err().status, 426);
        assert_eq!(check(&head("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: base64\r\n")).unwrap_err().status, 400);
        let raw =
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n";
        let h = parse_request(raw.as_bytes(), 8192).unwrap().unwrap().0;
        assert_eq!(check(&h).unwrap_err().status, 400);
    }
}
