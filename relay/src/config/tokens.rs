//! Console tokens and the authorities that vouch for them.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tokens {
    pub ttl_secs: u64,
    /// A token unused (no new connection, no live session) for this long lapses; 0 = never.
    pub idle_timeout_secs: u64,
    pub max_tokens: usize,
    pub sweep_interval_secs: u64,
    /// How often live sessions mark their token as in use.
    pub touch_interval_secs: u64,
    /// Where a token is looked up, in order; the first that knows it decides.
    pub sources: Vec<TokenSourceKind>,
    /// End a console when the token that opened it expires (a token's lifetime then
    /// bounds the console's, as with nova's `enforce_session_timeout`); by default a
    /// token only has to be valid when the console opens.
    pub end_consoles_at_expiry: bool,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            ttl_secs: 600,
            idle_timeout_secs: 600,
            max_tokens: 100_000,
            sweep_interval_secs: 30,
            touch_interval_secs: 30,
            sources: vec![TokenSourceKind::Store],
            end_consoles_at_expiry: false,
        }
    }
}

/// A token authority (`[tokens] sources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenSourceKind {
    /// relay's own store (`relay ctl token create`).
    Store,
    /// websockify's TokenFile: `[websockify] token_file`.
    WebsockifyFile,
    /// websockify's TokenRedis: `[websockify] redis_url`.
    WebsockifyRedis,
    /// Signed tokens: `[jwt] keys`.
    Jwt,
    /// nova's `console_auth_tokens`: `[nova] database_urls` (or `config_file`).
    Nova,
}

/// nova's console tokens, read from its cell databases (`[tokens] sources` with `nova`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nova {
    /// A nova.conf to take `[database] connection`, `[vnc]`, `[console] allowed_origins`
    /// and `[consoleauth] enforce_session_timeout` from (where this file leaves them unset).
    pub config_file: Option<PathBuf>,
    /// One per cell: the `[database] connection` of its nova.conf (`mysql://`,
    /// `mysql+pymysql://`), user and password included.
    pub database_urls: Vec<String>,
    /// End a console within `tokens.touch_interval_secs` of its token's row vanishing
    /// (nova deletes them when an instance is deleted, migrated or rebuilt).
    pub end_when_token_deleted: bool,
    /// nova's `[consoleauth] enforce_session_timeout`: end a console when its token
    /// expires too (within `tokens.touch_interval_secs`).
    pub enforce_session_timeout: bool,
    /// How long a look-up may take before the database counts as unavailable.
    pub timeout_ms: u64,
    /// Connections kept open to each cell database at most.
    pub max_connections: usize,
}

impl Default for Nova {
    fn default() -> Self {
        Nova {
            config_file: None,
            database_urls: Vec::new(),
            end_when_token_deleted: true,
            enforce_session_timeout: false,
            timeout_ms: 2000,
            max_connections: 8,
        }
    }
}

/// Signed console tokens (`[tokens] sources` with `jwt`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jwt {
    /// The keys tokens may be signed with; a token naming a `kid` is checked with that one.
    pub keys: Vec<JwtKey>,
    /// Seconds of clock difference allowed for `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Refuse tokens without `exp` (websockify's tokens may lack it).
    pub require_exp: bool,
    /// How long `instance reset --revoke` refuses the instance's tokens issued before it
    /// (by `iat`, else `nbf`); sign tokens that expire sooner than this.
    pub revoke_for_secs: u64,
}

impl Default for Jwt {
    fn default() -> Self {
        Jwt { keys: Vec::new(), leeway_secs: 30, require_exp: true, revoke_for_secs: 86_400 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    /// HS256: the secret; the others: the public key (PEM). `relay ctl token sign` reads
    /// the secret or private key from a file of its own.
    pub file: PathBuf,
    pub algorithm: JwtAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[allow(clippy::upper_case_acronyms)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    HS256,
    #[value(name = "RS256")]
    RS256,
    #[value(name = "ES256")]
    ES256,
    #[value(name = "EdDSA")]
    EdDSA,
}

/// websockify's token sources, read only (`[tokens] sources`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Websockify {
    /// A file, or a directory of files, of `token: host:port` lines.
    pub token_file: Option<PathBuf>,
    /// The Redis holding websockify's tokens (`redis://` or `rediss://`).
    pub redis_url: Option<String>,
    /// A file holding that Redis's password.
    pub redis_password_file: Option<PathBuf>,
    /// websockify's namespace: keys are `namespace:token`; empty, the token alone.
    pub redis_namespace: String,
}
