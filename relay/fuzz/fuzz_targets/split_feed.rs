//! Feeds a handshake machine the fuzz input in two reads, cut where the first byte says.

use relay::rfb::{Handshake, Progress};

/// `data[0]` picks the cut; the rest is what the peer sends.
pub fn feed<H: Handshake>(mut machine: H, cut: u8, data: &[u8]) {
    let mut out = Vec::new();
    let cut = (cut as usize).min(data.len());
    let mut buf = data[..cut].to_vec();
    for rest in [&data[cut..], &[][..]] {
        let (used, progress) = machine.advance(&buf, &mut out);
        assert!(used <= buf.len(), "consumed more than it was given");
        if !matches!(progress, Progress::NeedMore) {
            return;
        }
        buf.drain(..used);
        buf.extend_from_slice(rest);
    }
}
