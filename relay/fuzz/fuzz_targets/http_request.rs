//! Request heads from anyone on the network: parsing, then everything a door derives
//! from the head (token, Origin, Host, body length, upgrade, web path), must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay::front::{origin, token_param, web, ws};
use relay::wire::http;

fuzz_target!(|data: &[u8]| {
    let _ = http::parse_response(data, 4096);
    if let Ok(Some((head, len))) = http::parse_request(data, 8192) {
        assert!(len <= data.len());
        let _ = token_param::from_request(&head);
        // The web door's decisions: the body to drop, the Host to serve.
        let _ = head.body_len();
        let _ = origin::check_host(head.header("host"), &["console.example".into(), "[::1]:6080".into()]);
        let _ = origin::check(head.header("origin"), head.header("host"), "http", &["panel.example".into()]);
        if let Ok(up) = ws::check(&head) {
            let _ = up.response();
        }
        if let Ok(path) = web::resolve(std::path::Path::new("/srv/web"), head.path()) {
            assert!(path.starts_with("/srv/web"));
        }
    }
});
