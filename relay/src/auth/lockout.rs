//! Lock-out after repeated wrong console passwords, per instance and per source
//! address, so a leaked console URL cannot be used to guess the password.
//!
//! After `max_failures` consecutive failures a key is refused for `cooldown_secs`. A
//! success clears the instance's count and the source's. Both maps are bounded:
//! when full, entries that are neither locked nor recent are dropped first.

use super::store::StoreFuture;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, Default)]
struct Failures {
    count: u32,
    last: u64,
    locked_until: u64,
}

pub struct Lockout {
    max_failures: u32,
    cooldown_secs: u64,
    max_entries: usize,
    instances: Mutex<HashMap<String, Failures>>,
    sources: Mutex<HashMap<IpAddr, Failures>>,
}

/// Why an attempt is refused before it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    Instance { retry_in: u64 },
    Source { retry_in: u64 },
}

impl std::fmt::Display for Locked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, secs) = match self {
            Locked::Instance { retry_in } => ("this console", retry_in),
            Locked::Source { retry_in } => ("your address", retry_in),
        };
        write!(f, "too many wrong passwords for {what}; try again in {secs} s")
    }
}

/// Where failures are counted: this process ([`Lockout`]), or a store every appliance
/// shares, so that a guesser cannot multiply his tries by spreading them over a fleet.
pub trait LockoutStore: Send + Sync + 'static {
    /// Whether an attempt for `instance` from `source` may be made at `now`.
    fn check(&self, instance: &str, source: IpAddr, now: u64) -> StoreFuture<'_, Result<(), Locked>>;
    /// Records a wrong password; returns the lock-out it caused, if any.
    fn failure(&self, instance: &str, source: IpAddr, now: u64) -> StoreFuture<'_, Option<Locked>>;
    fn success(&self, instance: &str, source: IpAddr) -> StoreFuture<'_, ()>;
}

impl LockoutStore for Lockout {
    fn check(&self, instance: &str, source: IpAddr, now: u64) -> StoreFuture<'_, Result<(), Locked>> {
        Box::pin(std::future::ready(Ok(Lockout::check(self, instance, source, now))))
    }
    fn failure(&self, instance: &str, source: IpAddr, now: u64) -> StoreFuture<'_, Option<Locked>> {
        Box::pin(std::future::ready(Ok(Lockout::failure(self, instance, source, now))))
    }
    fn success(&self, instance: &str, source: IpAddr) -> StoreFuture<'_, ()> {
        Lockout::success(self, instance, source);
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Lockout {
    pub fn new(max_failures: u32, cooldown_secs: u64, max_entries: usize) -> Self {
        Lockout {
            max_failures: max_failures.max(1),
            cooldown_secs,
            max_entries: max_entries.max(1),
            instances: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an attempt for `instance` from `source` may be made at `now`.
    pub fn check(&self, instance: &str, source: IpAddr, now: u64) -> Result<(), Locked> {
        if let Some(until) = locked(&self.instances, &instance.to_string(), now) {
            return Err(Locked::Instance { retry_in: until - now });
        }
        if let Some(until) = locked(&self.sources, &source, now) {
            return Err(Locked::Source { retry_in: until - now });
        }
        Ok(())
    }

    /// Records a wrong password; returns the lock-out it caused, if any.
    pub fn failure(&self, instance: &str, source: IpAddr, now: u64) -> Option<Locked> {
        let by_instance = self.bump(&self.instances, instance.to_string(), now);
        let by_source = self.bump(&self.sources, source, now);
        match (by_instance, by_source) {
            (true, _) => Some(Locked::Instance { retry_in: self.cooldown_secs }),
            (_, true) => Some(Locked::Source { retry_in: self.cooldown_secs }),
            _ => None,
        }
    }

    pub fn success(&self, instance: &str, source: IpAddr) {
        lock(&self.instances).remove(instance);
        lock(&self.sources).remove(&source);
    }

    /// Counts a failure under `key`; true when it starts a lock-out.
    fn bump<K: std::hash::Hash + Eq>(&self, map: &Mutex<HashMap<K, Failures>>, key: K, now: u64) -> bool {
        let mut map = lock(map);
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            let stale = now.saturating_sub(self.cooldown_secs);
            map.retain(|_, f| f.locked_until > now || f.last > stale);
            // Still full of live entries: forget the oldest rather than grow.
            while map.len() >= self.max_entries {
                let Some(oldest) = map.values().map(|f| f.last).min() else { break };
                map.retain(|_, f| f.last != oldest);
            }
        }
        let f = map.entry(key).or_default();
        if f.locked_until > now {
            return false;
        }
        if f.locked_until != 0 {
            // A lock-out ran out: start counting afresh.
            *f = Failures::default();
        }
        f.count += 1;
        f.last = now;
        if f.count >= self.max_failures {
            f.locked_until = now + self.cooldown_secs;
            return true;
        }
        false
    }
}

fn lock<K>(m: &Mutex<HashMap<K, Failures>>) -> std::sync::MutexGuard<'_, HashMap<K, Failures>> {
    // Each update is a single assignment: a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn locked<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, Failures>>, key: &K, now: u64) -> Option<u64> {
    lock(m).get(key).map(|f| f.locked_until).filter(|&until| until > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn locks_after_n_failures_and_expires() {
        let l = Lockout::new(3, 60, 100);
        assert_eq!(l.failure("vm", A, 100), None);
        assert_eq!(l.failure("vm", A, 101), None);
        assert_eq!(l.failure("vm", A, 102), Some(Locked::Instance { retry_in: 60 }));
        assert_eq!(l.check("vm", B, 110), Err(Locked::Instance { retry_in: 52 }), "locked for every source");
        assert_eq!(l.check("other", A, 110), Err(Locked::Source { retry_in: 52 }), "and the source for every instance");
        assert_eq!(l.check("other", B, 110), Ok(()));
        assert_eq!(l.check("vm", A, 162), Ok(()), "the cool-down ends");
        assert_eq!(l.failure("vm", A, 163), None, "counting starts afresh");
    }

    #[test]
    fn success_resets_the_count() {
        let l = Lockout::new(2, 60, 100);
        assert_eq!(l.failure("vm", A, 1), None);
        l.success("vm", A);
        assert_eq!(l.failure("vm", A, 2), None);
        assert!(l.failure("vm", A, 3).is_some());
    }

    #[test]
    fn bounded() {
        let l = Lockout::new(5, 60, 4);
        for i in 0..100u8 {
            l.failure(&format!("vm{i}"), IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i)), 1000 + i as u64);
        }
        assert!(lock(&l.instances).len() <= 4);
        assert!(lock(&l.sources).len() <= 4);
    }
}
