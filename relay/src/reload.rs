//! SIGHUP: the configuration read again and applied to the running relay without ending a
//! console. What lives in the running objects (listeners bound, stores and back-ends
//! open) needs a restart: the reload keeps the running value, and says so.

use crate::app::App;
use crate::config::Config;
use crate::telemetry::{self, FilterChange};
use crate::tls;
use anyhow::Context as _;
use serde_json::Value;

/// Reads the configuration again (the file, with the command line's overrides).
pub type Loader = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// What can change only with a restart: whole sections, or single fields.
const FIXED: &[(&str, Option<&str>)] = &[
    ("listen", None),
    ("store", None),
    ("relay", None),
    ("websockify", None),
    ("jwt", None),
    ("nova", None),
    ("metrics", None),
    ("tokens", Some("sources")),
    ("tokens", Some("max_tokens")),
    ("tokens", Some("sweep_interval_secs")),
    ("tokens", Some("touch_interval_secs")),
    ("limits", Some("max_connections")),
    ("passwords", Some("max_failures")),
    ("passwords", Some("lockout_secs")),
    ("passwords", Some("max_tracked")),
    ("passwords", Some("max_instances")),
    ("log", Some("format")),
];

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Sections whose new values are in force.
    pub applied: Vec<String>,
    /// Settings that changed in the file but keep their running value until a restart.
    pub need_restart: Vec<String>,
    /// Changes that were read but do not apply, and why.
    pub notes: Vec<String>,
}

/// The configuration to run after a reload: `new`, except what only a restart changes,
/// which keeps its value from `running`. `loaded` is the configuration as last read, to
/// tell what the file changed (`running` holds the bound ports where the file said 0).
pub fn merge(running: &Config, loaded: &Config, new: &Config) -> anyhow::Result<(Config, Outcome)> {
    let (running, loaded, mut merged) = (json(running)?, json(loaded)?, json(new)?);
    let mut outcome = Outcome::default();
    for &(section, field) in FIXED {
        let at = |v: &Value| -> Value {
            let s = &v[section];
            field.map_or(s, |f| &s[f]).clone()
        };
        if at(&loaded) != at(&merged) {
            outcome.need_restart.push(field.map_or(section.to_string(), |f| format!("{section}.{f}")));
        }
        let keep = at(&running);
        match field {
            None => merged[section] = keep,
            Some(f) => merged[section][f] = keep,
        }
    }
    // TLS on the front doors is on or off for good: the doors were set up for it.
    if loaded["tls"]["cert"].is_null() != merged["tls"]["cert"].is_null() {
        outcome.need_restart.push("tls (turning it on or off)".into());
        merged["tls"] = running["tls"].clone();
    }
    if let (Value::Object(now), Value::Object(next)) = (&running, &merged) {
        outcome.applied = next.iter().filter(|(k, v)| now.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
    }
    let merged: Config = serde_json::from_value(merged).context("the merged configuration")?;
    merged.validate()?;
    Ok((merged, outcome))
}

fn json(config: &Config) -> anyhow::Result<Value> {
    serde_json::to_value(config).context("configuration as JSON")
}

/// Applies `new` to the running relay: everything is prepared first (certificates read,
/// the log filter parsed), so that a failure changes nothing.
pub fn apply(app: &App, loaded: &Config, new: &Config) -> anyhow::Result<Outcome> {
    new.validate()?;
    let running = app.config();
    let (merged, mut outcome) = merge(&running, loaded, new)?;
    let hypervisor_tls = match &merged.hypervisor.vencrypt_ca_certs {
        Some(ca) => Some(tls::hypervisor_connector(ca, &merged.hypervisor).context("hypervisor TLS")?),
        None => None,
    };
    // Certificate files are read again on every SIGHUP (that is how they are rotated).
    if let Some(front) = &app.front_tls {
        front.reload(&merged.tls).context("front TLS")?;
    }
    match telemetry::set_filter(&merged.log.filter) {
        Ok(FilterChange::Applied) => {}
        Ok(FilterChange::NotOurs) if merged.log.filter != running.log.filter => {
            outcome.notes.push("log.filter: RUST_LOG is set and decides the filter".into());
        }
        Ok(FilterChange::NotOurs) => {}
        Err(e) => anyhow::bail!(e),
    }
    app.set_hypervisor_tls(hypervisor_tls);
    let limits = &merged.limits;
    app.sessions.set_caps(limits.max_sessions, limits.max_sessions_per_instance);
    app.sources.set_limit(limits.max_connections_per_source);
    app.set_config(merged);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_and_listeners_wait_for_a_restart() {
        let mut running = Config::default();
        running.listen.websocket = "127.0.0.1:40000".parse::<std::net::SocketAddr>().unwrap().into();
        let loaded = Config::default();
        let mut new = Config::default();
        new.limits.max_sessions_per_instance = 1;
        new.limits.max_connections = 5;
        new.websocket.allowed_origins = vec!["https://dash.example.com".into()];
        new.listen.connect = "127.0.0.1:7000".parse::<std::net::SocketAddr>().unwrap().into();
        new.log.filter = "debug".into();
        let (merged, outcome) = merge(&running, &loaded, &new).unwrap();
        assert_eq!(merged.limits.max_sessions_per_instance, 1);
        assert_eq!(merged.websocket.allowed_origins, ["https://dash.example.com"]);
        assert_eq!(merged.log.filter, "debug");
        assert_eq!(merged.limits.max_connections, running.limits.max_connections, "kept");
        assert_eq!(
            toml::to_string(&merged.listen).unwrap(),
            toml::to_string(&running.listen).unwrap(),
            "the bound listeners stay, ports included"
        );
        assert_eq!(outcome.need_restart, ["listen", "limits.max_connections"]);
        assert_eq!(outcome.applied, ["limits", "log", "websocket"]);
    }

    #[test]
    fn a_full_configuration_survives_the_merge_unchanged() {
        let text = r#"
            [listen]
            websocket = ["0.0.0.0:6080", "[::]:6080"]
            proxy_protocol_from = ["10.0.0.0/24", "2001:db8::10"]
            [tokens]
            sources = ["store", "jwt", "nova"]
            end_consoles_at_expiry = true
            [websocket]
            allowed_origins = ["https://dash.example.com"]
            [hypervisor]
            auth_schemes = ["vnc", "none"]
            vnc_password = "secret"
            tls_min_version = "1.3"
            [tls]
            min_version = "1.3"
            cipher_suites = ["TLS13_AES_256_GCM_SHA384"]
            [jwt]
            keys = [{ file = "/etc/relay/jwt.pem", algorithm = "RS256", kid = "k1" }]
            [nova]
            database_urls = ["mysql+pymysql://nova:pw@db/nova"]
            [metrics]
            listen = "127.0.0.1:9180"
            [log]
            format = "json"
        "#;
        let config: Config = toml::from_str(text).unwrap();
        let (merged, outcome) = merge(&config, &config, &config).unwrap();
        assert_eq!(toml::to_string(&merged).unwrap(), toml::to_string(&config).unwrap());
        assert_eq!(outcome, Outcome::default());
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let config = Config::default();
        let (merged, outcome) = merge(&config, &config, &config).unwrap();
        assert_eq!(toml::to_string(&merged).unwrap(), toml::to_string(&config).unwrap(), "the JSON round trip is exact");
        assert_eq!(outcome, Outcome::default());
    }
}
