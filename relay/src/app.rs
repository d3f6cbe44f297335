//! What every connection shares: configuration, the token store, the session
//! registry and the counters.

use crate::auth::TokenStore;
use crate::auth::lockout::LockoutStore;
use crate::auth::passwords::PasswordStore;
use crate::config::Config;
use crate::fleet::{Fleet, Me};
use crate::metrics::Counters;
use crate::relay::backend::Relays;
use crate::session::Registry;
use crate::sources::Sources;
use crate::tls::kernel::Ktls;
use crate::tls::{self, FrontTls};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_rustls::TlsConnector;

pub struct App {
    /// The configuration in force: SIGHUP swaps in a new one (see [`crate::reload`]); a
    /// connection reads it as it goes.
    config: RwLock<Arc<Config>>,
    pub tokens: Arc<dyn TokenStore>,
    /// Where a console's token is looked up: the store, then any other authority.
    pub token_sources: crate::auth::sources::Sources,
    pub passwords: Arc<dyn PasswordStore>,
    pub lockout: Arc<dyn LockoutStore>,
    /// The appliances that share the store; resets reach them through it.
    pub fleet: Arc<dyn Fleet>,
    pub sessions: Arc<Registry>,
    /// Open connections per source address.
    pub sources: Arc<Sources>,
    pub counters: Counters,
    pub timings: crate::metrics::Timings,
    /// The front doors' TLS identity, when configured.
    pub front_tls: Option<FrontTls>,
    /// relay's TLS client towards VeNCrypt hypervisors, when configured (rebuilt on reload).
    hypervisor_tls: RwLock<Option<TlsConnector>>,
    pub ktls: Ktls,
    /// The back-ends established consoles run on.
    pub relays: Arc<Relays>,
    /// Set when shutdown begins: `/readyz` says so and new consoles are refused.
    pub draining: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
}

impl App {
    /// Builds the shared state; fails on unreadable TLS material.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let front_tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(FrontTls::load(cert, key, &config.tls)?),
            _ => None,
        };
        let h = &config.hypervisor;
        let hypervisor_tls = match &h.vencrypt_ca_certs {
            Some(ca) => Some(tls::hypervisor_connector(ca, h)?),
            None => None,
        };
        let sessions = Registry::new(config.limits.max_sessions, config.limits.max_sessions_per_instance);
        let ktls = match config.relay.kernel_tls {
            true => tls::kernel::probe(),
            false => Ktls::Unavailable("relay.kernel_tls = false".into()),
        };
        let relays = Arc::new(Relays::start(&config.relay, config.limits.max_sessions, ktls.clone())?);
        let me =
            Me { name: config.store.appliance(), address: appliance_address(&config), sessions: sessions.clone(), relays: relays.clone() };
        let crate::store::Stores { tokens, passwords, lockout, fleet } = crate::store::open(&config, me)?;
        let token_sources = crate::store::open_sources(&config, tokens.clone())?;
        let sources = Sources::new(config.limits.max_connections_per_source);
        Ok(Arc::new(App {
            config: RwLock::new(Arc::new(config)),
            tokens,
            token_sources,
            passwords,
            lockout,
            fleet,
            sessions,
            sources,
            counters: Counters::default(),
            timings: Default::default(),
            front_tls,
            hypervisor_tls: RwLock::new(hypervisor_tls),
            ktls,
            relays,
            draining: std::sync::atomic::AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        }))
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Puts `config` in force for what reads it from now on (see [`crate::reload`]).
    pub fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }

    /// relay's TLS client towards VeNCrypt hypervisors, if configured.
    /// Whether TLS connections read record by record under rustls, so that their TLS can
    /// move into the kernel after the handshakes.
    pub fn cork_tls(&self) -> bool {
        matches!(self.ktls, Ktls::Available(_))
    }

    pub fn hypervisor_tls(&self) -> Option<TlsConnector> {
        self.hypervisor_tls.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set_hypervisor_tls(&self, connector: Option<TlsConnector>) {
        *self.hypervisor_tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) = connector;
    }

    /// Whether relay takes consoles now (`/readyz`): not draining, and its token store
    /// answering (a count is the cheapest question every store can be asked).
    pub async fn readiness(&self) -> crate::front::health::Readiness {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining: relay is shutting down".into());
        }
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.tokens.count()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the token store did not answer within 2 s".into()),
        }
    }

    /// A process-unique id for a connection (and the session it may become).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where this appliance's doors are, for the fleet's list: the public URLs where set,
/// else the listeners.
fn appliance_address(config: &Config) -> String {
    let doors = crate::control::handler::DoorBases::of(config, config.tls.cert.is_some());
    [doors.novnc, doors.connect].into_iter().flatten().collect::<Vec<_>>().join(" ")
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
