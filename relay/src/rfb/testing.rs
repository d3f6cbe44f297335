//! Drives handshake machines from byte scripts in unit tests.

use super::{Handshake, Progress};
use std::fmt::Debug;

/// Feeds `chunks` one after another, as if each arrived in its own read.
/// Returns everything the machine queued, where it ended, and the unconsumed bytes.
pub fn run<H: Handshake>(mut machine: H, chunks: &[&[u8]]) -> (Vec<u8>, Progress<H::Done>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunks = chunks.iter();
    loop {
        let (used, progress) = machine.advance(&buf, &mut out);
        buf.drain(..used);
        match progress {
            Progress::NeedMore => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => return (out, Progress::NeedMore, buf),
            },
            done => {
                chunks.for_each(|c| buf.extend_from_slice(c));
                return (out, done, buf);
            }
        }
    }
}

/// Splitting the input anywhere, or feeding it a byte at a time, must give the same
/// output and outcome as feeding it whole; every proper prefix must ask for more
/// (or fail the same way, once the failing message is complete).
pub fn check_every_split<H, F>(make: F, input: &[u8])
where
    H: Handshake,
    H::Done: Debug + PartialEq,
    F: Fn() -> H,
{
    let whole = run(make(), &[input]);
    for cut in 0..=input.len() {
        let split = run(make(), &[&input[..cut], &input[cut..]]);
        assert_eq!(split, whole, "split at {cut}");
    }
    for cut in 0..input.len() {
        let (out, progress, _) = run(make(), &[&input[..cut]]);
        assert!(whole.0.starts_with(&out), "prefix {cut} sent bytes the whole input did not");
        assert!(progress == Progress::NeedMore || progress == whole.1, "prefix {cut} ended as {progress:?}");
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(run(make(), &bytes), whole, "byte at a time");
}
