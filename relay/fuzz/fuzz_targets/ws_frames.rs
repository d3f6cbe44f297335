//! WebSocket frame decoding: cut anywhere, the input must decode to the same bytes (or
//! the same refusal) as decoded whole, and never to more bytes than came in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::wire::ws_frame::Decoder;

fn decode(pieces: &[&[u8]]) -> (Vec<u8>, bool, bool) {
    let mut d = Decoder::new(1 << 16);
    let mut out = Vec::new();
    for piece in pieces {
        let mut buf = piece.to_vec();
        match d.decode(&mut buf) {
            Ok(n) => {
                assert!(n <= buf.len(), "more bytes out than in");
                out.extend_from_slice(&buf[..n]);
            }
            Err(_) => return (out, true, d.closed()),
        }
    }
    (out, false, d.closed())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = (cut as usize).min(rest.len());
    let whole = decode(&[rest]);
    let split = decode(&[&rest[..cut], &rest[cut..]]);
    assert_eq!(whole.1, split.1, "refused whole and in pieces alike");
    if !whole.1 {
        assert_eq!(whole, split, "the same bytes however the input is cut");
    }
});
