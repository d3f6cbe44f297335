//! Configuration: TOML, every field optional, defaults embedded. The documented sample
//! is `relay.example.toml` at the top of the repository; a test keeps the two in step.

mod consoles;
mod doors;
mod store;
mod tokens;

pub use consoles::*;
pub use doors::*;
pub use store::*;
pub use tokens::*;

use crate::auth::Scheme;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub public: Public,
    pub tokens: Tokens,
    pub websocket: WebSocket,
    pub hypervisor: Hypervisor,
    pub limits: Limits,
    pub passwords: Passwords,
    pub tls: Tls,
    pub relay: Relay,
    pub store: Store,
    pub websockify: Websockify,
    pub jwt: Jwt,
    pub nova: Nova,
    pub keepalive: Keepalive,
    pub metrics: Metrics,
    pub log: Log,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `relay=debug`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, filter: "info".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e))?;
        if let Some(nova_conf) = config.nova.config_file.clone() {
            crate::auth::sources::nova::conf::apply(&mut config, &nova_conf)
                .map_err(|e| ConfigError::Invalid(format!("nova.config_file: {e:#}")))?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.listen.websocket.is_empty() && self.listen.connect.is_empty() {
            return bad("listen: at least one of websocket and connect is needed");
        }
        if self.hypervisor.auth_schemes.is_empty() {
            return bad("hypervisor.auth_schemes is empty: relay could not authenticate to any hypervisor");
        }
        if let Some(pw) = &self.hypervisor.vnc_password {
            crate::auth::passwords::check_password(pw).map_err(|e| ConfigError::Invalid(format!("hypervisor.vnc_password: {e}")))?;
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls: cert and key go together");
        }
        if self.tls.ssl_only && self.tls.cert.is_none() {
            return bad("tls.ssl_only needs tls.cert and tls.key");
        }
        if self.hypervisor.auth_schemes.contains(&Scheme::Vencrypt) && self.hypervisor.vencrypt_ca_certs.is_none() {
            return bad("hypervisor.auth_schemes has vencrypt: set hypervisor.vencrypt_ca_certs to verify hypervisors");
        }
        if self.tokens.ttl_secs == 0 {
            return bad("tokens.ttl_secs must be at least 1");
        }
        let sources = &self.tokens.sources;
        if sources.is_empty() || sources.iter().enumerate().any(|(i, s)| sources[..i].contains(s)) {
            return bad("tokens.sources must name at least one source, each once");
        }
        if sources.contains(&TokenSourceKind::WebsockifyFile) && self.websockify.token_file.is_none() {
            return bad("tokens.sources has websockify-file: set websockify.token_file");
        }
        if sources.contains(&TokenSourceKind::WebsockifyRedis) && self.websockify.redis_url.is_none() {
            return bad("tokens.sources has websockify-redis: set websockify.redis_url");
        }
        if sources.contains(&TokenSourceKind::Jwt) && self.jwt.keys.is_empty() {
            return bad("tokens.sources has jwt: list the keys tokens are signed with in [jwt] keys");
        }
        if sources.contains(&TokenSourceKind::Nova) && self.nova.database_urls.is_empty() {
            return bad("tokens.sources has nova: set nova.database_urls (one per cell) or nova.config_file");
        }
        if self.nova.timeout_ms == 0 || self.nova.max_connections == 0 {
            return bad("nova: timeout_ms and max_connections must be at least 1");
        }
        if self.limits.relay_buffer_bytes < 1024 || self.limits.max_header_bytes < 512 {
            return bad("limits: relay_buffer_bytes must be at least 1024 and max_header_bytes at least 512");
        }
        if self.relay.in_flight_bytes < 64 << 10 {
            return bad("relay.in_flight_bytes must be at least 65536");
        }
        if self.relay.kernel_after_ms > 3_600_000 {
            return bad("relay.kernel_after_ms must be at most 3600000 (an hour)");
        }
        let store = &self.store;
        if store.backend == StoreBackend::Redis {
            if store.url.is_none() && store.sentinels.is_empty() {
                return bad("store: the redis back-end needs store.url (or store.sentinels and store.master_name)");
            }
            if store.sentinels.is_empty() != store.master_name.is_none() {
                return bad("store: sentinels and master_name go together");
            }
            if !store.sentinels.is_empty() && store.ca_file.is_some() {
                return bad(
                    "store: ca_file is not supported with sentinels yet (the master's certificate would be checked against the system's roots)",
                );
            }
            if store.secret_key_file.is_none() {
                return bad("store: the redis back-end needs store.secret_key_file (the same key on every appliance) to seal passwords");
            }
            if store.key_prefix.is_empty() || store.key_prefix.contains(['{', '}', ' ']) {
                return bad("store.key_prefix must be a non-empty name without braces or spaces");
            }
        }
        if store.timeout_ms == 0 {
            return bad("store.timeout_ms must be at least 1");
        }
        if let Some(web) = &self.listen.web
            && !web.is_dir()
        {
            return Err(ConfigError::Invalid(format!("listen.web: {} is not a directory", web.display())));
        }
        Ok(())
    }

    pub fn control_path(&self) -> PathBuf {
        self.listen.control.clone().unwrap_or_else(default_control_path)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.handshake_timeout_secs)
    }
}

/// `$RELAY_CONTROL`, else `$XDG_RUNTIME_DIR/relay/control.sock`, else
/// `/run/relay/control.sock` for root, else `/tmp/relay-<uid>/control.sock`.
pub fn default_control_path() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_CONTROL") {
        return p.into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("relay/control.sock");
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if uid == 0 { "/run/relay/control.sock".into() } else { format!("/tmp/relay-{uid}/control.sock").into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../../relay.example.toml");
        let sample: Config = toml::from_str(text).expect("relay.example.toml parses");
        let defaults = Config::default();
        // The sample documents the defaults: every value in it is the default value.
        assert_eq!(toml::to_string(&sample).unwrap(), toml::to_string(&defaults).unwrap());
    }

    #[test]
    fn a_door_listens_on_one_address_or_several() {
        let one: Config = toml::from_str("[listen]\nwebsocket = \"127.0.0.1:6080\"\n").unwrap();
        assert_eq!(one.listen.websocket.0, ["127.0.0.1:6080".parse().unwrap()]);
        let two: Config = toml::from_str("[listen]\nwebsocket = [\"0.0.0.0:6080\", \"[::]:6080\"]\nconnect = []\n").unwrap();
        assert_eq!(two.listen.websocket.0.len(), 2);
        assert!(two.listen.connect.is_empty(), "[] turns a door off");
        assert!(toml::from_str::<Config>("[listen]\nwebsocket = \"nowhere\"\n").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[limits]\nmax_conections = 3\n").is_err());
        let mut c = Config::default();
        c.hypervisor.vnc_password = Some("123456789".into());
        assert!(c.validate().is_err());
        c.hypervisor.vnc_password = None;
        c.hypervisor.auth_schemes.clear();
        assert!(c.validate().is_err());
        assert!(toml::from_str::<Config>("[relay]\nbackend = \"fastest\"\n").is_err(), "an unknown back-end is refused");
        let mut c = Config::default();
        c.relay.in_flight_bytes = 1024;
        assert!(c.validate().is_err(), "an in-flight cap too small to relay a segment is refused");
    }
}
