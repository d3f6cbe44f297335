//! relay: a console proxy for cloud VMs.
//!
//! The pipeline for one connection runs in one direction (see `docs/architecture.md`):
//! listener → front door → token → dial → RFB negotiation → relay → close and audit.
//! [`conn`] is the only module that knows that order.

pub mod front;
pub mod rfb;
