//! Where a console token is looked up: relay's own store, or the token authorities that
//! other console proxies use (websockify's token files and Redis), tried in the order of
//! `[tokens] sources`. The first source that knows a token decides; everything after the
//! look-up (dial, RFB, relay) is the same whichever it was.

pub mod jwt;
pub mod nova;
pub mod websockify_file;
pub mod websockify_redis;

use super::store::{StoreError, StoreFuture, TokenRejection, TokenStore};
use super::token::{Target, TokenHash, TokenRecord};
use std::sync::Arc;

/// What a source says of a token: `None` when it does not know it (the next is asked).
pub type Found = Option<Result<TokenRecord, TokenRejection>>;

pub trait TokenSource: Send + Sync + 'static {
    /// The name in `[tokens] sources`, also shown with the consoles it opened.
    fn name(&self) -> &'static str;

    /// Redeems `token` (its SHA-256 is `hash`) for a console starting at `now`.
    fn redeem<'a>(&'a self, token: &'a str, hash: TokenHash, now: u64) -> StoreFuture<'a, Found>;

    /// Called every touch interval with the tokens of this source's live consoles: keeps
    /// them in use, and returns those the source no longer honours (their consoles end).
    fn keep<'a>(&'a self, _live: &'a [TokenHash], _now: u64) -> StoreFuture<'a, Vec<TokenHash>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// relay's own store: tokens made by `token create`.
pub struct StoreSource(pub Arc<dyn TokenStore>);

impl TokenSource for StoreSource {
    fn name(&self) -> &'static str {
        "store"
    }

    fn redeem<'a>(&'a self, _token: &'a str, hash: TokenHash, now: u64) -> StoreFuture<'a, Found> {
        Box::pin(async move {
            Ok(match self.0.redeem(hash, now).await? {
                Err(TokenRejection::Unknown) => None,
                known => Some(known),
            })
        })
    }

    /// A live console's token lapses from its last use, not from its redeem.
    fn keep<'a>(&'a self, live: &'a [TokenHash], now: u64) -> StoreFuture<'a, Vec<TokenHash>> {
        Box::pin(async move {
            self.0.touch_many(live, now).await?;
            Ok(Vec::new())
        })
    }
}

/// The configured sources, in order.
pub struct Sources(Vec<Box<dyn TokenSource>>);

impl Sources {
    pub fn new(sources: Vec<Box<dyn TokenSource>>) -> Sources {
        Sources(sources)
    }

    /// The first answer of a source that knows the token; unknown to all, `Unknown`. A
    /// source that fails stops the look-up: a later source must not answer for a token
    /// the failed one may hold (it could be revoked there).
    pub async fn redeem(&self, token: &str, hash: TokenHash, now: u64) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        for source in &self.0 {
            if let Some(found) = source.redeem(token, hash, now).await? {
                return Ok(found.map(|record| TokenRecord { source: source.name(), ..record }));
            }
        }
        Ok(Err(TokenRejection::Unknown))
    }

    /// Keeps the live consoles' tokens of the source named `source` in use; returns the
    /// tokens it no longer honours.
    pub async fn keep(&self, source: &str, live: &[TokenHash], now: u64) -> Result<Vec<TokenHash>, StoreError> {
        match self.0.iter().find(|s| s.name() == source) {
            Some(s) => s.keep(live, now).await,
            None => Ok(Vec::new()),
        }
    }
}

/// A record for a console an outside authority names only by its target: the instance is
/// `<source>-<token id>` (shown by `sessions`, usable with `instance reset`); it lives
/// `ttl` seconds from now as far as listings go, and never lapses (`no_expiry`: a source
/// whose authority gives an expiry sets it, and clears the flag).
pub fn outside_record(source: &str, hash: &TokenHash, target: Target, now: u64, ttl: u64) -> TokenRecord {
    TokenRecord {
        id: hash.id(),
        instance: format!("{source}-{}", hash.id()),
        console: "vnc".into(),
        target,
        created: now,
        expires: now.saturating_add(ttl),
        last_touched: now,
        idle_timeout: 0,
        single_use: false,
        used: true,
        hypervisor_schemes: None,
        hypervisor_password: None,
        redeemed_epoch: 0,
        source: "",
        no_expiry: true,
    }
}

/// websockify's `host:port` (the host may be a bracketed IPv6 address).
pub fn parse_target(text: &str) -> Option<Target> {
    let (host, port) = text.trim().rsplit_once(':')?;
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.trim().parse().ok().filter(|&p| p != 0)?;
    if host.is_empty() || host.len() > 255 || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    Some(Target { host: host.to_string(), port, internal_access_path: None })
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn websockify_targets() {
        let t = parse_target(" 10.0.0.5:5901\n").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.5", 5901));
        let t = parse_target("[fd00::1]:5900").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 5900));
        for bad in ["", "host", "host:", "host:0", "host:99999", ":5900", "a b:5900"] {
            assert!(parse_target(bad).is_none(), "{bad:?}");
        }
    }
}
