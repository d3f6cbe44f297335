//! PROXY protocol headers from a trusted balancer, or from anyone pretending to be one:
//! the parser must never panic, never ask for bytes past a header it has finished, and
//! never accept more than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay::wire::proxy::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    // Fed as a reader feeds it: a prefix, grown by what it asks for.
    let mut at = 0;
    while at <= data.len() {
        match parse(&data[..at]) {
            Ok(Parsed::Done(_, len)) => {
                assert_eq!(len, at);
                break;
            }
            Ok(Parsed::Need(n)) => {
                assert!(n > 0);
                at += n;
            }
            Err(_) => break,
        }
    }
});
