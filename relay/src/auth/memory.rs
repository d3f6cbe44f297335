//! The embedded token store: a bounded map in this process.

use super::store::{Filter, StoreError, StoreFuture, TokenRejection, TokenStore};
use super::token::{TokenHash, TokenRecord};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct MemoryStore {
    tokens: Mutex<HashMap<TokenHash, TokenRecord>>,
    max_tokens: usize,
}

impl MemoryStore {
    pub fn new(max_tokens: usize) -> Self {
        MemoryStore { tokens: Mutex::new(HashMap::new()), max_tokens }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, TokenRecord>> {
        // A panic while holding the lock cannot leave a record half-written (every
        // mutation is a single insert/remove/assign), so a poisoned map is still sound.
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn validate(&self, hash: TokenHash, now: u64, redeem: bool) -> Result<TokenRecord, TokenRejection> {
        let mut map = self.map();
        // The key is a SHA-256 of the token: comparing it leaks nothing about the token.
        let record = map.get_mut(&hash).ok_or(TokenRejection::Unknown)?;
        record.usable(now)?;
        if redeem {
            record.last_touched = now;
            record.used = true;
        }
        Ok(record.clone())
    }
}

/// The answers of [`TokenStore`], at once: the local store calls these while it holds its
/// journal's lock, which may not be held across an `.await`.
impl MemoryStore {
    pub fn insert_now(&self, hash: TokenHash, record: TokenRecord) -> Result<(), StoreError> {
        let mut map = self.map();
        if map.len() >= self.max_tokens {
            let now = record.created;
            map.retain(|_, r| !r.dead(now));
            if map.len() >= self.max_tokens {
                return Err(StoreError::Full(self.max_tokens));
            }
        }
        map.insert(hash, record);
        Ok(())
    }

    pub fn redeem_now(&self, hash: TokenHash, now: u64) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        Ok(self.validate(hash, now, true))
    }

    pub fn check_now(&self, hash: TokenHash, now: u64) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        Ok(self.validate(hash, now, false))
    }

    pub fn touch_now(&self, hash: TokenHash, now: u64) -> Result<bool, StoreError> {
        Ok(self.touch_from(hash, now)?.is_some())
    }

    /// Touches `hash` at `now`; its last touch before, or `None` when it is unknown.
    pub fn touch_from(&self, hash: TokenHash, now: u64) -> Result<Option<u64>, StoreError> {
        let mut map = self.map();
        Ok(map.get_mut(&hash).map(|r| {
            let before = r.last_touched;
            r.last_touched = before.max(now);
            before
        }))
    }

    pub fn delete_now(&self, hash: TokenHash) -> Result<bool, StoreError> {
        Ok(self.map().remove(&hash).is_some())
    }

    pub fn delete_instance_now(&self, instance: &str) -> Result<usize, StoreError> {
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, r| r.instance != instance);
        Ok(before - map.len())
    }

    pub fn list_now(&self, filter: &Filter, now: u64) -> Result<Vec<TokenRecord>, StoreError> {
        let map = self.map();
        let mut found: Vec<TokenRecord> = map
            .values()
            .filter(|r| r.usable(now).is_ok())
            .filter(|r| match filter {
                Filter::Instance(i) => &r.instance == i,
                Filter::Host(h) => &r.target.host == h,
                Filter::All => true,
            })
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(found)
    }

    pub fn sweep_now(&self, now: u64) -> Result<usize, StoreError> {
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, r| !r.dead(now));
        Ok(before - map.len())
    }

    pub fn count_now(&self) -> Result<usize, StoreError> {
        Ok(self.map().len())
    }

    /// Stores `marker` under `hash` unless a live record is there: true when stored.
    pub fn take_once_now(&self, hash: TokenHash, marker: TokenRecord, now: u64) -> Result<bool, StoreError> {
        let mut map = self.map();
        if map.get(&hash).is_some_and(|r| !r.dead(now)) {
            return Ok(false);
        }
        if map.len() >= self.max_tokens {
            map.retain(|_, r| !r.dead(now));
            if map.len() >= self.max_tokens {
                return Err(StoreError::Full(self.max_tokens));
            }
        }
        map.insert(hash, marker);
        Ok(true)
    }
}

fn ready<T: Send + 'static>(v: Result<T, StoreError>) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

impl TokenStore for MemoryStore {
    fn insert(&self, hash: TokenHash, record: TokenRecord) -> StoreFuture<'_, ()> {
        ready(self.insert_now(hash, record))
    }
    fn redeem(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>> {
        ready(self.redeem_now(hash, now))
    }
    fn check(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>> {
        ready(self.check_now(hash, now))
    }
    fn touch(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, bool> {
        ready(self.touch_now(hash, now))
    }
    fn delete(&self, hash: TokenHash) -> StoreFuture<'_, bool> {
        ready(self.delete_now(hash))
    }
    fn delete_instance(&self, instance: &str) -> StoreFuture<'_, usize> {
        ready(self.delete_instance_now(instance))
    }
    fn list(&self, filter: Filter, now: u64) -> StoreFuture<'_, Vec<TokenRecord>> {
        ready(self.list_now(&filter, now))
    }
    fn sweep(&self, now: u64) -> StoreFuture<'_, usize> {
        ready(self.sweep_now(now))
    }
    fn count(&self) -> StoreFuture<'_, usize> {
        ready(self.count_now())
    }
    fn take_once(&self, hash: TokenHash, expires: u64) -> StoreFuture<'_, bool> {
        let now = crate::app::unix_now();
        ready(self.take_once_now(hash, TokenRecord::taken(&hash, now, expires), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::{NewToken, Target, generate};

    fn new_token(instance: &str, host: &str, single_use: bool) -> NewToken {
        NewToken {
            instance: instance.into(),
            console: "novnc".into(),
            target: Target { host: host.into(), port: 5900, internal_access_path: None },
            ttl: None,
            idle_timeout: None,
            single_use,
            hypervisor_schemes: None,
            hypervisor_password: None,
            password: None,
        }
    }

    async fn add(store: &MemoryStore, req: NewToken, now: u64) -> TokenHash {
        let hash = TokenHash::of(&generate());
        store.insert(hash, TokenRecord::new(&hash, req, now, 600, 120)).await.unwrap();
        hash
    }

    #[tokio::test]
    async fn expiry_idle_and_touch() {
        let store = MemoryStore::new(10);
        let t = add(&store, new_token("vm1", "hv1", false), 1000).await;
        assert!(store.check(t, 1000).await.unwrap().is_ok());
        assert_eq!(store.check(t, 1120).await.unwrap().unwrap_err(), TokenRejection::Idle);
        assert!(store.touch(t, 1100).await.unwrap());
        assert!(store.check(t, 1150).await.unwrap().is_ok(), "a touch keeps it from lapsing");
        assert_eq!(store.check(t, 1600).await.unwrap().unwrap_err(), TokenRejection::Expired);
        assert_eq!(store.check(TokenHash::of("nope"), 1000).await.unwrap().unwrap_err(), TokenRejection::Unknown);
    }

    #[tokio::test]
    async fn single_use_is_used_once() {
        let store = MemoryStore::new(10);
        let t = add(&store, new_token("vm1", "hv1", true), 1000).await;
        assert!(store.check(t, 1001).await.unwrap().is_ok(), "checking does not consume");
        assert!(store.redeem(t, 1001).await.unwrap().is_ok());
        assert_eq!(store.sweep(1002).await.unwrap(), 0, "kept until it expires");
        assert_eq!(store.redeem(t, 1002).await.unwrap().unwrap_err(), TokenRejection::AlreadyUsed);
        assert!(store.list(Filter::All, 1002).await.unwrap().is_empty(), "but no longer listed");
        assert_eq!(store.sweep(1600).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn lookups_delete_sweep_and_bound() {
        let store = MemoryStore::new(3);
        let a = add(&store, new_token("vm1", "hv1", false), 1000).await;
        add(&store, new_token("vm1", "hv2", false), 1001).await;
        add(&store, new_token("vm2", "hv1", false), 1002).await;
        assert_eq!(store.list(Filter::Instance("vm1".into()), 1003).await.unwrap().len(), 2);
        assert_eq!(store.list(Filter::Host("hv1".into()), 1003).await.unwrap().len(), 2);
        let hash = TokenHash::of("x");
        let full = store.insert(hash, TokenRecord::new(&hash, new_token("vm3", "h", false), 1003, 600, 120)).await;
        assert_eq!(full, Err(StoreError::Full(3)));
        assert!(store.delete(a).await.unwrap());
        assert!(!store.delete(a).await.unwrap());
        assert_eq!(store.delete_instance("vm1").await.unwrap(), 1);
        assert_eq!(store.sweep(5000).await.unwrap(), 1);
        assert_eq!(store.count().await.unwrap(), 0);
        // A full store makes room by forgetting dead tokens first.
        let store = MemoryStore::new(1);
        add(&store, new_token("vm1", "h", false), 1000).await;
        add(&store, new_token("vm2", "h", false), 9000).await;
        assert_eq!(store.count().await.unwrap(), 1);
    }
}
