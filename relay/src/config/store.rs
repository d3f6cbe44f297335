//! Where tokens, passwords and lock-outs are kept.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where tokens, console passwords, lock-outs and resets are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A file on this appliance: survives restarts; one appliance alone.
    #[default]
    Local,
    /// This process's memory: lost on restart (tests, throw-away runs).
    Memory,
    /// A Redis (or Valkey) server shared by a fleet of appliances.
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    pub backend: StoreBackend,
    /// local: the store file; when absent, see [`default_state_dir`] (`relay.db` in it).
    pub path: Option<PathBuf>,
    /// The key that seals console and hypervisor passwords at rest (32 or more random
    /// bytes, mode 0600). local: created beside the store file when absent. redis:
    /// required, the same file on every appliance.
    pub secret_key_file: Option<PathBuf>,
    /// redis: `redis://host:port/db` or `rediss://…` (TLS).
    pub url: Option<String>,
    /// redis: ACL user name.
    pub username: Option<String>,
    /// redis: a file holding the ACL password (never the password itself in this file).
    pub password_file: Option<PathBuf>,
    /// rediss: CA bundle the server's certificate must chain to; the system's roots when
    /// absent.
    pub ca_file: Option<PathBuf>,
    /// redis: Sentinel addresses (`host:port`); with `master_name`, relay asks them for the
    /// current master instead of using `url`'s host.
    pub sentinels: Vec<String>,
    pub master_name: Option<String>,
    /// redis: the prefix of every key and channel, so that fleets can share a server.
    pub key_prefix: String,
    /// redis: milliseconds a command may take before the store counts as unavailable.
    pub timeout_ms: u64,
    /// redis: replicas that must have a new token or password before it is acknowledged
    /// (Redis `WAIT`), so that a Sentinel failover cannot lose it; 0 = do not wait.
    pub wait_replicas: u32,
    /// This appliance's name in the fleet (`relay ctl cluster`); the host name when absent.
    pub appliance_name: Option<String>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            backend: StoreBackend::Local,
            path: None,
            secret_key_file: None,
            url: None,
            username: None,
            password_file: None,
            ca_file: None,
            sentinels: Vec::new(),
            master_name: None,
            key_prefix: "relay".into(),
            timeout_ms: 1000,
            wait_replicas: 0,
            appliance_name: None,
        }
    }
}

impl Store {
    /// The local store's file.
    pub fn file(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| default_state_dir().join("relay.db"))
    }

    /// This appliance's name: the configured one, else the host name.
    pub fn appliance(&self) -> String {
        self.appliance_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "relay".into())
        })
    }
}

/// `$RELAY_STATE_DIR`, else `/var/lib/relay` for root, else `$XDG_STATE_HOME/relay`, else
/// `~/.local/state/relay`.
pub fn default_state_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_STATE_DIR") {
        return p.into();
    }
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return "/var/lib/relay".into();
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Path::new(&dir).join("relay");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".local/state/relay")
}
