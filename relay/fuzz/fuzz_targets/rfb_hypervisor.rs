//! A hostile or broken hypervisor: any bytes, cut anywhere.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay::auth::Scheme;
use relay::rfb::hypervisor::{HypervisorAuth, HypervisorHandshake};

mod split_feed;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let auth = HypervisorAuth {
        schemes: vec![Scheme::Vencrypt, Scheme::Vnc, Scheme::None],
        vnc_password: Some("pw".into()),
        plain_username: Some("u".into()),
    };
    split_feed::feed(HypervisorHandshake::new(auth), cut, data);
});
