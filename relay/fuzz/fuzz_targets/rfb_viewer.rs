//! A hostile or broken viewer: any bytes, cut anywhere.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay::rfb::viewer::{ViewerAuth, ViewerHandshake};

mod split_feed;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let auth = if cut % 2 == 0 { ViewerAuth::None } else { ViewerAuth::Password("pw".into()) };
    split_feed::feed(ViewerHandshake::new(auth, [7; 16]), cut, data);
});
