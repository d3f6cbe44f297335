//! A fleet on Redis: resets that reach every appliance, heartbeats, and fleet-wide
//! session listings.
//!
//! A reset raises the instance's epoch (`P:{INSTANCE}:epoch`) and publishes it on
//! `P:resets`; every appliance ends the instance's consoles started under an older epoch.
//! Publishing is only the fast path: a message can be lost (an appliance between two
//! connections to Redis), so each appliance also compares its live consoles' epochs with
//! the store's after every (re)subscription and every [`TICK`]. A reset that cannot reach
//! Redis is kept (bounded) and delivered once Redis answers again.

use super::conn::Redis;
use crate::app::unix_now;
use crate::auth::store::{StoreError, StoreFuture};
use crate::fleet::{Appliance, ApplianceSessions, Background, Delivery, Fleet, FleetSessions, Me};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often an appliance beats, re-checks epochs and retries pending resets.
const TICK: Duration = Duration::from_secs(2);
/// A heartbeat older than this marks its appliance as not alive.
const HEARTBEAT_TTL_SECS: u64 = 10;
/// Appliances silent this long are dropped from the list.
const FORGET_AFTER_SECS: u64 = 86_400;
/// Resets kept while Redis is away.
const MAX_PENDING: usize = 10_000;
/// How long `sessions --cluster` waits for the other appliances.
const ASK_WAIT: Duration = Duration::from_millis(1000);

/// Raises an instance's epoch to Redis's clock in µs, or by one if the clock is behind it
/// (the epoch never goes back), and keeps it for a day; answers the new epoch. A console's
/// epoch is the clock at its redeem, so the reset ends exactly those redeemed before it;
/// an epoch lost with its key (expiry, failover) ends nothing wrongly.
static RAISE_EPOCH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local old = redis.call('GET', KEYS[1])
if old and tonumber(old) >= tonumber(now) then
  redis.call('INCR', KEYS[1])
else
  redis.call('SET', KEYS[1], now)
end
redis.call('EXPIRE', KEYS[1], 86400)
return redis.call('GET', KEYS[1])
"#,
    )
});

#[derive(Debug, Serialize, Deserialize)]
struct ResetMessage {
    instance: String,
    epoch: u64,
    reason: String,
    from: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct AskMessage {
    reply_to: String,
    instance: Option<String>,
}

pub struct RedisFleet {
    redis: Arc<Redis>,
    prefix: String,
    me: Me,
    pending: Mutex<VecDeque<(String, String)>>,
    /// One delivery of the pending resets at a time (the ticks and the listener both try).
    flushing: tokio::sync::Mutex<()>,
}

impl RedisFleet {
    pub fn new(redis: Arc<Redis>, prefix: &str, me: Me) -> RedisFleet {
        let (pending, flushing) = (Mutex::new(VecDeque::new()), tokio::sync::Mutex::new(()));
        RedisFleet { redis, prefix: prefix.to_string(), me, pending, flushing }
    }

    fn epoch_key(&self, instance: &str) -> String {
        super::keys::of_instance(&self.prefix, instance, super::keys::EPOCH)
    }
    fn channel(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }
    fn appliance_key(&self, name: &str) -> String {
        format!("{}:appliance:{name}", self.prefix)
    }

    /// Raises the epoch and tells the fleet.
    async fn publish_reset(&self, instance: &str, reason: &str) -> Result<u64, StoreError> {
        let key = self.epoch_key(instance);
        let epoch: String = self.redis.run(|mut c| async move { RAISE_EPOCH.key(&key).invoke_async(&mut c).await }).await?;
        let epoch: u64 = epoch.parse().map_err(|_| StoreError::Unavailable(format!("redis answered epoch {epoch:?}")))?;
        let message = ResetMessage { instance: instance.into(), epoch, reason: reason.into(), from: self.me.name.clone() };
        let payload = serde_json::to_string(&message).unwrap_or_default();
        let channel = self.channel("resets");
        // The epoch is what counts: a failed publish is caught by the others' re-checks.
        if let Err(e) =
            self.redis.run(|mut c| async move { redis::cmd("PUBLISH").arg(&channel).arg(&payload).query_async::<i64>(&mut c).await }).await
        {
            debug!(error = %e, "reset published late: the epoch is raised, re-checks will find it");
        }
        Ok(epoch)
    }

    /// Delivers the resets kept while Redis was away, oldest first.
    async fn flush_pending(&self) {
        let _one_at_a_time = self.flushing.lock().await;
        loop {
            let Some((instance, reason)) = self.lock_pending().pop_front() else { return };
            match self.publish_reset(&instance, &reason).await {
                Ok(epoch) => {
                    info!(target: crate::telemetry::AUDIT, event = "instance_reset_delivered", instance = %instance, epoch, late = true);
                }
                Err(_) => {
                    // Back at the front, to be tried first next time.
                    self.lock_pending().push_front((instance, reason));
                    return;
                }
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, String)>> {
        // Pushes and pops only: a poisoned queue is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends live consoles whose instance was reset since they started.
    async fn recheck(&self) -> Result<(), StoreError> {
        let instances = self.me.sessions.live_instances();
        for chunk in instances.chunks(500) {
            let keys: Vec<String> = chunk.iter().map(|i| self.epoch_key(i)).collect();
            // One key at a time keeps every command within one hash slot (Redis Cluster).
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.get(key);
            }
            let epochs: Vec<Option<u64>> = self.redis.run(|mut c| async move { pipe.query_async(&mut c).await }).await?;
            for (instance, epoch) in chunk.iter().zip(epochs) {
                let ended = self.me.sessions.disconnect_before(instance, epoch.unwrap_or(0), "console reset by operator");
                if ended > 0 {
                    info!(instance = %instance, ended, "ended consoles of an instance reset elsewhere (found on re-check)");
                }
            }
        }
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let now = unix_now();
        let view = serde_json::to_string(&self.me.view(now)).unwrap_or_default();
        let (key, set, name) = (self.appliance_key(&self.me.name), format!("{}:appliances", self.prefix), self.me.name.clone());
        self.redis
            .run(|mut c| async move {
                redis::pipe()
                    .set_ex(&key, &view, HEARTBEAT_TTL_SECS)
                    .ignore()
                    .zadd(&set, &name, now)
                    .ignore()
                    .zrembyscore(&set, "-inf", now.saturating_sub(FORGET_AFTER_SECS))
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    /// Heartbeats, pending resets and epoch re-checks, every tick.
    async fn ticks(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.heartbeat().await.is_ok() {
                self.flush_pending().await;
                let _ = self.recheck().await;
            }
        }
    }

    /// Listens for resets and questions; after each (re)subscription, re-checks epochs.
    async fn listen(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.subscribe().await {
                Ok(mut pubsub) => {
                    backoff = Duration::from_millis(100);
                    self.flush_pending().await;
                    if let Err(e) = self.recheck().await {
                        debug!(error = %e, "epoch re-check failed");
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        if msg.get_channel_name().ends_with(":resets") {
                            self.on_reset(&payload);
                        } else {
                            self.on_ask(&payload).await;
                        }
                    }
                    warn!(server = %self.redis.name, "lost the redis subscription; resubscribing");
                }
                Err(e) => debug!(error = %e, "redis subscription failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, StoreError> {
        let client = self.redis.client().await?;
        let err = |e: redis::RedisError| StoreError::Unavailable(e.to_string());
        let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
            .await
            .map_err(|_| StoreError::Unavailable("subscribe timed out".into()))?
            .map_err(err)?;
        pubsub.subscribe(&[self.channel("resets"), self.channel("ask")]).await.map_err(err)?;
        Ok(pubsub)
    }

    fn on_reset(&self, payload: &str) {
        let Ok(m) = serde_json::from_str::<ResetMessage>(payload) else {
            warn!("ignored a malformed reset message");
            return;
        };
        let ended = self.me.sessions.disconnect_before(&m.instance, m.epoch, &m.reason);
        if ended > 0 {
            info!(target: crate::telemetry::AUDIT, event = "instance_reset_received", instance = %m.instance, epoch = m.epoch, from = %m.from, disconnected = ended);
        }
    }

    async fn on_ask(&self, payload: &str) {
        let Ok(ask) = serde_json::from_str::<AskMessage>(payload) else { return };
        // Only a key of this fleet's own: the question names where to answer.
        if !ask.reply_to.starts_with(&format!("{}:answer:", self.prefix)) {
            return;
        }
        let answer = serde_json::to_string(&self.me.sessions(ask.instance.as_deref())).unwrap_or_default();
        let key = ask.reply_to;
        let _ =
            self.redis
                .run(|mut c| async move {
                    redis::pipe().rpush(&key, &answer).ignore().expire(&key, 30).ignore().query_async::<()>(&mut c).await
                })
                .await;
    }
}

impl Fleet for RedisFleet {
    fn reset<'a>(&'a self, instance: &'a str, reason: &'a str) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        Box::pin(async move {
            match self.publish_reset(instance, reason).await {
                Ok(epoch) => Delivery::Told { epoch },
                Err(e) => {
                    let mut pending = self.lock_pending();
                    if pending.len() >= MAX_PENDING {
                        pending.pop_front();
                        warn!("too many resets waiting for redis: dropped the oldest");
                    }
                    pending.push_back((instance.to_string(), reason.to_string()));
                    Delivery::Pending { reason: e.to_string() }
                }
            }
        })
    }

    fn appliances(&self) -> StoreFuture<'_, Vec<Appliance>> {
        let set = format!("{}:appliances", self.prefix);
        Box::pin(async move {
            let names: Vec<(String, u64)> = self
                .redis
                .run(|mut c| async move { redis::cmd("ZRANGE").arg(&set).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut c).await })
                .await?;
            if names.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = names.iter().map(|(n, _)| self.appliance_key(n)).collect();
            let beats: Vec<Option<String>> =
                self.redis.run(|mut c| async move { redis::cmd("MGET").arg(&keys).query_async(&mut c).await }).await?;
            let now = unix_now();
            Ok(names
                .into_iter()
                .zip(beats)
                .map(|((name, last_seen), beat)| match beat.and_then(|b| serde_json::from_str::<Appliance>(&b).ok()) {
                    Some(a) => Appliance { alive: now.saturating_sub(a.last_seen) < HEARTBEAT_TTL_SECS, ..a },
                    None => Appliance { name, version: String::new(), address: String::new(), live_consoles: 0, last_seen, alive: false },
                })
                .collect())
        })
    }

    fn sessions(&self, instance: Option<String>) -> StoreFuture<'_, FleetSessions> {
        Box::pin(async move {
            let expected: Vec<String> =
                self.appliances().await?.into_iter().filter(|a| a.alive && a.name != self.me.name).map(|a| a.name).collect();
            let reply_to = format!("{}:answer:{}", self.prefix, crate::auth::token::generate());
            let ask = serde_json::to_string(&AskMessage { reply_to: reply_to.clone(), instance: instance.clone() }).unwrap_or_default();
            let channel = self.channel("ask");
            self.redis.run(|mut c| async move { redis::cmd("PUBLISH").arg(&channel).arg(&ask).query_async::<i64>(&mut c).await }).await?;
            let started = tokio::time::Instant::now();
            let mut answers: Vec<ApplianceSessions>;
            loop {
                let key = reply_to.clone();
                let raw: Vec<String> =
                    self.redis.run(|mut c| async move { redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(&mut c).await }).await?;
                answers = raw
                    .iter()
                    .filter_map(|r| serde_json::from_str(r).ok())
                    .filter(|a: &ApplianceSessions| a.appliance != self.me.name)
                    .collect();
                if expected.iter().all(|name| answers.iter().any(|a| &a.appliance == name)) || started.elapsed() >= ASK_WAIT {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let missing = expected.into_iter().filter(|name| !answers.iter().any(|a| &a.appliance == name)).collect();
            answers.insert(0, self.me.sessions(instance.as_deref()));
            Ok(FleetSessions { appliances: answers, missing })
        })
    }

    fn background(self: Arc<Self>) -> Background {
        Box::pin(async move {
            tokio::join!(self.clone().ticks(), self.listen());
        })
    }
}
