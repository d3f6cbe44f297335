//! The registry of live sessions: who is connected to which instance, their byte
//! counters, and the handle that ends them (forced disconnect).

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::TokenHash;
use crate::clock;
use crate::front::Door;

mod shared;
pub use shared::{ByteCounters, Shared, Stop};

/// What the registry knows about a live session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: u64,
    pub instance: String,
    pub token_id: String,
    pub door: Door,
    pub viewer: SocketAddr,
    /// The viewer's IP address as relay trusts it: the viewer's, or the one a trusted
    /// proxy forwarded (X-Forwarded-For) when `viewer` is the proxy.
    #[serde(default = "unspecified")]
    pub client: IpAddr,
    pub hypervisor: String,
    pub started: u64,
    /// The token source that opened it (`store`, `nova`, `jwt`, …): a name from the
    /// configuration, not a copy per console.
    #[serde(default)]
    pub source: std::borrow::Cow<'static, str>,
    /// When the token that opened it expires (Unix seconds; 0: it does not).
    #[serde(default)]
    pub token_expires: u64,
}

fn unspecified() -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    #[serde(flatten)]
    pub info: SessionInfo,
    pub bytes_to_hypervisor: u64,
    pub bytes_to_viewer: u64,
}

/// A live session as the registry keeps it: what [`SessionInfo`] says, without what can be
/// derived (the id is the map's key, the token id is the hash's) and with boxed strings,
/// since every console has one (176 bytes, where a whole `SessionInfo` took 224).
struct Entry {
    token: TokenHash,
    viewer: SocketAddr,
    /// Shared with the registry's key for the instance: one copy per instance.
    instance: Arc<str>,
    hypervisor: Box<str>,
    source: std::borrow::Cow<'static, str>,
    started: u64,
    token_expires: u64,
    /// The instance's reset epoch when the session started: a reset elsewhere in the
    /// fleet raises the epoch and ends the sessions started under an older one.
    epoch: u64,
    shared: Arc<Shared>,
    client: IpAddr,
    door: Door,
}

impl Entry {
    fn new(info: SessionInfo, instance: Arc<str>, token: TokenHash, epoch: u64, shared: Arc<Shared>) -> Entry {
        Entry {
            token,
            viewer: info.viewer,
            instance,
            hypervisor: info.hypervisor.into_boxed_str(),
            source: info.source,
            started: info.started,
            token_expires: info.token_expires,
            epoch,
            shared,
            client: info.client,
            door: info.door,
        }
    }

    fn info(&self, id: u64) -> SessionInfo {
        SessionInfo {
            id,
            instance: self.instance.to_string(),
            token_id: self.token.id(),
            door: self.door,
            viewer: self.viewer,
            client: self.client,
            hypervisor: self.hypervisor.to_string(),
            started: self.started,
            source: self.source.clone(),
            token_expires: self.token_expires,
        }
    }
}

/// The live sessions of one instance. Most instances have one console, held inline: a
/// vector each cost such a console a 48-byte allocation.
enum Ids {
    One(u64),
    Many(Vec<u64>),
}

impl Ids {
    fn as_slice(&self) -> &[u64] {
        match self {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::Many(ids) => ids,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, id: u64) {
        match self {
            Ids::One(first) => *self = Ids::Many(vec![*first, id]),
            Ids::Many(ids) => ids.push(id),
        }
    }

    /// Takes `id` out; true when none is left.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Ids::One(only) => *only == id,
            Ids::Many(ids) => {
                ids.retain(|&i| i != id);
                match ids[..] {
                    [] => true,
                    [last] => {
                        *self = Ids::One(last);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Boxed: a map's spare room (up to half its slots) then costs a pointer a slot,
    /// not a whole entry.
    sessions: HashMap<u64, Box<Entry>>,
    /// Live sessions by instance (at most `max_sessions_per_instance` each), keyed by the
    /// name the entries share. With a hash set each and a second copy of the name, a
    /// console with an instance of its own (the common case) cost ~60 bytes more.
    by_instance: HashMap<Arc<str>, Ids>,
    /// The newest fleet reset heard per instance (epoch, reason, when), kept a while: a
    /// console redeemed before a reset whose message arrives before the console is
    /// registered is ended as it registers.
    resets: HashMap<String, (u64, String, std::time::Instant)>,
    /// The most sessions live at once since [`Registry::live_and_high`] last looked: a
    /// wave that comes and goes between two looks still counts.
    high: usize,
}

/// How long a reset is remembered for consoles still being registered, and for how many
/// instances at most.
const RESET_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);
const MAX_RESETS_REMEMBERED: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("relay is at its limit of {0} sessions")]
    TooManySessions(usize),
    #[error("instance already has {0} live consoles, the most allowed")]
    TooManyForInstance(usize),
}

pub struct Registry {
    inner: Mutex<Inner>,
    /// The caps (SIGHUP may change them; live sessions over a lowered cap go on).
    max_sessions: AtomicUsize,
    max_per_instance: AtomicUsize,
    /// The coarse clock's sweep has been started.
    clock: AtomicBool,
}

/// A registered session. Dropping it unregisters the session.
pub struct SessionHandle {
    registry: Arc<Registry>,
    pub id: u64,
    /// Its byte counters, and its stop (set when the session is to end).
    pub shared: Arc<Shared>,
}

impl SessionHandle {
    /// What the registry holds of this session, and its token (for its closing audit:
    /// the console's task need not carry its own copy of either all its life).
    pub fn info(&self) -> Option<(SessionInfo, TokenHash)> {
        self.registry.lock().sessions.get(&self.id).map(|e| (e.info(self.id), e.token))
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

impl Registry {
    pub fn new(max_sessions: usize, max_per_instance: usize) -> Arc<Self> {
        Arc::new(Registry {
            inner: Mutex::new(Inner::default()),
            max_sessions: max_sessions.into(),
            max_per_instance: max_per_instance.into(),
            clock: AtomicBool::new(false),
        })
    }

    /// New caps, for sessions registered from now on.
    pub fn set_caps(&self, max_sessions: usize, max_per_instance: usize) {
        self.max_sessions.store(max_sessions, Ordering::Relaxed);
        self.max_per_instance.store(max_per_instance, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation below completes before anything can panic, so a poisoned
        // lock still guards consistent maps.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, info: SessionInfo, token: TokenHash, epoch: u64) -> Result<SessionHandle, RegisterError> {
        self.start_clock();
        let mut inner = self.lock();
        let (max_sessions, max_per_instance) = (self.max_sessions.load(Ordering::Relaxed), self.max_per_instance.load(Ordering::Relaxed));
        if inner.sessions.len() >= max_sessions {
            return Err(RegisterError::TooManySessions(max_sessions));
        }
        let instance = match inner.by_instance.get_key_value(info.instance.as_str()) {
            Some((key, _)) => key.clone(),
            None => Arc::from(info.instance.as_str()),
        };
        let too_many = RegisterError::TooManyForInstance(max_per_instance);
        match inner.by_instance.get_mut(&*instance) {
            Some(ids) if ids.len() >= max_per_instance => return Err(too_many),
            Some(ids) => ids.push(info.id),
            None if max_per_instance == 0 => return Err(too_many),
            None => {
                inner.by_instance.insert(instance.clone(), Ids::One(info.id));
            }
        }
        let shared = Arc::new(Shared::default());
        let id = info.id;
        if let Some((newer, reason, _)) = inner.resets.get(&info.instance).filter(|(e, _, _)| epoch < *e) {
            tracing::debug!(instance = %info.instance, reset = newer, epoch, "a console redeemed before a reset ends as it registers");
            shared.stop.set(reason);
        }
        inner.sessions.insert(id, Box::new(Entry::new(info, instance, token, epoch, shared.clone())));
        inner.high = inner.high.max(inner.sessions.len());
        Ok(SessionHandle { registry: self.clone(), id, shared })
    }

    /// Starts the sweep that rings the consoles' far alarms ([`crate::clock`]), once, on
    /// the runtime that registers the first console; it ends with the registry.
    fn start_clock(self: &Arc<Self>) {
        if self.clock.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.clock.swap(true, Ordering::Relaxed) {
            return;
        }
        let registry = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut every = tokio::time::interval(clock::TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(registry) = registry.upgrade() else { break };
                let now = clock::now();
                for entry in registry.lock().sessions.values() {
                    entry.shared.stop.ring(now);
                }
            }
        });
    }

    fn remove(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.sessions.remove(&id) {
            let instance = &*entry.instance;
            if inner.by_instance.get_mut(instance).is_some_and(|ids| ids.remove(id)) {
                inner.by_instance.remove(instance);
            }
        }
    }

    /// Tells every live session of `instance` to end; returns how many were told.
    pub fn disconnect_instance(&self, instance: &str, reason: &str) -> usize {
        let inner = self.lock();
        let Some(ids) = inner.by_instance.get(instance) else { return 0 };
        let mut told = 0;
        for entry in ids.as_slice().iter().filter_map(|id| inner.sessions.get(id)) {
            entry.shared.stop.set(reason);
            told += 1;
        }
        told
    }

    /// Tells the sessions of `instance` started under an epoch older than `epoch` to end;
    /// returns how many were told.
    pub fn disconnect_before(&self, instance: &str, epoch: u64, reason: &str) -> usize {
        let mut inner = self.lock();
        let now = std::time::Instant::now();
        if inner.resets.len() >= MAX_RESETS_REMEMBERED {
            inner.resets.retain(|_, (_, _, at)| now.duration_since(*at) < RESET_MEMORY);
            if inner.resets.len() >= MAX_RESETS_REMEMBERED {
                inner.resets.clear();
            }
        }
        if epoch > 0 {
            let seen = inner.resets.entry(instance.to_string()).or_insert((0, String::new(), now));
            if epoch > seen.0 {
                *seen = (epoch, reason.to_string(), now);
            }
        }
        let Some(ids) = inner.by_instance.get(instance) else { return 0 };
        let mut told = 0;
        for entry in ids.as_slice().iter().filter_map(|id| inner.sessions.get(id)).filter(|e| e.epoch < epoch) {
            entry.shared.stop.set(reason);
            told += 1;
        }
        told
    }

    /// The instances with live sessions (bounded by `max_sessions`).
    pub fn live_instances(&self) -> Vec<String> {
        self.lock().by_instance.keys().map(|k| k.to_string()).collect()
    }

    /// Tells every live session to end (shutdown).
    pub fn disconnect_all(&self, reason: &str) -> usize {
        let inner = self.lock();
        for entry in inner.sessions.values() {
            entry.shared.stop.set(reason);
        }
        inner.sessions.len()
    }

    /// Live sessions (of one instance); `kernel` gives the kernel-relayed bytes per socket.
    pub fn list(&self, instance: Option<&str>, kernel: impl Fn(u64) -> u64) -> Vec<SessionView> {
        let inner = self.lock();
        let mut views: Vec<SessionView> = inner
            .sessions
            .iter()
            .filter(|(_, e)| instance.is_none_or(|i| &*e.instance == i))
            .map(|(&id, e)| {
                let (up, down) = e.shared.live(&kernel);
                SessionView { info: e.info(id), bytes_to_hypervisor: up, bytes_to_viewer: down }
            })
            .collect();
        views.sort_by_key(|v| v.info.id);
        views
    }

    /// Tokens behind live sessions by the source that honoured them, to keep them in use
    /// (and to learn of those revoked there).
    pub fn live_tokens(&self) -> HashMap<String, Vec<TokenHash>> {
        let inner = self.lock();
        let mut by_source: HashMap<String, HashSet<TokenHash>> = HashMap::new();
        for e in inner.sessions.values() {
            by_source.entry(e.source.to_string()).or_default().insert(e.token);
        }
        by_source.into_iter().map(|(source, set)| (source, set.into_iter().collect())).collect()
    }

    /// Tells the sessions opened with `token` to end; returns how many were told.
    pub fn disconnect_token(&self, token: TokenHash, reason: &str) -> usize {
        let inner = self.lock();
        let told = inner.sessions.values().filter(|e| e.token == token).inspect(|e| {
            e.shared.stop.set(reason);
        });
        told.count()
    }

    /// Tells the sessions whose token has expired by `now` to end (once); returns how
    /// many were told.
    pub fn disconnect_expired(&self, now: u64, reason: &str) -> usize {
        let inner = self.lock();
        let expired = inner.sessions.values().filter(|e| (1..=now).contains(&e.token_expires) && e.shared.stop.reason().is_none());
        expired
            .inspect(|e| {
                e.shared.stop.set(reason);
            })
            .count()
    }

    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// The sessions live now, and the most live at once since the last call.
    pub fn live_and_high(&self) -> (usize, usize) {
        let mut inner = self.lock();
        let live = inner.sessions.len();
        let high = std::mem::replace(&mut inner.high, live).max(live);
        (live, high)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_console_holds_a_compact_entry() {
        assert!(size_of::<Entry>() <= 176, "Entry grew to {} bytes", size_of::<Entry>());
        assert_eq!(size_of::<Ids>(), size_of::<Vec<u64>>(), "an instance's list takes a vector's room");
    }

    fn info(id: u64, instance: &str) -> SessionInfo {
        SessionInfo {
            id,
            instance: instance.into(),
            token_id: "t".into(),
            door: Door::Connect,
            viewer: "127.0.0.1:1".parse().unwrap(),
            client: "127.0.0.1".parse().unwrap(),
            hypervisor: "h:5900".into(),
            started: 0,
            source: "store".into(),
            token_expires: 0,
        }
    }

    fn far(stop: &Stop, at: tokio::time::Instant) -> impl Future<Output = ()> + '_ {
        let tick = clock::tick_of(at);
        std::future::poll_fn(move |cx| stop.poll_far_deadline(at, tick, cx))
    }

    #[tokio::test(start_paused = true)]
    async fn a_far_deadline_is_rung_by_the_registrys_sweep_at_most_two_ticks_late() {
        let reg = Registry::new(10, 5);
        let console = reg.register(info(1, "a"), TokenHash::of("x"), 0).unwrap();
        let start = tokio::time::Instant::now();
        let at = start + clock::FAR * 3;
        let rung = tokio::time::timeout(clock::FAR * 4, far(&console.shared.stop, at)).await;
        assert!(rung.is_ok(), "no sweep rang the alarm");
        assert!(tokio::time::Instant::now() >= at, "rung before its deadline");
        let late = tokio::time::Instant::now() - at;
        assert!(late <= clock::TICK * 2, "rung {late:?} after its deadline");
        // A deadline already past resolves at once, sweep or not.
        let unregistered = Shared::default();
        let past = tokio::time::Instant::now();
        assert!(tokio::time::timeout(clock::TICK / 10, far(&unregistered.stop, past)).await.is_ok());
    }

    #[test]
    fn the_most_live_at_once_counts_consoles_gone_before_the_look() {
        let reg = Registry::new(10, 5);
        let kept = reg.register(info(1, "a"), TokenHash::of("x"), 0).unwrap();
        let gone: Vec<_> = (2..5).map(|id| reg.register(info(id, "a"), TokenHash::of("x"), 0).unwrap()).collect();
        drop(gone);
        assert_eq!(reg.live_and_high(), (1, 4), "four were live at once, three gone by the look");
        assert_eq!(reg.live_and_high(), (1, 1), "the high starts again from the live at each look");
        drop(kept);
        assert_eq!(reg.live_and_high(), (0, 1), "a fall since the last look is no new high");
    }

    #[test]
    fn live_tokens_by_source_and_ending_one_token() {
        let reg = Registry::new(10, 5);
        let nova = SessionInfo { source: "nova".into(), ..info(2, "b") };
        let (x, y) = (TokenHash::of("x"), TokenHash::of("y"));
        let a = reg.register(info(1, "a"), x, 0).unwrap();
        let b = reg.register(nova, y, 0).unwrap();
        let b2 = reg.register(SessionInfo { source: "nova".into(), ..info(3, "b") }, y, 0).unwrap();
        let live = reg.live_tokens();
        assert_eq!(
            (live["store"].as_slice(), live["nova"].as_slice()),
            ([x].as_slice(), [y].as_slice()),
            "each token once, under its source"
        );
        assert_eq!(reg.disconnect_token(y, "revoked"), 2);
        assert!(b.shared.stop.reason().is_some() && b2.shared.stop.reason().is_some() && a.shared.stop.reason().is_none());
    }

    #[test]
    fn disconnect_reaches_only_that_instance_and_drop_unregisters() {
        let reg = Registry::new(10, 2);
        let a1 = reg.register(info(1, "a"), TokenHash::of("x"), 0).unwrap();
        let a2 = reg.register(info(2, "a"), TokenHash::of("x"), 0).unwrap();
        let b = reg.register(info(3, "b"), TokenHash::of("y"), 0).unwrap();
        assert_eq!(reg.register(info(4, "a"), TokenHash::of("x"), 0).err(), Some(RegisterError::TooManyForInstance(2)));
        assert_eq!(reg.live_tokens()["store"].len(), 2);
        assert_eq!(reg.disconnect_instance("a", "reset"), 2);
        assert_eq!(a1.shared.stop.reason(), Some("reset"));
        assert_eq!(a2.shared.stop.reason(), Some("reset"));
        assert_eq!(b.shared.stop.reason(), None);
        drop((a1, a2));
        assert_eq!(reg.list(None, |_| 0).len(), 1);
        assert_eq!(reg.disconnect_instance("a", "reset"), 0);
        drop(b);
        assert!(reg.is_empty());
    }

    #[test]
    fn an_instances_list_grows_from_one_console_and_shrinks_back() {
        let reg = Registry::new(10, 3);
        let x = TokenHash::of("x");
        let first = reg.register(info(1, "a"), x, 0).unwrap();
        let more: Vec<_> = (2..4).map(|id| reg.register(info(id, "a"), x, 0).unwrap()).collect();
        assert_eq!(reg.register(info(4, "a"), x, 0).err(), Some(RegisterError::TooManyForInstance(3)));
        drop(first);
        assert_eq!(reg.disconnect_instance("a", "reset"), 2, "the two left, out of a list of three");
        let third = reg.register(info(5, "a"), x, 0).unwrap();
        drop(more);
        assert_eq!(reg.live_instances(), vec!["a".to_string()], "one console left: the instance stays");
        assert_eq!(reg.disconnect_instance("a", "again"), 1);
        assert_eq!(third.shared.stop.reason(), Some("again"));
        drop(third);
        assert!(reg.live_instances().is_empty(), "its last console gone, the instance is gone");
        let alone = Registry::new(10, 0);
        assert_eq!(alone.register(info(6, "b"), x, 0).err(), Some(RegisterError::TooManyForInstance(0)));
        assert!(alone.live_instances().is_empty(), "a refused console leaves no trace of its instance");
    }

    #[test]
    fn a_fleet_reset_ends_only_sessions_older_than_its_epoch() {
        let reg = Registry::new(10, 5);
        let old = reg.register(info(1, "a"), TokenHash::of("x"), 3).unwrap();
        let new = reg.register(info(2, "a"), TokenHash::of("x"), 4).unwrap();
        assert_eq!(reg.live_instances(), vec!["a".to_string()]);
        assert_eq!(reg.disconnect_before("a", 4, "reset"), 1);
        assert_eq!(old.shared.stop.reason(), Some("reset"));
        assert_eq!(new.shared.stop.reason(), None);
        // Redeemed before the reset, registered after its message: ended as it registers.
        let late = reg.register(info(3, "a"), TokenHash::of("x"), 3).unwrap();
        assert_eq!(late.shared.stop.reason(), Some("reset"));
        let after = reg.register(info(4, "a"), TokenHash::of("x"), 5).unwrap();
        assert_eq!(after.shared.stop.reason(), None);
    }

    #[tokio::test]
    async fn a_stop_wakes_its_waiter_once_with_the_first_reason() {
        let stop = Arc::new(Stop::default());
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no reason yet");
        stop.set("disconnected");
        stop.set("shutting down");
        assert_eq!(waiter.await.unwrap(), "disconnected");
        // Set before the wait begins: it resolves at once.
        assert_eq!(stop.wait().await, "disconnected");
        assert_eq!(stop.reason(), Some("disconnected"));
    }

    #[test]
    fn global_limit() {
        let reg = Registry::new(1, 5);
        let _a = reg.register(info(1, "a"), TokenHash::of("x"), 0).unwrap();
        assert_eq!(reg.register(info(2, "b"), TokenHash::of("x"), 0).err(), Some(RegisterError::TooManySessions(1)));
    }
}
