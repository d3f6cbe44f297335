//! Where relay listens and how its doors speak: addresses, TLS, WebSocket rules, keepalive
//! and the metrics listener.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
