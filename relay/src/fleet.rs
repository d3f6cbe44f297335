//! The fleet: appliances that share a store, and what must reach all of them: resets,
//! the list of appliances, and their live consoles. One appliance alone (the `local` and
//! `memory` stores) is a fleet of one, [`Alone`]; [`crate::store::redis::fleet`] is the
//! shared one.

use crate::auth::store::StoreFuture;
use crate::relay::backend::Relays;
use crate::session::{Registry, SessionView};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// What became of a reset beyond this appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Delivery {
    /// There is no fleet to tell.
    Alone,
    /// Every appliance ends the instance's consoles started before `epoch`.
    Told { epoch: u64 },
    /// The store could not be reached: the reset is kept here and delivered when it is
    /// back; until then only this appliance's consoles have ended.
    Pending { reason: String },
}

/// An appliance as its heartbeat shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appliance {
    pub name: String,
    pub version: String,
    /// Where its doors are (the access URLs' bases, or its listeners).
    pub address: String,
    pub live_consoles: usize,
    /// Unix seconds of its last heartbeat.
    pub last_seen: u64,
    /// False when its heartbeat is overdue: down, or cut off from the store.
    pub alive: bool,
}

/// One appliance's live consoles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceSessions {
    pub appliance: String,
    pub sessions: Vec<SessionView>,
}

/// Every answering appliance's consoles, and who did not answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSessions {
    pub appliances: Vec<ApplianceSessions>,
    pub missing: Vec<String>,
}

pub type Background = Pin<Box<dyn Future<Output = ()> + Send>>;

pub trait Fleet: Send + Sync + 'static {
    /// Ends the instance's consoles on the other appliances (this one's the caller ends).
    fn reset<'a>(&'a self, instance: &'a str, reason: &'a str) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>>;
    fn appliances(&self) -> StoreFuture<'_, Vec<Appliance>>;
    /// Asks every appliance for its live consoles (of one instance).
    fn sessions(&self, instance: Option<String>) -> StoreFuture<'_, FleetSessions>;
    /// What runs beside the appliance (subscriptions, heartbeats) until aborted.
    fn background(self: Arc<Self>) -> Background;
}

/// This appliance, as the fleet sees it.
#[derive(Clone)]
pub struct Me {
    pub name: String,
    pub address: String,
    pub sessions: Arc<Registry>,
    pub relays: Arc<Relays>,
}

impl Me {
    pub fn view(&self, now: u64) -> Appliance {
        Appliance {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            address: self.address.clone(),
            live_consoles: self.sessions.len(),
            last_seen: now,
            alive: true,
        }
    }

    pub fn sessions(&self, instance: Option<&str>) -> ApplianceSessions {
        let sessions = self.sessions.list(instance, |cookie| self.relays.kernel_bytes(cookie));
        ApplianceSessions { appliance: self.name.clone(), sessions }
    }
}

/// One appliance with a store of its own.
pub struct Alone(pub Me);

fn ready<T: Send + 'static>(v: T) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(Ok(v)))
}

impl Fleet for Alone {
    fn reset<'a>(&'a self, _instance: &'a str, _reason: &'a str) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        Box::pin(std::future::ready(Delivery::Alone))
    }
    fn appliances(&self) -> StoreFuture<'_, Vec<Appliance>> {
        ready(vec![self.0.view(crate::app::unix_now())])
    }
    fn sessions(&self, instance: Option<String>) -> StoreFuture<'_, FleetSessions> {
        ready(FleetSessions { appliances: vec![self.0.sessions(instance.as_deref())], missing: Vec::new() })
    }
    fn background(self: Arc<Self>) -> Background {
        Box::pin(std::future::pending())
    }
}
