//! Console tokens in Redis, shared by every appliance of a fleet.
//!
//! One hash per token, `P:tok:{HEX}` (HEX: the token's SHA-256), with the record as JSON
//! (`rec`), the sealed hypervisor password (`hv`), and the fields that change or decide
//! (`expires`, `last`, `idle`, `single`, `used`). Redis expires the key when the token
//! expires or lapses. Redeeming is one Lua script, so two appliances racing for a
//! single-use token cannot both get it. Three sorted sets, scored by expiry, find tokens
//! by instance (`P:{INSTANCE}:tokens`, sharing the instance's hash tag), by host, and all.

use super::conn::Redis;
use crate::auth::seal::Sealer;
use crate::auth::store::{Filter, StoreError, StoreFuture, TokenRejection, TokenStore};
use crate::auth::token::StoredToken;
use crate::auth::{TokenHash, TokenRecord};
use redis::{Script, Value};
use std::sync::{Arc, LazyLock};

/// Checks a token and, when redeeming, takes it: marks a single-use token used, and
/// counts as a touch. Answers `{status}` or `{"ok", rec, hv, last, used, secs, µs}`, the
/// last two Redis's clock at the redeem (the console's reset epoch).
static VALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local f = redis.call('HMGET', KEYS[1], 'rec', 'hv', 'expires', 'last', 'idle', 'single', 'used')
if not f[1] then return {'unknown'} end
local now = tonumber(ARGV[1])
local expires, last, idle = tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
local single, used = f[6] == '1', f[7] == '1'
if now >= expires then return {'expired'} end
if idle > 0 and now >= last + idle then return {'idle'} end
if single and used then return {'already_used'} end
-- Only a change is written: a burst of openings within one second writes once.
if ARGV[2] == '1' and (now > last or (single and not used)) then
  if now > last then last = now end
  if single then used = true end
  redis.call('HSET', KEYS[1], 'last', last, 'used', used and '1' or '0')
  local ends = expires
  if not single and idle > 0 and last + idle < expires then ends = last + idle end
  redis.call('EXPIREAT', KEYS[1], ends)
end
local t = redis.call('TIME')
return {'ok', f[1], f[2] or '', tostring(last), used and '1' or '0', t[1], t[2]}
"#,
    )
});

/// Marks a token in use at ARGV[1]; 0 when there is no such token.
const TOUCH_LUA: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'expires', 'last', 'idle', 'single', 'used')
if not f[1] then return 0 end
local now, expires, last, idle = tonumber(ARGV[1]), tonumber(f[1]), tonumber(f[2]), tonumber(f[3])
if now > last then last = now; redis.call('HSET', KEYS[1], 'last', last) end
local ends = expires
if not (f[4] == '1' and f[5] == '1') and idle > 0 and last + idle < expires then ends = last + idle end
redis.call('EXPIREAT', KEYS[1], ends)
return 1
"#;

static TOUCH: LazyLock<Script> = LazyLock::new(|| Script::new(TOUCH_LUA));

/// Touches per pipeline when the live consoles' tokens are touched together: a round trip
/// per 256 consoles instead of one each.
const TOUCH_BATCH: usize = 256;

pub struct RedisTokens {
    redis: Arc<Redis>,
    sealer: Arc<Sealer>,
    prefix: String,
    max_tokens: usize,
}

impl RedisTokens {
    pub fn new(redis: Arc<Redis>, sealer: Arc<Sealer>, prefix: &str, max_tokens: usize) -> RedisTokens {
        RedisTokens { redis, sealer, prefix: prefix.to_string(), max_tokens }
    }

    fn key(&self, hash: &TokenHash) -> String {
        super::keys::token(&self.prefix, &hash.hex())
    }
    fn all(&self) -> String {
        format!("{}:tokens", self.prefix)
    }
    fn by_instance(&self, instance: &str) -> String {
        super::keys::of_instance(&self.prefix, instance, super::keys::TOKENS)
    }
    fn by_host(&self, host: &str) -> String {
        format!("{}:host:{{{host}}}:tokens", self.prefix)
    }

    async fn validate(&self, hash: TokenHash, now: u64, redeem: bool) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        let key = self.key(&hash);
        let reply: Vec<String> =
            self.redis.run(|mut c| async move { VALIDATE.key(key).arg(now).arg(u8::from(redeem)).invoke_async(&mut c).await }).await?;
        match reply.first().map(String::as_str) {
            Some("ok") if reply.len() == 7 => {
                let mut stored: StoredToken = serde_json::from_str(&reply[1]).map_err(corrupt)?;
                stored.hypervisor_password = Some(reply[2].clone()).filter(|hv| !hv.is_empty());
                let mut record = stored.open(&self.sealer).map_err(|e| StoreError::Unavailable(e.to_string()))?;
                record.last_touched = reply[3].parse().unwrap_or(record.last_touched);
                record.used = reply[4] == "1";
                record.redeemed_epoch = micros(&reply[5], &reply[6]);
                Ok(Ok(record))
            }
            Some("unknown") => Ok(Err(TokenRejection::Unknown)),
            Some("expired") => Ok(Err(TokenRejection::Expired)),
            Some("idle") => Ok(Err(TokenRejection::Idle)),
            Some("already_used") => Ok(Err(TokenRejection::AlreadyUsed)),
            _ => Err(StoreError::Unavailable(format!("unexpected reply from the token script: {reply:?}"))),
        }
    }

    /// Reads the tokens named in `index` that have not expired; drops names whose token is
    /// gone (deleted, or lapsed and expired by Redis).
    async fn read_index(&self, index: String, now: u64) -> Result<Vec<TokenRecord>, StoreError> {
        let (idx, max) = (index.clone(), self.max_tokens as isize);
        let names: Vec<String> = self
            .redis
            .run(|mut c| async move {
                redis::pipe()
                    .zrembyscore(&idx, "-inf", now)
                    .ignore()
                    .cmd("ZRANGE")
                    .arg(&idx)
                    .arg(0)
                    .arg(max - 1)
                    .query_async::<(Vec<String>,)>(&mut c)
                    .await
                    .map(|(v,)| v)
            })
            .await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("HMGET").arg(super::keys::token(&self.prefix, name)).arg(&["rec", "last", "used"]);
        }
        let rows: Vec<(Option<String>, Option<u64>, Option<String>)> =
            self.redis.run(|mut c| async move { pipe.query_async(&mut c).await }).await?;
        let mut found = Vec::new();
        let mut gone = Vec::new();
        for (name, (rec, last, used)) in names.iter().zip(rows) {
            let Some(rec) = rec else {
                gone.push(name.clone());
                continue;
            };
            let stored: StoredToken = serde_json::from_str(&rec).map_err(corrupt)?;
            let mut record = stored.record;
            record.last_touched = last.unwrap_or(record.last_touched);
            record.used = used.as_deref() == Some("1");
            if record.usable(now).is_ok() {
                found.push(record);
            }
        }
        if !gone.is_empty() {
            let _ =
                self.redis.run(|mut c| async move { redis::cmd("ZREM").arg(&index).arg(&gone).query_async::<Value>(&mut c).await }).await;
        }
        found.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(found)
    }
}

/// Redis's `TIME` (seconds, microseconds) in microseconds.
fn micros(secs: &str, micros: &str) -> u64 {
    let (s, us) = (secs.parse::<u64>().unwrap_or(0), micros.parse::<u64>().unwrap_or(0));
    s.saturating_mul(1_000_000).saturating_add(us)
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Unavailable(format!("a token record in redis does not parse: {e}"))
}

impl TokenStore for RedisTokens {
    fn insert(&self, hash: TokenHash, record: TokenRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let (all, now, max) = (self.all(), record.created, self.max_tokens);
            let count: usize = self
                .redis
                .run(|mut c| async move {
                    redis::pipe().zrembyscore(&all, "-inf", now).ignore().zcard(&all).query_async::<(usize,)>(&mut c).await.map(|(n,)| n)
                })
                .await?;
            if count >= max {
                return Err(StoreError::Full(max));
            }
            let stored = StoredToken::seal(&record, &self.sealer);
            let hv = stored.hypervisor_password.clone().unwrap_or_default();
            let rec = serde_json::to_string(&StoredToken { hypervisor_password: None, ..stored })
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let r = &record;
            let ends = if r.idle_timeout > 0 { r.expires.min(r.last_touched.saturating_add(r.idle_timeout)) } else { r.expires };
            let name = hash.hex();
            let mut pipe = redis::pipe();
            pipe.atomic()
                .hset_multiple(
                    self.key(&hash),
                    &[
                        ("rec", rec),
                        ("hv", hv),
                        ("expires", r.expires.to_string()),
                        ("last", r.last_touched.to_string()),
                        ("idle", r.idle_timeout.to_string()),
                        ("single", u8::from(r.single_use).to_string()),
                        ("used", "0".to_string()),
                    ],
                )
                .ignore()
                .cmd("EXPIREAT")
                .arg(self.key(&hash))
                .arg(ends)
                .ignore()
                .zadd(self.all(), &name, r.expires)
                .ignore();
            for index in [self.by_instance(&r.instance), self.by_host(&r.target.host)] {
                // The index lives as long as its longest-lived token: NX sets a first
                // expiry, GT only ever extends it.
                pipe.zadd(&index, &name, r.expires).ignore();
                pipe.cmd("EXPIREAT").arg(&index).arg(r.expires).arg("NX").ignore();
                pipe.cmd("EXPIREAT").arg(&index).arg(r.expires).arg("GT").ignore();
            }
            self.redis.run_replicated(|mut c| async move { pipe.query_async::<()>(&mut c).await }).await
        })
    }

    fn redeem(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>> {
        Box::pin(self.validate(hash, now, true))
    }

    fn check(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>> {
        Box::pin(self.validate(hash, now, false))
    }

    fn touch(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, bool> {
        let key = self.key(&hash);
        Box::pin(async move {
            let n: i64 = self.redis.run(|mut c| async move { TOUCH.key(key).arg(now).invoke_async(&mut c).await }).await?;
            Ok(n == 1)
        })
    }

    fn touch_many<'a>(&'a self, hashes: &'a [TokenHash], now: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let mut touched = 0;
            for batch in hashes.chunks(TOUCH_BATCH) {
                // The script is loaded first in the same pipeline, so that each EVALSHA
                // finds it even after Redis restarted (each stays a script on one key).
                let mut pipe = redis::pipe();
                pipe.cmd("SCRIPT").arg("LOAD").arg(TOUCH_LUA).ignore();
                for hash in batch {
                    pipe.cmd("EVALSHA").arg(TOUCH.get_hash()).arg(1).arg(self.key(hash)).arg(now);
                }
                let found: Vec<i64> = self.redis.run(|mut c| async move { pipe.query_async(&mut c).await }).await?;
                touched += found.iter().filter(|&&n| n == 1).count();
            }
            Ok(touched)
        })
    }

    fn delete(&self, hash: TokenHash) -> StoreFuture<'_, bool> {
        let (key, all, name) = (self.key(&hash), self.all(), hash.hex());
        Box::pin(async move {
            // The instance and host indexes drop the name when next read.
            let (n,): (i64,) =
                self.redis.run(|mut c| async move { redis::pipe().del(&key).zrem(&all, &name).ignore().query_async(&mut c).await }).await?;
            Ok(n == 1)
        })
    }

    fn delete_instance(&self, instance: &str) -> StoreFuture<'_, usize> {
        let index = self.by_instance(instance);
        Box::pin(async move {
            let idx = index.clone();
            let names: Vec<String> =
                self.redis.run(|mut c| async move { redis::cmd("ZRANGE").arg(&idx).arg(0).arg(-1).query_async(&mut c).await }).await?;
            if names.is_empty() {
                return Ok(0);
            }
            let keys: Vec<String> = names.iter().map(|n| super::keys::token(&self.prefix, n)).collect();
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.del(key);
            }
            // Only the names read: a token created meanwhile stays findable.
            pipe.zrem(self.all(), &names).ignore().zrem(&index, &names).ignore();
            let deleted: Vec<i64> = self.redis.run(|mut c| async move { pipe.query_async(&mut c).await }).await?;
            Ok(deleted.iter().filter(|&&n| n == 1).count())
        })
    }

    fn list(&self, filter: Filter, now: u64) -> StoreFuture<'_, Vec<TokenRecord>> {
        let index = match &filter {
            Filter::Instance(i) => self.by_instance(i),
            Filter::Host(h) => self.by_host(h),
            Filter::All => self.all(),
        };
        Box::pin(self.read_index(index, now))
    }

    fn sweep(&self, now: u64) -> StoreFuture<'_, usize> {
        let all = self.all();
        Box::pin(async move {
            // Token keys expire by themselves; this keeps the listing of all tokens short.
            self.redis
                .run(|mut c| async move { redis::cmd("ZREMRANGEBYSCORE").arg(&all).arg("-inf").arg(now).query_async(&mut c).await })
                .await
        })
    }

    fn take_once(&self, hash: TokenHash, expires: u64) -> StoreFuture<'_, bool> {
        let key = format!("{}:taken:{{{}}}", self.prefix, hash.hex());
        Box::pin(async move {
            let set: Option<String> = self
                .redis
                .run(|mut c| async move { redis::cmd("SET").arg(&key).arg(1).arg("NX").arg("EXAT").arg(expires).query_async(&mut c).await })
                .await?;
            Ok(set.is_some())
        })
    }

    fn count(&self) -> StoreFuture<'_, usize> {
        let all = self.all();
        Box::pin(async move { self.redis.run(|mut c| async move { redis::cmd("ZCARD").arg(&all).query_async(&mut c).await }).await })
    }
}
