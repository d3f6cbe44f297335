//! Carries out control requests against the token store and the session registry.

use super::proto::{ControlError, Envelope, ErrorKind, Request, VERSION};
use crate::app::{App, unix_now};
use crate::auth::store::Filter;
use crate::auth::{NewToken, StoreError, TokenHash, TokenRecord, token};
use crate::rfb::vnc_auth::check_password;
use crate::telemetry::AUDIT;
use serde_json::{Value, json};
use tracing::info;

pub async fn handle(app: &App, envelope: Envelope) -> Result<Value, ControlError> {
    if envelope.v != VERSION {
        return Err(ControlError::new(
            ErrorKind::UnsupportedVersion,
            format!("protocol version {} is not spoken; use {VERSION}", envelope.v),
        ));
    }
    let now = unix_now();
    let store = &app.tokens;
    match envelope.request {
        Request::TokenCreate(req) => create(app, req).await,
        Request::TokenCheck { token } => match store.check(TokenHash::of(&token), now).await.map_err(unavailable)? {
            Ok(record) => Ok(json!({ "valid": true, "token": record })),
            Err(rejection) => Ok(json!({ "valid": false, "reason": rejection, "message": rejection.to_string() })),
        },
        Request::TokenTouch { token } => {
            found(store.touch(TokenHash::of(&token), now).await.map_err(unavailable)?, json!({ "touched": true }))
        }
        Request::TokenDelete { token } => {
            let hash = TokenHash::of(&token);
            let deleted = store.delete(hash).await.map_err(unavailable)?;
            if deleted {
                info!(target: AUDIT, event = "token_deleted", token_id = %hash.id());
            }
            found(deleted, json!({ "deleted": true }))
        }
        Request::TokenList { instance, host } => {
            let filter = match (instance, host) {
                (Some(i), None) => Filter::Instance(i),
                (None, Some(h)) => Filter::Host(h),
                (None, None) => Filter::All,
                (Some(_), Some(_)) => return Err(ControlError::new(ErrorKind::BadRequest, "list by instance or by host, not both")),
            };
            let tokens = store.list(filter, now).await.map_err(unavailable)?;
            Ok(json!({ "tokens": tokens }))
        }
        Request::Sessions { instance } => {
            Ok(json!({ "sessions": app.sessions.list(instance.as_deref(), |cookie| app.relays.kernel_bytes(cookie)) }))
        }
        Request::Stats => Ok(json!({
            "counters": app.counters.view(),
            "sessions_active": app.sessions.len(),
            "tokens": store.count().await.map_err(unavailable)?,
            "relay": app.relays.view(),
        })),
        Request::InstancePasswordSet { instance, password, disconnect } => {
            if let Err(e) = check_password(&password.0) {
                return Err(ControlError::new(ErrorKind::BadRequest, format!("password: {e}")));
            }
            app.passwords.set(&instance, password).await.map_err(store_error)?;
            Ok(password_changed(app, &instance, "set", disconnect))
        }
        Request::InstancePasswordClear { instance, disconnect } => {
            let had = app.passwords.clear(&instance).await.map_err(unavailable)?;
            if !had {
                return Err(ControlError::new(ErrorKind::NotFound, "the instance has no console password"));
            }
            Ok(password_changed(app, &instance, "cleared", disconnect))
        }
        Request::InstanceReset { instance, revoke } => {
            let revoked = if revoke { store.delete_instance(&instance).await.map_err(unavailable)? } else { 0 };
            let disconnected = app.sessions.disconnect_instance(&instance, "console reset by operator");
            info!(target: AUDIT, event = "instance_reset", instance = %instance, disconnected, revoked);
            Ok(json!({ "instance": instance, "disconnected": disconnected, "revoked": revoked }))
        }
    }
}

async fn create(app: &App, req: NewToken) -> Result<Value, ControlError> {
    let bad = |m: String| Err(ControlError::new(ErrorKind::BadRequest, m));
    if req.instance.is_empty() || req.instance.len() > 255 {
        return bad("instance must be 1 to 255 characters".into());
    }
    if req.target.host.is_empty() || req.target.host.len() > 255 || req.target.port == 0 {
        return bad("host must be 1 to 255 characters and port 1 to 65535".into());
    }
    if req.ttl == Some(0) {
        return bad("ttl must be at least 1 second".into());
    }
    if let Some(path) = &req.target.internal_access_path
        && (path.is_empty() || path.len() > 2048 || path.bytes().any(|b| b.is_ascii_control() || b == b' '))
    {
        return bad("internal_access_path must be 1 to 2048 visible characters without spaces".into());
    }
    if let Some(pw) = &req.password
        && let Err(e) = check_password(&pw.0)
    {
        return bad(format!("password: {e}"));
    }
    if let Some(pw) = &req.hypervisor_password
        && let Err(e) = check_password(&pw.0)
    {
        return bad(format!("hypervisor_password: {e}"));
    }
    let mut req = req;
    if let Some(pw) = req.password.take() {
        app.passwords.set(&req.instance, pw).await.map_err(store_error)?;
        info!(target: AUDIT, event = "console_password_set", instance = %req.instance, via = "token_create");
    }
    let cfg = &app.config.tokens;
    let text = token::generate();
    let hash = TokenHash::of(&text);
    let record = TokenRecord::new(&hash, req, unix_now(), cfg.ttl_secs, cfg.idle_timeout_secs);
    let (id, instance, expires) = (record.id.clone(), record.instance.clone(), record.expires);
    app.tokens.insert(hash, record).await.map_err(store_error)?;
    info!(target: AUDIT, event = "token_created", token_id = %id, instance = %instance, expires);
    Ok(json!({
        "token": text,
        "id": id,
        "instance": instance,
        "expires": expires,
        "urls": access_urls(app, &text),
    }))
}

/// Console URLs for each front door, as nova's consoles API hands them out.
fn access_urls(app: &App, token: &str) -> Value {
    let listen = &app.config.listen;
    let public = &app.config.public;
    let base = |addr: Option<std::net::SocketAddr>, path: &str| {
        addr.map(|a| {
            let host = if a.ip().is_unspecified() { "localhost".to_string() } else { a.ip().to_string() };
            let host = if a.is_ipv6() && host != "localhost" { format!("[{host}]") } else { host };
            let scheme = if app.front_tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{host}:{}{path}", a.port())
        })
    };
    let novnc = public.novnc_base_url.clone().or_else(|| base(listen.websocket, "/vnc_lite.html"));
    let connect = public.connect_base_url.clone().or_else(|| base(listen.connect, "/console"));
    json!({
        "novnc": novnc.map(|b| format!("{b}?path=%3Ftoken%3D{token}")),
        "websocket": listen.websocket.map(|_| format!("/?token={token}")),
        "connect": connect.map(|b| format!("{b}?token={token}")),
    })
}

fn found(yes: bool, v: Value) -> Result<Value, ControlError> {
    if yes { Ok(v) } else { Err(ControlError::new(ErrorKind::NotFound, "no such token")) }
}

/// Audits a password change and, when asked, ends the instance's live consoles
/// (QEMU keeps clients connected across a password change; only relay can end them).
fn password_changed(app: &App, instance: &str, change: &str, disconnect: bool) -> Value {
    let disconnected = if disconnect { app.sessions.disconnect_instance(instance, "console password changed") } else { 0 };
    info!(target: AUDIT, event = "console_password_changed", instance = %instance, change, disconnected);
    json!({ "instance": instance, "password": change, "disconnected": disconnected })
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
