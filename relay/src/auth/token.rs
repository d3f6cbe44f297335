//! The token itself and its record. Only the SHA-256 of a token is ever kept; the
//! token text exists in the reply to whoever created it and in the console URL.

use crate::auth::Scheme;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Random bytes in a token (256 bits), shown as 43 URL-safe base64 characters.
pub const TOKEN_BYTES: usize = 32;

/// The SHA-256 of a token: the store's key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// All 64 hex digits, as stores name the token.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A short, non-secret name for the token, safe for logs and listings.
    pub fn id(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", self.id())
    }
}

/// The console kind of a revocation note.
const REVOKED: &str = "revoked";

/// Where an instance's revocation note is kept: a hash no token hashes to (a SHA-256
/// with its first byte flipped has no known preimage), so no viewer can redeem the note.
pub fn revocation_key(instance: &str) -> TokenHash {
    let mut key = TokenHash::of(&format!("revoked:{instance}"));
    key.0[0] ^= 0xff;
    key
}

/// Makes a fresh token from the operating system's CSPRNG (via rand's thread RNG,
/// which reseeds from it).
pub fn generate() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The longest instance id relay accepts.
pub const MAX_INSTANCE_LEN: usize = 255;

/// Why a string cannot name an instance. Instance ids are 1 to 255 letters, digits and
/// `- _ . : @` (nova's UUIDs, libvirt domain names, Proxmox ids fit): they reach logs,
/// listings and keys, so nothing in them may look like markup or a line break.
pub fn check_instance(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_INSTANCE_LEN {
        return Err(format!("instance must be 1 to {MAX_INSTANCE_LEN} characters"));
    }
    match id.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:@".contains(*c))) {
        Some(c) => Err(format!("instance may hold letters, digits and - _ . : @ only, not {c:?}")),
        None => Ok(()),
    }
}

/// A password or key that must never reach a log: `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a token leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Sent as `CONNECT <path> HTTP/1.1` to the hypervisor before RFB (XenServer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_access_path: Option<String>,
}

/// What a caller asks for when creating a token.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NewToken {
    pub instance: String,
    #[serde(default = "default_console")]
    pub console: String,
    #[serde(flatten)]
    pub target: Target,
    /// Seconds until the token expires; the configured default when absent.
    #[serde(default)]
    pub ttl: Option<u64>,
    /// Seconds a token may go unused (no connection, no live session) before it lapses.
    #[serde(default)]
    pub idle_timeout: Option<u64>,
    #[serde(default)]
    pub single_use: bool,
    /// Overrides the configured hypervisor-side schemes for this console.
    #[serde(default)]
    pub hypervisor_schemes: Option<Vec<Scheme>>,
    /// The hypervisor's VNC password for this console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_password: Option<Secret>,
    /// Sets the instance's console password (viewers must give it) with the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
}

/// A console kind that opens at either door (nova's kinds each name one door).
fn default_console() -> String {
    "vnc".into()
}

/// A stored token. Times are Unix seconds.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub instance: String,
    pub console: String,
    #[serde(flatten)]
    pub target: Target,
    pub created: u64,
    pub expires: u64,
    pub last_touched: u64,
    pub idle_timeout: u64,
    pub single_use: bool,
    pub used: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_schemes: Option<Vec<Scheme>>,
    /// Kept for the hypervisor handshake; never serialized to clients or logs.
    #[serde(skip)]
    pub hypervisor_password: Option<Secret>,
    /// Set by a redeem where the store has a clock the fleet shares (Redis: its `TIME`,
    /// in µs): the reset epoch the console starts under. A reset raises the instance's
    /// epoch to at least its own time, so it ends exactly the consoles redeemed before it.
    #[serde(skip)]
    pub redeemed_epoch: u64,
    /// The token source that honoured it (`[tokens] sources`); set by the look-up.
    #[serde(skip)]
    pub source: &'static str,
    /// Set by a source whose authority gives the token no expiry (websockify's; a JWT
    /// without `exp`): `expires` is then only how long relay keeps it.
    #[serde(skip)]
    pub no_expiry: bool,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("instance", &self.instance)
            .field("target", &self.target)
            .field("expires", &self.expires)
            .field("single_use", &self.single_use)
            .finish_non_exhaustive()
    }
}

impl TokenRecord {
    pub fn new(hash: &TokenHash, req: NewToken, now: u64, ttl: u64, idle_timeout: u64) -> TokenRecord {
        TokenRecord {
            id: hash.id(),
            instance: req.instance,
            console: req.console,
            target: req.target,
            created: now,
            expires: now.saturating_add(req.ttl.unwrap_or(ttl)),
            last_touched: now,
            idle_timeout: req.idle_timeout.unwrap_or(idle_timeout),
            single_use: req.single_use,
            used: false,
            hypervisor_schemes: req.hypervisor_schemes,
            hypervisor_password: req.hypervisor_password,
            redeemed_epoch: 0,
            source: "",
            no_expiry: false,
        }
    }

    /// When the token really expires (Unix seconds), for ending its consoles then; 0 for
    /// a token without one.
    pub fn real_expiry(&self) -> u64 {
        if self.no_expiry { 0 } else { self.expires }
    }

    /// Whether the token may still open a console at `now`, and if not, why.
    pub fn usable(&self, now: u64) -> Result<(), super::TokenRejection> {
        use super::TokenRejection::*;
        if now >= self.expires {
            Err(Expired)
        } else if self.idle_timeout > 0 && now >= self.last_touched.saturating_add(self.idle_timeout) {
            Err(Idle)
        } else if self.single_use && self.used {
            Err(AlreadyUsed)
        } else {
            Ok(())
        }
    }

    /// A used single-use record that only says `hash` was taken, until `expires`.
    pub fn taken(hash: &TokenHash, now: u64, expires: u64) -> TokenRecord {
        TokenRecord {
            id: hash.id(),
            instance: "taken".into(),
            console: "taken".into(),
            target: Target { host: "-".into(), port: 0, internal_access_path: None },
            created: now,
            expires,
            last_touched: now,
            idle_timeout: 0,
            single_use: true,
            used: true,
            hypervisor_schemes: None,
            hypervisor_password: None,
            redeemed_epoch: 0,
            source: "",
            no_expiry: false,
        }
    }

    /// The note that `instance` was reset at `at`: its signed tokens issued before then are
    /// refused until `until`. Kept in the token store (under [`revocation_key`]) so that it
    /// is as durable and as shared as the tokens.
    pub fn revocation(instance: &str, at: u64, until: u64) -> TokenRecord {
        TokenRecord {
            id: revocation_key(instance).id(),
            instance: instance.to_string(),
            console: REVOKED.into(),
            target: Target { host: "-".into(), port: 0, internal_access_path: None },
            created: at,
            expires: until,
            last_touched: at,
            idle_timeout: 0,
            single_use: false,
            used: false,
            hypervisor_schemes: None,
            hypervisor_password: None,
            redeemed_epoch: 0,
            source: "",
            no_expiry: false,
        }
    }

    /// Whether this is a store's own note (a taken `jti`, a revocation), not a token.
    pub fn is_note(&self) -> bool {
        self.console == REVOKED || self.console == "taken"
    }

    /// What a sealed hypervisor password of this token is bound to.
    fn seal_context(&self) -> String {
        format!("token:{}", self.id)
    }

    /// Whether the store may forget it: expired or lapsed. A used single-use token is
    /// kept until then, so that a second attempt hears "already used", not "unknown".
    pub fn dead(&self, now: u64) -> bool {
        matches!(self.usable(now), Err(super::TokenRejection::Expired | super::TokenRejection::Idle))
    }
}

/// A record as a shared or persistent store keeps it: with the hypervisor's password
/// sealed (see [`super::seal`]), since the record alone never serializes it.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredToken {
    #[serde(flatten)]
    pub record: TokenRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_password: Option<String>,
}

impl StoredToken {
    pub fn seal(record: &TokenRecord, sealer: &super::seal::Sealer) -> StoredToken {
        let sealed = record.hypervisor_password.as_ref().map(|p| sealer.seal(&record.seal_context(), p));
        StoredToken { record: record.clone(), hypervisor_password: sealed }
    }

    pub fn open(self, sealer: &super::seal::Sealer) -> Result<TokenRecord, super::seal::SealError> {
        let mut record = self.record;
        if let Some(sealed) = &self.hypervisor_password {
            record.hypervisor_password = Some(sealer.open(&record.seal_context(), sealed)?);
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(TokenHash::of(&a), TokenHash::of(&a));
        assert_ne!(TokenHash::of(&a), TokenHash::of(&b));
        assert_eq!(TokenHash::of(&a).id().len(), 12);
    }

    #[test]
    fn instance_ids_are_plain_names() {
        for good in ["0d4b3d2c-3a0e-4b6e-9a43-1f0c9b8e7a61", "instance-0000001a", "vm-1", "101", "a.b:c@d_e"] {
            assert!(check_instance(good).is_ok(), "{good}");
        }
        for bad in ["", "evil\nline", "a b", "x\u{1b}[31m", "<script>", &"a".repeat(256)] {
            assert!(check_instance(bad).is_err(), "{bad:?}");
        }
    }
}
