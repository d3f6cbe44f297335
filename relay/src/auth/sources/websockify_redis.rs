//! websockify's TokenRedis (`--token-plugin TokenRedis`): the token is a Redis key (after
//! `namespace:` when a namespace is set) whose value is `{"host": …, "port": …}` or
//! `host:port`. Read only, for moving a websockify deployment over without touching what
//! writes its tokens.

use super::{Found, TokenSource, outside_record, parse_target};
use crate::auth::store::StoreFuture;
use crate::auth::token::{Target, TokenHash};
use crate::store::redis::conn::Redis;

pub struct TokenRedis {
    redis: Redis,
    namespace: String,
    ttl: u64,
}

impl TokenRedis {
    pub fn new(redis: Redis, namespace: &str, ttl: u64) -> TokenRedis {
        TokenRedis { redis, namespace: namespace.to_string(), ttl }
    }
}

/// A TokenRedis value: JSON with `host` and `port` (a number or a string), or `host:port`.
fn parse_value(value: &str) -> Option<Target> {
    let value = value.trim();
    match serde_json::from_str::<serde_json::Value>(value) {
        Ok(json) => {
            let host = json.get("host")?.as_str()?;
            let port = match json.get("port")? {
                serde_json::Value::Number(n) => n.as_u64()?.to_string(),
                serde_json::Value::String(s) => s.clone(),
                _ => return None,
            };
            parse_target(&format!("{host}:{port}"))
        }
        Err(_) => parse_target(value),
    }
}

impl TokenSource for TokenRedis {
    fn name(&self) -> &'static str {
        "websockify-redis"
    }

    fn redeem<'a>(&'a self, token: &'a str, hash: TokenHash, now: u64) -> StoreFuture<'a, Found> {
        let key = if self.namespace.is_empty() { token.to_string() } else { format!("{}:{token}", self.namespace) };
        Box::pin(async move {
            let value: Option<String> =
                self.redis.run(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }).await?;
            let Some(value) = value else { return Ok(None) };
            match parse_value(&value) {
                Some(target) => Ok(Some(Ok(outside_record("websockify", &hash, target, now, self.ttl)))),
                None => {
                    tracing::warn!(token_id = %hash.id(), "websockify redis token has no usable host and port; refused");
                    Ok(Some(Err(crate::auth::TokenRejection::Unknown)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_value;

    #[test]
    fn both_value_forms() {
        let t = parse_value(r#"{"host": "10.0.0.7", "port": "5907"}"#).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.7", 5907));
        let t = parse_value(r#"{"host": "hv", "port": 5908}"#).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("hv", 5908));
        let t = parse_value("hv9:5909\n").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("hv9", 5909));
        assert!(parse_value(r#"{"host": "hv"}"#).is_none());
        assert!(parse_value("nonsense").is_none());
    }
}
