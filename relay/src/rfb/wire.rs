//! Byte-level helpers shared by both handshake machines.

use super::{MAX_REASON_BYTES, RfbError};

/// What a handshake machine says after being fed bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress<T> {
    /// Feed more bytes (after sending whatever was queued).
    NeedMore,
    /// Negotiation finished; bytes not consumed belong to the next phase.
    Done(T),
    /// Negotiation failed; anything queued (a failure message) should still be sent.
    Failed(RfbError),
}

/// The protocol versions relay speaks. Others are mapped onto these as the RFB
/// specification asks (3.4–3.6 and Apple's 3.889 behave as 3.3; anything newer as 3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V3_3,
    V3_7,
    V3_8,
}

pub const VERSION_LEN: usize = 12;

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V3_3 => "3.3",
            Version::V3_7 => "3.7",
            Version::V3_8 => "3.8",
        })
    }
}

impl Version {
    pub fn greeting(self) -> &'static [u8; VERSION_LEN] {
        match self {
            Version::V3_3 => b"RFB 003.003\n",
            Version::V3_7 => b"RFB 003.007\n",
            Version::V3_8 => b"RFB 003.008\n",
        }
    }

    /// Parses a 12-byte ProtocolVersion message.
    pub fn parse(msg: &[u8]) -> Result<Version, RfbError> {
        let text = || String::from_utf8_lossy(msg).trim_end().to_string();
        let digits = |r: std::ops::Range<usize>| -> Option<u32> {
            let s = std::str::from_utf8(&msg[r]).ok()?;
            s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok())?
        };
        if msg.len() != VERSION_LEN || &msg[..4] != b"RFB " || msg[7] != b'.' || msg[11] != b'\n' {
            return Err(RfbError::NotRfb(text()));
        }
        let (Some(major), Some(minor)) = (digits(4..7), digits(8..11)) else {
            return Err(RfbError::NotRfb(text()));
        };
        match (major, minor) {
            (3, 889) => Ok(Version::V3_3),
            (3, 0..=2) | (0..=2, _) => Err(RfbError::UnsupportedVersion(text())),
            (3, 3..=6) => Ok(Version::V3_3),
            (3, 7) => Ok(Version::V3_7),
            _ => Ok(Version::V3_8),
        }
    }
}

/// A read cursor over the unconsumed input. Messages are taken whole or not at all.
pub struct Input<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Input { buf, pos: 0 }
    }
    pub fn consumed(&self) -> usize {
        self.pos
    }
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let rest = self.rest();
        (rest.len() >= n).then(|| {
            self.pos += n;
            &rest[..n]
        })
    }
    /// The next `n` bytes without consuming them.
    pub fn peek(&self, n: usize) -> Option<&'a [u8]> {
        self.rest().get(..n)
    }
    pub fn u8_peek(&self) -> Option<u8> {
        self.rest().first().copied()
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u8 count followed by that many bytes.
    pub fn u8_list(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest();
        let n = *rest.first()? as usize;
        (rest.len() > n).then(|| {
            self.pos += 1 + n;
            &rest[1..1 + n]
        })
    }
    /// A u32 length followed by that many bytes of text (a failure reason).
    /// Trailing NULs (QEMU sends one) are dropped.
    pub fn reason(&mut self) -> Result<Option<String>, RfbError> {
        let rest = self.rest();
        let Some(len) = rest.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_REASON_BYTES {
            return Err(RfbError::TooLong("failure reason"));
        }
        if rest.len() < 4 + len {
            return Ok(None);
        }
        self.pos += 4 + len;
        let text = String::from_utf8_lossy(&rest[4..4 + len]);
        Ok(Some(text.trim_end_matches('\0').to_string()))
    }
}

/// Appends a u32 length and the reason text.
pub fn put_reason(out: &mut Vec<u8>, reason: &str) {
    let bytes = &reason.as_bytes()[..reason.len().min(MAX_REASON_BYTES)];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A sans-I/O handshake: fed the unconsumed input, it appends what to send to `out`
/// and says how many input bytes it consumed and whether it is finished.
pub trait Handshake {
    type Done;
    fn advance(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Progress<Self::Done>);
}

/// A machine driven in phases (VeNCrypt: before and inside TLS) is lent, not moved.
impl<H: Handshake> Handshake for &mut H {
    type Done = H::Done;
    fn advance(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Progress<H::Done>) {
        (**self).advance(input, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_map_as_the_spec_asks() {
        assert_eq!(Version::parse(b"RFB 003.008\n"), Ok(Version::V3_8));
        assert_eq!(Version::parse(b"RFB 003.007\n"), Ok(Version::V3_7));
        assert_eq!(Version::parse(b"RFB 003.003\n"), Ok(Version::V3_3));
        assert_eq!(Version::parse(b"RFB 003.005\n"), Ok(Version::V3_3));
        assert_eq!(Version::parse(b"RFB 003.889\n"), Ok(Version::V3_3));
        assert_eq!(Version::parse(b"RFB 004.001\n"), Ok(Version::V3_8));
        assert!(matches!(Version::parse(b"RFB 002.000\n"), Err(RfbError::UnsupportedVersion(_))));
        assert!(matches!(Version::parse(b"HTTP/1.1 200"), Err(RfbError::NotRfb(_))));
        assert!(matches!(Version::parse(b"RFB 0a3.008\n"), Err(RfbError::NotRfb(_))));
        assert!(matches!(Version::parse(b"RFB +03.008\n"), Err(RfbError::NotRfb(_))));
    }

    #[test]
    fn oversize_reason_is_refused_before_it_is_buffered() {
        let mut msg = (MAX_REASON_BYTES as u32 + 1).to_be_bytes().to_vec();
        msg.push(b'x');
        assert_eq!(Input::new(&msg).reason(), Err(RfbError::TooLong("failure reason")));
    }

    #[test]
    fn reason_drops_trailing_nul() {
        let msg = [0, 0, 0, 4, b'b', b'a', b'd', 0];
        assert_eq!(Input::new(&msg).reason(), Ok(Some("bad".into())));
    }
}
