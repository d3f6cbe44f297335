//! HTTP/1.x request and response heads, parsed from bytes with hard size limits. Requests
//! may be HTTP/1.0 (load balancers' health checks are); relay answers in HTTP/1.1.

use std::fmt::Write as _;

/// Most headers a request may carry; browsers send about 15 on a WebSocket upgrade.
const MAX_HEADERS: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// True when a comma-separated header (Connection, Upgrade, ...) holds `token`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers.iter().filter(|(n, _)| n == name).flat_map(|(_, v)| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The path part of the target, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Whether the client wants the connection kept open after the response: HTTP/1.1
    /// unless it says `close`, HTTP/1.0 only if it says `keep-alive`.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            0 => self.header_has_token("connection", "keep-alive"),
            _ => !self.header_has_token("connection", "close"),
        }
    }

    /// The length of the body that follows the head: `Content-Length`, which must be one
    /// number however often it is given. A chunked (or any) `Transfer-Encoding` is refused:
    /// nothing relay serves takes a body, and guessing where one ends is how a reverse
    /// proxy in front and relay come to disagree about where the next request starts.
    pub fn body_len(&self) -> Result<u64, Reject> {
        if self.header("transfer-encoding").is_some() {
            return Err(Reject::new(400, "Bad Request", "request bodies with Transfer-Encoding are not accepted"));
        }
        let mut lengths = self.headers.iter().filter(|(n, _)| n == "content-length").flat_map(|(_, v)| v.split(','));
        let Some(first) = lengths.next() else { return Ok(0) };
        let parse = |v: &str| {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Reject::new(400, "Bad Request", "Content-Length is not a number"));
            }
            v.parse::<u64>().map_err(|_| Reject::new(400, "Bad Request", "Content-Length is too large"))
        };
        let len = parse(first)?;
        for other in lengths {
            if parse(other)? != len {
                return Err(Reject::new(400, "Bad Request", "conflicting Content-Length headers"));
            }
        }
        Ok(len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed HTTP head: {0}")]
    Malformed(String),
}

impl HeadError {
    pub fn reject(&self) -> Reject {
        match self {
            HeadError::TooLarge(_) => Reject::new(431, "Request Header Fields Too Large", self.to_string()),
            HeadError::Malformed(_) => Reject::new(400, "Bad Request", self.to_string()),
        }
    }
}

/// Parses a request head from the start of `buf`. `Ok(None)` means more bytes are
/// needed; the head and its length come back once the blank line has arrived.
pub fn parse_request(buf: &[u8], max: usize) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| HeadError::Malformed(e.to_string()))?;
    let httparse::Status::Complete(len) = status else {
        return if buf.len() >= max { Err(HeadError::TooLarge(max)) } else { Ok(None) };
    };
    if len > max {
        return Err(HeadError::TooLarge(max));
    }
    let Some(version @ (0 | 1)) = req.version else {
        return Err(HeadError::Malformed("only HTTP/1.0 and HTTP/1.1 are spoken here".into()));
    };
    let headers = req
        .headers
        .iter()
        .map(|h| {
            let value = std::str::from_utf8(h.value).map_err(|_| HeadError::Malformed(format!("header {} is not UTF-8", h.name)))?;
            Ok((h.name.to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect::<Result<_, HeadError>>()?;
    let head = RequestHead {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        headers,
        version,
    };
    Ok(Some((head, len)))
}

/// Parses a response head (the hypervisor's answer to an `internal_access_path` CONNECT);
/// returns its status code and length.
pub fn parse_response(buf: &[u8], max: usize) -> Result<Option<(u16, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf).map_err(|e| HeadError::Malformed(e.to_string()))? {
        httparse::Status::Complete(len) if len <= max => Ok(Some((resp.code.unwrap_or(0), len))),
        httparse::Status::Partial if buf.len() < max => Ok(None),
        _ => Err(HeadError::TooLarge(max)),
    }
}

/// An HTTP refusal: status, reason phrase and a short plain-text explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub phrase: &'static str,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Reject {
    pub fn new(status: u16, phrase: &'static str, message: impl Into<String>) -> Self {
        Reject { status, phrase, message: message.into(), headers: Vec::new() }
    }
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    /// The response, closing the connection.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.response(false)
    }

    /// The response, saying whether the connection stays open after it.
    pub fn response(&self, keep_alive: bool) -> Vec<u8> {
        let body = format!("{}\n", self.message);
        let mut head = response_head(self.status, self.phrase, "text/plain; charset=utf-8", body.len() as u64, keep_alive);
        for (name, value) in &self.headers {
            head.insert_str(head.len() - 2, &format!("{name}: {value}\r\n"));
        }
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

/// A response head with a body of `len` bytes.
pub fn response_head(status: u16, phrase: &str, content_type: &str, len: u64, keep_alive: bool) -> String {
    let mut h = String::with_capacity(160);
    let _ = write!(h, "HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n");
    h.push_str("X-Content-Type-Options: nosniff\r\n");
    h.push_str(if keep_alive { "Connection: keep-alive\r\n" } else { "Connection: close\r\n" });
    h.push_str("\r\n");
    h
}

/// Reads until a whole request head is in `stream.prefix`, and takes it from there.
/// `Ok(None)`: closed before a request.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut crate::wire::prefixed::Prefixed<S>,
    max: usize,
) -> Result<Option<RequestHead>, Reject> {
    let mut chunk = [0u8; 2048];
    loop {
        if !stream.prefix.is_empty()
            && let Some((head, len)) = parse_request(&stream.prefix, max).map_err(|e| e.reject())?
        {
            stream.prefix.drain(..len);
            return Ok(Some(head));
        }
        let n =
            tokio::io::AsyncReadExt::read(&mut stream.io, &mut chunk).await.map_err(|e| Reject::new(400, "Bad Request", e.to_string()))?;
        if n == 0 {
            return if stream.prefix.is_empty() { Ok(None) } else { Err(Reject::new(400, "Bad Request", "connection closed mid-request")) };
        }
        stream.prefix.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /?token=abc HTTP/1.1\r\nHost: relay:6080\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nEXTRA";

    #[test]
    fn parses_a_browser_upgrade_and_leaves_the_rest() {
        let (head, len) = parse_request(UPGRADE, 8192).unwrap().unwrap();
        assert_eq!(&UPGRADE[len..], b"EXTRA");
        assert_eq!(head.method, "GET");
        assert_eq!(head.path(), "/");
        assert_eq!(head.query(), Some("token=abc"));
        assert_eq!(head.header("host"), Some("relay:6080"));
        assert!(head.header_has_token("connection", "upgrade"));
        for cut in 0..len - 1 {
            assert_eq!(parse_request(&UPGRADE[..cut], 8192), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn a_body_is_one_content_length_and_never_chunked() {
        let head = |extra: &str| parse_request(format!("GET / HTTP/1.1\r\n{extra}\r\n").as_bytes(), 8192).unwrap().unwrap().0;
        assert_eq!(head("").body_len(), Ok(0));
        assert_eq!(head("Content-Length: 12\r\n").body_len(), Ok(12));
        assert_eq!(head("Content-Length: 12\r\nContent-Length: 12, 12\r\n").body_len(), Ok(12));
        for bad in [
            "Content-Length: 1\r\nContent-Length: 2\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +5\r\n",
            "Transfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(head(bad).body_len().unwrap_err().status, 400, "{bad:?}");
        }
    }

    #[test]
    fn oversize_and_malformed_heads_are_refused() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(parse_request(big.as_bytes(), 8192), Err(HeadError::TooLarge(8192)));
        let old = parse_request(b"OPTIONS / HTTP/1.0\r\n\r\n", 8192).unwrap().unwrap().0;
        assert!(old.version == 0 && !old.keep_alive(), "HTTP/1.0 (HAProxy's health check) closes unless asked not to");
        let kept = parse_request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 8192).unwrap().unwrap().0;
        assert!(kept.keep_alive());
        assert!(parse_request(b"GET / HTTP/2.0\r\n\r\n", 8192).is_err());
        assert!(matches!(parse_request(b"\x16\x03\x01\x02\x00\x01", 8192), Err(HeadError::Malformed(_))));
        let many: String = (0..60).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse_request(req.as_bytes(), 8192), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn response_status_with_rfb_bytes_behind_it() {
        let buf = b"HTTP/1.1 200 OK\r\n\r\nRFB 003.008\n";
        let (code, len) = parse_response(buf, 4096).unwrap().unwrap();
        assert_eq!(code, 200);
        assert_eq!(&buf[len..], b"RFB 003.008\n");
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n", 4096), Ok(None));
    }

    #[test]
    fn reject_is_a_complete_response() {
        let r = Reject::new(403, "Forbidden", "invalid token").with_header("X-A", "b").to_bytes();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(text.contains("X-A: b\r\n\r\ninvalid token\n"));
        assert!(text.contains("Content-Length: 14\r\n"));
    }
}
