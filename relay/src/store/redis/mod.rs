//! The shared store of a fleet, on Redis or Valkey.

pub mod conn;
pub mod fleet;
pub mod instance;
pub mod keys;
pub mod tokens;
