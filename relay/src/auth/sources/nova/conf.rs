//! Reads a nova.conf (oslo.config's INI) for what relay shares with nova-novncproxy, so
//! that pointing `[nova] config_file` at it is the whole migration. A setting relay's own
//! file gives (differs from relay's default) wins; each one taken is logged.
//!
//! | nova.conf                                   | relay                               |
//! |---------------------------------------------|-------------------------------------|
//! | `[database] connection`                     | `[nova] database_urls`              |
//! | `[vnc] auth_schemes`                        | `[hypervisor] auth_schemes`         |
//! | `[vnc] vencrypt_ca_certs`, `_client_cert`, `_client_key` | `[hypervisor]` the same names |
//! | `[vnc] novncproxy_base_url`                 | `[public] novnc_base_url`           |
//! | `[console] allowed_origins`                 | `[websocket] allowed_origins`       |
//! | `[consoleauth] enforce_session_timeout`     | `[nova] enforce_session_timeout`    |
//! | `[DEFAULT] cert`, `key`, `ssl_only`         | `[tls] cert`, `key`, `ssl_only`     |

use crate::auth::Scheme;
use crate::config::Config;
use anyhow::{Context as _, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A nova.conf's settings: (section, key) → the last value given.
pub struct Ini(HashMap<(String, String), String>);

impl Ini {
    /// oslo.config's format: `[section]`, `key = value`, whole-line `#` and `;` comments,
    /// indented lines continuing a value; a key given twice keeps the later value.
    pub fn parse(text: &str) -> anyhow::Result<Ini> {
        let mut values = HashMap::new();
        let mut section = String::from("DEFAULT");
        let mut last: Option<(String, String)> = None;
        for (n, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                let key = last.clone().with_context(|| format!("line {}: a continuation with nothing to continue", n + 1))?;
                let value: &mut String = values.entry(key).or_default();
                value.push('\n');
                value.push_str(trimmed);
            } else if let Some(name) = trimmed.strip_prefix('[') {
                section = name.strip_suffix(']').with_context(|| format!("line {}: an unclosed section", n + 1))?.trim().to_string();
                last = None;
            } else {
                let (key, value) = trimmed.split_once('=').with_context(|| format!("line {}: neither a section nor key = value", n + 1))?;
                let key = (section.clone(), key.trim().to_string());
                values.insert(key.clone(), unquote(value.trim()).to_string());
                last = Some(key);
            }
        }
        Ok(Ini(values))
    }

    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.0.get(&(section.to_string(), key.to_string())).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// An oslo ListOpt: comma-separated.
    fn list(&self, section: &str, key: &str) -> Option<Vec<String>> {
        self.get(section, key).map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
    }

    fn bool(&self, section: &str, key: &str) -> anyhow::Result<Option<bool>> {
        self.get(section, key)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => bail!("[{section}] {key} = {v}: not a boolean"),
            })
            .transpose()
    }
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Fills `config` from the nova.conf at `path`.
pub fn apply(config: &mut Config, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let ini = Ini::parse(&text).with_context(|| format!("{}", path.display()))?;
    apply_ini(config, &ini).with_context(|| format!("{}", path.display()))
}

pub fn apply_ini(config: &mut Config, ini: &Ini) -> anyhow::Result<()> {
    let defaults = Config::default();
    let took = |what: &str| tracing::info!(setting = what, "taken from nova.conf");
    if config.nova.database_urls.is_empty()
        && let Some(url) = ini.get("database", "connection")
    {
        config.nova.database_urls = vec![url.to_string()];
        took("[database] connection");
    }
    if config.hypervisor.auth_schemes == defaults.hypervisor.auth_schemes
        && let Some(schemes) = ini.list("vnc", "auth_schemes")
    {
        config.hypervisor.auth_schemes = schemes
            .iter()
            .map(|s| match s.as_str() {
                "none" => Ok(Scheme::None),
                "vencrypt" => Ok(Scheme::Vencrypt),
                other => bail!("[vnc] auth_schemes: unknown scheme {other:?}"),
            })
            .collect::<anyhow::Result<_>>()?;
        took("[vnc] auth_schemes");
    }
    let hv = &mut config.hypervisor;
    for (key, field) in [
        ("vencrypt_ca_certs", &mut hv.vencrypt_ca_certs),
        ("vencrypt_client_cert", &mut hv.vencrypt_client_cert),
        ("vencrypt_client_key", &mut hv.vencrypt_client_key),
    ] {
        fill_path(field, ini.get("vnc", key), &format!("[vnc] {key}"));
    }
    if config.public.novnc_base_url.is_none()
        && let Some(url) = ini.get("vnc", "novncproxy_base_url")
    {
        config.public.novnc_base_url = Some(url.to_string());
        took("[vnc] novncproxy_base_url");
    }
    if config.websocket.allowed_origins.is_empty()
        && let Some(origins) = ini.list("console", "allowed_origins")
    {
        config.websocket.allowed_origins = origins;
        took("[console] allowed_origins");
    }
    if config.nova.enforce_session_timeout == defaults.nova.enforce_session_timeout
        && let Some(enforce) = ini.bool("consoleauth", "enforce_session_timeout")?
    {
        config.nova.enforce_session_timeout = enforce;
        took("[consoleauth] enforce_session_timeout");
    }
    if config.tls.cert.is_none() && config.tls.key.is_none() {
        fill_path(&mut config.tls.cert, ini.get("DEFAULT", "cert"), "[DEFAULT] cert");
        fill_path(&mut config.tls.key, ini.get("DEFAULT", "key"), "[DEFAULT] key");
    }
    if !config.tls.ssl_only
        && let Some(only) = ini.bool("DEFAULT", "ssl_only")?
    {
        config.tls.ssl_only = only;
        took("[DEFAULT] ssl_only");
    }
    Ok(())
}

fn fill_path(field: &mut Option<PathBuf>, value: Option<&str>, what: &str) {
    if field.is_none()
        && let Some(v) = value
    {
        *field = Some(v.into());
        tracing::info!(setting = what, "taken from nova.conf");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOVA_CONF: &str = "\
[DEFAULT]
# nova-novncproxy's TLS
ssl_only = True
cert = /etc/nova/ssl/console.pem
key = /etc/nova/ssl/console.key

[database]
connection = mysql+pymysql://nova:secret@10.0.0.2/nova?charset=utf8

[vnc]
enabled = true
auth_schemes = vencrypt,none
vencrypt_ca_certs = /etc/pki/nova-novncproxy/ca-cert.pem
vencrypt_client_cert = /etc/pki/nova-novncproxy/client-cert.pem
vencrypt_client_key = /etc/pki/nova-novncproxy/client-key.pem
novncproxy_base_url = https://console.example.com:6080/vnc_lite.html

[console]
allowed_origins = dashboard.example.com,
  horizon.example.com

[consoleauth]
enforce_session_timeout = true
";

    #[test]
    fn a_nova_conf_fills_what_relay_leaves_unset() {
        let mut config = Config::default();
        config.websocket.allowed_origins = vec!["mine.example.com".into()];
        apply_ini(&mut config, &Ini::parse(NOVA_CONF).unwrap()).unwrap();
        assert_eq!(config.nova.database_urls, ["mysql+pymysql://nova:secret@10.0.0.2/nova?charset=utf8"]);
        assert_eq!(config.hypervisor.auth_schemes, [Scheme::Vencrypt, Scheme::None]);
        assert_eq!(config.hypervisor.vencrypt_client_key.unwrap(), Path::new("/etc/pki/nova-novncproxy/client-key.pem"));
        assert_eq!(config.public.novnc_base_url.as_deref(), Some("https://console.example.com:6080/vnc_lite.html"));
        assert_eq!(config.websocket.allowed_origins, ["mine.example.com"], "relay's own setting wins");
        assert!(config.nova.enforce_session_timeout && config.tls.ssl_only);
        assert_eq!(config.tls.cert.unwrap(), Path::new("/etc/nova/ssl/console.pem"));
    }

    #[test]
    fn continuations_comments_and_bad_files() {
        let ini = Ini::parse(NOVA_CONF).unwrap();
        assert_eq!(ini.list("console", "allowed_origins").unwrap(), ["dashboard.example.com", "horizon.example.com"]);
        assert_eq!(ini.get("vnc", "enabled"), Some("true"));
        assert!(Ini::parse("[vnc\nx = 1\n").is_err());
        assert!(Ini::parse("  orphan\n").is_err());
        assert!(Ini::parse("[vnc]\njust words\n").is_err());
        let mut config = Config::default();
        assert!(apply_ini(&mut config, &Ini::parse("[vnc]\nauth_schemes = sasl\n").unwrap()).is_err(), "a scheme relay lacks is refused");
    }
}
