//! Configuration: TOML, every field optional, defaults embedded. The documented sample
//! is `relay.example.toml` at the top of the repository; a test keeps the two in step.

use crate::auth::Scheme;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub public: Public,
    pub tokens: Tokens,
    pub websocket: WebSocket,
    pub hypervisor: Hypervisor,
    pub limits: Limits,
    pub passwords: Passwords,
    pub tls: Tls,
    pub relay: Relay,
    pub store: Store,
    pub websockify: Websockify,
    pub jwt: Jwt,
    pub nova: Nova,
    pub keepalive: Keepalive,
    pub metrics: Metrics,
    pub log: Log,
}

/// Prometheus metrics and the health probes, on an address of their own.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`127.0.0.1:9180`); off when absent.
    pub listen: Option<SocketAddr>,
}

/// Keeping quiet consoles alive, and finding the dead ones: TCP keepalive on both legs of
/// every connection (a viewer that vanished without a FIN frees its slot; a load balancer
/// or NAT in between sees traffic).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Keepalive {
    /// Seconds a connection may be quiet before the first probe; 0 turns TCP keepalive off.
    pub tcp_idle_secs: u64,
    /// Seconds between probes.
    pub tcp_interval_secs: u64,
    /// Unanswered probes after which the connection is dead.
    pub tcp_probes: u32,
    /// Seconds between WebSocket pings to viewers (websockify's `--heartbeat`); 0: none.
    /// Keeps a quiet console's connection busy for proxies that time out idle tunnels.
    pub websocket_ping_secs: u64,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { tcp_idle_secs: 60, tcp_interval_secs: 10, tcp_probes: 6, websocket_ping_secs: 20 }
    }
}

impl Keepalive {
    /// The socket option for a connection, if keepalive is on.
    pub fn tcp(&self) -> Option<socket2::TcpKeepalive> {
        (self.tcp_idle_secs > 0).then(|| {
            socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(self.tcp_idle_secs))
                .with_interval(Duration::from_secs(self.tcp_interval_secs.max(1)))
                .with_retries(self.tcp_probes.max(1))
        })
    }
}

/// TLS on the front doors (`https://`, `wss://`, CONNECT over TLS). With a certificate
/// configured, each connection is told apart by its first byte, so one port serves both.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain; reloaded with the key on SIGHUP.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Refuse connections that do not start with TLS.
    pub ssl_only: bool,
    /// The oldest TLS version viewers may use: "1.2" or "1.3".
    pub min_version: TlsVersion,
    /// The cipher suites offered, by their IANA names (`TLS13_AES_256_GCM_SHA384`,
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`, ...); empty: rustls's defaults.
    pub cipher_suites: Vec<String>,
}

/// A TLS protocol version, as configuration names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// WebSocket door (noVNC) and the static web client: an address, or several
    /// (`["0.0.0.0:6080", "[::]:6080"]`); `[]` turns the door off.
    pub websocket: Addrs,
    /// XVP-style CONNECT door for native viewers, likewise.
    pub connect: Addrs,
    /// Control socket path; when absent, see [`default_control_path`].
    pub control: Option<PathBuf>,
    /// A noVNC checkout to serve on the WebSocket listener.
    pub web: Option<PathBuf>,
    /// Load balancers whose connections may start with a PROXY protocol header (v1 or
    /// v2) naming the viewer, on both doors; from anyone else such a header is refused.
    pub proxy_protocol_from: Vec<crate::cidr::Cidr>,
}

/// A door's listen addresses: one (`"0.0.0.0:6080"`) or a list, written back the same way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Addrs(pub Vec<SocketAddr>);

impl Addrs {
    /// The first address: the one access URLs name when no public URL is set.
    pub fn first(&self) -> Option<SocketAddr> {
        self.0.first().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<SocketAddr> for Addrs {
    fn from(a: SocketAddr) -> Addrs {
        Addrs(vec![a])
    }
}

impl Serialize for Addrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Addrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Addrs, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(SocketAddr),
            Many(Vec<SocketAddr>),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(a)) => Ok(Addrs(vec![a])),
            Ok(OneOrMany::Many(list)) => Ok(Addrs(list)),
            Err(_) => Err(serde::de::Error::custom("a listen address (\"0.0.0.0:6080\") or a list of them")),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            websocket: Addrs(vec![([0, 0, 0, 0], 6080).into()]),
            connect: Addrs(vec![([0, 0, 0, 0], 6081).into()]),
            control: None,
            web: None,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// How clients reach relay, for the access URLs a new token comes with.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Public {
    /// e.g. `https://console.example.com/vnc_lite.html`; derived from the listener when absent.
    pub novnc_base_url: Option<String>,
    /// e.g. `http://console.example.com:6081/console`; derived from the listener when absent.
    pub connect_base_url: Option<String>,
}

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

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocket {
    /// Origins allowed besides the Host the request came to: full origins
    /// (`https://dash.example.com`) or bare host names.
    pub allowed_origins: Vec<String>,
    /// Host names (optionally `name:port`) relay answers to on the WebSocket listener;
    /// empty: any. Set it to the names viewers use, so that a site that points its own name
    /// at relay's address (DNS rebinding) is refused even though its Origin matches its Host.
    pub allowed_hosts: Vec<String>,
    /// Believe `X-Forwarded-Proto` and `X-Forwarded-For` (only behind a reverse proxy you
    /// run): the first for the Origin check, the second as the viewer's address in audit
    /// events and per-source lock-out.
    pub trust_forwarded_headers: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hypervisor {
    /// Schemes relay may use towards hypervisors, most preferred first.
    pub auth_schemes: Vec<Scheme>,
    /// VNC password used when a token carries none.
    pub vnc_password: Option<String>,
    pub connect_timeout_secs: u64,
    /// VeNCrypt: CA bundle that hypervisor certificates must chain to.
    pub vencrypt_ca_certs: Option<PathBuf>,
    /// VeNCrypt: relay's client certificate and key (hypervisors with verify-peer=yes).
    pub vencrypt_client_cert: Option<PathBuf>,
    pub vencrypt_client_key: Option<PathBuf>,
    /// VeNCrypt X509Plain: user name sent with `vnc_password` inside TLS.
    pub plain_username: Option<String>,
    /// VeNCrypt: check that the hypervisor's certificate names the host relay dialed.
    /// nova does not (it checks the chain only); turn this off for compute certificates
    /// whose names do not match how tokens address the hosts.
    pub verify_hostname: bool,
    /// VeNCrypt: the oldest TLS version, and the cipher suites (empty: the defaults).
    pub tls_min_version: TlsVersion,
    pub tls_cipher_suites: Vec<String>,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Hypervisor {
            auth_schemes: vec![Scheme::None, Scheme::Vnc],
            vnc_password: None,
            connect_timeout_secs: 5,
            vencrypt_ca_certs: None,
            vencrypt_client_cert: None,
            vencrypt_client_key: None,
            plain_username: None,
            verify_hostname: true,
            tls_min_version: TlsVersion::V1_2,
            tls_cipher_suites: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections open at once from one source address (the proxy-reported one where
    /// trusted); 0 = no limit (the default: behind a TCP load balancer every viewer is
    /// its address).
    pub max_connections_per_source: usize,
    pub max_sessions: usize,
    pub max_sessions_per_instance: usize,
    pub max_header_bytes: usize,
    /// From accept to the end of both RFB handshakes.
    pub handshake_timeout_secs: u64,
    /// Largest WebSocket frame accepted from a viewer. Payloads are relayed as they
    /// arrive, so this bounds no buffer; it refuses absurd frames early.
    pub max_ws_message_bytes: usize,
    pub relay_buffer_bytes: usize,
    /// End a console after this long with no byte either way; 0 = never.
    pub session_idle_timeout_secs: u64,
    pub half_close_timeout_secs: u64,
    /// Requests served on one keep-alive connection of the web client.
    pub max_requests_per_connection: usize,
    /// A web client that takes no byte of a response for this long is disconnected.
    pub web_send_timeout_secs: u64,
    /// On SIGTERM, seconds of answering `/readyz` with 503 (and refusing new consoles)
    /// before the listeners close, for load balancers to notice; live consoles go on.
    pub drain_secs: u64,
    pub shutdown_grace_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_source: 0,
            max_sessions: 10_000,
            max_sessions_per_instance: 16,
            max_header_bytes: 8192,
            handshake_timeout_secs: 15,
            max_ws_message_bytes: 4 << 20,
            relay_buffer_bytes: 32 << 10,
            session_idle_timeout_secs: 3600,
            half_close_timeout_secs: 30,
            max_requests_per_connection: 200,
            web_send_timeout_secs: 60,
            drain_secs: 0,
            shutdown_grace_secs: 5,
        }
    }
}

/// Which back-end relays established consoles' bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// What the benchmark shows best for consoles on this machine kind (see README):
    /// sockmap for raw sessions where it loads, copy for the rest.
    #[default]
    Auto,
    /// eBPF sockmap: raw sessions moved in the kernel (root or CAP_BPF + CAP_NET_ADMIN).
    Sockmap,
    /// io_uring: raw sessions spliced through pipes by one ring thread.
    Uring,
    /// The portable userspace relay.
    Copy,
}

/// The established byte relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relay {
    pub backend: Backend,
    /// sockmap: bytes one direction may have in flight towards a receiver that has not
    /// acknowledged them, per session; past it TCP pushes back on the sender.
    pub in_flight_bytes: u64,
    /// Milliseconds a console bound for a kernel back-end runs on copy first, so that
    /// short ones (probes, abandoned password prompts) never pay the hand-off; 0 hands
    /// over at once.
    pub kernel_after_ms: u64,
}

impl Default for Relay {
    fn default() -> Self {
        Relay { backend: Backend::Auto, in_flight_bytes: 1 << 20, kernel_after_ms: 1000 }
    }
}

/// Console passwords that viewers must give (set per instance over the control socket).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Passwords {
    /// Consecutive wrong passwords, per instance and per source address, before lock-out.
    pub max_failures: u32,
    /// Seconds a lock-out lasts.
    pub lockout_secs: u64,
    /// Seconds a viewer has to answer the password prompt (a person is typing).
    pub entry_timeout_secs: u64,
    /// Most instances and sources whose failures are remembered at once.
    pub max_tracked: usize,
    /// Most instances with a console password.
    pub max_instances: usize,
}

impl Default for Passwords {
    fn default() -> Self {
        Passwords { max_failures: 5, lockout_secs: 300, entry_timeout_secs: 120, max_tracked: 100_000, max_instances: 100_000 }
    }
}

/// Where tokens, console passwords, lock-outs and resets are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A file on this appliance: survives restarts; one appliance alone.
    #[default]
    Local,
    /// This process's memory: lost on restart (tests, throw-away runs).
    Memory,
    /// A Redis (or Valkey) server shared by a fleet of appliances.
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    pub backend: StoreBackend,
    /// local: the store file; when absent, see [`default_state_dir`] (`relay.db` in it).
    pub path: Option<PathBuf>,
    /// The key that seals console and hypervisor passwords at rest (32 or more random
    /// bytes, mode 0600). local: created beside the store file when absent. redis:
    /// required, the same file on every appliance.
    pub secret_key_file: Option<PathBuf>,
    /// redis: `redis://host:port/db` or `rediss://…` (TLS).
    pub url: Option<String>,
    /// redis: ACL user name.
    pub username: Option<String>,
    /// redis: a file holding the ACL password (never the password itself in this file).
    pub password_file: Option<PathBuf>,
    /// rediss: CA bundle the server's certificate must chain to; the system's roots when
    /// absent.
    pub ca_file: Option<PathBuf>,
    /// redis: Sentinel addresses (`host:port`); with `master_name`, relay asks them for the
    /// current master instead of using `url`'s host.
    pub sentinels: Vec<String>,
    pub master_name: Option<String>,
    /// redis: the prefix of every key and channel, so that fleets can share a server.
    pub key_prefix: String,
    /// redis: milliseconds a command may take before the store counts as unavailable.
    pub timeout_ms: u64,
    /// redis: replicas that must have a new token or password before it is acknowledged
    /// (Redis `WAIT`), so that a Sentinel failover cannot lose it; 0 = do not wait.
    pub wait_replicas: u32,
    /// This appliance's name in the fleet (`relay ctl cluster`); the host name when absent.
    pub appliance_name: Option<String>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            backend: StoreBackend::Local,
            path: None,
            secret_key_file: None,
            url: None,
            username: None,
            password_file: None,
            ca_file: None,
            sentinels: Vec::new(),
            master_name: None,
            key_prefix: "relay".into(),
            timeout_ms: 1000,
            wait_replicas: 0,
            appliance_name: None,
        }
    }
}

impl Store {
    /// The local store's file.
    pub fn file(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| default_state_dir().join("relay.db"))
    }

    /// This appliance's name: the configured one, else the host name.
    pub fn appliance(&self) -> String {
        self.appliance_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "relay".into())
        })
    }
}

/// `$RELAY_STATE_DIR`, else `/var/lib/relay` for root, else `$XDG_STATE_HOME/relay`, else
/// `~/.local/state/relay`.
pub fn default_state_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_STATE_DIR") {
        return p.into();
    }
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return "/var/lib/relay".into();
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Path::new(&dir).join("relay");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".local/state/relay")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `relay=debug`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, filter: "info".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e))?;
        if let Some(nova_conf) = config.nova.config_file.clone() {
            crate::auth::sources::nova::conf::apply(&mut config, &nova_conf)
                .map_err(|e| ConfigError::Invalid(format!("nova.config_file: {e:#}")))?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.listen.websocket.is_empty() && self.listen.connect.is_empty() {
            return bad("listen: at least one of websocket and connect is needed");
        }
        if self.hypervisor.auth_schemes.is_empty() {
            return bad("hypervisor.auth_schemes is empty: relay could not authenticate to any hypervisor");
        }
        if let Some(pw) = &self.hypervisor.vnc_password {
            crate::auth::passwords::check_password(pw).map_err(|e| ConfigError::Invalid(format!("hypervisor.vnc_password: {e}")))?;
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls: cert and key go together");
        }
        if self.tls.ssl_only && self.tls.cert.is_none() {
            return bad("tls.ssl_only needs tls.cert and tls.key");
        }
        if self.hypervisor.auth_schemes.contains(&Scheme::Vencrypt) && self.hypervisor.vencrypt_ca_certs.is_none() {
            return bad("hypervisor.auth_schemes has vencrypt: set hypervisor.vencrypt_ca_certs to verify hypervisors");
        }
        if self.tokens.ttl_secs == 0 {
            return bad("tokens.ttl_secs must be at least 1");
        }
        let sources = &self.tokens.sources;
        if sources.is_empty() || sources.iter().enumerate().any(|(i, s)| sources[..i].contains(s)) {
            return bad("tokens.sources must name at least one source, each once");
        }
        if sources.contains(&TokenSourceKind::WebsockifyFile) && self.websockify.token_file.is_none() {
            return bad("tokens.sources has websockify-file: set websockify.token_file");
        }
        if sources.contains(&TokenSourceKind::WebsockifyRedis) && self.websockify.redis_url.is_none() {
            return bad("tokens.sources has websockify-redis: set websockify.redis_url");
        }
        if sources.contains(&TokenSourceKind::Jwt) && self.jwt.keys.is_empty() {
            return bad("tokens.sources has jwt: list the keys tokens are signed with in [jwt] keys");
        }
        if sources.contains(&TokenSourceKind::Nova) && self.nova.database_urls.is_empty() {
            return bad("tokens.sources has nova: set nova.database_urls (one per cell) or nova.config_file");
        }
        if self.nova.timeout_ms == 0 || self.nova.max_connections == 0 {
            return bad("nova: timeout_ms and max_connections must be at least 1");
        }
        if self.limits.relay_buffer_bytes < 1024 || self.limits.max_header_bytes < 512 {
            return bad("limits: relay_buffer_bytes must be at least 1024 and max_header_bytes at least 512");
        }
        if self.relay.in_flight_bytes < 64 << 10 {
            return bad("relay.in_flight_bytes must be at least 65536");
        }
        if self.relay.kernel_after_ms > 3_600_000 {
            return bad("relay.kernel_after_ms must be at most 3600000 (an hour)");
        }
        let store = &self.store;
        if store.backend == StoreBackend::Redis {
            if store.url.is_none() && store.sentinels.is_empty() {
                return bad("store: the redis back-end needs store.url (or store.sentinels and store.master_name)");
            }
            if store.sentinels.is_empty() != store.master_name.is_none() {
                return bad("store: sentinels and master_name go together");
            }
            if !store.sentinels.is_empty() && store.ca_file.is_some() {
                return bad(
                    "store: ca_file is not supported with sentinels yet (the master's certificate would be checked against the system's roots)",
                );
            }
            if store.secret_key_file.is_none() {
                return bad("store: the redis back-end needs store.secret_key_file (the same key on every appliance) to seal passwords");
            }
            if store.key_prefix.is_empty() || store.key_prefix.contains(['{', '}', ' ']) {
                return bad("store.key_prefix must be a non-empty name without braces or spaces");
            }
        }
        if store.timeout_ms == 0 {
            return bad("store.timeout_ms must be at least 1");
        }
        if let Some(web) = &self.listen.web
            && !web.is_dir()
        {
            return Err(ConfigError::Invalid(format!("listen.web: {} is not a directory", web.display())));
        }
        Ok(())
    }

    pub fn control_path(&self) -> PathBuf {
        self.listen.control.clone().unwrap_or_else(default_control_path)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.handshake_timeout_secs)
    }
}

/// `$RELAY_CONTROL`, else `$XDG_RUNTIME_DIR/relay/control.sock`, else
/// `/run/relay/control.sock` for root, else `/tmp/relay-<uid>/control.sock`.
pub fn default_control_path() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_CONTROL") {
        return p.into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("relay/control.sock");
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if uid == 0 { "/run/relay/control.sock".into() } else { format!("/tmp/relay-{uid}/control.sock").into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../relay.example.toml");
        let sample: Config = toml::from_str(text).expect("relay.example.toml parses");
        let defaults = Config::default();
        // The sample documents the defaults: every value in it is the default value.
        assert_eq!(toml::to_string(&sample).unwrap(), toml::to_string(&defaults).unwrap());
    }

    #[test]
    fn a_door_listens_on_one_address_or_several() {
        let one: Config = toml::from_str("[listen]\nwebsocket = \"127.0.0.1:6080\"\n").unwrap();
        assert_eq!(one.listen.websocket.0, ["127.0.0.1:6080".parse().unwrap()]);
        let two: Config = toml::from_str("[listen]\nwebsocket = [\"0.0.0.0:6080\", \"[::]:6080\"]\nconnect = []\n").unwrap();
        assert_eq!(two.listen.websocket.0.len(), 2);
        assert!(two.listen.connect.is_empty(), "[] turns a door off");
        assert!(toml::from_str::<Config>("[listen]\nwebsocket = \"nowhere\"\n").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[limits]\nmax_conections = 3\n").is_err());
        let mut c = Config::default();
        c.hypervisor.vnc_password = Some("123456789".into());
        assert!(c.validate().is_err());
        c.hypervisor.vnc_password = None;
        c.hypervisor.auth_schemes.clear();
        assert!(c.validate().is_err());
        assert!(toml::from_str::<Config>("[relay]\nbackend = \"fastest\"\n").is_err(), "an unknown back-end is refused");
        let mut c = Config::default();
        c.relay.in_flight_bytes = 1024;
        assert!(c.validate().is_err(), "an in-flight cap too small to relay a segment is refused");
    }
}
