//! relay: a console proxy for cloud VMs.
//!
//! The pipeline for one connection runs in one direction (see `docs/architecture.md`):
//! listener → front door → token → dial → RFB negotiation → relay → close and audit.
//! [`conn`] is the only module that knows that order.

pub mod app;
pub mod auth;
pub mod cidr;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conn;
pub mod control;
pub mod ctl;
pub mod dial;
pub mod fleet;
pub mod front;
pub mod heap;
pub mod logsink;
pub mod metrics;
pub mod relay;
pub mod reload;
pub mod reserve;
pub mod rfb;
pub mod rlimit;
pub mod run;
pub mod server;
pub mod session;
pub mod sockopt;
pub mod sources;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;
