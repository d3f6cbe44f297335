//! Where log lines go: standard error, written by a thread of its own.
//!
//! A console's worker thread never waits on the log's reader (journald, a pipe, a
//! terminal). Were it to write itself, a reader that stalls would block the write, then
//! the worker, then every console on it. Lines wait in a queue instead; past
//! [`QUEUE_BYTES`] of them a line is dropped and counted. The count is exported
//! (`log_lines_dropped`) and named by an audit event once lines flow again, so a gap in
//! the audit trail is never silent.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Lines waiting for the writer thread, at most (about 10,000 audit events).
pub const QUEUE_BYTES: usize = 4 << 20;

/// How long the exit waits for queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// A queue of lines and the thread that writes them out.
struct Sink {
    lines: Sender<Vec<u8>>,
    counts: Arc<Counts>,
    limit: usize,
}

#[derive(Default)]
struct Counts {
    queued: AtomicUsize,
    dropped: AtomicU64,
}

impl Sink {
    /// `report` is called on the writer thread with how many lines were dropped, once
    /// the next line is out.
    fn start(limit: usize, out: impl Write + Send + 'static, report: fn(u64)) -> std::io::Result<Sink> {
        let (lines, queue) = channel();
        let counts = Arc::new(Counts::default());
        let theirs = counts.clone();
        std::thread::Builder::new().name("relay-log".into()).spawn(move || write_out(queue, out, &theirs, report))?;
        Ok(Sink { lines, counts, limit })
    }

    fn push(&self, line: &[u8]) {
        let counts = &self.counts;
        if counts.queued.fetch_add(line.len(), Ordering::AcqRel) + line.len() > self.limit || self.lines.send(line.to_vec()).is_err() {
            counts.queued.fetch_sub(line.len(), Ordering::AcqRel);
            counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every queued line is written, or `wait` has passed.
    fn flush(&self, wait: Duration) {
        let until = Instant::now() + wait;
        while self.counts.queued.load(Ordering::Acquire) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The writer thread: each line out, then news of the lines dropped meanwhile.
fn write_out(queue: Receiver<Vec<u8>>, mut out: impl Write, counts: &Counts, report: fn(u64)) {
    let mut reported = 0;
    while let Ok(line) = queue.recv() {
        // A failed write (the reader is gone) loses the line, as it would have anyway.
        let _ = out.write_all(&line);
        counts.queued.fetch_sub(line.len(), Ordering::AcqRel);
        let dropped = counts.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            report(dropped - reported);
            reported = dropped;
        }
    }
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Starts the writer thread; until then (and should it fail to start) a line is written
/// by the thread that logs it. Called once the start-up steps that must run before any
/// other thread exists (socket activation reads and clears its environment) are done.
pub fn start() {
    match Sink::start(QUEUE_BYTES, std::io::stderr(), report_dropped) {
        Ok(sink) => {
            let _ = SINK.set(sink);
        }
        Err(e) => eprintln!("relay: could not start the log writer thread ({e}); each line is written where it is logged"),
    }
}

fn report_dropped(n: u64) {
    tracing::warn!(target: crate::telemetry::AUDIT, event = "log_lines_dropped", dropped = n, "log lines were dropped: the log's reader did not keep up");
}

/// Log lines dropped since start because the log's reader fell behind.
pub fn dropped_lines() -> u64 {
    SINK.get().map_or(0, |s| s.counts.dropped.load(Ordering::Relaxed))
}

/// Waits (at most 2 s) for the queued lines to be written: for the exit.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush(FLUSH_WAIT);
    }
}

/// For `tracing_subscriber::fmt`, which writes each event with one `write_all`.
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match SINK.get() {
            Some(sink) => sink.push(buf),
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc::sync_channel;

    /// An output that takes nothing until its gate opens, then keeps what it was given.
    struct Gated {
        gate: Arc<Mutex<()>>,
        kept: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.kept.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static REPORTED: AtomicU64 = AtomicU64::new(0);

    #[test]
    fn a_stalled_reader_costs_dropped_lines_counted_and_reported_never_a_blocked_logger() {
        let (gate, kept) = (Arc::new(Mutex::new(())), Arc::new(Mutex::new(Vec::new())));
        let closed = gate.lock().unwrap();
        let sink = Sink::start(1000, Gated { gate: gate.clone(), kept: kept.clone() }, |n| {
            REPORTED.fetch_add(n, Ordering::Relaxed);
        })
        .unwrap();
        // 300 lines of 10 bytes while the output takes nothing: this thread goes on.
        let (done, pushed) = sync_channel(1);
        let logger = std::thread::spawn({
            let sink_lines = (0..300).map(|i| format!("line {i:04}\n")).collect::<Vec<_>>();
            move || {
                for line in &sink_lines {
                    sink.push(line.as_bytes());
                }
                done.send(()).unwrap();
                sink
            }
        });
        pushed.recv_timeout(Duration::from_secs(5)).expect("logging went on while the output was stalled");
        let sink = logger.join().unwrap();
        // The writer holds one line; 1,000 bytes (100 lines) wait; the rest are dropped.
        let dropped = sink.counts.dropped.load(Ordering::Relaxed);
        assert!((199..=200).contains(&dropped), "{dropped} dropped");
        drop(closed);
        sink.flush(Duration::from_secs(5));
        let out = String::from_utf8(kept.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len() as u64, 300 - dropped);
        assert_eq!(lines[0], "line 0000", "the first lines, in order");
        assert!(lines.windows(2).all(|w| w[0] < w[1]), "in order");
        // The report comes once a line is out after the drops.
        sink.push(b"after\n");
        sink.flush(Duration::from_secs(5));
        assert_eq!(REPORTED.load(Ordering::Relaxed), dropped);
    }
}
