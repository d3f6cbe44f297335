//! The storage interface behind console tokens: the in-memory map
//! ([`super::memory::MemoryStore`]), the local store on disk, and Redis for a fleet.

use super::token::{TokenHash, TokenRecord};
use std::future::Future;
use std::pin::Pin;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a token does not open a console. Shown to clients as it is: it names no secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRejection {
    #[error("unknown console token")]
    Unknown,
    #[error("console token expired")]
    Expired,
    #[error("console token lapsed after going unused")]
    Idle,
    #[error("console token was already used")]
    AlreadyUsed,
    #[error("console token was revoked")]
    Revoked,
    #[error("console token is for another kind of console than this door serves")]
    WrongConsole,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("token store is full ({0} tokens)")]
    Full(usize),
    #[error("token store unavailable: {0}")]
    Unavailable(String),
}

/// Selects tokens for listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Instance(String),
    Host(String),
    All,
}

pub trait TokenStore: Send + Sync + 'static {
    fn insert(&self, hash: TokenHash, record: TokenRecord) -> StoreFuture<'_, ()>;
    /// Validates a token for a new connection: consumes a single-use token and
    /// counts as a touch.
    fn redeem(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>>;
    /// Validates without side effects.
    fn check(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>>;
    /// Marks the token as in use at `now` (live sessions do this); false if unknown.
    fn touch(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, bool>;
    /// Touches every token of the live consoles at once (each touch interval); returns how
    /// many were known. A store that can do it in one write or round trip does.
    fn touch_many<'a>(&'a self, hashes: &'a [TokenHash], now: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let mut known = 0;
            for hash in hashes {
                known += usize::from(self.touch(*hash, now).await?);
            }
            Ok(known)
        })
    }
    fn delete(&self, hash: TokenHash) -> StoreFuture<'_, bool>;
    /// Deletes every token of an instance; returns how many.
    fn delete_instance(&self, instance: &str) -> StoreFuture<'_, usize>;
    fn list(&self, filter: Filter, now: u64) -> StoreFuture<'_, Vec<TokenRecord>>;
    /// Forgets expired, lapsed and used-up tokens; returns how many.
    fn sweep(&self, now: u64) -> StoreFuture<'_, usize>;
    /// How many tokens are stored (usable or not yet swept).
    fn count(&self) -> StoreFuture<'_, usize>;
    /// Marks `hash` as used until `expires`: true the first time, false after (across the
    /// fleet, for a shared store). For what is single-use but kept elsewhere: a signed
    /// token's `jti`.
    fn take_once(&self, hash: TokenHash, expires: u64) -> StoreFuture<'_, bool>;

    /// Notes that `instance` was reset at `at`: its signed tokens issued before then are
    /// refused until `until` (they are checked nowhere else to be revoked).
    fn revoke_signed<'a>(&'a self, instance: &'a str, at: u64, until: u64) -> StoreFuture<'a, ()> {
        self.insert(super::token::revocation_key(instance), TokenRecord::revocation(instance, at, until))
    }

    /// When `instance`'s signed tokens were last revoked, while that holds.
    fn signed_revoked_at<'a>(&'a self, instance: &'a str, now: u64) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move { Ok(self.check(super::token::revocation_key(instance), now).await?.ok().map(|r| r.created)) })
    }
}
