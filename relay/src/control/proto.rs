//! Requests and replies of the control protocol (version 1).

use crate::auth::{NewToken, Secret};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const VERSION: u32 = 1;
/// Longest request line the server reads.
pub const MAX_LINE: usize = 64 << 10;

/// One request line: `{"v":1,"op":"...",...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default = "version")]
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

fn version() -> u32 {
    VERSION
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    TokenCreate(NewToken),
    TokenCheck {
        token: String,
    },
    TokenTouch {
        token: String,
    },
    TokenDelete {
        token: String,
    },
    TokenList {
        #[serde(default)]
        instance: Option<String>,
        #[serde(default)]
        host: Option<String>,
    },
    Sessions {
        #[serde(default)]
        instance: Option<String>,
    },
    /// Every appliance's live consoles (of one instance), asked through the store.
    ClusterSessions {
        #[serde(default)]
        instance: Option<String>,
    },
    /// The appliances that share this one's store, from their heartbeats.
    Cluster,
    Stats,
    /// Sets the console password viewers must give; `disconnect` ends live consoles.
    InstancePasswordSet {
        instance: String,
        password: Secret,
        #[serde(default)]
        disconnect: bool,
    },
    /// Removes the console password; `disconnect` ends live consoles.
    InstancePasswordClear {
        instance: String,
        #[serde(default)]
        disconnect: bool,
    },
    /// Ends every live console of the instance, and with `revoke` deletes its tokens.
    InstanceReset {
        instance: String,
        #[serde(default)]
        revoke: bool,
    },
}

impl Request {
    /// The instance a request names, if any: checked before anything is done with it.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Request::TokenCreate(t) => Some(&t.instance),
            Request::TokenList { instance, .. } | Request::Sessions { instance } | Request::ClusterSessions { instance } => {
                instance.as_deref()
            }
            Request::InstancePasswordSet { instance, .. }
            | Request::InstancePasswordClear { instance, .. }
            | Request::InstanceReset { instance, .. } => Some(instance),
            Request::TokenCheck { .. } | Request::TokenTouch { .. } | Request::TokenDelete { .. } | Request::Stats | Request::Cluster => {
                None
            }
        }
    }
}

impl Envelope {
    pub fn new(request: Request) -> Self {
        Envelope { v: VERSION, request }
    }
}

/// What went wrong with a request; `kind` is stable for programs, `message` for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    UnsupportedVersion,
    NotFound,
    Full,
    Unavailable,
    Forbidden,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        f.write_str(&name)
    }
}

impl ControlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ControlError { kind, message: message.into() }
    }
}

/// One reply line: `{"ok":true,"result":...}` or `{"ok":false,"error":{...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

impl From<Result<Value, ControlError>> for Reply {
    fn from(r: Result<Value, ControlError>) -> Self {
        match r {
            Ok(v) => Reply { ok: true, result: Some(v), error: None },
            Err(e) => Reply { ok: false, result: None, error: Some(e) },
        }
    }
}

impl From<Reply> for Result<Value, ControlError> {
    fn from(r: Reply) -> Self {
        match (r.ok, r.result, r.error) {
            (true, v, _) => Ok(v.unwrap_or(Value::Null)),
            (false, _, Some(e)) => Err(e),
            (false, _, None) => Err(ControlError::new(ErrorKind::BadRequest, "reply without error")),
        }
    }
}
