//! A hostile or broken hypervisor: any bytes, cut anywhere.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay::rfb::Handshake;
use relay::rfb::hypervisor::{HypervisorAuth, HypervisorHandshake, Scheme};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let auth = HypervisorAuth { schemes: vec![Scheme::Vencrypt, Scheme::Vnc, Scheme::None], vnc_password: Some("pw".into()), plain_username: Some("u".into()) };
    let mut machine = HypervisorHandshake::new(auth);
    let mut out = Vec::new();
    let cut = (cut as usize).min(data.len());
    let mut buf = data[..cut].to_vec();
    for rest in [&data[cut..], &[][..]] {
        let (used, progress) = machine.advance(&buf, &mut out);
        assert!(used <= buf.len());
        if !matches!(progress, relay::rfb::Progress::NeedMore) {
            return;
        }
        buf.drain(..used);
        buf.extend_from_slice(rest);
    }
});
