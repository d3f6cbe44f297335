//! Front doors: what a connection asks for before any RFB is spoken.
//!
//! Everything here is pure request/response logic over bytes already read; the I/O
//! lives in [`crate::conn`] and [`web`]'s file serving. The codecs the doors share with
//! the dialer and the relay back-ends (HTTP heads, WebSocket framing) are in [`crate::wire`].

pub mod health;
pub mod origin;
pub mod token_param;
pub mod web;
pub mod ws;

/// Which front door a request came through; used in logs and access URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Door {
    WebSocket,
    Connect,
}

impl Door {
    /// Whether a token for a `console` kind opens a console here. nova's kinds each name
    /// a door (`novnc` the WebSocket one, `xvpvnc` CONNECT); relay's own `vnc` opens
    /// either; any other (SPICE, serial, MKS) neither.
    pub fn admits(self, console: &str) -> bool {
        matches!((self, console), (_, "vnc") | (Door::WebSocket, "novnc") | (Door::Connect, "xvpvnc"))
    }
}

impl std::fmt::Display for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Door::WebSocket => "websocket",
            Door::Connect => "connect",
        })
    }
}
