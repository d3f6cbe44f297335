//! What a fleet shares per instance besides tokens: the console password (sealed) and
//! the wrong-password counts, per instance and per source address, so that a guesser
//! cannot multiply his tries by spreading them over appliances. Keys of one instance
//! share its hash tag (`P:{INSTANCE}:…`).

use super::conn::Redis;
use super::keys::{self, FAILURES, PASSWORD};
use crate::auth::Secret;
use crate::auth::lockout::{Locked, LockoutStore};
use crate::auth::passwords::PasswordStore;
use crate::auth::seal::{Sealer, password_context};
use crate::auth::store::{StoreError, StoreFuture};
use redis::Script;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

pub struct RedisPasswords {
    redis: Arc<Redis>,
    sealer: Arc<Sealer>,
    prefix: String,
}

impl RedisPasswords {
    pub fn new(redis: Arc<Redis>, sealer: Arc<Sealer>, prefix: &str) -> RedisPasswords {
        RedisPasswords { redis, sealer, prefix: prefix.to_string() }
    }
    fn key(&self, instance: &str) -> String {
        keys::of_instance(&self.prefix, instance, PASSWORD)
    }

    fn open(&self, instance: &str, sealed: Option<String>) -> Result<Option<Secret>, StoreError> {
        // A password that does not open (another key file) must not let viewers in
        // without one: the console is refused as unavailable.
        sealed.map(|s| self.sealer.open(&password_context(instance), &s).map_err(|e| StoreError::Unavailable(e.to_string()))).transpose()
    }
}

impl PasswordStore for RedisPasswords {
    fn set(&self, instance: &str, password: Secret) -> StoreFuture<'_, ()> {
        let (key, sealed) = (self.key(instance), self.sealer.seal(&password_context(instance), &password));
        Box::pin(async move {
            self.redis.run_replicated(|mut c| async move { redis::cmd("SET").arg(&key).arg(&sealed).query_async::<()>(&mut c).await }).await
        })
    }

    fn clear(&self, instance: &str) -> StoreFuture<'_, bool> {
        let key = self.key(instance);
        Box::pin(async move {
            let n: i64 = self.redis.run(|mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await }).await?;
            Ok(n == 1)
        })
    }

    fn get(&self, instance: &str) -> StoreFuture<'_, Option<Secret>> {
        let (key, instance) = (self.key(instance), instance.to_string());
        Box::pin(async move {
            let sealed: Option<String> =
                self.redis.run(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }).await?;
            self.open(&instance, sealed)
        })
    }
}

/// Counts a wrong password under KEYS[1]; 1 when this one starts a lock-out. ARGV: now,
/// max_failures, cooldown. A count with no failure for a cool-down is forgotten (Redis
/// expires it), as is a lock-out once it has run.
static BUMP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local f = redis.call('HMGET', KEYS[1], 'count', 'until')
local now, max, cool = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local count, locked = tonumber(f[1] or '0'), tonumber(f[2] or '0')
if locked > now then return 0 end
if locked ~= 0 then count = 0 end
count = count + 1
if count >= max then
  redis.call('HSET', KEYS[1], 'count', count, 'until', now + cool)
  redis.call('EXPIRE', KEYS[1], cool + 1)
  return 1
end
redis.call('HSET', KEYS[1], 'count', count, 'until', 0)
redis.call('EXPIRE', KEYS[1], math.max(cool, 1))
return 0
"#,
    )
});

pub struct RedisLockout {
    redis: Arc<Redis>,
    prefix: String,
    max_failures: u32,
    cooldown_secs: u64,
}

impl RedisLockout {
    pub fn new(redis: Arc<Redis>, prefix: &str, max_failures: u32, cooldown_secs: u64) -> RedisLockout {
        RedisLockout { redis, prefix: prefix.to_string(), max_failures: max_failures.max(1), cooldown_secs }
    }
    fn keys(&self, instance: &str, source: IpAddr) -> (String, String) {
        (keys::of_instance(&self.prefix, instance, FAILURES), format!("{}:source:{{{source}}}:{FAILURES}", self.prefix))
    }
}

impl LockoutStore for RedisLockout {
    fn check(&self, instance: &str, source: IpAddr, now: u64) -> StoreFuture<'_, Result<(), Locked>> {
        let (by_instance, by_source) = self.keys(instance, source);
        Box::pin(async move {
            let (i, s): (Option<u64>, Option<u64>) = self
                .redis
                .run(|mut c| async move { redis::pipe().hget(&by_instance, "until").hget(&by_source, "until").query_async(&mut c).await })
                .await?;
            match (i.filter(|&u| u > now), s.filter(|&u| u > now)) {
                (Some(until), _) => Ok(Err(Locked::Instance { retry_in: until - now })),
                (_, Some(until)) => Ok(Err(Locked::Source { retry_in: until - now })),
                _ => Ok(Ok(())),
            }
        })
    }

    fn failure(&self, instance: &str, source: IpAddr, now: u64) -> StoreFuture<'_, Option<Locked>> {
        let (by_instance, by_source) = self.keys(instance, source);
        let (max, cool) = (self.max_failures, self.cooldown_secs);
        Box::pin(async move {
            let bump = |key: String| async move {
                self.redis.run(|mut c| async move { BUMP.key(key).arg(now).arg(max).arg(cool).invoke_async::<i64>(&mut c).await }).await
            };
            let (i, s) = (bump(by_instance).await?, bump(by_source).await?);
            Ok(match (i, s) {
                (1, _) => Some(Locked::Instance { retry_in: cool }),
                (_, 1) => Some(Locked::Source { retry_in: cool }),
                _ => None,
            })
        })
    }

    fn success(&self, instance: &str, source: IpAddr) -> StoreFuture<'_, ()> {
        let (by_instance, by_source) = self.keys(instance, source);
        Box::pin(async move {
            self.redis.run(|mut c| async move { redis::pipe().del(&by_instance).del(&by_source).query_async(&mut c).await }).await
        })
    }
}
