//! RFB (VNC) security negotiation, both sides, as sans-I/O state machines.
//!
//! relay terminates RFB security on each side separately: towards the hypervisor it
//! is the client ([`hypervisor::HypervisorHandshake`]), towards the viewer it is the
//! server ([`viewer::ViewerHandshake`]). After SecurityResult both sides speak the same
//! ClientInit/ServerInit and everything after passes through untouched, whatever
//! version each side negotiated (those messages do not differ between 3.3, 3.7 and 3.8).

pub mod drive;
pub mod hypervisor;
pub mod viewer;
pub mod vnc_auth;
mod wire;

pub use wire::{Handshake, Progress, Version};

#[cfg(test)]
pub(crate) mod testing;

/// Security type numbers from the RFB specification.
pub mod security {
    pub const INVALID: u8 = 0;
    pub const NONE: u8 = 1;
    pub const VNC: u8 = 2;
    pub const VENCRYPT: u8 = 19;
}

/// Longest failure reason relay accepts from a peer; longer ones are refused, not buffered.
pub const MAX_REASON_BYTES: usize = 4096;

/// Why a negotiation failed. `Display` is the text logged and, on the viewer side,
/// the reason string sent to the viewer where the protocol carries one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RfbError {
    #[error("peer is not speaking RFB (greeting {0:?})")]
    NotRfb(String),
    #[error("unsupported RFB protocol version {0}")]
    UnsupportedVersion(String),
    #[error("hypervisor refused the console: {0}")]
    HypervisorRefused(String),
    #[error("hypervisor offers security types {offered:?}, none of the configured {configured:?}")]
    NoCommonScheme { offered: Vec<u8>, configured: Vec<String> },
    #[error("hypervisor rejected relay's credentials{}", reason_suffix(.0))]
    HypervisorAuthFailed(Option<String>),
    #[error("hypervisor wants a VNC password and none is configured for this console")]
    NoHypervisorPassword,
    #[error("hypervisor chose security type {0}, which relay does not speak")]
    UnexpectedSecurityType(u32),
    #[error("viewer chose security type {0}, which was not offered")]
    ViewerBadChoice(u8),
    #[error("wrong console password")]
    WrongPassword,
    #[error("{0} is longer than relay accepts")]
    TooLong(&'static str),
    #[error("{0}")]
    Other(String),
}

fn reason_suffix(reason: &Option<String>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!(": {r}"),
        _ => String::new(),
    }
}
