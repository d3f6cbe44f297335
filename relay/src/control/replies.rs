//! The result of each control operation, as one type shared by the server that writes it
//! and `relay ctl` (and tests) that read it. `docs/control-protocol.md` lists them.

use crate::auth::{TokenRecord, TokenRejection};
use crate::fleet::{Appliance, Delivery};
use crate::metrics::{CountersView, LabelledView};
use crate::relay::backend::BackendsView;
use crate::relay::lifecycle::Cause;
use crate::session::SessionView;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `token_create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token itself: shown once, here; relay keeps only its hash.
    pub token: String,
    /// Its non-secret id, as logs and listings name it.
    pub id: String,
    pub instance: String,
    pub expires: u64,
    pub urls: AccessUrls,
}

/// Where a viewer opens the console, per front door (absent: that door is off).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccessUrls {
    /// noVNC's page, with the token in its `path` parameter, as nova hands it out.
    pub novnc: Option<String>,
    /// The WebSocket door's path and query, for a client of its own.
    pub websocket: Option<String>,
    /// The CONNECT door's URL, for native viewers.
    pub connect: Option<String>,
}

/// `token_check`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenChecked {
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<TokenRejection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `token_touch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Touched {
    pub touched: bool,
}

/// `token_delete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
}

/// `token_list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenRecord>,
}

/// `sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// `stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Since start; bytes of ended consoles only.
    pub counters: CountersView,
    /// Consoles ended since start, by cause.
    pub ended: BTreeMap<Cause, u64>,
    /// The same counts by door, back-end and kind, as `/metrics` labels them.
    #[serde(default)]
    pub labelled: LabelledView,
    /// Live consoles by front door.
    #[serde(default)]
    pub live_by_door: BTreeMap<crate::front::Door, usize>,
    pub sessions_active: usize,
    /// Bytes the live consoles have moved so far, each way.
    pub live_bytes_to_hypervisor: u64,
    pub live_bytes_to_viewer: u64,
    /// Tokens in the store (usable, or not yet swept).
    pub tokens: usize,
    /// Which back-end carries which consoles, and the kernel's share.
    pub relay: BackendsView,
}

/// `instance_password_set` and `instance_password_clear`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasswordChanged {
    pub instance: String,
    /// `set` or `cleared`.
    pub password: String,
    /// Live consoles ended because of the change (when asked), on this appliance.
    pub disconnected: usize,
    /// Whether the other appliances were told to end theirs (when asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Delivery>,
}

/// `instance_reset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceReset {
    pub instance: String,
    /// Live consoles ended on this appliance, on every door.
    pub disconnected: usize,
    /// Tokens deleted.
    pub revoked: usize,
    /// Why `revoke` deleted nothing: the store could not be reached (the consoles were
    /// still ended; revoke again once it is back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_error: Option<String>,
    /// Whether the other appliances of the fleet were told.
    pub fleet: Delivery,
}

/// `cluster`: the appliances sharing the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    /// The store back-end: `memory`, `local` or `redis`.
    pub store: String,
    /// The appliance that answered.
    pub this: String,
    pub appliances: Vec<Appliance>,
}
