//! What every connection shares: configuration, the token store, the session
//! registry and the counters.

use crate::auth::TokenStore;
use crate::auth::lockout::Lockout;
use crate::auth::memory::MemoryStore;
use crate::auth::passwords::{MemoryPasswords, PasswordStore};
use crate::config::Config;
use crate::session::Registry;
use crate::telemetry::Counters;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct App {
    pub config: Config,
    pub tokens: Arc<dyn TokenStore>,
    pub passwords: Arc<dyn PasswordStore>,
    pub lockout: Lockout,
    pub sessions: Arc<Registry>,
    pub counters: Counters,
    next_id: AtomicU64,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let tokens = Arc::new(MemoryStore::new(config.tokens.max_tokens));
        let sessions = Registry::new(config.limits.max_sessions, config.limits.max_sessions_per_instance);
        let p = &config.passwords;
        let passwords = Arc::new(MemoryPasswords::new(p.max_instances));
        let lockout = Lockout::new(p.max_failures, p.lockout_secs, p.max_tracked);
        Arc::new(App { config, tokens, passwords, lockout, sessions, counters: Counters::default(), next_id: AtomicU64::new(1) })
    }

    /// A process-unique id for a connection (and the session it may become).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
