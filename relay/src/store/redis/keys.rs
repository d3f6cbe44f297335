//! The names of relay's keys in Redis. Every key of one instance carries the instance as
//! its hash tag (`P:{INSTANCE}:…`) and each script touches one key, a step towards Redis
//! Cluster; relay's client is not a Cluster client, and a token's creation (one MULTI over
//! its key and three indexes) would have to be split first.

/// `P:{INSTANCE}:WHAT`.
pub fn of_instance(prefix: &str, instance: &str, what: &str) -> String {
    format!("{prefix}:{{{instance}}}:{what}")
}

/// A token's hash: `P:tok:{HEX}` (its own slot).
pub fn token(prefix: &str, hex: &str) -> String {
    format!("{prefix}:tok:{{{hex}}}")
}

pub const PASSWORD: &str = "password";
pub const EPOCH: &str = "epoch";
pub const FAILURES: &str = "failures";
pub const TOKENS: &str = "tokens";
