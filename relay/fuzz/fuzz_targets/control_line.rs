//! Control socket lines: any bytes are a request, a blank line, or a typed refusal, never a
//! panic; a request that parses survives a round trip through its own serialisation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay::control::server::parse_line;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(envelope)) = parse_line(data) {
        let again = serde_json::to_vec(&envelope).expect("a parsed request serialises");
        assert!(matches!(parse_line(&again), Ok(Some(_))), "a parsed request parses again");
    }
});
