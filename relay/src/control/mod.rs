//! The control socket: JSON lines over a Unix socket, for token, session and instance
//! operations. It calls the token store and the session registry; nothing in the
//! connection pipeline knows it exists. The protocol is in `docs/control-protocol.md`.

pub mod client;
pub mod handler;
pub mod proto;
pub mod replies;
pub mod server;
