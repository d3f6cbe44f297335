//! Carries out control requests against the token and password stores and the session
//! registry, through a [`ControlContext`] that holds nothing else.

use super::proto::{ControlError, Envelope, ErrorKind, Request, VERSION};
use super::replies::{
    AccessUrls, Cluster, Deleted, InstanceReset, PasswordChanged, SessionList, Stats, TokenChecked, TokenCreated, TokenList, Touched,
};
use crate::app::{App, unix_now};
use crate::auth::passwords::{PasswordStore, check_password};
use crate::auth::store::Filter;
use crate::auth::token::check_instance;
use crate::auth::{NewToken, StoreError, TokenHash, TokenRecord, TokenStore, token};
use crate::config::{Config, StoreBackend, TokenSourceKind, Tokens};
use crate::fleet::{Delivery, Fleet};
use crate::front::token_param;
use crate::metrics::Counters;
use crate::relay::backend::Relays;
use crate::session::Registry;
use crate::telemetry::AUDIT;
use serde::Serialize;
use serde_json::Value;
use tracing::info;

/// What the control plane may reach.
pub struct ControlContext<'a> {
    pub tokens: &'a dyn TokenStore,
    pub passwords: &'a dyn PasswordStore,
    pub sessions: &'a Registry,
    /// The appliances sharing the store: resets reach them through it.
    pub fleet: &'a dyn Fleet,
    pub store_backend: StoreBackend,
    pub appliance: String,
    /// Read only, for `stats`.
    pub counters: &'a Counters,
    pub relays: &'a Relays,
    /// Lifetimes of new tokens.
    pub token_defaults: Tokens,
    /// How long a reset refuses an instance's signed tokens; `None` without the jwt source.
    pub signed_revocation_secs: Option<u64>,
    /// Where each door is reached, for the URLs a new token comes with.
    pub doors: DoorBases,
}

/// The base of each door's console URL (None: the door is off).
pub struct DoorBases {
    pub novnc: Option<String>,
    pub websocket: bool,
    pub connect: Option<String>,
}

impl DoorBases {
    /// From the configuration: the public URLs where set, else the listeners' addresses.
    pub fn of(config: &Config, tls: bool) -> DoorBases {
        let base = |addr: Option<std::net::SocketAddr>, path: &str| {
            addr.map(|a| {
                let host = if a.ip().is_unspecified() { "localhost".to_string() } else { a.ip().to_string() };
                let host = if a.is_ipv6() && host != "localhost" { format!("[{host}]") } else { host };
                let scheme = if tls { "https" } else { "http" };
                format!("{scheme}://{host}:{}{path}", a.port())
            })
        };
        let (listen, public) = (&config.listen, &config.public);
        DoorBases {
            novnc: public.novnc_base_url.clone().or_else(|| base(listen.websocket.first(), "/vnc_lite.html")),
            websocket: !listen.websocket.is_empty(),
            connect: public.connect_base_url.clone().or_else(|| base(listen.connect.first(), "/console")),
        }
    }

    fn urls(&self, token: &str) -> AccessUrls {
        AccessUrls {
            novnc: self.novnc.as_deref().map(|b| token_param::novnc_url(b, token)),
            websocket: self.websocket.then(|| token_param::websocket_path(token)),
            connect: self.connect.as_deref().map(|b| token_param::connect_url(b, token)),
        }
    }
}

impl<'a> ControlContext<'a> {
    pub fn of(app: &'a App) -> ControlContext<'a> {
        ControlContext {
            tokens: app.tokens.as_ref(),
            passwords: app.passwords.as_ref(),
            sessions: &app.sessions,
            fleet: app.fleet.as_ref(),
            store_backend: app.config().store.backend,
            appliance: app.config().store.appliance(),
            counters: &app.counters,
            relays: &app.relays,
            token_defaults: app.config().tokens.clone(),
            signed_revocation_secs: app.config().tokens.sources.contains(&TokenSourceKind::Jwt).then_some(app.config().jwt.revoke_for_secs),
            doors: DoorBases::of(&app.config(), app.front_tls.is_some()),
        }
    }
}

impl ControlContext<'_> {
    /// `stats`; `/metrics` renders the same value.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let live = self.sessions.list(None, |cookie| self.relays.kernel_bytes(cookie));
        let mut live_by_door = std::collections::BTreeMap::new();
        for s in &live {
            *live_by_door.entry(s.info.door).or_default() += 1;
        }
        Ok(Stats {
            counters: self.counters.view(),
            ended: self.counters.ended_view(),
            labelled: self.counters.labelled_view(),
            live_by_door,
            sessions_active: live.len(),
            live_bytes_to_hypervisor: live.iter().map(|s| s.bytes_to_hypervisor).sum(),
            live_bytes_to_viewer: live.iter().map(|s| s.bytes_to_viewer).sum(),
            tokens: self.tokens.count().await?,
            relay: self.relays.view(),
        })
    }
}

/// Carries out one request; the result is the operation's reply type, as JSON.
pub async fn handle(ctx: &ControlContext<'_>, envelope: Envelope) -> Result<Value, ControlError> {
    if envelope.v != VERSION {
        return Err(ControlError::new(
            ErrorKind::UnsupportedVersion,
            format!("protocol version {} is not spoken; use {VERSION}", envelope.v),
        ));
    }
    let now = unix_now();
    let store = ctx.tokens;
    if let Some(instance) = envelope.request.instance() {
        check_instance(instance).map_err(|e| ControlError::new(ErrorKind::BadRequest, e))?;
    }
    match envelope.request {
        Request::TokenCreate(req) => reply(create(ctx, req).await?),
        Request::TokenCheck { token } => reply(match store.check(TokenHash::of(&token), now).await.map_err(unavailable)? {
            Ok(record) => TokenChecked { valid: true, token: Some(record), reason: None, message: None },
            Err(rejection) => TokenChecked { valid: false, token: None, reason: Some(rejection), message: Some(rejection.to_string()) },
        }),
        Request::TokenTouch { token } => {
            found(store.touch(TokenHash::of(&token), now).await.map_err(unavailable)?)?;
            reply(Touched { touched: true })
        }
        Request::TokenDelete { token } => {
            let hash = TokenHash::of(&token);
            found(store.delete(hash).await.map_err(unavailable)?)?;
            info!(target: AUDIT, event = "token_deleted", token_id = %hash.id());
            reply(Deleted { deleted: true })
        }
        Request::TokenList { instance, host } => {
            let filter = match (instance, host) {
                (Some(i), None) => Filter::Instance(i),
                (None, Some(h)) => Filter::Host(h),
                (None, None) => Filter::All,
                (Some(_), Some(_)) => return Err(ControlError::new(ErrorKind::BadRequest, "list by instance or by host, not both")),
            };
            let mut tokens = store.list(filter, now).await.map_err(unavailable)?;
            tokens.retain(|t| !t.is_note());
            reply(TokenList { tokens })
        }
        Request::Sessions { instance } => {
            reply(SessionList { sessions: ctx.sessions.list(instance.as_deref(), |cookie| ctx.relays.kernel_bytes(cookie)) })
        }
        Request::ClusterSessions { instance } => reply(ctx.fleet.sessions(instance).await.map_err(unavailable)?),
        Request::Cluster => {
            let store = serde_json::to_value(ctx.store_backend).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            reply(Cluster { store, this: ctx.appliance.clone(), appliances: ctx.fleet.appliances().await.map_err(unavailable)? })
        }
        Request::Stats => reply(ctx.stats().await.map_err(unavailable)?),
        Request::InstancePasswordSet { instance, password, disconnect } => {
            if let Err(e) = check_password(&password.0) {
                return Err(ControlError::new(ErrorKind::BadRequest, format!("password: {e}")));
            }
            ctx.passwords.set(&instance, password).await.map_err(store_error)?;
            reply(password_changed(ctx, instance, "set", disconnect).await)
        }
        Request::InstancePasswordClear { instance, disconnect } => {
            let had = ctx.passwords.clear(&instance).await.map_err(unavailable)?;
            if !had {
                return Err(ControlError::new(ErrorKind::NotFound, "the instance has no console password"));
            }
            reply(password_changed(ctx, instance, "cleared", disconnect).await)
        }
        Request::InstanceReset { instance, revoke } => {
            // Revoked first, so that no console can open on a token the reset is ending;
            // a store that cannot revoke does not keep the consoles from ending.
            let revoked = match revoke {
                true => Some(revoke_instance(ctx, &instance, now).await),
                false => None,
            };
            let disconnected = ctx.sessions.disconnect_instance(&instance, RESET);
            let fleet = ctx.fleet.reset(&instance, RESET).await;
            let revoke_error = match &revoked {
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            let revoked = match revoked {
                Some(Ok(n)) => n,
                _ => 0,
            };
            info!(target: AUDIT, event = "instance_reset", instance = %instance, disconnected, revoked, fleet = ?fleet, revoke_error = ?revoke_error);
            reply(InstanceReset { instance, disconnected, revoked, revoke_error, fleet })
        }
    }
}

/// Deletes the instance's tokens, and notes the reset for its signed tokens (which
/// exist only in the hands of those they were given to) when they are accepted.
async fn revoke_instance(ctx: &ControlContext<'_>, instance: &str, now: u64) -> Result<usize, StoreError> {
    let deleted = ctx.tokens.delete_instance(instance).await?;
    if let Some(lasts) = ctx.signed_revocation_secs {
        ctx.tokens.revoke_signed(instance, now, now.saturating_add(lasts)).await?;
    }
    Ok(deleted)
}

fn reply(result: impl Serialize) -> Result<Value, ControlError> {
    serde_json::to_value(result).map_err(|e| ControlError::new(ErrorKind::Unavailable, format!("reply: {e}")))
}

async fn create(ctx: &ControlContext<'_>, req: NewToken) -> Result<TokenCreated, ControlError> {
    let bad = |m: String| Err(ControlError::new(ErrorKind::BadRequest, m));
    if req.target.host.is_empty() || req.target.host.len() > 255 || req.target.port == 0 {
        return bad("host must be 1 to 255 characters and port 1 to 65535".into());
    }
    if req.ttl == Some(0) {
        return bad("ttl must be at least 1 second".into());
    }
    if req.ttl.is_some_and(|t| t > MAX_LIFETIME_SECS) || req.idle_timeout.is_some_and(|t| t > MAX_LIFETIME_SECS) {
        return bad(format!("ttl and idle_timeout must be at most {MAX_LIFETIME_SECS} seconds (ten years)"));
    }
    if let Some(path) = &req.target.internal_access_path
        && (path.is_empty() || path.len() > 2048 || path.bytes().any(|b| b.is_ascii_control() || b == b' '))
    {
        return bad("internal_access_path must be 1 to 2048 visible characters without spaces".into());
    }
    for (field, pw) in [("password", &req.password), ("hypervisor_password", &req.hypervisor_password)] {
        if let Some(pw) = pw
            && let Err(e) = check_password(&pw.0)
        {
            return bad(format!("{field}: {e}"));
        }
    }
    let mut req = req;
    if let Some(pw) = req.password.take() {
        ctx.passwords.set(&req.instance, pw).await.map_err(store_error)?;
        info!(target: AUDIT, event = "console_password_set", instance = %req.instance, via = "token_create");
    }
    let defaults = &ctx.token_defaults;
    let text = token::generate();
    let hash = TokenHash::of(&text);
    let record = TokenRecord::new(&hash, req, unix_now(), defaults.ttl_secs, defaults.idle_timeout_secs);
    let (id, instance, expires) = (record.id.clone(), record.instance.clone(), record.expires);
    ctx.tokens.insert(hash, record).await.map_err(store_error)?;
    info!(target: AUDIT, event = "token_created", token_id = %id, instance = %instance, expires);
    let urls = ctx.doors.urls(&text);
    Ok(TokenCreated { token: text, id, instance, expires, urls })
}

fn found(yes: bool) -> Result<(), ControlError> {
    if yes { Ok(()) } else { Err(ControlError::new(ErrorKind::NotFound, "no such token")) }
}

/// Audits a password change and, when asked, ends the instance's live consoles
/// (QEMU keeps clients connected across a password change; only relay can end them).
async fn password_changed(ctx: &ControlContext<'_>, instance: String, change: &str, disconnect: bool) -> PasswordChanged {
    const CHANGED: &str = "console password changed";
    let (disconnected, fleet) = if disconnect {
        (ctx.sessions.disconnect_instance(&instance, CHANGED), Some(ctx.fleet.reset(&instance, CHANGED).await))
    } else {
        (0, None)
    };
    info!(target: AUDIT, event = "console_password_changed", instance = %instance, change, disconnected, fleet = ?fleet);
    PasswordChanged { instance, password: change.into(), disconnected, fleet }
}

/// The longest a token may live or idle: stores keep times as seconds in Redis scripts,
/// whose numbers are exact only below 2^53.
const MAX_LIFETIME_SECS: u64 = 10 * 365 * 86_400;

/// Why an operator's reset ends a console.
const RESET: &str = "console reset by operator";

/// Whether a reset reached the fleet, for people.
pub fn describe(delivery: &Delivery) -> String {
    match delivery {
        Delivery::Alone => "this appliance only (no fleet)".into(),
        Delivery::Told { epoch } => format!("every appliance told (epoch {epoch})"),
        Delivery::Pending { reason } => format!("NOT yet told to the fleet ({reason}); delivered when the store is back"),
    }
}

fn store_error(e: StoreError) -> ControlError {
    match e {
        StoreError::Full(_) => ControlError::new(ErrorKind::Full, e.to_string()),
        StoreError::Unavailable(_) => unavailable(e),
    }
}

fn unavailable(e: StoreError) -> ControlError {
    ControlError::new(ErrorKind::Unavailable, e.to_string())
}
