//! The names of relay's keys in Redis. Every key of one instance carries the instance as
//! its hash tag (`P:{INSTANCE}:…`), so that reading several of them at once (a console's
//! password and reset epoch) stays within one slot, as Redis Cluster requires.

/// `P:{INSTANCE}:WHAT`.
pub fn of_instance(prefix: &str, instance: &str, what: &str) -> String {
    format!("{prefix}:{{{instance}}}:{what}")
}

pub const PASSWORD: &str = "password";
pub const EPOCH: &str = "epoch";
pub const FAILURES: &str = "failures";
pub const TOKENS: &str = "tokens";
