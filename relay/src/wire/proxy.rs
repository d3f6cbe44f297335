//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a TCP load balancer puts
//! before a connection's first byte to say whom it carries. Sans-I/O: [`parse`] says how
//! many more bytes it needs at least, so a reader never takes a byte of what follows
//! (which may be a TLS ClientHello or an HTTP request).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// v2's signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1's longest header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// v1's shortest header: `PROXY UNKNOWN\r\n`.
const V1_MIN: usize = 15;
/// Most address and TLV bytes a v2 header may carry here: addresses take at most 216
/// (AF_UNIX); TLVs (ALPN, authority, SSL, unique id) fit easily in the rest.
const V2_MAX_BODY: usize = 1024;

/// What the balancer says: the viewer's address, or `None` for a connection of its own
/// (v2 `LOCAL`, v1 `UNKNOWN`: a health check) or a family relay does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    pub source: Option<SocketAddr>,
    pub version: u8,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The header, and its length (exactly what was given).
    Done(Proxied, usize),
    /// At least this many more bytes are needed, all of them header.
    Need(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad PROXY protocol header: {0}")]
pub struct ProxyError(&'static str);

/// Parses the header at the start of `buf`, which holds nothing past it.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let first = buf.first().copied();
    match first {
        None => Ok(Parsed::Need(1)),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyError("the connection does not start with one")),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(ProxyError("v1 must start with \"PROXY \""));
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError("v1 header longer than 107 bytes"));
        }
        // Short of the shortest header, all of that is header; past it, a byte at a time.
        return Ok(Parsed::Need(V1_MIN.saturating_sub(buf.len()).max(1)));
    };
    if end + 2 != buf.len() {
        return Err(ProxyError("v1 header followed by bytes given to the parser"));
    }
    let line = std::str::from_utf8(&buf[prefix.len()..end]).map_err(|_| ProxyError("v1 header is not ASCII"))?;
    let mut words = line.split(' ');
    let source = match words.next() {
        Some("UNKNOWN") => None,
        Some(family @ ("TCP4" | "TCP6")) => {
            let (src, _dst, sport, _dport) = (words.next(), words.next(), words.next(), words.next());
            let (Some(src), Some(sport), None) = (src, sport, words.next()) else {
                return Err(ProxyError("v1 needs source, destination and both ports"));
            };
            let ip: IpAddr = src.parse().map_err(|_| ProxyError("v1 source address"))?;
            if ip.is_ipv4() != (family == "TCP4") {
                return Err(ProxyError("v1 address does not match its family"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError("v1 family must be TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Parsed::Done(Proxied { source, version: 1 }, buf.len()))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError("v2 signature"));
    }
    if buf.len() < 16 {
        return Ok(Parsed::Need(16 - buf.len()));
    }
    let (version_command, family) = (buf[12], buf[13]);
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if version_command >> 4 != 2 {
        return Err(ProxyError("v2 version"));
    }
    if len > V2_MAX_BODY {
        return Err(ProxyError("v2 header too long"));
    }
    if buf.len() < 16 + len {
        return Ok(Parsed::Need(16 + len - buf.len()));
    }
    if buf.len() > 16 + len {
        return Err(ProxyError("v2 header followed by bytes given to the parser"));
    }
    let body = &buf[16..];
    let source = match (version_command & 0x0f, family) {
        // LOCAL: the balancer's own connection; its addresses mean nothing.
        (0x0, _) => None,
        (0x1, 0x11) if len >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]])))
        }
        (0x1, 0x21) if len >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be_bytes([body[32], body[33]])))
        }
        (0x1, 0x11 | 0x21) => return Err(ProxyError("v2 addresses shorter than their family needs")),
        // UNSPEC, UDP, AF_UNIX: not a TCP viewer relay can name.
        (0x1, _) => None,
        _ => return Err(ProxyError("v2 command")),
    };
    Ok(Parsed::Done(Proxied { source, version: 2 }, buf.len()))
}

/// Reads exactly one header from `stream`, never a byte beyond it.
pub async fn read<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Proxied> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::with_capacity(V1_MAX);
    loop {
        match parse(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))? {
            Parsed::Done(proxied, _) => return Ok(proxied),
            Parsed::Need(n) => {
                let at = buf.len();
                buf.resize(at + n, 0);
                stream.read_exact(&mut buf[at..]).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `header` as a reader would, one `Need` at a time.
    fn feed(header: &[u8]) -> Result<Proxied, ProxyError> {
        let mut at = 0;
        loop {
            match parse(&header[..at])? {
                Parsed::Done(p, len) => {
                    assert_eq!(len, header.len(), "the whole header, nothing past it");
                    return Ok(p);
                }
                Parsed::Need(n) => {
                    assert!(at + n <= header.len(), "asked past the header at {at} (+{n})");
                    at += n;
                }
            }
        }
    }

    #[test]
    fn version_1() {
        let p = feed(b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 6080\r\n").unwrap();
        assert_eq!(p, Proxied { source: Some("198.51.100.7:51234".parse().unwrap()), version: 1 });
        let p = feed(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 6081\r\n").unwrap();
        assert_eq!(p.source, Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(feed(b"PROXY UNKNOWN\r\n").unwrap().source, None);
        for bad in
            [&b"PROXY TCP4 2001:db8::7 1.2.3.4 1 2\r\n"[..], b"PROXY TCP4 1.2.3.4\r\n", b"PROXY SCTP a b 1 2\r\n", b"GET / HTTP/1.1\r\n"]
        {
            assert!(feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&[b'P'; 200]).is_err(), "no endless line");
    }

    #[test]
    fn version_2() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([0x21, 0x11, 0, 12, 198, 51, 100, 7, 203, 0, 113, 1, 0xc8, 0x22, 0x17, 0xc0]);
        assert_eq!(feed(&h).unwrap(), Proxied { source: Some("198.51.100.7:51234".parse().unwrap()), version: 2 });
        // With a TLV after the addresses (HAProxy's unique id, say).
        let mut t = V2_SIGNATURE.to_vec();
        t.extend([0x21, 0x11, 0, 17, 10, 0, 0, 9, 10, 0, 0, 1, 0x13, 0x88, 0x17, 0xc0, 0x05, 0, 2, b'i', b'd']);
        assert_eq!(feed(&t).unwrap().source, Some("10.0.0.9:5000".parse().unwrap()));
        let mut v6 = V2_SIGNATURE.to_vec();
        v6.extend([0x21, 0x21, 0, 36]);
        v6.extend(std::iter::repeat_n(0u8, 15).chain([1]));
        v6.extend([0u8; 16]);
        v6.extend([0x9c, 0x40, 0, 80]);
        assert_eq!(feed(&v6).unwrap().source, Some("[::1]:40000".parse().unwrap()));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(feed(&local).unwrap().source, None, "LOCAL: the balancer's health check");
        let mut short = V2_SIGNATURE.to_vec();
        short.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(feed(&short).is_err());
        let mut long = V2_SIGNATURE.to_vec();
        long.extend([0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&long).is_err(), "a bounded header");
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend([0x31, 0x11, 0, 0]);
        assert!(parse(&v3).is_err());
    }

    #[tokio::test]
    async fn a_reader_leaves_what_follows() {
        let mut input: &[u8] = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 6081\r\nCONNECT /console?token=t HTTP/1.1\r\n\r\n";
        let p = read(&mut input).await.unwrap();
        assert_eq!(p.source, Some("192.0.2.1:1000".parse().unwrap()));
        assert!(input.starts_with(b"CONNECT "), "the request is still there");
    }
}
