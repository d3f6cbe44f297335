//! Opens the configured store: `memory` (this process), `local` (a file on this
//! appliance) or `redis` (shared by a fleet). Each gives the same four things: tokens,
//! console passwords, lock-out counts, and the fleet that resets reach.

pub mod local;
pub mod redis;

use crate::auth::TokenStore;
use crate::auth::lockout::{Lockout, LockoutStore};
use crate::auth::memory::MemoryStore;
use crate::auth::passwords::{MemoryPasswords, PasswordStore};
use crate::auth::seal::Sealer;
use crate::auth::sources::jwt::JwtSource;
use crate::auth::sources::websockify_file::TokenFile;
use crate::auth::sources::websockify_redis::TokenRedis;
use crate::auth::sources::{Sources, StoreSource, TokenSource};
use crate::config::{Config, StoreBackend, TokenSourceKind};
use crate::fleet::{Alone, Fleet, Me};
use anyhow::Context as _;
use std::sync::Arc;

pub struct Stores {
    pub tokens: Arc<dyn TokenStore>,
    pub passwords: Arc<dyn PasswordStore>,
    pub lockout: Arc<dyn LockoutStore>,
    pub fleet: Arc<dyn Fleet>,
}

pub fn open(config: &Config, me: Me) -> anyhow::Result<Stores> {
    let (cfg, p, max_tokens) = (&config.store, &config.passwords, config.tokens.max_tokens);
    let memory_lockout = || Arc::new(Lockout::new(p.max_failures, p.lockout_secs, p.max_tracked));
    Ok(match cfg.backend {
        StoreBackend::Memory => Stores {
            tokens: Arc::new(MemoryStore::new(max_tokens)),
            passwords: Arc::new(MemoryPasswords::new(p.max_instances)),
            lockout: memory_lockout(),
            fleet: Arc::new(Alone(me)),
        },
        StoreBackend::Local => {
            let file = cfg.file();
            let key = cfg.secret_key_file.clone().unwrap_or_else(|| file.with_extension("key"));
            if let Some(dir) = key.parent() {
                create_private_dir(dir)?;
            }
            let sealer = match &cfg.secret_key_file {
                Some(path) => Sealer::load(path),
                None => Sealer::load_or_create(&key),
            }?;
            let store = Arc::new(local::LocalStore::open(&file, sealer, max_tokens, p.max_instances)?);
            tracing::info!(file = %file.display(), "store: local file (tokens and console passwords survive restarts)");
            Stores { tokens: store.clone(), passwords: store, lockout: memory_lockout(), fleet: Arc::new(Alone(me)) }
        }
        StoreBackend::Redis => {
            let key = cfg.secret_key_file.as_deref().context("store.secret_key_file")?;
            let sealer = Arc::new(Sealer::load(key)?);
            let conn = Arc::new(redis::conn::Redis::new(cfg)?);
            let prefix = cfg.key_prefix.as_str();
            tracing::info!(server = %conn.name, appliance = %me.name, "store: redis, shared with the fleet");
            Stores {
                tokens: Arc::new(redis::tokens::RedisTokens::new(conn.clone(), sealer.clone(), prefix, max_tokens)),
                passwords: Arc::new(redis::instance::RedisPasswords::new(conn.clone(), sealer, prefix)),
                lockout: Arc::new(redis::instance::RedisLockout::new(conn.clone(), prefix, p.max_failures, p.lockout_secs)),
                fleet: Arc::new(redis::fleet::RedisFleet::new(conn, prefix, me)),
            }
        }
    })
}

/// The token sources of `[tokens] sources`, in order; `tokens` is the store's.
pub fn open_sources(config: &Config, tokens: Arc<dyn TokenStore>) -> anyhow::Result<Sources> {
    let ttl = config.tokens.ttl_secs;
    let ws = &config.websockify;
    let mut sources: Vec<Box<dyn TokenSource>> = Vec::new();
    for kind in &config.tokens.sources {
        sources.push(match kind {
            TokenSourceKind::Store => Box::new(StoreSource(tokens.clone())),
            TokenSourceKind::WebsockifyFile => {
                let path = ws.token_file.as_deref().context("websockify.token_file")?;
                Box::new(TokenFile::open(path, ttl).context("websockify.token_file")?)
            }
            TokenSourceKind::Jwt => {
                let jwt = &config.jwt;
                Box::new(JwtSource::new(&jwt.keys, jwt.leeway_secs, jwt.require_exp, ttl, tokens.clone())?)
            }
            TokenSourceKind::Nova => Box::new(crate::auth::sources::nova::NovaSource::new(&config.nova).context("nova.database_urls")?),
            TokenSourceKind::WebsockifyRedis => {
                let store = crate::config::Store {
                    url: ws.redis_url.clone(),
                    password_file: ws.redis_password_file.clone(),
                    ..crate::config::Store::default()
                };
                let redis = redis::conn::Redis::new(&store).context("websockify.redis_url")?;
                tracing::info!(server = %redis.name, namespace = %ws.redis_namespace, "token source websockify-redis");
                Box::new(TokenRedis::new(redis, &ws.redis_namespace, ttl))
            }
        });
    }
    Ok(Sources::new(sources))
}

/// Makes `dir` (mode 0700) if it is missing.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.as_os_str().is_empty() && !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("store directory {}", dir.display()))?;
    }
    Ok(())
}
