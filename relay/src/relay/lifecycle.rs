//! The life of an established console, with one set of rules for every back-end.
//!
//! - Each [`Direction`] ends once its sender's end of stream has been passed on; the
//!   console ends when both have, when a side fails, or when relay ends it (a forced
//!   disconnect, the idle timeout, a half-close that lasts too long).
//! - **The first end is the cause.** A side that closes or fails first names the end;
//!   what the other side does after that (a browser resetting once it got a WebSocket
//!   Close, a TLS hypervisor closing without close_notify once relay sent its own) is a
//!   consequence, logged at debug level, never the reason.
//! - **One classification of failures** ([`FailureKind`]): a reset, refused or aborted
//!   connection is passed on to the other side as a reset; anything else is not. A TLS
//!   peer that closes its TCP stream without close_notify has ended its stream
//!   ([`is_truncation`]): the other side gets the same clean end as from a plain peer.
//! - **One clock** for idleness and half-close ([`Lifecycle::next_wake`]).

use super::Limits;
use std::fmt;
use std::io;
use std::time::Duration;
use tokio::time::Instant;

/// One of the two connections of a console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Viewer,
    Hypervisor,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Viewer => Side::Hypervisor,
            Side::Hypervisor => Side::Viewer,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Viewer => "viewer",
            Side::Hypervisor => "hypervisor",
        }
    }
}

/// One direction of a console's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Viewer → hypervisor: input events, update requests.
    Up,
    /// Hypervisor → viewer: the screen.
    Down,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Up, Direction::Down];

    /// The side this direction reads from.
    pub fn from(self) -> Side {
        match self {
            Direction::Up => Side::Viewer,
            Direction::Down => Side::Hypervisor,
        }
    }

    /// The side this direction writes to.
    pub fn to(self) -> Side {
        self.from().other()
    }

    /// Index into per-direction arrays: 0 up, 1 down.
    pub fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// What relay was doing with a side's connection when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Moving the console between back-ends.
    HandOff,
}

/// The one classification of failures every back-end uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The peer reset the connection, or it was aborted under relay: the other side is
    /// told with a reset of its own.
    Reset,
    /// The peer broke the protocol relay reads on that side (WebSocket framing).
    Protocol,
    /// Anything else (a kernel error, relay's own limits).
    Other,
}

impl FailureKind {
    pub fn of(e: &io::Error) -> FailureKind {
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            io::ErrorKind::InvalidData => FailureKind::Protocol,
            _ => FailureKind::Other,
        }
    }
}

/// A TLS peer that closed its TCP stream without close_notify. On a console this is how
/// QEMU ends a VeNCrypt session, and how browsers often end `wss://`: the end of that
/// side's stream, not an error. (RFB has no length framing for a cut to go unnoticed in:
/// the viewer sees the console end either way.)
pub fn is_truncation(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof
}

/// Whose connection failed, doing what, how, and the error itself.
#[derive(Debug)]
pub struct Failure {
    pub side: Side,
    pub op: Op,
    pub kind: FailureKind,
    pub source: io::Error,
}

impl Failure {
    pub fn new(side: Side, op: Op, source: io::Error) -> Failure {
        Failure { side, op, kind: FailureKind::of(&source), source }
    }

    /// Reading from `dir`'s sender failed.
    pub fn reading(dir: Direction, source: io::Error) -> Failure {
        Failure::new(dir.from(), Op::Read, source)
    }

    /// Writing to `dir`'s receiver failed.
    pub fn writing(dir: Direction, source: io::Error) -> Failure {
        Failure::new(dir.to(), Op::Write, source)
    }

    /// The side that must see a reset because of this failure, if any.
    pub fn reset_to(&self) -> Option<Side> {
        (self.kind == FailureKind::Reset).then(|| self.side.other())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Read => "reading",
            Op::Write => "writing",
            Op::HandOff => "handing off",
        };
        match self.kind {
            FailureKind::Reset => write!(f, "{} reset the connection", self.side.name()),
            _ => write!(f, "{} error ({op}): {}", self.side.name(), self.source),
        }
    }
}

/// How a console ended.
#[derive(Debug)]
pub enum Ended {
    /// This side ended its stream first (FIN, WebSocket Close, TLS close with or without
    /// close_notify); the other followed, or relay ended the console meanwhile for a
    /// failure that came after.
    Closed(Side),
    /// This side's connection failed first.
    Failed(Failure),
    /// Ended from outside (forced disconnect, shutdown), with the reason given.
    Stopped(String),
    Idle,
    HalfCloseTimeout,
}

impl Ended {
    /// A stable name for counting ends by cause.
    pub fn cause(&self) -> Cause {
        match self {
            Ended::Closed(Side::Viewer) => Cause::ViewerClosed,
            Ended::Closed(Side::Hypervisor) => Cause::HypervisorClosed,
            Ended::Failed(f) => match (f.side, f.kind) {
                (Side::Viewer, FailureKind::Reset) => Cause::ViewerReset,
                (Side::Hypervisor, FailureKind::Reset) => Cause::HypervisorReset,
                (Side::Viewer, _) => Cause::ViewerError,
                (Side::Hypervisor, _) => Cause::HypervisorError,
            },
            Ended::Stopped(_) => Cause::Disconnected,
            Ended::Idle => Cause::Idle,
            Ended::HalfCloseTimeout => Cause::HalfClosedTooLong,
        }
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed(side) => write!(f, "{} closed", side.name()),
            Ended::Failed(failure) => failure.fmt(f),
            Ended::Stopped(r) => write!(f, "disconnected: {r}"),
            Ended::Idle => f.write_str("idle timeout"),
            Ended::HalfCloseTimeout => f.write_str("half-closed too long"),
        }
    }
}

/// Why consoles end, as counted in `stats` (`ended`) and named in the audit log
/// (`cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    ViewerClosed,
    HypervisorClosed,
    ViewerReset,
    HypervisorReset,
    ViewerError,
    HypervisorError,
    Disconnected,
    Idle,
    HalfClosedTooLong,
}

impl Cause {
    pub const ALL: [Cause; 9] = [
        Cause::ViewerClosed,
        Cause::HypervisorClosed,
        Cause::ViewerReset,
        Cause::HypervisorReset,
        Cause::ViewerError,
        Cause::HypervisorError,
        Cause::Disconnected,
        Cause::Idle,
        Cause::HalfClosedTooLong,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cause::ViewerClosed => "viewer_closed",
            Cause::HypervisorClosed => "hypervisor_closed",
            Cause::ViewerReset => "viewer_reset",
            Cause::HypervisorReset => "hypervisor_reset",
            Cause::ViewerError => "viewer_error",
            Cause::HypervisorError => "hypervisor_error",
            Cause::Disconnected => "disconnected",
            Cause::Idle => "idle",
            Cause::HalfClosedTooLong => "half_closed_too_long",
        }
    }
}

/// The sooner of two optional times.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A console's state between its start and its end: which directions have finished,
/// the first end seen, and the two timers.
/// Every idle console holds one, so it borrows its limits rather than copy them.
pub struct Lifecycle<'a> {
    limits: &'a Limits,
    first: Option<Ended>,
    finished: [bool; 2],
    half_close_at: Option<Instant>,
    idle: Option<IdleClock>,
}

impl<'a> Lifecycle<'a> {
    /// A console whose byte counts are `bytes` now.
    pub fn new(limits: &'a Limits, bytes: (u64, u64)) -> Lifecycle<'a> {
        Lifecycle {
            limits,
            first: None,
            finished: [false; 2],
            half_close_at: None,
            idle: limits.idle_timeout().map(|timeout| IdleClock::new(timeout, bytes)),
        }
    }

    /// `dir` has passed its sender's end of stream on. True once both directions have:
    /// the console is over.
    pub fn finished(&mut self, dir: Direction) -> bool {
        self.finished[dir.index()] = true;
        self.first.get_or_insert(Ended::Closed(dir.from()));
        self.half_close_at.get_or_insert_with(|| Instant::now() + self.limits.half_close_timeout());
        self.finished == [true; 2]
    }

    /// A side failed: the console is over. Returns the side that must see a reset, if any.
    pub fn failed(&mut self, failure: Failure) -> Option<Side> {
        let reset_to = failure.reset_to();
        match &self.first {
            None => self.first = Some(Ended::Failed(failure)),
            Some(first) => tracing::debug!(cause = %first, then = %failure, "after the console's end"),
        }
        reset_to
    }

    /// When [`Lifecycle::wake`] must next look: the idle clock's next check or the
    /// half-close deadline, whichever comes first (None: no timer is armed).
    pub fn next_wake(&self) -> Option<Instant> {
        earliest(self.idle.as_ref().map(|c| c.next_check), self.half_close_at)
    }

    /// Called at [`Lifecycle::next_wake`] with the console's byte counts (both ways,
    /// whichever layer moved them): the end relay must impose now, if any.
    pub fn wake(&mut self, bytes: (u64, u64)) -> Option<Ended> {
        let now = Instant::now();
        if self.half_close_at.is_some_and(|at| at <= now) {
            return Some(Ended::HalfCloseTimeout);
        }
        let clock = self.idle.as_mut().filter(|c| c.next_check <= now)?;
        let timeout = self.limits.idle_timeout()?;
        clock.idle(timeout, bytes, now).then_some(Ended::Idle)
    }

    /// How the console ended, once [`Lifecycle::finished`] said so or a side failed.
    pub fn into_ended(self) -> Ended {
        self.first.unwrap_or(Ended::Closed(Side::Viewer))
    }
}

/// Idleness, judged on a coarse clock from the byte counts, so that busy consoles pay
/// nothing per byte for it. A console idle for the timeout ends within an eighth of the
/// timeout past it, plus one look (the last byte is noticed at the next look).
struct IdleClock {
    /// Bytes both ways together at the last change (they only grow, so the sum tells).
    last_bytes: u64,
    last_change: Instant,
    next_check: Instant,
}

impl IdleClock {
    fn new(timeout: Duration, bytes: (u64, u64)) -> IdleClock {
        let now = Instant::now();
        IdleClock { last_bytes: bytes.0 + bytes.1, last_change: now, next_check: now + Self::every(timeout) }
    }

    /// How often the clock looks.
    fn every(timeout: Duration) -> Duration {
        (timeout / 8).max(Duration::from_millis(50))
    }

    fn idle(&mut self, timeout: Duration, (up, down): (u64, u64), now: Instant) -> bool {
        self.next_check = now + Self::every(timeout);
        let bytes = up + down;
        if bytes != self.last_bytes {
            (self.last_bytes, self.last_change) = (bytes, now);
            return false;
        }
        now.duration_since(self.last_change) >= timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(idle: Option<Duration>) -> Limits {
        Limits::new(4096, idle, Duration::from_secs(10), None)
    }

    fn reset(side: Side) -> Failure {
        Failure::new(side, Op::Read, io::ErrorKind::ConnectionReset.into())
    }

    #[test]
    fn the_first_end_is_the_cause_and_a_later_reset_only_a_consequence() {
        let limits = limits(None);
        let mut life = Lifecycle::new(&limits, (0, 0));
        assert!(!life.finished(Direction::Down), "one direction left");
        // The viewer resets after the hypervisor's end reached it.
        assert_eq!(life.failed(reset(Side::Viewer)), Some(Side::Hypervisor), "a reset is still passed on");
        let ended = life.into_ended();
        assert_eq!(ended.cause(), Cause::HypervisorClosed, "{ended}");
    }

    #[test]
    fn a_failure_first_is_the_cause_and_only_resets_are_passed_on() {
        let limits = limits(None);
        let mut life = Lifecycle::new(&limits, (0, 0));
        let broken = Failure::new(Side::Viewer, Op::Read, io::Error::new(io::ErrorKind::InvalidData, "unmasked frame"));
        assert_eq!(life.failed(broken), None);
        let ended = life.into_ended();
        assert_eq!(ended.cause(), Cause::ViewerError);
        assert_eq!(ended.to_string(), "viewer error (reading): unmasked frame");
        for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::ConnectionAborted, io::ErrorKind::BrokenPipe] {
            assert_eq!(Failure::writing(Direction::Up, kind.into()).reset_to(), Some(Side::Viewer), "{kind:?}");
        }
        assert_eq!(Failure::writing(Direction::Up, io::ErrorKind::TimedOut.into()).reset_to(), None);
    }

    #[test]
    fn both_directions_finished_is_the_end_named_by_the_first() {
        let limits = limits(None);
        let mut life = Lifecycle::new(&limits, (0, 0));
        assert!(life.next_wake().is_none(), "no timer armed while both directions are open");
        assert!(!life.finished(Direction::Up));
        assert!(life.next_wake().is_some(), "the half-close clock runs");
        assert!(life.finished(Direction::Down));
        assert_eq!(life.into_ended().cause(), Cause::ViewerClosed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_ends_within_a_quarter_of_the_timeout_after_the_last_byte() {
        let timeout = Duration::from_secs(8);
        let limits = limits(Some(timeout));
        let mut life = Lifecycle::new(&limits, (0, 0));
        let start = Instant::now();
        let (mut bytes, mut last_byte) = ((0, 0), start);
        let ended = loop {
            tokio::time::sleep_until(life.next_wake().unwrap()).await;
            // A byte moves half a second before each look, for the first 3 s.
            if start.elapsed() < Duration::from_secs(3) {
                bytes.0 += 1;
                last_byte = Instant::now() - Duration::from_millis(500);
            }
            if let Some(ended) = life.wake(bytes) {
                break ended;
            }
        };
        assert!(matches!(ended, Ended::Idle));
        let idle_for = last_byte.elapsed();
        assert!(idle_for >= timeout && idle_for <= timeout + timeout / 4, "ended {idle_for:?} after the last byte");
    }
}
